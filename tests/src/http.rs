//! Plain HTTPS requests to a controller's API port (`/health`, `/metrics`), over the same
//! TLS and HTTP/2 as the gRPC API, trusting only the lab's CA; and a checking reader of
//! Prometheus' text format.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use http_body_util::BodyExt;
use tonic::codegen::{Service, http};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// GETs `https://{address}{path}`, presenting `token` if given: the status code and the
/// body as text.
pub async fn get(
    ca: &Path,
    address: &str,
    path: &str,
    token: Option<&proto::auth::Token>,
) -> Result<(u16, String), String> {
    let ca = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let url = format!("https://{address}{path}");
    let endpoint = Endpoint::from_shared(url.clone())
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    let mut channel = tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
        .await
        .map_err(|_| format!("{address}: no TLS handshake within 5 s"))?
        .map_err(|e| format!("{address}: {e}"))?;
    let mut request = http::Request::get(&url);
    if let Some(token) = token {
        request = request.header(proto::auth::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(tonic::body::Body::empty())
        .map_err(|e| e.to_string())?;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| e.to_string())?;
    let response = channel.call(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The samples of a Prometheus text exposition by `name{labels}` as written, checked line by
/// line: every sample belongs to a family declared by a `# TYPE` line before it, its name
/// and label names are well formed, its label values quoted, its value a number.
pub fn prometheus(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut families: Vec<String> = Vec::new();
    let mut samples = BTreeMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split(' ');
            let (name, kind) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            if !name_ok(name)
                || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
            {
                return Err(format!("bad TYPE line: {line}"));
            }
            families.push(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| format!("bad value: {line}"))?,
        };
        let name = series.split('{').next().unwrap_or("");
        if !name_ok(name) {
            return Err(format!("bad metric name: {line}"));
        }
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .ok_or(format!("bad labels: {line}"))?;
            check_labels(inner).map_err(|e| format!("{e}: {line}"))?;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|f| families.iter().any(|d| d == f))
            .unwrap_or(name);
        if !families.iter().any(|d| d == family) {
            return Err(format!("{name} has no TYPE line before it"));
        }
        samples.insert(series.to_string(), value);
    }
    Ok(samples)
}

/// Checks `k="v",k2="v2"` (values with \\, \" and \n escapes).
fn check_labels(mut rest: &str) -> Result<(), String> {
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").ok_or("a label without =\"")?;
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("bad label name {key:?}"));
        }
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    chars.next();
                }
                Some((i, '"')) => break i,
                Some(_) => {}
                None => return Err("an unterminated label value".into()),
            }
        };
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(())
}

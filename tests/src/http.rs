//! Plain HTTPS requests to a controller's API port (`/health`, `/metrics`), over the same
//! TLS and HTTP/2 as the gRPC API, trusting only the lab's CA; the console's websocket as a
//! browser opens it; and a checking reader of Prometheus' text format.

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

/// What opening a websocket got: refused with an HTTP status and body, or opened, with the
/// first binary message the server sent.
#[derive(Debug, PartialEq, Eq)]
pub enum WebSocketOutcome {
    /// The upgrade was refused.
    Refused(u16, String),
    /// The upgrade succeeded; the first message.
    Opened(Vec<u8>),
}

/// Opens `wss://{address}{path}` as a browser does (HTTP/1.1 by ALPN, an Upgrade request)
/// offering `protocols`, trusting only `ca`; reads the first binary message if it opens.
pub async fn websocket(
    ca: &Path,
    address: &str,
    path: &str,
    protocols: &str,
) -> Result<WebSocketOutcome, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring};
    use tokio_stream::StreamExt;
    use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut config =
        ClientConfig::builder_with_provider(std::sync::Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("{address}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{address}: TLS: {e}"))?;
    let mut request = format!("wss://{address}{path}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        protocols
            .parse()
            .map_err(|e| format!("{protocols:?}: {e}"))?,
    );
    let opened = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, tls),
    )
    .await
    .map_err(|_| format!("{address}{path}: no answer to the upgrade within 10 s"))?;
    let mut socket = match opened {
        Ok((socket, _)) => socket,
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            return Ok(WebSocketOutcome::Refused(
                response.status().as_u16(),
                String::from_utf8_lossy(&body).into_owned(),
            ));
        }
        Err(e) => return Err(format!("{address}{path}: {e}")),
    };
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .map_err(|_| format!("{address}{path}: no message within 10 s"))?;
        match next {
            Some(Ok(tungstenite::Message::Binary(data))) => {
                return Ok(WebSocketOutcome::Opened(data.to_vec()));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("{address}{path}: {e}")),
            None => return Err(format!("{address}{path}: closed before any message")),
        }
    }
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

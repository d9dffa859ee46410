//! Plain HTTPS requests to a controller's API port (`/health`), over the same TLS and
//! HTTP/2 as the gRPC API, trusting only the lab's CA.

use std::path::Path;
use std::time::Duration;

use http_body_util::BodyExt;
use tonic::codegen::{Service, http};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// GETs `https://{address}{path}`: the status code and the body as text.
pub async fn get(ca: &Path, address: &str, path: &str) -> Result<(u16, String), String> {
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
    let request = http::Request::get(&url)
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

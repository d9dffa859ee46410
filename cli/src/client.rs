//! Connecting to the pair's API: the system IP first, then each node's controller.

use std::time::Duration;

use anyhow::bail;
use proto::v1::pairvisor_client::PairvisorClient;
use tonic::transport::{Channel, Endpoint};

/// How long to wait for each endpoint to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Connects to the first endpoint of the comma-separated list that accepts a connection.
pub async fn connect(endpoints: &str) -> anyhow::Result<PairvisorClient<Channel>> {
    let mut failures = Vec::new();
    for address in endpoints
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let uri = if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let endpoint = match Endpoint::from_shared(uri) {
            Ok(e) => e.connect_timeout(CONNECT_TIMEOUT),
            Err(e) => {
                failures.push(format!("{address}: {e}"));
                continue;
            }
        };
        match endpoint.connect().await {
            Ok(channel) => return Ok(PairvisorClient::new(channel)),
            Err(e) => failures.push(format!("{address}: {e}")),
        }
    }
    bail!(
        "cannot reach the pair's API ({}); is the pair up (`pvctl lab up`)? set --endpoint or PVCTL_ENDPOINT",
        failures.join("; ")
    )
}

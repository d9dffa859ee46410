//! Connecting to the pair's API: the system IP first, then each node's controller; and calling
//! it with retries. A call that fails with UNAVAILABLE (an election, an etcd member lost) or
//! whose endpoint does not answer is tried again, on the next endpoint that answers, until the
//! command's deadline; every attempt carries the same request ID, so a retried change is
//! never applied twice (the API answers a retry with the first attempt's outcome).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use proto::auth::{Bearer, Token};
use proto::v1::pairvisor_client::PairvisorClient;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client of the pair's API whose every call carries pvctl's token.
pub type Client = PairvisorClient<InterceptedService<Channel, Bearer>>;

/// How long to wait for each endpoint to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a connection and its TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// Metadata key of the request ID (the API's `x-pairvisor-request-id`).
const REQUEST_ID: &str = "x-pairvisor-request-id";

/// Where the pair's API is, and the CA its certificates chain to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// Endpoints tried in order (host:port, comma separated).
    pub list: String,
    /// The pair's CA certificate: the API is then called over TLS, trusting only it.
    pub ca: Option<PathBuf>,
    /// The token every call carries.
    pub token: Option<Token>,
}

/// Where pvctl finds the pair's CA unless told: the installed pair's, then the default lab's.
const DEFAULT_CAS: [&str; 2] = [
    "/etc/pairvisor/pki/ca.pem",
    "/var/lib/pairvisor-lab/pki/ca.pem",
];

/// The CA file to trust: `given`, else the first of [`DEFAULT_CAS`] that exists.
pub fn find_ca(given: Option<PathBuf>) -> Option<PathBuf> {
    given.or_else(|| DEFAULT_CAS.iter().map(PathBuf::from).find(|p| p.exists()))
}

/// The API's certificate does not chain to the CA pvctl trusts.
#[derive(Debug)]
struct Untrusted {
    address: String,
    ca: PathBuf,
    why: String,
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the pair's API at {} is not vouched for by the CA in {} ({}); give the pair's CA certificate with --ca or PVCTL_CA",
            self.address,
            self.ca.display(),
            self.why
        )
    }
}

impl std::error::Error for Untrusted {}

/// An error with its causes, as one line.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        // Wrappers often repeat their cause's words.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Connects to the first endpoint of the list that accepts a connection.
pub async fn connect(endpoints: &Endpoints) -> anyhow::Result<Client> {
    let tls = match &endpoints.ca {
        Some(ca) => Some(proto::transport::trusting(ca)?),
        None => None,
    };
    let mut failures = Vec::new();
    for address in endpoints
        .list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let endpoint = match proto::transport::endpoint_at(address, tls.as_ref()) {
            Ok(e) => e.connect_timeout(CONNECT_TIMEOUT),
            Err(e) => {
                failures.push(format!("{address}: {e}"));
                continue;
            }
        };
        // The connect timeout covers TCP only: a stopped controller accepts the connection in
        // its kernel and never answers the TLS handshake; the next endpoint may.
        let connected = match tokio::time::timeout(HANDSHAKE_TIMEOUT, endpoint.connect()).await {
            Ok(connected) => connected,
            Err(_) => {
                failures.push(format!(
                    "{address}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
                ));
                continue;
            }
        };
        match connected {
            Ok(channel) => {
                let bearer = endpoints.token.as_ref().map(Token::bearer);
                return Ok(PairvisorClient::with_interceptor(
                    channel,
                    bearer.unwrap_or_default(),
                ));
            }
            Err(e) => {
                let why = causes(&e);
                // A certificate the CA does not vouch for stays so: no retry helps.
                if why.contains("invalid peer certificate") {
                    return Err(Untrusted {
                        address: address.to_string(),
                        ca: endpoints.ca.clone().unwrap_or_default(),
                        why,
                    }
                    .into());
                }
                failures.push(format!("{address}: {why}"));
            }
        }
    }
    bail!(
        "cannot reach the pair's API ({}); is the pair up (`pvctl lab up`)? set --endpoint or PVCTL_ENDPOINT, and --ca or PVCTL_CA to the pair's CA certificate",
        failures.join("; ")
    )
}

/// One pvctl command's calls: its endpoints, its deadline and its request ID.
#[derive(Debug)]
pub struct Api {
    endpoints: Endpoints,
    deadline: Instant,
    request_id: String,
}

impl Api {
    /// Calls for one command against `endpoints`, giving up `timeout` from now.
    pub fn new(endpoints: &Endpoints, timeout: Duration) -> Api {
        Api {
            endpoints: endpoints.clone(),
            deadline: Instant::now() + timeout,
            request_id: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Calls `method` with `message`, retrying as the module doc says.
    pub async fn call<M, T, F, Fut>(&self, message: M, method: F) -> anyhow::Result<T>
    where
        M: Clone,
        F: Fn(Client, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        loop {
            let failure = match connect(&self.endpoints).await {
                Ok(client) => match method(client, self.request(message.clone())).await {
                    Ok(response) => return Ok(response.into_inner()),
                    Err(status) if retryable(&status) => anyhow::Error::new(status),
                    Err(status)
                        if self.endpoints.ca.is_none()
                            && status.message().contains("h2 protocol error") =>
                    {
                        bail!(
                            "the pair's API did not answer plain HTTP/2: it speaks TLS; give the pair's CA certificate with --ca or PVCTL_CA ({})",
                            status.message()
                        )
                    }
                    Err(status) => return Err(status.into()),
                },
                Err(e) if e.is::<Untrusted>() => return Err(e),
                Err(e) => e,
            };
            if Instant::now() + RETRY_PAUSE >= self.deadline {
                return Err(failure);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// `message` with this command's request ID and the time left as its gRPC deadline.
    fn request<M>(&self, message: M) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        let left = self.deadline.saturating_duration_since(Instant::now());
        request.set_timeout(left.max(Duration::from_millis(100)));
        if let Ok(id) = self.request_id.parse() {
            request.metadata_mut().insert(REQUEST_ID, id);
        }
        request
    }
}

/// Whether another attempt may succeed: the pair is between controllers or lost an etcd
/// member, or the connection broke.
fn retryable(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable => true,
        // A connection reset mid-call surfaces as UNKNOWN with a transport error inside.
        tonic::Code::Unknown => status.message().contains("transport error"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_unavailable_is_retried() {
        let retry = retryable(&tonic::Status::unavailable("election in progress"));

        assert!(retry);
    }

    #[test]
    fn retryable_invalid_argument_is_final() {
        let retry = retryable(&tonic::Status::invalid_argument("vcpus: too many"));

        assert!(!retry);
    }
}

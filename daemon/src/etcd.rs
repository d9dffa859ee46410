//! A failover client for the three-member etcd cluster.
//!
//! etcd-client's balanced channel keeps sending requests to a dead member (its maintainers
//! leave failover to the application), so this client holds one lazily connected client per
//! member, sends each request to the current member and, when that member fails (connection
//! refused, no leader, transport error, timeout), moves on to the next until a time budget is
//! spent. Callers retry only what is safe to retry: reads, lease renewals, registrations, and
//! compare-and-set transactions (a retried transaction that already applied fails its compare,
//! which the writer then checks for; see `store::Writer`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::time::Instant;

/// How long one request may take on one member before the next is tried. Short: a write
/// proposed through a follower just as the Raft leader dies is lost and never answered, and
/// waiting longer only stalls the pair (a retried transaction is safe: see `store::Writer`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait for a member to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 keep-alive interval and timeout on every member connection.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Pause after every member failed once, before trying them again.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// Errors of the failover client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating a member's client failed (a malformed endpoint).
    #[error("etcd endpoint {endpoint}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: etcd_client::Error,
    },
    /// The request failed on a member in a way retrying cannot help.
    #[error("etcd member {endpoint}: {op}")]
    Request {
        /// What was being done.
        op: &'static str,
        /// The member.
        endpoint: String,
        /// The cause.
        #[source]
        source: etcd_client::Error,
    },
    /// No endpoint was given.
    #[error("no etcd endpoints configured; list all three members in etcd_endpoints")]
    NoEndpoints,
    /// No member answered within the budget.
    #[error("no etcd member answered {op} within {budget:?}; the last one ({endpoint}) failed")]
    Unreachable {
        /// What was being done.
        op: &'static str,
        /// The time budget.
        budget: Duration,
        /// The last member tried.
        endpoint: String,
        /// Its failure.
        #[source]
        source: etcd_client::Error,
    },
}

/// One etcd member as its own endpoint answered a status request (or did not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberHealth {
    /// The member's name (e.g. `n0`, `w`), or its endpoint when the member list was
    /// unreachable.
    pub name: String,
    /// Its client endpoint, as configured.
    pub endpoint: String,
    /// Whether it answered within the timeout.
    pub up: bool,
    /// Whether it says it leads the cluster.
    pub leader: bool,
}

/// A handle to the cluster; cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<(String, Client)>,
    current: AtomicUsize,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints: Vec<&str> = self.inner.members.iter().map(|(e, _)| e.as_str()).collect();
        f.debug_struct("Etcd").field("members", &endpoints).finish()
    }
}

impl Etcd {
    /// Clients for every member of `endpoints` (connected lazily). Requests time out after
    /// `request_timeout`; a client for calls that block by design (a campaign) passes `None`.
    pub async fn connect(
        endpoints: &[String],
        request_timeout: Option<Duration>,
    ) -> Result<Etcd, Error> {
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        let mut members = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            // Pings every 2 s notice a dead member fast; the members must allow it
            // (`--grpc-keepalive-min-time 1s`, or etcd closes the connection as abusive).
            let mut options = ConnectOptions::new()
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_keep_alive(KEEP_ALIVE, KEEP_ALIVE)
                .with_keep_alive_while_idle(true)
                .with_require_leader(true);
            if let Some(timeout) = request_timeout {
                options = options.with_timeout(timeout);
            }
            let client = Client::connect([endpoint.as_str()], Some(options))
                .await
                .map_err(|source| Error::Endpoint {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            members.push((endpoint.clone(), client));
        }
        Ok(Etcd {
            inner: Arc::new(Inner {
                members,
                current: AtomicUsize::new(0),
            }),
        })
    }

    /// Each configured member's health, asked of the member itself (all at once, each
    /// within `timeout`): which of the quorum's members (the hosts' and the witness's) are
    /// up, and which leads.
    pub async fn member_health(&self, timeout: Duration) -> Vec<MemberHealth> {
        let listed = self
            .request("listing members", timeout, |mut c| async move {
                c.member_list().await
            })
            .await;
        let names: Vec<(String, String)> = match &listed {
            Ok(list) => list
                .members()
                .iter()
                .flat_map(|m| {
                    m.client_urls()
                        .iter()
                        .map(|url| (url.clone(), m.name().to_string()))
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut asked = tokio::task::JoinSet::new();
        for (index, (_, client)) in self.inner.members.iter().enumerate() {
            let mut client = client.clone();
            asked.spawn(async move {
                let status = tokio::time::timeout(timeout, client.status()).await;
                let (up, leader) = match status {
                    Ok(Ok(status)) => (
                        true,
                        status.header().map(|h| h.member_id()) == Some(status.leader()),
                    ),
                    Ok(Err(_)) | Err(_) => (false, false),
                };
                (index, up, leader)
            });
        }
        let mut health: Vec<MemberHealth> = self
            .inner
            .members
            .iter()
            .map(|(endpoint, _)| MemberHealth {
                name: member_name(&names, endpoint),
                endpoint: endpoint.clone(),
                up: false,
                leader: false,
            })
            .collect();
        while let Some(answer) = asked.join_next().await {
            if let Ok((index, up, leader)) = answer
                && let Some(member) = health.get_mut(index)
            {
                member.up = up;
                member.leader = leader;
            }
        }
        health
    }

    /// The current member's endpoint and client.
    pub fn current(&self) -> (String, Client) {
        let members = &self.inner.members;
        // `connect` refuses an empty member list, so the index is always in range.
        members[self.inner.current.load(Ordering::Relaxed) % members.len()].clone()
    }

    /// Moves on from `endpoint` to the next member (unless another caller already has).
    pub fn rotate(&self, endpoint: &str) {
        let members = &self.inner.members;
        let index = self.inner.current.load(Ordering::Relaxed) % members.len();
        if members.get(index).is_some_and(|(e, _)| e == endpoint) {
            self.inner.current.store(index + 1, Ordering::Relaxed);
        }
    }

    /// Runs `request` on the current member, moving to the next on a member failure, until
    /// it succeeds, fails for another reason, or `budget` is spent.
    pub async fn request<T, F, Fut>(
        &self,
        op: &'static str,
        budget: Duration,
        request: F,
    ) -> Result<T, Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + budget;
        let mut tried = 0usize;
        loop {
            let (endpoint, client) = self.current();
            match request(client).await {
                Ok(value) => return Ok(value),
                Err(e) if !member_failure(&e) => {
                    return Err(Error::Request {
                        op,
                        endpoint,
                        source: e,
                    });
                }
                Err(e) => {
                    tracing::debug!(%endpoint, op, error = %e, "etcd member failed; trying the next");
                    self.rotate(&endpoint);
                    tried += 1;
                    if Instant::now() >= deadline {
                        return Err(Error::Unreachable {
                            op,
                            budget,
                            endpoint,
                            source: e,
                        });
                    }
                    if tried.is_multiple_of(self.inner.members.len()) {
                        tokio::time::sleep(ROUND_PAUSE).await;
                    }
                }
            }
        }
    }

    /// Sends `request` to every member at once, each given `attempt`, and returns the first
    /// success. Only for idempotent requests that every member answers alike (a lease
    /// renewal, which etcd serves on its Raft leader whichever member receives it): a dead
    /// member, or one still forwarding to a dead leader, then costs nothing while another
    /// answers. Fails with a lasting failure if a member reported one, else the last failure.
    pub async fn request_any<T, F, Fut>(
        &self,
        op: &'static str,
        attempt: Duration,
        request: F,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let mut calls = tokio::task::JoinSet::new();
        for (endpoint, client) in &self.inner.members {
            let (endpoint, call) = (endpoint.clone(), request(client.clone()));
            calls.spawn(async move {
                let result = tokio::time::timeout(attempt, call)
                    .await
                    .unwrap_or_else(|_| Err(timed_out()));
                (endpoint, result)
            });
        }
        let mut failure: Option<(String, etcd_client::Error)> = None;
        while let Some(joined) = calls.join_next().await {
            let (endpoint, source) = match joined {
                Ok((_, Ok(value))) => return Ok(value),
                Ok((endpoint, Err(source))) => (endpoint, source),
                Err(e) => (
                    "(task)".to_string(),
                    etcd_client::Error::IoError(std::io::Error::other(e)),
                ),
            };
            let lasting = failure.as_ref().is_some_and(|(_, e)| !member_failure(e));
            if !lasting {
                failure = Some((endpoint, source));
            }
        }
        // `connect` refuses an empty member list, so at least one call failed here.
        let (endpoint, source) = failure.unwrap_or_else(|| (String::new(), timed_out()));
        if member_failure(&source) {
            Err(Error::Unreachable {
                op,
                budget: attempt,
                endpoint,
                source,
            })
        } else {
            Err(Error::Request {
                op,
                endpoint,
                source,
            })
        }
    }
}

/// The error of a call that got no answer in time.
fn timed_out() -> etcd_client::Error {
    etcd_client::Error::IoError(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer in time",
    ))
}

/// The name of the member whose client URL is `endpoint` (host:port, or a URL), else the
/// endpoint itself.
fn member_name(names: &[(String, String)], endpoint: &str) -> String {
    let bare = |url: &str| {
        url.split_once("://")
            .map_or(url, |(_, rest)| rest)
            .trim_end_matches('/')
            .to_string()
    };
    names
        .iter()
        .find(|(url, _)| bare(url) == bare(endpoint))
        .map_or_else(|| endpoint.to_string(), |(_, name)| name.clone())
}

/// Whether `e` means the member (or its connection) failed, so another member may succeed.
pub fn member_failure(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// What a [`Etcd::watch`] delivers.
#[derive(Debug)]
pub enum Watched {
    /// Committed changes, in order.
    Events(Vec<etcd_client::Event>),
    /// etcd cancelled the watch (its start revision was compacted away); nothing follows.
    Cancelled {
        /// Why, in words.
        reason: String,
    },
}

/// What to watch.
#[derive(Clone, Debug)]
pub struct WatchSpec {
    /// The key, or the prefix when `prefix` is set.
    pub key: String,
    /// Watch every key under `key`.
    pub prefix: bool,
    /// First revision to deliver; 0 means changes from now on.
    pub start_revision: i64,
}

impl Etcd {
    /// Watches `spec` until the receiver is dropped, re-watching on another member from the
    /// last revision seen when one fails, so no change is missed or delivered twice.
    pub fn watch(&self, spec: WatchSpec) -> tokio::sync::mpsc::Receiver<Watched> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(watch_loop(self.clone(), spec, tx));
        rx
    }
}

async fn watch_loop(etcd: Etcd, spec: WatchSpec, tx: tokio::sync::mpsc::Sender<Watched>) {
    let mut next = spec.start_revision;
    loop {
        let (endpoint, mut member) = etcd.current();
        let mut options = etcd_client::WatchOptions::new().with_prev_key();
        if spec.prefix {
            options = options.with_prefix();
        }
        if next > 0 {
            options = options.with_start_revision(next);
        }
        let mut stream = match member.watch(spec.key.as_str(), Some(options)).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(%endpoint, key = %spec.key, error = %e, "watch failed; trying the next etcd member");
                etcd.rotate(&endpoint);
                tokio::select! {
                    () = tokio::time::sleep(ROUND_PAUSE) => continue,
                    () = tx.closed() => return,
                }
            }
        };
        loop {
            let response = tokio::select! {
                r = stream.message() => r,
                () = tx.closed() => return,
            };
            let Ok(Some(response)) = response else {
                etcd.rotate(&endpoint);
                break;
            };
            if response.canceled() {
                let reason = match response.compact_revision() {
                    0 => format!("etcd cancelled the watch: {}", response.cancel_reason()),
                    kept => format!(
                        "history before revision {kept} was compacted; start at {kept} or later"
                    ),
                };
                let _ = tx.send(Watched::Cancelled { reason }).await;
                return;
            }
            // Watching "from now": pin "now" so a re-watch after a member failure misses nothing.
            if next == 0
                && let Some(header) = response.header()
            {
                next = header.revision() + 1;
            }
            let events = response.events().to_vec();
            if let Some(last) = events.iter().filter_map(|e| e.kv()).next_back() {
                next = last.mod_revision() + 1;
            }
            if !events.is_empty() && tx.send(Watched::Events(events)).await.is_err() {
                return;
            }
        }
    }
}

/// Budget of one maintenance call (alarms, compaction, defragmentation).
const MAINTENANCE_BUDGET: Duration = Duration::from_secs(30);

impl Etcd {
    /// The members that raised etcd's space-quota alarm (NOSPACE): etcd then refuses every
    /// write until space is reclaimed and the alarm disarmed.
    pub async fn space_alarms(&self) -> Result<Vec<u64>, Error> {
        let resp = self
            .request("reading alarms", MAINTENANCE_BUDGET, |mut c| async move {
                c.alarm(
                    etcd_client::AlarmAction::Get,
                    etcd_client::AlarmType::None,
                    None,
                )
                .await
            })
            .await?;
        Ok(resp
            .alarms()
            .iter()
            .filter(|a| a.alarm() == etcd_client::AlarmType::Nospace)
            .map(|a| a.member_id())
            .collect())
    }

    /// Reclaims space after a NOSPACE alarm: compacts history up to now, defragments every
    /// member that answers, and disarms the alarms of `members`.
    pub async fn reclaim_space(&self, members: &[u64]) -> Result<(), Error> {
        let now = self
            .request(
                "reading the revision",
                MAINTENANCE_BUDGET,
                |mut c| async move { c.get("/", None).await },
            )
            .await?
            .header()
            .map_or(0, |h| h.revision());
        let compacted = self
            .request(
                "compacting history",
                MAINTENANCE_BUDGET,
                |mut c| async move {
                    c.compact(
                        now,
                        Some(etcd_client::CompactionOptions::new().with_physical()),
                    )
                    .await
                },
            )
            .await;
        // Compacted already (e.g. by auto-compaction) is fine.
        if let Err(e) = compacted {
            tracing::warn!(error = %crate::error_chain(&e), "compaction before defragmenting failed");
        }
        for (endpoint, _) in &self.inner.members {
            // Defragmenting a large database takes longer than any request timeout: a client
            // of its own, without one.
            let options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
            let defragmented = match Client::connect([endpoint.as_str()], Some(options)).await {
                Ok(mut member) => member.defragment().await.map(|_| ()),
                Err(e) => Err(e),
            };
            match defragmented {
                Ok(_) => tracing::info!(%endpoint, "etcd member defragmented"),
                Err(e) => {
                    tracing::warn!(%endpoint, error = %e, "defragmenting an etcd member failed")
                }
            }
        }
        for &id in members {
            self.request(
                "disarming the space alarm",
                MAINTENANCE_BUDGET,
                |mut c| async move {
                    let mut options = etcd_client::AlarmOptions::new();
                    options.with_member(id);
                    c.alarm(
                        etcd_client::AlarmAction::Deactivate,
                        etcd_client::AlarmType::Nospace,
                        Some(options),
                    )
                    .await
                },
            )
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_named_by_its_client_url_with_or_without_scheme() {
        let names = vec![
            ("http://10.1.0.11:2379".to_string(), "n0".to_string()),
            ("https://10.1.0.13:2379/".to_string(), "w".to_string()),
        ];
        assert_eq!(member_name(&names, "10.1.0.11:2379"), "n0");
        assert_eq!(member_name(&names, "https://10.1.0.13:2379"), "w");
        assert_eq!(member_name(&names, "10.1.0.12:2379"), "10.1.0.12:2379");
    }
}

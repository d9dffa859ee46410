//! This controller's membership in the pair: an etcd lease kept alive, the node registration
//! bound to it, and the campaign for the serving role.
//!
//! ```text
//!  controller                                  etcd (3 members)
//!     │ LeaseGrant(ttl)  ───────────────────────────► lease L
//!     │ Put nodes/<node> = facts (lease L) ──────────►            (refreshed every 5 s)
//!     │ Campaign(serving, {node, api}, L) ──────────► blocks while the peer serves
//!     │ ◄────────────────────────────── elected: key serving/<L> at revision R
//!     │ role = Serving(key, R)          every write: txn if create_revision(key) == R
//!     │ KeepAlive(L) every ttl/3 ────────────────────►
//!     │ no keep-alive answer for ttl: role = Standby; start a new term
//! ```
//! A keep-alive stream or campaign broken by one dead etcd member is reopened on the same lease;
//! only a lease that expired ends the term. When this controller dies, its lease expires after
//! `ttl` seconds, etcd deletes its election key and the peer's campaign returns.

use std::time::Duration;

use crate::store::Etcd;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::agents::{Agent, AgentPool};
use crate::config::Config;
use crate::model::NodeRecord;
use crate::store::{self, ELECTION};

/// How often the node registration's facts are refreshed from the local agent.
const FACTS_REFRESH: Duration = Duration::from_secs(5);
/// Pause before retrying after an etcd error.
const RETRY: Duration = Duration::from_millis(500);

/// This controller's role in the pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Another controller serves (or none yet); API calls are forwarded.
    Standby,
    /// This controller serves; its writes are fenced by the election key.
    Serving {
        /// Election key.
        key: Vec<u8>,
        /// Creation revision of the key.
        revision: i64,
        /// The lease the key lives on; revoking it gives the role up.
        lease: i64,
    },
}

/// The election value: who serves and where its API is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// Node name.
    pub node: String,
    /// Its API address.
    pub api_address: String,
}

/// Errors that end a membership term.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An etcd request failed on every member.
    #[error("membership")]
    Etcd(#[from] crate::etcd::Error),
    /// The lease expired: etcd has dropped this node's registration and election key.
    #[error("lease {lease:x} expired")]
    LeaseExpired {
        /// The lease.
        lease: i64,
    },
}

/// Runs membership terms forever, publishing the role on `role`. `waiting` is a client
/// without a request timeout, for the campaign that blocks while the peer serves.
pub async fn run(
    config: Config,
    client: Etcd,
    waiting: Etcd,
    agents: AgentPool,
    role: watch::Sender<Role>,
) {
    let record = NodeRecord {
        name: config.node.clone(),
        api_address: config.api_address.clone(),
        agent_address: config.agent_address.clone(),
        facts: Default::default(),
        updated_unix_ms: 0,
    };
    let (facts_tx, facts) = watch::channel(record);
    tokio::spawn(refresh_facts(
        agents.get(&config.node, &config.agent_address).ok(),
        facts_tx,
    ));
    loop {
        let result = term(&config, &client, &waiting, &role, facts.clone()).await;
        if matches!(*role.borrow(), Role::Serving { .. }) {
            tracing::warn!(node = %config.node, "stepping down: serving role lost");
        }
        role.send_replace(Role::Standby);
        if let Err(e) = result {
            tracing::warn!(node = %config.node, error = %crate::error::chain(&e), "membership term ended; starting a new one");
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One lease's lifetime: register, campaign, keep alive until the lease is lost. Renewal runs
/// on its own task so that nothing else (a slow agent, a blocked campaign) can delay it.
async fn term(
    config: &Config,
    client: &Etcd,
    waiting: &Etcd,
    role: &watch::Sender<Role>,
    mut facts: watch::Receiver<NodeRecord>,
) -> Result<(), Error> {
    let ttl = Duration::from_secs(config.lease_ttl_seconds.unsigned_abs());
    let ttl_seconds = config.lease_ttl_seconds;
    let granted = Instant::now();
    let lease = client
        .request(
            "granting lease",
            store::REQUEST_BUDGET,
            |mut c| async move { c.lease_grant(ttl_seconds, None).await },
        )
        .await?
        .id();
    tracing::info!(node = %config.node, lease = format!("{lease:x}"), ttl_s = config.lease_ttl_seconds, "membership term begins");
    let renewal = AbortOnDrop(tokio::spawn(renew(client.clone(), lease, ttl, granted)));
    let record = facts.borrow_and_update().clone();
    register(client, &record, lease).await;
    let value = serde_json::to_vec(&LeaderInfo {
        node: config.node.clone(),
        api_address: config.api_address.clone(),
    })
    .unwrap_or_default();
    let mut campaign = Box::pin(campaign(waiting.clone(), value, lease));
    let mut campaigning = true;
    let mut facts_open = true;
    let mut renewal = renewal;
    loop {
        tokio::select! {
            elected = &mut campaign, if campaigning => {
                campaigning = false;
                let (key, revision) = elected;
                tracing::info!(node = %config.node, revision, "elected: serving the pair's API");
                role.send_replace(Role::Serving { key, revision, lease });
            }
            changed = facts.changed(), if facts_open => {
                if changed.is_err() {
                    facts_open = false;
                    continue;
                }
                let record = facts.borrow_and_update().clone();
                register(client, &record, lease).await;
            }
            ended = &mut renewal.0 => {
                return match ended {
                    Ok(error) => Err(error),
                    Err(_) => Err(Error::LeaseExpired { lease }),
                };
            }
        }
    }
}

/// Aborts the task when dropped, so a term's renewal never outlives the term.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews `lease` every `ttl / 3`; returns the error once the lease is lost.
///
/// etcd expires the lease `ttl` after it *received* the last renewal, which is no earlier than
/// when we *sent* it; so counting from the send and stepping down `ttl / 6` early means this
/// controller stops serving before the peer can have been elected.
async fn renew(client: Etcd, lease: i64, ttl: Duration, granted: Instant) -> Error {
    let safe_for = ttl - ttl / 6;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_sent_ok = granted;
    loop {
        tick.tick().await;
        let sent = Instant::now();
        let deadline = last_sent_ok + safe_for;
        match tokio::time::timeout_at(deadline, keep_alive(&client, lease, ttl / 3)).await {
            Ok(Ok(true)) => last_sent_ok = sent,
            Ok(Ok(false)) => return Error::LeaseExpired { lease },
            Ok(Err(e)) => {
                tracing::warn!(lease = format!("{lease:x}"), error = %crate::error::chain(&e), "lease renewal failed; retrying")
            }
            Err(_) => return Error::LeaseExpired { lease },
        }
        if last_sent_ok.elapsed() >= safe_for {
            return Error::LeaseExpired { lease };
        }
    }
}

/// Reads the local agent's facts every few seconds and publishes them for registration
/// (keeping the old facts while the agent does not answer: the serving controller judges
/// agent health itself).
async fn refresh_facts(agent: Option<Agent>, out: watch::Sender<NodeRecord>) {
    let Some(agent) = agent else {
        return;
    };
    let mut tick = tokio::time::interval(FACTS_REFRESH);
    loop {
        tick.tick().await;
        match agent.facts().await {
            Ok(facts) => out.send_modify(|record| {
                record.facts = facts;
                record.updated_unix_ms = crate::now_unix_ms();
            }),
            Err(e) => tracing::warn!(error = %e, "local agent did not report facts"),
        }
    }
}

/// Campaigns until elected, moving to another etcd member when one fails; returns the
/// election key and its revision.
async fn campaign(client: Etcd, value: Vec<u8>, lease: i64) -> (Vec<u8>, i64) {
    loop {
        let (endpoint, mut member) = client.current();
        match member.campaign(ELECTION, value.clone(), lease).await {
            Ok(resp) => {
                if let Some(leader) = resp.leader() {
                    return (leader.key().to_vec(), leader.rev());
                }
                tracing::warn!(%endpoint, "campaign answered without a leader key; retrying");
            }
            Err(e) => {
                tracing::warn!(%endpoint, error = %e, "campaign failed; retrying on the next etcd member");
                client.rotate(&endpoint);
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Renews `lease` once within `budget`; `Ok(false)` when etcd says it has expired.
async fn keep_alive(client: &Etcd, lease: i64, budget: Duration) -> Result<bool, Error> {
    let ttl = client
        .request("renewing lease", budget, |mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            match tokio::time::timeout(budget, stream.message()).await {
                Ok(answer) => Ok(answer?.map(|a| a.ttl())),
                Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no keep-alive answer",
                ))),
            }
        })
        .await?;
    Ok(ttl.is_some_and(|ttl| ttl > 0))
}

/// Registers (or refreshes) this node under `lease`.
async fn register(client: &Etcd, record: &NodeRecord, lease: i64) {
    if let Err(e) = store::put_node(client, record, lease).await {
        tracing::warn!(node = %record.name, error = %crate::error::chain(&e), "registering node failed");
    }
}

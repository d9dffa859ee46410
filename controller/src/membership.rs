//! This controller's membership in the pair: an etcd lease kept alive, the controller's
//! registration bound to it, and the campaign for the serving role.
//!
//! ```text
//!  controller                                  etcd (3 members)
//!     │ LeaseGrant(ttl)  ───────────────────────────► lease L
//!     │ Put controllers/<node> = {api} (lease L) ───►
//!     │ Campaign(serving, {node, api}, L) ──────────► blocks while the peer serves
//!     │ ◄────────────────────────────── elected: key serving/<L> at revision R (the term)
//!     │ role = Serving(key, R)          every write: txn if create_revision(key) == R
//!     │ KeepAlive(L) every ttl/10 ───────────────────► (daemon::lease: Alive / Doubt / Expired)
//!     │ etcd says L expired: role = Standby; start a new term
//! ```
//! An etcd member's death, the Raft leader's included, never ends a term: a new etcd leader
//! extends every lease, so the keeper at worst reports *doubt* for a moment (the serving
//! controller then holds still: see `serving`) and the term goes on once a renewal is
//! confirmed. Only etcd saying the lease expired ends it. When this controller dies, its
//! lease expires after `ttl` seconds, etcd deletes its election key and the peer's campaign
//! returns.

use std::time::Duration;

use daemon::lease::{self, LeaseView};
use daemon::pair::LeaderInfo;
use tokio::sync::watch;

use crate::config::Config;
use crate::store::{self, ControllerRecord, ELECTION, Etcd};

/// Pause before a new term after an etcd error.
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
        /// Creation revision of the key: the term.
        revision: i64,
    },
}

/// What membership publishes: the role, and the status of the lease it rests on.
#[derive(Clone, Debug)]
pub struct Published {
    /// The role.
    pub role: watch::Sender<Role>,
    /// The current term's lease status.
    pub lease: watch::Sender<LeaseView>,
    /// The current term's lease ID (0 between terms), for a clean resignation.
    pub lease_id: watch::Sender<i64>,
}

/// Runs membership terms forever. `waiting` is a client without a request timeout, for the
/// campaign that blocks while the peer serves.
pub async fn run(config: Config, client: Etcd, waiting: Etcd, out: Published) {
    loop {
        let result = term(&config, &client, &waiting, &out).await;
        if matches!(*out.role.borrow(), Role::Serving { .. }) {
            tracing::warn!(node = %config.node, "stepping down: the serving role's lease expired");
        }
        out.role.send_replace(Role::Standby);
        out.lease.send_replace(LeaseView::NONE);
        out.lease_id.send_replace(0);
        if let Err(e) = result {
            tracing::warn!(node = %config.node, error = %crate::error::chain(&e), "membership term ended; starting a new one");
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One lease's lifetime: register, campaign, keep alive until etcd says the lease expired.
async fn term(
    config: &Config,
    client: &Etcd,
    waiting: &Etcd,
    out: &Published,
) -> Result<(), lease::Error> {
    let ttl = Duration::from_secs(config.lease_ttl_seconds.unsigned_abs());
    let (lease, granted) = lease::grant(client, config.lease_ttl_seconds, ttl).await?;
    tracing::info!(node = %config.node, lease = format!("{lease:x}"), ttl_s = config.lease_ttl_seconds, "membership term begins");
    out.lease_id.send_replace(lease);
    let mut keeper = AbortOnDrop(tokio::spawn(lease::keep(
        client.clone(),
        lease,
        ttl,
        granted,
        out.lease.clone(),
    )));
    let record = ControllerRecord {
        name: config.node.clone(),
        api_address: config.api_address.clone(),
    };
    if let Err(e) = store::put_controller(client, &record, lease).await {
        tracing::warn!(node = %config.node, error = %crate::error::chain(&e), "registering controller failed; the lease still campaigns");
    }
    let value = daemon::pair::encode(&LeaderInfo {
        node: config.node.clone(),
        api_address: config.api_address.clone(),
        term: 0,
    });
    let mut campaign = Box::pin(campaign(waiting.clone(), value, lease));
    let mut campaigning = true;
    loop {
        tokio::select! {
            elected = &mut campaign, if campaigning => {
                campaigning = false;
                let (key, revision) = elected;
                tracing::info!(node = %config.node, term = revision, "elected: serving the pair's API");
                out.role.send_replace(Role::Serving { key, revision });
            }
            ended = &mut keeper.0 => {
                return Err(ended.unwrap_or(lease::Error::Expired { lease }));
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

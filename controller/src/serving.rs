//! Follows this controller's role: on election it starts the engine, routes the API to it and
//! takes the system IP; when the role is lost it stops the engine at once, routes the API to
//! the peer and drops the system IP. While the role's lease is in doubt (no renewal confirmed
//! within its TTL, e.g. during an etcd election) the engine holds still and the system IP is
//! dropped, since the peer takes both over if the lease did expire; once a renewal is
//! confirmed the IP comes back, and nothing was stepped down.

use daemon::lease::LeaseStatus;
use daemon::pair::LeaderInfo;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Route;
use crate::config::Config;
use crate::engine::{self, Context};
use crate::error::chain;
use crate::membership::Role;
use crate::store::{self, Writer};
use crate::sysip;

/// Attempts to start serving before giving the role up.
const SERVE_ATTEMPTS: u32 = 3;
/// Pause between attempts.
const SERVE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// What the engine needs besides the fencing key.
#[derive(Clone, Debug)]
pub struct Deps {
    /// Configuration.
    pub config: Config,
    /// etcd client.
    pub client: crate::store::Etcd,
    /// Agent clients.
    pub agents: crate::agents::AgentPool,
    /// The serving lease's status.
    pub lease: watch::Receiver<LeaseStatus>,
}

/// Runs until `role` closes, keeping `route` and the system IP in line with the role.
pub async fn follow(deps: Deps, mut role: watch::Receiver<Role>, route: watch::Sender<Route>) {
    // The running engine and the term it serves.
    let mut engine: Option<(i64, JoinHandle<()>)> = None;
    let mut lease = deps.lease.clone();
    let mut holds_ip = false;
    release_ip(&deps.config).await;
    loop {
        let current = role.borrow_and_update().clone();
        match current {
            Role::Serving {
                key,
                revision,
                lease: lease_id,
            } if engine.as_ref().is_none_or(|(term, _)| *term != revision) => {
                if let Some((_, task)) = engine.take() {
                    task.abort();
                }
                engine = serve_or_resign(&deps, &key, revision, lease_id, &route, &role)
                    .await
                    .map(|task| (revision, task));
            }
            Role::Serving { .. } => {}
            Role::Standby => {
                if let Some((_, task)) = engine.take() {
                    task.abort();
                    route.send_replace(Route::Forward);
                    tracing::info!(node = %deps.config.node, "standby: engine stopped, API forwarded to the peer");
                }
            }
        }
        let status = *lease.borrow_and_update();
        let want_ip = engine.is_some() && status == LeaseStatus::Alive;
        if want_ip != holds_ip {
            holds_ip = want_ip;
            if want_ip {
                acquire_ip(&deps.config).await;
            } else {
                release_ip(&deps.config).await;
            }
        }
        tokio::select! {
            changed = role.changed() => if changed.is_err() { return },
            changed = lease.changed() => if changed.is_err() { return },
        }
    }
}

/// Tries to start serving a few times; if it cannot, revokes the lease so that the peer, which
/// may be able to, is elected instead of the pair having no API while this one holds the role.
async fn serve_or_resign(
    deps: &Deps,
    key: &[u8],
    revision: i64,
    lease: i64,
    route: &watch::Sender<Route>,
    role: &watch::Receiver<Role>,
) -> Option<JoinHandle<()>> {
    let node = &deps.config.node;
    for attempt in 1..=SERVE_ATTEMPTS {
        if let Some(task) = serve(deps, key.to_vec(), revision, lease, route).await {
            return Some(task);
        }
        if !matches!(&*role.borrow(), Role::Serving { revision: r, .. } if *r == revision) {
            return None;
        }
        tracing::warn!(node = %node, attempt, "could not start serving; retrying");
        tokio::time::sleep(SERVE_RETRY).await;
    }
    tracing::error!(node = %node, lease = format!("{lease:x}"), "resign begin: cannot serve, giving the role to the peer");
    match daemon::lease::revoke(&deps.client, lease, store::REQUEST_BUDGET).await {
        Ok(()) => tracing::error!(node = %node, "resign end: ok"),
        Err(e) => {
            tracing::error!(node = %node, error = %chain(&e), "resign end: failed; the lease expires on its own only if this controller stops")
        }
    }
    None
}

async fn serve(
    deps: &Deps,
    key: Vec<u8>,
    revision: i64,
    lease: i64,
    route: &watch::Sender<Route>,
) -> Option<JoinHandle<()>> {
    let node = &deps.config.node;
    tracing::info!(node = %node, term = revision, "serving begin: announcing the term, loading state");
    let writer = Writer::new(deps.client.clone(), key, revision);
    let leader = LeaderInfo {
        node: node.clone(),
        api_address: deps.config.api_address.clone(),
        term: revision,
    };
    if let Err(e) = writer.announce(&leader).await {
        tracing::error!(node = %node, error = %chain(&e), "serving end: failed to announce; staying standby");
        return None;
    }
    let ctx = Context {
        node: node.clone(),
        client: deps.client.clone(),
        writer,
        lease,
        lease_status: deps.lease.clone(),
        agents: deps.agents.clone(),
        policy: deps.config.capacity,
    };
    match engine::start(ctx).await {
        Ok((handle, task)) => {
            route.send_replace(Route::Local(handle));
            tracing::info!(node = %node, term = revision, "serving end: ok, API served here");
            Some(task)
        }
        Err(e) => {
            tracing::error!(node = %node, error = %e, "serving end: failed to load state; staying standby");
            None
        }
    }
}

async fn acquire_ip(config: &Config) {
    let Some(ip) = &config.system_ip else {
        return;
    };
    match sysip::acquire(ip).await {
        Ok(()) => tracing::info!(node = %config.node, address = %ip.address, "system IP acquired"),
        Err(e) => {
            tracing::error!(node = %config.node, error = %chain(&e), "system IP not acquired")
        }
    }
}

async fn release_ip(config: &Config) {
    let Some(ip) = &config.system_ip else {
        return;
    };
    match sysip::release(ip).await {
        Ok(()) => tracing::info!(node = %config.node, address = %ip.address, "system IP released"),
        Err(e) => {
            tracing::warn!(node = %config.node, error = %chain(&e), "system IP not released")
        }
    }
}

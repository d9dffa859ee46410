//! Follows this controller's role: on election it starts the engine, routes the API to it and
//! takes the system IP; when the role is lost it stops the engine at once, routes the API to
//! the peer and drops the system IP. While the role's lease is in doubt (no renewal confirmed
//! within its TTL, e.g. during an etcd election) the engine holds still and the system IP is
//! dropped, since the peer takes both over if the lease did expire; once a renewal is
//! confirmed the IP comes back, and nothing was stepped down.

use daemon::lease::{LeaseStatus, LeaseView};
use daemon::pair::LeaderInfo;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Route;
use crate::config::Config;
use crate::engine::{self, Context};
use crate::error::chain;
use crate::membership::Role;
use crate::store::{self, Writer};
use daemon::sysip;

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
    /// The serving lease's view.
    pub lease: watch::Receiver<LeaseView>,
    /// The serving lease's ID (0 between terms).
    pub lease_id: watch::Receiver<i64>,
}

/// Runs until `role` closes, keeping `route` and the system IP in line with the role.
pub async fn follow(deps: Deps, mut role: watch::Receiver<Role>, route: watch::Sender<Route>) {
    // The running engine and the term it serves.
    let mut engine: Option<(i64, JoinHandle<()>)> = None;
    // A term whose engine ended by itself (fenced): never started again.
    let mut ended: Option<i64> = None;
    let mut lease = deps.lease.clone();
    let mut holds_ip = false;
    release_ip(&deps.config).await;
    loop {
        let current = role.borrow_and_update().clone();
        match current {
            Role::Serving { key, revision }
                if ended != Some(revision)
                    && engine.as_ref().is_none_or(|(term, _)| *term != revision) =>
            {
                if let Some((_, task)) = engine.take() {
                    task.abort();
                }
                engine = serve_or_resign(&deps, &key, revision, &route, &role)
                    .await
                    .map(|task| (revision, task));
                if engine.is_none() {
                    ended = Some(revision);
                }
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
        let view = *lease.borrow_and_update();
        let want_ip = engine.is_some() && view.status() == LeaseStatus::Alive;
        if want_ip != holds_ip {
            holds_ip = want_ip;
            if want_ip {
                acquire_ip(&deps.config).await;
            } else {
                release_ip(&deps.config).await;
            }
        }
        // Doubt begins at a known instant: drop the IP then, not at the next renewal.
        let doubt_at = view.doubt_at().filter(|_| holds_ip);
        tokio::select! {
            changed = role.changed() => if changed.is_err() { return },
            changed = lease.changed() => if changed.is_err() { return },
            () = sleep_until(doubt_at) => {}
            term = engine_exit(&mut engine) => {
                ended = Some(term);
                route.send_replace(Route::Forward);
                tracing::error!(node = %deps.config.node, term, "the engine stopped by itself");
                resign(&deps).await;
            }
        }
    }
}

/// Completes when the engine ends by itself (it was fenced, or failed): its term.
async fn engine_exit(engine: &mut Option<(i64, JoinHandle<()>)>) -> i64 {
    let Some((term, task)) = engine.as_mut() else {
        return std::future::pending().await;
    };
    let term = *term;
    let _ = task.await;
    *engine = None;
    term
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Gives the role up (the engine ended by itself, or never started): revokes the lease (a few
/// tries), so the term ends and the pair elects a controller that can serve.
async fn resign(deps: &Deps) {
    let node = &deps.config.node;
    let lease_id = *deps.lease_id.borrow();
    tracing::error!(node = %node, lease = format!("{lease_id:x}"), "resign begin: the engine stopped; giving the role up");
    for attempt in 1..=SERVE_ATTEMPTS {
        match daemon::lease::revoke(&deps.client, lease_id, store::REQUEST_BUDGET).await {
            Ok(()) => {
                tracing::error!(node = %node, attempt, "resign end: ok");
                return;
            }
            Err(e) => {
                tracing::warn!(node = %node, attempt, error = %chain(&e), "revoking the lease failed")
            }
        }
        tokio::time::sleep(SERVE_RETRY).await;
    }
    tracing::error!(node = %node, "resign end: failed; the lease expires on its own only once etcd is reachable");
}

/// Tries to start serving a few times; if it cannot, revokes the lease so that the peer, which
/// may be able to, is elected instead of the pair having no API while this one holds the role.
async fn serve_or_resign(
    deps: &Deps,
    key: &[u8],
    revision: i64,
    route: &watch::Sender<Route>,
    role: &watch::Receiver<Role>,
) -> Option<JoinHandle<()>> {
    let node = &deps.config.node;
    for attempt in 1..=SERVE_ATTEMPTS {
        if let Some(task) = serve(deps, key.to_vec(), revision, route).await {
            return Some(task);
        }
        if !matches!(&*role.borrow(), Role::Serving { revision: r, .. } if *r == revision) {
            return None;
        }
        tracing::warn!(node = %node, attempt, "could not start serving; retrying");
        tokio::time::sleep(SERVE_RETRY).await;
    }
    tracing::error!(node = %node, "cannot serve: giving the role to the peer, which may");
    resign(deps).await;
    None
}

async fn serve(
    deps: &Deps,
    key: Vec<u8>,
    revision: i64,
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
        lease_status: deps.lease.clone(),
        agents: deps.agents.clone(),
        policy: deps.config.capacity,
        fencing: deps.config.fencing(),
        max_restarts: deps.config.max_restarts,
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
        Ok(true) => {
            tracing::info!(node = %config.node, address = %ip.address, "system IP released")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(node = %config.node, error = %chain(&e), "system IP not released")
        }
    }
}

//! Follows this controller's role: on election it starts the engine, routes the API to it and
//! takes the system IP; when the role is lost it stops the engine at once, routes the API to
//! the peer and drops the system IP.

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Route;
use crate::config::Config;
use crate::engine::{self, Context};
use crate::error::chain;
use crate::membership::{LeaderInfo, Role};
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
}

/// Runs until `role` closes, keeping `route` and the system IP in line with the role.
pub async fn follow(deps: Deps, mut role: watch::Receiver<Role>, route: watch::Sender<Route>) {
    let mut engine: Option<JoinHandle<()>> = None;
    release_ip(&deps.config).await;
    loop {
        let current = role.borrow_and_update().clone();
        match current {
            Role::Serving {
                key,
                revision,
                lease,
            } => {
                if let Some(task) = engine.take() {
                    task.abort();
                }
                engine = serve_or_resign(&deps, &key, revision, lease, &route, &role).await;
            }
            Role::Standby => {
                if let Some(task) = engine.take() {
                    task.abort();
                    route.send_replace(Route::Forward);
                    tracing::info!(node = %deps.config.node, "standby: engine stopped, API forwarded to the peer");
                    release_ip(&deps.config).await;
                }
            }
        }
        if role.changed().await.is_err() {
            return;
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
        if let Some(task) = serve(deps, key.to_vec(), revision, route).await {
            return Some(task);
        }
        if !matches!(&*role.borrow(), Role::Serving { revision: r, .. } if *r == revision) {
            return None;
        }
        tracing::warn!(node = %node, attempt, "could not start serving; retrying");
        tokio::time::sleep(SERVE_RETRY).await;
    }
    tracing::error!(node = %node, lease = format!("{lease:x}"), "resign begin: cannot serve, giving the role to the peer");
    let revoked = deps
        .client
        .request(
            "revoking the lease to resign",
            store::REQUEST_BUDGET,
            |mut c| async move { c.lease_revoke(lease).await },
        )
        .await;
    match revoked {
        Ok(_) => tracing::error!(node = %node, "resign end: ok"),
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
    route: &watch::Sender<Route>,
) -> Option<JoinHandle<()>> {
    let node = &deps.config.node;
    tracing::info!(node = %node, revision, "serving begin: loading state");
    let writer = Writer::new(deps.client.clone(), key, revision);
    let leader = LeaderInfo {
        node: node.clone(),
        api_address: deps.config.api_address.clone(),
    };
    if let Err(e) = writer.announce(&leader).await {
        tracing::error!(node = %node, error = %chain(&e), "serving end: failed to announce; staying standby");
        return None;
    }
    let ctx = Context {
        node: node.clone(),
        client: deps.client.clone(),
        writer,
        agents: deps.agents.clone(),
        policy: deps.config.capacity,
    };
    match engine::start(ctx).await {
        Ok((handle, task)) => {
            route.send_replace(Route::Local(handle));
            if let Some(ip) = &deps.config.system_ip {
                match sysip::acquire(ip).await {
                    Ok(()) => {
                        tracing::info!(node = %node, address = %ip.address, "system IP acquired")
                    }
                    Err(e) => {
                        tracing::error!(node = %node, error = %chain(&e), "system IP not acquired")
                    }
                }
            }
            tracing::info!(node = %node, "serving end: ok, API served here");
            Some(task)
        }
        Err(e) => {
            tracing::error!(node = %node, error = %e, "serving end: failed to load state; staying standby");
            None
        }
    }
}

async fn release_ip(config: &Config) {
    if let Some(ip) = &config.system_ip
        && let Err(e) = sysip::release(ip).await
    {
        tracing::warn!(node = %config.node, error = %chain(&e), "system IP not released");
    }
}

//! `pv-controller`: Pairvisor's per-host controller daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use daemon::lease::LeaseView;
use tokio::sync::watch;

use controller::agents::AgentPool;
use controller::api::{Access, Api, Route};
use controller::audit::Audit;
use controller::auth::tokens::Tokens;
use controller::config::Config;
use controller::membership::{self, Published, Role};
use controller::serving::{self, Deps};
use controller::status::Health;
use controller::store;

/// Pairvisor controller: elects the serving controller through etcd and serves the public API.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Controller configuration file (TOML).
    #[arg(long, short, env = "PV_CONTROLLER_CONFIG")]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    daemon::init_logging();
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(run(config.clone()));
    if let Err(e) = &result {
        tracing::error!(node = %config.node, error = format!("{e:#}"), "controller stopped");
    }
    result
}

async fn run(config: Config) -> anyhow::Result<()> {
    let client = store::Etcd::connect(&config.etcd_endpoints, Some(store::REQUEST_TIMEOUT)).await?;
    let waiting = store::Etcd::connect(&config.etcd_endpoints, None).await?;
    let agents = match &config.agent_tls {
        Some(tls) => AgentPool::with_tls(tls.client()?),
        None => {
            tracing::warn!(node = %config.node, "calling the agents without TLS; set [agent_tls] in the config");
            AgentPool::default()
        }
    };
    let (role_tx, role_rx) = watch::channel(Role::Standby);
    let (lease_tx, lease_rx) = watch::channel(LeaseView::NONE);
    let (lease_id_tx, lease_id) = watch::channel(0);
    let (route_tx, route_rx) = watch::channel(Route::Forward);
    let published = Published {
        role: role_tx,
        lease: lease_tx,
        lease_id: lease_id_tx,
    };
    tokio::spawn(membership::run(
        config.clone(),
        client.clone(),
        waiting,
        published,
    ));
    let deps = Deps {
        config: config.clone(),
        client: client.clone(),
        agents: agents.clone(),
        lease: lease_rx,
        lease_id: lease_id.clone(),
    };
    tokio::spawn(serving::follow(deps, role_rx, route_tx));
    let peer_tls = config.api_tls.as_ref().map(|t| t.trusting()).transpose()?;
    let tokens = match &config.auth {
        Some(auth) => Some(Arc::new(Tokens::load(
            &auth.tokens_file,
            Some(client.clone()),
        )?)),
        None => {
            tracing::warn!(node = %config.node, "the public API admits every call without a token; set [auth] in the config");
            None
        }
    };
    let access = Access {
        tokens,
        audit: Arc::new(Audit::new(client.clone(), &config.node)),
        metrics: Arc::new(controller::metrics::Metrics::default()),
    };
    let api = Api::new(route_rx, client.clone(), agents, peer_tls, access.clone());
    let health = Arc::new(Health::new(client.clone(), &config.node));
    tracing::info!(node = %config.node, listen = %config.listen, "controller API listening");
    // HTTP/1.1 too: monitoring tools fetch /health without HTTP/2.
    let routes = controller::front::routes(api, &access, health, &config.node);
    let shutdown = daemon::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    match &config.api_tls {
        Some(tls) => {
            // Our own TLS listener: tonic's offers only h2 by ALPN (see daemon::https).
            let read = |path: &std::path::Path| {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))
            };
            let tls = daemon::https::server_config(&read(&tls.cert)?, &read(&tls.key)?)
                .context("setting up the public API's TLS")?;
            controller::serve::run(daemon::https::incoming(listener, tls), routes, shutdown).await;
        }
        None => {
            tracing::warn!(node = %config.node, "the public API runs without TLS; set [api_tls] in the config");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            controller::serve::run(incoming, routes, shutdown).await;
        }
    }
    if let Some(ip) = &config.system_ip {
        let _ = daemon::sysip::release(ip).await;
    }
    // Hand the role over at once rather than after the lease's TTL.
    let lease = *lease_id.borrow();
    if lease != 0 {
        let _ = daemon::lease::revoke(&client, lease, Duration::from_secs(2)).await;
    }
    tracing::info!(node = %config.node, "controller stopped by signal");
    Ok(())
}

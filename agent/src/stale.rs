//! Recording that the peer's copy of an HA VM fell behind, before the guest may learn it.
//!
//! The mirror is synchronous: a guest write completes only once the peer has it. When the
//! path to the peer breaks, QEMU's mirror would complete the write on this host's copy alone,
//! and a failover to the peer would then lose it. So the A-Link ingress of the mirror holds
//! the connection instead ([`replicator::proxy::Hold`]) until this module has written a
//! [`StaleMark`] in etcd, on condition that this host's registration is still bound to the
//! lease the agent held when the mirror started; the controller refuses a failover to a
//! marked peer. A host that lost that lease (the pair may have failed the VM over) never
//! releases: its guest stays blocked until the self-fence stops it.

use std::sync::Arc;
use std::time::Duration;

use daemon::etcd::Etcd;
use daemon::pair::{self, StaleMark};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use replicator::proxy::Hold;
use tokio::sync::watch;

/// Budget of one attempt to write the mark.
const ATTEMPT_BUDGET: Duration = Duration::from_secs(2);
/// Pause between attempts while etcd does not answer.
const RETRY: Duration = Duration::from_millis(200);

/// Writes stale marks for this host's HA VMs.
#[derive(Clone, Debug)]
pub struct Marker {
    etcd: Etcd,
    node: String,
    lease: watch::Receiver<i64>,
}

impl Marker {
    /// A marker for host `node`, whose current host lease `lease` follows (0: none).
    pub fn new(etcd: Etcd, node: String, lease: watch::Receiver<i64>) -> Marker {
        Marker { etcd, node, lease }
    }

    /// The host lease this agent holds now (0: none).
    pub fn lease(&self) -> i64 {
        *self.lease.borrow()
    }

    /// The hold for mirror path `path` of `vm` to `peer`, made under host lease `lease`: it
    /// returns once the mark is written, and never if the lease is gone.
    pub fn hold(&self, vm: &str, peer: &str, lease: i64, path: i64) -> Hold {
        let (marker, vm, peer) = (self.clone(), vm.to_string(), peer.to_string());
        Arc::new(move || {
            let (marker, vm, peer) = (marker.clone(), vm.clone(), peer.clone());
            Box::pin(async move { marker.mark_or_block(&vm, &peer, lease, path).await })
        })
    }

    /// Writes the mark, retrying while etcd does not answer; blocks forever once etcd says
    /// this host no longer holds `lease`.
    async fn mark_or_block(&self, vm: &str, peer: &str, lease: i64, path: i64) {
        let node = self.node.as_str();
        if lease == 0 {
            // No lease when the mirror started: nothing can prove this host still may write.
            tracing::error!(%vm, node, peer, op = "stale-mark", "the mirror to {peer} broke and this host held no lease when it started; guest writes stay blocked until the self-fence stops it");
            std::future::pending::<()>().await;
        }
        tracing::warn!(%vm, node, peer, op = "stale-mark", "stale mark begin: the mirror to {peer} broke; guest writes wait until the pair records {peer}'s copy as behind");
        loop {
            match self.mark(vm, peer, lease, path).await {
                Ok(true) => {
                    tracing::warn!(%vm, node, peer, op = "stale-mark", "stale mark end: recorded; the guest runs on this host's copy alone");
                    return;
                }
                Ok(false) => {
                    tracing::error!(%vm, node, peer, op = "stale-mark", lease = format!("{lease:x}"), "stale mark end: refused, this host lost its lease (the VM may run on {peer} now); guest writes stay blocked until the self-fence stops it");
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    tracing::warn!(%vm, node, peer, error = %daemon::error_chain(&e), "writing the stale mark failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// One attempt: true if written, false if this host's registration is not bound to `lease`.
    async fn mark(
        &self,
        vm: &str,
        peer: &str,
        lease: i64,
        path: i64,
    ) -> Result<bool, daemon::etcd::Error> {
        let record = StaleMark {
            writer: self.node.clone(),
            peer: peer.to_string(),
            path,
            at_unix_ms: daemon::now_unix_ms(),
        };
        let (key, value) = (pair::stale_key(vm), pair::encode(&record));
        let registration = pair::node_key(&self.node);
        let response = self
            .etcd
            .request("writing stale mark", ATTEMPT_BUDGET, |mut c| {
                let txn = Txn::new()
                    .when([Compare::lease(
                        registration.clone(),
                        CompareOp::Equal,
                        lease,
                    )])
                    .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(response.succeeded())
    }
}

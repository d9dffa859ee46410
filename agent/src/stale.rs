//! Recording that the peer's copy of an HA VM fell behind, before the guest may learn it.
//!
//! The mirror is synchronous: a guest write completes only once the peer has it. When the
//! path to the peer breaks, QEMU's mirror would complete the write on this host's copy alone,
//! and a failover to the peer would then lose it. So the A-Link ingress of the mirror holds
//! the connection instead ([`replicator::proxy::Hold`]) until this module has written a
//! [`StaleMark`] in etcd, on condition that this host's registration is still bound to the
//! lease the agent held when the mirror started and that the VM's owner generation is still
//! the one the mirror was started under ([`pair::OWNERS`]); the controller refuses a failover
//! to a marked peer, and its failover raises the generation, so of a mark and a failover only
//! the first lands. A host that lost that lease, or whose VM the pair moved, never releases:
//! its guest stays blocked (the self-fence, or the pair, stops it).
//!
//! The other way round, when this host's disk fails under an in-sync mirror, the guest moves
//! onto the peer's copy (`mirror/pivot.rs`) only once [`Marker::mark_local_behind`] has
//! recorded this host's copy as the one behind. The two marks of one path exclude each other:
//! both are written under one lock, and whichever came first wins (a held connection of a
//! guest already on the peer's copy is released unmarked: its I/O fails and QEMU pauses it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
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
    /// Each VM's latest mirror path, by VM UUID.
    paths: Arc<Mutex<HashMap<String, Path>>>,
    /// Held while a mark is decided and written: the two marks of a path exclude each other.
    writing: Arc<tokio::sync::Mutex<()>>,
}

/// A VM's mirror path as the marker knows it.
#[derive(Clone, Debug)]
struct Path {
    peer: String,
    grant: Grant,
    serial: i64,
    behind: Option<Behind>,
    /// etcd refused its mark: this host lost its lease or the pair moved the VM.
    refused: bool,
}

/// What this host held when a mirror path was made, and must still hold for its mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The host lease its registration was bound to (0: none).
    pub lease: i64,
    /// The VM's ownership generation of the command that started the mirror.
    pub generation: u64,
}

/// Whose copy a written mark says is behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behind {
    Peer,
    Local,
}

/// What [`Marker::mark_local_behind`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalMark {
    /// Written: the guest may move onto the peer's copy.
    Written,
    /// Refused: this host no longer holds the lease the path was made under, or the pair
    /// moved the VM since (its generation changed).
    Superseded,
    /// The peer's copy is already marked behind (the path broke first).
    PeerBehind,
    /// This agent made no mirror path for the VM (it restarted since).
    NoPath,
}

impl Marker {
    /// A marker for host `node`, whose current host lease `lease` follows (0: none).
    pub fn new(etcd: Etcd, node: String, lease: watch::Receiver<i64>) -> Marker {
        Marker {
            etcd,
            node,
            lease,
            paths: Arc::default(),
            writing: Arc::default(),
        }
    }

    /// The host lease this agent holds now (0: none).
    pub fn lease(&self) -> i64 {
        *self.lease.borrow()
    }

    /// The hold for mirror path `path` of `vm` to `peer`, made under `grant`: it returns once
    /// the mark is written, and never if the grant is gone.
    pub fn hold(&self, vm: &str, peer: &str, grant: Grant, path: i64) -> Hold {
        let record = Path {
            peer: peer.to_string(),
            grant,
            serial: path,
            behind: None,
            refused: false,
        };
        self.paths().insert(vm.to_string(), record);
        let (marker, vm, peer) = (self.clone(), vm.to_string(), peer.to_string());
        Arc::new(move || {
            let (marker, vm, peer) = (marker.clone(), vm.clone(), peer.clone());
            Box::pin(async move { marker.mark_or_block(&vm, &peer, grant, path).await })
        })
    }

    /// Marks the peer's copy of `vm` behind on the VM's current mirror path, for an FT primary
    /// whose epochs ended while its guest lives on: its standby's checkpoint is then stale, and
    /// must never be resumed once the guest's output is released. Answers `Some(true)` once
    /// written (or not needed), `Some(false)` when etcd refused it (the guest's output must
    /// then never flow), and `None` when no mirror path of `vm` is recorded. Never returns
    /// while this host held no lease when the path was made.
    pub async fn mark_peer_behind(&self, vm: &str) -> Option<bool> {
        // The recorded path stays as it is (a mark already written on it still counts).
        let path = self.paths().get(vm).cloned()?;
        let decided = self
            .mark_until_decided(vm, &path.peer, path.grant, path.serial)
            .await;
        Some(decided)
    }

    /// Writes the mark, retrying while etcd does not answer; blocks forever once etcd says
    /// this host no longer holds `grant`.
    async fn mark_or_block(&self, vm: &str, peer: &str, grant: Grant, path: i64) {
        if !self.mark_until_decided(vm, peer, grant, path).await {
            std::future::pending::<()>().await;
        }
    }

    /// Writes the mark, retrying while etcd does not answer: true once written (or not needed,
    /// the guest having moved onto the peer's copy), false once etcd says this host no longer
    /// holds `grant`. Never returns when the grant has no lease.
    async fn mark_until_decided(&self, vm: &str, peer: &str, grant: Grant, path: i64) -> bool {
        let node = self.node.as_str();
        if grant.lease == 0 {
            // No lease when the mirror started: nothing can prove this host still may write.
            tracing::error!(%vm, node, peer, op = "stale-mark", "the mirror to {peer} broke and this host held no lease when it started; guest writes stay blocked until the self-fence stops it");
            std::future::pending::<()>().await;
        }
        tracing::warn!(%vm, node, peer, op = "stale-mark", "stale mark begin: the mirror to {peer} broke; guest writes wait until the pair records {peer}'s copy as behind");
        loop {
            let writing = self.writing.lock().await;
            if self.behind(vm, path) == Some(Behind::Local) {
                tracing::warn!(%vm, node, peer, op = "stale-mark", "stale mark end: not needed, the guest runs on {peer}'s copy; its I/O fails and QEMU pauses it");
                return true;
            }
            let written = self.mark(vm, node, peer, grant, path).await;
            if matches!(written, Ok(true)) {
                self.set_behind(vm, path, Behind::Peer);
            }
            drop(writing);
            match written {
                Ok(true) => {
                    tracing::warn!(%vm, node, peer, op = "stale-mark", "stale mark end: recorded; the guest runs on this host's copy alone");
                    return true;
                }
                Ok(false) => {
                    if let Some(p) = self.paths().get_mut(vm).filter(|p| p.serial == path) {
                        p.refused = true;
                    }
                    tracing::error!(%vm, node, peer, op = "stale-mark", lease = format!("{:x}", grant.lease), generation = grant.generation, "stale mark end: refused, this host lost its lease or the pair moved the VM (it may run on {peer} now); the guest's output must never flow");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(%vm, node, peer, error = %daemon::error_chain(&e), "writing the stale mark failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Records that this host's copy of `vm` is behind the peer's (its disk failed and the
    /// guest is about to run on the peer's copy), on the same condition as a hold's mark.
    pub async fn mark_local_behind(&self, vm: &str) -> Result<LocalMark, daemon::etcd::Error> {
        let _writing = self.writing.lock().await;
        let Some(path) = self.paths().get(vm).cloned() else {
            return Ok(LocalMark::NoPath);
        };
        if path.behind == Some(Behind::Peer) {
            return Ok(LocalMark::PeerBehind);
        }
        if path.behind == Some(Behind::Local) {
            return Ok(LocalMark::Written);
        }
        if path.grant.lease == 0 {
            // No lease when the mirror started: nothing can prove this host still may write.
            return Ok(LocalMark::Superseded);
        }
        let node = self.node.clone();
        if !self
            .mark(vm, &path.peer, &node, path.grant, path.serial)
            .await?
        {
            return Ok(LocalMark::Superseded);
        }
        self.set_behind(vm, path.serial, Behind::Local);
        Ok(LocalMark::Written)
    }

    /// `vm`'s owner generation as etcd holds it now (`None`: no key).
    pub async fn owner_generation(&self, vm: &str) -> Result<Option<u64>, daemon::etcd::Error> {
        let key = pair::owner_key(vm);
        let response = self
            .etcd
            .request(
                "reading a VM's owner generation",
                ATTEMPT_BUDGET,
                |mut c| {
                    let key = key.clone();
                    async move { c.get(key, None).await }
                },
            )
            .await?;
        Ok(response
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// Whether etcd refused the mark of `vm`'s current mirror path: the run here can never
    /// let its output out again.
    pub fn refused(&self, vm: &str) -> bool {
        self.paths().get(vm).is_some_and(|p| p.refused)
    }

    fn paths(&self) -> std::sync::MutexGuard<'_, HashMap<String, Path>> {
        self.paths.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whose copy a mark written on path `serial` of `vm` says is behind.
    fn behind(&self, vm: &str, serial: i64) -> Option<Behind> {
        self.paths()
            .get(vm)
            .filter(|p| p.serial == serial)
            .and_then(|p| p.behind)
    }

    fn set_behind(&self, vm: &str, serial: i64, behind: Behind) {
        if let Some(p) = self.paths().get_mut(vm).filter(|p| p.serial == serial) {
            p.behind = Some(behind);
        }
    }

    /// One attempt to mark `behind`'s copy of `vm` behind `writer`'s: true if written, false
    /// if this host's registration is not bound to the grant's lease or the VM's owner
    /// generation is not the grant's.
    async fn mark(
        &self,
        vm: &str,
        writer: &str,
        behind: &str,
        grant: Grant,
        path: i64,
    ) -> Result<bool, daemon::etcd::Error> {
        let record = StaleMark {
            writer: writer.to_string(),
            peer: behind.to_string(),
            path,
            at_unix_ms: daemon::now_unix_ms(),
        };
        let (key, value) = (pair::stale_key(vm), pair::encode(&record));
        let registration = pair::node_key(&self.node);
        let (owner, generation) = (pair::owner_key(vm), pair::owner_value(grant.generation));
        let response = self
            .etcd
            .request("writing stale mark", ATTEMPT_BUDGET, |mut c| {
                let txn = Txn::new()
                    .when([
                        Compare::lease(registration.clone(), CompareOp::Equal, grant.lease),
                        Compare::value(owner.clone(), CompareOp::Equal, generation.clone()),
                    ])
                    .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(response.succeeded())
    }
}

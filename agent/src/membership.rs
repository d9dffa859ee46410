//! This host's membership in the pair, held by its agent: the host lease and registration, and
//! the serving term the agent learns from etcd.
//!
//! The agent, not the controller, holds the host's liveness: it is the process that outlives a
//! controller crash, so a host whose controller died stays registered, reachable and
//! manageable. The registration (`nodes/<node>`, bound to the host lease) carries the host's
//! facts; it is rewritten only when the facts change, and the lease-free `members/<node>` copy
//! keeps the last known facts while the host is down.
//!
//! ```text
//!  agent                                        etcd
//!    │ LeaseGrant(ttl) ─────────────────────────► host lease H
//!    │ Txn: nodes/<node> (lease H), members/<node> ►
//!    │ KeepAlive(H) every ttl/10 ───────────────►   (daemon::lease)
//!    │ Watch(leader) ◄─────────────────────────── term T  → fence: refuse terms < T
//!    │ facts changed → Txn again
//! ```
//!
//! **Self-fence.** A domain marked self-fencing (HA and FT VMs) is restarted on the peer once
//! this host's lease expires, so it must be gone from here before then: as soon as the lease
//! is in doubt ([`lease::self_fence_due`]), the agent destroys every such domain, and keeps
//! doing so while the lease stays unrenewed. A timer drives this, not the renewals, so a
//! renewal hanging on etcd cannot delay it. The agent never restarts them: the pair's
//! controller decides where they run next.
//!
//! ```text
//!  last confirmed renewal sent       lease view: doubt   etcd may expire it   pair may fail over
//!  │◄─────────────── 90 % TTL ───────────────►│◄─ 10 % ─►│◄─ self-fence margin (15 %) ─►│
//!                                             destroy self-fencing domains (and every second after)
//! ```

use std::sync::Arc;
use std::time::Duration;

use daemon::etcd::{Etcd, WatchSpec, Watched};
use daemon::lease::{self, LeaseView, Validity};
use daemon::pair::{self, HostFacts, LeaderInfo, NodeRecord};
use daemon::sysip::SystemIp;
use etcd_client::{PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::facts::Collector;
use crate::fence::Fence;
use crate::ft::standby::Standbys;
use crate::libvirt::{DomainState, DomainStatus, Libvirt};

/// How often the facts are read to see whether they changed.
const FACTS_CHECK: Duration = Duration::from_secs(5);
/// Pause before a new lease after the last one expired or could not be granted.
const RETRY: Duration = Duration::from_millis(500);
/// Budget of one registration write.
const WRITE_BUDGET: Duration = Duration::from_secs(5);
/// How long a self-fenced QEMU may take to exit on libvirt's SIGTERM before it gets SIGKILL:
/// the pair's takeover waits only the self-fence margin past the lease's expiry.
const KILL_GRACE: Duration = Duration::from_millis(100);
/// While the lease stays unrenewed, how often the self-fence looks again: a domain started
/// meanwhile must not outlive the lease either.
const SELF_FENCE_SWEEP: Duration = Duration::from_secs(1);

/// What the agent registers and how.
#[derive(Clone, Debug)]
pub struct Membership {
    /// This host's node name.
    pub node: String,
    /// Where the controllers reach this agent.
    pub agent_address: String,
    /// TTL of the host lease.
    pub ttl: Duration,
    /// The pair's etcd.
    pub etcd: Etcd,
    /// The host's facts.
    pub facts: Collector,
    /// The agent's fence, raised by announced terms.
    pub fence: Arc<Fence>,
    /// The pair's system IP, released here when another host serves.
    pub system_ip: Option<SystemIp>,
    /// The libvirt connection, for destroying self-fencing domains.
    pub libvirt: Libvirt,
    /// This host's FT standbys, which the self-fence spares while they wait (see
    /// `fence_domains`); `None` without A-Links.
    pub standbys: Option<Standbys>,
}

impl Membership {
    /// Holds the host lease and registration forever, publishing the lease's status and its
    /// ID (0 while there is none).
    pub async fn run(self, status: watch::Sender<LeaseView>, lease_id: watch::Sender<i64>) {
        tokio::spawn(follow_leader(self.clone()));
        tokio::spawn(self_fence(
            self.libvirt.clone(),
            self.standbys.clone(),
            status.subscribe(),
            self.ttl,
            self.node.clone(),
        ));
        let ttl_seconds = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        loop {
            match lease::grant(&self.etcd, ttl_seconds, self.ttl).await {
                Ok((lease, granted)) => {
                    lease_id.send_replace(lease);
                    self.term(lease, granted, &status).await;
                    lease_id.send_replace(0);
                }
                Err(e) => {
                    tracing::warn!(node = %self.node, error = %daemon::error_chain(&e), "host lease not granted; retrying")
                }
            }
            status.send_replace(LeaseView::NONE);
            tokio::time::sleep(RETRY).await;
        }
    }

    /// One lease's lifetime: register, keep alive, re-register when the facts change.
    async fn term(
        &self,
        lease: i64,
        granted: tokio::time::Instant,
        status: &watch::Sender<LeaseView>,
    ) {
        tracing::info!(node = %self.node, lease = format!("{lease:x}"), ttl_s = self.ttl.as_secs(), "host lease begins");
        let keeper = tokio::spawn(lease::keep(
            self.etcd.clone(),
            lease,
            self.ttl,
            granted,
            status.clone(),
        ));
        let _abort = AbortOnDrop(keeper.abort_handle());
        let mut registered: Option<HostFacts> = None;
        let mut check = tokio::time::interval(FACTS_CHECK);
        let mut keeper = keeper;
        loop {
            tokio::select! {
                ended = &mut keeper => {
                    let reason = ended.map_or_else(|e| e.to_string(), |e| daemon::error_chain(&e));
                    tracing::warn!(node = %self.node, lease = format!("{lease:x}"), %reason, "host lease ended; registering anew");
                    return;
                }
                _ = check.tick() => {
                    let facts = match self.facts.snapshot() {
                        Ok(snapshot) => snapshot.host_facts(),
                        Err(e) => {
                            tracing::warn!(node = %self.node, error = %daemon::error_chain(&e), "reading host facts failed");
                            continue;
                        }
                    };
                    if registered.as_ref() != Some(&facts) && self.register(&facts, lease).await {
                        registered = Some(facts);
                    }
                }
            }
        }
    }

    /// Writes the registration (bound to `lease`) and the member record; false if it failed.
    async fn register(&self, facts: &HostFacts, lease: i64) -> bool {
        let record = NodeRecord {
            name: self.node.clone(),
            agent_address: self.agent_address.clone(),
            facts: facts.clone(),
        };
        let value = pair::encode(&record);
        let (node, member) = (pair::node_key(&self.node), pair::member_key(&self.node));
        let result = self
            .etcd
            .request("registering host", WRITE_BUDGET, |mut c| {
                let txn = Txn::new().and_then([
                    TxnOp::put(
                        node.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::put(member.clone(), value.clone(), None),
                ]);
                async move { c.txn(txn).await }
            })
            .await;
        match result {
            Ok(_) => {
                tracing::info!(node = %self.node, cpus = facts.cpus, memory_mib = facts.memory_mib, "host registered");
                true
            }
            Err(e) => {
                tracing::warn!(node = %self.node, error = %daemon::error_chain(&e), "registering host failed; retrying");
                false
            }
        }
    }
}

/// Destroys the self-fencing domains whenever [`lease::self_fence_due`] says so, waking at the
/// moment it will. Until this process holds its first lease it counts from its own start: the
/// previous agent renewed its lease no later than that.
async fn self_fence(
    libvirt: Libvirt,
    standbys: Option<Standbys>,
    mut lease: watch::Receiver<LeaseView>,
    ttl: Duration,
    node: String,
) {
    let mut view = LeaseView::from(Validity::granted(Instant::now(), ttl));
    let mut leased = false;
    loop {
        let seen = *lease.borrow_and_update();
        if leased || seen != LeaseView::NONE {
            (leased, view) = (true, seen);
        }
        let wake = if lease::self_fence_due(view, Instant::now()) {
            fence_domains(&libvirt, standbys.as_ref(), &node).await;
            Instant::now() + SELF_FENCE_SWEEP
        } else {
            // Alive now, so `doubt_at` is set.
            view.doubt_at().unwrap_or_else(Instant::now)
        };
        tokio::select! {
            changed = lease.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Destroys every live domain marked self-fencing, all at once, logging each. An FT standby
/// waiting paused is spared: its QEMU never runs guest code or writes a disk unless the pair
/// resumes it with a fenced command, and it is the only copy of its guest that survives when
/// the primary's host died (an etcd election after that death can put this lease in doubt).
async fn fence_domains(libvirt: &Libvirt, standbys: Option<&Standbys>, node: &str) {
    let domains = match libvirt.list().await {
        Ok(domains) => domains,
        Err(e) => {
            tracing::error!(node, error = %daemon::error_chain(&e), "self-fence: listing domains failed; trying again");
            return;
        }
    };
    let mut destroys = tokio::task::JoinSet::new();
    let waiting = |d: &DomainStatus| {
        d.state == DomainState::Paused && standbys.is_some_and(|s| s.holds(&d.uuid))
    };
    let live = domains.into_iter().filter(|d| {
        let spared = waiting(d);
        if spared {
            tracing::info!(vm = %d.uuid, node, op = "self-fence", "self-fence: sparing the FT standby, which waits paused and runs only when the pair resumes it");
        }
        d.self_fence
            && !spared
            && !matches!(
                d.state,
                DomainState::Shutoff | DomainState::Crashed | DomainState::Undefined
            )
    });
    for domain in live {
        let (libvirt, node) = (libvirt.clone(), node.to_string());
        destroys.spawn(async move {
            let vm = domain.uuid;
            tracing::warn!(%vm, %node, op = "self-fence", "self-fence begin: the host lease cannot be renewed; destroying the domain before the pair restarts it elsewhere");
            match libvirt.destroy_now(&vm, KILL_GRACE).await {
                Ok(s) => {
                    tracing::warn!(%vm, %node, op = "self-fence", state = ?s.state, reason = %s.reason, "self-fence end: destroyed")
                }
                Err(e) => {
                    tracing::error!(%vm, %node, op = "self-fence", error = %daemon::error_chain(&e), "self-fence end: destroy failed")
                }
            }
        });
    }
    while destroys.join_next().await.is_some() {}
}

/// Aborts the task when dropped, so a term's keeper never outlives the term.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows the pair's announced leader (the leader key), from the current one on: raises the
/// fence to each new term, and gives up the system IP when another host serves (a controller
/// killed outright leaves it behind; two hosts answering for it would split the clients).
async fn follow_leader(membership: Membership) {
    loop {
        let start_revision = read_leader(&membership).await;
        let mut watch = membership.etcd.watch(WatchSpec {
            key: pair::LEADER.to_string(),
            prefix: false,
            start_revision,
        });
        while let Some(watched) = watch.recv().await {
            match watched {
                Watched::Events(events) => {
                    for kv in events.iter().filter_map(|e| e.kv()) {
                        membership.observe(kv.value()).await;
                    }
                }
                Watched::Cancelled { reason } => {
                    tracing::warn!(%reason, "the leader watch was cancelled; reading the leader again");
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Reads the announced leader now; returns the revision to watch from (0 if etcd did not
/// answer).
async fn read_leader(membership: &Membership) -> i64 {
    let current = membership
        .etcd
        .request(
            "reading the serving term",
            WRITE_BUDGET,
            |mut c| async move { c.get(pair::LEADER, None).await },
        )
        .await;
    match current {
        Ok(resp) => {
            if let Some(kv) = resp.kvs().first() {
                membership.observe(kv.value()).await;
            }
            resp.header().map_or(0, |h| h.revision() + 1)
        }
        Err(e) => {
            tracing::warn!(error = %daemon::error_chain(&e), "reading the serving term failed; following changes only");
            0
        }
    }
}

impl Membership {
    /// Acts on an announced leader: its term raises the fence; another host serving means
    /// this host must not hold the system IP.
    async fn observe(&self, value: &[u8]) {
        let Ok(leader) = serde_json::from_slice::<LeaderInfo>(value) else {
            return;
        };
        if let Err(e) = self.fence.observe_term(leader.term) {
            tracing::error!(error = %daemon::error_chain(&e), "raising the fence to a new term failed");
        }
        let Some(ip) = self.system_ip.as_ref().filter(|_| leader.node != self.node) else {
            return;
        };
        match daemon::sysip::release(ip).await {
            Ok(true) => {
                tracing::warn!(node = %self.node, serving = %leader.node, address = %ip.address, "system IP left behind here released: another host serves")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(node = %self.node, error = %daemon::error_chain(&e), "releasing the system IP left behind failed")
            }
        }
    }
}

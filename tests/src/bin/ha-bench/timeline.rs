//! What the bench saw, stamped with when it saw it: one sampler task asks a controller for the
//! VM (GetVm) and the nodes (ListNodes) every [`SAMPLE_POLL`], and reads the new lines of the
//! VM's serial log on both nodes. The measurements wait on this record and read their numbers
//! from it afterwards, so every number has the poll's resolution.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use proto::agent as agent_pb;
use proto::agent::agent_client::AgentClient;
use proto::v1 as pb;
use tests::{ApiAt, Lab};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::{INTERRUPT_POLL, check_interrupted, interrupted};

/// How often the sampler asks and reads: the resolution of the failover timings.
pub(crate) const SAMPLE_POLL: Duration = Duration::from_millis(50);
/// One API call of the sampler: a read from the engine's snapshot; a slower one is a miss.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Every endpoint is on this machine: a live one accepts a connection at once.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The lab's nodes that run guests.
pub(crate) const NODES: [&str; 2] = ["n0", "n1"];

/// The VM as one GetVm showed it.
#[derive(Clone, Debug)]
pub(crate) struct VmSample {
    pub(crate) at: Instant,
    pub(crate) state: pb::VmState,
    pub(crate) node: String,
    /// `protection.state`: off, syncing, protected, simplex.
    pub(crate) protection: String,
    pub(crate) last_failover: Option<pb::Failover>,
}

impl VmSample {
    pub(crate) fn protected(&self) -> bool {
        self.state == pb::VmState::Running && self.protection == "protected"
    }

    pub(crate) fn simplex(&self) -> bool {
        self.state == pb::VmState::Running && self.protection == "simplex"
    }
}

/// A node's state as one ListNodes showed it.
#[derive(Clone, Debug)]
pub(crate) struct NodeSample {
    pub(crate) at: Instant,
    pub(crate) name: String,
    pub(crate) state: pb::NodeState,
}

/// A line of the VM's serial log on `node`.
#[derive(Clone, Debug)]
pub(crate) struct Line {
    pub(crate) at: Instant,
    pub(crate) node: String,
    pub(crate) text: String,
}

/// The VM's mirror jobs as its host's agent listed them (empty: none, or no such domain).
#[derive(Clone, Debug)]
pub(crate) struct MirrorSample {
    pub(crate) at: Instant,
    pub(crate) mirrors: Vec<agent_pb::DiskMirror>,
}

impl MirrorSample {
    /// Whether mirrors run and none failed.
    pub(crate) fn live(&self) -> bool {
        !self.mirrors.is_empty()
            && self
                .mirrors
                .iter()
                .all(|m| m.state() != agent_pb::MirrorState::Failed)
    }

    /// Whether all `disks` disks are mirrored and every mirror is ready.
    pub(crate) fn ready(&self, disks: usize) -> bool {
        self.mirrors.len() == disks
            && self
                .mirrors
                .iter()
                .all(|m| m.state() == agent_pb::MirrorState::Ready)
    }
}

/// A `BENCH round=k writes=N us_per_write=x overhead_us=y` line of the guest.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BenchLine {
    pub(crate) round: u64,
    pub(crate) writes: u64,
    pub(crate) us_per_write: f64,
}

/// Parses a `BENCH ...` line of the tiny guest's write bench.
pub(crate) fn parse_bench(line: &str) -> Option<BenchLine> {
    let rest = line.trim().strip_prefix("BENCH ")?;
    let field = |key: &str| {
        rest.split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
    };
    Some(BenchLine {
        round: field("round")?.parse().ok()?,
        writes: field("writes")?.parse().ok()?,
        us_per_write: field("us_per_write")?.parse().ok()?,
    })
}

/// Everything seen so far, in the order seen.
#[derive(Debug, Default)]
pub(crate) struct Timeline {
    pub(crate) vm: Vec<VmSample>,
    pub(crate) nodes: Vec<NodeSample>,
    pub(crate) lines: Vec<Line>,
    pub(crate) mirrors: Vec<MirrorSample>,
}

impl Timeline {
    /// The newest VM sample.
    pub(crate) fn last_vm(&self) -> Option<&VmSample> {
        self.vm.last()
    }

    /// The VM samples seen after `t`.
    pub(crate) fn vm_after(&self, t: Instant) -> impl Iterator<Item = &VmSample> {
        self.vm.iter().filter(move |s| s.at > t)
    }

    /// The lines seen on `node` after `t`.
    pub(crate) fn lines_after<'a>(
        &'a self,
        node: &'a str,
        t: Instant,
    ) -> impl Iterator<Item = &'a Line> + 'a {
        self.lines
            .iter()
            .filter(move |l| l.at > t && l.node == node)
    }
}

/// The running sampler; stopped when dropped.
#[derive(Debug)]
pub(crate) struct Sampler {
    timeline: Arc<Mutex<Timeline>>,
    endpoints: Arc<Mutex<ApiAt>>,
    mirrors: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// What the sampler task works with.
#[derive(Debug)]
struct Task {
    vm: pb::Vm,
    endpoints: Arc<Mutex<ApiAt>>,
    mirrors: Arc<AtomicBool>,
    timeline: Arc<Mutex<Timeline>>,
    tails: Vec<Tail>,
    /// Each node and its agent's address.
    agents: Vec<(String, Endpoint)>,
}

impl Sampler {
    /// Starts sampling VM `vm` through `lab`'s endpoints and tailing its serial logs from
    /// their current ends.
    pub(crate) fn start(runtime: &Runtime, lab: &Lab, vm: &pb::Vm) -> Sampler {
        let task = Task {
            vm: vm.clone(),
            endpoints: Arc::new(Mutex::new(lab.api(&lab.endpoints()))),
            mirrors: Arc::new(AtomicBool::new(false)),
            timeline: Arc::new(Mutex::new(Timeline::default())),
            tails: NODES
                .iter()
                .map(|node| Tail::new(node, serial_path(lab.dir(), node, &vm.uuid)))
                .collect(),
            agents: NODES
                .iter()
                .map(|node| {
                    let endpoint = lab.agent_endpoint(node, Some("n0-controller"));
                    ((*node).to_string(), endpoint)
                })
                .collect(),
        };
        Sampler {
            timeline: Arc::clone(&task.timeline),
            endpoints: Arc::clone(&task.endpoints),
            mirrors: Arc::clone(&task.mirrors),
            task: runtime.spawn(task.run()),
        }
    }

    /// Lists the VM's mirror jobs from its host's agent at every poll while `on`.
    pub(crate) fn watch_mirrors(&self, on: bool) {
        self.mirrors.store(on, Ordering::SeqCst);
    }

    /// Asks through `api` from the next poll on.
    pub(crate) fn use_endpoints(&self, api: ApiAt) {
        *lock(&self.endpoints) = api;
    }

    /// The record so far (the sampler waits while it is held).
    pub(crate) fn timeline(&self) -> MutexGuard<'_, Timeline> {
        lock(&self.timeline)
    }

    /// Waits until `found` returns something for the record, or fails after `timeout`
    /// naming `what` and the newest VM sample.
    pub(crate) fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        found: impl Fn(&Timeline) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            if let Some(value) = found(&self.timeline()) {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                let last = self.timeline().last_vm().cloned();
                bail!("{what}: not within {timeout:?}; last VM sample: {last:?}");
            }
            std::thread::sleep(INTERRUPT_POLL.min(SAMPLE_POLL));
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A poisoned lock only means a panic elsewhere; the record itself stays usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Milliseconds since the Unix epoch now (the controllers' clock: the same machine).
pub(crate) fn unix_ms_now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Path of the VM's serial log on `node` (as `Lab::serial_log` builds it).
fn serial_path(dir: &Path, node: &str, uuid: &str) -> PathBuf {
    dir.join(node)
        .join("agent/serial")
        .join(format!("{uuid}.log"))
}

impl Task {
    /// Until aborted or interrupted: one VM sample, the nodes, the new serial lines (and the
    /// mirrors when watched) every [`SAMPLE_POLL`].
    async fn run(mut self) {
        let mut client: Option<(ApiAt, tests::Client)> = None;
        let mut agent: Option<(String, AgentClient<Channel>)> = None;
        while !interrupted() {
            let wanted = lock(&self.endpoints).clone();
            if client.as_ref().is_none_or(|(e, _)| *e != wanted) {
                client = connect(&wanted).await.map(|c| (wanted, c));
            }
            if let Some((_, api)) = &client {
                let (vm_sample, nodes) = ask(api, &self.vm.name).await;
                if vm_sample.is_none() || nodes.is_empty() {
                    client = None;
                }
                let mut t = lock(&self.timeline);
                t.vm.extend(vm_sample);
                t.nodes.extend(nodes);
            }
            if self.mirrors.load(Ordering::SeqCst) {
                self.sample_mirrors(&mut agent).await;
            }
            let lines: Vec<Line> = self.tails.iter_mut().flat_map(Tail::read).collect();
            lock(&self.timeline).lines.extend(lines);
            tokio::time::sleep(SAMPLE_POLL).await;
        }
    }

    /// Lists the domains of the agent of the VM's host (as last sampled) for its mirrors.
    async fn sample_mirrors(&self, agent: &mut Option<(String, AgentClient<Channel>)>) {
        let node = lock(&self.timeline).last_vm().map(|s| s.node.clone());
        let Some((name, endpoint)) = self.agents.iter().find(|(n, _)| Some(n) == node.as_ref())
        else {
            return;
        };
        if agent.as_ref().is_none_or(|(a, _)| a != name) {
            *agent = connect_agent(endpoint).await.map(|c| (name.clone(), c));
        }
        let Some((_, client)) = agent.as_ref() else {
            return;
        };
        let mut request = tonic::Request::new(agent_pb::ListDomainsRequest {});
        request.set_timeout(CALL_TIMEOUT);
        let Ok(listed) = client.clone().list_domains(request).await else {
            *agent = None;
            return;
        };
        let mirrors = listed
            .into_inner()
            .domains
            .into_iter()
            .find(|d| d.uuid == self.vm.uuid)
            .map(|d| d.mirrors)
            .unwrap_or_default();
        let sample = MirrorSample {
            at: Instant::now(),
            mirrors,
        };
        lock(&self.timeline).mirrors.push(sample);
    }
}

async fn connect_agent(endpoint: &Endpoint) -> Option<AgentClient<Channel>> {
    let channel = endpoint
        .clone()
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .ok()?;
    Some(AgentClient::new(channel))
}

/// A client of the first of `api`'s endpoints that accepts a connection.
async fn connect(api: &ApiAt) -> Option<tests::Client> {
    api.connect(CONNECT_TIMEOUT, Duration::from_secs(60))
        .await
        .ok()
}

/// One GetVm and one ListNodes; `None` / empty for a call that failed.
async fn ask(api: &tests::Client, vm: &str) -> (Option<VmSample>, Vec<NodeSample>) {
    let mut request = tonic::Request::new(pb::GetVmRequest { vm: vm.into() });
    request.set_timeout(CALL_TIMEOUT);
    let got = api.clone().get_vm(request).await;
    let vm_sample = got.ok().map(|r| vm_sample(&r.into_inner()));
    let mut request = tonic::Request::new(pb::ListNodesRequest {});
    request.set_timeout(CALL_TIMEOUT);
    let listed = api.clone().list_nodes(request).await;
    let at = Instant::now();
    let nodes = listed
        .map(|r| r.into_inner().nodes)
        .unwrap_or_default()
        .into_iter()
        .map(|n| NodeSample {
            at,
            state: n.state(),
            name: n.name,
        })
        .collect();
    (vm_sample, nodes)
}

fn vm_sample(vm: &pb::Vm) -> VmSample {
    let protection = vm.protection.clone().unwrap_or_default();
    VmSample {
        at: Instant::now(),
        state: vm.state(),
        node: vm.node.clone(),
        protection: protection.state,
        last_failover: protection.last_failover,
    }
}

/// The unread part of one serial log.
#[derive(Debug)]
struct Tail {
    node: String,
    path: PathBuf,
    /// Bytes consumed: up to the end of the last whole line read.
    offset: usize,
}

impl Tail {
    /// Reads from the log's current end (0 if it does not exist yet).
    fn new(node: &str, path: PathBuf) -> Tail {
        let offset = std::fs::metadata(&path)
            .ok()
            .and_then(|m| usize::try_from(m.len()).ok())
            .unwrap_or(0);
        Tail {
            node: node.to_string(),
            path,
            offset,
        }
    }

    /// The whole lines written since the last read.
    fn read(&mut self) -> Vec<Line> {
        let Ok(bytes) = std::fs::read(&self.path) else {
            return Vec::new();
        };
        if bytes.len() < self.offset {
            // Rewritten from the start.
            self.offset = 0;
        }
        let new = &bytes[self.offset..];
        let Some(end) = new.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        self.offset += end + 1;
        let at = Instant::now();
        String::from_utf8_lossy(&new[..end])
            .split('\n')
            .map(|l| Line {
                at,
                node: self.node.clone(),
                text: l.trim_end_matches('\r').to_string(),
            })
            .collect()
    }
}

/// Waits until the VM shows `done` in a sample after `after`; returns that sample.
pub(crate) fn wait_vm(
    sampler: &Sampler,
    what: &str,
    after: Instant,
    timeout: Duration,
    done: impl Fn(&VmSample) -> bool,
) -> anyhow::Result<VmSample> {
    sampler
        .wait(what, timeout, |t| {
            t.vm_after(after).find(|s| done(s)).cloned()
        })
        .with_context(|| format!("waiting for the VM: {what}"))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parse_bench_reads_round_writes_and_latency() {
        let line = "BENCH round=12 writes=200 us_per_write=417.3 overhead_us=3409";

        let parsed = parse_bench(line);

        assert_eq!(
            parsed,
            Some(BenchLine {
                round: 12,
                writes: 200,
                us_per_write: 417.3
            })
        );
    }

    #[test]
    fn parse_bench_ignores_counter_lines() {
        let parsed = parse_bench("COUNTER 12 boot=ab12cd34");

        assert_eq!(parsed, None);
    }
}

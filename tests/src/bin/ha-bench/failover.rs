//! The failover of the HA VM: `lab kill-host` its host (every process in the namespace gets
//! SIGKILL, the links go down) while the sampler asks the survivor's controller; each step
//! in ms from the start of the kill. Then `lab restore-host` and the mirror back to the
//! returned host, timed as a resync.

use std::time::{Duration, Instant};

use anyhow::Context;
use proto::v1 as pb;
use tests::{GUEST_BOOT_TIMEOUT, Lab, parse_counter};
use tokio::runtime::Runtime;

use crate::latency::{Resync, wait_resync};
use crate::stats::{millis, ms_after};
use crate::timeline::{Sampler, Timeline, unix_ms_now, wait_vm};
use crate::{API_PORT, pause};

/// Lost detection (host lease TTL 2 s, an etcd election when the dead host led etcd, a
/// takeover when its controller served), the fence, the start on the survivor under TCG.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(120);
/// Time for the sampler to connect to the survivor before the kill.
const RECONNECT_SETTLE: Duration = Duration::from_millis(500);

/// The failover's timings, ms from the start of the kill.
#[derive(Debug)]
pub(crate) struct Failover {
    pub(crate) victim: String,
    pub(crate) survivor: String,
    /// Whether the victim's controller served: its death adds a takeover.
    pub(crate) victim_served: bool,
    /// etcd's Raft leader before the kill (`n0-etcd`, ...): the victim's adds an election.
    pub(crate) etcd_leader: String,
    /// How long `pvctl lab kill-host` took.
    pub(crate) kill_command_ms: f64,
    /// The first sample with the VM not running or its host LOST/FENCED.
    pub(crate) detect_ms: Option<f64>,
    /// What was seen first: `vm <state>` or `node <state>`.
    pub(crate) detect_by: String,
    /// The survivor's controller logged the fence's end (or its fallback).
    pub(crate) fence_ms: Option<f64>,
    /// The fence's outcome in the log's words ("ok", "failed", "fallback", ...).
    pub(crate) fence_outcome: Option<String>,
    /// The first sample with the VM running on the survivor.
    pub(crate) start_ms: Option<f64>,
    /// The first COUNTER line of the survivor's serial log.
    pub(crate) first_counter_ms: Option<f64>,
    /// The controller's own stamps: failover decided, VM running again.
    pub(crate) decided_ms: Option<f64>,
    pub(crate) running_ms: Option<f64>,
    /// The last counter printed before the kill and the first after.
    pub(crate) last_counter: Option<u64>,
    pub(crate) first_counter: Option<u64>,
}

/// Kills the VM's host, waits for the VM's first counter on the survivor, and reads the
/// timings. Returns them and the kill's instant.
pub(crate) fn measure(
    runtime: &Runtime,
    lab: &Lab,
    sampler: &Sampler,
) -> anyhow::Result<(Failover, Instant)> {
    let victim = sampler
        .timeline()
        .last_vm()
        .map(|s| s.node.clone())
        .context("no sample of the VM yet")?;
    let survivor = if victim == "n0" { "n1" } else { "n0" }.to_string();
    let victim_served = runtime.block_on(lab.serving()).as_deref() == Some(victim.as_str());
    let etcd_leader = lab.etcd_leader();
    sampler.use_endpoints(lab.api(&format!("{}:{API_PORT}", lab.address_of(&survivor))));
    pause(RECONNECT_SETTLE)?;
    let (killed, killed_unix_ms) = (Instant::now(), unix_ms_now());
    lab.kill_host(&victim);
    let kill_command_ms = millis(killed.elapsed());
    let what = format!("running on {survivor}");
    wait_vm(sampler, &what, killed, FAILOVER_TIMEOUT, |s| {
        s.state == pb::VmState::Running && s.node == survivor
    })?;
    sampler.wait("a COUNTER on the survivor", GUEST_BOOT_TIMEOUT, |t| {
        t.lines_after(&survivor, killed)
            .find(|l| parse_counter(&l.text).is_some())
            .map(|_| ())
    })?;
    let t = sampler.timeline();
    let (detect_ms, detect_by) = detection(&t, &victim, killed);
    let (fence_ms, fence_outcome) = fence_end(lab, &victim, killed_unix_ms);
    let first = t
        .lines_after(&survivor, killed)
        .find_map(|l| parse_counter(&l.text).map(|c| (l.at, c.0)));
    let failover =
        t.vm.iter()
            .rev()
            .find_map(|s| s.last_failover.clone().filter(|f| f.from_node == victim));
    let failover = Failover {
        victim_served,
        etcd_leader,
        kill_command_ms,
        detect_ms,
        detect_by,
        fence_ms,
        fence_outcome,
        start_ms: t
            .vm_after(killed)
            .find(|s| s.state == pb::VmState::Running && s.node == survivor)
            .map(|s| millis(s.at - killed)),
        first_counter_ms: first.map(|(at, _)| millis(at - killed)),
        decided_ms: failover
            .as_ref()
            .map(|f| ms_after(f.decided_unix_ms, killed_unix_ms)),
        running_ms: failover
            .as_ref()
            .filter(|f| f.running_unix_ms > 0)
            .map(|f| ms_after(f.running_unix_ms, killed_unix_ms)),
        last_counter: last_counter_before(&t, &victim, killed),
        first_counter: first.map(|(_, n)| n),
        victim,
        survivor,
    };
    Ok((failover, killed))
}

/// Powers the victim on again and times the mirror back to it; the sampler asks through
/// every endpoint again.
pub(crate) fn restore(
    lab: &Lab,
    sampler: &Sampler,
    victim: &str,
    disk_sizes: &[u64],
) -> anyhow::Result<Resync> {
    sampler.watch_mirrors(true);
    let restored = Instant::now();
    lab.restore_host(victim);
    sampler.use_endpoints(lab.api(&lab.endpoints()));
    wait_resync(sampler, "restore", restored, disk_sizes)
}

/// The first sample after `killed` with the VM not running or `victim` LOST/FENCED: ms and
/// what was seen.
fn detection(t: &Timeline, victim: &str, killed: Instant) -> (Option<f64>, String) {
    let vm = t
        .vm_after(killed)
        .find(|s| s.state != pb::VmState::Running)
        .map(|s| (s.at, format!("vm {:?}", s.state)));
    let node = t
        .nodes
        .iter()
        .filter(|n| n.at > killed && n.name == victim)
        .find(|n| matches!(n.state, pb::NodeState::Lost | pb::NodeState::Fenced))
        .map(|n| (n.at, format!("node {:?}", n.state)));
    match vm.into_iter().chain(node).min_by_key(|(at, _)| *at) {
        Some((at, by)) => (Some(millis(at - killed)), by),
        None => (None, "not seen".to_string()),
    }
}

/// The last counter the guest printed on `node` before `killed`.
fn last_counter_before(t: &Timeline, node: &str, killed: Instant) -> Option<u64> {
    t.lines
        .iter()
        .rev()
        .filter(|l| l.node == node && l.at <= killed)
        .find_map(|l| parse_counter(&l.text))
        .map(|(n, _)| n)
}

/// The first "fence end" (or "fence fallback") line about `victim` in the controllers' logs
/// stamped after `killed_unix_ms`: ms after the kill and the outcome.
fn fence_end(lab: &Lab, victim: &str, killed_unix_ms: i64) -> (Option<f64>, Option<String>) {
    let logs = lab.log("n0", "controller") + &lab.log("n1", "controller");
    let found = logs
        .lines()
        .filter(|l| about_node(l, victim))
        .filter_map(|l| Some((log_unix_ms(l)?, fence_outcome(l)?)))
        .filter(|(ms, _)| *ms >= killed_unix_ms)
        .min_by_key(|(ms, _)| *ms);
    match found {
        Some((ms, outcome)) => (Some(ms_after(ms, killed_unix_ms)), Some(outcome)),
        None => (None, None),
    }
}

/// Whether a log line has the field `node=<node>` (quoted or not).
fn about_node(line: &str, node: &str) -> bool {
    line.contains(&format!(" node={node}")) || line.contains(&format!(" node=\"{node}\""))
}

/// The outcome of a fence's end line: the word after "fence end: ", or "fallback".
fn fence_outcome(line: &str) -> Option<String> {
    if line.contains("fence fallback") {
        return Some("fallback".to_string());
    }
    let rest = &line[line.find("fence end: ")? + "fence end: ".len()..];
    let word: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
    Some(word)
}

/// The Unix time in ms of a log line stamped `2026-12-01T15:26:02.862729Z ...`.
fn log_unix_ms(line: &str) -> Option<i64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, d) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let mut hms = time.splitn(3, ':');
    let h: i64 = hms.next()?.parse().ok()?;
    let min: i64 = hms.next()?.parse().ok()?;
    let second = hms.next()?;
    let (s, fraction) = second.split_once('.').unwrap_or((second, "0"));
    let s: i64 = s.parse().ok()?;
    // Milliseconds: the first three digits of the fraction, padded.
    let ms: i64 = format!("{:0<3}", &fraction[..fraction.len().min(3)])
        .parse()
        .ok()?;
    let seconds = days_from_civil(y, m, d) * 86_400 + h * 3600 + min * 60 + s;
    Some(seconds * 1000 + ms)
}

/// Days from 1970-01-01 to the proleptic Gregorian date `y-m-d` (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn log_unix_ms_reads_a_tracing_stamp() {
        let line =
            "2026-12-01T15:26:02.862729Z  WARN fence end: ok; the host is powered off node=\"n0\"";

        let ms = log_unix_ms(line);

        assert_eq!(ms, Some(1_796_138_762_862));
    }

    #[test]
    fn fence_outcome_of_an_end_line_is_its_first_word() {
        let line = "2026-12-01T15:26:02.862729Z ERROR fence end: failed; the BMC did not answer";

        let outcome = fence_outcome(line);

        assert_eq!(outcome.as_deref(), Some("failed"));
    }
}

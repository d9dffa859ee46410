//! Write latency, mirrored and local, in one boot of one guest, and the resync after each
//! 10 s outage. A cycle: the VM is protected, the guest runs [`MIRRORED_ROUNDS`] bench rounds;
//! then both A-Links of the VM's host are cut for [`OUTAGE`] (the mirror breaks, the guest
//! writes on its local copy alone, the VM shows simplex) and healed, and the mirror is
//! rebuilt until the VM is protected again.
//!
//! Afterwards each bench round is classified by what the sampler saw around it. A round ran
//! between the arrival of the previous BENCH line and its own (the guest sleeps a second
//! between rounds, longer than a line takes to arrive), so it is *mirrored* when that
//! interval overlaps no cut and every VM sample in it (and the one before it) is protected,
//! and *local* when the interval lies inside a cut and every sample in it is simplex. Rounds
//! across a state change (the mirror stalling on the cut links, the resync) count for
//! neither.

use std::time::{Duration, Instant};

use tests::{Lab, parse_counter};

use crate::pause;
use crate::stats::millis;
use crate::timeline::{MirrorSample, Sampler, Timeline, VmSample, parse_bench, wait_vm};

/// Bench rounds (about 1.3 s each) run while protected before each cut.
const MIRRORED_ROUNDS: usize = 5;
/// How long both A-Links stay cut: the 10 s outage.
pub(crate) const OUTAGE: Duration = Duration::from_secs(10);
/// The rebuilt mirror copies both disks (80 MiB) over the A-Links; generous for a loaded
/// machine and a debug build of the replicator.
pub(crate) const RESYNC_TIMEOUT: Duration = Duration::from_secs(180);
/// A bench round takes well under a second plus its second of sleep.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes per bench write.
const BENCH_WRITE_BYTES: u64 = 4096;
/// Bytes per counter write (one 512-byte block at the start of vda).
const COUNTER_WRITE_BYTES: u64 = 512;

/// One cut of both A-Links and what followed.
#[derive(Debug)]
pub(crate) struct Cycle {
    /// Before the first `cut-path`.
    pub(crate) cut_start: Instant,
    /// After the second `cut-path` returned.
    pub(crate) cut_done: Instant,
    /// Before `heal`.
    pub(crate) heal_start: Instant,
    /// After `heal` returned.
    pub(crate) heal_done: Instant,
    /// From the cut to the first simplex sample, ms (none if never seen in the outage).
    pub(crate) simplex_after_ms: Option<f64>,
    /// Bytes the guest wrote during the outage (bench rounds and counter lines seen in it).
    pub(crate) guest_bytes: u64,
    /// The rebuild of the mirror after the heal.
    pub(crate) resync: Resync,
}

/// A rebuild of the mirror, from a start, a heal or a restored host to protected again.
#[derive(Debug)]
pub(crate) struct Resync {
    /// "start" (the first sync), "heal" (after an A-Link outage) or "restore" (after a
    /// failover).
    pub(crate) trigger: &'static str,
    /// From the trigger's start to the first protected sample, ms.
    pub(crate) to_protected_ms: f64,
    /// From the agent's last listing without a live mirror to its first with all ready, ms;
    /// none when no listing showed them ready.
    pub(crate) copy_ms: Option<f64>,
    /// Bytes the copy moved: the mirror jobs' lengths summed (QEMU counts a skipped zero
    /// area too), or the disks' sizes.
    pub(crate) bytes: u64,
    /// "mirror jobs" or "disk sizes".
    pub(crate) bytes_source: &'static str,
}

impl Resync {
    /// MB/s (10^6 bytes) of the copy, when timed.
    pub(crate) fn mbps(&self) -> Option<f64> {
        self.copy_ms
            .filter(|ms| *ms > 0.0)
            .map(|ms| self.bytes as f64 / 1000.0 / ms)
    }
}

/// Bench rounds of each class: microseconds per write.
#[derive(Debug, Default)]
pub(crate) struct Classified {
    pub(crate) local: Vec<f64>,
    pub(crate) mirrored: Vec<f64>,
    /// Rounds in neither class (state changes, stalls).
    pub(crate) other: usize,
}

/// Runs `cycles` cycles on the VM's host `node`.
pub(crate) fn run(
    lab: &Lab,
    sampler: &Sampler,
    node: &str,
    cycles: usize,
    disk_sizes: &[u64],
) -> anyhow::Result<Vec<Cycle>> {
    let mut done = Vec::with_capacity(cycles);
    for k in 0..cycles {
        let cycle = cycle(lab, sampler, node, disk_sizes)?;
        eprintln!(
            "cycle {}: simplex {:.0} ms after the cut, guest wrote {} B in the outage, protected again {:.0} ms after the heal",
            k + 1,
            cycle.simplex_after_ms.unwrap_or(f64::NAN),
            cycle.guest_bytes,
            cycle.resync.to_protected_ms
        );
        done.push(cycle);
    }
    Ok(done)
}

/// One cycle: protected rounds, the outage, the rebuild.
fn cycle(lab: &Lab, sampler: &Sampler, node: &str, disk_sizes: &[u64]) -> anyhow::Result<Cycle> {
    let start = Instant::now();
    wait_vm(
        sampler,
        "protected",
        start,
        RESYNC_TIMEOUT,
        VmSample::protected,
    )?;
    wait_rounds(sampler, node, Instant::now(), MIRRORED_ROUNDS)?;
    let cut_start = Instant::now();
    lab.cut_path(node, "alink1");
    lab.cut_path(node, "alink2");
    let cut_done = Instant::now();
    pause(OUTAGE.saturating_sub(cut_start.elapsed()))?;
    sampler.watch_mirrors(true);
    let heal_start = Instant::now();
    lab.heal();
    let heal_done = Instant::now();
    let resync = wait_resync(sampler, "heal", heal_start, disk_sizes)?;
    let t = sampler.timeline();
    let simplex_after_ms =
        t.vm.iter()
            .find(|s| s.at > cut_start && s.at < heal_start && s.simplex())
            .map(|s| millis(s.at - cut_start));
    let guest_bytes = written_between(&t, node, cut_start, heal_start);
    Ok(Cycle {
        cut_start,
        cut_done,
        heal_start,
        heal_done,
        simplex_after_ms,
        guest_bytes,
        resync,
    })
}

/// Waits for `count` BENCH lines on `node` after `after`.
fn wait_rounds(sampler: &Sampler, node: &str, after: Instant, count: usize) -> anyhow::Result<()> {
    let timeout = ROUND_TIMEOUT * u32::try_from(count).unwrap_or(u32::MAX);
    sampler.wait(&format!("{count} bench rounds"), timeout, |t| {
        let seen = t
            .lines_after(node, after)
            .filter(|l| parse_bench(&l.text).is_some())
            .count();
        (seen >= count).then_some(())
    })
}

/// Waits until the VM is protected after `after` (the sampler watching the mirrors since
/// before the trigger) and reads the rebuild from the agent's mirror samples: from the last
/// one without a live mirror to the first with every disk's mirror ready (so the mirror's
/// set-up is in it, and one poll of error), the jobs' summed lengths copied. Stops watching.
pub(crate) fn wait_resync(
    sampler: &Sampler,
    trigger: &'static str,
    after: Instant,
    disk_sizes: &[u64],
) -> anyhow::Result<Resync> {
    let what = format!("protected again after the {trigger}");
    let protected = wait_vm(sampler, &what, after, RESYNC_TIMEOUT, VmSample::protected);
    sampler.watch_mirrors(false);
    let protected = protected?;
    let t = sampler.timeline();
    let samples: Vec<&MirrorSample> = t
        .mirrors
        .iter()
        .filter(|m| m.at > after && m.at <= protected.at)
        .collect();
    let ready = samples.iter().position(|m| m.ready(disk_sizes.len()));
    let copy = ready.map(|i| {
        let start = samples[..i]
            .iter()
            .rev()
            .find(|m| !m.live())
            .map_or(after, |m| m.at);
        let bytes: u64 = samples[i].mirrors.iter().map(|m| m.length).sum();
        (millis(samples[i].at - start), bytes)
    });
    let (copy_ms, bytes, bytes_source) = match copy {
        Some((ms, bytes)) if bytes > 0 => (Some(ms), bytes, "mirror jobs"),
        _ => (None, disk_sizes.iter().sum(), "disk sizes"),
    };
    Ok(Resync {
        trigger,
        to_protected_ms: millis(protected.at - after),
        copy_ms,
        bytes,
        bytes_source,
    })
}

/// Bytes the guest wrote on `node` between `from` and `to`, by the lines seen then: each
/// BENCH round its writes × 4 KiB, each COUNTER line 512 B.
fn written_between(t: &Timeline, node: &str, from: Instant, to: Instant) -> u64 {
    t.lines_after(node, from)
        .filter(|l| l.at <= to)
        .map(|l| match parse_bench(&l.text) {
            Some(b) => b.writes * BENCH_WRITE_BYTES,
            None if parse_counter(&l.text).is_some() => COUNTER_WRITE_BYTES,
            None => 0,
        })
        .sum()
}

/// Sorts the bench rounds on `node` seen before `until` into mirrored and local.
pub(crate) fn classify(t: &Timeline, node: &str, cycles: &[Cycle], until: Instant) -> Classified {
    let mut classified = Classified::default();
    let rounds: Vec<(Instant, f64)> = t
        .lines
        .iter()
        .filter(|l| l.node == node && l.at <= until)
        .filter_map(|l| parse_bench(&l.text).map(|b| (l.at, b.us_per_write)))
        .collect();
    for pair in rounds.windows(2) {
        let ((from, _), (to, us)) = (pair[0], pair[1]);
        let states = states_in(t, from, to);
        let cut = cycles
            .iter()
            .any(|c| from < c.heal_done && to > c.cut_start);
        let in_outage = cycles
            .iter()
            .any(|c| from >= c.cut_done && to <= c.heal_start);
        if states.is_empty() {
            classified.other += 1;
        } else if !cut && states.iter().all(|s| s.protected()) {
            classified.mirrored.push(us);
        } else if in_outage && states.iter().all(|s| s.simplex()) {
            classified.local.push(us);
        } else {
            classified.other += 1;
        }
    }
    classified
}

/// The VM samples in `(from, to]` and the last one before: the states a round in that
/// interval ran under.
fn states_in(t: &Timeline, from: Instant, to: Instant) -> Vec<&VmSample> {
    let before = t.vm.iter().rev().find(|s| s.at <= from);
    let inside = t.vm.iter().filter(|s| s.at > from && s.at <= to);
    let states: Vec<&VmSample> = before.into_iter().chain(inside).collect();
    // A round with no sample inside it was not watched.
    if states.len() < 2 { Vec::new() } else { states }
}

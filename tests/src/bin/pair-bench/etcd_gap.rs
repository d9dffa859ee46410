//! Measurement 2, `etcd_leader_kill_write_gap_ms`: a loop writes CreateVm then DeleteVm
//! back to back through the system IP endpoints, each request retried as pvctl does; after
//! [`WRITE_BASELINE`] etcd's Raft leader gets kill -9. The number is the longest interval
//! between consecutive successful writes that overlaps the [`WRITE_WATCH`] after the kill.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tests::{ApiAt, Lab};
use tokio::runtime::Runtime;

use crate::api::{Retrying, delete_vm, small_vm, wait_pair_healthy};
use crate::stats::{millis, percentile, signed_millis};
use crate::{HEALTH_POLL, HOSTS, INTERRUPTED, PAIR_RECOVERY_TIMEOUT, check_interrupted, pause};

/// The etcd members' client port.
const ETCD_CLIENT_PORT: u16 = 2379;
/// A restarted etcd member rejoins and catches up from the leader's log in seconds.
const ETCD_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Writes before the etcd leader's kill: the loop is warm and its normal pace is known.
pub(crate) const WRITE_BASELINE: Duration = Duration::from_secs(2);
/// How long after the etcd leader's kill the write gaps are watched (the window).
pub(crate) const WRITE_WATCH: Duration = Duration::from_secs(10);

/// What the etcd-leader measurement found.
#[derive(Debug)]
pub(crate) struct WriteGap {
    /// The killed member's daemon, e.g. `n1-etcd`.
    pub(crate) leader: String,
    /// The longest gap between successful writes around the kill.
    pub(crate) gap_ms: f64,
    /// When that gap began, ms relative to the kill (negative: a write was in flight).
    pub(crate) gap_start_ms: f64,
    /// The median interval between writes before the kill.
    pub(crate) baseline_ms: f64,
    pub(crate) writes: Writes,
}

/// What the write loop saw.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    /// When each successful write (create or delete) returned.
    pub(crate) done: Vec<Instant>,
    /// Logical requests issued.
    pub(crate) requests: usize,
    /// Logical requests that never succeeded, with why.
    pub(crate) failures: Vec<String>,
    /// Attempts that failed and were retried.
    pub(crate) retried: usize,
}

/// Kills etcd's leader under the write loop and measures the longest write gap; then
/// restarts the member and waits for a healthy etcd and pair.
pub(crate) fn measure(runtime: &Runtime, lab: &Lab) -> anyhow::Result<WriteGap> {
    let endpoints = lab.api(&lab.endpoints());
    runtime.block_on(wait_pair_healthy(&endpoints, PAIR_RECOVERY_TIMEOUT))?;
    let leader = lab.etcd_leader();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = runtime.spawn({
        let (endpoints, stop) = (endpoints.clone(), Arc::clone(&stop));
        async move { write_loop(&endpoints, &stop).await }
    });
    pause(WRITE_BASELINE)?;
    let killed = Instant::now();
    lab.kill9(&leader);
    pause(WRITE_WATCH.saturating_sub(killed.elapsed()))?;
    stop.store(true, Ordering::SeqCst);
    let writes = runtime
        .block_on(writer)
        .context("the write loop panicked")?;
    let offsets: Vec<f64> = writes
        .done
        .iter()
        .map(|t| signed_millis(*t, killed))
        .collect();
    let (gap_ms, gap_start_ms) = max_gap_ms(&offsets, millis(WRITE_WATCH));
    let before: Vec<f64> = offsets.iter().copied().filter(|t| *t < 0.0).collect();
    let mut intervals: Vec<f64> = before.windows(2).map(|w| w[1] - w[0]).collect();
    intervals.sort_by(f64::total_cmp);
    let baseline_ms = percentile(&intervals, 50);
    eprintln!(
        "etcd: killed leader {leader}; longest write gap {gap_ms:.0} ms ({} requests, {} failed)",
        writes.requests,
        writes.failures.len()
    );
    lab.repair();
    runtime.block_on(wait_etcd_healthy(lab))?;
    runtime.block_on(wait_pair_healthy(&endpoints, PAIR_RECOVERY_TIMEOUT))?;
    Ok(WriteGap {
        leader,
        gap_ms,
        gap_start_ms,
        baseline_ms,
        writes,
    })
}

/// Creates and deletes VMs `gap-<i>` back to back until `stop`, each request retried.
async fn write_loop(endpoints: &ApiAt, stop: &AtomicBool) -> Writes {
    let mut api = Retrying::new(endpoints.clone());
    let mut writes = Writes::default();
    for i in 0.. {
        if stop.load(Ordering::SeqCst) || INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        let name = format!("gap-{i}");
        writes.requests += 1;
        let created = api
            .call(
                small_vm(&name),
                |mut c, r| async move { c.create_vm(r).await },
            )
            .await;
        if let Err(e) = created {
            writes.failures.push(format!("create {name}: {e:#}"));
            continue;
        }
        writes.done.push(Instant::now());
        writes.requests += 1;
        match delete_vm(&mut api, &name).await {
            Ok(()) => writes.done.push(Instant::now()),
            Err(e) => writes.failures.push(format!("delete {name}: {e:#}")),
        }
    }
    writes.retried = api.retried;
    writes
}

/// The longest interval between consecutive `done` times (ms relative to the kill, sorted)
/// that overlaps `(0, window]`, as (length, start); an interval still open at the window's
/// end counts up to it.
fn max_gap_ms(done: &[f64], window: f64) -> (f64, f64) {
    let mut points: Vec<f64> = done.to_vec();
    if points.iter().all(|t| *t <= window) {
        points.push(window);
    }
    points
        .windows(2)
        .filter(|w| w[1] > 0.0 && w[0] < window)
        .map(|w| (w[1] - w[0], w[0]))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((f64::NAN, f64::NAN))
}

fn etcd_endpoints(lab: &Lab) -> String {
    HOSTS
        .map(|host| format!("{}:{ETCD_CLIENT_PORT}", lab.address_of(host)))
        .join(",")
}

/// Waits until every etcd member reports healthy.
async fn wait_etcd_healthy(lab: &Lab) -> anyhow::Result<()> {
    let endpoints = etcd_endpoints(lab);
    let deadline = Instant::now() + ETCD_HEALTH_TIMEOUT;
    loop {
        let output = tokio::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &endpoints, "endpoint", "health"])
            .output()
            .await
            .context("running etcdctl")?;
        if output.status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "etcd not healthy within {ETCD_HEALTH_TIMEOUT:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        check_interrupted()?;
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn max_gap_ms_counts_the_interval_spanning_the_kill_in_full() {
        let done = [-400.0, -100.0, 1200.0, 1500.0, 1900.0, 2100.0];

        let gap = max_gap_ms(&done, 2000.0);

        assert_eq!(gap, (1300.0, -100.0));
    }

    #[test]
    fn max_gap_ms_without_writes_after_the_kill_runs_to_the_window_end() {
        let done = [-300.0, -50.0];

        let gap = max_gap_ms(&done, 10_000.0);

        assert_eq!(gap, (10_050.0, -50.0));
    }
}

//! `pair-bench`: the pair's speed numbers, measured on a lab of its own (`pvbn`, subnets
//! `10.200.*`), printed as a table, or as one JSON object with `--json`. A bench reports; it
//! asserts no timing. Needs root (network namespaces) and the daemons built:
//!
//! ```text
//! cargo build -p controller -p agent -p cli --bins && cargo build -p tests --bins
//! target/debug/pair-bench [--json] [--rounds 3] [--reads 500] [--keep-logs DIR]
//! ```
//!
//! Measurements, all in milliseconds (targets of the issue in brackets; a repeated one meets
//! its target when its worst sample does):
//!
//! 1. `controller_takeover_ms` [≤ 3000], `--rounds` times: with the pair idle, kill -9 the
//!    serving controller, then call CreateVm on the other controller's own address (10 ms
//!    apart, one request ID) until one succeeds; the time from the kill to that success. Then
//!    `lab up` restarts the killed controller and the bench waits for a healthy pair.
//!    JSON: `{"min", "median", "max", "samples": [..], "attempts": [..]}`.
//! 2. `etcd_leader_kill_write_gap_ms` [≤ 2000]: a loop writes CreateVm then DeleteVm back to
//!    back through the system IP endpoints (each logical request with its own
//!    `x-pairvisor-request-id`, retried with the same ID on UNAVAILABLE, a broken connection or
//!    an attempt's timeout, as pvctl does); after
//!    [`WRITE_BASELINE`] the etcd Raft leader gets kill -9. The number is the longest interval
//!    between two consecutive successful writes that overlaps the [`WRITE_WATCH`] after the
//!    kill (so the interval spanning the kill counts in full). The target is met only if
//!    every request also succeeded. JSON: the number, and `etcd_leader_kill`: `{"leader",
//!    "requests", "writes_ok", "all_succeeded", "retried_attempts", "baseline_write_ms",
//!    "gap_start_ms_after_kill", "failures"}`.
//! 3. `host_lost_detect_ms` [≤ 2000], `--rounds` times: `lab kill-host` the non-serving node
//!    while a task polls ListNodes on the serving controller every [`LOST_POLL`]; the time
//!    from the start of the kill to the node's state LOST (or FENCED). Then `lab restore-host`
//!    and a wait for a healthy pair. JSON: `{"min", "median", "max", "samples"}`, and
//!    `host_lost`: `{"hosts", "states", "etcd_leaders", "kill_command_ms", "back_up_ms"}`
//!    (`etcd_leaders`: etcd's Raft leader before each kill).
//! 4. `api_read_p99_ms_idle` (baseline) and `api_read_p99_ms_under_stall` [≤ 50]: one
//!    unprotected tiny guest runs; `--reads` GetVm calls back to back through the system IP,
//!    first idle, then while its QEMU is frozen (SIGSTOP) and a ShutdownVm (grace 30 s) hangs
//!    in the agent's ACPI call. Latencies count successful reads (nearest-rank percentiles);
//!    the target is met only with no failed read. Then SIGCONT, the guest shuts down, the VM
//!    is deleted. JSON: the two p99s, and `api_read_ms_idle` / `api_read_ms_under_stall`:
//!    `{"p50", "p99", "max", "reads", "errors", "first_error"}`; the latter also has
//!    `shutdown_pending_throughout` (the ShutdownVm still hung after the last read),
//!    `frozen_ms` and `shutdown_outcome`.
//!
//! Also in the JSON: `targets` (the limits), `targets_met` (one bool per metric),
//! `lab_up_s` and `run_s`. One run takes about a minute on a 2-core machine (lab up included).
//!
//! The lab goes down on every exit path (the fixture's drop; Ctrl-C makes the bench stop at
//! its next poll). On failure, or with `--keep-logs`, the daemons' logs and the guests' serial
//!
//! [`WRITE_BASELINE`]: etcd_gap::WRITE_BASELINE
//! [`WRITE_WATCH`]: etcd_gap::WRITE_WATCH
//! [`LOST_POLL`]: host_lost::LOST_POLL

mod api;
mod etcd_gap;
mod host_lost;
mod reads;
mod stats;
mod takeover;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use tests::Lab;
use tokio::runtime::Runtime;

use etcd_gap::WriteGap;
use host_lost::HostLost;
use reads::{Reads, Stall};
use stats::{summary, summary_json, summary_text, tenth};
use takeover::Rounds;

/// The bench's lab: its own prefix and subnets, apart from the e2e tests' labs.
const LAB_PREFIX: &str = "pvbn";
/// Subnet of the bench's lab (`10.200.0.0/24` is management).
const LAB_SUBNET: u8 = 200;
/// The lab's hosts, in the order of `Lab::node_address`.
const HOSTS: [&str; 3] = ["n0", "n1", "w"];
/// Where logs go on failure when `--keep-logs` names no directory.
const FAILURE_LOGS: &str = "/var/tmp/pair-bench-logs";

/// `lab up` restarts daemons (each waits until it listens), the restarted controller
/// campaigns and both nodes report again; a loaded 2-core machine needs margin.
const PAIR_RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a pause of the bench looks whether it was interrupted.
const INTERRUPT_POLL: Duration = Duration::from_millis(100);
/// How often the bench asks whether the pair (or etcd) is healthy again.
const HEALTH_POLL: Duration = Duration::from_millis(200);

/// Target of the issue: the API works again through the other controller within 3 s.
const TAKEOVER_TARGET_MS: f64 = 3000.0;
/// Target of the issue: losing etcd's leader stops writes for at most 2 s.
const WRITE_GAP_TARGET_MS: f64 = 2000.0;
/// Target of the issue: a dead host shows LOST within 2 s.
const HOST_LOST_TARGET_MS: f64 = 2000.0;
/// Target of the issue: reads stay fast (p99) while an agent call hangs.
const READ_P99_TARGET_MS: f64 = 50.0;

/// Set by Ctrl-C: every loop of the bench stops at its next poll, and the lab goes down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Parser)]
#[command(
    name = "pair-bench",
    about = "The pair's speed numbers, on a lab of its own"
)]
struct Cli {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Rounds of the controller takeover and of the host-lost detection.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// GetVm calls per read-latency measurement.
    #[arg(long, default_value_t = 500)]
    reads: usize,
    /// Copy the daemons' and guests' logs here before the lab goes down (always done on
    /// failure, by default to /var/tmp/pair-bench-logs).
    #[arg(long)]
    keep_logs: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping at the next poll, then taking the lab down");
            INTERRUPTED.store(true, Ordering::SeqCst);
        }
    });
    let started = Instant::now();
    let lab = Lab::up(LAB_PREFIX, LAB_SUBNET);
    let lab_up = started.elapsed();
    // Dropped before `lab`: the logs are copied while the lab still exists.
    let mut logs = LogKeeper {
        from: lab.dir().to_path_buf(),
        to: cli.keep_logs.clone(),
        failed: true,
    };
    let measured = measure(&runtime, &lab, &cli);
    logs.failed = measured.is_err();
    let mut report = measured?;
    report.lab_up_s = lab_up.as_secs_f64();
    report.run_s = started.elapsed().as_secs_f64();
    if cli.json {
        println!("{}", report.json());
    } else {
        report.print_table();
    }
    Ok(())
}

/// All four measurements, in order; the pair is healthy between them.
fn measure(runtime: &Runtime, lab: &Lab, cli: &Cli) -> anyhow::Result<Report> {
    let mut takeover = Rounds::default();
    for round in 0..cli.rounds {
        let (ms, attempts) = takeover::round(runtime, lab, round)
            .with_context(|| format!("controller takeover, round {}", round + 1))?;
        takeover.samples.push(ms);
        takeover.attempts.push(attempts);
    }
    let write_gap = etcd_gap::measure(runtime, lab).context("etcd leader kill")?;
    let mut host_lost = HostLost::default();
    for round in 0..cli.rounds {
        host_lost::round(runtime, lab, &mut host_lost)
            .with_context(|| format!("host-lost detection, round {}", round + 1))?;
    }
    let (idle, stall) = reads::measure(runtime, lab, cli.reads).context("API read latency")?;
    Ok(Report {
        takeover,
        write_gap,
        host_lost,
        idle,
        stall,
        lab_up_s: 0.0,
        run_s: 0.0,
    })
}

/// Fails once Ctrl-C was pressed.
fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `duration` on this thread, failing at once when interrupted.
fn pause(duration: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(INTERRUPT_POLL));
    }
}

// ---------------------------------------------------------------------------------------
// The report

/// Everything measured.
#[derive(Debug)]
struct Report {
    takeover: Rounds,
    write_gap: WriteGap,
    host_lost: HostLost,
    idle: Reads,
    stall: Stall,
    lab_up_s: f64,
    run_s: f64,
}

impl Report {
    /// Whether each metric meets its target (see the module doc).
    fn met(&self) -> [(&'static str, bool); 4] {
        let worst = |samples: &[f64]| summary(samples).2;
        [
            (
                "controller_takeover_ms",
                worst(&self.takeover.samples) <= TAKEOVER_TARGET_MS,
            ),
            (
                "etcd_leader_kill_write_gap_ms",
                self.write_gap.gap_ms <= WRITE_GAP_TARGET_MS
                    && self.write_gap.writes.failures.is_empty(),
            ),
            (
                "host_lost_detect_ms",
                worst(&self.host_lost.samples) <= HOST_LOST_TARGET_MS,
            ),
            (
                "api_read_p99_ms_under_stall",
                self.stall.reads.p99 <= READ_P99_TARGET_MS && self.stall.reads.errors == 0,
            ),
        ]
    }

    fn json(&self) -> Value {
        let writes = &self.write_gap.writes;
        let mut takeover = summary_json(&self.takeover.samples);
        takeover["attempts"] = json!(self.takeover.attempts);
        let mut stall = self.stall.reads.json();
        stall["shutdown_pending_throughout"] = json!(self.stall.shutdown_pending_throughout);
        stall["frozen_ms"] = json!(self.stall.frozen_ms.round());
        stall["shutdown_outcome"] = json!(self.stall.shutdown_outcome);
        let met: serde_json::Map<String, Value> = self
            .met()
            .into_iter()
            .map(|(name, met)| (name.to_string(), json!(met)))
            .collect();
        json!({
            "controller_takeover_ms": takeover,
            "etcd_leader_kill_write_gap_ms": tenth(self.write_gap.gap_ms),
            "etcd_leader_kill": {
                "leader": self.write_gap.leader,
                "requests": writes.requests,
                "writes_ok": writes.done.len(),
                "all_succeeded": writes.failures.is_empty(),
                "retried_attempts": writes.retried,
                "baseline_write_ms": tenth(self.write_gap.baseline_ms),
                "gap_start_ms_after_kill": tenth(self.write_gap.gap_start_ms),
                "failures": writes.failures,
            },
            "host_lost_detect_ms": summary_json(&self.host_lost.samples),
            "host_lost": {
                "hosts": self.host_lost.hosts,
                "states": self.host_lost.states,
                "etcd_leaders": self.host_lost.etcd_leaders,
                "kill_command_ms": self.host_lost.kill_command_ms.iter().map(|m| m.round()).collect::<Vec<_>>(),
                "back_up_ms": self.host_lost.back_up_ms.iter().map(|m| m.round()).collect::<Vec<_>>(),
            },
            "api_read_p99_ms_idle": tenth(self.idle.p99),
            "api_read_p99_ms_under_stall": tenth(self.stall.reads.p99),
            "api_read_ms_idle": self.idle.json(),
            "api_read_ms_under_stall": stall,
            "targets": {
                "controller_takeover_ms": TAKEOVER_TARGET_MS,
                "etcd_leader_kill_write_gap_ms": WRITE_GAP_TARGET_MS,
                "host_lost_detect_ms": HOST_LOST_TARGET_MS,
                "api_read_p99_ms_under_stall": READ_P99_TARGET_MS,
            },
            "targets_met": met,
            "lab_up_s": tenth(self.lab_up_s),
            "run_s": tenth(self.run_s),
        })
    }

    fn print_table(&self) {
        let met = self.met();
        let yes = |i: usize| if met[i].1 { "yes" } else { "NO" };
        let writes = &self.write_gap.writes;
        let gap = format!(
            "{:.0} (leader {}; {}/{} requests ok)",
            self.write_gap.gap_ms,
            self.write_gap.leader,
            writes.requests - writes.failures.len(),
            writes.requests
        );
        let stall_note = if self.stall.shutdown_pending_throughout {
            ""
        } else {
            " (shutdown ended early)"
        };
        let rows = [
            (
                "controller_takeover_ms",
                summary_text(&self.takeover.samples),
                "<= 3000",
                yes(0),
            ),
            ("etcd_leader_kill_write_gap_ms", gap, "<= 2000", yes(1)),
            (
                "host_lost_detect_ms",
                summary_text(&self.host_lost.samples),
                "<= 2000",
                yes(2),
            ),
            ("api_read_p99_ms_idle", self.idle.text(), "(baseline)", ""),
            (
                "api_read_p99_ms_under_stall",
                format!("{}{stall_note}", self.stall.reads.text()),
                "<= 50",
                yes(3),
            ),
        ];
        let width = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(5);
        println!(
            "{:<30}  {:<width$}  {:<10}  met",
            "metric", "value", "target"
        );
        for (name, value, target, met) in rows {
            println!("{name:<30}  {value:<width$}  {target:<10}  {met}");
        }
        println!(
            "lab up {:.0} s, whole run {:.0} s; stalled shutdown: {}",
            self.lab_up_s, self.run_s, self.stall.shutdown_outcome
        );
    }
}

// ---------------------------------------------------------------------------------------
// Logs

/// Copies the lab's logs out before it goes down: always to `to` when given, else to
/// [`FAILURE_LOGS`] when the bench failed.
#[derive(Debug)]
struct LogKeeper {
    from: PathBuf,
    to: Option<PathBuf>,
    failed: bool,
}

impl Drop for LogKeeper {
    fn drop(&mut self) {
        let to = match (&self.to, self.failed || std::thread::panicking()) {
            (Some(to), _) => to.clone(),
            (None, true) => PathBuf::from(FAILURE_LOGS),
            (None, false) => return,
        };
        match copy_logs(&self.from, &to) {
            Ok(()) => eprintln!("lab logs copied to {}", to.display()),
            Err(e) => eprintln!("could not copy the lab's logs to {}: {e}", to.display()),
        }
    }
}

/// Copies `<from>/<host>/logs/*` and `<from>/<host>/agent/serial/*` to `<to>/<host>/`.
fn copy_logs(from: &Path, to: &Path) -> std::io::Result<()> {
    for host in HOSTS {
        let target = to.join(host);
        std::fs::create_dir_all(&target)?;
        for dir in ["logs", "agent/serial"] {
            let Ok(entries) = std::fs::read_dir(from.join(host).join(dir)) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                if entry.path().is_file() {
                    std::fs::copy(entry.path(), target.join(entry.file_name()))?;
                }
            }
        }
    }
    Ok(())
}

//! `ft-bench`: what FT checkpointing costs, measured on the agent's FT data path with a
//! 256 MiB tiny guest under TCG ([`tests::ft_rig`]: primary and standby QEMU in one libvirt
//! embed root, the epoch loop and the standby receiver over a Unix socket, the disk mirrored
//! to the agent's epoch-buffered NBD export). Printed as a table, or one JSON object with
//! `--json`. A bench reports; it asserts no timing. Needs root and QEMU:
//!
//! ```text
//! cargo build --release --workspace && target/release/ft-bench [--json] [--seconds 20] [--skip-failover] [--hash-pages]
//! ```
//!
//! 1. The epoch loop runs `--seconds` at the default 50 ms interval (dirty pages found from the
//!    kernel's write marks, or with `--hash-pages` by hashing all of RAM): `pause_ms_p50`,
//!    `pause_ms_p99` [targets ≤ 20, ≤ 60], `pause_breakdown_ms` (p50 of each phase: stop,
//!    output (the serial gate's cut), save, scan, send, ack, net (the epoch's frames sent; the
//!    rig's guest has no NIC), cont), `epochs_per_s`, `dirty_pages_per_epoch_p50`,
//!    `state_bytes_p50`, `state_sent_bytes_p50` (what a commit carries: a delta against the
//!    last acknowledged state after the first), and `initial_copy_ms` (the full RAM copy before the first epoch).
//! 2. The primary's QEMU is killed and the standby activated: `activate_ms` (device state
//!    written, loaded, `cont`) and `kill_to_counter_ms` (kill → the standby's first COUNTER
//!    line; includes what was left of the guest's 1 s sleep). Detection and fencing of a lost
//!    host are not in this data-path bench.
//!
//! 3. Unless `--skip-failover`, the failover in a lab of its own ([`failover`]): from the
//!    primary host's power cut to the failover decided (`failover_decided_ms`), the guest
//!    running on the peer (`failover_resume_ms` [target ≤ 1000], detection included), its
//!    first serial line there (`failover_to_output_ms`) and the first answer over a client's
//!    TCP connection held across it (`failover_to_tcp_answer_ms`); before the cut, that
//!    client's round trip while protected (`tcp_rtt_ms_p50`). The survivor's controller
//!    serves then; `failover_resume_serving_lost_ms` is a second cut that takes the serving
//!    controller down with the host.
//!
//! The guest runs the tiny guest's memory loop (`pv.memloop`: 256 pages rewritten per round)
//! throughout: its rounds per second unprotected (10 s before the epochs) and while
//! checkpointed give `guest_rate_ratio` [target ≥ 0.6].
//!
//! `output_delay_ms_p50` [target ≤ interval + pause p50]: how long each serial line the epochs
//! released was held, from the gate reading it (a socket hop after the guest wrote it) to its
//! release; `output_lines` counts them.

mod failover;

use std::time::{Duration, Instant};

use agent::ft::epoch::{self, EpochReport, Phases, Settings};
use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use tests::ft_rig::{self, FtRig};
use tokio::sync::{mpsc, watch};

/// Targets of the issue.
const PAUSE_P50_TARGET_MS: f64 = 20.0;
const PAUSE_P99_TARGET_MS: f64 = 60.0;
const GUEST_RATE_RATIO_TARGET: f64 = 0.6;

#[derive(Parser, Debug)]
#[command(
    about = "FT checkpoint pause, epoch rate and standby activation on the agent's data path"
)]
struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Seconds of epochs to measure.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Skip the failover in a lab (part 3).
    #[arg(long)]
    skip_failover: bool,
    /// Start QEMU without the FT shim: the epochs hash all of RAM instead of reading the
    /// kernel's write marks (part 1).
    #[arg(long)]
    hash_pages: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut report = runtime.block_on(measure(&args))?;
    if !args.skip_failover {
        let failover = runtime.block_on(failover::measure())?;
        if let (Some(report), Some(failover)) = (report.as_object_mut(), failover.as_object()) {
            report.extend(failover.clone());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn measure(args: &Args) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let preload = (!args.hash_pages).then(tests::ft_shim);
    let rig = FtRig::boot_with(dir.path(), args.memory_mib, "pv.memloop", preload).await;
    // The guest's memory loop alone first: its rounds per second unprotected.
    let log = rig.primary_log();
    let plain_rate = memloop_rate(&log, PLAIN_WINDOW).await?;
    let primary = rig.primary().await;
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    let looping = tokio::spawn(epoch::run(primary, Settings::default(), stop, reports_tx));
    let mut epochs: Vec<EpochReport> = Vec::new();
    let mut first_at = None;
    let mut rounds_at_first = 0;
    let window = Duration::from_secs(args.seconds);
    while first_at.is_none_or(|at: Instant| at.elapsed() < window) {
        let Some(report) = reports.recv().await else {
            bail!("the epoch loop ended: {:?}", looping.await?);
        };
        if first_at.is_none() {
            first_at = Some(Instant::now());
            rounds_at_first = memloop_rounds(&log);
        }
        epochs.push(report);
    }
    // Output is released an epoch late at most: over the window, a rate as exact as above.
    let ft_rate = (memloop_rounds(&log) - rounds_at_first) as f64
        / first_at.map_or(1.0, |at| at.elapsed().as_secs_f64());
    // The first report arrives once the full copy and the first checkpoint are done.
    let initial_copy_ms = first_at.map_or(0.0, |at| ms(at - started));
    let epochs_per_s = epochs.len() as f64 / args.seconds as f64;
    drop(stop_tx);

    let printed = ft_rig::counters(&rig.standby_log()).len();
    let killed = Instant::now();
    rig.kill_primary();
    let _ = looping.await;
    let activated = rig
        .standbys()
        .activate(ft_rig::VM, dir.path())
        .await
        .context("activating the standby")?;
    let activate_ms = killed.elapsed().as_secs_f64() * 1e3;
    ft_rig::wait_counters(&rig.standby_log(), printed + 1).await;
    let kill_to_counter_ms = killed.elapsed().as_secs_f64() * 1e3;

    let pauses: Vec<f64> = epochs.iter().map(|e| ms(e.pause)).collect();
    let phase = |f: fn(&Phases) -> Duration| {
        percentile(
            &epochs.iter().map(|e| ms(f(&e.phases))).collect::<Vec<_>>(),
            50,
        )
    };
    let p50 = percentile(&pauses, 50);
    let p99 = percentile(&pauses, 99);
    let delays: Vec<f64> = epochs
        .iter()
        .flat_map(|e| e.output_delays.iter().map(|d| ms(*d)))
        .collect();
    let output_delay = (!delays.is_empty()).then(|| percentile(&delays, 50));
    // The issue's bound: a line waits out at most the rest of its epoch and one pause.
    let output_delay_target = ms(Settings::default().interval) + p50;
    Ok(json!({
        "memory_mib": args.memory_mib,
        "interval_ms": ms(Settings::default().interval),
        "epochs": epochs.len(),
        "epochs_per_s": round(epochs_per_s),
        "pause_ms_p50": round(p50),
        "pause_ms_p99": round(p99),
        "pause_breakdown_ms": {
            "stop": round(phase(|p| p.stop)),
            "output": round(phase(|p| p.output)),
            "save": round(phase(|p| p.save)),
            "scan": round(phase(|p| p.scan)),
            "send": round(phase(|p| p.send)),
            "ack": round(phase(|p| p.ack)),
            "net": round(phase(|p| p.net)),
            "cont": round(phase(|p| p.cont)),
        },
        "dirty_pages_per_epoch_p50": percentile(&epochs.iter().map(|e| e.dirty_pages as f64).collect::<Vec<_>>(), 50),
        "precopied_pages_total": epochs.iter().map(|e| e.precopied_pages).sum::<usize>(),
        "state_bytes_p50": percentile(&epochs.iter().map(|e| e.state_bytes as f64).collect::<Vec<_>>(), 50),
        "state_sent_bytes_p50": percentile(&epochs.iter().map(|e| e.state_sent as f64).collect::<Vec<_>>(), 50),
        "initial_copy_ms": round(initial_copy_ms),
        "activate_ms": round(activate_ms),
        "activate_load_ms": round(ms(activated.load)),
        "kill_to_counter_ms": round(kill_to_counter_ms),
        "guest_rate_ratio": round_to(ft_rate / plain_rate, 100.0),
        "guest_rounds_per_s_plain": round(plain_rate),
        "guest_rounds_per_s_ft": round(ft_rate),
        "output_delay_ms_p50": output_delay.map(round),
        "output_lines": delays.len(),
        "failover_resume_ms": Value::Null,
        "tcp_rtt_ms_p50": Value::Null,
        "failover_decided_ms": Value::Null,
        "failover_to_output_ms": Value::Null,
        "failover_to_tcp_answer_ms": Value::Null,
        "failover_resume_serving_lost_ms": Value::Null,
        "targets": { "pause_ms_p50": PAUSE_P50_TARGET_MS, "pause_ms_p99": PAUSE_P99_TARGET_MS, "guest_rate_ratio": GUEST_RATE_RATIO_TARGET, "output_delay_ms_p50": round(output_delay_target) },
        "targets_met": { "pause_ms_p50": p50 <= PAUSE_P50_TARGET_MS, "pause_ms_p99": p99 <= PAUSE_P99_TARGET_MS, "guest_rate_ratio": ft_rate / plain_rate >= GUEST_RATE_RATIO_TARGET, "output_delay_ms_p50": output_delay.is_some_and(|d| d <= output_delay_target) },
    }))
}

fn print_table(report: &Value) {
    let row = |name: &str, value: &Value, target: &str| {
        println!("{name:<28} {:>12} {target}", value.to_string());
    };
    println!("{:<28} {:>12} target", "metric", "value");
    row("pause_ms_p50", &report["pause_ms_p50"], "<= 20");
    row("pause_ms_p99", &report["pause_ms_p99"], "<= 60");
    for phase in [
        "stop", "output", "save", "scan", "send", "ack", "net", "cont",
    ] {
        row(
            &format!("  {phase} p50 (ms)"),
            &report["pause_breakdown_ms"][phase],
            "",
        );
    }
    for name in [
        "epochs",
        "epochs_per_s",
        "dirty_pages_per_epoch_p50",
        "precopied_pages_total",
        "state_bytes_p50",
        "state_sent_bytes_p50",
        "initial_copy_ms",
        "activate_ms",
        "activate_load_ms",
        "kill_to_counter_ms",
        "guest_rate_ratio",
        "guest_rounds_per_s_plain",
        "guest_rounds_per_s_ft",
        "output_delay_ms_p50",
        "output_lines",
        "tcp_rtt_ms_p50",
        "failover_decided_ms",
        "failover_resume_ms",
        "failover_to_output_ms",
        "failover_to_tcp_answer_ms",
        "failover_resume_serving_lost_ms",
    ] {
        let target = match name {
            "failover_resume_ms" => "<= 1000",
            "guest_rate_ratio" => ">= 0.6",
            "output_delay_ms_p50" => "<= interval + pause p50",
            _ => "",
        };
        row(name, &report[name], target);
    }
}

/// How long the guest's memory loop runs unprotected to measure its rate.
const PLAIN_WINDOW: Duration = Duration::from_secs(10);

/// The last round the guest's memory loop reported in serial log `path` (`MEMLOOP k`).
fn memloop_rounds(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.trim_matches('\0')
                .strip_prefix("MEMLOOP ")?
                .trim()
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// The memory loop's rounds per second over `window`, from its reports in `path`.
async fn memloop_rate(path: &std::path::Path, window: Duration) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while memloop_rounds(path) == 0 {
        if Instant::now() > deadline {
            bail!(
                "the guest's memory loop reported nothing in {}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (first, started) = (memloop_rounds(path), Instant::now());
    tokio::time::sleep(window).await;
    Ok((memloop_rounds(path) - first) as f64 / started.elapsed().as_secs_f64())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn round(x: f64) -> f64 {
    round_to(x, 10.0)
}

/// `x` rounded to 1/`per` (10: one decimal).
fn round_to(x: f64, per: f64) -> f64 {
    (x * per).round() / per
}

/// The `p`th percentile (nearest rank) of `samples`; 0 when empty.
fn percentile(samples: &[f64], p: usize) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len()).div_ceil(100);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

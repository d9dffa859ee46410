//! `ha-bench`: what HA protection costs and how fast it recovers, measured on one HA tiny
//! guest in a lab of its own (`pvhb`, subnets `10.230.*`), printed as a table, or as one JSON
//! object with `--json`. A bench reports; it asserts no timing. Needs root (network
//! namespaces) and the workspace built:
//!
//! ```text
//! cargo build --workspace && target/debug/ha-bench [--json] [--cycles 3] [--keep-logs DIR]
//! ```
//!
//! The guest is the tiny guest with a second disk: its init then runs a write bench on
//! `/dev/vdb` beside the counter on `/dev/vda` (rounds of 200 4 KiB O_DIRECT writes, each
//! round timed in the guest with ash's `$EPOCHREALTIME`, less the time of the same `dd`
//! writing nothing, printed as `BENCH round=k writes=200 us_per_write=x`; a second's sleep
//! between rounds). The VM has a 16 MiB and a 64 MiB raw disk, mode HA. A sampler task asks
//! the API for the VM and the nodes and reads the guest's serial logs every 50 ms; every
//! number below comes from what it saw, so API-based times have its resolution.
//!
//! 1. `write_latency_mirrored_us`, `write_latency_local_us` (median µs per write), and their
//!    ratio [≤ 1.3], in one boot: `--cycles` times, the VM protected runs 5 rounds, then both
//!    A-Links of its host are cut for 10 s (the mirror breaks, the guest writes on its own
//!    copy, simplex) and healed (the mirror is rebuilt: protected again). A round counts as
//!    mirrored when no cut overlaps it and every sample around it says protected, as local
//!    when it lies inside a cut and every sample says simplex; rounds across a change (the
//!    mirror stalling on the cut links, the resync) count for neither. Cutting the links
//!    rather than stopping the mirror through the agent: the serving controller rebuilds a
//!    stopped mirror within a second, but cannot while the links are down.
//!    Limits: TCG guest, so the emulated CPU time of `dd` is in both numbers (this hides part
//!    of the mirror's cost; on KVM the ratio will be worse); loopback veths, no real RTT.
//! 2. `failover_detect_ms` [≤ 2000], `failover_fence_ms`, `failover_start_ms`,
//!    `failover_first_counter_ms`: `lab kill-host` the VM's host while the sampler asks the
//!    survivor's controller; ms from the start of the kill to the first sample with the VM
//!    not running or its host LOST/FENCED (detect), to the "fence end" (or "fence
//!    fallback") line about it in the controllers' logs (fence, from the log's timestamp;
//!    null when no fence ran), to the first sample with the VM running on the survivor
//!    (start), and to its first COUNTER line there (first counter: the guest booted under TCG
//!    and wrote). The JSON adds the controller's own stamps (`decided_ms`, `running_ms`).
//! 3. `resync_mbps`: MB/s (10^6 bytes) of the mirror's rebuilds, median. While a rebuild is
//!    awaited the sampler also lists the VM host's agent's domains (its mirror jobs); a
//!    rebuild's time runs from the last listing without a live mirror to the first with every
//!    disk's mirror ready (the mirror's set-up included, ±50 ms), its bytes are the jobs'
//!    lengths summed. Limit: QEMU counts the whole disk, but skips unallocated and zero areas
//!    fast, so this is a rate of logical disk bytes, not of bytes on the A-Links (vdb is mostly
//!    written data by the end, vda mostly zeros). Rebuilds: the first sync after the start,
//!    one after each outage, and the one after `lab restore-host`. An incremental rebuild
//!    ends with a verify of every extent, so its rate is low: it copies little and reads all.
//! 4. `resync_bytes_after_10s_outage` (median over the cycles) next to the bytes the guest
//!    wrote in those 10 s (BENCH rounds × writes × 4 KiB and COUNTER lines × 512 B seen in
//!    the outage) and their ratio. The rebuild after an outage is incremental (the dirty
//!    bitmap's 64 KiB granules, as the mirror jobs report them); the first sync and the one
//!    after `restore-host` (a new QEMU on the other side of a failover) are full copies.
//!
//! Also in the JSON: the samples, `targets`, `targets_met`, `lab_up_s` and `run_s`. One run
//! takes about two minutes on a 2-core machine (lab up included). The lab goes down on every
//! exit path; on failure, or with `--keep-logs`, the daemons' logs and the serial logs are
//! copied out first (by default to /var/tmp/ha-bench-logs).

mod failover;
mod latency;
mod report;
mod stats;
mod timeline;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use proto::v1 as pb;
use tests::{GUEST_BOOT_TIMEOUT, Lab, parse_counter, tiny_guest_with_disks};
use tokio::runtime::Runtime;

use latency::wait_resync;
use report::Report;
use timeline::{Sampler, parse_bench};

/// The bench's lab: its own prefix and subnets, apart from the e2e tests' labs.
const LAB_PREFIX: &str = "pvhb";
/// Subnet of the bench's lab (`10.230.0.0/24` is management).
const LAB_SUBNET: u8 = 230;
/// The lab's hosts.
const HOSTS: [&str; 3] = ["n0", "n1", "w"];
/// Where logs go on failure when `--keep-logs` names no directory.
const FAILURE_LOGS: &str = "/var/tmp/ha-bench-logs";
/// The controllers' API port.
pub(crate) const API_PORT: u16 = 7400;
/// The VM's name.
const VM_NAME: &str = "hb";
/// Its disks: the counter's (as every tiny guest) and the write bench's.
const DISK_SIZES: [u64; 2] = [16 << 20, 64 << 20];
/// How often a pause of the bench looks whether it was interrupted.
pub(crate) const INTERRUPT_POLL: Duration = Duration::from_millis(100);

/// Set by Ctrl-C: every loop of the bench stops at its next poll, and the lab goes down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Parser)]
#[command(
    name = "ha-bench",
    about = "HA protection's cost and recovery, on a lab of its own"
)]
struct Cli {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Cycles of protected rounds and a 10 s cut of both A-Links.
    #[arg(long, default_value_t = 3)]
    cycles: usize,
    /// Copy the daemons' and guests' logs here before the lab goes down (always done on
    /// failure, by default to /var/tmp/ha-bench-logs).
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
    let measured = measure(&runtime, &lab, cli.cycles);
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

/// The whole run on one VM: boot and first sync, the cycles, the failover, the restore.
fn measure(runtime: &Runtime, lab: &Lab, cycles: usize) -> anyhow::Result<Report> {
    let vm = runtime.block_on(create_vm(lab))?;
    let sampler = Sampler::start(runtime, lab, &vm);
    sampler.watch_mirrors(true);
    let started = Instant::now();
    runtime.block_on(start_vm(lab))?;
    let node = wait_bench_running(&sampler, started)?;
    let first_sync = wait_resync(&sampler, "start", started, &DISK_SIZES)?;
    eprintln!("VM {VM_NAME} protected on {node}: {first_sync:?}");
    let cycles = latency::run(lab, &sampler, &node, cycles, &DISK_SIZES)?;
    let (failover, killed) = failover::measure(runtime, lab, &sampler)?;
    eprintln!("failover: {failover:?}");
    let classified = latency::classify(&sampler.timeline(), &node, &cycles, killed);
    let restore = failover::restore(lab, &sampler, &failover.victim, &DISK_SIZES)?;
    eprintln!("restore: {restore:?}");
    Ok(Report {
        classified,
        cycles,
        failover,
        first_sync,
        restore,
        lab_up_s: 0.0,
        run_s: 0.0,
    })
}

/// Creates the HA VM with its two disks.
async fn create_vm(lab: &Lab) -> anyhow::Result<pb::Vm> {
    let mut api = lab
        .client_at(&lab.endpoints())
        .await
        .map_err(anyhow::Error::msg)?;
    let request = tiny_guest_with_disks(VM_NAME, pb::ProtectionMode::Ha, &DISK_SIZES);
    Ok(api
        .create_vm(request)
        .await
        .context("CreateVm")?
        .into_inner())
}

async fn start_vm(lab: &Lab) -> anyhow::Result<()> {
    let mut api = lab
        .client_at(&lab.endpoints())
        .await
        .map_err(anyhow::Error::msg)?;
    let request = pb::StartVmRequest { vm: VM_NAME.into() };
    api.start_vm(request).await.context("StartVm")?;
    Ok(())
}

/// Waits for the guest's first COUNTER and BENCH lines; returns the node they came from.
fn wait_bench_running(sampler: &Sampler, started: Instant) -> anyhow::Result<String> {
    let what = "the guest's first COUNTER and BENCH lines (an old tiny guest has no bench)";
    sampler.wait(what, GUEST_BOOT_TIMEOUT, |t| {
        let node = t
            .lines
            .iter()
            .find(|l| parse_counter(&l.text).is_some())?
            .node
            .clone();
        let bench = t
            .lines_after(&node, started)
            .any(|l| parse_bench(&l.text).is_some());
        bench.then_some(node)
    })
}

/// Fails once Ctrl-C was pressed.
pub(crate) fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Whether Ctrl-C was pressed.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Sleeps `duration` on this thread, failing at once when interrupted.
pub(crate) fn pause(duration: Duration) -> anyhow::Result<()> {
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

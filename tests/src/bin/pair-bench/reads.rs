//! Measurement 4, `api_read_p99_ms_idle` and `api_read_p99_ms_under_stall`: one unprotected
//! tiny guest runs; GetVm calls back to back through the system IP, first idle, then while
//! its QEMU is frozen (SIGSTOP) and a ShutdownVm hangs in the agent's ACPI call. Then
//! SIGCONT, the guest shuts down, and the VM is deleted.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::v1 as pb;
use serde_json::{Value, json};
use tests::{ApiAt, Console, GUEST_BOOT_TIMEOUT, Lab, tiny_guest};
use tokio::runtime::Runtime;

use crate::api::{Client, Retrying, connect, remove_vm, wait_pair_healthy, with_id, with_timeout};
use crate::stats::{millis, percentile, tenth};
use crate::{PAIR_RECOVERY_TIMEOUT, check_interrupted};

/// Name of the VM of the read-latency measurement.
const STALL_VM: &str = "stall";
/// Grace period of the ShutdownVm that hangs (the 30 s).
const SHUTDOWN_GRACE_SECONDS: u32 = 30;
/// The hanging ShutdownVm returns after the guest shuts down once resumed, at the latest
/// when the grace period ends and the controller powers the VM off.
const SHUTDOWN_CALL_TIMEOUT: Duration = Duration::from_secs(90);
/// Time for ShutdownVm to reach the agent (the VM shows STOPPING).
const STOPPING_TIMEOUT: Duration = Duration::from_secs(10);
/// After STOPPING shows, time for the agent's ACPI call to reach QEMU's monitor and block.
const HANG_SETTLE: Duration = Duration::from_millis(500);
/// One GetVm during the stall: longer than the shutdown's grace period, so a read queued
/// behind the hanging shutdown shows its whole wait instead of failing.
const READ_TIMEOUT: Duration = Duration::from_secs(40);
/// SIGSTOP takes effect at once; QEMU's threads all stop within milliseconds.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// QEMU writes its PID file before the domain runs; the agent reports RUNNING after that.
const PID_FILE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the bench looks at a file it waits for.
const FILE_POLL: Duration = Duration::from_millis(200);
/// Starting the guest: QEMU starts under TCG and the agent confirms it runs.
const START_GIVE_UP: Duration = Duration::from_secs(120);

/// Latencies of a series of GetVm calls.
#[derive(Debug)]
pub(crate) struct Reads {
    p50: f64,
    pub(crate) p99: f64,
    max: f64,
    reads: usize,
    pub(crate) errors: usize,
    first_error: Option<String>,
}

/// The stalled series, with what the hanging shutdown did.
#[derive(Debug)]
pub(crate) struct Stall {
    pub(crate) reads: Reads,
    /// Whether the ShutdownVm was still unanswered after the last read.
    pub(crate) shutdown_pending_throughout: bool,
    /// How long QEMU was frozen, ms.
    pub(crate) frozen_ms: f64,
    /// How the ShutdownVm ended once QEMU ran again.
    pub(crate) shutdown_outcome: String,
}

/// `count` reads idle, then `count` reads while a shutdown hangs on the frozen guest.
pub(crate) fn measure(
    runtime: &Runtime,
    lab: &Lab,
    count: usize,
) -> anyhow::Result<(Reads, Stall)> {
    let endpoints = lab.api(&lab.endpoints());
    runtime.block_on(wait_pair_healthy(&endpoints, PAIR_RECOVERY_TIMEOUT))?;
    let mut api = Retrying::new(endpoints.clone());
    let vm = runtime.block_on(api.call(tiny_guest(STALL_VM), |mut c, r| async move {
        c.create_vm(r).await
    }))?;
    let console = Console::new(lab, &vm);
    api.give_up = START_GIVE_UP;
    let start = pb::StartVmRequest {
        vm: STALL_VM.into(),
    };
    runtime.block_on(api.call(start, |mut c, r| async move { c.start_vm(r).await }))?;
    // The fixture's wait panics after the timeout; nothing needs cleaning up yet but the lab.
    console.wait_counters(1, GUEST_BOOT_TIMEOUT);
    check_interrupted()?;
    let pid = qemu_pid(lab, &vm)?;
    let client = runtime.block_on(connect(&endpoints))?;
    let idle = runtime.block_on(timed_reads(&client, count))?;
    eprintln!(
        "reads idle: p50 {:.1} / p99 {:.1} / max {:.1} ms",
        idle.p50, idle.p99, idle.max
    );
    let stall = frozen_reads(runtime, lab, &client, pid, count);
    // Whatever happened, the guest runs again (the freeze guard) and the VM goes away.
    let cleaned = runtime.block_on(remove_vm(&mut api, STALL_VM));
    let stall = stall?;
    cleaned?;
    eprintln!(
        "reads during the stall: p50 {:.1} / p99 {:.1} / max {:.1} ms; shutdown: {}",
        stall.reads.p50, stall.reads.p99, stall.reads.max, stall.shutdown_outcome
    );
    Ok((idle, stall))
}

/// Freezes QEMU `pid`, hangs a ShutdownVm on it, times `count` reads, and lets it go.
fn frozen_reads(
    runtime: &Runtime,
    lab: &Lab,
    client: &Client,
    pid: i32,
    count: usize,
) -> anyhow::Result<Stall> {
    let frozen = Frozen::stop(pid)?;
    let shutdown = runtime.spawn({
        let endpoints = lab.api(&lab.endpoints());
        async move { shutdown_call(&endpoints).await }
    });
    // The fixture's wait panics after the timeout: the freeze guard still continues QEMU
    // while the panic unwinds, and the VM goes down with the lab.
    runtime.block_on(lab.wait_vm_state(STALL_VM, pb::VmState::Stopping, STOPPING_TIMEOUT));
    std::thread::sleep(HANG_SETTLE);
    let measured = runtime.block_on(timed_reads(client, count));
    let shutdown_pending_throughout = !shutdown.is_finished();
    let frozen_ms = millis(frozen.since.elapsed());
    drop(frozen);
    let outcome = runtime
        .block_on(shutdown)
        .context("the shutdown call panicked")?;
    let shutdown_outcome = match outcome {
        Ok(vm) => format!("{:?}: {}", vm.state(), vm.state_reason),
        Err(e) => format!("failed: {e:#}"),
    };
    Ok(Stall {
        reads: measured?,
        shutdown_pending_throughout,
        frozen_ms,
        shutdown_outcome,
    })
}

/// ShutdownVm of the stall VM with a 30 s grace, one attempt (it must hang, not be retried).
async fn shutdown_call(endpoints: &ApiAt) -> anyhow::Result<pb::Vm> {
    let mut client = connect(endpoints).await?;
    let message = pb::ShutdownVmRequest {
        vm: STALL_VM.into(),
        grace_seconds: SHUTDOWN_GRACE_SECONDS,
    };
    let id = uuid::Uuid::new_v4().to_string();
    let request = with_id(message, &id, SHUTDOWN_CALL_TIMEOUT)?;
    Ok(client.shutdown_vm(request).await?.into_inner())
}

/// `count` GetVm calls of the stall VM, back to back.
async fn timed_reads(client: &Client, count: usize) -> anyhow::Result<Reads> {
    let mut latencies = Vec::with_capacity(count);
    let mut errors = 0;
    let mut first_error = None;
    for _ in 0..count {
        check_interrupted()?;
        let request = with_timeout(
            pb::GetVmRequest {
                vm: STALL_VM.into(),
            },
            READ_TIMEOUT,
        );
        let started = Instant::now();
        let result = client.clone().get_vm(request).await;
        let took = millis(started.elapsed());
        match result {
            Ok(_) => latencies.push(took),
            Err(status) => {
                errors += 1;
                first_error.get_or_insert_with(|| {
                    format!(
                        "{:?} after {took:.0} ms: {}",
                        status.code(),
                        status.message()
                    )
                });
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Reads {
        p50: percentile(&latencies, 50),
        p99: percentile(&latencies, 99),
        max: latencies.last().copied().unwrap_or(f64::NAN),
        reads: count,
        errors,
        first_error,
    })
}

impl Reads {
    pub(crate) fn json(&self) -> Value {
        json!({
            "p50": tenth(self.p50),
            "p99": tenth(self.p99),
            "max": tenth(self.max),
            "reads": self.reads,
            "errors": self.errors,
            "first_error": self.first_error,
        })
    }

    pub(crate) fn text(&self) -> String {
        let errors = if self.errors == 0 {
            String::new()
        } else {
            format!(" ({} of {} failed)", self.errors, self.reads)
        };
        format!(
            "p50 {:.1} / p99 {:.1} / max {:.1}{errors}",
            self.p50, self.p99, self.max
        )
    }
}

/// PID of the QEMU of `vm`, from its node's libvirt embed root.
fn qemu_pid(lab: &Lab, vm: &pb::Vm) -> anyhow::Result<i32> {
    let file = lab
        .dir()
        .join(&vm.node)
        .join("agent/libvirt/run/qemu")
        .join(format!("{}.pid", vm.name));
    let deadline = Instant::now() + PID_FILE_TIMEOUT;
    let text = loop {
        match std::fs::read_to_string(&file) {
            Ok(text) if !text.trim().is_empty() => break text,
            _ if Instant::now() >= deadline => {
                bail!(
                    "no QEMU PID file {} within {PID_FILE_TIMEOUT:?}",
                    file.display()
                )
            }
            _ => std::thread::sleep(FILE_POLL),
        }
    };
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("PID in {}", file.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("qemu") {
        bail!("PID {pid} from {} is not a QEMU", file.display());
    }
    Ok(pid)
}

/// A QEMU stopped with SIGSTOP; continued (SIGCONT) when dropped, on every path.
#[derive(Debug)]
struct Frozen {
    pid: i32,
    since: Instant,
}

impl Frozen {
    fn stop(pid: i32) -> anyhow::Result<Frozen> {
        signal(pid, libc::SIGSTOP).context("freezing QEMU")?;
        let frozen = Frozen {
            pid,
            since: Instant::now(),
        };
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        while process_state(pid) != Some('T') {
            if Instant::now() >= deadline {
                bail!("QEMU {pid} not stopped {FREEZE_TIMEOUT:?} after SIGSTOP");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = signal(self.pid, libc::SIGCONT) {
            eprintln!("could not continue QEMU {}: {e}", self.pid);
        }
    }
}

/// Sends `sig` to process `pid`, returning the error.
///
/// Not `Lab::signal`: that one finds a lab daemon by its PID file (QEMU is none) and panics
/// on failure, and the freeze guard's SIGCONT runs in a drop, where a panic while another
/// unwinds would abort before the lab goes down.
fn signal(pid: i32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is the QEMU
    // of the bench's own VM, read from its lab's PID file and checked to be a QEMU.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The state letter of a process (`R`, `S`, `T`…), from `/proc/<pid>/stat`.
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

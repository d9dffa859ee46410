//! The lab's daemons: started inside a host's namespace with a PID file, stopped by that PID
//! (after checking its command line still names the lab, so a reused PID is never killed).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long a daemon gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A daemon of the lab.
#[derive(Clone, Debug)]
pub struct Daemon {
    /// Namespace it runs in.
    pub ns: String,
    /// Name for PID and log files, e.g. "n0-agent".
    pub name: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Its log file.
    pub log: PathBuf,
    /// Text its command line must contain to be recognized as ours (the lab directory).
    pub marker: String,
}

/// Path of the PID file of `name`.
pub fn pid_file(pid_dir: &Path, name: &str) -> PathBuf {
    pid_dir.join(format!("{name}.pid"))
}

/// The PID in `pid_file` if that process is alive and its command line contains `marker`.
pub fn running(pid_file: &Path, marker: &str) -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    alive_with_marker(pid, marker).then_some(pid)
}

/// Whether `pid` is a live (non-zombie) process whose command line contains `marker`.
pub fn alive_with_marker(pid: i32, marker: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    !zombie
        && String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .contains(marker)
}

/// Starts `daemon` unless it already runs; returns its PID and whether it was started now.
pub fn ensure(daemon: &Daemon, pid_dir: &Path) -> anyhow::Result<(i32, bool)> {
    let file = pid_file(pid_dir, &daemon.name);
    if let Some(pid) = running(&file, &daemon.marker) {
        return Ok((pid, false));
    }
    fs::create_dir_all(pid_dir).with_context(|| format!("creating {}", pid_dir.display()))?;
    if let Some(parent) = daemon.log.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&daemon.log)
        .with_context(|| format!("opening {}", daemon.log.display()))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &daemon.ns])
        .args(&daemon.argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating the log file handle")?)
        .stderr(log)
        // Its own process group: a Ctrl-C in the terminal that ran `lab up` must not reach it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} in namespace {}", daemon.name, daemon.ns))?;
    let pid = i32::try_from(child.id()).context("PID out of range")?;
    fs::write(&file, format!("{pid}\n")).with_context(|| format!("writing {}", file.display()))?;
    Ok((pid, true))
}

/// Stops the process `pid` if it is ours: SIGTERM, then SIGKILL after a grace period.
pub fn stop(pid: i32, marker: &str) -> std::io::Result<()> {
    if !alive_with_marker(pid, marker) {
        return Ok(());
    }
    signal(pid, libc::SIGTERM)?;
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if !alive_with_marker(pid, marker) {
            return Ok(());
        }
        sleep(Duration::from_millis(50));
    }
    signal(pid, libc::SIGKILL)
}

/// Sends `sig` to `pid`.
#[allow(unsafe_code)]
pub fn signal(pid: i32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; the caller has
    // checked that `pid` is one of the lab's processes.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

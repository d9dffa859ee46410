//! Helpers shared by the integration tests: child peer processes and their events.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use replicator::fault::NetnsPair;
use serde_json::Value;

/// How long a child may take to report `ready` (debug build, loaded CI machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The bench binary, whose hidden `peer` subcommand runs one endpoint.
pub fn peer_exe() -> &'static str {
    env!("CARGO_BIN_EXE_alink-bench")
}

/// Whether namespace tests run: only an explicit `PV_SKIP_E2E=1` skips them (a quick local
/// loop); a machine that cannot run them fails the test rather than passing it silently.
pub fn netns_available(test: &str) -> bool {
    if std::env::var_os("PV_SKIP_E2E").is_some_and(|v| v == "1") {
        println!("PV_SKIP_E2E=1: skipping {test}");
        return false;
    }
    assert!(
        NetnsPair::available(),
        "{test} needs root, iproute2 and nftables to create network namespaces (or set PV_SKIP_E2E=1)"
    );
    true
}

/// One received event with the time it was read.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    pub value: Value,
}

impl Event {
    pub fn name(&self) -> &str {
        self.value
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// A child `alink-bench peer` process; killed by PID when dropped. Its stderr (logs) goes to
/// a file that is printed when the test panics.
pub struct Peer {
    pub name: String,
    child: std::process::Child,
    events: mpsc::Receiver<Event>,
    log: PathBuf,
}

impl Peer {
    /// Starts `alink-bench peer ARGS` in namespace `ns` (or directly when `None`).
    pub fn spawn(name: &str, ns: Option<&str>, args: &[String]) -> Self {
        let mut command = match ns {
            Some(ns) => NetnsPair::command_in(ns, peer_exe()),
            None => Command::new(peer_exe()),
        };
        let log = std::env::temp_dir().join(format!("pvr-{}-{name}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).unwrap();
        command
            .arg("peer")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if tx
                    .send(Event {
                        at: Instant::now(),
                        value,
                    })
                    .is_err()
                {
                    break;
                }
            }
        });
        Self {
            name: name.to_owned(),
            child,
            events,
            log,
        }
    }

    /// The next event named `name`, skipping others; panics on timeout or an `error` event.
    pub fn wait(&self, name: &str, timeout: Duration) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{}: no {name:?} event within {timeout:?}", self.name));
            if event.name() == name {
                return event;
            }
            assert!(
                event.name() != "error" || name == "error",
                "{}: {}",
                self.name,
                event.value
            );
        }
    }

    /// The next event of any name within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// The link addresses from the `ready` event.
    pub fn ready_addrs(&self) -> Vec<String> {
        let ready = self.wait("ready", READY_TIMEOUT);
        ready.value["addrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit; whether it did.
    pub fn exits_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// The log written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "---- {} log (last lines, newest first) ----\n{}",
                self.name,
                tail.join("\n")
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `--link ADDR` for each address.
pub fn link_args(addrs: &[String]) -> Vec<String> {
    addrs
        .iter()
        .flat_map(|addr| ["--link".to_owned(), addr.clone()])
        .collect()
}

/// Owned strings.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

//! HA's data path, first piece: a running tiny guest's disk mirrored by QEMU (`blockdev-mirror`,
//! `copy-mode: write-blocking`) to the agent's NBD replica server; after kill -9 of QEMU, the
//! replica holds every counter the guest printed (each printed line is an acknowledged write).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::nbd::{Export, Exports, serve};
use serde_json::{Value, json};
use tests::{COUNTER_PERIOD_TIMEOUT, GUEST_BOOT_TIMEOUT, parse_counter};

/// Disk size of the guest.
const DISK: u64 = 16 << 20;
/// The mirror of an all-zero 16 MiB disk is ready in ~10 ms idle; allow for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// QEMU creates its QMP socket at once; allow for a loaded machine.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A QEMU process, killed (by its PID, through `Child`) when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A QMP connection: commands in, their returns and events out.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + QMP_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("QMP socket {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(READY_TIMEOUT))
            .unwrap_or_else(|e| panic!("QMP read timeout: {e}"));
        let writer = stream
            .try_clone()
            .unwrap_or_else(|e| panic!("QMP socket: {e}"));
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        qmp.line(); // the greeting
        qmp.execute("qmp_capabilities", &json!({}));
        qmp
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading QMP: {e}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP line {line:?}: {e}"))
    }

    /// Runs `command`; returns its `return`, keeping events that arrive meanwhile.
    fn execute(&mut self, command: &str, arguments: &Value) -> Value {
        let message = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{message}").unwrap_or_else(|e| panic!("writing QMP: {e}"));
        loop {
            let answer = self.line();
            if let Some(value) = answer.get("return") {
                return value.clone();
            }
            assert!(answer.get("error").is_none(), "{command}: {answer}");
            self.events.push(answer);
        }
    }

    /// Waits for event `name` (one that arrived already counts).
    fn wait_event(&mut self, name: &str) -> Value {
        if let Some(event) = self.events.iter().find(|e| e["event"] == name) {
            return event.clone();
        }
        loop {
            let message = self.line();
            if message["event"] == name {
                return message;
            }
        }
    }
}

fn zero_file(path: &Path) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(DISK))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

fn counters(serial: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(parse_counter)
        .collect()
}

fn block0(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
        .trim_matches('\0')
        .trim()
        .to_string()
}

fn image() -> PathBuf {
    let cache = std::env::var_os("PAIRVISOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pairvisor"));
    images::ensure_tiny_guest(&cache).unwrap_or_else(|e| panic!("tiny guest image: {e}"))
}

#[test]
fn write_blocking_mirror_to_the_agents_nbd_server_keeps_every_acknowledged_write() {
    if tests::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (local, replica, serial) = (
        dir.path().join("local.raw"),
        dir.path().join("replica.raw"),
        dir.path().join("serial.log"),
    );
    zero_file(&local);
    zero_file(&replica);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let exports = Exports::default();
    exports.insert("replica", Export::open("replica", &replica, true).unwrap());
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(serve(listener, exports));

    let guest = image();
    let qmp_path = dir.path().join("qmp.sock");
    let qemu = Qemu(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "256", "-smp", "1", "-cpu", "qemu64"])
            .args([
                "-nodefaults",
                "-display",
                "none",
                "-no-user-config",
                "-nic",
                "none",
            ])
            .arg("-kernel")
            .arg(guest.join(images::KERNEL_FILE))
            .arg("-initrd")
            .arg(guest.join(images::INITRD_FILE))
            .args(["-append", "console=ttyS0 quiet panic=-1", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,node-name=lf,filename={},cache.direct=on,aio=threads",
                local.display()
            ))
            .args(["-blockdev", "driver=raw,node-name=local0,file=lf"])
            .args(["-device", "virtio-blk-pci,drive=local0"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting QEMU: {e}")),
    );
    let mut qmp = Qmp::connect(&qmp_path);
    qmp.execute(
        "blockdev-add",
        &json!({"driver": "nbd", "node-name": "peer", "export": "replica",
               "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}),
    );
    qmp.execute(
        "blockdev-mirror",
        &json!({"job-id": "m0", "device": "local0", "target": "peer", "sync": "full",
               "copy-mode": "write-blocking"}),
    );
    qmp.wait_event("BLOCK_JOB_READY");
    let jobs = qmp.execute("query-block-jobs", &json!({}));

    let deadline = Instant::now() + GUEST_BOOT_TIMEOUT + COUNTER_PERIOD_TIMEOUT;
    while counters(&serial).len() < 5 {
        assert!(
            Instant::now() < deadline,
            "the guest printed {:?}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(qemu);
    let printed = counters(&serial);
    let last = printed.last().cloned().unwrap();
    let on_replica = parse_counter(&block0(&replica));

    assert_eq!(jobs[0]["actively-synced"], true, "{jobs}");
    assert!(
        on_replica
            .as_ref()
            .is_some_and(|(n, boot)| *n >= last.0 && *boot == last.1),
        "replica holds {on_replica:?}, the guest printed {last:?}"
    );
}

//! The agent's HA mirror against a real guest: a tiny guest under TCG in a libvirt embed root,
//! its disk mirrored by `agent::mirror` (QMP through libvirt) to the agent's own NBD server on
//! a Unix socket. Checks the typed refusal of an unreachable peer, READY, idempotent start,
//! the guest's writes on the replica, a broken mirror reported FAILED, and a clean stop.
//! Skipped with `PV_SKIP_E2E=1` like the other tests that boot guests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent::domain::{self, Boot, DiskFormat, DomainSpec, DomainType, HostProfile};
use agent::libvirt::Libvirt;
use agent::mirror::{self, DiskMirror, MirrorDisk, MirrorState};
use agent::nbd::{Export, Exports, serve_unix};

const UUID: &str = "5e1d2c3b-4a59-4e68-8f70-a1b2c3d4e5f6";
const NAME: &str = "mirror-qmp-test";
const EXPORT: &str = "replica.raw";
const DISK: u64 = 16 << 20;
/// TCG boots the tiny guest in ~6 s idle; other sessions' guests share the 2 cores.
const GUEST_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// An all-zero 16 MiB disk is in sync within milliseconds idle; allow for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest writes every second; the first write after the export is revoked fails the job.
const FAIL_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);

/// Kills the guest's QEMU by its PID when dropped (it outlives the test process otherwise).
struct Guest {
    pid_file: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

fn image() -> PathBuf {
    let cache = std::env::var_os("PAIRVISOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pairvisor"));
    images::ensure_tiny_guest(&cache).unwrap_or_else(|e| panic!("tiny guest image: {e}"))
}

fn zero_file(path: &Path) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(DISK))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

/// The `COUNTER n boot=id` lines of a serial log or a disk's block 0.
fn counters(text: &str) -> Vec<(u64, String)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.trim_matches('\0').trim().strip_prefix("COUNTER ")?;
            let (n, boot) = rest.split_once(" boot=")?;
            Some((n.parse().ok()?, boot.trim().to_string()))
        })
        .collect()
}

fn block0(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned()
}

fn spec(dir: &Path, local: &Path) -> DomainSpec {
    DomainSpec {
        uuid: UUID.into(),
        name: NAME.into(),
        vcpus: 1,
        memory_mib: 256,
        disks: vec![domain::Disk {
            path: local.to_path_buf(),
            format: DiskFormat::Raw,
        }],
        nics: vec![],
        boot: Boot::Kernel(images::BootImage::open(&image()).unwrap()),
        serial_log: dir.join("serial.log"),
        self_fence: true,
    }
}

/// Polls the mirrors until `done` holds, failing after `timeout`.
async fn wait_mirrors(
    libvirt: &Libvirt,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[DiskMirror]) -> bool,
) -> Vec<DiskMirror> {
    let deadline = Instant::now() + timeout;
    loop {
        let mirrors = mirror::status(libvirt, UUID).await.unwrap();
        if done(&mirrors) {
            return mirrors;
        }
        assert!(Instant::now() < deadline, "{what}: mirrors are {mirrors:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the guest printed at least `n` counters; returns the last one.
async fn wait_counters(serial: &Path, n: usize) -> (u64, String) {
    let deadline = Instant::now() + GUEST_BOOT_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        let printed = counters(&text);
        if printed.len() >= n {
            return printed[printed.len() - 1].clone();
        }
        assert!(Instant::now() < deadline, "the guest printed {text:?}");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_syncs_guest_writes_reports_failure_and_stops_cleanly() {
    if std::env::var_os("PV_SKIP_E2E").is_some_and(|v| v == "1") {
        eprintln!("PV_SKIP_E2E=1: skipping a test that boots a guest");
        return;
    }
    // The agent's log lines, shown when the test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let (local, replica, socket) = (
        dir.path().join("local.raw"),
        dir.path().join(EXPORT),
        dir.path().join("peer-nbd.sock"),
    );
    zero_file(&local);
    zero_file(&replica);
    let exports = Exports::default();
    exports.insert(EXPORT, Export::open(EXPORT, &replica, true).unwrap());
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(serve_unix(listener, exports.clone()));
    let root = dir.path().join("libvirt");
    agent::embed::prepare(&root).unwrap();
    let libvirt = Libvirt::open(&format!("qemu:///embed?root={}", root.display())).unwrap();
    let host = HostProfile {
        domain_type: DomainType::Qemu,
        emulator: "/usr/bin/qemu-system-x86_64".into(),
    };
    let xml = domain::domain_xml(&spec(dir.path(), &local), &host);
    libvirt.define(UUID, xml).await.unwrap();
    let _guest = Guest {
        pid_file: root.join(format!("run/qemu/{NAME}.pid")),
    };
    let started = libvirt.start(UUID).await.unwrap();
    let disks = [MirrorDisk {
        device: "vda".into(),
        export: EXPORT.into(),
        format: DiskFormat::Raw,
    }];

    let unreachable = mirror::start(&libvirt, UUID, &disks, &dir.path().join("nope.sock")).await;
    let after_unreachable = mirror::status(&libvirt, UUID).await.unwrap();
    let first = mirror::start(&libvirt, UUID, &disks, &socket)
        .await
        .unwrap();
    let ready = wait_mirrors(&libvirt, "waiting for READY", READY_TIMEOUT, |m| {
        m.first().is_some_and(|m| m.state == MirrorState::Ready)
    })
    .await;
    let again = mirror::start(&libvirt, UUID, &disks, &socket)
        .await
        .unwrap();
    let printed = wait_counters(&dir.path().join("serial.log"), 3).await;
    let on_replica = counters(&block0(&replica));
    exports.remove(EXPORT).await;
    let failed = wait_mirrors(&libvirt, "waiting for FAILED", FAIL_TIMEOUT, |m| {
        m.first()
            .is_some_and(|m| matches!(m.state, MirrorState::Failed { .. }))
    })
    .await;
    mirror::stop(&libvirt, UUID).await.unwrap();
    let after_stop = mirror::status(&libvirt, UUID).await.unwrap();
    let listed = libvirt.status(UUID).await.unwrap();
    libvirt.destroy(UUID).await.unwrap();
    libvirt.undefine(UUID).await.unwrap();

    assert!(started.self_fence, "self-fence metadata not read back");
    assert!(listed.self_fence);
    assert!(
        matches!(&unreachable, Err(mirror::Error::PeerUnreachable { export, .. }) if export == EXPORT),
        "{unreachable:?}"
    );
    assert!(after_unreachable.is_empty(), "{after_unreachable:?}");
    assert_eq!(first[0].device, "vda");
    assert_eq!(first[0].export, EXPORT);
    assert_eq!(ready[0].length, DISK);
    assert_eq!(again[0].state, MirrorState::Ready, "{again:?}");
    assert!(
        on_replica
            .first()
            .is_some_and(|(n, boot)| *n >= printed.0 && *boot == printed.1),
        "replica holds {on_replica:?}, the guest printed {printed:?}"
    );
    assert!(
        matches!(&failed[0].state, MirrorState::Failed { error } if !error.is_empty()),
        "{failed:?}"
    );
    assert!(after_stop.is_empty(), "{after_stop:?}");
}

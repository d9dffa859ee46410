//! The agent's HA mirror against a real guest: a tiny guest under TCG in a libvirt embed root,
//! its disk mirrored by `agent::mirror` (QMP through libvirt) to the agent's own NBD server on
//! a Unix socket. Checks the typed refusal of an unreachable peer, READY, idempotent start,
//! the guest's writes on the replica, a broken mirror reported FAILED, and a clean stop; then
//! the incremental resync after a break (bytes copied, replica equal to the disk, verify
//! equal), and a tampered replica caught by the verify and rebuilt in full.
//! Skipped with `PV_SKIP_E2E=1` like the other tests that boot guests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent::domain::{self, Boot, DiskFormat, DomainSpec, DomainType, HostProfile};
use agent::libvirt::{self, Libvirt};
use agent::mirror::{self, DiskMirror, MirrorDisk, MirrorState, ResyncMode, Verify};
use agent::nbd::{Export, Exports, serve_unix};

const NODE: &str = "n0";
const EXPORT: &str = "replica.raw";
const DISK: u64 = 16 << 20;
/// Where the tampered-replica check writes garbage: a block the guest never writes.
const TAMPERED_AT: u64 = 8 << 20;
/// TCG boots the tiny guest in ~6 s idle; other sessions' guests share the 2 cores.
const GUEST_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// An all-zero 16 MiB disk is in sync within milliseconds idle; allow for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest writes every second; the first write after the export is revoked fails the job.
const FAIL_TIMEOUT: Duration = Duration::from_secs(60);
/// An incremental resync copies a few granules and verifies 16 MiB (1 MiB reads, ms each);
/// a divergence is declared after about 1.3 s of re-reads. Allow for a loaded machine.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(120);
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

/// A running guest with one raw disk, and an NBD server exporting its replica.
struct Rig {
    dir: tempfile::TempDir,
    uuid: &'static str,
    libvirt: Libvirt,
    exports: Exports,
    local: PathBuf,
    replica: PathBuf,
    socket: PathBuf,
    /// Whether the domain's self-fence metadata was read back when it started.
    started_self_fence: bool,
    _guest: Guest,
}

impl Rig {
    /// Boots domain `name` (`uuid`) with a zeroed disk and serves a zeroed replica.
    async fn boot(uuid: &'static str, name: &str) -> Rig {
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
        agent::embed::prepare(&root, std::path::Path::new(agent::embed::DEFAULT_RAM_DIR)).unwrap();
        let libvirt = Libvirt::open(&format!("qemu:///embed?root={}", root.display())).unwrap();
        let host = HostProfile {
            domain_type: DomainType::Qemu,
            emulator: "/usr/bin/qemu-system-x86_64".into(),
            ft_preload: None,
        };
        let xml = domain::domain_xml(&spec(dir.path(), &local, uuid, name), &host);
        libvirt.define(uuid, xml).await.unwrap();
        let guest = Guest {
            pid_file: root.join(format!("run/qemu/{name}.pid")),
        };
        let started = libvirt.start(uuid).await.unwrap();
        Rig {
            dir,
            uuid,
            libvirt,
            exports,
            local,
            replica,
            socket,
            started_self_fence: started.self_fence,
            _guest: guest,
        }
    }

    async fn start(&self) -> Vec<DiskMirror> {
        let disks = [MirrorDisk {
            device: "vda".into(),
            export: EXPORT.into(),
            format: DiskFormat::Raw,
        }];
        mirror::start(&self.libvirt, NODE, self.uuid, &disks, &self.socket)
            .await
            .unwrap()
    }

    async fn status(&self) -> Vec<DiskMirror> {
        mirror::status(&self.libvirt, NODE, self.uuid)
            .await
            .unwrap()
    }

    /// Polls the mirrors until `done` holds, failing after `timeout`.
    async fn wait_mirrors(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&DiskMirror) -> bool,
    ) -> DiskMirror {
        let deadline = Instant::now() + timeout;
        loop {
            let mirrors = self.status().await;
            if let Some(m) = mirrors.first().filter(|m| done(m)) {
                return m.clone();
            }
            assert!(Instant::now() < deadline, "{what}: mirrors are {mirrors:?}");
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_ready(&self, what: &str, timeout: Duration) -> DiskMirror {
        self.wait_mirrors(what, timeout, |m| m.state == MirrorState::Ready)
            .await
    }

    async fn wait_failed(&self, what: &str) -> DiskMirror {
        self.wait_mirrors(what, FAIL_TIMEOUT, |m| {
            matches!(m.state, MirrorState::Failed { .. })
        })
        .await
    }

    /// Revokes the replica's export (the peer goes away); re-inserts it with `back`.
    async fn revoke(&self) {
        self.exports.remove(EXPORT).await;
    }

    fn back(&self) {
        let export = Export::open(EXPORT, &self.replica, true).unwrap();
        self.exports.insert(EXPORT, export);
    }

    /// Waits until the guest printed `n` more counters than it had.
    async fn wait_more_counters(&self, n: usize) -> (u64, String) {
        let serial = self.dir.path().join("serial.log");
        let had = counters(&std::fs::read_to_string(&serial).unwrap_or_default()).len();
        wait_counters(&serial, had + n).await
    }

    /// Sends one QMP command; QEMU's reply text.
    async fn qmp(&self, command: &'static str) -> String {
        self.libvirt
            .with_monitor(self.uuid, move |m| m.qmp(command))
            .await
            .unwrap_or_else(|e: libvirt::Error| panic!("{command}: {e}"))
    }

    /// Whether the disk's copies are the same, compared with the guest paused (no write in
    /// flight; the write-blocking mirror put every completed one on both).
    async fn copies_equal(&self) -> bool {
        self.qmp(r#"{"execute":"stop"}"#).await;
        let equal = std::fs::read(&self.local).unwrap() == std::fs::read(&self.replica).unwrap();
        self.qmp(r#"{"execute":"cont"}"#).await;
        equal
    }

    async fn destroy(&self) {
        self.libvirt.destroy(self.uuid).await.unwrap();
        self.libvirt.undefine(self.uuid).await.unwrap();
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

fn spec(dir: &Path, local: &Path, uuid: &str, name: &str) -> DomainSpec {
    DomainSpec {
        uuid: uuid.into(),
        name: name.into(),
        vcpus: 1,
        memory_mib: 256,
        disks: vec![domain::Disk {
            path: local.to_path_buf(),
            format: DiskFormat::Raw,
        }],
        nics: vec![],
        boot: Boot::Kernel(images::BootImage::open(&image()).unwrap()),
        serial_log: dir.join("serial.log"),
        vnc: false,
        self_fence: true,
        generation: 1,
        ft: None,
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

fn skip() -> bool {
    let skip = std::env::var_os("PV_SKIP_E2E").is_some_and(|v| v == "1");
    if skip {
        eprintln!("PV_SKIP_E2E=1: skipping a test that boots a guest");
    }
    skip
}

/// The agent's log lines, shown when a test fails.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
}

/// One test, one guest: libvirt's embed driver takes a single root per process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_syncs_stops_cleanly_resyncs_incrementally_and_rebuilds_a_tampered_replica() {
    if skip() {
        return;
    }
    logs();
    let rig = Rig::boot("5e1d2c3b-4a59-4e68-8f70-a1b2c3d4e5f6", "mirror-qmp-test").await;
    let disks = [MirrorDisk {
        device: "vda".into(),
        export: EXPORT.into(),
        format: DiskFormat::Raw,
    }];

    // A first sync (full), a break reported FAILED, a clean stop.
    let nope = rig.dir.path().join("nope.sock");
    let unreachable = mirror::start(&rig.libvirt, NODE, rig.uuid, &disks, &nope).await;
    let after_unreachable = rig.status().await;
    let first = rig.start().await;
    let full = rig.wait_ready("first sync", READY_TIMEOUT).await;
    let again = rig.start().await;
    let printed = rig.wait_more_counters(3).await;
    let on_replica = counters(&block0(&rig.replica));
    rig.revoke().await;
    let failed = rig.wait_failed("first break").await;
    mirror::stop(&rig.libvirt, NODE, rig.uuid).await.unwrap();
    let after_stop = rig.status().await;
    let listed = rig.libvirt.status(rig.uuid).await.unwrap();

    // The guest writes on alone, the peer comes back: the bitmap (kept through the stop)
    // makes the rebuild incremental, and the verify proves the copies equal.
    let written_alone = rig.wait_more_counters(3).await;
    rig.back();
    let resync_started = Instant::now();
    let begun = rig.start().await;
    let incremental = rig.wait_ready("incremental resync", RESYNC_TIMEOUT).await;
    let resync_secs = resync_started.elapsed().as_secs_f64();
    rig.wait_more_counters(2).await;
    let equal_after_incremental = rig.copies_equal().await;
    let resynced_block0 = counters(&block0(&rig.replica));

    // Garbage lands in the replica while the peer is away: the verify catches it, and the
    // rebuild after it is a full copy.
    rig.revoke().await;
    rig.wait_failed("second break").await;
    let garbage = [0xa5u8; 4096];
    let replica = std::fs::OpenOptions::new()
        .write(true)
        .open(&rig.replica)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&replica, &garbage, TAMPERED_AT).unwrap();
    rig.wait_more_counters(1).await;
    rig.back();
    rig.start().await;
    let caught = rig.wait_failed("verify of the tampered replica").await;
    let rebuilt_begun = rig.start().await;
    let rebuilt = rig.wait_ready("full rebuild", RESYNC_TIMEOUT).await;
    let equal_after_rebuild = rig.copies_equal().await;
    rig.destroy().await;

    eprintln!(
        "copied: full {} B, incremental {:?}; incremental resync + verify {resync_secs:.2} s",
        full.length, incremental.resync
    );
    assert!(rig.started_self_fence, "self-fence metadata not read back");
    assert!(listed.self_fence);
    assert!(
        matches!(&unreachable, Err(mirror::Error::PeerUnreachable { export, .. }) if export == EXPORT),
        "{unreachable:?}"
    );
    assert!(after_unreachable.is_empty(), "{after_unreachable:?}");
    assert_eq!(first[0].device, "vda");
    assert_eq!(first[0].export, EXPORT);
    assert_eq!(full.length, DISK);
    assert_eq!(again[0].state, MirrorState::Ready, "{again:?}");
    assert!(
        on_replica
            .first()
            .is_some_and(|(n, boot)| *n >= printed.0 && *boot == printed.1),
        "replica holds {on_replica:?}, the guest printed {printed:?}"
    );
    assert!(
        matches!(&failed.state, MirrorState::Failed { error } if !error.is_empty()),
        "{failed:?}"
    );
    assert!(after_stop.is_empty(), "{after_stop:?}");
    assert_eq!(
        begun[0].resync.as_ref().map(|r| r.mode),
        Some(ResyncMode::Incremental)
    );
    let report = incremental.resync.expect("the incremental resync's report");
    assert!(
        report.copied > 0 && report.copied <= DISK / 16,
        "incremental resync copied {} B of a {DISK} B disk",
        report.copied
    );
    assert_eq!(report.verify, Verify::Equal { extents: 16 });
    assert!(
        equal_after_incremental,
        "replica differs from the disk after the incremental resync"
    );
    assert!(
        resynced_block0
            .first()
            .is_some_and(|(n, boot)| *n > written_alone.0 && *boot == written_alone.1),
        "replica holds {resynced_block0:?}, the guest printed {written_alone:?} alone"
    );
    assert_eq!(
        caught.state,
        MirrorState::Failed {
            error: format!("verify: replica differs at offset {TAMPERED_AT}")
        }
    );
    assert_eq!(
        rebuilt_begun[0].resync.as_ref().map(|r| r.mode),
        Some(ResyncMode::Full)
    );
    assert_eq!(rebuilt.resync.map(|r| r.copied), Some(DISK));
    assert!(
        equal_after_rebuild,
        "replica differs from the disk after the full rebuild"
    );
}

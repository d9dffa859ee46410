//! An FT pair in one libvirt embed root, without the lab: the agent's FT data path end to end.
//! Two replica services ([`agent::replica::Replicas`], "n0" and "n1") joined by two A-Links on
//! loopback, each link through a relay that can be cut (a pulled cable). On n0 a primary tiny
//! guest (RAM in a shared file, its disk mirrored write-blocking over the A-Links to n1's NBD
//! server); on n1 a standby QEMU in `-incoming defer` whose RAM file and disk are the
//! replicas, fed by n1's standby receiver ([`agent::ft::standby`]) from n0's epoch loop
//! ([`agent::ft::epoch`]). Used by the FT data-path tests and `ft-bench`.
//!
//! Every QEMU started is killed by its PID when the rig is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::config::{AlinkConfig, AlinkRole};
use agent::domain::{self, Boot, DiskFormat, DomainSpec, DomainType, FtDomain, HostProfile};
use agent::ft::epoch::{EpochReport, Primary};
use agent::ft::output::OutputGate;
use agent::ft::standby::Standbys;
use agent::libvirt::Libvirt;
use agent::mirror::{self, MirrorDisk, MirrorState};
use agent::replica::Replicas;
use replicator::fault::Relay;

use crate::{GUEST_BOOT_TIMEOUT, complete_lines, parse_counter};

/// The VM (the primary's UUID names it on both sides, as in a real pair).
pub const VM: &str = "6f9a3c1e-0000-4000-8000-00000000f701";
const STANDBY_UUID: &str = "6f9a3c1e-0000-4000-8000-00000000f702";
const EXPORT: &str = "replica.raw";
const DISK: u64 = 16 << 20;
/// Mirror of an all-zero 16 MiB disk: milliseconds idle; allow for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Both sides bring both links up: a debug build on a loaded 2-core machine.
const LINKS_UP: Duration = Duration::from_secs(30);

/// The FT pair.
#[derive(Debug)]
pub struct FtRig {
    dir: PathBuf,
    /// The libvirt connection of both domains.
    pub libvirt: Libvirt,
    /// n0's replica service: the primary's way to the peer.
    pub n0: Replicas,
    /// n1's replica service: the standby's receiver and the replica disk's NBD server.
    pub n1: Replicas,
    /// The relays of the two A-Links (n0 dials n1 through them).
    pub links: Vec<Relay>,
    primary_pid: u32,
    standby_pid: u32,
    primary_ram: PathBuf,
    standby_ram: PathBuf,
    primary_output: Arc<OutputGate>,
    _standby_output: OutputGate,
}

impl FtRig {
    /// Boots the primary (waits for its second counter), starts the standby and the mirror.
    pub async fn boot(dir: &Path, memory_mib: u64) -> FtRig {
        FtRig::boot_with(dir, memory_mib, "", Some(crate::ft_shim())).await
    }

    /// Like [`FtRig::boot`], the guest's kernel command line extended by `cmdline` (e.g.
    /// `pv.memloop` for the tiny guest's memory bench), its QEMU preloading `preload` (the FT
    /// shim; without it the epochs hash all of RAM).
    pub async fn boot_with(
        dir: &Path,
        memory_mib: u64,
        cmdline: &str,
        preload: Option<PathBuf>,
    ) -> FtRig {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let (local, replica) = (dir.join("local.raw"), dir.join(EXPORT));
        zero_file(&local);
        zero_file(&replica);
        let (n0, n1, links) = joined(dir).await;
        n1.export(VM, &[(EXPORT.to_string(), replica.clone())])
            .await
            .expect("exporting the replica");

        let root = dir.join("libvirt");
        agent::embed::prepare(&root, Path::new(agent::embed::DEFAULT_RAM_DIR)).expect("embed root");
        let libvirt = Libvirt::open(&format!("qemu:///embed?root={}", root.display()))
            .expect("libvirt embed root");
        let host = HostProfile {
            domain_type: DomainType::Qemu,
            emulator: "/usr/bin/qemu-system-x86_64".into(),
            ft_preload: preload,
        };
        // The primary's output flows until it is protected; the standby's once it runs.
        let primary_output = Arc::new(
            OutputGate::listen(&dir.join("ftp.serial"), &dir.join("ftp.log"), true)
                .expect("primary serial gate"),
        );
        let standby_output =
            OutputGate::listen(&dir.join("fts.serial"), &dir.join("fts.log"), true)
                .expect("standby serial gate");
        let primary = spec(dir, VM, "ftp", &local, memory_mib, false, cmdline);
        libvirt
            .define(VM, domain::domain_xml(&primary, &host))
            .await
            .expect("define primary");
        libvirt.start(VM).await.expect("start primary");
        let primary_pid = pid(&libvirt, VM).await;
        wait_counters(&dir.join("ftp.log"), 2).await;

        let standby = spec(
            dir,
            STANDBY_UUID,
            "fts",
            &replica,
            memory_mib,
            true,
            cmdline,
        );
        libvirt
            .define(STANDBY_UUID, domain::domain_xml(&standby, &host))
            .await
            .expect("define standby");
        libvirt
            .start_paused(STANDBY_UUID)
            .await
            .expect("start standby");
        let standby_pid = pid(&libvirt, STANDBY_UUID).await;
        let mut qmp = agent::ft::qmp::Qmp::connect_within(&dir.join("fts.qmp"), READY_TIMEOUT)
            .await
            .expect("standby QMP");
        assert_eq!(qmp.status().await.expect("standby status"), "inmigrate");
        drop(qmp);
        let standby_ram = agent::ft::ram_file(standby_pid).expect("standby RAM file");
        n1.standbys()
            .add(VM, &standby_ram, &dir.join("fts.qmp"), n1.exports_of(VM))
            .expect("standby");
        let primary_ram = agent::ft::ram_file(primary_pid).expect("primary RAM file");

        let disks = [MirrorDisk {
            device: "vda".into(),
            export: EXPORT.into(),
            format: DiskFormat::Raw,
        }];
        let (nbd_socket, _) = n0
            .peer_socket_for(VM, |_| None, false)
            .await
            .expect("the peer's NBD socket");
        mirror::start(&libvirt, "n0", VM, &disks, &nbd_socket)
            .await
            .expect("mirror");
        let deadline = Instant::now() + READY_TIMEOUT;
        while !mirror::status(&libvirt, "n0", VM)
            .await
            .expect("mirror status")
            .iter()
            .all(|m| m.state == MirrorState::Ready)
        {
            assert!(Instant::now() < deadline, "the mirror never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        FtRig {
            dir: dir.to_path_buf(),
            libvirt,
            n0,
            n1,
            links,
            primary_pid,
            standby_pid,
            primary_ram,
            standby_ram,
            primary_output,
            _standby_output: standby_output,
        }
    }

    /// Runs the epoch loop at the default settings in the background.
    pub async fn run_epochs(&self) -> Epochs {
        let (reports_tx, reports) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let looping = tokio::spawn(agent::ft::epoch::run(
            self.primary().await,
            agent::ft::epoch::Settings::default(),
            stopped,
            reports_tx,
        ));
        Epochs {
            looping,
            reports,
            _stop: stop,
        }
    }

    /// The standby receiver (on n1).
    pub fn standbys(&self) -> &Standbys {
        self.n1.standbys()
    }

    /// Connects the epoch loop of the primary to the standby, over the A-Links.
    pub async fn primary(&self) -> Primary {
        let socket = self
            .n0
            .peer_ft_socket(VM)
            .await
            .expect("the peer's FT socket");
        Primary::connect(
            VM,
            &self.dir.join("ftp.qmp"),
            self.primary_pid,
            &self.primary_ram,
            &socket,
            &self.dir,
        )
        .await
        .expect("FT primary")
        .hold_output(self.primary_output.clone())
        .await
    }

    /// The primary's serial log: its released output.
    pub fn primary_log(&self) -> PathBuf {
        self.dir.join("ftp.log")
    }

    /// The standby's serial log: its output once it runs.
    pub fn standby_log(&self) -> PathBuf {
        self.dir.join("fts.log")
    }

    /// The counter in block 0 of the standby's disk (the replica).
    pub fn replica_counter(&self) -> Option<(u64, String)> {
        let bytes = std::fs::read(self.dir.join(EXPORT)).ok()?;
        let block = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
        parse_counter(block.trim_matches('\0'))
    }

    /// Kills the primary's QEMU (the host running it dies) and waits until it is gone.
    pub fn kill_primary(&self) {
        kill9(self.primary_pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", self.primary_pid)).exists()
            && !zombie(self.primary_pid)
        {
            assert!(
                Instant::now() < deadline,
                "the primary's QEMU survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for FtRig {
    fn drop(&mut self) {
        kill9(self.primary_pid);
        kill9(self.standby_pid);
        // libvirt removes a domain's RAM directory when it sees the domain stop, which a
        // dropped connection never does: remove them here, or tmpfs fills up run after run.
        for ram in [&self.primary_ram, &self.standby_ram] {
            if let Some(dir) = ram.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// Replica services n0 (dials) and n1 (listens) joined by two A-Links through relays.
async fn joined(dir: &Path) -> (Replicas, Replicas, Vec<Relay>) {
    let (dir0, dir1) = (dir.join("n0"), dir.join("n1"));
    for d in [&dir0, &dir1] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    }
    let loopback = "127.0.0.1:0".parse().expect("loopback address");
    let listen = AlinkConfig {
        role: AlinkRole::Listen,
        links: vec![loopback, loopback],
        tls: None,
    };
    let n1 = Replicas::start("n1", &listen, &dir1, rig_groups(&dir1))
        .await
        .expect("n1's replica service");
    let mut links = Vec::new();
    for addr in n1.link_addrs() {
        links.push(Relay::start(*addr).await.expect("A-Link relay"));
    }
    let connect = AlinkConfig {
        role: AlinkRole::Connect,
        links: links.iter().map(Relay::addr).collect(),
        tls: None,
    };
    let n0 = Replicas::start("n0", &connect, &dir0, rig_groups(&dir0))
        .await
        .expect("n0's replica service");
    let up = n0.wait_links_up(2, LINKS_UP).await && n1.wait_links_up(2, LINKS_UP).await;
    assert!(up, "the A-Links did not come up within {LINKS_UP:?}");
    (n0, n1, links)
}

/// Waits for `n` more committed epochs, failing if the loop ends first.
pub async fn more_epochs(
    reports: &mut tokio::sync::mpsc::UnboundedReceiver<EpochReport>,
    n: usize,
) -> Vec<EpochReport> {
    let mut got = Vec::new();
    while got.len() < n {
        let report = tokio::time::timeout(Duration::from_secs(120), reports.recv())
            .await
            .expect("an epoch within 2 minutes")
            .unwrap_or_else(|| panic!("the epoch loop ended after {} more epochs", got.len()));
        got.push(report);
    }
    got
}

/// An epoch loop running in the background, and its reports.
#[derive(Debug)]
pub struct Epochs {
    /// The loop: its last committed epoch, or why it ended.
    pub looping: tokio::task::JoinHandle<Result<u64, agent::ft::epoch::Error>>,
    /// Each committed epoch.
    pub reports: tokio::sync::mpsc::UnboundedReceiver<EpochReport>,
    _stop: tokio::sync::watch::Sender<bool>,
}

/// Asserts that `seen` is one guest run counting on: one boot id, each counter the last + 1.
pub fn assert_one_run(seen: &[(u64, String)]) {
    let Some((_, boot)) = seen.first() else {
        return;
    };
    assert!(
        seen.iter().all(|(_, b)| b == boot),
        "the guest rebooted: an observer saw {seen:?}"
    );
    for pair in seen.windows(2) {
        assert_eq!(
            pair[1].0,
            pair[0].0 + 1,
            "an observer saw a gap or a repeat: {seen:?}"
        );
    }
}

/// The counter lines of a serial log (complete lines only: CI once read `COUNTER 13 boot=62`
/// half-written and took it for another boot).
pub fn counters(path: &Path) -> Vec<(u64, String)> {
    complete_lines(&std::fs::read(path).unwrap_or_default())
        .iter()
        .filter_map(|l| parse_counter(l.trim_matches('\0')))
        .collect()
}

/// Waits until the serial log holds `n` counter lines; answers them.
pub async fn wait_counters(path: &Path, n: usize) -> Vec<(u64, String)> {
    let deadline = Instant::now() + GUEST_BOOT_TIMEOUT;
    loop {
        let printed = counters(path);
        if printed.len() >= n {
            return printed;
        }
        assert!(
            Instant::now() < deadline,
            "{} holds {} counters, not {n}",
            path.display(),
            printed.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spec(
    dir: &Path,
    uuid: &str,
    name: &str,
    disk: &Path,
    memory_mib: u64,
    standby: bool,
    cmdline: &str,
) -> DomainSpec {
    let cache = std::env::var_os("PAIRVISOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pairvisor"));
    let image = images::ensure_tiny_guest(&cache).expect("tiny guest image");
    let mut image = images::BootImage::open(&image).expect("boot image");
    if !cmdline.is_empty() {
        image.cmdline = format!("{} {cmdline}", image.cmdline);
    }
    DomainSpec {
        uuid: uuid.into(),
        name: name.into(),
        vcpus: 1,
        memory_mib,
        disks: vec![domain::Disk {
            path: disk.to_path_buf(),
            format: DiskFormat::Raw,
        }],
        nics: vec![],
        boot: Boot::Kernel(image),
        serial_log: dir.join(format!("{name}.log")),
        vnc: false,
        self_fence: true,
        generation: 1,
        ft: Some(FtDomain {
            qmp_socket: dir.join(format!("{name}.qmp")),
            serial_socket: dir.join(format!("{name}.serial")),
            standby,
        }),
    }
}

async fn pid(libvirt: &Libvirt, uuid: &str) -> u32 {
    let (pid, _) = libvirt.qemu_pid(uuid).await.expect("QEMU PID");
    u32::try_from(pid).expect("PID")
}

fn zero_file(path: &Path) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(DISK))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

/// A storage group in `dir` for a rig's replica service (its snapshot file receiver).
fn rig_groups(dir: &Path) -> agent::storage::StorageGroups {
    let groups = [("sg0".to_string(), dir.join("sg0"))].into_iter().collect();
    agent::storage::StorageGroups::open(groups).expect("the rig's storage group")
}

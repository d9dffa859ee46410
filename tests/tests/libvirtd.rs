//! The production path end to end: `pv-agent` with `libvirt_uri = "qemu:///system"` on a real
//! libvirtd (and virtlogd), booting the tiny guest under TCG, driven over the agent API alone.
//!
//! ## Whose libvirtd
//!
//! The test starts Debian's libvirtd and virtlogd by hand (`-d`, a PID file and a config file of
//! its own each) and stops them by PID when it ends, on success or panic; it never kills
//! anything by name. They run in a private mount namespace (`unshare --mount`) in which the
//! test's own directories are bind-mounted over the daemons' fixed paths: `/etc/libvirt` (a copy
//! of the host's `*.conf`, so `qemu.conf` is this host's production setting, plus the daemons'
//! log settings), `/run/libvirt` (the sockets `qemu:///system` connects to), `/var/lib/libvirt`,
//! `/var/cache/libvirt` and `/var/log/libvirt`. The agent joins that namespace (`nsenter`), so
//! for it `qemu:///system` is exactly what production uses: the socket under `/run/libvirt`.
//!
//! Why a namespace: a privileged libvirtd's paths are compiled in, so two cannot run side by
//! side, and a libvirtd the test did not start is not the test's to use or stop. On a normal
//! Debian machine, installing `libvirt-daemon-system` enables `libvirtd.socket` and the like
//! (this sandbox's `policy-rc.d` refuses the start and `scripts/install-deps.sh` installs under
//! one of its own; after a reboot systemd listens anyway). Sharing that daemon would make the
//! test depend on its domains, networks and settings, and stopping it would pull it from under
//! whoever uses it; failing whenever it exists would make the test useless on exactly the
//! machines that run it. In the namespace the test's daemons see none of the host's domains,
//! networks, pools or secrets (only its `*.conf`), create no bridge, and the host's libvirtd (if
//! any) never sees them. What the two share is the kernel: the guest's name carries the test's
//! PID, so its cgroup and QEMU process names cannot collide. The host is left as it was, but
//! for the empty mount-point directories (e.g. `/run/libvirt`) if they did not exist.
//!
//! ## Files QEMU needs
//!
//! libvirtd runs QEMU as `libvirt-qemu` with `dynamic_ownership`: it chowns the volume and the
//! kernel and initrd to that user while the guest runs (and restores them after), and opens
//! the serial log itself, handing QEMU a descriptor. QEMU still has to *reach* those files: a
//! temporary directory is created `0700`, so the test opens its top to `0711` (search only),
//! as `/var/lib/pairvisor` (`0755`) is in production. No change to `qemu.conf` is needed.
//! `/dev/kvm` must be open to `libvirt-qemu`, as Debian's udev and packages make it (even for
//! TCG guests): otherwise libvirtd re-probes QEMU on every call, 44 s for one define here;
//! `scripts/install-deps.sh` sees to it.
//!
//! Needs root, `scripts/install-deps.sh` (libvirt-daemon-system, QEMU 10) and a fresh
//! `pv-agent`: `cargo build -p agent -p tests --bins` first. `PV_SKIP_E2E=1` skips it.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::agent as pb;
use proto::agent::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};

use tests::{GUEST_BOOT_TIMEOUT, parse_counter};

/// The agent listens once it has read the versions; on the test's fresh libvirtd that waits
/// for the capability probe of each QEMU binary (8 s measured on 2 idle cores), and a loaded
/// CI machine can take many times that.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// One API call. Under libvirtd a call may wait for a capability re-probe: 4 s per call when
/// libvirt-qemu cannot open /dev/kvm (see scripts/install-deps.sh), 44 s for one define.
const CALL_TIMEOUT: Duration = Duration::from_secs(90);
/// libvirtd and virtlogd create their sockets before `-d` returns; allow a loaded machine.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// On SIGTERM libvirtd closes its drivers and clients before it exits.
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the test reads the guest's console.
const CONSOLE_POLL: Duration = Duration::from_millis(250);
/// GetHostFacts calls: each must answer from what the agent read once.
const FACTS_POLLS: usize = 5;
/// The message `pv-agent` logs when it has read the static facts.
const VERSIONS_READ: &str = "versions read (once)";
/// Lines of each log printed on failure.
const LOG_TAIL_LINES: usize = 80;

/// The directories libvirtd and virtlogd use under their compiled-in paths; the test binds a
/// directory of its own over each, inside the daemons' mount namespace.
const PRIVATE_DIRS: [&str; 5] = [
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/cache/libvirt",
    "/var/log/libvirt",
];

/// Run by `unshare --mount` with the test directory and then [`PRIVATE_DIRS`] as arguments:
/// binds `DIR/libvirt<path>` over each path, then starts virtlogd and libvirtd, which
/// daemonize and keep the namespace alive. `mkdir -p` creates a missing mount point (an
/// empty directory) on the host.
const NAMESPACE_SCRIPT: &str = r#"set -eu
dir=$1
shift
for path; do
  mkdir -p "$path"
  mount --bind "$dir/libvirt$path" "$path"
done
"$VIRTLOGD" -d -f /etc/libvirt/virtlogd.conf -p "$dir/virtlogd.pid"
"$LIBVIRTD" -d -f /etc/libvirt/libvirtd.conf -p "$dir/libvirtd.pid"
"#;
/// The daemons the script starts (Debian's libvirt-daemon-system).
const LIBVIRTD: &str = "/usr/sbin/libvirtd";
const VIRTLOGD: &str = "/usr/sbin/virtlogd";

/// Volume of the guest's counter.
const VOLUME: &str = "pvlv-d0.raw";
const STORAGE_GROUP: &str = "sg0";

/// libvirtd and virtlogd of this test, the agent on them, and the directory holding all
/// their files. Dropping it stops everything by PID (agent, guest, libvirtd, virtlogd),
/// printing the logs first if the test is failing, then removes the directory.
struct System {
    dir: tempfile::TempDir,
    libvirtd: Option<i32>,
    virtlogd: Option<i32>,
    agent: Option<Child>,
}

impl System {
    /// Starts virtlogd and libvirtd in a mount namespace of their own (see the module doc).
    fn start_libvirtd() -> System {
        let dir = tempfile::Builder::new()
            .prefix("pv-libvirtd-")
            .tempdir()
            .expect("creating the test directory");
        // QEMU runs as libvirt-qemu and must reach the volume, kernel and initrd below.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711))
            .expect("opening the test directory to libvirt-qemu");
        let mut system = System {
            dir,
            libvirtd: None,
            virtlogd: None,
            agent: None,
        };
        system.write_daemon_config();
        if Path::new("/run/libvirt/libvirt-sock").exists() {
            eprintln!(
                "a libvirtd of this host listens on /run/libvirt/libvirt-sock; the test's own runs beside it, in its mount namespace"
            );
        }
        let output = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .args(["/bin/sh", "-c", NAMESPACE_SCRIPT, "sh"])
            .arg(system.path())
            .args(PRIVATE_DIRS)
            .env("LIBVIRTD", LIBVIRTD)
            .env("VIRTLOGD", VIRTLOGD)
            .output()
            .expect("running unshare (util-linux)");
        // Whatever started is stopped on drop, even if the other daemon failed.
        system.virtlogd = read_pid(&system.path().join("virtlogd.pid"));
        system.libvirtd = read_pid(&system.path().join("libvirtd.pid"));
        assert!(
            output.status.success(),
            "starting virtlogd and libvirtd failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            system.libvirtd.is_some() && system.virtlogd.is_some(),
            "libvirtd or virtlogd wrote no PID file"
        );
        let run = system.path().join("libvirt/run/libvirt");
        wait_for(
            "libvirtd's and virtlogd's sockets",
            DAEMON_READY_TIMEOUT,
            || run.join("libvirt-sock").exists() && run.join("virtlogd-sock").exists(),
        );
        system
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The daemons' private directories: a copy of the host's `/etc/libvirt/*.conf` (no
    /// domains, networks, pools, secrets or hooks) with log settings of the test's own.
    fn write_daemon_config(&self) {
        let root = self.path().join("libvirt");
        for path in PRIVATE_DIRS {
            let dir = root.join(path.trim_start_matches('/'));
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        fs::create_dir_all(root.join("var/log/libvirt/qemu")).expect("creating the QEMU log dir");
        let etc = root.join("etc/libvirt");
        for entry in fs::read_dir("/etc/libvirt").expect("reading /etc/libvirt") {
            let path = entry.expect("reading /etc/libvirt").path();
            if path.is_file() && path.extension().is_some_and(|e| e == "conf") {
                let to = etc.join(path.file_name().unwrap_or_default());
                fs::copy(&path, &to).unwrap_or_else(|e| panic!("copying {}: {e}", path.display()));
            }
        }
        // libvirtd: warnings of every module; what the QEMU driver (not its monitor traffic) and
        // the security labels do.
        let libvirtd = format!(
            "log_level = 3\nlog_filters = \"3:qemu.qemu_monitor 2:qemu 2:security\"\nlog_outputs = \"1:file:{}\"\n",
            self.path().join("libvirtd.log").display()
        );
        let virtlogd = format!(
            "log_outputs = \"1:file:{}\"\n",
            self.path().join("virtlogd.log").display()
        );
        for (file, text) in [("libvirtd.conf", libvirtd), ("virtlogd.conf", virtlogd)] {
            fs::write(etc.join(file), text).unwrap_or_else(|e| panic!("writing {file}: {e}"));
        }
    }

    /// Starts `pv-agent` in the daemons' namespace on `qemu:///system`, standalone (no etcd),
    /// on 127.0.0.1:`port`, with the tiny guest (built in `image`) in its image library.
    fn start_agent(&mut self, port: u16, image: &Path) {
        let agent = self.path().join("agent");
        let installed = agent.join("images").join(images::TINY_GUEST_NAME);
        fs::create_dir_all(agent.join("images")).expect("creating the image library");
        images::BootImage::install(image, &installed).expect("installing the tiny guest");
        let config = format!(
            "node = \"lv0\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{state}\"\nimage_dir = \"{images}\"\nlibvirt_uri = \"qemu:///system\"\ndomain_type = \"qemu\"\n[storage_groups]\n{STORAGE_GROUP} = \"{group}\"\n",
            state = agent.join("state").display(),
            images = agent.join("images").display(),
            group = agent.join(STORAGE_GROUP).display(),
        );
        let config_path = self.path().join("agent.toml");
        fs::write(&config_path, config).expect("writing agent.toml");
        let log = fs::File::create(self.agent_log()).expect("creating agent.log");
        let libvirtd = self.libvirtd.expect("libvirtd runs");
        let child = Command::new("nsenter")
            .arg(format!("--mount=/proc/{libvirtd}/ns/mnt"))
            .arg("--")
            .arg(agent_binary())
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("duplicating agent.log"))
            .stderr(log)
            .spawn()
            .expect("starting pv-agent through nsenter (util-linux)");
        self.agent = Some(child);
    }

    /// A client of the agent, once it listens; panics if the agent exits first.
    async fn agent_client(&mut self, port: u16) -> AgentClient<Channel> {
        let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("agent URL")
            .connect_timeout(Duration::from_secs(1))
            .timeout(CALL_TIMEOUT);
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if let Ok(channel) = endpoint.connect().await {
                return AgentClient::new(channel);
            }
            let exited = self
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "pv-agent exited ({exited:?}) before listening"
            );
            assert!(
                Instant::now() < deadline,
                "pv-agent did not listen within {} s",
                AGENT_READY_TIMEOUT.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn agent_log(&self) -> PathBuf {
        self.path().join("agent.log")
    }

    /// The PIDs of the guests libvirtd runs (its PID files, in the test's `/run/libvirt`).
    fn guest_pids(&self) -> Vec<i32> {
        let dir = self.path().join("libvirt/run/libvirt/qemu");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pid") && !p.ends_with("driver.pid"))
            .filter_map(|p| fs::read_to_string(p).ok()?.trim().parse().ok())
            .collect()
    }

    fn dump_logs(&self) {
        let mut logs = vec![
            self.agent_log(),
            self.path().join("libvirtd.log"),
            self.path().join("virtlogd.log"),
        ];
        for dir in ["libvirt/var/log/libvirt/qemu", "agent/state/serial"] {
            logs.extend(files_in(&self.path().join(dir)));
        }
        for log in logs {
            let Ok(text) = fs::read_to_string(&log) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "===== {} (last {LOG_TAIL_LINES} lines)",
                log.strip_prefix(self.path()).unwrap_or(&log).display()
            );
            for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                eprintln!("{line}");
            }
        }
    }

    /// Stops a daemon by PID: SIGTERM, then SIGKILL if it outlives the stop timeout.
    fn stop(&self, name: &str, pid: i32) {
        if !self.owns(pid) {
            return;
        }
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + DAEMON_STOP_TIMEOUT;
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            eprintln!("{name} (PID {pid}) ignored SIGTERM; killing it");
            signal(pid, libc::SIGKILL);
        }
    }

    /// Whether `pid` is still a process of this test: its command line names the test's
    /// directory (libvirtd's and virtlogd's PID files, the guest's kernel). Guards against
    /// signalling a reused PID.
    fn owns(&self, pid: i32) -> bool {
        let dir = self.path().to_string_lossy().into_owned();
        fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&dir))
    }
}

impl Drop for System {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        // A guest outlives libvirtd; the test destroys it over the API, this is for a failure.
        for pid in self.guest_pids() {
            if self.owns(pid) {
                eprintln!("killing guest QEMU (PID {pid}) left running");
                signal(pid, libc::SIGKILL);
            }
        }
        if let Some(pid) = self.libvirtd.take() {
            self.stop("libvirtd", pid);
        }
        if let Some(pid) = self.virtlogd.take() {
            self.stop("virtlogd", pid);
        }
    }
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) touches no memory of ours; `pid` is a daemon or guest this test started.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Whether `pid` runs (a zombie counts as gone: the daemons are not our children).
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// The PID in a daemon's PID file, if it wrote one.
fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

fn wait_for(what: &str, timeout: Duration, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "no {what} within {} s",
            timeout.as_secs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `pv-agent` in the target directory, found as tests/src/lib.rs finds the workspace's binaries.
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("locating the test binary");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("pv-agent"))
        .unwrap_or_else(|| panic!("no target directory above {}", exe.display()));
    assert!(
        bin.is_file(),
        "{} is missing: cargo build -p agent -p tests --bins",
        bin.display()
    );
    bin
}

/// Where the tests cache the tiny guest (as tests/src/lib.rs and `pvctl lab` do).
fn cache_dir() -> PathBuf {
    std::env::var_os("PAIRVISOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pairvisor"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port on 127.0.0.1")
}

/// The authority of a serving controller at term 1.
fn fence() -> Option<pb::Fence> {
    Some(pb::Fence {
        term: 1,
        generation: 1,
    })
}

fn command(uuid: &str) -> pb::DomainCommand {
    pb::DomainCommand {
        uuid: uuid.into(),
        fence: fence(),
        track_writes: false,
        resume_standby: false,
    }
}

/// The whole serial log, read through the agent's StreamSerial (no follow).
async fn console(agent: &mut AgentClient<Channel>, uuid: &str) -> String {
    let mut stream = agent
        .stream_serial(pb::StreamSerialRequest {
            uuid: uuid.into(),
            tail_bytes: u64::MAX,
            follow: false,
        })
        .await
        .expect("StreamSerial")
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.expect("reading the serial stream") {
        bytes.extend_from_slice(&chunk.data);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Waits until the console shows `count` COUNTER lines; returns them.
async fn wait_counters(
    agent: &mut AgentClient<Channel>,
    uuid: &str,
    count: usize,
) -> Vec<(u64, String)> {
    let deadline = Instant::now() + GUEST_BOOT_TIMEOUT;
    loop {
        let text = console(agent, uuid).await;
        let counters: Vec<(u64, String)> = text.lines().filter_map(parse_counter).collect();
        if counters.len() >= count {
            return counters;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} COUNTER lines within {} s; console:\n{text}",
            counters.len(),
            GUEST_BOOT_TIMEOUT.as_secs()
        );
        tokio::time::sleep(CONSOLE_POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_on_system_libvirtd_boots_guest_and_reads_versions_once() {
    if tests::skip() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test starts libvirtd: run it as root (or set PV_SKIP_E2E=1)"
    );
    assert!(
        Path::new(LIBVIRTD).is_file() && Path::new(VIRTLOGD).is_file(),
        "{LIBVIRTD} or {VIRTLOGD} is missing: run scripts/install-deps.sh (libvirt-daemon-system)"
    );
    let image = images::ensure_tiny_guest(&cache_dir()).expect("building the tiny guest");
    let mut system = System::start_libvirtd();
    let port = free_port();
    let agent_started = Instant::now();
    system.start_agent(port, &image);
    let mut agent = system.agent_client(port).await;
    let serving_after = agent_started.elapsed();
    let uuid = format!("6c1b0d5e-7a11-4d3e-9f00-{:012x}", std::process::id());
    let name = format!("pvlv-{}", std::process::id());

    // A volume, a domain for the tiny guest without NICs, started.
    let define_called = Instant::now();
    let volume = agent
        .create_volume(pb::CreateVolumeRequest {
            storage_group: STORAGE_GROUP.into(),
            name: VOLUME.into(),
            size_bytes: 16 << 20,
            format: pb::VolumeFormat::Raw.into(),
            vm_uuid: uuid.clone(),
            fence: fence(),
        })
        .await
        .expect("CreateVolume")
        .into_inner();
    let defined = agent
        .define_domain(pb::DefineDomainRequest {
            spec: Some(pb::VmSpec {
                uuid: uuid.clone(),
                name: name.clone(),
                vcpus: 1,
                memory_mib: 256,
                disks: vec![pb::DiskSpec {
                    storage_group: STORAGE_GROUP.into(),
                    volume: VOLUME.into(),
                    format: pb::VolumeFormat::Raw.into(),
                }],
                nics: vec![],
                boot: Some(pb::vm_spec::Boot::KernelImage(
                    images::TINY_GUEST_NAME.into(),
                )),
                self_fence: false,
                ft: false,
            }),
            fence: fence(),
        })
        .await
        .expect("DefineDomain")
        .into_inner();
    let define_took = define_called.elapsed();
    let start_called = Instant::now();
    let started = agent
        .start_domain(command(&uuid))
        .await
        .expect("StartDomain")
        .into_inner();
    let start_took = start_called.elapsed();
    let first = wait_counters(&mut agent, &uuid, 1).await;
    let first_counter_after = agent_started.elapsed();
    let boot_after_start = start_called.elapsed();
    let counters = wait_counters(&mut agent, &uuid, 3).await;
    eprintln!(
        "agent: serving {:.1} s after start; CreateVolume + DefineDomain took {:.1} s, StartDomain {:.1} s; first COUNTER {:.1} s after the agent started, {:.1} s after StartDomain was called",
        serving_after.as_secs_f64(),
        define_took.as_secs_f64(),
        start_took.as_secs_f64(),
        first_counter_after.as_secs_f64(),
        boot_after_start.as_secs_f64()
    );

    // Static facts: every poll reports the versions, read once at start.
    let mut facts = Vec::new();
    for _ in 0..FACTS_POLLS {
        let reply = agent
            .get_host_facts(pb::GetHostFactsRequest {})
            .await
            .expect("GetHostFacts")
            .into_inner();
        facts.push(reply);
    }
    let agent_log = fs::read_to_string(system.agent_log()).expect("reading agent.log");

    // Clean up over the API: destroy, undefine, delete the volume.
    let destroyed = agent
        .destroy_domain(command(&uuid))
        .await
        .expect("DestroyDomain")
        .into_inner();
    agent
        .undefine_domain(command(&uuid))
        .await
        .expect("UndefineDomain");
    agent
        .delete_volume(pb::DeleteVolumeRequest {
            storage_group: STORAGE_GROUP.into(),
            name: VOLUME.into(),
            vm_uuid: uuid.clone(),
            fence: fence(),
        })
        .await
        .expect("DeleteVolume");
    let listed = agent
        .list_domains(pb::ListDomainsRequest {})
        .await
        .expect("ListDomains")
        .into_inner();

    assert_eq!(defined.state(), pb::DomainState::Shutoff);
    assert_eq!(started.state(), pb::DomainState::Running);
    assert_eq!(first[0].0, 1, "a fresh volume counts from 1: {first:?}");
    let numbers: Vec<u64> = counters.iter().map(|(n, _)| *n).collect();
    let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(numbers, expected, "COUNTER numbers are not consecutive");
    assert!(
        counters.iter().all(|(_, boot)| *boot == counters[0].1),
        "more than one boot id: {counters:?}"
    );
    for reply in &facts {
        assert!(
            reply.qemu_version.starts_with("10."),
            "QEMU version {:?}",
            reply.qemu_version
        );
        assert!(
            reply.libvirt_version.starts_with("9."),
            "libvirt version {:?}",
            reply.libvirt_version
        );
        assert_eq!(reply.libvirt_uri, "qemu:///system");
        assert_eq!(reply.domain_type, "qemu");
        assert!(
            reply
                .boot_images
                .contains(&images::TINY_GUEST_NAME.to_string()),
            "boot images {:?}",
            reply.boot_images
        );
    }
    assert_eq!(
        agent_log.matches(VERSIONS_READ).count(),
        1,
        "the agent must read the versions exactly once"
    );
    assert_eq!(destroyed.state(), pb::DomainState::Shutoff);
    assert!(
        !Path::new(&volume.path).exists(),
        "volume {} left behind",
        volume.path
    );
    assert!(
        listed.domains.is_empty(),
        "domains left: {:?}",
        listed.domains
    );
    assert!(
        system.guest_pids().is_empty(),
        "libvirtd still has a guest PID file"
    );
}

//! End-to-end fixture: a whole Pairvisor lab (network namespaces, etcd, agents, controllers,
//! real QEMU guests under TCG), brought up with `pvctl lab up` under a prefix and subnet of
//! its own, and torn down by PID with `pvctl lab down` when dropped. On a failing test the
//! drop prints the daemons' logs and the guests' serial consoles.
//!
//! These tests need root (namespaces) and the packages of `scripts/install-deps.sh`. Set
//! `PV_SKIP_E2E=1` to skip them in a quick local loop.

pub mod browser;
pub mod client;
pub mod disk;
pub mod ft_rig;
pub mod ha;
pub mod http;
mod pair;

pub use pair::Spinner;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use proto::auth::{Bearer, Token};
use proto::v1 as pb;
use proto::v1::pairvisor_client::PairvisorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A client of a lab's API whose calls carry a token.
pub type Client = PairvisorClient<InterceptedService<Channel, Bearer>>;

/// A lab's API at some of its endpoints, trusting the lab's CA and presenting its admin
/// token: cheap to clone into a task that must not borrow the lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiAt {
    endpoints: String,
    ca: PathBuf,
    token: PathBuf,
}

impl ApiAt {
    /// A client of the first endpoint that accepts a connection within `connect`; each call
    /// gives up after `call`.
    pub async fn connect(&self, connect: Duration, call: Duration) -> Result<Client, String> {
        let token = std::fs::read_to_string(&self.token)
            .map_err(|e| format!("{}: {e}", self.token.display()))?;
        let bearer = Token::parse(&token)
            .map_err(|e| format!("{}: {e}", self.token.display()))?
            .bearer();
        self.connect_as(bearer, connect, call).await
    }

    /// Like [`ApiAt::connect`], presenting `bearer` instead of the lab's admin token.
    pub async fn connect_as(
        &self,
        bearer: Bearer,
        connect: Duration,
        call: Duration,
    ) -> Result<Client, String> {
        let ca = std::fs::read(&self.ca).map_err(|e| format!("{}: {e}", self.ca.display()))?;
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        let mut errors = Vec::new();
        for address in self.endpoints.split(',') {
            let endpoint = Endpoint::from_shared(format!("https://{address}"))
                .and_then(|e| e.tls_config(tls.clone()))
                .map_err(|e| e.to_string())?
                .connect_timeout(connect)
                .timeout(call);
            // The connect timeout covers TCP only: a stopped controller (SIGSTOP) accepts the
            // connection in its kernel and never answers the TLS handshake.
            match tokio::time::timeout(connect, endpoint.connect()).await {
                Ok(Ok(channel)) => {
                    return Ok(PairvisorClient::with_interceptor(channel, bearer));
                }
                Ok(Err(e)) => errors.push(format!("{address}: {e}")),
                Err(_) => errors.push(format!("{address}: no TLS handshake within {connect:?}")),
            }
        }
        Err(errors.join("; "))
    }
}

/// A TCG guest prints its first COUNTER 7–9 s after start on an idle 2-core machine; allow
/// for a loaded CI machine.
pub const GUEST_BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The guest writes a counter line every ~1 s.
pub const COUNTER_PERIOD_TIMEOUT: Duration = Duration::from_secs(20);
/// Lease TTL (3 s) + campaign + state load, with margin for a loaded machine.
pub const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether the end-to-end tests should be skipped (`PV_SKIP_E2E=1`).
pub fn skip() -> bool {
    if std::env::var_os("PV_SKIP_E2E").is_some_and(|v| v == "1") {
        eprintln!("PV_SKIP_E2E=1: skipping an end-to-end test");
        return true;
    }
    false
}

/// A running lab.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    subnet: u8,
    dir: PathBuf,
    bin: PathBuf,
}

impl Lab {
    /// Brings up a lab named `prefix` on subnets `10.subnet.0.0/24`…, panicking with the
    /// lab's output if it fails.
    pub fn up(prefix: &str, subnet: u8) -> Lab {
        // SAFETY: geteuid has no preconditions.
        #[allow(unsafe_code)]
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "end-to-end tests create network namespaces: run them as root (or set PV_SKIP_E2E=1)"
        );
        let lab = Lab {
            prefix: prefix.to_string(),
            subnet,
            dir: PathBuf::from(format!("/var/tmp/pairvisor-test-{prefix}")),
            bin: bin_dir(),
        };
        // A previous run killed hard may have left its lab behind.
        let _ = lab.lab(&["down"]);
        let started = Instant::now();
        let output = lab.lab(&["up"]);
        assert!(
            output.status.success(),
            "pvctl lab up failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!(
            "lab {prefix} up in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        lab
    }

    fn lab(&self, args: &[&str]) -> Output {
        let subnet = self.subnet.to_string();
        let dir = self.dir.to_string_lossy().into_owned();
        let mut all = vec!["lab"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--prefix", &self.prefix, "--subnet", &subnet, "--dir", &dir]);
        Command::new(self.bin.join("pvctl"))
            .args(&all)
            .env("PAIRVISOR_CACHE", cache_dir())
            .output()
            .unwrap_or_else(|e| panic!("running pvctl: {e}"))
    }

    /// Starts whatever the lab lacks (e.g. a daemon a test killed); panics on failure.
    pub fn repair(&self) {
        let output = self.lab(&["up"]);
        assert!(
            output.status.success(),
            "pvctl lab up (repair) failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs `pvctl lab ARGS` for this lab, panicking with its output unless it succeeds.
    fn lab_ok(&self, args: &[&str]) {
        let output = self.lab(args);
        assert!(
            output.status.success(),
            "pvctl lab {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Cuts the power of node `host` ("n0" or "n1"): every process in its namespace, guests
    /// included, gets SIGKILL and its links go down.
    pub fn kill_host(&self, host: &str) {
        self.lab_ok(&["kill-host", host]);
    }

    /// Powers node `host` on again: links up, then its etcd member, agent and controller.
    pub fn restore_host(&self, host: &str) {
        self.lab_ok(&["restore-host", host]);
    }

    /// Drops every packet between node `host` and the other node and the system IP, and the
    /// witness too unless `keep_witness` (links stay up).
    pub fn isolate(&self, host: &str, keep_witness: bool) {
        let mut args = vec!["isolate", host];
        if keep_witness {
            args.push("--keep-witness");
        }
        self.lab_ok(&args);
    }

    /// Holds what node `host` sends on role link `path` (`priv0`, `alink1` or `alink2`) to
    /// `bytes_per_second`, queued rather than dropped, until `heal`.
    pub fn slow_path(&self, host: &str, path: &str, bytes_per_second: u64) {
        let rate = bytes_per_second.to_string();
        self.lab_ok(&["slow-path", host, path, "--bytes-per-second", &rate]);
    }

    /// Makes node `host`'s BMC unreachable (its management switch port goes down) until `heal`.
    pub fn cut_bmc(&self, host: &str) {
        self.lab_ok(&["cut-bmc", host]);
    }

    /// Removes every `isolate` and `cut_path` fault and reconnects cut BMCs.
    pub fn heal(&self) {
        self.lab_ok(&["heal"]);
    }

    /// Drops one path (`priv0`, `alink1`, `alink2` or `mgmt`) between node `host` and the
    /// other node; cuts add up until `heal`.
    pub fn cut_path(&self, host: &str, path: &str) {
        self.lab_ok(&["cut-path", host, path]);
    }

    /// The namespace of the business network's client (a user's PC), as `pvctl lab` names it.
    pub fn client_ns(&self) -> String {
        format!("{}-c", self.prefix)
    }

    /// Management address of node `index` (0 or 1), or of the witness (2).
    pub fn node_address(&self, index: u8) -> String {
        format!("10.{}.0.{}", self.subnet, 11 + index)
    }

    /// The API endpoints: system IP first, then both controllers.
    pub fn endpoints(&self) -> String {
        format!(
            "10.{s}.0.10:7400,10.{s}.0.11:7400,10.{s}.0.12:7400",
            s = self.subnet
        )
    }

    /// Runs `pvctl ARGS` against this lab.
    pub fn pvctl(&self, args: &[&str]) -> Output {
        self.pvctl_env(args, &[])
    }

    /// Runs `pvctl ARGS` against this lab with `env` set on top of the lab's.
    pub fn pvctl_env(&self, args: &[&str], env: &[(&str, &Path)]) -> Output {
        Command::new(self.bin.join("pvctl"))
            .args(args)
            .env("PVCTL_ENDPOINT", self.endpoints())
            .env("PVCTL_CA", self.api(&self.endpoints()).ca)
            .env("PVCTL_TOKEN_FILE", self.admin_token())
            .env_remove("PVCTL_TOKEN")
            .envs(env.iter().copied())
            .output()
            .unwrap_or_else(|e| panic!("running pvctl: {e}"))
    }

    /// The file holding the lab's first admin token.
    pub fn admin_token(&self) -> PathBuf {
        self.dir.join("pki").join("admin.token")
    }

    /// An API client connected to the first endpoint of `endpoints` that answers.
    pub async fn client_at(&self, endpoints: &str) -> Result<Client, String> {
        self.api(endpoints)
            .connect(Duration::from_secs(1), Duration::from_secs(120))
            .await
    }

    /// The API at `endpoints` (host:port, comma separated) of this lab, over TLS.
    pub fn api(&self, endpoints: &str) -> ApiAt {
        ApiAt {
            endpoints: endpoints.to_string(),
            ca: self.dir.join("pki").join("ca.pem"),
            token: self.admin_token(),
        }
    }

    /// An API client through the usual endpoints.
    pub async fn client(&self) -> Client {
        self.client_at(&self.endpoints())
            .await
            .unwrap_or_else(|e| panic!("no API endpoint answers: {e}"))
    }

    /// PID of a lab daemon, e.g. `pid("n0-agent")`.
    pub fn pid(&self, daemon: &str) -> i32 {
        let file = self.dir.join("pids").join(format!("{daemon}.pid"));
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("PID in {}: {e}", file.display()))
    }

    /// Sends SIGKILL to a lab daemon and waits until it is gone.
    pub fn kill9(&self, daemon: &str) {
        kill_and_wait(self.pid(daemon), daemon);
    }

    /// Sends SIGKILL to a running guest's QEMU (only it: its host lives on) and waits until it
    /// is gone.
    pub fn kill_qemu(&self, vm: &pb::Vm) {
        kill_and_wait(self.qemu_pid(vm), &format!("QEMU of {}", vm.name));
    }

    /// Path of a VM's volume on `node` ("n0" or "n1").
    pub fn volume_path(&self, node: &str, volume: &str) -> PathBuf {
        self.dir.join(node).join("storage/sg0").join(volume)
    }

    /// The counter block at the start of a VM's first disk: `(n, boot id)`.
    pub fn disk_counter(&self, vm: &pb::Vm) -> Option<(u64, String)> {
        let path = self.volume_path(&vm.node, &vm.disks.first()?.volume);
        let bytes = std::fs::read(path).ok()?;
        let block = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
        parse_counter(block.trim_matches('\0'))
    }

    /// PID of a running guest's QEMU on its node (from the embed root's PID file).
    fn qemu_pid(&self, vm: &pb::Vm) -> i32 {
        let file = self.qemu_pid_file(vm);
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", file.display()))
    }

    /// libvirt's PID file of `vm`'s QEMU on its node (there while the domain runs).
    fn qemu_pid_file(&self, vm: &pb::Vm) -> PathBuf {
        self.dir
            .join(&vm.node)
            .join("agent/libvirt/run/qemu")
            .join(format!("{}.pid", vm.name))
    }

    /// Whether a QEMU of `vm` (or of its FT standby) runs on `vm.node`: libvirt's PID file
    /// names a live process.
    pub fn qemu_runs(&self, vm: &pb::Vm) -> bool {
        std::fs::read_to_string(self.qemu_pid_file(vm))
            .is_ok_and(|pid| Path::new("/proc").join(pid.trim()).exists())
    }

    /// Path of a guest's serial log on its node.
    pub fn serial_log(&self, vm: &pb::Vm) -> PathBuf {
        self.dir
            .join(&vm.node)
            .join("agent/serial")
            .join(format!("{}.log", vm.uuid))
    }

    fn dump_logs(&self) {
        for host in ["n0", "n1", "w"] {
            for kind in ["controller", "agent", "etcd", "bmc", "bmc-hook"] {
                let path = self.dir.join(host).join("logs").join(format!("{kind}.log"));
                if let Ok(text) = std::fs::read_to_string(&path) {
                    eprintln!("===== {} (last 60 lines)", path.display());
                    let lines: Vec<&str> = text.lines().collect();
                    for line in &lines[lines.len().saturating_sub(60)..] {
                        eprintln!("{line}");
                    }
                }
            }
            for log in glob(&self.dir.join(host).join("agent/serial")) {
                eprintln!("===== serial {}", log.display());
                eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let output = self.lab(&["down"]);
        if !output.status.success() {
            eprintln!(
                "pvctl lab down failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

fn glob(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Sends SIGKILL to `pid` (`what`, for messages) and waits until it is gone.
fn kill_and_wait(pid: i32, what: &str) {
    // SAFETY: kill(2) touches no memory of ours; `pid` comes from a lab PID file.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (PID {pid}) survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The directory of the workspace's binaries: next to the test's `deps` directory, or the
/// directory of a binary of this crate itself (`pair-bench` in `target/debug`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("locating the test binary: {e}"));
    let own = exe.parent().filter(|dir| dir.join("pvctl").is_file());
    let dir = own
        .or_else(|| exe.parent().and_then(Path::parent))
        .unwrap_or_else(|| panic!("no target directory above {}", exe.display()))
        .to_path_buf();
    for bin in ["pvctl", "pv-agent", "pv-controller"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: build the workspace first (cargo build --workspace)",
            dir.join(bin).display()
        );
    }
    dir
}

/// The FT shim built with the workspace's binaries (`cargo build --workspace`).
pub fn ft_shim() -> PathBuf {
    let shim = bin_dir().join(agent::ft::SHIM_FILE);
    assert!(
        shim.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        shim.display()
    );
    shim
}

/// Where the tests cache the tiny guest (built once per machine).
fn cache_dir() -> PathBuf {
    std::env::var_os("PAIRVISOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pairvisor"))
}

/// A create request for the tiny guest: unprotected, 1 vCPU, 256 MiB, one 16 MiB raw disk in
/// sg0, no NIC. Tests change what they need with struct update syntax.
pub fn tiny_guest(name: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        name: name.into(),
        mode: pb::ProtectionMode::Unprotected.into(),
        vcpus: 1,
        memory_mib: 256,
        disks: vec![pb::DiskRequest {
            size_bytes: 16 << 20,
            storage_group: "sg0".into(),
            format: pb::DiskFormat::Raw.into(),
        }],
        networks: vec![],
        boot: Some(pb::create_vm_request::Boot::KernelImage("tiny".into())),
    }
}

/// The tiny guest with one raw disk of each size in `sizes` (a second disk runs its write
/// bench, see `images/tiny-guest/init`).
pub fn tiny_guest_with_disks(
    name: &str,
    mode: pb::ProtectionMode,
    sizes: &[u64],
) -> pb::CreateVmRequest {
    let guest = tiny_guest(name);
    pb::CreateVmRequest {
        mode: mode.into(),
        disks: sizes
            .iter()
            .map(|size| pb::DiskRequest {
                size_bytes: *size,
                ..guest.disks[0].clone()
            })
            .collect(),
        ..guest
    }
}

/// A pvctl run that must succeed: its stdout.
pub fn pvctl_ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "pvctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A pvctl run that must fail: its stderr.
pub fn pvctl_refused(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "pvctl succeeded where it must fail: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `message` with request ID `id`, as pvctl sends it: a retry with the same ID never
/// applies twice.
pub fn with_request_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "x-pairvisor-request-id",
        id.parse()
            .unwrap_or_else(|e| panic!("request ID {id}: {e}")),
    );
    request
}

/// A pvctl `--json` run that must succeed: its JSON.
pub fn pvctl_json(output: &Output) -> serde_json::Value {
    serde_json::from_str(&pvctl_ok(output)).unwrap_or_else(|e| panic!("pvctl printed no JSON: {e}"))
}

/// Parses `COUNTER n boot=<id>`.
pub fn parse_counter(line: &str) -> Option<(u64, String)> {
    let rest = line.trim().strip_prefix("COUNTER ")?;
    let mut parts = rest.split_whitespace();
    let n = parts.next()?.parse().ok()?;
    let boot = parts.next()?.strip_prefix("boot=")?.to_string();
    Some((n, boot))
}

/// A guest's console, read from its serial log.
#[derive(Debug)]
pub struct Console {
    path: PathBuf,
    /// Bytes of the log already consumed by `after_mark` readers.
    mark: u64,
}

impl Console {
    /// The console of `vm` in `lab`, reading from the log's current end.
    pub fn new(lab: &Lab, vm: &pb::Vm) -> Console {
        let path = lab.serial_log(vm);
        let mark = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Console { path, mark }
    }

    /// The console of `vm` in `lab`, reading its log from the beginning.
    pub fn from_start(lab: &Lab, vm: &pb::Vm) -> Console {
        Console {
            path: lab.serial_log(vm),
            mark: 0,
        }
    }

    /// Complete lines written since the mark. A line the guest is still writing (no newline
    /// yet) is left for the next read: read half-way, `COUNTER 5 boot=a4204b19` would parse
    /// as a counter of another boot.
    pub fn lines(&self) -> Vec<String> {
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        let start = usize::try_from(self.mark)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        complete_lines(&bytes[start..])
    }

    /// The counter lines since the mark.
    pub fn counters(&self) -> Vec<(u64, String)> {
        self.lines()
            .iter()
            .filter_map(|l| parse_counter(l))
            .collect()
    }

    /// Waits until a line since the mark satisfies `f`, returning it.
    pub fn wait_line(&self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| f(l)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} on the console within {} s; console since mark:\n{}",
                timeout.as_secs(),
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for `count` counter lines since the mark and returns them.
    pub fn wait_counters(&self, count: usize, timeout: Duration) -> Vec<(u64, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let counters = self.counters();
            if counters.len() >= count {
                return counters;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {count} COUNTER lines within {} s; console since mark:\n{}",
                counters.len(),
                timeout.as_secs(),
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Lab {
    /// The lab's directory: per host `<dir>/<host>/logs/`, the agent's libvirt embed root
    /// `<dir>/<host>/agent/libvirt/` and its serial logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The complete lines of `bytes`: a last line still being written (no newline yet) is left
/// for the next read, never parsed half-written.
pub fn complete_lines(bytes: &[u8]) -> Vec<String> {
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Pseudo-random bytes (xorshift from `seed`, not 0): the same for the same arguments, and
/// data that does not compress.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// The SHA-256 of a file, as `sha256sum` prints it.
pub fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_counter_reads_value_and_boot_id() {
        let parsed = parse_counter("COUNTER 12 boot=ab12cd34");

        assert_eq!(parsed, Some((12, "ab12cd34".to_string())));
    }

    #[test]
    fn parse_counter_ignores_other_lines() {
        let parsed = parse_counter("GUEST-UP boot=ab12cd34 vda=yes resume=0");

        assert_eq!(parsed, None);
    }
}

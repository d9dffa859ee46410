//! The lab's BMCs: per node an OpenIPMI `ipmi_sim` (IPMI 2.0 "lanplus", UDP 623) in a
//! namespace of its own (`<prefix>-<node>-bmc`) plugged into the management switch, so it
//! answers while its host is dead and cutting the host's links leaves it reachable.
//!
//! Its chassis power is this program: `chassis_control` in its `lan.conf` names
//! `pvctl lab bmc-hook … <node>`, which `ipmi_sim` runs through `/bin/sh` with the request
//! appended, and waits for (its whole event loop blocks until the hook's stdout closes):
//!
//! | ipmitool | hook called with | the hook |
//! |---|---|---|
//! | `chassis power status` | `get power` | prints `power:1` or `power:0` (the `power` file); fails if unreadable |
//! | `chassis power off` | `set power 0` | what `kill-host` does (every PID of the node, system IP, links), `power` = 0 |
//! | `chassis power on` | `set power 1` | `power` = 1, then `restore-host` detached (setsid, output to the hook log) |
//! | `chassis power reset` / `soft` | `set reset 1` / `set shutdown 1` | off then on / off |
//! | boot device, identify | `set boot …` / `set identify …` | nothing |
//!
//! The hook prints nothing else on stdout and leaves no child on it. Files live in
//! `<lab>/<node>/bmc/` (`lan.conf`, `bmc.emu`, `state/`, `power`); `ipmi_sim`'s output goes to
//! `<node>/logs/bmc.log` and one line per hook call to `<node>/logs/bmc-hook.log`.
//! `cut-bmc` takes the BMC's switch port down (it stops answering); `heal` brings it back.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::net::{self, MgmtPort};
use super::plan::{BMC_DEV, BMC_PASSWORD, BMC_PORT, BMC_USER, HOSTS, Host, Plan};
use super::procs::{self, Daemon};
use super::{faults, log_path, marker};

/// Time for a fresh `ipmi_sim` to answer IPMI (about 0.1 s idle).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Time for a killed `ipmi_sim` to be gone.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two looks at a BMC that is starting or stopping.
const POLL: Duration = Duration::from_millis(100);

/// One request of `ipmi_sim` to the hook.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Request {
    /// Report the power state.
    GetPower,
    /// Answer the boot device (always the default).
    GetBoot,
    /// Power the node off.
    PowerOff,
    /// Power the node on.
    PowerOn,
    /// Power off, then on.
    Reset,
    /// A request that changes nothing here (boot device, identify light).
    Ignored,
}

/// The requests of one hook call: `get PARAM…` or `set PARAM VALUE…`.
fn requests(op: &str, params: &[String]) -> anyhow::Result<Vec<Request>> {
    match op {
        "get" => params.iter().map(|p| get_request(p)).collect(),
        "set" => {
            if !params.len().is_multiple_of(2) {
                bail!("set needs parameter and value pairs, got {params:?}");
            }
            params
                .chunks(2)
                .map(|pair| set_request(&pair[0], &pair[1]))
                .collect()
        }
        _ => bail!("unknown operation {op:?}: use get or set"),
    }
}

fn get_request(param: &str) -> anyhow::Result<Request> {
    match param {
        "power" => Ok(Request::GetPower),
        "boot" => Ok(Request::GetBoot),
        _ => bail!("cannot get {param:?}"),
    }
}

fn set_request(param: &str, value: &str) -> anyhow::Result<Request> {
    match (param, value) {
        ("power", "0") | ("shutdown", "1") => Ok(Request::PowerOff),
        ("power", _) => Ok(Request::PowerOn),
        ("reset", "1") => Ok(Request::Reset),
        ("reset" | "shutdown", _) | ("boot" | "identify", _) => Ok(Request::Ignored),
        _ => bail!("cannot set {param:?}"),
    }
}

/// Directory of node `host`'s BMC files.
fn dir(plan: &Plan, host: &Host) -> PathBuf {
    plan.host_dir(host).join("bmc")
}

/// The file that holds node `host`'s power state as its BMC sees it: `1` or `0`.
fn power_file(plan: &Plan, host: &Host) -> PathBuf {
    dir(plan, host).join("power")
}

/// Records that node `host` has power, if it has a BMC (`restore-host` powers it on).
pub fn powered_on(plan: &Plan, host: &Host) -> anyhow::Result<()> {
    let file = power_file(plan, host);
    if !dir(plan, host).is_dir() {
        return Ok(());
    }
    fs::write(&file, "1\n").with_context(|| format!("writing {}", file.display()))
}

/// The `lan.conf` of node `host`'s BMC; `hook` is the chassis control command.
fn lan_conf(plan: &Plan, host: &Host, hook: &str) -> String {
    let name = plan.bmc_ns(host);
    let mut guid: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    guid.truncate(32);
    let guid = format!("{guid:0<32}");
    let mut text = String::new();
    let _ = write!(
        text,
        "# ipmi_lan(5) of {name}, written by `pvctl lab up`\n\
         name \"{name}\"\n\
         set_working_mc 0x20\n\
         startlan 1\n\
         \x20 addr {ip} {BMC_PORT}\n\
         \x20 priv_limit admin\n\
         \x20 allowed_auths_callback none\n\
         \x20 allowed_auths_user md5\n\
         \x20 allowed_auths_operator md5\n\
         \x20 allowed_auths_admin md5\n\
         \x20 guid {guid}\n\
         endlan\n\
         # run as: <command> get power | set power 0|1 | …\n\
         chassis_control \"{hook}\"\n\
         user 2 true \"{BMC_USER}\" \"{BMC_PASSWORD}\" admin 10 md5\n",
        ip = plan.bmc_ip(host),
    );
    text
}

/// The `ipmi_sim` command file: one BMC at IPMB 0x20 with a chassis device (0x9f).
const BMC_EMU: &str =
    "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n";

/// The hook command `ipmi_sim` runs for node `host` (it appends the request).
fn hook_command(plan: &Plan, host: &Host) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating pvctl")?;
    let words = [
        exe.to_string_lossy().into_owned(),
        "lab".into(),
        "bmc-hook".into(),
        "--dir".into(),
        plan.dir().to_string_lossy().into_owned(),
        "--prefix".into(),
        plan.prefix().into(),
        "--subnet".into(),
        plan.subnet().to_string(),
        host.name.into(),
    ];
    if let Some(bad) = words
        .iter()
        .find(|w| w.contains(|c: char| c.is_whitespace() || "\"'\\$`".contains(c)))
    {
        bail!(
            "{bad:?} cannot go into ipmi_sim's chassis_control command: use a path without blanks or quotes"
        );
    }
    Ok(words.join(" "))
}

fn daemon(plan: &Plan, host: &Host) -> Daemon {
    let d = dir(plan, host);
    let path = |name: &str| d.join(name).to_string_lossy().into_owned();
    Daemon {
        ns: plan.bmc_ns(host),
        name: format!("{}-bmc", host.name),
        argv: vec![
            "ipmi_sim".into(),
            "-n".into(),
            "-c".into(),
            path("lan.conf"),
            "-f".into(),
            path("bmc.emu"),
            "-s".into(),
            path("state"),
        ],
        log: log_path(plan, host, "bmc"),
        marker: marker(plan),
    }
}

fn port(plan: &Plan, host: &Host) -> MgmtPort {
    MgmtPort {
        ns: plan.bmc_ns(host),
        root_end: plan.bmc_veth(host),
        dev: BMC_DEV,
        address: plan.bmc_ip(host),
    }
}

fn nodes() -> impl Iterator<Item = &'static Host> {
    HOSTS.iter().filter(|h| !h.is_witness())
}

/// Brings every node's BMC up (what is missing of it) and waits until each answers.
pub fn up(plan: &Plan) -> anyhow::Result<()> {
    for host in nodes() {
        net::attach(plan, &port(plan, host))?;
        let daemon = daemon(plan, host);
        let pid_file = procs::pid_file(&plan.pid_dir(), &daemon.name);
        if procs::running(&pid_file, &daemon.marker).is_none() {
            write_files(plan, host)?;
        } else {
            // `up` starts whatever the host lacks: it has power from now on.
            powered_on(plan, host)?;
        }
        let (pid, started) = procs::ensure(&daemon, &plan.pid_dir())?;
        println!(
            "      {} {} (PID {pid}) on {}:{BMC_PORT}, log {}",
            daemon.name,
            if started {
                "started"
            } else {
                "already running"
            },
            plan.bmc_ip(host),
            daemon.log.display()
        );
    }
    for host in nodes() {
        wait_answering(plan, host)?;
    }
    Ok(())
}

/// A fresh BMC's files, its state wiped (saved state would override `lan.conf`), power on.
fn write_files(plan: &Plan, host: &Host) -> anyhow::Result<()> {
    let d = dir(plan, host);
    let state = d.join("state");
    if state.exists() {
        fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let hook = hook_command(plan, host)?;
    for (name, text) in [
        ("lan.conf", lan_conf(plan, host, &hook)),
        ("bmc.emu", BMC_EMU.to_string()),
        ("power", "1\n".to_string()),
    ] {
        let file = d.join(name);
        fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(())
}

/// Waits until node `host`'s BMC answers a power status request.
fn wait_answering(plan: &Plan, host: &Host) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let address = plan.bmc_ip(host).to_string();
    loop {
        let answered = Command::new("ipmitool")
            .args(["-I", "lanplus", "-C", "3", "-N", "1", "-R", "1", "-H"])
            .args([address.as_str(), "-U", BMC_USER, "-E"])
            .args(["chassis", "power", "status"])
            .env("IPMI_PASSWORD", BMC_PASSWORD)
            .stdin(Stdio::null())
            .output()
            .context("running ipmitool (install it: scripts/install-deps.sh)")?
            .status
            .success();
        if answered {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the BMC of {} ({address}) did not answer within {} s; see {}",
                host.name,
                READY_TIMEOUT.as_secs(),
                log_path(plan, host, "bmc").display()
            );
        }
        sleep(POLL);
    }
}

/// Stops every node's BMC (SIGKILL by PID: `ipmi_sim` holds nothing worth a clean exit and
/// takes seconds to leave on SIGTERM) and removes its namespace.
pub fn down(plan: &Plan) -> anyhow::Result<()> {
    let marker = marker(plan);
    for host in nodes() {
        let name = format!("{}-bmc", host.name);
        if let Some(pid) = procs::running(&procs::pid_file(&plan.pid_dir(), &name), &marker) {
            kill(pid, &marker).with_context(|| format!("stopping {name} (PID {pid})"))?;
            println!("stopped {name} (PID {pid})");
        }
        net::detach(&plan.bmc_ns(host), &plan.bmc_veth(host))?;
    }
    Ok(())
}

/// SIGKILLs `pid` (ours by `marker`) and waits until it is gone.
fn kill(pid: i32, marker: &str) -> anyhow::Result<()> {
    procs::signal(pid, libc::SIGKILL)?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    while procs::alive_with_marker(pid, marker) {
        if Instant::now() > deadline {
            bail!("still alive {} s after SIGKILL", STOP_TIMEOUT.as_secs());
        }
        sleep(POLL);
    }
    Ok(())
}

/// `pvctl lab cut-bmc HOST`: node `name`'s BMC stops answering (its switch port goes down).
pub fn cut(plan: &Plan, name: &str) -> anyhow::Result<()> {
    let host = faults::node(name)?;
    super::require_root()?;
    let veth = plan.bmc_veth(host);
    if !net::ip_ok(&["link", "show", &veth]) {
        bail!(
            "{} has no BMC port {veth}: bring the lab up first",
            host.name
        );
    }
    net::ip(&["link", "set", &veth, "down"])?;
    println!(
        "{}: BMC {} unreachable (port {veth} down); `pvctl lab heal` reconnects it",
        host.name,
        plan.bmc_ip(host)
    );
    Ok(())
}

/// Brings cut BMC ports up again; returns how many were down.
pub fn heal(plan: &Plan) -> anyhow::Result<usize> {
    let mut healed = 0;
    for host in nodes() {
        let veth = plan.bmc_veth(host);
        let Ok(output) = Command::new("ip")
            .args(["-o", "link", "show", "dev", &veth])
            .output()
        else {
            continue;
        };
        if !output.status.success() || admin_up(&String::from_utf8_lossy(&output.stdout)) {
            continue;
        }
        net::ip(&["link", "set", &veth, "up"])?;
        println!("{}: BMC port {veth} up again", host.name);
        healed += 1;
    }
    Ok(healed)
}

/// Whether `ip -o link show` output shows the link administratively up (flag `UP`).
fn admin_up(line: &str) -> bool {
    line.split(['<', '>'])
        .nth(1)
        .is_some_and(|flags| flags.split(',').any(|f| f == "UP"))
}

/// `pvctl lab bmc-hook HOST OP PARAM…`: `ipmi_sim`'s chassis control for node `name` (see
/// the module doc). Only answers go to stdout; what it did goes to the hook log.
pub fn hook(plan: &Plan, name: &str, op: &str, params: &[String]) -> anyhow::Result<()> {
    let host = faults::node(name)?;
    let result = requests(op, params).and_then(|requests| {
        let mut done = Vec::new();
        for request in requests {
            done.push(serve(plan, host, &request)?);
        }
        Ok(done)
    });
    let outcome = match &result {
        Ok(done) => done.join("; "),
        Err(e) => format!("failed: {e:#}"),
    };
    log(plan, host, &format!("{op} {}: {outcome}", params.join(" ")));
    result.map(|_| ())
}

/// Carries `request` out for node `host`; returns what it did, for the log.
fn serve(plan: &Plan, host: &Host, request: &Request) -> anyhow::Result<String> {
    match request {
        Request::GetPower => {
            let file = power_file(plan, host);
            // Never guess "off": a fencer trusts it.
            let power =
                fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let answer = format!("power:{}", power.trim());
            println!("{answer}");
            Ok(answer)
        }
        Request::GetBoot => {
            println!("boot:default");
            Ok("boot:default".into())
        }
        Request::PowerOff => power_off(plan, host),
        Request::PowerOn => power_on(plan, host),
        Request::Reset => Ok(format!(
            "{}; {}",
            power_off(plan, host)?,
            power_on(plan, host)?
        )),
        Request::Ignored => Ok("ignored".into()),
    }
}

fn power_off(plan: &Plan, host: &Host) -> anyhow::Result<String> {
    let lines = faults::power_off(plan, host.name)?;
    let file = power_file(plan, host);
    fs::write(&file, "0\n").with_context(|| format!("writing {}", file.display()))?;
    Ok(format!("powered off: {}", lines.join(" | ")))
}

/// Power on: `restore-host` in a session of its own, its output to the hook log, so the hook
/// returns at once and `ipmi_sim` sees its stdout close.
fn power_on(plan: &Plan, host: &Host) -> anyhow::Result<String> {
    let file = power_file(plan, host);
    if fs::read_to_string(&file).is_ok_and(|p| p.trim() == "1") {
        return Ok("already on".into());
    }
    powered_on(plan, host)?;
    let exe = std::env::current_exe().context("locating pvctl")?;
    let log = open_log(plan, host)?;
    let subnet = plan.subnet().to_string();
    let status = Command::new("setsid")
        .arg("--fork")
        .arg(exe)
        .args(["lab", "restore-host", host.name, "--prefix", plan.prefix()])
        .args(["--subnet", &subnet, "--dir"])
        .arg(plan.dir())
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating the hook log handle")?)
        .stderr(log)
        .status()
        .context("running setsid (util-linux)")?;
    if !status.success() {
        bail!("starting restore-host through setsid failed ({status})");
    }
    Ok("powered on: restore-host started".into())
}

fn hook_log(plan: &Plan, host: &Host) -> PathBuf {
    log_path(plan, host, "bmc-hook")
}

fn open_log(plan: &Plan, host: &Host) -> anyhow::Result<fs::File> {
    let path = hook_log(plan, host);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Appends a line to the hook log (best effort: the hook's answer matters more).
fn log(plan: &Plan, host: &Host, line: &str) {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    if let Ok(mut file) = open_log(plan, host) {
        let _ = writeln!(file, "{stamp} {line}");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn plan() -> Plan {
        Plan::new("pv", 100, Path::new("/var/lib/pvlab")).unwrap()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn requests_get_power_is_get_power() {
        let requests = requests("get", &strings(&["power"])).unwrap();

        assert_eq!(requests, vec![Request::GetPower]);
    }

    #[test]
    fn requests_set_power_zero_is_power_off() {
        let requests = requests("set", &strings(&["power", "0"])).unwrap();

        assert_eq!(requests, vec![Request::PowerOff]);
    }

    #[test]
    fn requests_set_power_one_and_boot_is_power_on_then_ignored() {
        let requests = requests("set", &strings(&["power", "1", "boot", "pxe"])).unwrap();

        assert_eq!(requests, vec![Request::PowerOn, Request::Ignored]);
    }

    #[test]
    fn requests_set_odd_params_is_refused() {
        let err = requests("set", &strings(&["power"])).unwrap_err();

        assert!(err.to_string().contains("pairs"));
    }

    #[test]
    fn requests_unknown_get_is_refused() {
        let err = requests("get", &strings(&["fan"])).unwrap_err();

        assert_eq!(err.to_string(), "cannot get \"fan\"");
    }

    #[test]
    fn lan_conf_listens_on_bmc_address_and_runs_hook() {
        let text = lan_conf(&plan(), &HOSTS[1], "/x/pvctl lab bmc-hook n1");

        assert!(text.contains("  addr 10.100.0.101 623\n"));
        assert!(text.contains("chassis_control \"/x/pvctl lab bmc-hook n1\"\n"));
        assert!(text.contains("user 2 true \"fence\" \"fencepw\" admin 10 md5\n"));
    }

    #[test]
    fn lan_conf_guid_has_32_hex_digits() {
        let text = lan_conf(&plan(), &HOSTS[0], "hook");

        let guid = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("guid "))
            .unwrap();
        assert_eq!(guid.len(), 32);
        assert!(guid.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn admin_up_with_up_flag_is_true() {
        let up = admin_up("7: pv-n0b@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500");

        assert!(up);
    }

    #[test]
    fn admin_up_down_port_is_false() {
        let up = admin_up("7: pv-n0b@if2: <NO-CARRIER,BROADCAST,MULTICAST> mtu 1500 state DOWN");

        assert!(!up);
    }
}

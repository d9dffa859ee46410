//! Fault verbs of `pvctl lab`: a power cut of one node, and network partitions.
//!
//! - `kill-host`: SIGKILL to every process in the node's namespace (etcd, agent, controller and
//!   the guests' QEMU), by the PIDs `ip netns pids` lists; then the system IP leaves its `ibiz0`
//!   and every link but `lo` goes down (a powered-off machine has no carrier).
//! - `restore-host`: the links come up again, then the node's daemons start as `lab up` starts
//!   them. Guests are the controllers' business.
//! - `isolate`, `cut-path`: packets vanish while the carrier stays (a broken switch, not a
//!   pulled cable), by nftables drop rules in the node's namespace. `heal` removes them all,
//!   and reconnects BMCs that `cut-bmc` cut (see `bmc`).
//!
//! The rules live in tables named `pvfault`. The `inet` table holds the routed paths, with one
//! pair of base chains (input and output hooks) per fault, e.g. `alink1_in` and `alink1_out`.
//! A fault is applied in one nft transaction that declares, flushes and refills its own chains,
//! so applying it again changes nothing and different faults add up. `business` is a port of
//! the bridge `biz0`: bridged guest frames never pass inet's input and output hooks, so
//! `isolate` cuts it with a `netdev` table of the same name whose ingress and egress chains on
//! that device drop everything. `isolate n0` in the lab `pv`/100 (n1 is 10.100.0.12, the system
//! IP 10.100.0.10, the witness 10.100.0.13):
//!
//! ```text
//! table inet pvfault {
//!     chain isolate_in {
//!         type filter hook input priority filter; policy accept;
//!         iifname { "priv0", "alink1", "alink2" } drop
//!         iifname "ibiz0" ip saddr { 10.100.0.12, 10.100.0.10, 10.100.0.13 } drop
//!         iifname "ibiz0" ip daddr { 10.100.0.12, 10.100.0.10, 10.100.0.13 } drop
//!     }
//!     chain isolate_out { type filter hook output …; the same with oifname }
//! }
//! table netdev pvfault {
//!     chain business_in { type filter hook ingress device "business" priority filter; policy drop; }
//!     chain business_out { type filter hook egress device "business" priority filter; policy drop; }
//! }
//! ```

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::plan::{BUSINESS_BRIDGE, HOSTS, Host, MGMT_DEV, Plan, ROLE_LINKS};
use super::{net, procs};

/// Name of the nftables tables (`inet` and `netdev`) that hold every fault.
pub const FAULT_TABLE: &str = "pvfault";
/// A host's business link to the switch in the client namespace: a port of `biz0`.
const BUSINESS_LINK: &str = "business";
/// SIGKILL acts at once, but a process in uninterruptible sleep (QEMU waiting for disk I/O)
/// exits only when that I/O completes.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `kill-host` looks again for processes left in the namespace.
const KILL_POLL: Duration = Duration::from_millis(50);
/// Characters of a killed process's command line that `kill-host` prints.
const CMDLINE_SHOWN: usize = 100;

/// A path between the two nodes that `cut-path` can cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetPath {
    /// The private link `priv0`.
    Priv0,
    /// The A-Link `alink1`.
    Alink1,
    /// The A-Link `alink2`.
    Alink2,
    /// Management traffic on `ibiz0` between the two nodes (the witness stays reachable).
    Mgmt,
}

impl NetPath {
    /// Every path, in the order error messages list them.
    const ALL: [NetPath; 4] = [
        NetPath::Priv0,
        NetPath::Alink1,
        NetPath::Alink2,
        NetPath::Mgmt,
    ];

    /// Its name on the command line (for a role link, the interface's name).
    pub fn name(self) -> &'static str {
        match self {
            NetPath::Priv0 => "priv0",
            NetPath::Alink1 => "alink1",
            NetPath::Alink2 => "alink2",
            NetPath::Mgmt => "mgmt",
        }
    }

    /// The path called `name`; an unknown name is refused with the valid ones.
    pub fn from_name(name: &str) -> anyhow::Result<NetPath> {
        let Some(path) = NetPath::ALL.into_iter().find(|p| p.name() == name) else {
            let names: Vec<&str> = NetPath::ALL.iter().map(|p| p.name()).collect();
            bail!("unknown path {name:?}: use one of {}", names.join(", "));
        };
        Ok(path)
    }
}

/// What `isolate` or `cut-path` drops in a node's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every path to the other node and the system IP; the witness too unless `keep_witness`.
    Isolate {
        /// Leave traffic to and from the witness alone.
        keep_witness: bool,
    },
    /// One path to the other node.
    Cut(NetPath),
}

/// The drop rules of one fault in one node's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Drops {
    /// Prefix of the fault's chains: `<chain>_in` and `<chain>_out`.
    chain: &'static str,
    /// Links on which every packet is dropped.
    links: Vec<&'static str>,
    /// Addresses whose packets on `ibiz0` (from or to them) are dropped.
    mgmt_peers: Vec<Ipv4Addr>,
    /// Whether the business bridge port is cut too (in the `netdev` table).
    business: bool,
}

/// The node called `name` (n0 or n1); anything else is refused with the valid names.
pub fn node(name: &str) -> anyhow::Result<&'static Host> {
    let nodes = || HOSTS.iter().filter(|h| !h.is_witness());
    let Some(host) = nodes().find(|h| h.name == name) else {
        let names: Vec<&str> = nodes().map(|h| h.name).collect();
        bail!("unknown host {name:?}: use one of {}", names.join(", "));
    };
    Ok(host)
}

/// The other node of the pair.
fn other_node(host: &Host) -> &'static Host {
    if host.index == 0 {
        &HOSTS[1]
    } else {
        &HOSTS[0]
    }
}

/// The witness.
fn witness() -> &'static Host {
    &HOSTS[2]
}

/// What `fault` drops in node `host`'s namespace.
fn drops(plan: &Plan, host: &Host, fault: Fault) -> Drops {
    let other = plan.mgmt_ip(other_node(host));
    match fault {
        Fault::Isolate { keep_witness } => {
            let witness = (!keep_witness).then(|| plan.mgmt_ip(witness()));
            Drops {
                chain: "isolate",
                links: ROLE_LINKS.iter().map(|(dev, _)| *dev).collect(),
                mgmt_peers: [Some(other), Some(plan.system_ip()), witness]
                    .into_iter()
                    .flatten()
                    .collect(),
                business: true,
            }
        }
        Fault::Cut(NetPath::Mgmt) => Drops {
            chain: "mgmt",
            links: Vec::new(),
            mgmt_peers: vec![other],
            business: false,
        },
        Fault::Cut(path) => Drops {
            chain: path.name(),
            links: vec![path.name()],
            mgmt_peers: Vec::new(),
            business: false,
        },
    }
}

/// The nft script that applies `fault` in node `host`'s namespace (see the module doc).
pub fn ruleset(plan: &Plan, host: &Host, fault: Fault) -> String {
    render(&drops(plan, host, fault))
}

/// The nft script of `drops`: declare its chains, flush them, fill them.
fn render(drops: &Drops) -> String {
    let (input, output) = (
        format!("{}_in", drops.chain),
        format!("{}_out", drops.chain),
    );
    let mut script = format!(
        "table inet {FAULT_TABLE} {{\n\
         \tchain {input} {{ type filter hook input priority filter; policy accept; }}\n\
         \tchain {output} {{ type filter hook output priority filter; policy accept; }}\n\
         }}\n\
         flush chain inet {FAULT_TABLE} {input}\n\
         flush chain inet {FAULT_TABLE} {output}\n\
         table inet {FAULT_TABLE} {{\n"
    );
    chain_rules(&mut script, &input, "iifname", drops);
    chain_rules(&mut script, &output, "oifname", drops);
    script.push_str("}\n");
    if drops.business {
        let _ = write!(
            script,
            "table netdev {FAULT_TABLE} {{\n\
             \tchain business_in {{ type filter hook ingress device \"{BUSINESS_LINK}\" priority filter; policy drop; }}\n\
             \tchain business_out {{ type filter hook egress device \"{BUSINESS_LINK}\" priority filter; policy drop; }}\n\
             }}\n"
        );
    }
    script
}

/// Appends chain `chain` with its rules; `ifname` is `iifname` (input) or `oifname` (output).
fn chain_rules(script: &mut String, chain: &str, ifname: &str, drops: &Drops) {
    let _ = writeln!(script, "\tchain {chain} {{");
    if !drops.links.is_empty() {
        let links = nft_set(drops.links.iter().map(|l| format!("\"{l}\"")));
        let _ = writeln!(script, "\t\t{ifname} {links} drop");
    }
    if !drops.mgmt_peers.is_empty() {
        let peers = nft_set(drops.mgmt_peers.iter().map(Ipv4Addr::to_string));
        let _ = writeln!(script, "\t\t{ifname} \"{MGMT_DEV}\" ip saddr {peers} drop");
        let _ = writeln!(script, "\t\t{ifname} \"{MGMT_DEV}\" ip daddr {peers} drop");
    }
    script.push_str("\t}\n");
}

/// One item alone, or several as an anonymous nft set `{ a, b }`.
fn nft_set(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    match items.as_slice() {
        [one] => one.clone(),
        _ => format!("{{ {} }}", items.join(", ")),
    }
}

/// The nft script of `heal`: removes both fault tables, whether they exist or not (declaring
/// a table that exists is a no-op).
fn heal_script() -> String {
    ["inet", "netdev"]
        .map(|family| {
            format!("table {family} {FAULT_TABLE}\ndelete table {family} {FAULT_TABLE}\n")
        })
        .concat()
}

/// A sentence saying what `drops` cuts.
fn describe(drops: &Drops) -> String {
    let mut links: Vec<&str> = drops.links.clone();
    if drops.business {
        links.push(BUSINESS_LINK);
    }
    let mut parts = Vec::new();
    if !links.is_empty() {
        parts.push(format!("every packet on {}", links.join(", ")));
    }
    if !drops.mgmt_peers.is_empty() {
        let peers: Vec<String> = drops.mgmt_peers.iter().map(Ipv4Addr::to_string).collect();
        parts.push(format!(
            "packets on {MGMT_DEV} from or to {}",
            peers.join(", ")
        ));
    }
    format!("drops {}", parts.join(", and "))
}

/// Whether `nft list tables` output shows a fault table.
fn has_fault_table(listing: &str) -> bool {
    let tables = ["inet", "netdev"].map(|family| format!("table {family} {FAULT_TABLE}"));
    listing
        .lines()
        .any(|line| tables.iter().any(|t| t == line.trim()))
}

/// The PIDs in `ip netns pids` output, one a line.
fn parse_pids(text: &str) -> anyhow::Result<Vec<i32>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| {
            line.parse()
                .with_context(|| format!("`ip netns pids` printed {line:?}, not a PID"))
        })
        .collect()
}

/// The names of the links in `ip -j link show` output, `lo` left out.
fn links_but_lo(json: &str) -> anyhow::Result<Vec<String>> {
    let links: serde_json::Value =
        serde_json::from_str(json).context("parsing `ip -j link show` output")?;
    let Some(links) = links.as_array() else {
        bail!("`ip -j link show` printed no list of links");
    };
    Ok(links
        .iter()
        .filter_map(|link| link.get("ifname")?.as_str())
        .filter(|name| *name != "lo")
        .map(String::from)
        .collect())
}

/// `address/prefix` if `ip -j addr show` output holds `address`.
fn prefixed_address(json: &str, address: Ipv4Addr) -> anyhow::Result<Option<String>> {
    let links: serde_json::Value =
        serde_json::from_str(json).context("parsing `ip -j addr show` output")?;
    let wanted = address.to_string();
    let found = links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|link| link.get("addr_info")?.as_array())
        .flatten()
        .find(|info| info.get("local").and_then(|l| l.as_str()) == Some(wanted.as_str()))
        .and_then(|info| info.get("prefixlen")?.as_u64());
    Ok(found.map(|prefix| format!("{wanted}/{prefix}")))
}

/// A process's command line as `kill-host` prints it: arguments joined, cut to a line.
fn shown_cmdline(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw).replace('\0', " ");
    let text = text.trim();
    if text.chars().count() <= CMDLINE_SHOWN {
        return text.to_string();
    }
    let cut: String = text.chars().take(CMDLINE_SHOWN).collect();
    format!("{cut}…")
}

/// Runs `program args` (with `stdin` as its input), returning its output; fails with its
/// error output.
pub(super) fn run(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running `{command}`"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing to `{command}`"))?;
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{command}`"))?;
    if !output.status.success() {
        bail!(
            "`{command}` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `nft ARGS` in namespace `ns`.
fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut all = vec!["netns", "exec", ns, "nft"];
    all.extend_from_slice(args);
    run("ip", &all, stdin)
}

/// Fails unless nft is installed.
fn require_nft() -> anyhow::Result<()> {
    if super::which("nft").is_none() {
        bail!("nft is not installed: run scripts/install-deps.sh (package nftables)");
    }
    Ok(())
}

/// Node `name` of the lab and its namespace, after checking root and that the namespace exists.
pub(super) fn lab_node(plan: &Plan, name: &str) -> anyhow::Result<(&'static Host, String)> {
    let host = node(name)?;
    super::require_root()?;
    let ns = plan.ns(host);
    if !net::host_exists(plan, host) {
        bail!(
            "namespace {ns} does not exist: bring the lab up first (`pvctl lab up` with the same --prefix, --subnet and --dir)"
        );
    }
    Ok((host, ns))
}

/// `pvctl lab kill-host HOST`: a power cut of node `name` (see the module doc).
pub fn kill_host(plan: &Plan, name: &str) -> anyhow::Result<()> {
    for line in power_off(plan, name)? {
        println!("{line}");
    }
    Ok(())
}

/// Cuts node `name`'s power as `kill-host` does (its BMC's hook too); returns what it did, a
/// line each.
pub fn power_off(plan: &Plan, name: &str) -> anyhow::Result<Vec<String>> {
    let (host, ns) = lab_node(plan, name)?;
    let mut lines = Vec::new();
    let killed = kill_all(&ns)?;
    if killed.is_empty() {
        lines.push(format!("{}: no process was running in {ns}", host.name));
    }
    for (pid, cmdline) in &killed {
        lines.push(format!("{}: killed PID {pid}: {cmdline}", host.name));
    }
    if let Some(address) = remove_system_ip(plan, &ns)? {
        lines.push(format!(
            "{}: removed system IP {address} from {MGMT_DEV}",
            host.name
        ));
    }
    let links = set_links(&ns, "down")?;
    lines.push(format!(
        "{}: powered off, links down: {}; `pvctl lab restore-host {}` powers it on",
        host.name,
        links.join(", "),
        host.name
    ));
    Ok(lines)
}

/// SIGKILLs every process in namespace `ns` until none is left; returns what it killed.
fn kill_all(ns: &str) -> anyhow::Result<Vec<(i32, String)>> {
    let deadline = Instant::now() + KILL_TIMEOUT;
    let mut killed = Vec::new();
    loop {
        let pids = parse_pids(&run("ip", &["netns", "pids", ns], None)?)?;
        if pids.is_empty() {
            return Ok(killed);
        }
        if Instant::now() > deadline {
            bail!(
                "PIDs {pids:?} in namespace {ns} survived SIGKILL for {} s (uninterruptible I/O?); check them with `ps -o pid,stat,wchan,cmd -p PID` and retry",
                KILL_TIMEOUT.as_secs()
            );
        }
        for pid in pids {
            kill(pid, &mut killed)?;
        }
        sleep(KILL_POLL);
    }
}

/// SIGKILLs `pid`, noting its command line in `killed` the first time.
fn kill(pid: i32, killed: &mut Vec<(i32, String)>) -> anyhow::Result<()> {
    if !killed.iter().any(|(seen, _)| *seen == pid) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        killed.push((pid, shown_cmdline(&cmdline)));
    }
    match procs::signal(pid, libc::SIGKILL) {
        Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
            Err(e).with_context(|| format!("sending SIGKILL to PID {pid}"))
        }
        // Gone already (ESRCH) is what we want.
        _ => Ok(()),
    }
}

/// Removes the system IP from `ibiz0` in `ns` if it is there; returns it with its prefix.
fn remove_system_ip(plan: &Plan, ns: &str) -> anyhow::Result<Option<String>> {
    let json = run(
        "ip",
        &["-n", ns, "-j", "addr", "show", "dev", MGMT_DEV],
        None,
    )?;
    let Some(address) = prefixed_address(&json, plan.system_ip())? else {
        return Ok(None);
    };
    run(
        "ip",
        &["-n", ns, "addr", "del", &address, "dev", MGMT_DEV],
        None,
    )?;
    Ok(Some(address))
}

/// Sets every link of `ns` but `lo` to `state` (up or down); returns their names. A link that
/// vanished meanwhile (a dead guest's tap) is left out.
fn set_links(ns: &str, state: &str) -> anyhow::Result<Vec<String>> {
    let links = links_but_lo(&run("ip", &["-n", ns, "-j", "link", "show"], None)?)?;
    let mut set = Vec::new();
    for link in links {
        let result = run("ip", &["-n", ns, "link", "set", "dev", &link, state], None);
        let exists = || run("ip", &["-n", ns, "link", "show", "dev", &link], None).is_ok();
        match result {
            Ok(_) => set.push(link),
            Err(e) if exists() => return Err(e),
            Err(_) => {}
        }
    }
    Ok(set)
}

/// `pvctl lab restore-host HOST`: powers node `name` on again: links up (`business` back in
/// `biz0`), then its etcd member, agent and controller.
pub fn restore_host(plan: &Plan, name: &str) -> anyhow::Result<()> {
    let (host, ns) = lab_node(plan, name)?;
    let links = set_links(&ns, "up")?;
    run(
        "ip",
        &[
            "-n",
            &ns,
            "link",
            "set",
            BUSINESS_LINK,
            "master",
            BUSINESS_BRIDGE,
            "up",
        ],
        None,
    )?;
    super::bmc::powered_on(plan, host)?;
    println!("{}: powered on, links up: {}", host.name, links.join(", "));
    super::start_node(plan, host)?;
    println!(
        "{}: etcd, agent and controller run; the controllers decide where guests run",
        host.name
    );
    Ok(())
}

/// `pvctl lab isolate HOST [--keep-witness]`: cuts node `name` off from the other node, the
/// system IP and (unless `keep_witness`) the witness.
pub fn isolate(plan: &Plan, name: &str, keep_witness: bool) -> anyhow::Result<()> {
    apply_fault(plan, name, Fault::Isolate { keep_witness })
}

/// `pvctl lab cut-path HOST PATH`: cuts one path of node `name` to the other node.
pub fn cut_path(plan: &Plan, name: &str, path: &str) -> anyhow::Result<()> {
    let path = NetPath::from_name(path)?;
    apply_fault(plan, name, Fault::Cut(path))
}

/// Installs `fault` in node `name`'s namespace.
fn apply_fault(plan: &Plan, name: &str, fault: Fault) -> anyhow::Result<()> {
    let (host, ns) = lab_node(plan, name)?;
    require_nft()?;
    nft(&ns, &["-f", "-"], Some(&ruleset(plan, host, fault)))?;
    println!(
        "{}: {} (links stay up; `pvctl lab heal` removes every fault)",
        host.name,
        describe(&drops(plan, host, fault))
    );
    Ok(())
}

/// `pvctl lab heal`: removes the fault tables and slow-path queues from every namespace of
/// the lab and reconnects cut BMCs.
pub fn heal(plan: &Plan) -> anyhow::Result<()> {
    super::require_root()?;
    require_nft()?;
    let mut healed = super::bmc::heal(plan)? + super::shaping::heal(plan)?;
    for host in HOSTS.iter().filter(|h| net::host_exists(plan, h)) {
        let ns = plan.ns(host);
        let had = has_fault_table(&nft(&ns, &["list", "tables"], None)?);
        nft(&ns, &["-f", "-"], Some(&heal_script()))?;
        if had {
            println!("{}: removed the {FAULT_TABLE} tables", host.name);
            healed += 1;
        }
    }
    if healed == 0 {
        println!("no faults to heal");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn plan() -> Plan {
        Plan::new("pv", 100, Path::new("/var/lib/pvlab")).unwrap()
    }

    #[test]
    fn node_witness_is_refused_listing_nodes() {
        let err = node("w").unwrap_err();

        assert_eq!(err.to_string(), "unknown host \"w\": use one of n0, n1");
    }

    #[test]
    fn node_n1_is_second_host() {
        let host = node("n1").unwrap();

        assert_eq!(host, &HOSTS[1]);
    }

    #[test]
    fn net_path_unknown_is_refused_listing_paths() {
        let err = NetPath::from_name("business").unwrap_err();

        assert_eq!(
            err.to_string(),
            "unknown path \"business\": use one of priv0, alink1, alink2, mgmt"
        );
    }

    #[test]
    fn net_path_role_links_match_plan_interfaces() {
        let names: Vec<&str> = NetPath::ALL[..3].iter().map(|p| p.name()).collect();

        assert_eq!(names, ROLE_LINKS.map(|(dev, _)| dev));
    }

    #[test]
    fn ruleset_isolate_drops_links_business_peer_system_ip_and_witness() {
        let script = ruleset(
            &plan(),
            &HOSTS[0],
            Fault::Isolate {
                keep_witness: false,
            },
        );

        assert_eq!(
            script,
            "table inet pvfault {
\tchain isolate_in { type filter hook input priority filter; policy accept; }
\tchain isolate_out { type filter hook output priority filter; policy accept; }
}
flush chain inet pvfault isolate_in
flush chain inet pvfault isolate_out
table inet pvfault {
\tchain isolate_in {
\t\tiifname { \"priv0\", \"alink1\", \"alink2\" } drop
\t\tiifname \"ibiz0\" ip saddr { 10.100.0.12, 10.100.0.10, 10.100.0.13 } drop
\t\tiifname \"ibiz0\" ip daddr { 10.100.0.12, 10.100.0.10, 10.100.0.13 } drop
\t}
\tchain isolate_out {
\t\toifname { \"priv0\", \"alink1\", \"alink2\" } drop
\t\toifname \"ibiz0\" ip saddr { 10.100.0.12, 10.100.0.10, 10.100.0.13 } drop
\t\toifname \"ibiz0\" ip daddr { 10.100.0.12, 10.100.0.10, 10.100.0.13 } drop
\t}
}
table netdev pvfault {
\tchain business_in { type filter hook ingress device \"business\" priority filter; policy drop; }
\tchain business_out { type filter hook egress device \"business\" priority filter; policy drop; }
}
"
        );
    }

    #[test]
    fn ruleset_isolate_keeping_witness_spares_witness_address() {
        let script = ruleset(&plan(), &HOSTS[1], Fault::Isolate { keep_witness: true });

        assert!(script.contains("iifname \"ibiz0\" ip saddr { 10.100.0.11, 10.100.0.10 } drop"));
        assert!(!script.contains("10.100.0.13"));
    }

    #[test]
    fn ruleset_cut_alink1_drops_only_alink1() {
        let script = ruleset(&plan(), &HOSTS[0], Fault::Cut(NetPath::Alink1));

        assert_eq!(
            script,
            "table inet pvfault {
\tchain alink1_in { type filter hook input priority filter; policy accept; }
\tchain alink1_out { type filter hook output priority filter; policy accept; }
}
flush chain inet pvfault alink1_in
flush chain inet pvfault alink1_out
table inet pvfault {
\tchain alink1_in {
\t\tiifname \"alink1\" drop
\t}
\tchain alink1_out {
\t\toifname \"alink1\" drop
\t}
}
"
        );
    }

    #[test]
    fn ruleset_cut_mgmt_drops_only_other_node_address() {
        let script = ruleset(&plan(), &HOSTS[1], Fault::Cut(NetPath::Mgmt));

        assert_eq!(
            script,
            "table inet pvfault {
\tchain mgmt_in { type filter hook input priority filter; policy accept; }
\tchain mgmt_out { type filter hook output priority filter; policy accept; }
}
flush chain inet pvfault mgmt_in
flush chain inet pvfault mgmt_out
table inet pvfault {
\tchain mgmt_in {
\t\tiifname \"ibiz0\" ip saddr 10.100.0.11 drop
\t\tiifname \"ibiz0\" ip daddr 10.100.0.11 drop
\t}
\tchain mgmt_out {
\t\toifname \"ibiz0\" ip saddr 10.100.0.11 drop
\t\toifname \"ibiz0\" ip daddr 10.100.0.11 drop
\t}
}
"
        );
    }

    #[test]
    fn describe_isolate_names_links_and_addresses() {
        let drops = drops(&plan(), &HOSTS[0], Fault::Isolate { keep_witness: true });

        assert_eq!(
            describe(&drops),
            "drops every packet on priv0, alink1, alink2, business, and packets on ibiz0 from or to 10.100.0.12, 10.100.0.10"
        );
    }

    #[test]
    fn heal_script_deletes_both_tables_even_if_absent() {
        let script = heal_script();

        assert_eq!(
            script,
            "table inet pvfault\ndelete table inet pvfault\ntable netdev pvfault\ndelete table netdev pvfault\n"
        );
    }

    #[test]
    fn has_fault_table_with_netdev_table_is_true() {
        let found = has_fault_table("table ip nat\ntable netdev pvfault\n");

        assert!(found);
    }

    #[test]
    fn has_fault_table_with_other_tables_is_false() {
        let found = has_fault_table("table inet filter\ntable ip pvfaults\n");

        assert!(!found);
    }

    #[test]
    fn parse_pids_reads_one_pid_a_line() {
        let pids = parse_pids("123\n4567\n").unwrap();

        assert_eq!(pids, vec![123, 4567]);
    }

    #[test]
    fn parse_pids_with_text_fails_naming_it() {
        let err = parse_pids("12\nabc\n").unwrap_err();

        assert!(err.to_string().contains("\"abc\""));
    }

    #[test]
    fn links_but_lo_lists_other_links() {
        let json = r#"[{"ifindex":1,"ifname":"lo"},{"ifindex":2,"ifname":"ibiz0","link_netnsid":0},{"ifindex":5,"ifname":"business","master":"biz0"}]"#;

        let links = links_but_lo(json).unwrap();

        assert_eq!(links, vec!["ibiz0", "business"]);
    }

    #[test]
    fn prefixed_address_with_system_ip_present_gives_its_prefix() {
        let json = r#"[{"ifname":"ibiz0","addr_info":[{"family":"inet","local":"10.100.0.11","prefixlen":24},{"family":"inet","local":"10.100.0.10","prefixlen":24}]}]"#;

        let found = prefixed_address(json, Ipv4Addr::new(10, 100, 0, 10)).unwrap();

        assert_eq!(found.as_deref(), Some("10.100.0.10/24"));
    }

    #[test]
    fn prefixed_address_without_it_is_none() {
        let json = r#"[{"ifname":"ibiz0","addr_info":[{"family":"inet","local":"10.100.0.11","prefixlen":24}]}]"#;

        let found = prefixed_address(json, Ipv4Addr::new(10, 100, 0, 10)).unwrap();

        assert_eq!(found, None);
    }

    #[test]
    fn shown_cmdline_long_is_cut_with_ellipsis() {
        let raw = format!("qemu-system-x86_64\0-name\0{}\0", "x".repeat(200));

        let shown = shown_cmdline(raw.as_bytes());

        assert_eq!(shown.chars().count(), CMDLINE_SHOWN + 1);
        assert!(shown.starts_with("qemu-system-x86_64 -name xxx"));
    }
}

//! The lab's networks: namespaces, veth pairs and bridges, created with `ip` (idempotently)
//! and removed with their namespaces.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

use super::plan::{
    BUSINESS_BRIDGE, CLIENT_BRIDGE, CLIENT_IP, HOSTS, Host, MGMT_DEV, Plan, ROLE_LINKS,
};

/// Runs `ip ARGS`, failing with its error output.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Whether `ip ARGS` succeeds (used to test for existing objects).
pub fn ip_ok(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn namespace_exists(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

/// Creates whatever part of the lab's networks is missing.
pub fn up(plan: &Plan) -> anyhow::Result<()> {
    let bridge = plan.bridge();
    if !ip_ok(&["link", "show", &bridge]) {
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", plan.root_ip()),
            "dev",
            &bridge,
        ])?;
    }
    ip(&["link", "set", &bridge, "up"])?;
    for host in &HOSTS {
        host_up(plan, host)?;
    }
    let (n0, n1) = (plan.ns(&HOSTS[0]), plan.ns(&HOSTS[1]));
    for (dev, offset) in ROLE_LINKS {
        if !ip_ok(&["-n", &n0, "link", "show", dev]) {
            veth_between(&n0, &n1, dev)?;
            for host in &HOSTS[..2] {
                let address = format!("{}/24", plan.link_ip(offset, host));
                ip(&["-n", &plan.ns(host), "addr", "add", &address, "dev", dev])?;
            }
        }
        for ns in [&n0, &n1] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
    }
    business_up(plan)
}

/// The host's namespace, loopback and management link.
fn host_up(plan: &Plan, host: &Host) -> anyhow::Result<()> {
    let port = MgmtPort {
        ns: plan.ns(host),
        root_end: plan.root_veth(host),
        dev: MGMT_DEV,
        address: plan.mgmt_ip(host),
    };
    attach(plan, &port)
}

/// A namespace plugged into the management switch: its veth's root end is a port of the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MgmtPort {
    /// The namespace.
    pub ns: String,
    /// The veth's end in the root namespace (the switch port).
    pub root_end: String,
    /// The veth's end in the namespace.
    pub dev: &'static str,
    /// Its address there (/24).
    pub address: Ipv4Addr,
}

/// Creates whatever part of `port` is missing: the namespace with loopback up, the veth, its
/// address; both ends up.
pub fn attach(plan: &Plan, port: &MgmtPort) -> anyhow::Result<()> {
    let (ns, root_end, dev) = (&port.ns, &port.root_end, port.dev);
    if !namespace_exists(ns) {
        ip(&["netns", "add", ns])?;
    }
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    let inner_end = ip_ok(&["-n", ns, "link", "show", dev]);
    if !inner_end && ip_ok(&["link", "show", root_end]) {
        // A stale end whose namespace is still dying (see `down`): replace the pair.
        ip(&["link", "del", root_end])?;
    }
    if !inner_end {
        ip(&[
            "link", "add", root_end, "type", "veth", "peer", "name", dev, "netns", ns,
        ])?;
        let address = format!("{}/24", port.address);
        ip(&["-n", ns, "addr", "add", &address, "dev", dev])?;
    }
    ip(&["link", "set", root_end, "master", &plan.bridge(), "up"])?;
    ip(&["-n", ns, "link", "set", dev, "up"])
}

/// Removes namespace `ns` and its management veth (root end `root_end`), if they exist.
pub fn detach(ns: &str, root_end: &str) -> anyhow::Result<()> {
    // Delete the root end first: a namespace outlives `netns del` while a killed process's
    // orphaned TCP sockets still retransmit into it, and with it its veth pairs would.
    if ip_ok(&["link", "show", root_end]) {
        ip(&["link", "del", root_end])?;
    }
    if namespace_exists(ns) {
        ip(&["netns", "del", ns])?;
    }
    Ok(())
}

/// A veth pair named `dev` on both ends, one end in each namespace.
fn veth_between(ns_a: &str, ns_b: &str, dev: &str) -> anyhow::Result<()> {
    ip(&[
        "link", "add", dev, "netns", ns_a, "type", "veth", "peer", "name", dev, "netns", ns_b,
    ])
}

/// The business network: a bridge per host for guests' NICs, each a port (veth `business`) of
/// the switch in the client namespace, which holds the client's address.
fn business_up(plan: &Plan) -> anyhow::Result<()> {
    const LINK: &str = "business";
    let client = plan.client_ns();
    if !namespace_exists(&client) {
        ip(&["netns", "add", &client])?;
    }
    ip(&["-n", &client, "link", "set", "lo", "up"])?;
    if !ip_ok(&["-n", &client, "link", "show", CLIENT_BRIDGE]) {
        ip(&[
            "-n",
            &client,
            "link",
            "add",
            CLIENT_BRIDGE,
            "type",
            "bridge",
        ])?;
        let address = format!("{CLIENT_IP}/8");
        ip(&["-n", &client, "addr", "add", &address, "dev", CLIENT_BRIDGE])?;
    }
    ip(&["-n", &client, "link", "set", CLIENT_BRIDGE, "up"])?;
    for host in &HOSTS[..2] {
        let ns = plan.ns(host);
        let port = format!("biz-{}", host.name);
        if !ip_ok(&["-n", &ns, "link", "show", LINK]) {
            ip(&[
                "link", "add", LINK, "netns", &ns, "type", "veth", "peer", "name", &port, "netns",
                &client,
            ])?;
        }
        ip(&[
            "-n",
            &client,
            "link",
            "set",
            &port,
            "master",
            CLIENT_BRIDGE,
            "up",
        ])?;
        let ns = ns.as_str();
        if !ip_ok(&["-n", ns, "link", "show", BUSINESS_BRIDGE]) {
            ip(&["-n", ns, "link", "add", BUSINESS_BRIDGE, "type", "bridge"])?;
        }
        ip(&["-n", ns, "link", "set", BUSINESS_BRIDGE, "up"])?;
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            LINK,
            "master",
            BUSINESS_BRIDGE,
            "up",
        ])?;
    }
    Ok(())
}

/// Removes the namespaces (with every veth in them) and the bridge.
pub fn down(plan: &Plan) -> anyhow::Result<()> {
    for host in &HOSTS {
        detach(&plan.ns(host), &plan.root_veth(host))?;
    }
    let client = plan.client_ns();
    if namespace_exists(&client) {
        ip(&["netns", "del", &client])?;
    }
    let bridge = plan.bridge();
    if ip_ok(&["link", "show", &bridge]) {
        ip(&["link", "del", &bridge])?;
    }
    Ok(())
}

/// Whether the namespace of `host` exists.
pub fn host_exists(plan: &Plan, host: &Host) -> bool {
    namespace_exists(&plan.ns(host))
}

//! The lab's networks: namespaces, veth pairs and bridges, created with `ip` (idempotently)
//! and removed with their namespaces.

use std::process::Command;

use anyhow::{Context, bail};

use super::plan::{BUSINESS_BRIDGE, HOSTS, Host, MGMT_DEV, Plan, ROLE_LINKS};

/// Runs `ip ARGS`, failing with its error output.
fn ip(args: &[&str]) -> anyhow::Result<()> {
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
fn ip_ok(args: &[&str]) -> bool {
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
    business_up(&n0, &n1)
}

/// The host's namespace, loopback and management link.
fn host_up(plan: &Plan, host: &Host) -> anyhow::Result<()> {
    let ns = plan.ns(host);
    if !namespace_exists(&ns) {
        ip(&["netns", "add", &ns])?;
    }
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    let root_end = plan.root_veth(host);
    let host_end = ip_ok(&["-n", &ns, "link", "show", MGMT_DEV]);
    if !host_end && ip_ok(&["link", "show", &root_end]) {
        // A stale end whose namespace is still dying (see `down`): replace the pair.
        ip(&["link", "del", &root_end])?;
    }
    if !host_end {
        ip(&[
            "link", "add", &root_end, "type", "veth", "peer", "name", MGMT_DEV, "netns", &ns,
        ])?;
        let address = format!("{}/24", plan.mgmt_ip(host));
        ip(&["-n", &ns, "addr", "add", &address, "dev", MGMT_DEV])?;
    }
    ip(&["link", "set", &root_end, "master", &plan.bridge(), "up"])?;
    ip(&["-n", &ns, "link", "set", MGMT_DEV, "up"])
}

/// A veth pair named `dev` on both ends, one end in each namespace.
fn veth_between(ns_a: &str, ns_b: &str, dev: &str) -> anyhow::Result<()> {
    ip(&[
        "link", "add", dev, "netns", ns_a, "type", "veth", "peer", "name", dev, "netns", ns_b,
    ])
}

/// The business network: a bridge per host joined by a veth pair, for guests' NICs.
fn business_up(n0: &str, n1: &str) -> anyhow::Result<()> {
    const LINK: &str = "business";
    if !ip_ok(&["-n", n0, "link", "show", LINK]) {
        veth_between(n0, n1, LINK)?;
    }
    for ns in [n0, n1] {
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
        // Delete the root end first: a namespace outlives `netns del` while a killed process's
        // orphaned TCP sockets still retransmit into it, and with it its veth pairs would.
        let root_end = plan.root_veth(host);
        if ip_ok(&["link", "show", &root_end]) {
            ip(&["link", "del", &root_end])?;
        }
        let ns = plan.ns(host);
        if namespace_exists(&ns) {
            ip(&["netns", "del", &ns])?;
        }
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

//! `pvctl lab slow-path`: a slow link rather than a cut one. A token-bucket queue (`tc tbf`,
//! in every kernel; `netem` is not) on one of a node's role links holds what the node sends
//! on it to a byte rate, and queues rather than drops, so TCP sees a thin pipe, not loss.
//! Only the node's own sending is slowed: slowing both directions takes the command on both
//! nodes. The queue outlives `kill-host` and `restore-host` (a link's qdisc stays through
//! down and up); `heal` removes it.

use anyhow::bail;

use super::faults::{NetPath, lab_node, run};
use super::net;
use super::plan::{HOSTS, Plan, ROLE_LINKS};

/// The slowest rate accepted: below it, one full-size frame waits over a second.
const MIN_BYTES_PER_SECOND: u64 = 1000;
/// Bytes the bucket holds: a short burst (a handful of replies and acks) passes at once, so
/// the A-Links' 100 ms keepalives wait only while the node sends more than the rate.
const BURST_BYTES: u64 = 16 << 10;
/// Bytes queued before tbf drops: enough that the lab's TCP flows back off before a drop.
const LIMIT_BYTES: u64 = 4 << 20;

/// `pvctl lab slow-path HOST PATH --bytes-per-second N`: holds what node `name` sends on role
/// link `path` to `rate` bytes per second, replacing any earlier rate on that link.
pub fn slow_path(plan: &Plan, name: &str, path: &str, rate: u64) -> anyhow::Result<()> {
    let path = NetPath::from_name(path)?;
    if path == NetPath::Mgmt {
        bail!(
            "path mgmt cannot be slowed: ibiz0 carries the witness and the system IP too; slow priv0, alink1 or alink2"
        );
    }
    if rate < MIN_BYTES_PER_SECOND {
        bail!("rate {rate} bytes/s is too slow: use at least {MIN_BYTES_PER_SECOND}");
    }
    let (host, ns) = lab_node(plan, name)?;
    let args = tbf_args(path.name(), rate);
    tc(&ns, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    println!(
        "{}: {} sends at most {rate} bytes/s (`pvctl lab heal` removes it)",
        host.name,
        path.name()
    );
    Ok(())
}

/// Removes every slow-path queue from the lab's nodes (the witness has no role links); how
/// many it removed.
pub fn heal(plan: &Plan) -> anyhow::Result<usize> {
    let mut healed = 0;
    let nodes = HOSTS.iter().filter(|h| !h.is_witness());
    for host in nodes.filter(|h| net::host_exists(plan, h)) {
        let ns = plan.ns(host);
        for (link, _) in ROLE_LINKS {
            if is_slowed(&tc(&ns, &["qdisc", "show", "dev", link, "root"])?) {
                tc(&ns, &["qdisc", "del", "dev", link, "root"])?;
                println!("{}: {link} is no longer slowed", host.name);
                healed += 1;
            }
        }
    }
    Ok(healed)
}

/// The `tc` arguments that hold what leaves `link` to `rate` bytes per second.
fn tbf_args(link: &str, rate: u64) -> Vec<String> {
    [
        "qdisc", "replace", "dev", link, "root", "tbf", "rate", // (tc's "bps" is bytes/s)
    ]
    .into_iter()
    .map(String::from)
    .chain([
        format!("{rate}bps"),
        "burst".into(),
        BURST_BYTES.to_string(),
        "limit".into(),
        LIMIT_BYTES.to_string(),
    ])
    .collect()
}

/// Whether `tc qdisc show dev LINK root` output shows a slow-path queue.
fn is_slowed(show: &str) -> bool {
    show.lines().any(|l| l.starts_with("qdisc tbf "))
}

/// Runs `tc ARGS` in namespace `ns`.
fn tc(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["netns", "exec", ns, "tc"];
    all.extend_from_slice(args);
    run("ip", &all, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tbf_args_rate_is_in_bytes_per_second() {
        let args = tbf_args("alink1", 2000);

        assert_eq!(
            args.join(" "),
            "qdisc replace dev alink1 root tbf rate 2000bps burst 16384 limit 4194304"
        );
    }

    #[test]
    fn is_slowed_sees_tbf_only() {
        let tbf = "qdisc tbf 8001: root refcnt 2 rate 16Kbit burst 1600b lat 2.1s \n";
        let plain = "qdisc noqueue 0: root refcnt 2 \n";

        assert_eq!((is_slowed(tbf), is_slowed(plain)), (true, false));
    }

    #[test]
    fn slow_path_refuses_mgmt_and_tiny_rates_before_touching_the_lab() {
        let plan = Plan::new("pv", 100, std::path::Path::new("/nonexistent")).unwrap();

        let mgmt = slow_path(&plan, "n0", "mgmt", 2000).unwrap_err();
        let tiny = slow_path(&plan, "n0", "alink1", 10).unwrap_err();
        let path = slow_path(&plan, "n0", "eth9", 2000).unwrap_err();

        assert!(mgmt.to_string().contains("mgmt cannot be slowed"), "{mgmt}");
        assert!(tiny.to_string().contains("at least 1000"), "{tiny}");
        assert!(path.to_string().contains("unknown path"), "{path}");
    }
}

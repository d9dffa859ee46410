//! Integration tests between two network namespaces joined by two veth links (root only;
//! skipped with a printed reason otherwise). Each endpoint is a child process
//! (`alink-bench peer`) inside its namespace; the test pulls cables with `ip link set down`
//! and drops packets with nftables.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::{Peer, args, link_args, netns_available};
use replicator::fault::NetnsPair;
use serde_json::Value;

/// One test at a time: the stall and timeout checks need the two cores to themselves.
static SERIAL: Mutex<()> = Mutex::new(());

/// Link timeout the peers use (the library default).
/// How long a peer may take to exit after reporting its error, on a loaded machine.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const LINK_TIMEOUT_MS: u64 = 400;
/// The failover stall target.
const STALL_TARGET: Duration = Duration::from_millis(1000);
/// Time for a whole transfer in a debug build, with margin for a loaded CI machine.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long carrier takes to settle after creating veths (notes: under a second).
const CARRIER_TIMEOUT: Duration = Duration::from_secs(5);
const MIB: u64 = 1024 * 1024;

fn lab(tag: &str) -> Option<NetnsPair> {
    if !netns_available(tag) {
        return None;
    }
    let pair = NetnsPair::create(tag, 2).expect("creating namespaces");
    assert!(
        pair.wait_carrier(CARRIER_TIMEOUT),
        "veth carrier did not come up"
    );
    Some(pair)
}

/// Starts a listening peer in namespace b and a connecting one in namespace a.
fn start(pair: &NetnsPair, sink_args: &[&str], source_args: &[&str]) -> (Peer, Peer) {
    let listen: Vec<String> = (0..2)
        .map(|link| format!("{}:0", pair.addr_b(link)))
        .collect();
    let timeout = LINK_TIMEOUT_MS.to_string();
    let mut sink = args(&["--role", "listen", "--timeout-ms", &timeout]);
    sink.extend(args(sink_args));
    sink.extend(link_args(&listen));
    let sink = Peer::spawn("sink", Some(pair.ns_b()), &sink);
    let addrs = sink.ready_addrs();
    let mut source = args(&["--role", "connect", "--timeout-ms", &timeout]);
    source.extend(args(source_args));
    source.extend(link_args(&addrs));
    let source = Peer::spawn("source", Some(pair.ns_a()), &source);
    (sink, source)
}

fn link_stat(event: &Value, link: usize, field: &str) -> u64 {
    event["stats"]["links"][link][field].as_u64().unwrap_or(0)
}

fn link_up(event: &Value, link: usize) -> bool {
    event["stats"]["links"][link]["state"].as_str() == Some("Up")
}

#[test]
fn transfer_256mib_with_link_down_then_up_is_identical_and_link_returns() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(pair) = lab("fo") else { return };
    let bytes = (256 * MIB).to_string();
    let (sink, source) = start(
        &pair,
        &["--mode", "sink", "--verify"],
        &[
            "--mode",
            "source",
            "--verify",
            "--bytes",
            &bytes,
            "--rate-mib",
            "64",
            "--progress-ms",
            "100",
        ],
    );
    source.wait("ready", common::READY_TIMEOUT);
    // Let both links carry data for a while, then pull link 0's cable.
    let carrying = wait_progress(&source, |e| {
        link_stat(e, 0, "bytes_sent") > MIB && link_stat(e, 1, "bytes_sent") > MIB
    });
    assert!(
        carrying.is_some(),
        "both links should carry data before the cut"
    );
    pair.link_down(0).unwrap();
    let down = wait_progress(&source, |e| !link_up(e, 0));
    assert!(down.is_some(), "link 0 should be declared down");
    std::thread::sleep(Duration::from_millis(800));
    pair.link_up(0).unwrap();
    let restored = wait_progress(&source, |e| link_up(e, 0)).expect("link 0 should come back");
    let sent_at_restore = link_stat(&restored.value, 0, "bytes_sent");
    let in_use = wait_progress(&source, |e| {
        link_stat(e, 0, "bytes_sent") > sent_at_restore + MIB
    });
    assert!(
        in_use.is_some(),
        "link 0 should carry data again after it came back"
    );

    let received = sink.wait("done", TRANSFER_TIMEOUT).value;
    let sent = source.wait("done", TRANSFER_TIMEOUT).value;

    assert_eq!(received["bytes"], sent["bytes"]);
    assert_eq!(
        received["crc"], sent["crc"],
        "received bytes differ from sent bytes"
    );
    let stall = Duration::from_micros(received["max_gap_us"].as_u64().unwrap());
    println!("failover stall {stall:?}; source stats {}", sent["stats"]);
    assert!(
        stall < STALL_TARGET,
        "stall {stall:?} over target {STALL_TARGET:?}"
    );
    assert_eq!(
        sent["stats"]["links"][0]["downs"], 1,
        "link 0 went down once"
    );
}

/// Reads `progress` events until one satisfies `check` (None when the transfer ended first).
fn wait_progress(peer: &Peer, check: impl Fn(&Value) -> bool) -> Option<common::Event> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let event = peer.next(Duration::from_secs(5))?;
        match event.name() {
            "progress" if check(&event.value) => return Some(event),
            "done" | "error" => return None,
            _ => {}
        }
    }
    None
}

#[test]
fn both_links_down_reports_peer_unreachable_within_timeout() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(pair) = lab("ur") else { return };
    let (mut sink, mut source) = start(
        &pair,
        &["--mode", "sink"],
        &[
            "--mode",
            "source",
            "--seconds",
            "60",
            "--rate-mib",
            "32",
            "--progress-ms",
            "100",
        ],
    );
    let carrying = wait_progress(&source, |e| {
        link_stat(e, 0, "bytes_sent") > MIB && link_stat(e, 1, "bytes_sent") > MIB
    });
    assert!(
        carrying.is_some(),
        "both links should carry data before the cut"
    );

    pair.link_down(0).unwrap();
    pair.link_down(1).unwrap();
    let cut = Instant::now();
    let source_error = source.wait("error", Duration::from_secs(10));
    let sink_error = sink.wait("error", Duration::from_secs(10));

    assert_eq!(
        source_error.value["kind"], "PeerUnreachable",
        "{}",
        source_error.value
    );
    assert_eq!(
        sink_error.value["kind"], "PeerUnreachable",
        "{}",
        sink_error.value
    );
    let detected = source_error.at - cut;
    println!("peer unreachable reported {detected:?} after both cables were pulled");
    // Silence is detected link_timeout after the last frame; allow one keepalive and scheduling.
    assert!(
        detected < Duration::from_millis(2 * LINK_TIMEOUT_MS + 400),
        "reported after {detected:?}"
    );
    // Ending takes a moment (the endpoint shuts down); on a loaded machine more than one.
    let ended = source.exits_within(EXIT_TIMEOUT) && sink.exits_within(EXIT_TIMEOUT);
    assert!(ended, "both peers should have ended, not hung");
}

#[test]
fn random_loss_on_one_link_keeps_data_identical() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(pair) = lab("ls") else { return };
    pair.add_loss(0, 10).unwrap();
    let bytes = (64 * MIB).to_string();
    let (sink, source) = start(
        &pair,
        &["--mode", "sink", "--verify"],
        &["--mode", "source", "--verify", "--bytes", &bytes],
    );

    let received = sink.wait("done", TRANSFER_TIMEOUT).value;
    let sent = source.wait("done", TRANSFER_TIMEOUT).value;

    println!("with 10% loss on link 0: {}", sent["stats"]);
    assert_eq!(received["bytes"], sent["bytes"]);
    assert_eq!(
        received["crc"], sent["crc"],
        "received bytes differ from sent bytes"
    );
    pair.clear_loss().unwrap();
}

/// A process killed by PID when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_io_in(ns: &str, url: &str, commands: &[&str]) -> (bool, String) {
    let mut command = NetnsPair::command_in(ns, "qemu-io");
    command.args(["-f", "raw", url]);
    for c in commands {
        command.args(["-c", c]);
    }
    let output = command.output().expect("running qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success() && !text.contains("fail"), text)
}

#[test]
fn proxy_carries_qemu_nbd_export_between_namespaces() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(pair) = lab("nbd") else { return };
    assert!(
        Command::new("qemu-nbd").arg("--version").output().is_ok(),
        "qemu-nbd is not installed: run scripts/install-deps.sh"
    );
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    // qemu-nbd listens on namespace b's own loopback: namespace a can only reach it through
    // the proxy, i.e. over the two veth A-Links.
    let nbd = NetnsPair::command_in(pair.ns_b(), "qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "disk",
            "-t",
            "--bind",
            "127.0.0.1",
            "--port",
            "10809",
        ])
        .arg(&image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting qemu-nbd");
    let _nbd = Killed(nbd);
    let (_egress, _ingress) = start(
        &pair,
        &[
            "--mode",
            "proxy-out",
            "--service",
            "nbd",
            "--target",
            "127.0.0.1:10809",
        ],
        &[
            "--mode",
            "proxy-in",
            "--service",
            "nbd",
            "--local",
            "127.0.0.1:10810",
        ],
    );
    let url = "nbd://127.0.0.1:10810/disk";
    // qemu-nbd and the proxy start concurrently: retry the first access briefly.
    let ready = (0..50).any(|_| {
        let (ok, _) = qemu_io_in(pair.ns_a(), url, &["read 0 4k"]);
        ok || {
            std::thread::sleep(Duration::from_millis(200));
            false
        }
    });
    assert!(
        ready,
        "the NBD export never became reachable through the proxy"
    );

    let (written, write_log) = qemu_io_in(
        pair.ns_a(),
        url,
        &["write -P 0xa5 1M 4M", "flush", "read -P 0xa5 1M 4M"],
    );
    let (reread, reread_log) =
        qemu_io_in(pair.ns_a(), url, &["read -P 0xa5 1M 4M", "read -P 0 0 1M"]);

    assert!(written, "write through the proxy failed: {write_log}");
    assert!(
        reread,
        "read back through a new proxied connection failed: {reread_log}"
    );
    let on_disk = std::fs::read(&image).unwrap();
    assert!(
        on_disk[1 << 20..5 << 20].iter().all(|b| *b == 0xa5),
        "the image file lacks the written pattern"
    );
}

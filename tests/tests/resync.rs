//! A host lost during a resync: an HA VM failed over to n1 and its old host is resyncing from
//! it when n1 loses power. The half-copied host holds a copy that is behind, so it never
//! starts the VM; the VM waits for n1 and comes back there with every write it acknowledged.
//!
//! The returning host's resync copies only the guest's few writes, then verifies the whole
//! disk by 8-byte digests at memory speed: unchecked, it ends within a second, before a test
//! can act. So the returning host's A-Links are slowed first: the verify needs one digest
//! reply per extent from it, and at [`RESYNC_ALINK_RATE`] those alone take tens of seconds,
//! however fast or loaded the machine. The test then proves from the logs that it cut the
//! resync before the verify ended, so it can never pass on a resync that had finished.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::ha::{FAILOVER_TIMEOUT, SYNC_TIMEOUT, assert_counts_on, other, protected};
use tests::{Console, GUEST_BOOT_TIMEOUT, Lab, tiny_guest};

/// The disk: 4096 extents for the verify, each costing a digest reply from the slowed host.
const DISK_BYTES: u64 = 4 << 30;
/// Data written into the disk before the first start, past the guest's counter block.
const DATA_BYTES: u64 = 768 << 20;
/// Copying the data over the A-Links (and verifying it) on a loaded machine.
const BIG_SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// What the returning host may send per second on each A-Link during its resync. Idle, with
/// the guest's counter mirrored, a host sends about 3200 (keepalives every 100 ms, acks), so
/// the links stay up; measured, the rest carries about 128 digest replies a second, so the
/// verify of [`DISK_BYTES`] takes about 30 s, while the test needs a second or two to act.
const RESYNC_ALINK_RATE: u64 = 6000;
/// The A-Links, which carry the resync.
const ALINKS: [&str; 2] = ["alink1", "alink2"];

/// Fills `len` bytes of the volume at `path` from offset 1 MiB with bytes no two blocks share,
/// so that no copy can skip them as zeroes.
fn fill(path: &Path, len: u64) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    file.seek(SeekFrom::Start(1 << 20)).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for n in 0..len >> 20 {
        for (i, chunk) in block.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(n << 20 | i as u64).to_le_bytes());
        }
        file.write_all(&block).unwrap();
    }
    file.sync_all().unwrap();
}

/// How many verify passes `host`'s agent finished with the copies equal (the last step of a
/// resync before the peer's copy is current).
fn verified(lab: &Lab, host: &str) -> usize {
    lab.log(host, "agent")
        .lines()
        .filter(|l| l.contains("verify end: equal"))
        .count()
}

/// How many times `host`'s agent was asked to start the domain `uuid` (its log survives the
/// host's power cuts).
fn starts(lab: &Lab, host: &str, uuid: &str) -> usize {
    lab.log(host, "agent")
        .lines()
        .filter(|l| l.contains("domain op begin") && l.contains(uuid) && l.contains("op=\"start\""))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_lost_mid_resync_is_never_started_from_the_half_copied_peer() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvts", 224);
    let mut api = lab.client().await;
    let request = pb::CreateVmRequest {
        mode: pb::ProtectionMode::Ha.into(),
        disks: vec![pb::DiskRequest {
            size_bytes: DISK_BYTES,
            ..tiny_guest("s").disks[0].clone()
        }],
        ..tiny_guest("s")
    };
    let vm = api.create_vm(request).await.unwrap().into_inner();
    fill(&lab.volume_path(&vm.node, &vm.disks[0].volume), DATA_BYTES);
    api.start_vm(pb::StartVmRequest { vm: "s".into() })
        .await
        .unwrap();
    let vm = lab
        .wait_vm("s", "protected", BIG_SYNC_TIMEOUT, protected)
        .await;
    let first = vm.node.clone();
    let second = other(&first);

    // Its host dies: the VM restarts on the peer, simplex.
    lab.kill_host(&first);
    let moved = lab.wait_running_on("s", second, FAILOVER_TIMEOUT).await;
    let console = Console::new(&lab, &moved);
    console.wait_counters(1, GUEST_BOOT_TIMEOUT);

    // The old host returns, slowed, and is resynced from the peer; the peer dies mid-copy.
    for alink in ALINKS {
        lab.slow_path(&first, alink, RESYNC_ALINK_RATE);
    }
    let verified_before = verified(&lab, second);
    lab.restore_host(&first);
    let syncing = lab
        .wait_vm(
            "s",
            &format!("resyncing to {first}"),
            BIG_SYNC_TIMEOUT,
            |vm| {
                vm.protection
                    .as_ref()
                    .is_some_and(|p| p.state == "syncing" && p.sync_done_bytes > 0)
            },
        )
        .await;
    let progress = syncing.protection.clone().unwrap();
    assert_eq!(progress.current_on, [second]);
    assert!(
        progress.sync_bytes_per_second > 0 && progress.sync_eta_seconds.is_some(),
        "no rate or ETA in {progress:?}"
    );
    let starts_before = starts(&lab, &first, &vm.uuid);
    assert!(
        starts_before >= 1,
        "{first}'s agent log shows no start of the VM"
    );
    let cut = Instant::now();
    lab.kill_host(second);
    assert_eq!(
        verified(&lab, second),
        verified_before,
        "the resync's verify ended before {second} was killed: this test cut nothing"
    );
    // Every counter the guest printed was on its disk first.
    let last_printed = console.counters().last().cloned().unwrap();
    eprintln!(
        "killed {second} at {} of {} bytes ({}) to {first} ({} bytes/s, ETA {:?} s)",
        progress.sync_done_bytes,
        progress.sync_total_bytes,
        progress.sync_phase,
        progress.sync_bytes_per_second,
        progress.sync_eta_seconds
    );

    // The half-copied host never starts it: the VM waits for its host.
    let lost = lab
        .wait_vm_state("s", pb::VmState::Lost, FAILOVER_TIMEOUT)
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let waited = lab
        .wait_vm("s", "still lost", FAILOVER_TIMEOUT, |_| true)
        .await;
    assert_eq!((lost.node.as_str(), waited.node.as_str()), (second, second));
    assert_eq!(
        waited.state(),
        pb::VmState::Lost,
        "{:?}",
        waited.state_reason
    );
    assert_eq!(
        starts(&lab, &first, &vm.uuid),
        starts_before,
        "{first} started the VM after the resync was cut ({:.1} s ago)",
        cut.elapsed().as_secs_f64()
    );

    // The peer returns: the VM runs there again with every acknowledged write.
    lab.wait_fenced(second, FAILOVER_TIMEOUT).await;
    lab.restore_host(second);
    let back = lab.wait_running_on("s", second, FAILOVER_TIMEOUT).await;
    let again = Console::new(&lab, &back).wait_counters(1, GUEST_BOOT_TIMEOUT);
    assert!(
        again[0].0 > last_printed.0,
        "acknowledged counter {} lost: {again:?}",
        last_printed.0
    );
}

/// Waits until `host`'s agent log has a line containing `text`, returning it.
async fn wait_logged(lab: &Lab, host: &str, text: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = lab.log(host, "agent").lines().find(|l| l.contains(text)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} in {host}'s agent log within {} s",
            timeout.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The returning host dies while the resync copies the guest's writes to it: the backup's
/// copy-before-write into its copy breaks the guest's next write, QEMU pauses the guest, and
/// the agent drops the resync and resumes the guest on its local disk, same boot, no count
/// lost. The host returns, and the next resync completes where the VM runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_lost_mid_copy_leaves_the_guest_running() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtz", 180);
    let vm = lab.start_protected("r", SYNC_TIMEOUT).await;
    let first = vm.node.clone();
    let second = other(&first);
    lab.kill_host(&first);
    let moved = lab.wait_running_on("r", second, FAILOVER_TIMEOUT).await;
    let before = Console::new(&lab, &moved).wait_counters(1, GUEST_BOOT_TIMEOUT)[0].clone();

    // The copy of the guest's writes (64 KiB) crawls over the slowed links, and every
    // counter write waits for it; the host it goes to dies meanwhile.
    for alink in ALINKS {
        lab.slow_path(second, alink, RESYNC_ALINK_RATE);
    }
    lab.restore_host(&first);
    lab.wait_vm("r", "copying to the returning host", SYNC_TIMEOUT, |vm| {
        vm.protection
            .as_ref()
            .is_some_and(|p| p.state == "syncing" && p.sync_phase == "copy")
    })
    .await;
    lab.kill_host(&first);
    let dropped = wait_logged(&lab, second, "resync drop end", FAILOVER_TIMEOUT).await;
    assert!(dropped.contains("resync drop end: ok"), "{dropped}");
    let counted = assert_counts_on(&lab, &moved, &before, 3);

    lab.wait_fenced(&first, FAILOVER_TIMEOUT).await;
    lab.heal();
    lab.restore_host(&first);
    let back = lab
        .wait_vm("r", "protected again", SYNC_TIMEOUT, protected)
        .await;
    assert_eq!(back.node, second);
    assert_counts_on(&lab, &back, counted.last().unwrap(), 2);
}

//! End to end in the lab: snapshots of a running guest. The second is a fraction of the first;
//! a restored snapshot boots with the counter the disk had when it was taken; a VM keeps 16;
//! deleting a middle one leaves the later ones whole; bad requests are refused clearly. An HA
//! VM's snapshot is kept on both hosts and restores on the survivor after its host dies.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use proto::v1 as pb;
use tests::ha::{FAILOVER_TIMEOUT, SYNC_TIMEOUT, other};
use tests::{
    COUNTER_PERIOD_TIMEOUT, Console, GUEST_BOOT_TIMEOUT, Lab, pvctl_json, pvctl_ok, pvctl_refused,
    tiny_guest, with_request_id,
};

/// The request ID of the snapshot request retried.
const RETRIED_ID: &str = "5e1d7a1c-0000-4000-8000-00000000cafe";

/// Where the test's data sits on the disk (the guest writes only its first block).
const DATA_OFFSET: u64 = 1 << 20;
const DATA_LEN: usize = 8 << 20;

/// The test's data: pseudo-random bytes, the same every time.
fn pattern(len: usize) -> Vec<u8> {
    tests::pattern(0x9e37_79b9_7f4a_7c15, len)
}

fn write_data(volume: &Path) {
    let mut file = OpenOptions::new().write(true).open(volume).unwrap();
    file.seek(SeekFrom::Start(DATA_OFFSET)).unwrap();
    file.write_all(&pattern(DATA_LEN)).unwrap();
    file.sync_all().unwrap();
}

fn data_intact(volume: &Path) -> bool {
    let mut file = std::fs::File::open(volume).unwrap();
    file.seek(SeekFrom::Start(DATA_OFFSET)).unwrap();
    let mut data = vec![0u8; DATA_LEN];
    file.read_exact(&mut data).unwrap();
    data == pattern(DATA_LEN)
}

/// The last counter the console showed.
fn last_counter(console: &Console) -> u64 {
    console.counters().last().map_or(0, |c| c.0)
}

/// Takes a crash-consistent snapshot; returns it with the counters shown just before and
/// just after: the disk it holds had a counter between the two.
fn snapshot(
    lab: &Lab,
    vm: &str,
    console: &Console,
    description: &str,
) -> (serde_json::Value, u64, u64) {
    let before = last_counter(console);
    let taken = pvctl_json(&lab.pvctl(&[
        "--json",
        "vm-snapshot-create",
        vm,
        "--consistency",
        "crash",
        "--description",
        description,
    ]));
    let after = last_counter(console);
    (taken, before, after + 1)
}

/// Takes a snapshot of "snap" with request ID [`RETRIED_ID`]; its ID.
async fn retried_snapshot(api: &mut tests::Client) -> String {
    let request = pb::CreateSnapshotRequest {
        vm: "snap".into(),
        description: "gen 4".into(),
        consistency: pb::Consistency::Crash.into(),
    };
    api.create_snapshot(with_request_id(request, RETRIED_ID))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .id
}

/// Restores snapshot `id` of the stopped VM, starts it and returns the counter it resumed
/// from (the value on the restored disk).
fn restore_and_boot(lab: &Lab, vm: &pb::Vm, id: &str) -> u64 {
    pvctl_ok(&lab.pvctl(&["vm-snapshot-restore", "snap", id]));
    let console = Console::new(lab, vm);
    pvctl_ok(&lab.pvctl(&["vm-start", "snap"]));
    let first = console.wait_counters(1, GUEST_BOOT_TIMEOUT);
    first[0].0 - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_a_running_guest_restore_its_counter() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvtn", 242);
    let mut api = lab.client().await;
    let request = pb::CreateVmRequest {
        mode: pb::ProtectionMode::Unprotected.into(),
        disks: vec![pb::DiskRequest {
            size_bytes: 32 << 20,
            storage_group: "sg0".into(),
            format: pb::DiskFormat::Raw.into(),
        }],
        ..tiny_guest("snap")
    };
    let vm = api.create_vm(request).await.unwrap().into_inner();
    let volume = lab.volume_path(&vm.node, &vm.disks[0].volume);
    write_data(&volume);
    let console = Console::new(&lab, &vm);
    pvctl_ok(&lab.pvctl(&["vm-start", "snap"]));
    console.wait_counters(3, GUEST_BOOT_TIMEOUT);

    // The first snapshot holds the used data; by default it warns that it is crash-consistent.
    let before1 = last_counter(&console);
    let first = lab.pvctl(&[
        "--json",
        "vm-snapshot-create",
        "snap",
        "--description",
        "one",
    ]);
    let warned = String::from_utf8_lossy(&first.stderr).into_owned();
    let first = pvctl_json(&first);
    assert!(warned.contains("crash-consistent"), "{warned}");
    assert_eq!(first["incremental"], false);
    let bytes1 = first["bytes"].as_u64().unwrap();
    assert!(bytes1 >= DATA_LEN as u64, "{first}");
    let window1 = (before1, last_counter(&console) + 1);
    let seen = console.counters().len();
    console.wait_counters(seen + 2, COUNTER_PERIOD_TIMEOUT);

    // The second holds only the changes: the counter block, not the data.
    let (second, ..) = snapshot(&lab, "snap", &console, "two");
    assert_eq!(second["incremental"], true, "{second}");
    let bytes2 = second["bytes"].as_u64().unwrap();
    eprintln!(
        "snapshot 1: {bytes1} B, snapshot 2: {bytes2} B, disk I/O held {} / {} us",
        first["freeze_us"], second["freeze_us"]
    );
    assert!(
        bytes2 * 10 < bytes1,
        "gen2 {bytes2} B is not a fraction of gen1 {bytes1} B"
    );

    let app =
        pvctl_refused(&lab.pvctl(&["vm-snapshot-create", "snap", "--consistency", "application"]));
    assert!(app.contains("no guest agent"), "{app}");

    // Up to 16; the 17th is refused naming the oldest, and nothing changes.
    let (_, before3, after3) = snapshot(&lab, "snap", &console, "three");
    // A retried request (the answer was lost, say) returns its first snapshot, takes none.
    let fourth = retried_snapshot(&mut api).await;
    assert_eq!(
        retried_snapshot(&mut api).await,
        fourth,
        "a retry took a second snapshot"
    );
    for n in 5..=16 {
        snapshot(&lab, "snap", &console, &format!("gen {n}"));
    }
    let listed = pvctl_json(&lab.pvctl(&["--json", "vm-snapshot-list", "snap"]));
    assert_eq!(listed.as_array().unwrap().len(), 16);
    let full = pvctl_refused(&lab.pvctl(&["vm-snapshot-create", "snap", "--consistency", "crash"]));
    assert!(
        full.contains("delete the oldest first: pvctl vm-snapshot-delete snap 1"),
        "{full}"
    );
    let listed = pvctl_json(&lab.pvctl(&["--json", "vm-snapshot-list", "snap"]));
    assert_eq!(listed.as_array().unwrap().len(), 16);
    assert_eq!(
        retried_snapshot(&mut api).await,
        fourth,
        "a retry is answered even with 16 kept"
    );

    // Bad requests: restore while running, an unknown snapshot.
    let running = pvctl_refused(&lab.pvctl(&["vm-snapshot-restore", "snap", "1"]));
    assert!(running.contains("shut it down first"), "{running}");
    let unknown = pvctl_refused(&lab.pvctl(&["vm-snapshot-delete", "snap", "99"]));
    assert!(unknown.contains("has no snapshot 99"), "{unknown}");

    // Restore the first: the guest resumes from the counter its disk had then.
    pvctl_ok(&lab.pvctl(&["vm-poweroff", "snap"]));
    let resumed = restore_and_boot(&lab, &vm, "1");
    assert!(
        (window1.0..=window1.1).contains(&resumed),
        "snapshot 1 was taken with the counter in {window1:?}, the guest resumed from {resumed}"
    );

    // Deleting a middle snapshot (2) leaves the later ones whole: 3 restores its counter and
    // the data written before the first.
    pvctl_ok(&lab.pvctl(&["vm-snapshot-delete", "snap", "2"]));
    pvctl_ok(&lab.pvctl(&["vm-poweroff", "snap"]));
    pvctl_ok(&lab.pvctl(&["vm-snapshot-restore", "snap", "3"]));
    assert!(
        data_intact(&volume),
        "the data before snapshot 1 is not in snapshot 3"
    );
    let console3 = Console::new(&lab, &vm);
    pvctl_ok(&lab.pvctl(&["vm-start", "snap"]));
    let resumed = console3.wait_counters(1, GUEST_BOOT_TIMEOUT)[0].0 - 1;
    assert!(
        (before3..=after3).contains(&resumed),
        "snapshot 3 was taken with the counter in {before3}..={after3}, the guest resumed from {resumed}"
    );
    let ids: Vec<String> = pvctl_json(&lab.pvctl(&["--json", "vm-snapshot-list", "snap"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !ids.contains(&"2".to_string()) && ids.len() == 15,
        "{ids:?}"
    );

    // Deleting the VM deletes its snapshots' files.
    pvctl_ok(&lab.pvctl(&["vm-poweroff", "snap"]));
    pvctl_ok(&lab.pvctl(&["vm-delete", "snap"]));
    let chain = volume
        .with_file_name(".snapshots")
        .join(volume.file_name().unwrap());
    assert!(!chain.exists(), "{} is left", chain.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ha_vms_snapshot_restores_on_the_survivor_of_its_host() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvto", 244);
    let vm = lab.start_protected("hs", SYNC_TIMEOUT).await;
    let node = vm.node.clone();
    let console = Console::new(&lab, &vm);
    console.wait_counters(2, COUNTER_PERIOD_TIMEOUT);

    // Taken on the VM's host and copied to its peer over the A-Links.
    let (taken, before, after) = snapshot(&lab, "hs", &console, "before the cut");
    assert_eq!(
        taken["nodes"],
        serde_json::json!([node, other(&node)]),
        "{taken}"
    );

    // Its host dies: the VM restarts on the peer, which lists and restores the snapshot.
    lab.kill_host(&node);
    let moved = lab
        .wait_running_on("hs", other(&node), FAILOVER_TIMEOUT)
        .await;
    let listed = pvctl_json(&lab.pvctl(&["--json", "vm-snapshot-list", "hs"]));
    assert_eq!(listed[0]["id"], "1", "{listed}");
    pvctl_ok(&lab.pvctl(&["vm-poweroff", "hs"]));
    pvctl_ok(&lab.pvctl(&["vm-snapshot-restore", "hs", "1"]));
    let console = Console::new(&lab, &moved);
    pvctl_ok(&lab.pvctl(&["vm-start", "hs"]));
    let resumed = console.wait_counters(1, GUEST_BOOT_TIMEOUT)[0].0 - 1;
    assert!(
        (before..=after).contains(&resumed),
        "the snapshot was taken with the counter in {before}..={after}, the guest resumed from {resumed} on {}",
        other(&node)
    );
}

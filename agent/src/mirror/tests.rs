use super::qmp::{BlockInfo, disk_file, parse_reply};
use super::*;

/// `query-block` of a libvirt 9.0 domain with two disks (QEMU 10.0.2), shortened.
const QUERY_BLOCK: &str = r#"{"return":[{"io-status":"ok","device":"","locked":false,"removable":false,"inserted":{"node-name":"libvirt-2-format","drv":"raw","file":"/sg0/a.raw","ro":false},"qdev":"/machine/peripheral/ua-vda/virtio-backend","type":"unknown"},{"io-status":"ok","device":"","locked":false,"removable":false,"inserted":{"node-name":"libvirt-1-format","drv":"qcow2","file":"/sg0/b.qcow2","ro":false},"qdev":"/machine/peripheral/ua-vdb/virtio-backend","type":"unknown"}],"id":"libvirt-477"}"#;

/// `query-block-jobs`: vdb's mirror failed (peer lost), vda's is in sync.
const QUERY_JOBS: &str = r#"{"return":[{"auto-finalize":true,"io-status":"ok","device":"pv-mirror-vdb","auto-dismiss":false,"busy":false,"len":16777216,"offset":4096,"status":"concluded","paused":false,"speed":0,"ready":false,"type":"mirror","actively-synced":false,"error":"Input/output error"},{"auto-finalize":true,"io-status":"ok","device":"pv-mirror-vda","auto-dismiss":false,"busy":false,"len":16781312,"offset":16781312,"status":"ready","paused":false,"speed":0,"ready":true,"type":"mirror","actively-synced":true}],"id":"libvirt-11"}"#;

/// `query-named-block-nodes` (flat) while both mirrors exist, shortened.
const QUERY_NODES: &str = r##"{"return":[{"node-name":"#block084","drv":"mirror_top","file":"/sg0/a.raw"},{"node-name":"pv-peer-vdb-qcow2","drv":"qcow2","file":"nbd+unix:///b.qcow2?socket=/state/peer-nbd.sock"},{"node-name":"pv-peer-vdb","drv":"nbd","file":"nbd+unix:///b.qcow2?socket=/state/peer-nbd.sock"},{"node-name":"pv-peer-vda","drv":"nbd","file":"nbd+unix:///a.raw?socket=/state/peer-nbd.sock"},{"node-name":"libvirt-2-format","drv":"raw","file":"/sg0/a.raw"}],"id":"libvirt-12"}"##;

/// vda's node with its verify mark (the disk was resynced incrementally, not yet verified).
const MARKED_NODES: &str = r#"{"return":[{"node-name":"pv-peer-vda","file":"nbd+unix:///a.raw?socket=/s"},{"node-name":"libvirt-2-format","file":"/sg0/a.raw","dirty-bitmaps":[{"name":"pv-resync-vda","count":0,"recording":true},{"name":"pv-verify-vda","count":0}]}]}"#;

/// vda's mirror, sync=none after a resync's final pass, in sync.
const IN_SYNC: &str = r#"{"return":[{"device":"pv-mirror-vda","len":0,"offset":0,"status":"ready","ready":true,"actively-synced":true,"type":"mirror"}]}"#;

fn jobs(text: &str) -> Vec<BlockJob> {
    parse_reply("query-block-jobs", text).unwrap()
}

fn nodes(text: &str) -> Vec<NamedNode> {
    parse_reply("query-named-block-nodes", text).unwrap()
}

#[test]
fn source_node_second_disk_is_found_by_its_device_not_its_number() {
    let blocks: Vec<BlockInfo> = parse_reply("query-block", QUERY_BLOCK).unwrap();

    let node = source_node(&blocks, "vda");

    assert_eq!(node.as_deref(), Some("libvirt-2-format"));
}

#[test]
fn source_node_unknown_device_is_none() {
    let blocks: Vec<BlockInfo> = parse_reply("query-block", QUERY_BLOCK).unwrap();

    let node = source_node(&blocks, "vdc");

    assert_eq!(node, None);
}

#[test]
fn disk_file_of_second_disk_is_its_image() {
    let blocks: Vec<BlockInfo> = parse_reply("query-block", QUERY_BLOCK).unwrap();

    let file = disk_file(&blocks, "vdb");

    assert_eq!(file, Some("/sg0/b.qcow2"));
}

#[test]
fn mirrors_of_jobs_reports_ready_and_failed_in_disk_order() {
    let (jobs, nodes) = (jobs(QUERY_JOBS), nodes(QUERY_NODES));

    let mirrors = mirrors_of(&jobs, &nodes, &[]);

    assert_eq!(
        mirrors,
        vec![
            DiskMirror {
                device: "vda".into(),
                export: "a.raw".into(),
                state: MirrorState::Ready,
                offset: 16781312,
                length: 16781312,
                resync: None,
            },
            DiskMirror {
                device: "vdb".into(),
                export: "b.qcow2".into(),
                state: MirrorState::Failed {
                    error: "Input/output error".into()
                },
                offset: 4096,
                length: 16777216,
                resync: None,
            },
        ]
    );
}

#[test]
fn mirrors_of_ready_job_not_actively_synced_is_syncing() {
    let text = r#"{"return":[{"device":"pv-mirror-vda","len":100,"offset":100,"status":"ready","ready":true,"actively-synced":false,"type":"mirror"}]}"#;

    let mirrors = mirrors_of(&jobs(text), &[], &[]);

    assert_eq!(mirrors[0].state, MirrorState::Syncing);
}

#[test]
fn mirrors_of_in_sync_job_of_an_unverified_disk_is_syncing() {
    let mirrors = mirrors_of(&jobs(IN_SYNC), &nodes(MARKED_NODES), &[]);

    assert_eq!(mirrors[0].state, MirrorState::Syncing);
}

#[test]
fn mirrors_of_cancelled_job_without_error_is_failed() {
    let text = r#"{"return":[{"device":"pv-mirror-vda","len":100,"offset":100,"status":"concluded","ready":false,"actively-synced":true,"type":"mirror"}]}"#;

    let mirrors = mirrors_of(&jobs(text), &[], &[]);

    assert!(matches!(mirrors[0].state, MirrorState::Failed { .. }));
}

#[test]
fn mirrors_of_disk_on_its_target_is_on_peer() {
    let text = r#"{"return":[{"node-name":"pv-peer-vdc","drv":"nbd","file":"nbd+unix:///c.raw?socket=/s"}]}"#;

    let mirrors = mirrors_of(&[], &nodes(text), &["vdc".to_string()]);

    assert_eq!(mirrors[0].state, MirrorState::OnPeer);
    assert_eq!(mirrors[0].export, "c.raw");
}

#[test]
fn device_of_block_reads_our_alias() {
    let block = |qdev: &str| super::qmp::BlockInfo {
        qdev: qdev.into(),
        inserted: None,
    };

    assert_eq!(
        device_of_block(&block("/machine/peripheral/ua-vdb/virtio-backend")),
        Some("vdb".to_string())
    );
    assert_eq!(device_of_block(&block("ua-vdc")), Some("vdc".to_string()));
    assert_eq!(
        device_of_block(&block("/machine/peripheral/ide0-cd0")),
        None
    );
}

#[test]
fn mirrors_of_target_without_job_is_failed() {
    let text = r#"{"return":[{"node-name":"pv-peer-vdc","drv":"nbd","file":"nbd+unix:///c.raw?socket=/s"}]}"#;

    let mirrors = mirrors_of(&[], &nodes(text), &[]);

    assert_eq!(
        mirrors,
        vec![DiskMirror {
            device: "vdc".into(),
            export: "c.raw".into(),
            state: MirrorState::Failed {
                error: "the mirror job is gone while its target remains".into()
            },
            offset: 0,
            length: 0,
            resync: None,
        }]
    );
}

#[test]
fn mirrors_of_running_resync_backup_is_syncing_with_its_progress() {
    let text = r#"{"return":[{"device":"pv-backup-vda","len":720896,"offset":65536,"status":"running","type":"backup"}]}"#;

    let mirrors = mirrors_of(&jobs(text), &nodes(MARKED_NODES), &[]);

    assert_eq!(
        mirrors,
        vec![DiskMirror {
            device: "vda".into(),
            export: "a.raw".into(),
            state: MirrorState::Syncing,
            offset: 65536,
            length: 720896,
            resync: None,
        }]
    );
}

#[test]
fn mirrors_of_failed_resync_backup_is_failed() {
    let text = r#"{"return":[{"device":"pv-backup-vda","len":720896,"offset":0,"status":"concluded","error":"Input/output error","type":"backup"}]}"#;

    let mirrors = mirrors_of(&jobs(text), &[], &[]);

    assert_eq!(
        mirrors[0].state,
        MirrorState::Failed {
            error: "resync: Input/output error".into()
        }
    );
}

#[test]
fn mirrors_of_other_jobs_is_empty() {
    let text = r#"{"return":[{"device":"backup0","len":1,"offset":0,"status":"running","ready":false,"type":"backup"}]}"#;

    let mirrors = mirrors_of(&jobs(text), &[], &[]);

    assert!(mirrors.is_empty());
}

#[test]
fn mirrors_of_sorts_vdaa_after_vdz() {
    let text = r#"{"return":[{"device":"pv-mirror-vdaa","len":1,"offset":0,"status":"running","type":"mirror"},{"device":"pv-mirror-vdz","len":1,"offset":0,"status":"running","type":"mirror"}]}"#;

    let mirrors = mirrors_of(&jobs(text), &[], &[]);

    assert_eq!(
        mirrors
            .iter()
            .map(|m| m.device.as_str())
            .collect::<Vec<_>>(),
        vec!["vdz", "vdaa"]
    );
}

#[test]
fn resync_pending_unverified_disk_in_sync_is_pending() {
    let pending = resync_pending(&jobs(IN_SYNC), &nodes(MARKED_NODES));

    assert!(pending);
}

#[test]
fn resync_pending_failed_backup_is_not_pending() {
    let text = r#"{"return":[{"device":"pv-backup-vda","len":1,"offset":0,"status":"concluded","error":"Input/output error","type":"backup"}]}"#;

    let pending = resync_pending(&jobs(text), &[]);

    assert!(!pending);
}

#[test]
fn resync_pending_plain_mirror_in_sync_is_not_pending() {
    let pending = resync_pending(&jobs(QUERY_JOBS), &nodes(QUERY_NODES));

    assert!(!pending);
}

#[test]
fn runs_backup_waiting_for_the_final_pass_runs() {
    let text = r#"{"return":[{"device":"pv-backup-vda","len":1,"offset":1,"status":"concluded","type":"backup"}]}"#;

    let running = runs(&jobs(text)[0]);

    assert!(running);
}

#[test]
fn export_in_filename_json_form_reads_export() {
    let export = export_in_filename(
        r#"json:{"driver":"nbd","export":"d0.raw","server":{"type":"unix","path":"/s"}}"#,
    );

    assert_eq!(export.as_deref(), Some("d0.raw"));
}

#[test]
fn export_in_filename_local_file_is_none() {
    let export = export_in_filename("/sg0/a.raw");

    assert_eq!(export, None);
}

#[test]
fn socket_in_filename_reads_both_forms() {
    let sockets = [
        socket_in_filename("nbd+unix:///a.raw?socket=/state/peer-nbd/u.sock"),
        socket_in_filename(
            r#"json:{"driver":"nbd","export":"a","server":{"type":"unix","path":"/s"}}"#,
        ),
    ];

    assert_eq!(
        sockets,
        [
            Some(PathBuf::from("/state/peer-nbd/u.sock")),
            Some(PathBuf::from("/s"))
        ]
    );
}

//! Unit tests of the NBD server: requests on exports, write-through and epoch mode.

use super::*;

fn export(size: u64, writable: bool) -> (tempfile::TempDir, Export) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![0u8; usize::try_from(size).unwrap()]).unwrap();
    let export = Export::open("disk0", &path, writable).unwrap();
    (dir, export)
}

fn request(command: Command, offset: u64, length: u32) -> Request {
    Request {
        flags: 0,
        command,
        cookie: 1,
        offset,
        length,
    }
}

#[test]
fn refusal_of_a_read_past_the_end_is_einval() {
    let (_dir, export) = export(4096, true);

    let error = refusal(&export, request(Command::Read, 4000, 200));

    assert_eq!(error, Some(proto::EINVAL));
}

#[test]
fn refusal_of_a_write_to_a_read_only_export_is_eperm() {
    let (_dir, export) = export(4096, false);

    let error = refusal(&export, request(Command::Write, 0, 512));

    assert_eq!(error, Some(proto::EPERM));
}

#[test]
fn refusal_of_an_offset_that_overflows_is_einval() {
    let (_dir, export) = export(4096, true);

    let error = refusal(&export, request(Command::Write, u64::MAX, 512));

    assert_eq!(error, Some(proto::EINVAL));
}

#[test]
fn run_write_then_read_returns_the_data() {
    let (_dir, export) = export(8192, true);
    run(&export, request(Command::Write, 4096, 3), b"abc").unwrap();

    let data = run(&export, request(Command::Read, 4096, 3), &[]).unwrap();

    assert_eq!(data, b"abc");
}

#[test]
fn run_digest_replies_with_the_digest_of_the_range() {
    let (_dir, export) = export(8192, true);
    run(&export, request(Command::Write, 4096, 3), b"abc").unwrap();

    let data = run(&export, request(Command::Digest, 4096, 3), &[]).unwrap();

    assert_eq!(data, proto::digest(b"abc").to_be_bytes());
}

#[test]
fn refusal_of_a_digest_past_the_end_is_einval() {
    let (_dir, export) = export(4096, true);

    let error = refusal(&export, request(Command::Digest, 4000, 200));

    assert_eq!(error, Some(proto::EINVAL));
}

#[test]
fn run_write_zeroes_clears_the_range() {
    let (_dir, export) = export(8192, true);
    run(&export, request(Command::Write, 100, 3), b"abc").unwrap();
    run(&export, request(Command::WriteZeroes, 0, 4096), &[]).unwrap();

    let data = run(&export, request(Command::Read, 100, 3), &[]).unwrap();

    assert_eq!(data, [0, 0, 0]);
}

fn file(dir: &tempfile::TempDir, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(dir.path().join("disk.raw")).unwrap()[offset..offset + len].to_vec()
}

#[test]
fn hold_of_a_write_in_epoch_mode_leaves_the_file_unchanged() {
    let (dir, export) = export(8192, true);
    export.begin_epochs();

    let error = hold(
        &export,
        request(Command::Write, 4096, 3),
        &mut b"abc".to_vec(),
    );

    assert_eq!(error, Some(0));
    assert_eq!(file(&dir, 4096, 3), [0, 0, 0]);
}

#[test]
fn run_read_in_epoch_mode_sees_the_held_write() {
    let (_dir, export) = export(8192, true);
    export.begin_epochs();
    hold(
        &export,
        request(Command::Write, 4097, 3),
        &mut b"abc".to_vec(),
    );

    let data = run(&export, request(Command::Read, 4096, 5), &[]).unwrap();

    assert_eq!(data, b"\0abc\0");
}

#[test]
fn commit_applies_overlapping_held_writes_in_order() {
    let (dir, export) = export(8192, true);
    export.begin_epochs();
    hold(
        &export,
        request(Command::Write, 100, 4),
        &mut b"aaaa".to_vec(),
    );
    hold(
        &export,
        request(Command::Write, 101, 2),
        &mut b"bb".to_vec(),
    );

    let applied = export.commit().unwrap();

    assert_eq!(
        applied,
        EpochApplied {
            writes: 2,
            bytes: 6
        }
    );
    assert_eq!(file(&dir, 100, 4), b"abba");
}

#[test]
fn commit_empties_the_log_but_stays_in_epoch_mode() {
    let (dir, export) = export(8192, true);
    export.begin_epochs();
    hold(&export, request(Command::Write, 0, 1), &mut b"a".to_vec());
    export.commit().unwrap();

    let error = hold(&export, request(Command::Write, 1, 1), &mut b"b".to_vec());

    assert_eq!(error, Some(0));
    assert_eq!(export.held().as_ref().map(Log::len), Some(1));
    assert_eq!(file(&dir, 0, 2), b"a\0");
}

#[test]
fn commit_out_of_epoch_mode_is_not_in_epochs() {
    let (_dir, export) = export(8192, true);

    let committed = export.commit();

    assert!(matches!(committed, Err(Error::NotInEpochs { name }) if name == "disk0"));
}

#[test]
fn end_epochs_drops_the_held_writes_and_writes_through_again() {
    let (dir, export) = export(8192, true);
    export.begin_epochs();
    hold(&export, request(Command::Write, 0, 3), &mut b"abc".to_vec());

    let dropped = export.end_epochs();

    assert_eq!(dropped, 1);
    assert_eq!(
        run(&export, request(Command::Read, 0, 3), &[]).unwrap(),
        [0, 0, 0]
    );
    assert_eq!(
        hold(&export, request(Command::Write, 0, 3), &mut b"abc".to_vec()),
        None
    );
    assert_eq!(file(&dir, 0, 3), [0, 0, 0]);
}

#[test]
fn hold_of_write_zeroes_in_epoch_mode_is_seen_then_committed() {
    let (dir, export) = export(8192, true);
    run(&export, request(Command::Write, 0, 4), b"abcd").unwrap();
    export.begin_epochs();
    hold(
        &export,
        request(Command::WriteZeroes, 1, 2),
        &mut Vec::new(),
    );

    let before = run(&export, request(Command::Read, 0, 4), &[]).unwrap();
    let in_file = file(&dir, 0, 4);
    export.commit().unwrap();

    assert_eq!(before, b"a\0\0d");
    assert_eq!(in_file, b"abcd");
    assert_eq!(file(&dir, 0, 4), b"a\0\0d");
}

#[test]
fn run_digest_in_epoch_mode_sees_the_held_write() {
    let (_dir, export) = export(8192, true);
    export.begin_epochs();
    hold(
        &export,
        request(Command::Write, 4096, 3),
        &mut b"abc".to_vec(),
    );

    let data = run(&export, request(Command::Digest, 4096, 3), &[]).unwrap();

    assert_eq!(data, proto::digest(b"abc").to_be_bytes());
}

#[test]
fn hold_of_a_flush_in_epoch_mode_replies_done() {
    let (_dir, export) = export(8192, true);
    export.begin_epochs();

    let error = hold(&export, request(Command::Flush, 0, 0), &mut Vec::new());

    assert_eq!(error, Some(0));
}

#[test]
fn hold_of_a_write_past_the_cap_is_enospc_and_not_held() {
    let (_dir, mut export) = export(16384, true);
    export.max_held = 6000;
    export.begin_epochs();
    hold(
        &export,
        request(Command::Write, 0, 4096),
        &mut vec![1; 4096],
    );

    let error = hold(
        &export,
        request(Command::Write, 4096, 4096),
        &mut vec![2; 4096],
    );

    assert_eq!(error, Some(proto::ENOSPC));
    assert_eq!(export.held().as_ref().map(Log::len), Some(1));
}

#[test]
fn hold_out_of_epoch_mode_leaves_the_write_to_run() {
    let (_dir, export) = export(8192, true);
    let mut payload = b"abc".to_vec();

    let error = hold(&export, request(Command::Write, 0, 3), &mut payload);

    assert_eq!(error, None);
    assert_eq!(payload, b"abc");
}

#[test]
fn run_write_out_of_epoch_mode_reaches_the_file() {
    let (dir, export) = export(8192, true);

    run(&export, request(Command::Write, 0, 3), b"abc").unwrap();

    assert_eq!(file(&dir, 0, 3), b"abc");
}

#[test]
fn begin_epochs_again_keeps_the_held_writes() {
    let (_dir, export) = export(8192, true);
    export.begin_epochs();
    hold(&export, request(Command::Write, 0, 3), &mut b"abc".to_vec());

    export.begin_epochs();

    assert_eq!(export.held().as_ref().map(Log::len), Some(1));
}

#[test]
fn begin_epochs_of_an_unknown_export_is_unknown_export() {
    let exports = Exports::default();

    let begun = exports.begin_epochs("nosuch");

    assert!(matches!(begun, Err(Error::UnknownExport { name }) if name == "nosuch"));
}

#[tokio::test(flavor = "current_thread")]
async fn commit_epoch_of_an_unknown_export_is_unknown_export() {
    let exports = Exports::default();

    let committed = exports.commit_epoch("nosuch").await;

    assert!(matches!(committed, Err(Error::UnknownExport { name }) if name == "nosuch"));
}

#[tokio::test(flavor = "current_thread")]
async fn end_epochs_of_an_unknown_export_is_unknown_export() {
    let exports = Exports::default();

    let ended = exports.end_epochs("nosuch").await;

    assert!(matches!(ended, Err(Error::UnknownExport { name }) if name == "nosuch"));
}

#[tokio::test(flavor = "current_thread")]
async fn remove_in_epoch_mode_drops_the_held_writes() {
    let (dir, export) = export(8192, true);
    let exports = Exports::default();
    exports.insert("disk0", export);
    exports.begin_epochs("disk0").unwrap();
    let kept = exports.get("disk0").unwrap();
    hold(&kept, request(Command::Write, 0, 3), &mut b"abc".to_vec());

    exports.remove("disk0").await;

    assert!(kept.held().is_none());
    assert_eq!(file(&dir, 0, 3), [0, 0, 0]);
}

#[test]
fn flags_of_a_writable_export_offer_flush_fua_and_zeroes() {
    let (_dir, export) = export(4096, true);

    let flags = export.flags();

    assert_eq!(
        flags,
        proto::TX_HAS_FLAGS
            | proto::TX_SEND_FLUSH
            | proto::TX_SEND_FUA
            | proto::TX_SEND_WRITE_ZEROES
    );
}

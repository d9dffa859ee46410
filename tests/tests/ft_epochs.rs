//! FT's data path end to end on real QEMU (no lab): a primary tiny guest checkpointed every
//! 50 ms to a standby QEMU, its serial output held until each epoch commits; then the
//! primary's QEMU is killed and the standby resumes from the last committed epoch. Asserts
//! what the guest shows: the same boot id (no reboot); the released output (the primary's,
//! then the standby's) counting on with no gap and no repeat; and the standby's disk agreeing
//! with its memory (the first counter it prints is the one on its disk, or the next).

use std::time::Duration;

use agent::ft::epoch::{self, Settings};
use tests::ft_rig::{self, FtRig};
use tokio::sync::{mpsc, watch};

/// Epochs to commit before the primary dies.
const EPOCHS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_resumes_from_the_last_committed_epoch_with_the_same_boot() {
    if tests::skip() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let rig = FtRig::boot(dir.path(), 256).await;
    let primary = rig.primary().await;
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let (_stop_tx, stop) = watch::channel(false);
    let looping = tokio::spawn(epoch::run(primary, Settings::default(), stop, reports_tx));

    let mut pauses = Vec::new();
    let mut looping = Some(looping);
    while pauses.len() < EPOCHS {
        let report = tokio::time::timeout(Duration::from_secs(120), reports.recv())
            .await
            .expect("an epoch within 2 minutes");
        match report {
            Some(report) => pauses.push(report),
            None => {
                let ended = looping.take().unwrap().await.unwrap();
                panic!(
                    "the epoch loop ended after {} epochs: {ended:?}",
                    pauses.len()
                );
            }
        }
    }
    let looping = looping.unwrap();
    let boot = ft_rig::wait_counters(&rig.primary_log(), 1).await[0]
        .1
        .clone();
    rig.kill_primary();
    let ended = tokio::time::timeout(Duration::from_secs(30), looping)
        .await
        .expect("the epoch loop ends once its guest is gone")
        .unwrap();
    assert!(
        ended.is_err(),
        "the epoch loop must report the lost primary"
    );
    let released = ft_rig::counters(&rig.primary_log());
    let last_released = released.last().unwrap().0;

    // Before activation the replica holds only committed writes.
    let (on_disk, disk_boot) = rig.replica_counter().expect("a counter on the replica");
    assert_eq!(disk_boot, boot);
    let activated = rig
        .standbys()
        .activate(ft_rig::VM, dir.path())
        .await
        .unwrap();
    eprintln!("activated: {activated:?}");

    let resumed = ft_rig::wait_counters(&rig.standby_log(), 3).await;
    let first = resumed[0].0;
    assert!(
        first == on_disk || first == on_disk + 1,
        "the standby printed {first} first but its disk held {on_disk}: memory and disk disagree"
    );
    let seen: Vec<(u64, String)> = released.iter().chain(&resumed).cloned().collect();
    assert_eq!(seen[0].1, boot);
    eprintln!("the primary released up to COUNTER {last_released}; the standby went on");
    ft_rig::assert_one_run(&seen);
    let mut ms: Vec<f64> = pauses.iter().map(|r| r.pause.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    eprintln!(
        "{} epochs: pause p50 {:.1} ms, max {:.1} ms; first report {:?}",
        ms.len(),
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        pauses[1]
    );
}

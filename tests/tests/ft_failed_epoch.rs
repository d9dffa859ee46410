//! A failed FT epoch on real QEMU: the standby's disk goes away, so it refuses the next
//! epoch; the primary's guest must run on, unprotected, with its output no longer held. Its
//! own test binary: libvirt opens one embed root per process.

use std::time::Duration;

use tests::ft_rig::{self, Epochs, FtRig, more_epochs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_epoch_leaves_the_guest_running_unprotected() {
    if tests::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rig = FtRig::boot(dir.path(), 256).await;
    let Epochs {
        looping,
        mut reports,
        ..
    } = rig.run_epochs().await;
    more_epochs(&mut reports, 10).await;
    let boot = ft_rig::counters(&rig.primary_log())[0].1.clone();

    // The standby's disk goes away: its next commit fails and it refuses the epoch.
    rig.n1.unexport(ft_rig::VM).await;
    let ended = tokio::time::timeout(Duration::from_secs(60), looping)
        .await
        .expect("the epoch loop ends once an epoch fails")
        .unwrap();
    let error = ended.expect_err("a refused epoch ends the loop");
    eprintln!("the loop ended with: {error}");

    // The guest runs on, and its output flows unheld.
    let had = ft_rig::counters(&rig.primary_log()).len();
    let printed = ft_rig::wait_counters(&rig.primary_log(), had + 3).await;
    assert!(
        printed.iter().all(|(_, b)| b == &boot),
        "the guest rebooted: {printed:?}"
    );
    assert!(
        printed.windows(2).all(|p| p[1].0 == p[0].0 + 1),
        "{printed:?}"
    );
}

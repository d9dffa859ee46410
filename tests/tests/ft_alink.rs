//! FT over the A-Links with one of them pulled (its relay goes silent, like a cable pulled)
//! while the epoch loop runs on real QEMU: the replicator carries the epochs over the other
//! link, no epoch fails, and the guest counts on. Its own test binary: libvirt opens one embed
//! root per process.

use tests::ft_rig::{self, Epochs, FtRig, more_epochs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_a_link_pulled_does_not_stop_the_epochs() {
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

    rig.links[0].cut();
    let after_cut = more_epochs(&mut reports, 40).await;
    rig.links[0].restore();
    more_epochs(&mut reports, 10).await;

    assert!(
        !looping.is_finished(),
        "the epoch loop ended: {:?}",
        looping.await
    );
    let longest = after_cut.iter().map(|r| r.pause).max().unwrap();
    eprintln!("longest pause after the cut: {longest:?}");
    let printed = ft_rig::counters(&rig.primary_log());
    assert!(
        printed.windows(2).all(|p| p[1].0 == p[0].0 + 1),
        "{printed:?}"
    );
}

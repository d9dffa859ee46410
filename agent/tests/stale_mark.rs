//! Stale marks against a real etcd: a mark lands only while this host holds the lease and
//! the VM's owner generation that its mirror path was made under.

use std::time::Duration;

use agent::stale::{Grant, LocalMark, Marker};
use daemon::etcd::Etcd;
use daemon::pair;
use etcd_client::{Client, PutOptions};
use tokio::sync::watch;

mod etcd_member;
mod process;

use etcd_member::EtcdMember;

const VM: &str = "6f9a3c1e-0000-4000-8000-0000000000a1";

/// Registers host n0 under a new lease and records the VM's owner generation; answers the
/// lease and a marker for n0.
async fn registered(member: &EtcdMember, client: &mut Client, generation: u64) -> (i64, Marker) {
    let lease = client.lease_grant(60, None).await.expect("lease").id();
    client
        .put(
            pair::node_key("n0"),
            "{}",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("register n0");
    set_owner(client, generation).await;
    let etcd = Etcd::connect(
        std::slice::from_ref(&member.endpoint),
        Some(Duration::from_secs(5)),
    )
    .await
    .expect("connect");
    let (_tx, rx) = watch::channel(lease);
    (lease, Marker::new(etcd, "n0".into(), rx))
}

async fn set_owner(client: &mut Client, generation: u64) {
    client
        .put(pair::owner_key(VM), pair::owner_value(generation), None)
        .await
        .expect("owner");
}

async fn mark_exists(client: &mut Client) -> bool {
    let response = client
        .get(pair::stale_key(VM), None)
        .await
        .expect("get mark");
    !response.kvs().is_empty()
}

#[tokio::test]
async fn a_mark_lands_under_the_owner_generation_of_its_path() {
    let member = EtcdMember::start();
    let mut client = member.client().await;
    let (lease, marker) = registered(&member, &mut client, 7).await;
    let grant = Grant {
        lease,
        generation: 7,
    };

    let hold = marker.hold(VM, "n1", grant, 1);
    tokio::time::timeout(Duration::from_secs(10), hold())
        .await
        .expect("the mark is written and the hold released");

    assert!(mark_exists(&mut client).await);
    assert!(!marker.refused(VM));
}

#[tokio::test]
async fn a_mark_after_the_pair_moved_the_vm_is_refused_and_holds_forever() {
    let member = EtcdMember::start();
    let mut client = member.client().await;
    let (lease, marker) = registered(&member, &mut client, 7).await;
    let hold = marker.hold(
        VM,
        "n1",
        Grant {
            lease,
            generation: 7,
        },
        1,
    );
    // The pair failed the VM over to n1: a new generation, committed before the mirror broke.
    set_owner(&mut client, 8).await;

    let held = tokio::time::timeout(Duration::from_secs(3), hold()).await;

    assert!(
        held.is_err(),
        "a superseded host must never release its guest's I/O"
    );
    assert!(
        !mark_exists(&mut client).await,
        "no mark may name n1's copy behind"
    );
    assert!(
        marker.refused(VM),
        "the refusal is remembered for the run's cleanup"
    );
    let local = marker.mark_local_behind(VM).await.expect("etcd answers");
    assert_eq!(local, LocalMark::Superseded);
    assert!(!mark_exists(&mut client).await);
}

//! The host lease against a real etcd when one member hangs: a member that accepts
//! connections and never answers (a host that froze, or a member still forwarding to a dead
//! Raft leader) must not hold up renewals that another member can answer.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use daemon::etcd::Etcd;
use daemon::lease::{self, LeaseStatus, LeaseView};
use tokio::sync::watch;

mod etcd_member;
mod process;

use etcd_member::EtcdMember;

/// How long a call may wait on the hung member: far longer than any answer from a live one.
const HUNG_WAIT: Duration = Duration::from_secs(30);
/// The earliest a connection to the hung member fails (etcd's client pings it every 2 s and
/// gives up 2 s later): a client that asked it first and moved on only then answers later.
const HUNG_NOTICED: Duration = Duration::from_secs(2);

/// A listener that takes connections into its backlog and never answers; the endpoint.
fn hung_member() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let port = listener.local_addr().expect("its address").port();
    (listener, format!("http://127.0.0.1:{port}"))
}

/// The hung member first, as a client that prefers it would hold it.
async fn clients(live: &EtcdMember, hung: &str) -> Etcd {
    Etcd::connect(&[hung.to_string(), live.endpoint.clone()], None)
        .await
        .expect("etcd clients")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_every_member_is_answered_by_the_live_one() {
    let live = EtcdMember::start();
    let mut client = live.client().await;
    client.put("k", "v", None).await.expect("put");
    let (_listener, hung) = hung_member();
    let etcd = clients(&live, &hung).await;

    let started = Instant::now();
    let value = etcd
        .request_any("reading k", HUNG_WAIT, |mut c| async move {
            let got = c.get("k", None).await?;
            Ok(got.kvs().first().map(|kv| kv.value().to_vec()))
        })
        .await
        .expect("the live member answers");

    assert_eq!(value.as_deref(), Some(b"v".as_slice()));
    let took = started.elapsed();
    assert!(
        took < HUNG_NOTICED,
        "the answer waited for the hung member: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_ends_its_keeper_despite_a_hung_member() {
    let live = EtcdMember::start();
    let mut client = live.client().await;
    let (_listener, hung) = hung_member();
    let etcd = clients(&live, &hung).await;
    let ttl = Duration::from_secs(30);
    let granting = Etcd::connect(std::slice::from_ref(&live.endpoint), None)
        .await
        .expect("etcd client");
    let (lease, granted) = lease::grant(&granting, 30, HUNG_WAIT)
        .await
        .expect("a lease");
    let (view, mut seen) = watch::channel(LeaseView::NONE);
    let keeper = tokio::spawn(lease::keep(etcd, lease, ttl, granted, view));
    seen.wait_for(|v| v.status() == LeaseStatus::Alive)
        .await
        .expect("the keeper publishes");

    client.lease_revoke(lease).await.expect("revoke");
    let ended = tokio::time::timeout(HUNG_WAIT, keeper)
        .await
        .expect("the keeper ends before a hung call could")
        .expect("the keeper task");

    assert!(matches!(ended, lease::Error::Expired { .. }), "{ended}");
    assert_eq!(seen.borrow().status(), LeaseStatus::Expired);
}

//! The HA replica service on loopback: two `Replicas` joined by two A-Links (one side listens
//! on two 127.0.0.1 ports, the other dials them). QEMU's NBD client (`qemu-io`, from
//! qemu-utils) and a raw NBD client on one side's peer socket reach the other side's exports
//! across the links; unexporting refuses new connections and closes open ones.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use agent::config::{AlinkConfig, AlinkRole};
use agent::nbd::proto;
use agent::replica::Replicas;
use common::bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const SIZE: usize = 1 << 20;
const VM: &str = "6c3f8a3e-0b55-4b8e-9d6b-1f6f8f0d2a11";
/// Time for both sides to bring both links up: a debug build on a loaded 2-core machine.
const LINKS_UP: Duration = Duration::from_secs(30);
/// Bound on a step that finishes at once when all is well; only catches hangs.
const NO_HANG: Duration = Duration::from_secs(60);

/// Side `a` listens, side `b` dials; each has its own state directory with one 1 MiB file.
struct Pair {
    a: Replicas,
    b: Replicas,
    dir_a: tempfile::TempDir,
    dir_b: tempfile::TempDir,
}

impl Pair {
    fn groups(dir: &std::path::Path) -> agent::storage::StorageGroups {
        let groups = [("sg0".to_string(), dir.join("sg0"))].into_iter().collect();
        agent::storage::StorageGroups::open(groups).unwrap()
    }

    async fn start() -> Pair {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let loopback = "127.0.0.1:0".parse().unwrap();
        let listen = AlinkConfig {
            role: AlinkRole::Listen,
            links: vec![loopback, loopback],
            tls: None,
        };
        let a = Replicas::start("a", &listen, dir_a.path(), Self::groups(dir_a.path()))
            .await
            .unwrap();
        let connect = AlinkConfig {
            role: AlinkRole::Connect,
            links: a.link_addrs().to_vec(),
            tls: None,
        };
        let b = Replicas::start("b", &connect, dir_b.path(), Self::groups(dir_b.path()))
            .await
            .unwrap();
        let up = a.wait_links_up(2, LINKS_UP).await && b.wait_links_up(2, LINKS_UP).await;
        assert!(up, "the A-Links did not come up within {LINKS_UP:?}");
        for dir in [&dir_a, &dir_b] {
            std::fs::write(dir.path().join("disk0.raw"), vec![0u8; SIZE]).unwrap();
        }
        Pair { a, b, dir_a, dir_b }
    }

    fn disk_a(&self) -> PathBuf {
        self.dir_a.path().join("disk0.raw")
    }

    fn disk_b(&self) -> PathBuf {
        self.dir_b.path().join("disk0.raw")
    }
}

/// Runs `qemu-io` on export `export` behind the Unix socket `socket`, off the runtime (the
/// proxies and the server answer on it meanwhile).
async fn qemu_io(socket: &Path, export: &str, commands: &[&str]) -> Output {
    let mut args = vec!["--image-opts".to_string()];
    for command in commands {
        args.push("-c".into());
        args.push((*command).to_string());
    }
    args.push(format!(
        "driver=nbd,server.type=unix,server.path={},export={export}",
        socket.display()
    ));
    let run = tokio::task::spawn_blocking(move || {
        Command::new("qemu-io")
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("running qemu-io (install qemu-utils): {e}"))
    });
    tokio::time::timeout(NO_HANG, run).await.unwrap().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A raw NBD client on `socket`: handshake and `GO` for `export`, ready for requests.
async fn raw_client(socket: &Path, export: &str) -> UnixStream {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    common::handshake(&mut stream, export).await;
    stream
}

/// A WRITE request of `data` at `offset`.
fn write_request(cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    out.extend_from_slice(data);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_writes_through_the_peer_socket_land_in_the_peers_file() {
    let pair = Pair::start().await;
    let exports = pair
        .b
        .export(VM, &[("disk0".into(), pair.disk_b())])
        .await
        .unwrap();

    let output = qemu_io(
        &pair.a.peer_socket_for(VM, |_| None, false).await.unwrap().0,
        "disk0",
        &["write -P 0xab 4096 8192", "flush", "read -P 0xab 4096 8192"],
    )
    .await;

    let text = text(&output);
    assert!(output.status.success(), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert_eq!(exports, ["disk0"]);
    assert_eq!(bytes(&pair.disk_b(), 4096, 8192), vec![0xab; 8192]);
    assert_eq!(bytes(&pair.disk_b(), 0, 4096), vec![0; 4096]);
    assert_eq!(bytes(&pair.disk_a(), 4096, 8192), vec![0; 8192]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listening_side_serves_the_dialing_side_too() {
    let pair = Pair::start().await;
    pair.a
        .export(VM, &[("disk0".into(), pair.disk_a())])
        .await
        .unwrap();

    let output = qemu_io(
        &pair.b.peer_socket_for(VM, |_| None, false).await.unwrap().0,
        "disk0",
        &["write -P 0x5a 0 4096"],
    )
    .await;

    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(bytes(&pair.disk_a(), 0, 4096), vec![0x5a; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_unexport_a_new_connection_cannot_open_the_export() {
    let pair = Pair::start().await;
    pair.b
        .export(VM, &[("disk0".into(), pair.disk_b())])
        .await
        .unwrap();

    let dropped = pair.b.unexport(VM).await;
    let output = qemu_io(
        &pair.a.peer_socket_for(VM, |_| None, false).await.unwrap().0,
        "disk0",
        &["write -P 0x77 0 4096"],
    )
    .await;

    assert_eq!(dropped, ["disk0"]);
    assert!(!pair.b.exported(VM));
    assert!(!output.status.success(), "{}", text(&output));
    assert_eq!(bytes(&pair.disk_b(), 0, 4096), vec![0; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexport_closes_an_open_connection_before_its_next_write() {
    let pair = Pair::start().await;
    pair.b
        .export(VM, &[("disk0".into(), pair.disk_b())])
        .await
        .unwrap();
    let mut client = raw_client(
        &pair.a.peer_socket_for(VM, |_| None, false).await.unwrap().0,
        "disk0",
    )
    .await;
    client
        .write_all(&write_request(1, 0, &[0x11; 512]))
        .await
        .unwrap();
    let mut reply = [0u8; 16];
    client.read_exact(&mut reply).await.unwrap();

    pair.b.unexport(VM).await;
    // The connection may already be closed: a failed send is as good as an unanswered one.
    let _ = client.write_all(&write_request(2, 512, &[0x22; 512])).await;
    let mut rest = Vec::new();
    let after = tokio::time::timeout(NO_HANG, client.read_to_end(&mut rest))
        .await
        .unwrap();

    assert_eq!(reply, proto::simple_reply(0, 1));
    assert!(matches!(after, Ok(0) | Err(_)), "{after:?}: {rest:?}");
    assert_eq!(bytes(&pair.disk_b(), 0, 512), vec![0x11; 512]);
    assert_eq!(bytes(&pair.disk_b(), 512, 512), vec![0; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_again_is_idempotent_and_another_vm_cannot_take_the_name() {
    let pair = Pair::start().await;
    let volumes = [("disk0".to_string(), pair.disk_b())];
    pair.b.export(VM, &volumes).await.unwrap();

    let again = pair.b.export(VM, &volumes).await.unwrap();
    let other = pair
        .b
        .export("0e5b1c1d-7d2a-4c55-8f0e-2b9f3f1d4a22", &volumes)
        .await;

    assert_eq!(again, ["disk0"]);
    assert!(pair.b.exported(VM));
    assert!(
        matches!(other, Err(agent::replica::Error::ClaimExport { .. })),
        "{other:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_connection_stays_open_after_unexport_until_the_hold_returns() {
    let pair = Pair::start().await;
    pair.b
        .export(VM, &[("disk0".into(), pair.disk_b())])
        .await
        .unwrap();
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let hold: replicator::proxy::Hold = std::sync::Arc::new(move || {
        let (entered_tx, mut released) = (entered_tx.clone(), released.clone());
        Box::pin(async move {
            let _ = entered_tx.send(());
            let _ = released.wait_for(|r| *r).await;
        })
    });
    let (socket, _) = pair
        .a
        .peer_socket_for(VM, |_| Some(hold), true)
        .await
        .unwrap();
    let mut client = raw_client(&socket, "disk0").await;
    client
        .write_all(&write_request(1, 0, &[0x11; 512]))
        .await
        .unwrap();
    let mut reply = [0u8; 16];
    client.read_exact(&mut reply).await.unwrap();

    pair.b.unexport(VM).await;
    let _ = client.write_all(&write_request(2, 512, &[0x22; 512])).await;
    tokio::time::timeout(NO_HANG, entered.recv())
        .await
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    let while_held =
        tokio::time::timeout(Duration::from_millis(500), client.read_to_end(&mut rest)).await;
    release.send(true).unwrap();
    let after = tokio::time::timeout(NO_HANG, client.read_to_end(&mut rest))
        .await
        .unwrap();

    assert_eq!(reply, proto::simple_reply(0, 1));
    assert!(
        while_held.is_err(),
        "the client learned of the peer's end while held: {while_held:?}"
    );
    assert!(matches!(after, Ok(0) | Err(_)), "{after:?}: {rest:?}");
    assert_eq!(bytes(&pair.disk_b(), 512, 512), vec![0; 512]);
}

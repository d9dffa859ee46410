//! The NBD server's FT epoch mode against QEMU's own NBD client (`qemu-io`, from qemu-utils)
//! on loopback: writes are held (the file is unchanged, yet QEMU reads them back), a commit
//! applies them in order, and ending epochs drops what is held and writes through again.

use std::path::{Path, PathBuf};
use std::process::Command;

use agent::nbd::{EpochApplied, Export, Exports, serve};
use tokio::net::TcpListener;

const SIZE: usize = 16 << 20;

struct Server {
    port: u16,
    dir: tempfile::TempDir,
    exports: Exports,
}

impl Server {
    fn disk(&self) -> PathBuf {
        self.dir.path().join("disk0.raw")
    }

    fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/disk0", self.port)
    }
}

/// `len` bytes of the file at `path` from `offset`.
fn bytes(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[offset..offset + len].to_vec()
}

/// A server exporting `disk0` (16 MiB, writable, zeroed), in epoch mode.
async fn server_in_epochs() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk0.raw");
    std::fs::write(&path, vec![0u8; SIZE]).unwrap();
    let exports = Exports::default();
    exports.insert("disk0", Export::open("disk0", &path, true).unwrap());
    exports.begin_epochs("disk0").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(serve(listener, exports.clone()));
    Server { port, dir, exports }
}

/// `qemu-io` on `url` with `commands`, off the runtime; returns its output, failing on a
/// failed command or a pattern that did not verify.
async fn qemu_io(url: String, commands: &[&str]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for command in commands {
        args.push("-c".into());
        args.push((*command).to_string());
    }
    args.push(url);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("qemu-io")
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("running qemu-io (install qemu-utils): {e}"))
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "qemu-io {commands:?}: {text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_writes_are_read_back_but_reach_the_file_only_at_commit() {
    let server = server_in_epochs().await;

    qemu_io(
        server.url(),
        &[
            "write -P 0xaa 4096 8192",
            "write -P 0xbb 8192 4096",
            "write -z 4096 1024",
            "flush",
            "read -P 0x00 4096 1024",
            "read -P 0xaa 5120 3072",
            "read -P 0xbb 8192 4096",
        ],
    )
    .await;
    let before = bytes(&server.disk(), 4096, 8192);
    let applied = server.exports.commit_epoch("disk0").await.unwrap();

    assert_eq!(before, vec![0; 8192]);
    assert_eq!(
        applied,
        EpochApplied {
            writes: 3,
            bytes: 8192 + 4096 + 1024
        }
    );
    assert_eq!(bytes(&server.disk(), 4096, 1024), vec![0; 1024]);
    assert_eq!(bytes(&server.disk(), 5120, 3072), vec![0xaa; 3072]);
    assert_eq!(bytes(&server.disk(), 8192, 4096), vec![0xbb; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_a_commit_are_held_for_the_next_one() {
    let server = server_in_epochs().await;
    qemu_io(server.url(), &["write -P 0x11 0 4096"]).await;
    server.exports.commit_epoch("disk0").await.unwrap();

    qemu_io(server.url(), &["write -P 0x22 0 512"]).await;

    assert_eq!(bytes(&server.disk(), 0, 512), vec![0x11; 512]);
    assert_eq!(
        server.exports.commit_epoch("disk0").await.unwrap(),
        EpochApplied {
            writes: 1,
            bytes: 512
        }
    );
    assert_eq!(bytes(&server.disk(), 0, 512), vec![0x22; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_epochs_drops_the_held_writes_and_writes_through_again() {
    let server = server_in_epochs().await;
    qemu_io(
        server.url(),
        &["write -P 0x33 0 4096", "write -P 0x44 8192 4096"],
    )
    .await;

    let dropped = server.exports.end_epochs("disk0").await.unwrap();
    qemu_io(
        server.url(),
        &["read -P 0x00 0 12288", "write -P 0x55 65536 4096"],
    )
    .await;

    assert_eq!(dropped, 2);
    assert_eq!(bytes(&server.disk(), 0, 12288), vec![0; 12288]);
    assert_eq!(bytes(&server.disk(), 65536, 4096), vec![0x55; 4096]);
}

//! The agent's NBD replica server against QEMU's own NBD client (`qemu-img`, `qemu-io`, from
//! qemu-utils) on loopback: what QEMU writes lands in the exported file, reads come back,
//! zeroes and flushes work, bad requests are refused and leave the file as it was.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use agent::nbd::{Export, Exports, serve};
use common::bytes;
use tokio::net::TcpListener;

const SIZE: usize = 16 << 20;

struct Server {
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    fn disk(&self) -> PathBuf {
        self.dir.path().join("disk0.raw")
    }

    fn url(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }
}

/// A server exporting `disk0` (16 MiB, writable) and `ro0` (read-only).
async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let exports = Exports::default();
    for (name, writable) in [("disk0", true), ("ro0", false)] {
        let path = dir.path().join(format!("{name}.raw"));
        std::fs::write(&path, vec![0u8; SIZE]).unwrap();
        exports.insert(name, Export::open(name, &path, writable).unwrap());
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(serve(listener, exports));
    Server { port, dir }
}

/// Runs a QEMU tool off the runtime (the server answers on the runtime meanwhile).
async fn run(program: &'static str, args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("running {program} (install qemu-utils): {e}"))
    })
    .await
    .unwrap()
}

/// `qemu-io` on `url` with `commands`; returns its output, failing on a failed command.
async fn qemu_io(url: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for command in commands {
        args.push("-c".into());
        args.push((*command).to_string());
    }
    args.push(url.to_string());
    let output = run("qemu-io", args).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "qemu-io {commands:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_sees_the_export_size() {
    let server = server().await;

    let output = run(
        "qemu-img",
        vec!["info".into(), "--output=json".into(), server.url("disk0")],
    )
    .await;

    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains(&format!("\"virtual-size\": {SIZE}")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_writes_land_in_the_file_and_read_back() {
    let server = server().await;

    let text = qemu_io(
        &server.url("disk0"),
        &[
            "write -P 0xab 4096 8192",
            "write -f -P 0xcd 65536 512",
            "flush",
            "read -P 0xab 4096 8192",
            "read -P 0xcd 65536 512",
        ],
    )
    .await;

    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert_eq!(bytes(&server.disk(), 4096, 8192), vec![0xab; 8192]);
    assert_eq!(bytes(&server.disk(), 65536, 512), vec![0xcd; 512]);
    assert_eq!(bytes(&server.disk(), 0, 4096), vec![0; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_write_zeroes_clears_the_range() {
    let server = server().await;

    qemu_io(
        &server.url("disk0"),
        &["write -P 0x11 0 16384", "write -z 4096 8192"],
    )
    .await;

    assert_eq!(bytes(&server.disk(), 0, 4096), vec![0x11; 4096]);
    assert_eq!(bytes(&server.disk(), 4096, 8192), vec![0; 8192]);
    assert_eq!(bytes(&server.disk(), 12288, 4096), vec![0x11; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_copies_a_whole_image() {
    let server = server().await;
    let source = server.dir.path().join("source.raw");
    let data: Vec<u8> = (0..SIZE).map(|i| u8::try_from(i % 251).unwrap()).collect();
    std::fs::write(&source, &data).unwrap();

    let output = run(
        "qemu-img",
        vec![
            "convert".into(),
            "-n".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "raw".into(),
            source.to_string_lossy().into_owned(),
            server.url("disk0"),
        ],
    )
    .await;

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        std::fs::read(server.disk()).unwrap() == data,
        "the copy differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_is_refused() {
    let server = server().await;

    let output = run(
        "qemu-io",
        vec![
            "-f".into(),
            "raw".into(),
            "-c".into(),
            "read 0 512".into(),
            server.url("nosuch"),
        ],
    )
    .await;

    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(text.contains("nosuch"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_beyond_the_end_or_to_a_read_only_export_change_nothing() {
    let server = server().await;
    let ro = server.dir.path().join("ro0.raw");

    let past_end = run(
        "qemu-io",
        vec![
            "-f".into(),
            "raw".into(),
            "-c".into(),
            format!("write -P 0x22 {} 8192", SIZE - 4096),
            server.url("disk0"),
        ],
    )
    .await;
    let read_only = run(
        "qemu-io",
        vec![
            "-f".into(),
            "raw".into(),
            "-c".into(),
            "write -P 0x33 0 4096".into(),
            server.url("ro0"),
        ],
    )
    .await;

    let past_end_text = String::from_utf8_lossy(&past_end.stdout).into_owned()
        + &String::from_utf8_lossy(&past_end.stderr);
    let read_only_text = String::from_utf8_lossy(&read_only.stdout).into_owned()
        + &String::from_utf8_lossy(&read_only.stderr);
    assert!(
        past_end_text.contains("failed") || !past_end.status.success(),
        "{past_end_text}"
    );
    assert!(
        read_only_text.contains("failed")
            || read_only_text.contains("read-only")
            || !read_only.status.success(),
        "{read_only_text}"
    );
    assert_eq!(bytes(&server.disk(), SIZE - 4096, 4096), vec![0; 4096]);
    assert_eq!(bytes(&ro, 0, 4096), vec![0; 4096]);
}

/// A raw client: does the handshake and `GO` for `export`, returns the stream ready for
/// requests.
async fn raw_client(port: u16, export: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    common::handshake(&mut stream, export).await;
    stream
}

fn write_request(cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = agent::nbd::proto::REQUEST_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_write_past_the_end_is_einval_and_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = server().await;
    let mut stream = raw_client(server.port, "disk0").await;

    let offset = u64::try_from(SIZE).unwrap() - 512;
    let mut request = write_request(42, offset, 1024);
    request.extend_from_slice(&[0x55; 1024]);
    stream.write_all(&request).await.unwrap();
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).await.unwrap();

    assert_eq!(
        reply,
        agent::nbd::proto::simple_reply(agent::nbd::proto::EINVAL, 42)
    );
    assert_eq!(bytes(&server.disk(), SIZE - 512, 512), vec![0; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_write_longer_than_the_limit_closes_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = server().await;
    let mut stream = raw_client(server.port, "disk0").await;

    stream
        .write_all(&write_request(7, 0, agent::nbd::MAX_IO + 1))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = stream.read_to_end(&mut rest).await;

    assert!(matches!(read, Ok(0)) || read.is_err(), "{read:?}");
    assert_eq!(bytes(&server.disk(), 0, 4096), vec![0; 4096]);
}

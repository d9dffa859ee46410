//! `alink-bench peer`: one A-Link endpoint (or a plain TCP end) in its own process, driven by
//! the bench and the integration tests, typically inside a network namespace. It reports
//! JSON lines on stdout: `ready`, `progress`, `done`, `error`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use replicator::proxy::{Egress, Ingress, LocalAddr, Target};
use replicator::{Config, Endpoint, EndpointStats, Role, StreamError};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Length of the repeating test pattern; not a multiple of any chunk size, so that
/// reordered chunks change the checksum.
const PATTERN_LEN: usize = 1024 * 1024 + 4099;
/// Chunk size the sources hand to `send` / `write_all` (the stream splits it into frames).
const SEND_CHUNK: usize = 1024 * 1024;
/// Read buffer of the plain TCP sink (a link reader reads up to its 4 MiB buffer too).
const RAW_READ: usize = 4 * 1024 * 1024;

/// What the peer process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Accept one stream, read it to the end, report bytes, CRC and the largest gap.
    Sink,
    /// Open a stream, send the pattern (`--bytes` or for `--seconds`), finish, await the end.
    Source,
    /// Accept streams and send every chunk back.
    Echo,
    /// Open a stream, time `--iterations` 4 KiB request / 8-byte reply round trips.
    Rtt,
    /// Plain TCP: accept one connection on the first link address, read it to the end.
    RawSink,
    /// Plain TCP: connect to the first link address and send the pattern.
    RawSource,
    /// Proxy ingress: listen on `--local`, carry connections to `--service` on the peer.
    ProxyIn,
    /// Proxy egress: connect streams of `--service` to `--target`.
    ProxyOut,
}

/// Arguments of `alink-bench peer`.
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// What to do.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Listen on the link addresses, or dial them.
    #[arg(long, value_enum, default_value = "listen")]
    role: RoleArg,
    /// One address per link (listen side: where to bind, port 0 allowed).
    #[arg(long = "link", required = true)]
    links: Vec<SocketAddr>,
    /// Link timeout in milliseconds.
    #[arg(long, default_value_t = 400)]
    timeout_ms: u64,
    /// Service name of the stream.
    #[arg(long, default_value = "bench")]
    service: String,
    /// Bytes to send (source modes).
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    bytes: u64,
    /// Send for this many seconds instead of `--bytes` (source mode).
    #[arg(long)]
    seconds: Option<f64>,
    /// Pace the source to this many MiB/s.
    #[arg(long)]
    rate_mib: Option<f64>,
    /// Compute the CRC of the data (source and sink).
    #[arg(long)]
    verify: bool,
    /// Round trips to time (rtt mode).
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Report a `progress` line this often, in milliseconds (0: never).
    #[arg(long, default_value_t = 0)]
    progress_ms: u64,
    /// Local address of a proxy ingress: `HOST:PORT` or `unix:PATH`.
    #[arg(long)]
    local: Option<String>,
    /// Target of a proxy egress: `HOST:PORT` or `unix:PATH`.
    #[arg(long)]
    target: Option<String>,
    /// Runtime worker threads (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Exit after this many seconds whatever happens.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
    /// TLS on the links, with the certificates of this directory (see `certs.rs`).
    #[arg(long)]
    tls_dir: Option<std::path::PathBuf>,
}

/// `--role` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Listen.
    Listen,
    /// Connect.
    Connect,
}

fn emit(value: &Value) {
    println!("{value}");
}

/// Runs the peer until its job is done or `--max-seconds` passed.
pub fn main(args: &PeerArgs) -> anyhow::Result<()> {
    let runtime = match args.threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        threads => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?,
    };
    let limit = Duration::from_secs(args.max_seconds);
    runtime.block_on(async {
        match tokio::time::timeout(limit, run(args)).await {
            Ok(result) => result,
            Err(_) => bail!("peer gave up after {limit:?}"),
        }
    })
}

async fn run(args: &PeerArgs) -> anyhow::Result<()> {
    match args.mode {
        Mode::RawSink => return raw_sink(args).await,
        Mode::RawSource => return raw_source(args).await,
        _ => {}
    }
    let role = match args.role {
        RoleArg::Listen => Role::Listen,
        RoleArg::Connect => Role::Connect,
    };
    let mut config = Config::new(role, args.links.clone());
    config.link_timeout = Duration::from_millis(args.timeout_ms);
    config.keepalive_interval = config.link_timeout / 4;
    if let Some(dir) = &args.tls_dir {
        config = config.with_tls(crate::certs::link_tls(dir, role == Role::Listen)?);
    }
    let endpoint = Endpoint::start(config).await?;
    let addrs: Vec<String> = endpoint
        .local_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    emit(&json!({"event": "ready", "addrs": addrs}));
    let reporter = spawn_progress(&endpoint, args.progress_ms);
    let result = match args.mode {
        Mode::Sink => sink(&endpoint, args).await,
        Mode::Source => source(&endpoint, args).await,
        Mode::Echo => echo(&endpoint, args).await,
        Mode::Rtt => rtt(&endpoint, args).await,
        Mode::ProxyIn => proxy_in(&endpoint, args).await,
        Mode::ProxyOut => proxy_out(&endpoint, args).await,
        Mode::RawSink | Mode::RawSource => Ok(()),
    };
    drop(reporter);
    if let Err(error) = &result {
        let kind = error
            .downcast_ref::<StreamError>()
            .map(|e| format!("{e:?}"))
            .unwrap_or_default();
        emit(&json!({"event": "error", "kind": kind, "message": format!("{error:#}")}));
    }
    result
}

/// A task printing `progress` lines with the endpoint's link stats; stops when dropped.
struct Progress(Option<tokio::task::JoinHandle<()>>);

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

fn spawn_progress(endpoint: &Endpoint, every_ms: u64) -> Progress {
    if every_ms == 0 {
        return Progress(None);
    }
    let stats = endpoint.stats_handle();
    Progress(Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
        loop {
            tick.tick().await;
            emit(&json!({"event": "progress", "stats": stats_json(&stats.get())}));
        }
    })))
}

/// Link and stream stats as JSON.
pub fn stats_json(stats: &EndpointStats) -> Value {
    let links: Vec<Value> = stats
        .links
        .iter()
        .map(|link| {
            json!({
                "state": format!("{:?}", link.state),
                "bytes_sent": link.bytes_sent,
                "bytes_received": link.bytes_received,
                "frames_sent": link.frames_sent,
                "frames_received": link.frames_received,
                "retransmits": link.retransmits,
                "rtt_us": link.rtt_us,
                "ups": link.ups,
                "downs": link.downs,
            })
        })
        .collect();
    let streams: Vec<Value> = stats
        .streams
        .iter()
        .map(|s| json!({"id": s.id, "service": s.service, "send_backlog": s.send_backlog_bytes, "recv_backlog": s.recv_backlog_bytes}))
        .collect();
    json!({
        "links": links,
        "streams": streams,
        "peer_connected": stats.peer_connected,
        "unacked_bytes": stats.unacked_bytes,
        "reorder_bytes": stats.reorder_bytes,
        "duplicates": stats.duplicates,
    })
}

/// The repeating pattern the sources send.
pub fn pattern() -> Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = Vec::with_capacity(PATTERN_LEN + 8);
    while data.len() < PATTERN_LEN {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(PATTERN_LEN);
    Bytes::from(data)
}

/// Cuts the pattern into chunks of the stream, starting at stream offset `offset`.
fn chunk_at(pattern: &Bytes, offset: u64, max: u64) -> Bytes {
    let start = usize::try_from(offset % PATTERN_LEN as u64).unwrap_or(0);
    let len = usize::try_from(max)
        .unwrap_or(SEND_CHUNK)
        .min(SEND_CHUNK)
        .min(PATTERN_LEN - start);
    pattern.slice(start..start + len)
}

/// Sends the pattern as `args` asks; returns (bytes, crc).
async fn send_pattern<F>(args: &PeerArgs, mut send: F) -> anyhow::Result<(u64, u32)>
where
    F: AsyncFnMut(Bytes) -> anyhow::Result<()>,
{
    let pattern = pattern();
    let started = Instant::now();
    let until = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut sent = 0u64;
    let mut crc = crc32fast::Hasher::new();
    loop {
        let left = match until {
            Some(until) if Instant::now() >= until => break,
            Some(_) => SEND_CHUNK as u64,
            None if sent >= args.bytes => break,
            None => args.bytes - sent,
        };
        let chunk = chunk_at(&pattern, sent, left);
        if args.verify {
            crc.update(&chunk);
        }
        sent += chunk.len() as u64;
        send(chunk).await?;
        if let Some(rate) = args.rate_mib {
            let due = Duration::from_secs_f64(sent as f64 / (rate * 1024.0 * 1024.0));
            tokio::time::sleep_until((started + due).into()).await;
        }
    }
    Ok((sent, crc.finalize()))
}

/// Receives until the end; returns the `done` report.
struct SinkReport {
    bytes: u64,
    crc: crc32fast::Hasher,
    first: Option<Instant>,
    last: Instant,
    max_gap: Duration,
    verify: bool,
}

impl SinkReport {
    fn new(verify: bool) -> Self {
        Self {
            bytes: 0,
            crc: crc32fast::Hasher::new(),
            first: None,
            last: Instant::now(),
            max_gap: Duration::ZERO,
            verify,
        }
    }

    fn take(&mut self, data: &[u8]) {
        let now = Instant::now();
        if self.first.is_some() {
            self.max_gap = self.max_gap.max(now - self.last);
        } else {
            self.first = Some(now);
        }
        self.last = now;
        self.bytes += data.len() as u64;
        if self.verify {
            self.crc.update(data);
        }
    }

    fn emit(self) {
        let elapsed = self
            .first
            .map(|first| self.last - first)
            .unwrap_or_default();
        emit(&json!({
            "event": "done",
            "bytes": self.bytes,
            "crc": self.crc.finalize(),
            "elapsed_us": elapsed.as_micros(),
            "max_gap_us": self.max_gap.as_micros(),
        }));
    }
}

async fn sink(endpoint: &Endpoint, args: &PeerArgs) -> anyhow::Result<()> {
    let mut listener = endpoint.listen(&args.service)?;
    let stream = listener.accept().await?;
    let (mut tx, mut rx) = stream.split();
    let mut report = SinkReport::new(args.verify);
    while let Some(data) = rx.recv().await? {
        report.take(&data);
    }
    report.emit();
    tx.finish()?;
    wait_acked(endpoint).await;
    Ok(())
}

async fn source(endpoint: &Endpoint, args: &PeerArgs) -> anyhow::Result<()> {
    if !endpoint
        .wait_links_up(args.links.len(), Duration::from_secs(10))
        .await
    {
        bail!("links did not come up");
    }
    let stream = endpoint.open(&args.service).await?;
    let (mut tx, mut rx) = stream.split();
    let started = Instant::now();
    let (bytes, crc) =
        send_pattern(args, async |chunk| tx.send(chunk).await.context("sending")).await?;
    tx.finish()?;
    // The sink finishes its direction after reading everything: end-to-end delivery.
    while rx.recv().await?.is_some() {}
    emit(
        &json!({"event": "done", "bytes": bytes, "crc": crc, "elapsed_us": started.elapsed().as_micros(),
        "stats": stats_json(&endpoint.stats())}),
    );
    Ok(())
}

async fn echo(endpoint: &Endpoint, args: &PeerArgs) -> anyhow::Result<()> {
    let mut listener = endpoint.listen(&args.service)?;
    loop {
        let mut stream = listener.accept().await?;
        tokio::spawn(async move {
            while let Ok(Some(data)) = stream.recv().await {
                if stream.send(data.slice(..data.len().min(8))).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn rtt(endpoint: &Endpoint, args: &PeerArgs) -> anyhow::Result<()> {
    if !endpoint
        .wait_links_up(args.links.len(), Duration::from_secs(10))
        .await
    {
        bail!("links did not come up");
    }
    let mut stream = endpoint.open(&args.service).await?;
    let request = pattern().slice(..4096);
    let mut samples = Vec::with_capacity(args.iterations);
    for _ in 0..args.iterations.max(1) {
        let started = Instant::now();
        stream.send(request.clone()).await?;
        let mut got = 0;
        while got < 8 {
            got += stream.recv().await?.context("echo ended early")?.len();
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    // Nearest-rank percentile: index = ceil(q * n) - 1, in integer per-mille.
    let at = |per_mille: usize| {
        let index = (samples.len() * per_mille).div_ceil(1000).saturating_sub(1);
        samples.get(index).copied().unwrap_or_default().as_micros()
    };
    emit(&json!({"event": "done", "p50_us": at(500), "p99_us": at(990), "samples": samples.len()}));
    Ok(())
}

async fn proxy_in(endpoint: &Endpoint, args: &PeerArgs) -> anyhow::Result<()> {
    let local = match parse_place(args.local.as_deref().context("--local is required")?)? {
        Place::Tcp(addr) => LocalAddr::Tcp(addr),
        Place::Unix(path) => LocalAddr::Unix(path),
    };
    let ingress = Ingress::bind(endpoint, local, &args.service).await?;
    emit(&json!({"event": "proxy", "local": format!("{:?}", ingress.local_addr())}));
    std::future::pending::<()>().await;
    Ok(())
}

async fn proxy_out(endpoint: &Endpoint, args: &PeerArgs) -> anyhow::Result<()> {
    let target = match parse_place(args.target.as_deref().context("--target is required")?)? {
        Place::Tcp(addr) => Target::Tcp(addr),
        Place::Unix(path) => Target::Unix(path),
    };
    let _egress = Egress::start(endpoint.listen(&args.service)?, target);
    std::future::pending::<()>().await;
    Ok(())
}

enum Place {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

fn parse_place(text: &str) -> anyhow::Result<Place> {
    match text.strip_prefix("unix:") {
        Some(path) => Ok(Place::Unix(PathBuf::from(path))),
        None => Ok(Place::Tcp(
            text.parse()
                .with_context(|| format!("parsing address {text:?}"))?,
        )),
    }
}

/// Waits (briefly) until everything this side sent was acknowledged.
async fn wait_acked(endpoint: &Endpoint) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while endpoint.stats().unacked_bytes > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn raw_sink(args: &PeerArgs) -> anyhow::Result<()> {
    let addr = *args.links.first().context("a --link is required")?;
    let listener = TcpListener::bind(addr).await?;
    emit(&json!({"event": "ready", "addrs": [listener.local_addr()?.to_string()]}));
    let (mut socket, _) = listener.accept().await?;
    let mut buf = vec![0u8; RAW_READ];
    let mut report = SinkReport::new(args.verify);
    loop {
        let read = socket.read(&mut buf).await?;
        if read == 0 {
            break;
        }
        report.take(buf.get(..read).unwrap_or_default());
    }
    report.emit();
    Ok(())
}

async fn raw_source(args: &PeerArgs) -> anyhow::Result<()> {
    let addr = *args.links.first().context("a --link is required")?;
    let mut socket = TcpStream::connect(addr).await?;
    let started = Instant::now();
    let (bytes, crc) = send_pattern(args, async |chunk| {
        socket.write_all(&chunk).await.context("writing")
    })
    .await?;
    socket.shutdown().await?;
    emit(
        &json!({"event": "done", "bytes": bytes, "crc": crc, "elapsed_us": started.elapsed().as_micros()}),
    );
    Ok(())
}

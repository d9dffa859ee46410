//! `alink-bench`: throughput, latency, failover stall and codec speed of the A-Link replicator.
//!
//! Every network measurement runs between two child processes (`alink-bench peer …`) on
//! the same path: loopback (`127.0.0.1`), and — when run as root — a veth pair between two
//! network namespaces the bench creates and removes. Prints a table, or one JSON object with
//! `--json`. Throughput is in Mbit/s (10^6 bits per second, payload bytes only), measured at
//! the receiver from the first to the last byte; the codec is in GB/s (10^9 bytes per second).
//!
//! Each peer runs a single-threaded tokio runtime by default (`--threads`): the two
//! simulated hosts share this machine's two cores, one each.
//!
//! The 2-link throughput is also measured with TLS on the links (issue 11), as the pair runs.
//!
//! Targets (issue 4): replicated throughput ≥ 90 % of raw TCP; failover stall < 1000 ms;
//! codec ≥ 2 GB/s. Measure release builds: `cargo run --release -p replicator --bin alink-bench`.

mod certs;
mod peer;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand};
use replicator::fault::{NetnsPair, Relay};
use replicator::frame::{Frame, FrameCodec, FrameKind};
use serde_json::{Value, json};

/// How long a child may take to report `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one measurement may take before the bench gives up on it.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Worker threads of each peer process (`--threads`), set once at start.
static PEER_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
/// Replicated throughput must reach this share of raw TCP.
const THROUGHPUT_TARGET: f64 = 0.90;
/// Failover stall target in milliseconds.
const STALL_TARGET_MS: f64 = 1000.0;
/// Codec target in GB/s.
const CODEC_TARGET_GBPS: f64 = 2.0;

#[derive(Debug, Parser)]
#[command(name = "alink-bench", about = "A-Link replicator benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// MiB sent per throughput measurement.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Throughput rounds (raw, 1 link, 2 links interleaved); the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Round trips timed for the RTT percentiles.
    #[arg(long, default_value_t = 5000)]
    rtt_iterations: usize,
    /// Seconds of transfer in the failover measurement (one link is cut after a third).
    #[arg(long, default_value_t = 3.0)]
    failover_seconds: f64,
    /// Tokio worker threads of each peer process. The default 1 gives each simulated host
    /// one of this machine's two cores; 2 oversubscribes them (4 workers on 2 cores).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Skip the network-namespace path even when running as root.
    #[arg(long)]
    loopback_only: bool,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Run one endpoint (used by the bench and the integration tests).
    #[command(hide = true)]
    Peer(peer::PeerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "error".to_owned());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_env_filter(filter)
        .init();
    if let Some(Sub::Peer(args)) = &cli.command {
        return peer::main(args);
    }
    PEER_THREADS.store(cli.threads, std::sync::atomic::Ordering::Relaxed);
    let (encode_gbps, decode_gbps) = codec_speed();
    let certs = certs::Certs::make().context("making the TLS measurements' certificates")?;
    let bench = Bench {
        cli: &cli,
        tls: certs.dir(),
    };
    let loopback = measure_path(&bench, &Path::Loopback).context("measuring on loopback")?;
    let netns = if !cli.loopback_only && NetnsPair::available() {
        let pair = NetnsPair::create("bench", 2).context("creating the namespace pair")?;
        if !pair.wait_carrier(Duration::from_secs(5)) {
            bail!("veth carrier did not come up");
        }
        Some(
            measure_path(&bench, &Path::Netns(&pair))
                .context("measuring on veth between namespaces")?,
        )
    } else {
        None
    };
    let report = Report {
        loopback,
        netns,
        encode_gbps,
        decode_gbps,
    };
    if cli.json {
        println!("{}", report.json());
    } else {
        report.print_table();
    }
    Ok(())
}

/// Encode and decode speed of the codec on 256 KiB payloads, GB/s.
fn codec_speed() -> (f64, f64) {
    const PAYLOAD: usize = 256 * 1024;
    const FRAMES: usize = 64;
    const ROUNDS: usize = 64;
    let payload = Bytes::from(peer::pattern().slice(..PAYLOAD).to_vec());
    let frame = Frame::new(FrameKind::Data, 1, 1, payload);
    let mut codec = FrameCodec::new(1024 * 1024);
    let mut wire = BytesMut::with_capacity(FRAMES * (PAYLOAD + 64));
    let mut encode = Duration::ZERO;
    let mut decode = Duration::ZERO;
    for _ in 0..ROUNDS {
        wire.clear();
        let started = Instant::now();
        for _ in 0..FRAMES {
            // The frame is valid by construction; an error would only shorten the run.
            let _ = codec.encode(&frame, &mut wire);
        }
        encode += started.elapsed();
        let mut input = wire.split();
        let started = Instant::now();
        while let Ok(Some(decoded)) = codec.decode(&mut input) {
            std::hint::black_box(decoded);
        }
        decode += started.elapsed();
        wire.unsplit(input);
    }
    let bytes = (ROUNDS * FRAMES * PAYLOAD) as f64;
    (
        bytes / encode.as_secs_f64() / 1e9,
        bytes / decode.as_secs_f64() / 1e9,
    )
}

/// Where the two peers run.
enum Path<'a> {
    Loopback,
    Netns(&'a NetnsPair),
}

/// Which of the two peers.
#[derive(Clone, Copy)]
enum Side {
    A,
    B,
}

impl Path<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Netns(_) => "netns",
        }
    }

    /// Listening address of link `link` on side B, port 0.
    fn listen_addr(&self, link: usize) -> SocketAddr {
        match self {
            Self::Loopback => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            Self::Netns(pair) => SocketAddr::new(IpAddr::V4(pair.addr_b(link)), 0),
        }
    }

    fn spawn(&self, side: Side, args: &[String]) -> anyhow::Result<Peer> {
        let threads = PEER_THREADS.load(std::sync::atomic::Ordering::Relaxed);
        let exe = std::env::current_exe().context("locating alink-bench")?;
        let exe = exe.to_string_lossy();
        let mut command = match (self, side) {
            (Self::Loopback, _) => Command::new(exe.as_ref()),
            (Self::Netns(pair), Side::A) => NetnsPair::command_in(pair.ns_a(), &exe),
            (Self::Netns(pair), Side::B) => NetnsPair::command_in(pair.ns_b(), &exe),
        };
        command
            .arg("peer")
            .args(["--threads", &threads.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        Peer::spawn(command)
    }
}

/// A child peer process; killed by PID when dropped.
struct Peer {
    child: std::process::Child,
    events: mpsc::Receiver<Value>,
}

impl Peer {
    fn spawn(mut command: Command) -> anyhow::Result<Self> {
        let mut child = command.spawn().context("starting peer process")?;
        let stdout = child.stdout.take().context("peer stdout")?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<Value>(&line)
                    && tx.send(value).is_err()
                {
                    break;
                }
            }
        });
        Ok(Self { child, events })
    }

    /// The next event named `name`, skipping others; an `error` event fails.
    fn wait(&self, name: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .events
                .recv_timeout(left)
                .with_context(|| format!("waiting for peer event {name:?}"))?;
            match event.get("event").and_then(Value::as_str) {
                Some(found) if found == name => return Ok(event),
                Some("error") => bail!("peer failed: {event}"),
                _ => {}
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addrs_of(ready: &Value) -> Vec<String> {
    ready["addrs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn link_args(addrs: &[String]) -> Vec<String> {
    addrs
        .iter()
        .flat_map(|addr| ["--link".to_owned(), addr.clone()])
        .collect()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Results on one path.
/// The command line and the TLS certificates' directory.
struct Bench<'a> {
    cli: &'a Cli,
    tls: &'a std::path::Path,
}

struct PathResult {
    name: &'static str,
    raw_tcp_mbps: f64,
    replicated_mbps_1link: f64,
    replicated_mbps_2links: f64,
    replicated_tls_mbps_2links: f64,
    rtt_4k_us_p50: f64,
    rtt_4k_us_p99: f64,
    failover_stall_ms: f64,
    samples: Value,
}

fn measure_path(bench: &Bench<'_>, path: &Path<'_>) -> anyhow::Result<PathResult> {
    let cli = bench.cli;
    let bytes = cli.mib * 1024 * 1024;
    // The machine's speed drifts (shared host): interleave the four and take medians.
    let (mut raw, mut one, mut two, mut tls) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cli.rounds.max(1) {
        raw.push(raw_tcp(path, bytes).context("raw TCP")?);
        one.push(replicated(path, 1, bytes, None).context("replicated, 1 link")?);
        two.push(replicated(path, 2, bytes, None).context("replicated, 2 links")?);
        tls.push(replicated(path, 2, bytes, Some(bench.tls)).context("replicated, 2 TLS links")?);
    }
    let samples = json!({"raw_tcp_mbps": rounded(&raw), "replicated_mbps_1link": rounded(&one),
        "replicated_mbps_2links": rounded(&two), "replicated_tls_mbps_2links": rounded(&tls)});
    let (raw_tcp_mbps, replicated_mbps_1link, replicated_mbps_2links) =
        (median(raw), median(one), median(two));
    let replicated_tls_mbps_2links = median(tls);
    let (rtt_4k_us_p50, rtt_4k_us_p99) =
        rtt(path, cli.rtt_iterations).context("4 KiB round trip")?;
    let failover_stall_ms = failover(path, cli.failover_seconds).context("failover stall")?;
    Ok(PathResult {
        name: path.name(),
        raw_tcp_mbps,
        replicated_mbps_1link,
        replicated_mbps_2links,
        replicated_tls_mbps_2links,
        rtt_4k_us_p50,
        rtt_4k_us_p99,
        failover_stall_ms,
        samples,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn rounded(values: &[f64]) -> Vec<f64> {
    values.iter().map(|v| v.round()).collect()
}

fn mbps(done: &Value) -> anyhow::Result<f64> {
    let bytes = done["bytes"].as_f64().context("done.bytes")?;
    let elapsed = done["elapsed_us"]
        .as_f64()
        .context("done.elapsed_us")?
        .max(1.0);
    Ok(bytes * 8.0 / elapsed)
}

fn raw_tcp(path: &Path<'_>, bytes: u64) -> anyhow::Result<f64> {
    let listen = path.listen_addr(0).to_string();
    let sink = path.spawn(Side::B, &args(&["--mode", "raw-sink", "--link", &listen]))?;
    let addrs = addrs_of(&sink.wait("ready", READY_TIMEOUT)?);
    let mut source_args = args(&["--mode", "raw-source", "--bytes", &bytes.to_string()]);
    source_args.extend(link_args(&addrs));
    let source = path.spawn(Side::A, &source_args)?;
    let done = sink.wait("done", RUN_TIMEOUT)?;
    source.wait("done", RUN_TIMEOUT)?;
    mbps(&done)
}

/// Starts a listening peer with `links` links in `mode`; returns it and its addresses.
fn listener(path: &Path<'_>, links: usize, extra: &[&str]) -> anyhow::Result<(Peer, Vec<String>)> {
    let listen: Vec<String> = (0..links)
        .map(|link| path.listen_addr(link).to_string())
        .collect();
    let mut list = args(&["--role", "listen"]);
    list.extend(args(extra));
    list.extend(link_args(&listen));
    let peer = path.spawn(Side::B, &list)?;
    let addrs = addrs_of(&peer.wait("ready", READY_TIMEOUT)?);
    Ok((peer, addrs))
}

fn connector(path: &Path<'_>, addrs: &[String], extra: &[&str]) -> anyhow::Result<Peer> {
    let mut list = args(&["--role", "connect"]);
    list.extend(args(extra));
    list.extend(link_args(addrs));
    path.spawn(Side::A, &list)
}

/// Throughput of one stream over `links` links, with TLS from `tls` if given.
fn replicated(
    path: &Path<'_>,
    links: usize,
    bytes: u64,
    tls: Option<&std::path::Path>,
) -> anyhow::Result<f64> {
    let tls_args: Vec<String> = tls
        .map(|dir| vec!["--tls-dir".to_string(), dir.display().to_string()])
        .unwrap_or_default();
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let sink_args = [&["--mode", "sink"][..], &tls_args].concat();
    let (sink, addrs) = listener(path, links, &sink_args)?;
    let bytes = bytes.to_string();
    let source_args = [&["--mode", "source", "--bytes", &bytes][..], &tls_args].concat();
    let source = connector(path, &addrs, &source_args)?;
    let done = sink.wait("done", RUN_TIMEOUT)?;
    source.wait("done", RUN_TIMEOUT)?;
    mbps(&done)
}

fn rtt(path: &Path<'_>, iterations: usize) -> anyhow::Result<(f64, f64)> {
    let (_echo, addrs) = listener(path, 2, &["--mode", "echo"])?;
    let client = connector(
        path,
        &addrs,
        &["--mode", "rtt", "--iterations", &iterations.to_string()],
    )?;
    let done = client.wait("done", RUN_TIMEOUT)?;
    Ok((
        done["p50_us"].as_f64().unwrap_or(f64::NAN),
        done["p99_us"].as_f64().unwrap_or(f64::NAN),
    ))
}

fn failover(path: &Path<'_>, seconds: f64) -> anyhow::Result<f64> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (sink, addrs) = listener(path, 2, &["--mode", "sink"])?;
    // On loopback, link 0 goes through a relay that can be cut; in namespaces, the veth.
    let relay = match path {
        Path::Loopback => {
            let target: SocketAddr = addrs.first().context("sink address")?.parse()?;
            Some(runtime.block_on(Relay::start(target))?)
        }
        Path::Netns(_) => None,
    };
    let mut dial = addrs.clone();
    if let (Some(relay), Some(first)) = (&relay, dial.first_mut()) {
        *first = relay.addr().to_string();
    }
    let source = connector(
        path,
        &dial,
        &["--mode", "source", "--seconds", &seconds.to_string()],
    )?;
    std::thread::sleep(Duration::from_secs_f64(seconds / 3.0));
    match (path, &relay) {
        (Path::Netns(pair), _) => pair.link_down(0)?,
        (Path::Loopback, Some(relay)) => relay.cut(),
        (Path::Loopback, None) => bail!("no relay"),
    }
    let done = sink.wait("done", RUN_TIMEOUT)?;
    source.wait("done", RUN_TIMEOUT)?;
    match (path, &relay) {
        (Path::Netns(pair), _) => pair.link_up(0)?,
        (Path::Loopback, Some(relay)) => relay.restore(),
        (Path::Loopback, None) => {}
    }
    Ok(done["max_gap_us"].as_f64().context("done.max_gap_us")? / 1000.0)
}

struct Report {
    loopback: PathResult,
    netns: Option<PathResult>,
    encode_gbps: f64,
    decode_gbps: f64,
}

impl PathResult {
    fn json(&self) -> Value {
        json!({
            "raw_tcp_mbps": self.raw_tcp_mbps.round(),
            "replicated_mbps_1link": self.replicated_mbps_1link.round(),
            "replicated_mbps_2links": self.replicated_mbps_2links.round(),
            "rtt_4k_us_p50": self.rtt_4k_us_p50,
            "rtt_4k_us_p99": self.rtt_4k_us_p99,
            "failover_stall_ms": (self.failover_stall_ms * 10.0).round() / 10.0,
            "replicated_ratio_1link": ratio(self.replicated_mbps_1link, self.raw_tcp_mbps),
            "replicated_ratio_2links": ratio(self.replicated_mbps_2links, self.raw_tcp_mbps),
            "replicated_tls_mbps_2links": self.replicated_tls_mbps_2links.round(),
            "replicated_tls_ratio_2links": ratio(self.replicated_tls_mbps_2links, self.raw_tcp_mbps),
            "throughput_samples": self.samples,
        })
    }

    fn met(&self) -> Value {
        json!({
            "replicated_1link_ge_90pct_raw": self.replicated_mbps_1link >= THROUGHPUT_TARGET * self.raw_tcp_mbps,
            "replicated_2links_ge_90pct_raw": self.replicated_mbps_2links >= THROUGHPUT_TARGET * self.raw_tcp_mbps,
            "failover_stall_lt_1000ms": self.failover_stall_ms < STALL_TARGET_MS,
        })
    }
}

fn ratio(value: f64, base: f64) -> f64 {
    (value / base * 1000.0).round() / 1000.0
}

impl Report {
    fn json(&self) -> Value {
        let mut targets = json!({
            "codec_ge_2gbps": self.encode_gbps >= CODEC_TARGET_GBPS && self.decode_gbps >= CODEC_TARGET_GBPS,
        });
        let mut out = json!({
            "encode_gbps": (self.encode_gbps * 100.0).round() / 100.0,
            "decode_gbps": (self.decode_gbps * 100.0).round() / 100.0,
        });
        for result in std::iter::once(&self.loopback).chain(self.netns.as_ref()) {
            out[result.name] = result.json();
            targets[result.name] = result.met();
        }
        out["netns"] = self.netns.as_ref().map_or(Value::Null, PathResult::json);
        out["targets_met"] = targets;
        out
    }

    fn print_table(&self) {
        let paths: Vec<&PathResult> = std::iter::once(&self.loopback)
            .chain(self.netns.as_ref())
            .collect();
        let mut header = format!("{:<24}", "metric");
        for path in &paths {
            header.push_str(&format!("{:>16}", path.name));
        }
        println!("{header}  target");
        type Getter = fn(&PathResult) -> String;
        let rows: [(&str, Getter, &str); 7] = [
            (
                "raw_tcp_mbps",
                |p| format!("{:.0}", p.raw_tcp_mbps),
                "(baseline)",
            ),
            (
                "replicated_mbps_1link",
                |p| {
                    format!(
                        "{:.0} ({:.0}%)",
                        p.replicated_mbps_1link,
                        100.0 * p.replicated_mbps_1link / p.raw_tcp_mbps
                    )
                },
                ">= 90% of raw",
            ),
            (
                "replicated_mbps_2links",
                |p| {
                    format!(
                        "{:.0} ({:.0}%)",
                        p.replicated_mbps_2links,
                        100.0 * p.replicated_mbps_2links / p.raw_tcp_mbps
                    )
                },
                ">= 90% of raw",
            ),
            (
                "replicated_tls_mbps_2links",
                |p| {
                    format!(
                        "{:.0} ({:.0}%)",
                        p.replicated_tls_mbps_2links,
                        100.0 * p.replicated_tls_mbps_2links / p.raw_tcp_mbps
                    )
                },
                "(TLS cost)",
            ),
            ("rtt_4k_us_p50", |p| format!("{:.0}", p.rtt_4k_us_p50), ""),
            ("rtt_4k_us_p99", |p| format!("{:.0}", p.rtt_4k_us_p99), ""),
            (
                "failover_stall_ms",
                |p| format!("{:.1}", p.failover_stall_ms),
                "< 1000",
            ),
        ];
        for (name, get, target) in rows {
            let mut line = format!("{name:<24}");
            for path in &paths {
                line.push_str(&format!("{:>16}", get(path)));
            }
            println!("{line}  {target}");
        }
        println!("{:<24}{:>16.2}  >= 2", "encode_gbps", self.encode_gbps);
        println!("{:<24}{:>16.2}  >= 2", "decode_gbps", self.decode_gbps);
    }
}

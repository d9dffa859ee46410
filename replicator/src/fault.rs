//! Fault injection for tests and benches: a loopback TCP relay that can go silent.
//!
//! Put a [`Relay`] between the two ends of a link to simulate a pulled cable on loopback,
//! where `ip link set … down` is not available. [`Relay::cut`] stops forwarding in both
//! directions while keeping the sockets open (the endpoints only notice by silence, as with
//! a real cable pull); [`Relay::restore`] closes the silenced connections and forwards new
//! ones again.
//!
//! [`NetnsPair`] builds two network namespaces joined by veth pairs (one per link), for
//! tests and benches that run as root; it can take a link down and add random loss with
//! nftables.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Errors of the fault injectors.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The relay's listening socket could not be bound.
    #[error("binding relay on {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A namespace or nftables command failed.
    #[error("running {command:?}: exit {status}, stderr {stderr:?}")]
    CommandStatus {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A namespace or nftables command could not be started.
    #[error("running {command:?}")]
    RunCommand {
        /// The command line.
        command: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Whether a relay forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Silent,
}

/// A loopback TCP relay to `target` that can be cut and restored. Dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Starts relaying from a fresh `127.0.0.1` port to `target`.
    ///
    /// # Errors
    /// [`FaultError::Bind`] when no loopback port can be bound.
    pub async fn start(target: SocketAddr) -> Result<Self, FaultError> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Starts relaying from `listen` to `target`.
    ///
    /// # Errors
    /// [`FaultError::Bind`] when `listen` cannot be bound.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> Result<Self, FaultError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| FaultError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().unwrap_or(listen);
        let (mode, watch) = watch::channel(Mode::Forward);
        let task = tokio::spawn(accept_loop(listener, target, watch));
        Ok(Self { addr, mode, task })
    }

    /// The address to connect to instead of the target.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding: bytes in flight and new bytes vanish, sockets stay open.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Silent);
    }

    /// Closes the silenced connections and forwards new ones again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, mode: watch::Receiver<Mode>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                conns.spawn(relay_conn(client, target, mode.clone()));
            }
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn relay_conn(client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Mode>) {
    if *mode.borrow_and_update() == Mode::Silent {
        // Accepted while cut: hold the socket silent until restored, then close it.
        let _restored = mode.wait_for(|m| *m == Mode::Forward).await;
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        debug!(%target, "relay target refused the connection");
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    let (server_rd, server_wr) = server.into_split();
    tokio::join!(
        pump(client_rd, server_wr, mode.clone()),
        pump(server_rd, client_wr, mode)
    );
}

/// Copies until EOF, an error, or a cut; after a cut, waits for the restore and returns.
async fn pump<R, W>(mut rd: R, mut wr: W, mut mode: watch::Receiver<Mode>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if *mode.borrow_and_update() == Mode::Silent {
            let _restored = mode.wait_for(|m| *m == Mode::Forward).await;
            return;
        }
        tokio::select! {
            read = rd.read(&mut buf) => {
                let Ok(read @ 1..) = read else { return };
                let Some(data) = buf.get(..read) else { return };
                tokio::select! {
                    written = wr.write_all(data) => if written.is_err() { return },
                    _ = mode.changed() => {}
                }
            }
            _ = mode.changed() => {}
        }
    }
}

/// Number of pairs created by this process, to keep names and subnets unique.
static PAIRS: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces `a` and `b` joined by one veth pair per link.
///
/// Link `i` has addresses `10.(200+i).<n>.1/24` (interface `a<i>` in namespace `a`) and
/// `10.(200+i).<n>.2/24` (interface `b<i>` in namespace `b`), where `<n>` is derived from the
/// process id and a per-process counter. Names start with `pvr`. Dropping the pair deletes
/// both namespaces (and with them the veths and nftables rules).
#[derive(Debug)]
pub struct NetnsPair {
    a: String,
    b: String,
    subnet: u8,
    links: usize,
}

impl NetnsPair {
    /// Creates the namespaces and `links` (at most 10) veth pairs, all up.
    ///
    /// # Errors
    /// [`FaultError::RunCommand`] or [`FaultError::CommandStatus`] when `ip` fails (for example
    /// when not running as root).
    pub fn create(tag: &str, links: usize) -> Result<Self, FaultError> {
        let serial = PAIRS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let subnet =
            u8::try_from((pid.wrapping_mul(7).wrapping_add(serial)) % 250).unwrap_or(0) + 1;
        let pair = Self {
            a: format!("pvr{pid}{tag}{serial}a"),
            b: format!("pvr{pid}{tag}{serial}b"),
            subnet,
            links: links.min(10),
        };
        info!(
            a = pair.a,
            b = pair.b,
            links = pair.links,
            "creating namespace pair"
        );
        run(&["ip", "netns", "add", &pair.a])?;
        // From here on, Drop removes whatever was created.
        run(&["ip", "netns", "add", &pair.b])?;
        for ns in [&pair.a, &pair.b] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        for link in 0..pair.links {
            let (ia, ib) = (format!("a{link}"), format!("b{link}"));
            run(&[
                "ip", "link", "add", &ia, "netns", &pair.a, "type", "veth", "peer", "name", &ib,
                "netns", &pair.b,
            ])?;
            run(&[
                "ip",
                "-n",
                &pair.a,
                "addr",
                "add",
                &format!("{}/24", pair.addr_a(link)),
                "dev",
                &ia,
            ])?;
            run(&[
                "ip",
                "-n",
                &pair.b,
                "addr",
                "add",
                &format!("{}/24", pair.addr_b(link)),
                "dev",
                &ib,
            ])?;
            run(&["ip", "-n", &pair.a, "link", "set", &ia, "up"])?;
            run(&["ip", "-n", &pair.b, "link", "set", &ib, "up"])?;
        }
        Ok(pair)
    }

    /// Whether this process may create namespaces (runs as root).
    #[must_use]
    pub fn available() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
    }

    /// Name of namespace `a`.
    #[must_use]
    pub fn ns_a(&self) -> &str {
        &self.a
    }

    /// Name of namespace `b`.
    #[must_use]
    pub fn ns_b(&self) -> &str {
        &self.b
    }

    /// Address of link `link` in namespace `a`.
    #[must_use]
    pub fn addr_a(&self, link: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            200u8.saturating_add(u8::try_from(link).unwrap_or(u8::MAX)),
            self.subnet,
            1,
        )
    }

    /// Address of link `link` in namespace `b`.
    #[must_use]
    pub fn addr_b(&self, link: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            200u8.saturating_add(u8::try_from(link).unwrap_or(u8::MAX)),
            self.subnet,
            2,
        )
    }

    /// A command that runs `program` inside namespace `ns` (one of the pair's).
    #[must_use]
    pub fn command_in(ns: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns, program]);
        command
    }

    /// Sets link `link` down on the `a` side (a pulled cable: `b` sees no carrier).
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn link_down(&self, link: usize) -> Result<(), FaultError> {
        self.set_link(link, "down")
    }

    /// Sets link `link` up again on the `a` side.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn link_up(&self, link: usize) -> Result<(), FaultError> {
        self.set_link(link, "up")
    }

    fn set_link(&self, link: usize, state: &str) -> Result<(), FaultError> {
        let dev = format!("a{link}");
        run(&["ip", "-n", &self.a, "link", "set", &dev, state])
    }

    /// Drops `percent` % of the packets leaving either side on link `link` (nftables).
    ///
    /// # Errors
    /// When `nft` fails.
    pub fn add_loss(&self, link: usize, percent: u8) -> Result<(), FaultError> {
        for (ns, dev) in [(&self.a, format!("a{link}")), (&self.b, format!("b{link}"))] {
            run(&[
                "ip", "netns", "exec", ns, "nft", "add", "table", "inet", "pvrfault",
            ])?;
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "nft",
                "add",
                "chain",
                "inet",
                "pvrfault",
                "out",
                "{ type filter hook output priority 0; policy accept; }",
            ])?;
            let rule = format!("oifname \"{dev}\" numgen random mod 100 < {percent} drop");
            run(&[
                "ip", "netns", "exec", ns, "nft", "add", "rule", "inet", "pvrfault", "out", &rule,
            ])?;
        }
        Ok(())
    }

    /// Removes the loss rules.
    ///
    /// # Errors
    /// When `nft` fails.
    pub fn clear_loss(&self) -> Result<(), FaultError> {
        for ns in [&self.a, &self.b] {
            run(&[
                "ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "pvrfault",
            ])?;
        }
        Ok(())
    }

    /// Polls until every `b`-side interface reports carrier (`LOWER_UP`), up to `timeout`.
    #[must_use]
    pub fn wait_carrier(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            let up = (0..self.links).all(|link| {
                Command::new("ip")
                    .args(["-n", &self.b, "link", "show", &format!("b{link}")])
                    .output()
                    .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("LOWER_UP"))
            });
            if up {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            if let Err(error) = run(&["ip", "netns", "del", ns]) {
                warn!(ns, reason = %error, "deleting namespace failed");
            }
        }
        info!(a = self.a, b = self.b, "namespace pair removed");
    }
}

/// Runs a command, failing on a non-zero exit.
fn run(args: &[&str]) -> Result<(), FaultError> {
    let command = args.join(" ");
    let (program, rest) = args.split_first().ok_or_else(|| FaultError::RunCommand {
        command: command.clone(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    let output = Command::new(program)
        .args(rest)
        .output()
        .map_err(|source| FaultError::RunCommand {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(FaultError::CommandStatus {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

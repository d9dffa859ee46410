//! Fault injection for tests and benches: a loopback TCP relay that can go silent.
//!
//! Put a [`Relay`] between the two ends of a link to simulate a pulled cable on loopback,
//! where `ip link set … down` is not available. [`Relay::cut`] stops forwarding in both
//! directions while keeping the sockets open (the endpoints only notice by silence, as with
//! a real cable pull); [`Relay::restore`] closes the silenced connections and forwards new
//! ones again.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::debug;

/// Errors of the relay.
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

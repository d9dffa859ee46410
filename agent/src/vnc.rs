//! A guest's screen over VNC: QEMU serves it on a Unix socket that libvirt makes in the
//! domain's private directory (reachable by root and QEMU's user only), never on the network;
//! the agent relays one RFB session per caller between that socket and a gRPC stream (the
//! controller's console websocket).

use std::path::Path;

use proto::agent as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Status;

/// Largest piece read from QEMU at once.
const CHUNK: usize = 64 * 1024;
/// Pieces queued towards the caller before the relay waits for it.
const QUEUE: usize = 16;

/// A relay that could not begin.
#[derive(Debug, thiserror::Error)]
pub enum VncError {
    /// QEMU does not listen on the domain's socket.
    #[error(
        "domain {uuid} has no screen here (not running on this host, an FT VM, or started before VNC was enabled): {source}"
    )]
    NoScreen {
        /// The domain.
        uuid: String,
        /// Why the socket could not be reached.
        #[source]
        source: std::io::Error,
    },
}

impl From<VncError> for Status {
    fn from(e: VncError) -> Status {
        match &e {
            VncError::NoScreen { .. } => Status::failed_precondition(daemon::error_chain(&e)),
        }
    }
}

/// The bytes QEMU sends, as a stream of replies.
pub type Replies = tokio_stream::wrappers::ReceiverStream<Result<pb::VncData, Status>>;

/// Connects to domain `uuid`'s VNC socket at `socket` and relays between it and the caller:
/// `input` (the rest of the caller's stream) to QEMU, QEMU's output to the returned stream.
/// The relay ends when either side closes.
pub async fn relay<S>(
    uuid: String,
    socket: &Path,
    node: String,
    mut input: S,
) -> Result<Replies, VncError>
where
    S: tokio_stream::Stream<Item = Result<pb::VncData, Status>> + Send + Unpin + 'static,
{
    let qemu = UnixStream::connect(socket)
        .await
        .map_err(|source| VncError::NoScreen {
            uuid: uuid.clone(),
            source,
        })?;
    let (mut from_qemu, mut to_qemu) = qemu.into_split();
    let (tx, rx) = mpsc::channel(QUEUE);
    tracing::info!(vm = %uuid, node = %node, "VNC relay begin");
    tokio::spawn(async move {
        let mut sent = 0u64;
        let mut received = 0u64;
        let mut buf = vec![0u8; CHUNK];
        let outcome = loop {
            tokio::select! {
                read = from_qemu.read(&mut buf) => match read {
                    Ok(0) => break "QEMU closed the screen".to_string(),
                    Ok(n) => {
                        sent += n as u64;
                        let data = pb::VncData { uuid: String::new(), data: buf[..n].to_vec() };
                        if tx.send(Ok(data)).await.is_err() {
                            break "the caller went away".to_string();
                        }
                    }
                    Err(e) => break format!("reading the screen: {e}"),
                },
                piece = input.next() => match piece {
                    Some(Ok(piece)) => {
                        received += piece.data.len() as u64;
                        if let Err(e) = to_qemu.write_all(&piece.data).await {
                            break format!("writing to the screen: {e}");
                        }
                    }
                    Some(Err(status)) => break format!("the caller's stream failed: {}", status.message()),
                    None => break "the caller closed".to_string(),
                },
                () = tx.closed() => break "the caller went away".to_string(),
            }
        };
        tracing::info!(vm = %uuid, node = %node, sent, received, outcome, "VNC relay end");
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(data: &[u8]) -> Result<pb::VncData, Status> {
        Ok(pb::VncData {
            uuid: String::new(),
            data: data.to_vec(),
        })
    }

    #[tokio::test]
    async fn relay_carries_bytes_both_ways_until_the_caller_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vnc");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // A stand-in for QEMU: greets like an RFB server, then echoes in upper case.
        let qemu = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            conn.write_all(b"RFB 003.008\n").await.unwrap();
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).await.unwrap();
            conn.write_all(&buf[..n].to_ascii_uppercase())
                .await
                .unwrap();
            // The caller's close reaches QEMU as end of file.
            assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
        });
        let (tx, rx) = mpsc::channel(4);
        let mut replies = relay(
            "vm".into(),
            &path,
            "n0".into(),
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )
        .await
        .unwrap();

        let greeting = replies.next().await.unwrap().unwrap();
        assert_eq!(greeting.data, b"RFB 003.008\n");
        tx.send(piece(b"hello")).await.unwrap();
        let echoed = replies.next().await.unwrap().unwrap();
        assert_eq!(echoed.data, b"HELLO");
        drop(tx);
        qemu.await.unwrap();
        assert!(replies.next().await.is_none(), "the relay ends with QEMU");
    }

    #[tokio::test]
    async fn relay_to_a_domain_without_a_screen_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, rx) = mpsc::channel(1);
        let refused = relay(
            "0b6f".into(),
            &dir.path().join("none.vnc"),
            "n0".into(),
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )
        .await
        .unwrap_err();
        let status = Status::from(refused);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status.message().contains("domain 0b6f has no screen here"),
            "{}",
            status.message()
        );
    }
}

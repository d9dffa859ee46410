//! An ISO upload's bytes, carried to every host at once. Each chunk goes to every agent's
//! stream before the next is read, so the slowest host paces the upload and memory stays
//! bounded. The SHA-256 is computed on the way; the agents get the commit (and keep their
//! copies) only once the uploader's checksum and size match. Any failure ends their streams
//! without a commit, which makes them discard what they wrote.

use std::time::Duration;

use proto::agent as pb;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

use crate::agents::{self, Agent};
use crate::error::{ApiError, chain};
use crate::model::IsoRecord;

/// Chunks buffered per host.
const DEPTH: usize = 4;
/// How long a host may take one chunk before the upload fails.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// A part of an upload after its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// The next bytes.
    Data(Vec<u8>),
    /// Lowercase hex SHA-256 of all bytes; the last part.
    Sha256(String),
}

/// One host's copy in progress.
struct Copy {
    node: String,
    tx: mpsc::Sender<pb::PutIsoRequest>,
    call: JoinHandle<Result<pb::IsoFile, agents::Error>>,
}

/// Uploads the ISO `iso` announced to every agent of `targets`, reading its bytes from
/// `parts`; returns the SHA-256 every host verified.
pub async fn fan_out<S>(
    iso: &IsoRecord,
    term: i64,
    targets: Vec<(String, Agent)>,
    parts: S,
) -> Result<String, ApiError>
where
    S: Stream<Item = Result<Part, ApiError>> + Unpin,
{
    let header = pb::PutIsoRequest {
        part: Some(pb::put_iso_request::Part::Header(pb::PutIsoHeader {
            iso: Some(pb::IsoRef {
                storage_group: iso.storage_group.clone(),
                name: iso.name.clone(),
            }),
            size_bytes: iso.size_bytes,
            term,
        })),
    };
    let mut copies = Vec::with_capacity(targets.len());
    for (node, agent) in targets {
        let (tx, rx) = mpsc::channel(DEPTH);
        // The receiver is alive and the channel empty: this cannot fail.
        let _ = tx.send(header.clone()).await;
        let call = tokio::spawn(async move { agent.put_iso(ReceiverStream::new(rx)).await });
        copies.push(Copy { node, tx, call });
    }
    match pump(iso, parts, &mut copies).await {
        Ok(sha256) => finish(copies, &sha256).await.map(|()| sha256),
        Err(e) => {
            for copy in &copies {
                copy.call.abort();
            }
            Err(e)
        }
    }
}

/// Carries the bytes to every copy; returns their SHA-256 once it matches the uploader's.
async fn pump<S>(iso: &IsoRecord, mut parts: S, copies: &mut [Copy]) -> Result<String, ApiError>
where
    S: Stream<Item = Result<Part, ApiError>> + Unpin,
{
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let mut claimed = None;
    while let Some(part) = parts.next().await {
        let data = match part? {
            Part::Sha256(sha256) => {
                claimed = Some(sha256.to_ascii_lowercase());
                continue;
            }
            Part::Data(_) if claimed.is_some() => {
                return Err(ApiError::invalid(
                    "sha256",
                    "the checksum must be the upload's last part",
                ));
            }
            Part::Data(data) => data,
        };
        received = received.saturating_add(data.len() as u64);
        if received > iso.size_bytes {
            return Err(ApiError::invalid(
                "size_bytes",
                format!(
                    "the upload announced {} bytes but sent more",
                    iso.size_bytes
                ),
            ));
        }
        hasher.update(&data);
        for copy in copies.iter_mut() {
            send(copy, data.clone()).await?;
        }
    }
    if received != iso.size_bytes {
        return Err(ApiError::invalid(
            "size_bytes",
            format!(
                "the upload ended after {received} of the {} bytes it announced; nothing was kept",
                iso.size_bytes
            ),
        ));
    }
    let sha256 = format!("{:x}", hasher.finalize());
    match claimed {
        None => Err(ApiError::invalid(
            "sha256",
            "the upload ended without its checksum; nothing was kept",
        )),
        Some(claimed) if claimed != sha256 => Err(ApiError::invalid(
            "sha256",
            format!(
                "checksum mismatch: the bytes received hash to {sha256}, the uploader announced {claimed}; nothing was kept"
            ),
        )),
        Some(_) => Ok(sha256),
    }
}

async fn send(copy: &mut Copy, data: Vec<u8>) -> Result<(), ApiError> {
    let message = pb::PutIsoRequest {
        part: Some(pb::put_iso_request::Part::Data(data)),
    };
    match tokio::time::timeout(CHUNK_TIMEOUT, copy.tx.send(message)).await {
        Ok(Ok(())) => Ok(()),
        // The agent's call ended early: its error is the cause.
        Ok(Err(_)) => {
            let cause = match (&mut copy.call).await {
                Ok(Err(e)) => chain(&e),
                Ok(Ok(_)) => "it ended its call".to_string(),
                Err(e) => format!("the upload task failed: {e}"),
            };
            Err(ApiError::Unavailable(format!(
                "node {} stopped taking the ISO: {cause}",
                copy.node
            )))
        }
        Err(_) => Err(ApiError::Unavailable(format!(
            "node {} took no ISO data for {CHUNK_TIMEOUT:?}",
            copy.node
        ))),
    }
}

/// Commits every copy with the verified SHA-256 (an agent keeps its copy only on this
/// commit, and only if its own checksum matches) and checks each host's answer.
async fn finish(copies: Vec<Copy>, sha256: &str) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    for Copy { node, tx, call } in copies {
        let commit = pb::PutIsoRequest {
            part: Some(pb::put_iso_request::Part::CommitSha256(sha256.to_string())),
        };
        if tx.send(commit).await.is_err() {
            errors.push(format!("node {node} ended the upload before its commit"));
        }
        drop(tx);
        match call.await {
            Ok(Ok(file)) if file.sha256 == sha256 => {}
            Ok(Ok(file)) => errors.push(format!(
                "node {node}'s copy hashes to {}, not {sha256}",
                file.sha256
            )),
            Ok(Err(e)) => errors.push(chain(&e)),
            Err(e) => errors.push(format!("node {node}: the upload task failed: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Unavailable(format!(
            "the ISO did not reach every host intact: {}",
            errors.join("; ")
        )))
    }
}

//! An ISO upload's bytes, carried to every host at once. Each chunk goes to every agent's
//! stream before the next is read, so the slowest host paces the upload and memory stays
//! bounded. The SHA-256 is computed on the way; the agents get the commit (and keep their
//! copies) only once the uploader's checksum and size match. Any failure ends their streams
//! without a commit, which makes them discard what they wrote.

use proto::agent as pb;
use tokio_stream::Stream;

use crate::agents::Agent;
use crate::error::{ApiError, chain};
use crate::feed::Feed;
use crate::incoming::{Incoming, Part};
use crate::model::IsoRecord;

/// Bytes per message to the agents.
const CHUNK: usize = 1 << 20;

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
    let mut copies: Vec<Feed<pb::PutIsoRequest, pb::IsoFile>> = targets
        .into_iter()
        .map(|(node, agent)| {
            Feed::open(&node, "the ISO", header.clone(), move |parts| async move {
                agent.put_iso(parts).await
            })
        })
        .collect();
    let mut incoming = Incoming::new(parts, iso.size_bytes);
    while let Some(data) = incoming.read_some(CHUNK).await? {
        for copy in &mut copies {
            let part = pb::put_iso_request::Part::Data(data.clone());
            copy.send(pb::PutIsoRequest { part: Some(part) }).await?;
        }
    }
    let sha256 = incoming.finish().await?;
    finish(copies, &sha256).await?;
    Ok(sha256)
}

/// Commits every copy with the verified SHA-256 (an agent keeps its copy only on this
/// commit, and only if its own checksum matches) and checks each host's answer.
async fn finish(
    copies: Vec<Feed<pb::PutIsoRequest, pb::IsoFile>>,
    sha256: &str,
) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    for copy in copies {
        let node = copy.node().to_string();
        let commit = pb::PutIsoRequest {
            part: Some(pb::put_iso_request::Part::CommitSha256(sha256.to_string())),
        };
        match copy.close(commit).await {
            Ok(file) if file.sha256 == sha256 => {}
            Ok(file) => errors.push(format!(
                "node {node}'s copy hashes to {}, not {sha256}",
                file.sha256
            )),
            Err(e) => errors.push(chain(&e)),
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

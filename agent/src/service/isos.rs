//! The ISO library's requests: an upload streamed into place, a deletion. Both pass the fence
//! by term (they concern no VM), so a controller that no longer serves cannot change the
//! library.

use std::path::PathBuf;

use proto::agent as pb;
use tonic::Streaming;

use super::{Error, Inner, invalid};
use crate::isos;
use crate::upload::Received;

impl Inner {
    /// Writes the ISO `stream` carries, logging begin and end.
    pub(super) async fn put_iso(
        &self,
        mut stream: Streaming<pb::PutIsoRequest>,
    ) -> Result<pb::IsoFile, Error> {
        let header = match stream.message().await {
            Ok(Some(pb::PutIsoRequest {
                part: Some(pb::put_iso_request::Part::Header(header)),
            })) => header,
            Ok(_) => return Err(invalid("an ISO upload must start with its header")),
            Err(status) => return Err(invalid(format!("the ISO upload broke off: {status}"))),
        };
        let iso = header.iso.unwrap_or_default();
        self.deps.fence.admit_term(header.term)?;
        tracing::info!(node = %self.node, iso = %iso.name, group = %iso.storage_group, size = header.size_bytes, "ISO upload begin");
        let outcome = self
            .receive_iso(&iso, header.size_bytes, header.term, &mut stream)
            .await;
        match &outcome {
            Ok(file) => {
                tracing::info!(node = %self.node, iso = %iso.name, group = %iso.storage_group, sha256 = %file.sha256, "ISO upload end: stored");
            }
            Err(e) => {
                tracing::warn!(node = %self.node, iso = %iso.name, group = %iso.storage_group, error = %daemon::error_chain(e), "ISO upload end: failed, nothing kept");
            }
        }
        let file = outcome?;
        Ok(pb::IsoFile {
            iso: Some(iso),
            size_bytes: file.size_bytes,
            sha256: file.sha256,
        })
    }

    async fn receive_iso(
        &self,
        iso: &pb::IsoRef,
        size_bytes: u64,
        term: i64,
        stream: &mut Streaming<pb::PutIsoRequest>,
    ) -> Result<Received, Error> {
        let mut upload = isos::begin(
            &self.deps.storage,
            &iso.storage_group,
            &iso.name,
            size_bytes,
        )?;
        loop {
            let part = match stream.message().await {
                Ok(Some(pb::PutIsoRequest { part: Some(part) })) => part,
                Ok(None) => {
                    return Err(invalid(
                        "the ISO upload ended without its commit; nothing was kept",
                    ));
                }
                Ok(Some(pb::PutIsoRequest { part: None })) => {
                    return Err(invalid("an ISO upload part is empty"));
                }
                Err(status) => {
                    return Err(invalid(format!("the ISO upload broke off: {status}")));
                }
            };
            match part {
                pb::put_iso_request::Part::Data(data) => {
                    // File writes block: off the runtime, one chunk at a time.
                    upload = upload.append(data).await.map_err(isos::Error::from)?;
                }
                pb::put_iso_request::Part::CommitSha256(sha256) => {
                    // The serving controller may have changed while the bytes flowed.
                    self.deps.fence.admit_term(term)?;
                    return Ok(upload
                        .commit(sha256, |received| received)
                        .await
                        .map_err(isos::Error::from)?);
                }
                pb::put_iso_request::Part::Header(_) => {
                    return Err(invalid("an ISO upload has one header, first"));
                }
            }
        }
    }

    /// Deletes an ISO from the library.
    pub(super) fn delete_iso(&self, request: pb::DeleteIsoRequest) -> Result<(), Error> {
        let iso = request.iso.unwrap_or_default();
        self.deps.fence.admit_term(request.term)?;
        isos::delete(&self.deps.storage, &iso.storage_group, &iso.name)?;
        tracing::info!(node = %self.node, iso = %iso.name, group = %iso.storage_group, "ISO deleted");
        Ok(())
    }

    /// The path of an ISO a spec boots from.
    pub(super) fn iso_path(&self, iso: &pb::IsoRef) -> Result<PathBuf, Error> {
        Ok(isos::find(
            &self.deps.storage,
            &iso.storage_group,
            &iso.name,
        )?)
    }
}

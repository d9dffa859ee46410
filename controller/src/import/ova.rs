//! An OVA imported: the tar read as it streams in, its OVF descriptor (which must come
//! first) turned into the VM's spec, each disk it names streamed to the VM's host, every
//! file hashed. Once the archive has ended, the manifest (when there is one) must list every
//! file with its SHA-256, every disk must have arrived, and the whole file must match the
//! uploader's size and checksum; only then are the disks committed.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use tokio_stream::Stream;

use super::{Begun, CHUNK, Header, ImageFormat, commit, create, open_disk, send};
use crate::engine::EngineHandle;
use crate::error::ApiError;
use crate::incoming::{Incoming, Part};
use crate::model::VmRecord;
use crate::ova::{read, tar};

/// The largest descriptor and manifest read (both are kept in memory).
const MAX_DESCRIPTOR: u64 = 4 << 20;
const MAX_MANIFEST: u64 = 1 << 20;

/// Imports the OVA `header` announces.
pub(super) async fn run<S>(
    engine: &EngineHandle,
    header: &Header,
    incoming: Incoming<S>,
) -> Result<VmRecord, ApiError>
where
    S: Stream<Item = Result<Part, ApiError>> + Unpin,
{
    let file = header.file_name.clone();
    let mut tar = Untar::new(incoming, file.clone());
    let first = tar
        .next()
        .await?
        .ok_or_else(|| invalid(format!("{file} is an empty archive")))?;
    if !first.name.ends_with(".ovf") {
        return Err(invalid(format!(
            "{file} does not start with an OVF descriptor (its first file is {}); is it an OVA?",
            first.name
        )));
    }
    let xml = tar.read_all(&first, MAX_DESCRIPTOR).await?;
    let mut hashes = vec![(first.name.clone(), hex(Sha256::digest(&xml)))];
    let xml = String::from_utf8(xml)
        .map_err(|_| invalid(format!("{}'s OVF descriptor is not UTF-8", file)))?;
    let appliance = read::descriptor(&xml).map_err(|e| invalid(format!("{file}: {e}")))?;
    let spec = super::spec(&appliance, &header.overrides, &file)?;
    create(engine, spec, move |begun: Begun| async move {
        let mut disks: Vec<Option<_>> = appliance.disks.iter().map(|_| None).collect();
        let mut manifest = None;
        while let Some(entry) = tar.next().await? {
            let disk = appliance.disks.iter().position(|d| d.href == entry.name);
            if let Some(i) = disk {
                if disks[i].is_some() {
                    return Err(invalid(format!("{file} holds {} twice", entry.name)));
                }
                let mut feed = open_disk(&begun, i, ImageFormat::Vmdk, entry.size)?;
                let mut hasher = Sha256::new();
                while let Some(data) = tar.read_some().await? {
                    hasher.update(&data);
                    send(&mut feed, data).await?;
                }
                let sha256 = hex(hasher.finalize());
                hashes.push((entry.name, sha256.clone()));
                disks[i] = Some((feed, sha256));
            } else if entry.name.ends_with(".mf") && manifest.is_none() {
                let text = tar.read_all(&entry, MAX_MANIFEST).await?;
                let text = String::from_utf8_lossy(&text);
                manifest =
                    Some(read::manifest(&text).map_err(|e| invalid(format!("{file}: {e}")))?);
            } else if entry.name.ends_with(".cert") {
                // It signs the manifest and is not listed in it; the signature is not checked.
                while tar.read_some().await?.is_some() {}
                tracing::info!(vm = %begun.record.name, file = %entry.name, "import: the archive is signed; its certificate is not checked");
            } else {
                // A file the descriptor does not use: hashed for the manifest, not kept.
                let mut hasher = Sha256::new();
                while let Some(data) = tar.read_some().await? {
                    hasher.update(&data);
                }
                tracing::info!(vm = %begun.record.name, file = %entry.name, "import: skipping a file the descriptor does not use");
                hashes.push((entry.name, hex(hasher.finalize())));
            }
        }
        tar.finish().await?;
        let mut arrived = Vec::with_capacity(disks.len());
        for (i, disk) in disks.into_iter().enumerate() {
            let Some(disk) = disk else {
                return Err(invalid(format!(
                    "{file} lacks {}, its descriptor's disk {}: it is truncated or incomplete; nothing was kept",
                    appliance.disks[i].href,
                    i + 1
                )));
            };
            arrived.push(disk);
        }
        match &manifest {
            Some(manifest) => check_manifest(manifest, &hashes, &file)?,
            None => {
                tracing::warn!(vm = %begun.record.name, file = %file, "import: the archive has no manifest; only the upload's own checksum vouches for it");
            }
        }
        for (i, (feed, sha256)) in arrived.into_iter().enumerate() {
            commit(&begun, i, feed, sha256).await?;
        }
        Ok(())
    })
    .await
}

/// Checks that the manifest lists exactly the archive's other files, each with its SHA-256.
fn check_manifest(
    manifest: &BTreeMap<String, String>,
    files: &[(String, String)],
    file: &str,
) -> Result<(), ApiError> {
    for (name, sha256) in files {
        match manifest.get(name) {
            Some(listed) if listed == sha256 => {}
            Some(listed) => {
                return Err(invalid(format!(
                    "{file} is corrupt: {name} hashes to {sha256} but its manifest says {listed}; nothing was kept"
                )));
            }
            None => {
                return Err(invalid(format!(
                    "{file}'s manifest does not list {name}; nothing was kept"
                )));
            }
        }
    }
    match manifest
        .keys()
        .find(|listed| !files.iter().any(|(name, _)| name == *listed))
    {
        Some(missing) => Err(invalid(format!(
            "{file} lacks {missing}, which its manifest lists: it is truncated or incomplete; nothing was kept"
        ))),
        None => Ok(()),
    }
}

fn invalid(reason: String) -> ApiError {
    ApiError::invalid("file", reason)
}

fn hex(digest: impl std::fmt::LowerHex) -> String {
    format!("{digest:x}")
}

/// A tar archive read as it streams in.
struct Untar<S> {
    incoming: Incoming<S>,
    file: String,
    /// The current entry's name and unread bytes.
    name: String,
    remaining: u64,
    padding: usize,
}

impl<S> Untar<S>
where
    S: Stream<Item = Result<Part, ApiError>> + Unpin,
{
    fn new(incoming: Incoming<S>, file: String) -> Untar<S> {
        Untar {
            incoming,
            file,
            name: String::new(),
            remaining: 0,
            padding: 0,
        }
    }

    /// The next entry's header, after skipping what is left of the current one; `None` at
    /// the archive's end marker.
    async fn next(&mut self) -> Result<Option<tar::Entry>, ApiError> {
        while self.read_some().await?.is_some() {}
        if self.padding > 0 {
            let padding = std::mem::take(&mut self.padding);
            if self.incoming.read_exact(padding).await?.is_none() {
                return Err(self.truncated());
            }
        }
        let Some(block) = self.incoming.read_exact(512).await? else {
            return Err(invalid(format!(
                "{} is truncated: it ends before the archive's end marker; nothing was kept",
                self.file
            )));
        };
        let block: [u8; 512] = block
            .try_into()
            .map_err(|_| ApiError::Internal("a tar block is not 512 bytes".into()))?;
        let entry = tar::parse_header(&block)
            .map_err(|e| invalid(format!("{}: {e}; nothing was kept", self.file)))?;
        if let Some(entry) = &entry {
            self.name = entry.name.clone();
            self.remaining = entry.size;
            self.padding = tar::padding(entry.size).len();
        }
        Ok(entry)
    }

    /// The current entry's next bytes; `None` at its end.
    async fn read_some(&mut self) -> Result<Option<Vec<u8>>, ApiError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let max = usize::try_from(self.remaining).map_or(CHUNK, |r| r.min(CHUNK));
        let data = self
            .incoming
            .read_some(max)
            .await?
            .ok_or_else(|| self.truncated())?;
        self.remaining -= data.len() as u64;
        Ok(Some(data))
    }

    /// All of `entry`, which must be at most `max` bytes.
    async fn read_all(&mut self, entry: &tar::Entry, max: u64) -> Result<Vec<u8>, ApiError> {
        if entry.size > max {
            return Err(invalid(format!(
                "{}'s {} is {} bytes; at most {max} are read",
                self.file, entry.name, entry.size
            )));
        }
        let mut out = Vec::new();
        while let Some(data) = self.read_some().await? {
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    /// After the end marker: only zero padding may follow, then the file must be whole.
    async fn finish(mut self) -> Result<String, ApiError> {
        while let Some(data) = self.incoming.read_some(CHUNK).await? {
            if data.iter().any(|&b| b != 0) {
                return Err(invalid(format!(
                    "{} has data after the archive's end marker; nothing was kept",
                    self.file
                )));
            }
        }
        self.incoming.finish().await
    }

    fn truncated(&self) -> ApiError {
        invalid(format!(
            "{} is truncated: it ends inside {}; nothing was kept",
            self.file, self.name
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in files {
            out.extend_from_slice(&tar::header(name, data.len() as u64, 0));
            out.extend_from_slice(data);
            out.extend_from_slice(&tar::padding(data.len() as u64));
        }
        out.extend_from_slice(&tar::TRAILER);
        out
    }

    fn untar(bytes: &[u8]) -> Untar<impl Stream<Item = Result<Part, ApiError>> + Unpin + use<>> {
        let len = bytes.len() as u64;
        let sha256 = hex(Sha256::digest(bytes));
        let parts = bytes
            .chunks(700)
            .map(|c| Ok(Part::Data(c.to_vec())))
            .chain([Ok(Part::Sha256(sha256))])
            .collect::<Vec<_>>();
        Untar::new(
            Incoming::new(tokio_stream::iter(parts), len),
            "x.ova".into(),
        )
    }

    #[tokio::test]
    async fn entries_read_in_order_with_their_bytes() {
        let mut tar = untar(&archive(&[("a.ovf", b"<E/>"), ("b.vmdk", &[9u8; 1500])]));

        let a = tar.next().await.unwrap().unwrap();
        assert_eq!(tar.read_all(&a, 100).await.unwrap(), b"<E/>");
        let b = tar.next().await.unwrap().unwrap();
        assert_eq!((b.name.as_str(), b.size), ("b.vmdk", 1500));
        // Left unread: skipped by the next call.
        assert_eq!(tar.next().await.unwrap(), None);
        tar.finish().await.unwrap();
    }

    #[tokio::test]
    async fn a_cut_archive_is_truncated_wherever_it_is_cut() {
        let whole = archive(&[("a.ovf", b"<E/>"), ("b.vmdk", &[9u8; 1500])]);
        for cut in [600, 1100, 2560, whole.len() - 1024] {
            let mut tar = untar(&whole[..cut]);
            let err = async {
                while tar.next().await?.is_some() {}
                Ok::<_, ApiError>(())
            }
            .await
            .unwrap_err();
            assert!(err.to_string().contains("truncated"), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn the_manifest_must_list_every_file_with_its_sum() {
        let files = vec![
            ("a.ovf".to_string(), "11".repeat(32)),
            ("b.vmdk".to_string(), "22".repeat(32)),
        ];
        let mut manifest: BTreeMap<String, String> = files.iter().cloned().collect();
        check_manifest(&manifest, &files, "x.ova").unwrap();

        manifest.insert("b.vmdk".into(), "33".repeat(32));
        let err = check_manifest(&manifest, &files, "x.ova").unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");

        manifest.remove("b.vmdk");
        check_manifest(&manifest, &files, "x.ova").unwrap_err();

        let mut extra: BTreeMap<String, String> = files.iter().cloned().collect();
        extra.insert("c.vmdk".into(), "44".repeat(32));
        let err = check_manifest(&extra, &files, "x.ova").unwrap_err();
        assert!(err.to_string().contains("lacks c.vmdk"), "{err}");
    }
}

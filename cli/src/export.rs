//! `pvctl vm-export`: the OVA the serving controller streams, written to a temporary file
//! next to the target and renamed into place only once its size and SHA-256 match what the
//! controller announced. A broken stream or a full disk removes the temporary file: the
//! target is either a whole archive or absent.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use proto::v1 as pb;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::client;
use crate::progress::Progress;
use crate::units::human;

/// A finished export.
#[derive(Debug)]
pub struct Exported {
    /// The VM.
    pub vm: String,
    /// The snapshot exported, if one.
    pub snapshot: Option<String>,
    /// The archive.
    pub file: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Its SHA-256.
    pub sha256: String,
    /// The host whose disks were read.
    pub node: String,
}

/// The temporary file, removed on drop unless it was renamed into place.
struct Partial {
    path: PathBuf,
    kept: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Exports `vm` (its snapshot `snapshot` if given) to the new file `to`.
pub async fn export(
    endpoints: &client::Endpoints,
    vm: &str,
    snapshot: Option<String>,
    to: &Path,
) -> anyhow::Result<Exported> {
    if to.exists() {
        bail!(
            "{} exists; remove it or export to another file",
            to.display()
        );
    }
    let name = to
        .file_name()
        .with_context(|| format!("{} names no file", to.display()))?
        .to_string_lossy()
        .into_owned();
    let dir = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut partial = Partial {
        path: dir.join(format!(".{name}.{}.partial", std::process::id())),
        kept: false,
    };
    let mut file = tokio::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&partial.path)
        .await
        .with_context(|| format!("creating {}", partial.path.display()))?;
    let request = pb::ExportVmRequest {
        vm: vm.to_string(),
        snapshot: snapshot.clone().unwrap_or_default(),
    };
    let mut client = client::connect(endpoints).await?;
    let mut stream = client.export_vm(request).await?.into_inner();
    let begin = match stream.message().await? {
        Some(pb::ExportVmChunk {
            part: Some(pb::export_vm_chunk::Part::Begin(begin)),
        }) => begin,
        _ => bail!("the export did not start with its size; nothing was kept"),
    };
    let mut progress = std::io::stderr()
        .is_terminal()
        .then(|| Progress::new(&name, begin.size_bytes));
    let (mut hash, mut written) = (Sha256::new(), 0u64);
    let sha256 = loop {
        let part = stream
            .message()
            .await
            .map_err(anyhow::Error::from)
            .and_then(|c| c.and_then(|c| c.part).context("the export ended early"))
            .context("nothing was kept")?;
        match part {
            pb::export_vm_chunk::Part::Data(data) => {
                hash.update(&data);
                written += data.len() as u64;
                file.write_all(&data).await.with_context(|| {
                    format!("writing {}; nothing was kept", partial.path.display())
                })?;
                if let Some(p) = &mut progress {
                    p.show(written);
                }
            }
            pb::export_vm_chunk::Part::End(end) => break end.sha256,
            pb::export_vm_chunk::Part::Begin(_) => {
                bail!("the export began twice; nothing was kept")
            }
        }
    };
    if let Some(p) = &mut progress {
        p.done();
    }
    let ours = format!("{:x}", hash.finalize());
    if written != begin.size_bytes || ours != sha256 {
        bail!(
            "the export arrived damaged ({written} of {} bytes, SHA-256 {ours} instead of {sha256}); nothing was kept",
            begin.size_bytes
        );
    }
    file.sync_all()
        .await
        .with_context(|| format!("syncing {}; nothing was kept", partial.path.display()))?;
    drop(file);
    std::fs::rename(&partial.path, to)
        .with_context(|| format!("renaming {} to {}", partial.path.display(), to.display()))?;
    partial.kept = true;
    // The rename is durable once the directory is synced too.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(Exported {
        vm: vm.to_string(),
        snapshot,
        file: to.to_path_buf(),
        bytes: written,
        sha256,
        node: begin.node,
    })
}

/// An export as JSON.
pub fn exported_json(e: &Exported) -> Value {
    json!({
        "vm": e.vm,
        "snapshot": e.snapshot,
        "file": e.file,
        "bytes": e.bytes,
        "sha256": e.sha256,
        "node": e.node,
    })
}

/// An export as text.
pub fn exported_text(e: &Exported) -> String {
    let what = match &e.snapshot {
        Some(id) => format!("snapshot {id} of VM {}", e.vm),
        None => format!("VM {}", e.vm),
    };
    format!(
        "exported {what} from {} to {} ({})\nsha256: {}\n",
        e.node,
        e.file.display(),
        human(e.bytes),
        e.sha256
    )
}

//! The ISO library's commands: an upload streamed from a file with its SHA-256 computed on
//! the way (and a progress line on a terminal, none under cron), the listing, a deletion.

use std::fs::File;
use std::io::{IsTerminal, Read};
use std::path::Path;

use anyhow::{Context, bail};
use proto::v1 as pb;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client;
use crate::progress::Progress;
use crate::units::{human, utc};

/// Bytes per upload message.
const CHUNK: usize = 1 << 20;
/// Chunks read ahead of the network.
const DEPTH: usize = 4;

/// Uploads the ISO at `path` into the library as `name` (default: the file's name).
pub async fn add(
    endpoints: &str,
    path: &Path,
    name: Option<String>,
    storage_group: Option<String>,
) -> anyhow::Result<pb::Iso> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size_bytes = file
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    if size_bytes == 0 {
        bail!("{} is empty", path.display());
    }
    let name = match name {
        Some(name) => name,
        None => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name; give --name", path.display()))?,
    };
    let header = pb::AddIsoRequest {
        part: Some(pb::add_iso_request::Part::Header(pb::IsoHeader {
            name: name.clone(),
            storage_group: storage_group.unwrap_or_default(),
            size_bytes,
        })),
    };
    let (tx, rx) = mpsc::channel(DEPTH);
    tx.send(header)
        .await
        .context("queueing the upload's header")?;
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| Progress::new(&name, size_bytes));
    let reader = tokio::task::spawn_blocking(move || read_parts(file, &tx, progress));
    let mut client = client::connect(endpoints).await?;
    let uploaded = client.add_iso(ReceiverStream::new(rx)).await;
    let read = reader
        .await
        .context("the file reader stopped")?
        .with_context(|| format!("reading {}", path.display()));
    let iso = uploaded?.into_inner();
    // A read error makes the server refuse the short upload; the read error says why.
    read?;
    Ok(iso)
}

/// Sends the file's bytes, then their SHA-256; stops early if the upload ended.
fn read_parts(
    mut file: File,
    tx: &mpsc::Sender<pb::AddIsoRequest>,
    mut progress: Option<Progress>,
) -> std::io::Result<()> {
    let mut hasher = Sha256::new();
    let mut sent: u64 = 0;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        hasher.update(&buf);
        let part = pb::AddIsoRequest {
            part: Some(pb::add_iso_request::Part::Data(buf)),
        };
        if tx.blocking_send(part).is_err() {
            return Ok(());
        }
        sent += n as u64;
        if let Some(progress) = &mut progress {
            progress.show(sent);
        }
    }
    let sha256 = format!("{:x}", hasher.finalize());
    let _ = tx.blocking_send(pb::AddIsoRequest {
        part: Some(pb::add_iso_request::Part::Sha256(sha256)),
    });
    if let Some(progress) = &mut progress {
        progress.done();
    }
    Ok(())
}

/// The state's name as pvctl shows it.
pub fn state_name(state: pb::IsoState) -> &'static str {
    match state {
        pb::IsoState::Uploading => "uploading",
        pb::IsoState::Ready => "ready",
        pb::IsoState::Deleting => "deleting",
        pb::IsoState::Invalid => "invalid",
    }
}

/// An ISO as JSON.
pub fn iso_json(iso: &pb::Iso) -> Value {
    json!({
        "name": iso.name,
        "storage_group": iso.storage_group,
        "size_bytes": iso.size_bytes,
        "sha256": iso.sha256,
        "state": state_name(iso.state()),
        "created_unix_ms": iso.created_unix_ms,
        "used_by": iso.used_by,
    })
}

/// One ISO as text.
pub fn iso_text(iso: &pb::Iso) -> String {
    format!(
        "ISO {} ({}, {}) in storage group {}\nsha256: {}\ncreated: {}\n",
        iso.name,
        human(iso.size_bytes),
        state_name(iso.state()),
        iso.storage_group,
        iso.sha256,
        utc(iso.created_unix_ms)
    )
}

/// The library as a table.
pub fn isos_table(isos: &[pb::Iso]) -> String {
    if isos.is_empty() {
        return "the ISO library is empty; add one with `pvctl iso-add FILE`\n".into();
    }
    let mut out = format!(
        "{:<32} {:>10} {:<10} {:<12} {:<16} USED BY\n",
        "NAME", "SIZE", "STATE", "GROUP", "SHA256"
    );
    for iso in isos {
        let short = iso.sha256.get(..16).unwrap_or(&iso.sha256);
        out.push_str(&format!(
            "{:<32} {:>10} {:<10} {:<12} {:<16} {}\n",
            iso.name,
            human(iso.size_bytes),
            state_name(iso.state()),
            iso.storage_group,
            short,
            if iso.used_by.is_empty() {
                "-".to_string()
            } else {
                iso.used_by.join(",")
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso(name: &str, used_by: &[&str]) -> pb::Iso {
        pb::Iso {
            name: name.into(),
            storage_group: "sg0".into(),
            size_bytes: 5 << 20,
            sha256: "0123456789abcdef0123".into(),
            created_unix_ms: 0,
            used_by: used_by.iter().map(ToString::to_string).collect(),
            state: pb::IsoState::Ready.into(),
        }
    }

    #[test]
    fn isos_table_shows_short_sha_and_users() {
        let table = isos_table(&[iso("rescue.iso", &["web", "db"]), iso("b.iso", &[])]);

        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].starts_with("rescue.iso"), "{table}");
        assert!(lines[1].contains("0123456789abcdef web,db"), "{table}");
        assert!(lines[2].ends_with(" -"), "{table}");
    }

    #[test]
    fn iso_json_names_the_state() {
        let value = iso_json(&iso("rescue.iso", &["web"]));

        assert_eq!(value["state"], "ready");
        assert_eq!(value["used_by"][0], "web");
    }
}

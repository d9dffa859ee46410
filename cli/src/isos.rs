//! The ISO library's commands: an upload streamed from a file with its SHA-256 computed on
//! the way (and a progress line on a terminal, none under cron), the listing, a deletion.

use std::path::Path;

use anyhow::bail;
use proto::v1 as pb;
use serde_json::{Value, json};

use crate::client;
use crate::units::{human, utc};
use crate::upload::Source;

/// Uploads the ISO at `path` into the library as `name` (default: the file's name).
pub async fn add(
    endpoints: &client::Endpoints,
    path: &Path,
    name: Option<String>,
    storage_group: Option<String>,
) -> anyhow::Result<pb::Iso> {
    let source = Source::open(path)?;
    let name = match name.or_else(|| source.file_name()) {
        Some(name) => name,
        None => bail!("{} has no file name; give --name", path.display()),
    };
    let header = pb::AddIsoRequest {
        part: Some(pb::add_iso_request::Part::Header(pb::IsoHeader {
            name: name.clone(),
            storage_group: storage_group.unwrap_or_default(),
            size_bytes: source.size_bytes,
        })),
    };
    let (parts, reader) = source
        .stream(
            header,
            |data| pb::AddIsoRequest {
                part: Some(pb::add_iso_request::Part::Data(data)),
            },
            |sha256| pb::AddIsoRequest {
                part: Some(pb::add_iso_request::Part::Sha256(sha256)),
            },
        )
        .await?;
    let mut client = client::connect(endpoints).await?;
    let uploaded = client.add_iso(parts).await;
    let read = reader.finish().await;
    let iso = uploaded?.into_inner();
    // A read error makes the server refuse the short upload; the read error says why.
    read?;
    Ok(iso)
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

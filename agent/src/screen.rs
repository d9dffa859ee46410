//! A running guest's screen as a PNG (QMP `screendump`): what `pvctl vm-screenshot` and the
//! console show of a guest that has no serial console, e.g. one installing from an ISO.
//! Domains other than FT ones have a VGA device for it (`domain.rs`); QEMU writes the PNG
//! into a file of the agent's, which is read and removed.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::libvirt::{self, Libvirt};
use crate::qmp_block;

/// The PNG file signature.
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Errors taking a screenshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libvirt could not reach the domain.
    #[error(transparent)]
    Libvirt(#[from] libvirt::Error),
    /// QEMU refused or failed the screendump.
    #[error("taking the screenshot")]
    Dump(#[from] qmp_block::Error),
    /// The domain has no screen.
    #[error("VM {uuid} has no screen (FT VMs run without one; their serial console shows them)")]
    NoScreen {
        /// The VM.
        uuid: String,
    },
    /// The screenshot file could not be made or read.
    #[error("the screenshot file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU wrote something that is not a PNG.
    #[error("the screenshot {path} is not a PNG")]
    NotPng {
        /// The file.
        path: PathBuf,
    },
}

/// The screen of running domain `uuid`, as PNG bytes, through a file in `dir`.
pub async fn png(libvirt: &Libvirt, uuid: &str, dir: &Path) -> Result<Vec<u8>, Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::File {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(format!("{uuid}-{}.png", std::process::id()));
    let owned = (uuid.to_string(), path.clone());
    // On libvirt's blocking thread: the dump, then reading the file QEMU wrote.
    let read = libvirt
        .with_monitor(uuid, move |m| {
            let (uuid, path) = owned;
            let arguments = json!({"filename": path.to_string_lossy(), "format": "png"});
            match qmp_block::execute::<serde::de::IgnoredAny>(m, "screendump", &arguments) {
                Ok(_) => {}
                // QEMU 10: "There is no QemuConsole I can screendump from."
                Err(qmp_block::Error::Refused { desc, .. }) if desc.contains("QemuConsole") => {
                    return Err(Error::NoScreen { uuid });
                }
                Err(e) => return Err(Error::Dump(e)),
            }
            std::fs::read(&path).map_err(|source| Error::File { path, source })
        })
        .await;
    let _ = std::fs::remove_file(&path);
    let bytes = read?;
    if !bytes.starts_with(PNG_SIGNATURE) {
        return Err(Error::NotPng { path });
    }
    Ok(bytes)
}

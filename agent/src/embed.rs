//! Setup of libvirt's embedded QEMU driver root (`qemu:///embed?root=DIR`).
//!
//! The embedded driver runs inside the agent with no libvirtd, virtlogd or libvirt-daemon-system,
//! which needs three things (see notes/libvirt-embed.md): a `libvirt-qemu` user must exist even
//! though QEMU runs as root (libvirt 9.0 resolves it before reading qemu.conf), `ROOT/etc/qemu.conf`
//! must run QEMU as root without a security driver, and QEMU's stdio must go to files because
//! there is no virtlogd.

use std::fs;
use std::path::{Path, PathBuf};

use daemon::fsutil::write_atomic;

/// The qemu.conf the agent writes into every embed root, with FT guests' RAM files under
/// `ram_dir` (on tmpfs, so that guest RAM never goes through a disk).
pub fn qemu_conf(ram_dir: &Path) -> String {
    format!(
        "# Written by pv-agent: QEMU runs as root, without virtlogd or a security driver.
user = \"root\"
group = \"root\"
dynamic_ownership = 0
security_driver = \"none\"
stdio_handler = \"file\"
memory_backing_dir = \"{}\"
",
        ram_dir.display()
    )
}

/// Where FT guests' RAM files go unless the agent's config says otherwise.
pub const DEFAULT_RAM_DIR: &str = "/dev/shm/pairvisor";

/// Errors preparing the embed root.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the root's files failed.
    #[error("preparing embed root file {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The `libvirt-qemu` user is missing.
    #[error(
        "user libvirt-qemu does not exist; libvirt's embedded driver needs it: run scripts/install-deps.sh or `useradd -r libvirt-qemu`"
    )]
    UserMissing,
}

/// Prepares `root` for the embedded driver, FT guests' RAM files under `ram_dir`; safe to
/// run on every start.
pub fn prepare(root: &Path, ram_dir: &Path) -> Result<(), Error> {
    if !user_exists("libvirt-qemu") {
        return Err(Error::UserMissing);
    }
    let etc = root.join("etc");
    fs::create_dir_all(&etc).map_err(|source| Error::Write {
        path: etc.clone(),
        source,
    })?;
    fs::create_dir_all(ram_dir).map_err(|source| Error::Write {
        path: ram_dir.to_path_buf(),
        source,
    })?;
    let conf = etc.join("qemu.conf");
    let text = qemu_conf(ram_dir);
    if fs::read_to_string(&conf).is_ok_and(|old| old == text) {
        return Ok(());
    }
    write_atomic(&conf, text.as_bytes()).map_err(|source| Error::Write { path: conf, source })
}

fn user_exists(name: &str) -> bool {
    let prefix = format!("{name}:");
    fs::read_to_string("/etc/passwd").is_ok_and(|text| text.lines().any(|l| l.starts_with(&prefix)))
}

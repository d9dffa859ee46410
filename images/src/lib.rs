//! Guest images Pairvisor builds itself, and the on-disk layout of a boot image.
//!
//! A *boot image* is a directory holding a kernel, an initramfs and a kernel command line
//! (see [`BootImage`]). The agent boots VMs from such directories by name; the lab and the
//! end-to-end tests build the tiny test guest into one with [`ensure_tiny_guest`].
#![deny(missing_docs)]

mod tiny;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use tiny::{COUNTER_PORT, TINY_GUEST_NAME, TINY_GUEST_VERSION, ensure_tiny_guest, guest_ip};

/// File name of the kernel inside a boot image directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// File name of the initramfs inside a boot image directory.
pub const INITRD_FILE: &str = "initrd.cpio.gz";
/// File name of the kernel command line inside a boot image directory.
pub const CMDLINE_FILE: &str = "cmdline";

/// Errors from opening or building an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The build script failed; its output is in the log above.
    #[error("building image {name} into {dir} failed ({status}); see the build output above")]
    Build {
        /// Image name.
        name: String,
        /// Directory the image was being built into.
        dir: PathBuf,
        /// Exit status of the build script.
        status: String,
    },
    /// Reading or writing a file of the image failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A boot image directory lacks one of its files.
    #[error("boot image {dir} has no {file}; rebuild or reinstall the image")]
    MissingFile {
        /// The image directory.
        dir: PathBuf,
        /// The missing file name.
        file: &'static str,
    },
}

impl Error {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::Io { op, path, source }
    }
}

/// A directory-kernel boot image: what QEMU needs to boot a guest without firmware disks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootImage {
    /// Path of the kernel.
    pub kernel: PathBuf,
    /// Path of the initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
}

impl BootImage {
    /// Opens the boot image stored in `dir`, checking that all its files exist.
    pub fn open(dir: &Path) -> Result<BootImage, Error> {
        for file in [KERNEL_FILE, INITRD_FILE, CMDLINE_FILE] {
            if !dir.join(file).is_file() {
                return Err(Error::MissingFile {
                    dir: dir.to_path_buf(),
                    file,
                });
            }
        }
        let cmdline_path = dir.join(CMDLINE_FILE);
        let cmdline = fs::read_to_string(&cmdline_path)
            .map_err(Error::io("reading", &cmdline_path))?
            .trim()
            .to_string();
        Ok(BootImage {
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRD_FILE),
            cmdline,
        })
    }

    /// Copies the image in `src` to `dst` (replacing it atomically), e.g. into a host's image library.
    pub fn install(src: &Path, dst: &Path) -> Result<BootImage, Error> {
        BootImage::open(src)?;
        let tmp = tmp_sibling(dst);
        remove_dir_if_exists(&tmp)?;
        fs::create_dir_all(&tmp).map_err(Error::io("creating", &tmp))?;
        for file in [KERNEL_FILE, INITRD_FILE, CMDLINE_FILE] {
            let to = tmp.join(file);
            fs::copy(src.join(file), &to).map_err(Error::io("copying to", &to))?;
        }
        replace_dir(&tmp, dst)?;
        BootImage::open(dst)
    }
}

/// `dir` with a `.tmp` suffix, next to it, so a rename into place stays on one file system.
fn tmp_sibling(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    dir.with_file_name(name)
}

fn remove_dir_if_exists(dir: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("removing", dir)(e)),
        _ => Ok(()),
    }
}

/// Moves the finished directory `tmp` to `dst`, removing an older `dst` first.
fn replace_dir(tmp: &Path, dst: &Path) -> Result<(), Error> {
    remove_dir_if_exists(dst)?;
    fs::rename(tmp, dst).map_err(Error::io("renaming into place", dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_image(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(KERNEL_FILE), b"k").unwrap();
        fs::write(dir.join(INITRD_FILE), b"i").unwrap();
        fs::write(dir.join(CMDLINE_FILE), b"console=ttyS0\n").unwrap();
    }

    #[test]
    fn open_complete_dir_reads_trimmed_cmdline() {
        let tmp = tempfile::tempdir().unwrap();
        write_image(tmp.path());

        let image = BootImage::open(tmp.path()).unwrap();

        assert_eq!(image.cmdline, "console=ttyS0");
    }

    #[test]
    fn open_without_initrd_names_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        write_image(tmp.path());
        fs::remove_file(tmp.path().join(INITRD_FILE)).unwrap();

        let err = BootImage::open(tmp.path()).unwrap_err();

        assert!(matches!(
            err,
            Error::MissingFile {
                file: INITRD_FILE,
                ..
            }
        ));
    }

    #[test]
    fn install_copies_image_to_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        write_image(&src);
        let dst = tmp.path().join("lib/tiny");
        fs::create_dir_all(tmp.path().join("lib")).unwrap();

        let image = BootImage::install(&src, &dst).unwrap();

        assert_eq!(image.kernel, dst.join(KERNEL_FILE));
    }
}

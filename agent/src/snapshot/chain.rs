//! A volume's snapshot chain on disk, handled with `qemu-img`: each generation is
//! `.snapshots/VOLUME/ID.qcow2`, and an incremental one names its parent as its backing file,
//! relative (`PARENT.qcow2`), so the chain reads whole from its directory. Every command runs
//! in that directory, so the relative names resolve.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Error, io_err};
use crate::domain::DiskFormat;

/// The directory of a storage group that holds its volumes' snapshot chains.
pub const DIR: &str = ".snapshots";
/// Suffix of a generation being written.
const CREATING: &str = ".creating";
/// Suffix of a volume being restored.
const RESTORING: &str = "restoring";

/// One volume's chain.
#[derive(Clone, Debug)]
pub struct Chain {
    /// The volume's storage group.
    pub group: String,
    /// `GROUP/.snapshots/VOLUME`.
    pub dir: PathBuf,
    /// The volume itself.
    pub volume: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Its virtual size.
    pub size_bytes: u64,
}

impl Chain {
    /// The finished file of generation `id`.
    pub fn file(&self, id: &str) -> PathBuf {
        self.dir.join(file_name(id))
    }

    /// The file generation `id` is written to before it is complete.
    pub fn creating(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{}{CREATING}", file_name(id)))
    }

    /// Creates the empty target of generation `id`: standalone, or on top of `parent`.
    pub async fn create_target(&self, id: &str, parent: Option<&str>) -> Result<PathBuf, Error> {
        fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let target = self.creating(id);
        let mut args = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
        ];
        if let Some(parent) = parent {
            args.extend(["-b".into(), file_name(parent), "-F".into(), "qcow2".into()]);
        }
        args.extend([
            target.to_string_lossy().into_owned(),
            self.size_bytes.to_string(),
        ]);
        self.qemu_img(&args).await?;
        Ok(target)
    }

    /// Copies the (stopped) volume into generation `id`: in full, or only what differs from
    /// `parent`. Returns the finished file.
    ///
    /// The difference comes from qemu-img's safe rebase: the new file starts as an empty
    /// overlay of the volume itself and is rebased onto the parent, which writes into it every
    /// cluster where the two differ. (`qemu-img convert -B` would not compare: it copies all.)
    pub async fn copy_offline(&self, id: &str, parent: Option<&str>) -> Result<PathBuf, Error> {
        fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let target = self.creating(id);
        let target_arg = target.to_string_lossy().into_owned();
        let steps: Vec<Vec<String>> = match parent {
            None => vec![vec![
                "convert".into(),
                "-f".into(),
                self.format.as_str().into(),
                "-O".into(),
                "qcow2".into(),
                self.volume.to_string_lossy().into_owned(),
                target_arg,
            ]],
            Some(parent) => vec![
                vec![
                    "create".into(),
                    "-q".into(),
                    "-f".into(),
                    "qcow2".into(),
                    "-b".into(),
                    self.volume.to_string_lossy().into_owned(),
                    "-F".into(),
                    self.format.as_str().into(),
                    target_arg.clone(),
                    self.size_bytes.to_string(),
                ],
                vec![
                    "rebase".into(),
                    "-q".into(),
                    "-f".into(),
                    "qcow2".into(),
                    "-b".into(),
                    file_name(parent),
                    "-F".into(),
                    "qcow2".into(),
                    target_arg,
                ],
            ],
        };
        for args in &steps {
            if let Err(e) = self.qemu_img(args).await {
                let _ = fs::remove_file(&target);
                return Err(e);
            }
        }
        self.finish(id)
    }

    /// Makes generation `id`'s written file durable under its name.
    pub fn finish(&self, id: &str) -> Result<PathBuf, Error> {
        let file = self.file(id);
        daemon::fsutil::sync_rename(&self.creating(id), &file)
            .map_err(io_err("syncing the snapshot into place", &file))?;
        Ok(file)
    }

    /// Removes generation `id`: the generations built on it are rebased onto its own parent
    /// first (qemu-img's safe rebase copies in what they read from it), so each still reads
    /// the same disk. A missing generation is not an error.
    pub async fn remove(&self, id: &str) -> Result<(), Error> {
        let file = self.file(id);
        if !file.exists() {
            return Ok(());
        }
        let parent = self.backing(&file).await?;
        for child in self.children(id).await? {
            let mut args = vec![
                "rebase".to_string(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
            ];
            match &parent {
                Some(parent) => {
                    args.extend(["-b".into(), parent.clone(), "-F".into(), "qcow2".into()])
                }
                None => args.extend(["-b".into(), String::new()]),
            }
            args.push(child.to_string_lossy().into_owned());
            self.qemu_img(&args).await?;
        }
        fs::remove_file(&file).map_err(io_err("deleting snapshot", &file))
    }

    /// Writes generation `id`'s disk (its whole chain read as one) over the volume.
    pub async fn restore(&self, id: &str) -> Result<(), Error> {
        let tmp = self.restore_to_temp(id).await?;
        self.replace_volume(&tmp)
    }

    /// Writes generation `id`'s disk into a temporary file next to the volume.
    pub async fn restore_to_temp(&self, id: &str) -> Result<PathBuf, Error> {
        let file = self.file(id);
        if !file.is_file() {
            return Err(Error::Missing {
                id: id.to_string(),
                path: file,
            });
        }
        let tmp = self.volume.with_extension(RESTORING);
        let args = [
            "convert".to_string(),
            "-f".into(),
            "qcow2".into(),
            "-O".into(),
            self.format.as_str().into(),
            file.to_string_lossy().into_owned(),
            tmp.to_string_lossy().into_owned(),
        ];
        if let Err(e) = self.qemu_img(&args).await {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    /// Makes the restored `tmp` the volume (synced, renamed over it).
    pub fn replace_volume(&self, tmp: &Path) -> Result<(), Error> {
        daemon::fsutil::sync_rename(tmp, &self.volume).map_err(io_err(
            "syncing the restored volume into place",
            &self.volume,
        ))
    }

    /// The generations whose backing file is `id`'s.
    async fn children(&self, id: &str) -> Result<Vec<PathBuf>, Error> {
        let wanted = file_name(id);
        let mut children = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(io_err("listing", &self.dir))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let is_generation = path.extension().is_some_and(|e| e == "qcow2");
            if is_generation && self.backing(&path).await?.as_deref() == Some(wanted.as_str()) {
                children.push(path);
            }
        }
        Ok(children)
    }

    /// The backing file named in `file`'s header, as written there.
    async fn backing(&self, file: &Path) -> Result<Option<String>, Error> {
        #[derive(Deserialize)]
        struct Info {
            #[serde(rename = "backing-filename")]
            backing: Option<String>,
        }
        let args = [
            "info".to_string(),
            "--output=json".into(),
            "-U".into(),
            "-f".into(),
            "qcow2".into(),
            file.to_string_lossy().into_owned(),
        ];
        let out = self.qemu_img(&args).await?;
        let info: Info = serde_json::from_slice(&out).map_err(|e| Error::QemuImg {
            args: args.join(" "),
            stderr: format!("unreadable output: {e}"),
        })?;
        Ok(info.backing)
    }

    async fn qemu_img(&self, args: &[String]) -> Result<Vec<u8>, Error> {
        crate::qemu_img::run(args, Some(&self.dir))
            .await
            .map_err(|f| Error::QemuImg {
                args: f.args,
                stderr: f.reason,
            })
    }
}

/// The file name of generation `id`.
pub fn file_name(id: &str) -> String {
    format!("{id}.qcow2")
}

/// Bytes a file takes on disk (not its apparent size: snapshots and volumes are sparse).
pub fn allocated(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.blocks().saturating_mul(512))
}

/// Removes what an earlier agent left of generations it did not finish.
pub fn sweep(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.to_string_lossy().ends_with(CREATING) {
            let _ = fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;

    const SIZE: u64 = 4 << 20;

    fn chain(dir: &Path) -> Chain {
        let volume = dir.join("vol.raw");
        fs::File::create(&volume).unwrap().set_len(SIZE).unwrap();
        Chain {
            group: "sg0".into(),
            dir: dir.join(DIR).join("vol.raw"),
            volume,
            format: DiskFormat::Raw,
            size_bytes: SIZE,
        }
    }

    fn write_at(path: &Path, offset: u64, byte: u8) {
        let mut file = fs::OpenOptions::new().write(true).open(path).unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&[byte; 65536]).unwrap();
    }

    #[tokio::test]
    async fn generations_restore_their_disk_after_a_middle_one_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain(dir.path());
        write_at(&chain.volume, 0, 1);
        write_at(&chain.volume, 1 << 20, 1);
        chain.copy_offline("1", None).await.unwrap();
        write_at(&chain.volume, 0, 2);
        chain.copy_offline("2", Some("1")).await.unwrap();
        write_at(&chain.volume, 2 << 20, 3);
        chain.copy_offline("3", Some("2")).await.unwrap();
        let third = fs::read(&chain.volume).unwrap();
        // Generation 2 holds only the one cluster that changed.
        assert!(allocated(&chain.file("2")).unwrap() < allocated(&chain.file("1")).unwrap());

        chain.remove("2").await.unwrap();
        write_at(&chain.volume, 0, 9);
        chain.restore("3").await.unwrap();

        assert!(!chain.file("2").exists());
        assert_eq!(fs::read(&chain.volume).unwrap(), third);
        chain.restore("1").await.unwrap();
        let first = fs::read(&chain.volume).unwrap();
        assert_eq!((first[0], first[1 << 20], first[2 << 20]), (1, 1, 0));
    }

    #[tokio::test]
    async fn removing_the_oldest_makes_the_next_standalone() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain(dir.path());
        write_at(&chain.volume, 0, 1);
        chain.copy_offline("1", None).await.unwrap();
        write_at(&chain.volume, 1 << 20, 2);
        chain.copy_offline("2", Some("1")).await.unwrap();
        let second = fs::read(&chain.volume).unwrap();

        chain.remove("1").await.unwrap();
        chain.restore("2").await.unwrap();

        assert_eq!(chain.backing(&chain.file("2")).await.unwrap(), None);
        assert_eq!(fs::read(&chain.volume).unwrap(), second);
    }

    #[tokio::test]
    async fn restore_of_a_missing_generation_is_refused_and_leaves_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain(dir.path());
        write_at(&chain.volume, 0, 7);

        let err = chain.restore("5").await.unwrap_err();

        assert!(matches!(err, Error::Missing { .. }), "{err}");
        assert_eq!(fs::read(&chain.volume).unwrap()[0], 7);
    }
}

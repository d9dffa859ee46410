//! A lab host's storage group on a disk that a test can make fail: a loop device over a
//! sparse image, formatted ext4 and mounted over the storage group directory inside the
//! host's agent's mount namespace (the agent and its QEMUs see it; the lab's namespaces are
//! entered with `ip netns exec`, which gives each daemon a mount namespace of its own).
//! [`FailingDisk::fail`] truncates the image and shrinks the loop device to nothing: every
//! later read or write of the filesystem gets an I/O error, as from a dead disk.

use std::path::PathBuf;
use std::process::Command;

use crate::Lab;

/// Size of the image behind the storage group: room for the tests' 16 MiB disks.
const IMAGE_SIZE: &str = "256M";

/// A host's storage group on a loop device that can be made to fail; unmounted and detached
/// on drop.
#[derive(Debug)]
pub struct FailingDisk {
    image: PathBuf,
    device: String,
    mount: PathBuf,
    agent_pid: i32,
}

impl FailingDisk {
    /// Mounts a fresh filesystem over `host`'s storage group (before any volume is made
    /// there: it hides what the directory held).
    pub fn mount(lab: &Lab, host: &str) -> FailingDisk {
        let image = lab.dir().join(format!("{host}-storage.img"));
        let _ = std::fs::remove_file(&image);
        run("truncate", &["-s", IMAGE_SIZE, &path(&image)]);
        let device = run("losetup", &["--find", "--show", &path(&image)])
            .trim()
            .to_string();
        let disk = FailingDisk {
            image,
            device,
            mount: lab.volume_path(host, ""),
            agent_pid: lab.pid(&format!("{host}-agent")),
        };
        run("mkfs.ext4", &["-q", &disk.device]);
        if let Err(e) = std::fs::create_dir_all(&disk.mount) {
            panic!("creating {}: {e}", disk.mount.display());
        }
        disk.in_agent(&["mount", &disk.device, &path(&disk.mount)]);
        disk
    }

    /// Makes the disk fail: from now on every I/O to it returns an error.
    pub fn fail(&self) {
        run("truncate", &["-s", "0", &path(&self.image)]);
        run("losetup", &["--set-capacity", &self.device]);
    }

    /// Runs `args` in the agent's mount namespace.
    fn in_agent(&self, args: &[&str]) -> String {
        let pid = self.agent_pid.to_string();
        let mut all = vec!["--target", &pid, "--mount", "--"];
        all.extend_from_slice(args);
        run("nsenter", &all)
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        // Best effort: the namespace is gone with its host's processes after a power cut,
        // and a failed filesystem may refuse a clean unmount (hence lazy).
        let pid = self.agent_pid.to_string();
        let mount = path(&self.mount);
        let _ = Command::new("nsenter")
            .args(["--target", &pid, "--mount", "--", "umount", "-l", &mount])
            .output();
        let _ = Command::new("losetup")
            .args(["--detach", &self.device])
            .output();
        let _ = std::fs::remove_file(&self.image);
    }
}

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs `program` with `args`, panicking with its output unless it succeeds; returns stdout.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

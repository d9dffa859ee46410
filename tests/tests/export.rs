//! End to end in the lab: `pvctl vm-export` writes an OVA (descriptor, disks, manifest, in
//! that order) whose disk holds exactly what the VM's disk, or its snapshot, holds. A running
//! VM, an unknown snapshot and an existing file are refused; a disk that fills up leaves no
//! file behind.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::{Console, GUEST_BOOT_TIMEOUT, Lab, pvctl_json, pvctl_ok, pvctl_refused, tiny_guest};

/// How soon a failed export lets its VM go (the pair notices the client left).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Data that does not compress, so the archive is large.
fn pattern(len: usize) -> Vec<u8> {
    tests::pattern(0x2545_f491_4f6c_dd1d, len)
}

fn sha256(path: &Path) -> String {
    tests::sha256sum(path)
}

/// Checks the archive `ova` against what pvctl said of it and against its own manifest;
/// returns the directory it was extracted to.
fn check_archive(ova: &Path, said: &serde_json::Value, vm: &str) -> PathBuf {
    assert_eq!(said["sha256"].as_str().unwrap(), sha256(ova));
    assert_eq!(
        said["bytes"].as_u64().unwrap(),
        std::fs::metadata(ova).unwrap().len()
    );
    let listed = Command::new("tar").arg("-tf").arg(ova).output().unwrap();
    assert!(listed.status.success());
    let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(String::from)
        .collect();
    let expected = [
        format!("{vm}.ovf"),
        format!("{vm}-disk1.vmdk"),
        format!("{vm}.mf"),
    ];
    assert_eq!(names, expected);
    let dir = ova.with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    let extracted = Command::new("tar")
        .arg("-xf")
        .arg(ova)
        .arg("-C")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(extracted.status.success());
    let manifest = std::fs::read_to_string(dir.join(format!("{vm}.mf"))).unwrap();
    let lines: Vec<&str> = manifest.lines().collect();
    assert_eq!(lines.len(), 2, "{manifest}");
    for (line, name) in lines.iter().zip(&expected) {
        assert_eq!(
            *line,
            format!("SHA256({name})= {}", sha256(&dir.join(name)))
        );
    }
    dir
}

/// Whether two disk images read the same, whatever their formats.
fn same_contents(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    out.status.success()
}

/// A small tmpfs mounted on a temporary directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "pvtest"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_and_a_snapshot_export_to_whole_ovas() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvxp", 248);
    let mut api = lab.client().await;
    let request = pb::CreateVmRequest {
        vcpus: 2,
        disks: vec![pb::DiskRequest {
            size_bytes: 16 << 20,
            storage_group: "sg0".into(),
            format: pb::DiskFormat::Raw.into(),
        }],
        ..tiny_guest("exp")
    };
    let vm = api.create_vm(request).await.unwrap().into_inner();
    let volume = lab.volume_path(&vm.node, &vm.disks[0].volume);
    let mut file = OpenOptions::new().write(true).open(&volume).unwrap();
    file.seek(SeekFrom::Start(1 << 20)).unwrap();
    file.write_all(&pattern(4 << 20)).unwrap();
    file.sync_all().unwrap();
    let console = Console::new(&lab, &vm);
    pvctl_ok(&lab.pvctl(&["vm-start", "exp"]));
    console.wait_counters(2, GUEST_BOOT_TIMEOUT);
    let out = tempfile::tempdir().unwrap();
    let ova = out.path().join("exp.ova");
    let to = ova.to_str().unwrap();

    // A running VM's disks change: refused, pointing at a snapshot.
    let refused = pvctl_refused(&lab.pvctl(&["vm-export", "exp", "--to", to]));
    assert!(refused.contains("--snapshot"), "{refused}");
    assert!(!ova.exists());

    // A snapshot of the running VM exports; its disk reads as the snapshot does.
    pvctl_ok(&lab.pvctl(&["vm-snapshot-create", "exp", "--consistency", "crash"]));
    let snap_ova = out.path().join("exp-1.ova");
    let said = pvctl_json(&lab.pvctl(&[
        "--json",
        "vm-export",
        "exp",
        "--snapshot",
        "1",
        "--to",
        snap_ova.to_str().unwrap(),
    ]));
    assert_eq!(said["node"], vm.node.as_str());
    let dir = check_archive(&snap_ova, &said, "exp");
    let generation = volume
        .parent()
        .unwrap()
        .join(".snapshots")
        .join(&vm.disks[0].volume)
        .join("1.qcow2");
    assert!(same_contents(&dir.join("exp-disk1.vmdk"), &generation));
    let refused = pvctl_refused(&lab.pvctl(&[
        "vm-export",
        "exp",
        "--snapshot",
        "9",
        "--to",
        out.path().join("x.ova").to_str().unwrap(),
    ]));
    assert!(refused.contains("no snapshot 9"), "{refused}");

    // Stopped: the VM's own disk, with the CPUs, memory and boot image in the descriptor.
    pvctl_ok(&lab.pvctl(&["vm-poweroff", "exp"]));
    let said = pvctl_json(&lab.pvctl(&["--json", "vm-export", "exp", "--to", to]));
    let dir = check_archive(&ova, &said, "exp");
    assert!(same_contents(&dir.join("exp-disk1.vmdk"), &volume));
    let ovf = std::fs::read_to_string(dir.join("exp.ovf")).unwrap();
    assert!(
        ovf.contains(
            "<rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity>"
        ),
        "{ovf}"
    );
    assert!(
        ovf.contains("<pv:KernelImage>tiny</pv:KernelImage>"),
        "{ovf}"
    );
    let compressed = std::fs::metadata(dir.join("exp-disk1.vmdk")).unwrap().len();
    assert!(
        compressed > 4 << 20,
        "the random data is in the disk: {compressed}"
    );

    // An existing file is never overwritten.
    let refused = pvctl_refused(&lab.pvctl(&["vm-export", "exp", "--to", to]));
    assert!(refused.contains("exists"), "{refused}");
    assert_eq!(sha256(&ova), said["sha256"].as_str().unwrap());

    // A disk that fills up part way: a clear error, and nothing left behind.
    let small = SmallDisk::mount(1 << 20);
    let target = small.dir.path().join("exp.ova");
    let refused =
        pvctl_refused(&lab.pvctl(&["vm-export", "exp", "--to", target.to_str().unwrap()]));
    assert!(refused.contains("No space left on device"), "{refused}");
    assert!(refused.contains("nothing was kept"), "{refused}");
    assert_eq!(std::fs::read_dir(small.dir.path()).unwrap().count(), 0);

    // The VM is free again once the pair notices the client left: it starts.
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    loop {
        let started = lab.pvctl(&["vm-start", "exp"]);
        if started.status.success() {
            break;
        }
        let refused = String::from_utf8_lossy(&started.stderr).into_owned();
        assert!(refused.contains("export running"), "{refused}");
        assert!(
            Instant::now() < deadline,
            "the export still holds the VM: {refused}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

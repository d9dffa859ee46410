//! End to end in the lab: `pvctl vm-import` of an exported VM under a new name, with 2 vCPUs
//! and 512 MiB, boots with its counter intact and sees those CPUs and that memory; a bare
//! VMDK converted from the tiny guest's disk boots too. A truncated archive, a corrupted one
//! and a bare image without a boot source are refused, leaving no VM and no file behind.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use proto::v1 as pb;
use tests::{Console, GUEST_BOOT_TIMEOUT, Lab, pvctl_json, pvctl_ok, pvctl_refused, tiny_guest};

/// How soon an agent has removed what a refused import sent it.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The VMs the pair lists, by name.
fn vm_names(lab: &Lab) -> Vec<String> {
    let list = pvctl_json(&lab.pvctl(&["--json", "vm-info"]));
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| vm["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// Every file in the lab's storage groups and their hidden work directories.
fn storage_files(lab: &Lab) -> Vec<String> {
    let mut files = Vec::new();
    for node in ["n0", "n1"] {
        let group = lab.volume_path(node, "x");
        let group = group.parent().unwrap();
        for dir in [group.to_path_buf(), group.join(".imports")] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                files.extend(
                    entries
                        .flatten()
                        .filter(|e| e.path().is_file())
                        .map(|e| e.path().display().to_string()),
                );
            }
        }
    }
    files.sort();
    files
}

/// The first COUNTER a started VM shows and what it says of its hardware.
fn boots(lab: &Lab, vm: &pb::Vm) -> (u64, String) {
    let console = Console::new(lab, vm);
    pvctl_ok(&lab.pvctl(&["vm-start", &vm.name]));
    let hw = console.wait_line("GUEST-HW", GUEST_BOOT_TIMEOUT, |l| {
        l.starts_with("GUEST-HW")
    });
    let first = console.wait_counters(1, GUEST_BOOT_TIMEOUT)[0].0;
    (first, hw)
}

fn write_variant(from: &Path, to: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(from).unwrap();
    change(&mut bytes);
    std::fs::write(to, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_vm_imports_under_a_new_name_and_boots_with_its_counter() {
    if tests::skip() {
        return;
    }
    let lab = Lab::up("pvim", 100);
    let mut api = lab.client().await;
    let vm = api
        .create_vm(tiny_guest("orig"))
        .await
        .unwrap()
        .into_inner();
    let console = Console::new(&lab, &vm);
    pvctl_ok(&lab.pvctl(&["vm-start", "orig"]));
    console.wait_counters(3, GUEST_BOOT_TIMEOUT);
    pvctl_ok(&lab.pvctl(&["vm-poweroff", "orig"]));
    let (on_disk, _) = lab.disk_counter(&vm).unwrap();
    let out = tempfile::tempdir().unwrap();
    let ova = out.path().join("orig.ova");
    pvctl_ok(&lab.pvctl(&["vm-export", "orig", "--to", ova.to_str().unwrap()]));
    let before = storage_files(&lab);

    // A truncated archive: refused, nothing made.
    let cut = out.path().join("cut.ova");
    write_variant(&ova, &cut, |b| b.truncate(b.len() / 2));
    let refused = pvctl_refused(&lab.pvctl(&["vm-import", cut.to_str().unwrap(), "--name", "cut"]));
    assert!(refused.contains("truncated"), "{refused}");
    assert!(refused.contains("nothing was kept"), "{refused}");

    // A corrupted disk (one byte inside the VMDK): the manifest catches it.
    let bad = out.path().join("bad.ova");
    write_variant(&ova, &bad, |b| {
        let vmdk = b.windows(4).position(|w| w == b"KDMV").unwrap();
        b[vmdk + 4096] ^= 0xff;
    });
    let refused = pvctl_refused(&lab.pvctl(&["vm-import", bad.to_str().unwrap(), "--name", "bad"]));
    assert!(refused.contains("corrupt"), "{refused}");
    assert!(refused.contains("nothing was kept"), "{refused}");
    assert_eq!(vm_names(&lab), ["orig"]);
    // The agent removes a received image when its stream is cancelled, which may land just
    // after the pair's answer.
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    while storage_files(&lab) != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(storage_files(&lab), before, "a refused import left files");

    // Under a new name, HA, with 2 vCPUs and 512 MiB: boots with the counter it had.
    let said = pvctl_json(&lab.pvctl(&[
        "--json",
        "vm-import",
        ova.to_str().unwrap(),
        "--name",
        "copy",
        "--cpu",
        "2",
        "--memory",
        "512M",
        "--mode",
        "ha",
    ]));
    assert_eq!(said["state"], "stopped", "{said}");
    assert_eq!(
        (said["vcpus"].as_u64(), said["memory_mib"].as_u64()),
        (Some(2), Some(512))
    );
    assert_eq!(said["boot"]["kernel_image"], "tiny", "{said}");
    let copy = api
        .get_vm(pb::GetVmRequest { vm: "copy".into() })
        .await
        .unwrap()
        .into_inner();
    let (first, hw) = boots(&lab, &copy);
    assert_eq!(
        first,
        on_disk + 1,
        "the copy resumed from {}, the disk had {on_disk}",
        first - 1
    );
    assert!(hw.contains(" cpus=2 "), "{hw}");
    let mem_kib: u64 = hw
        .rsplit("mem_kib=")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((400_000..=524_288).contains(&mem_kib), "{hw}");

    // A bare VMDK of the tiny guest's disk, made by qemu-img here: boots from its counter.
    let vmdk = out.path().join("tiny-disk.vmdk");
    let converted = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk"])
        .arg(lab.volume_path(&vm.node, &vm.disks[0].volume))
        .arg(&vmdk)
        .output()
        .unwrap();
    assert!(converted.status.success());
    let refused = pvctl_refused(&lab.pvctl(&["vm-import", vmdk.to_str().unwrap()]));
    assert!(refused.contains("--kernel-image"), "{refused}");
    let said = pvctl_json(&lab.pvctl(&[
        "--json",
        "vm-import",
        vmdk.to_str().unwrap(),
        "--kernel-image",
        "tiny",
        "--mode",
        "unprotected",
    ]));
    assert_eq!(said["name"], "tiny-disk", "{said}");
    let bare = api
        .get_vm(pb::GetVmRequest {
            vm: "tiny-disk".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (first, hw) = boots(&lab, &bare);
    assert_eq!(first, on_disk + 1);
    assert!(hw.contains(" cpus=1 "), "{hw}");
}

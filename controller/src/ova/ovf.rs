//! The OVF descriptor of an exported VM (DMTF DSP0243 1.x, the envelope every OVA consumer
//! reads): its disks as stream-optimized VMDK files, its CPUs, memory and NICs as hardware
//! items, and, in a section others may skip, what only Pairvisor uses (its protection mode
//! and boot source), so an import into a pair gets them back.

use daemon::xml_escape as escape;
use std::fmt::Write;

use crate::model::{Boot, VmRecord};

/// The disk format URI of a stream-optimized VMDK.
pub const VMDK_STREAM: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";
/// The namespace of the Pairvisor section.
pub const PAIRVISOR_NS: &str = "https://pairvisor.dev/ns/ovf/1";

/// One disk file of the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFile {
    /// Its name in the archive.
    pub href: String,
    /// Its size in bytes.
    pub size: u64,
    /// The disk's virtual size in bytes.
    pub capacity: u64,
}

/// The archive's file names for VM `name`: the descriptor, disk `i` (from 1), the manifest.
pub fn descriptor_name(name: &str) -> String {
    format!("{name}.ovf")
}

/// The name of disk `index` (0-based) of VM `name` in the archive.
pub fn disk_name(name: &str, index: usize) -> String {
    format!("{name}-disk{}.vmdk", index + 1)
}

/// The name of the manifest of VM `name`.
pub fn manifest_name(name: &str) -> String {
    format!("{name}.mf")
}

/// The descriptor of `vm`, whose disks are `disks` in guest order; `snapshot` names the
/// snapshot exported, if one was.
pub fn descriptor(vm: &VmRecord, disks: &[DiskFile], snapshot: Option<&str>) -> String {
    let mut x = String::new();
    let name = escape(&vm.name);
    let _ = writeln!(x, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        x,
        r#"<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:pv="{PAIRVISOR_NS}">"#
    );
    x.push_str("  <References>\n");
    for (i, d) in disks.iter().enumerate() {
        let _ = writeln!(
            x,
            r#"    <File ovf:id="file{}" ovf:href="{}" ovf:size="{}"/>"#,
            i + 1,
            escape(&d.href),
            d.size
        );
    }
    x.push_str("  </References>\n  <DiskSection>\n    <Info>Virtual disks</Info>\n");
    for (i, d) in disks.iter().enumerate() {
        let _ = writeln!(
            x,
            r#"    <Disk ovf:diskId="vmdisk{n}" ovf:fileRef="file{n}" ovf:capacity="{}" ovf:capacityAllocationUnits="byte" ovf:format="{VMDK_STREAM}"/>"#,
            d.capacity,
            n = i + 1
        );
    }
    x.push_str("  </DiskSection>\n  <NetworkSection>\n    <Info>Logical networks</Info>\n");
    let mut networks: Vec<&str> = vm.nics.iter().map(|n| n.network.as_str()).collect();
    networks.dedup();
    for network in networks {
        let _ = writeln!(
            x,
            r#"    <Network ovf:name="{0}"><Description>The {0} network</Description></Network>"#,
            escape(network)
        );
    }
    x.push_str("  </NetworkSection>\n");
    let _ = writeln!(x, r#"  <VirtualSystem ovf:id="{name}">"#);
    x.push_str("    <Info>A virtual machine exported by Pairvisor</Info>\n");
    let _ = writeln!(x, "    <Name>{name}</Name>");
    x.push_str(r#"    <OperatingSystemSection ovf:id="1"><Info>The guest operating system</Info></OperatingSystemSection>"#);
    x.push('\n');
    hardware(&mut x, vm, disks.len());
    pairvisor(&mut x, vm, snapshot);
    x.push_str("  </VirtualSystem>\n</Envelope>\n");
    x
}

/// The virtual hardware section: CPUs, memory, a disk controller, disks and NICs, with the
/// `rasd` elements in the schema's (alphabetical) order.
fn hardware(x: &mut String, vm: &VmRecord, disks: usize) {
    x.push_str("    <VirtualHardwareSection>\n      <Info>Virtual hardware requirements</Info>\n");
    let _ = writeln!(
        x,
        "      <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID><vssd:VirtualSystemIdentifier>{}</vssd:VirtualSystemIdentifier><vssd:VirtualSystemType>pairvisor-1</vssd:VirtualSystemType></System>",
        escape(&vm.name)
    );
    let _ = writeln!(
        x,
        "      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:Description>Number of virtual CPUs</rasd:Description><rasd:ElementName>{0} virtual CPUs</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>{0}</rasd:VirtualQuantity></Item>",
        vm.vcpus
    );
    let _ = writeln!(
        x,
        "      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:Description>Memory Size</rasd:Description><rasd:ElementName>{0} MB of memory</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>{0}</rasd:VirtualQuantity></Item>",
        vm.memory_mib
    );
    x.push_str("      <Item><rasd:Address>0</rasd:Address><rasd:Description>Disk controller</rasd:Description><rasd:ElementName>SCSI controller 0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>\n");
    let mut id = 4;
    for i in 0..disks {
        let _ = writeln!(
            x,
            "      <Item><rasd:AddressOnParent>{i}</rasd:AddressOnParent><rasd:ElementName>disk{n}</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk{n}</rasd:HostResource><rasd:InstanceID>{id}</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>",
            n = i + 1
        );
        id += 1;
    }
    for (i, nic) in vm.nics.iter().enumerate() {
        let _ = writeln!(
            x,
            "      <Item><rasd:Address>{}</rasd:Address><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Connection>{}</rasd:Connection><rasd:ElementName>nic{}</rasd:ElementName><rasd:InstanceID>{id}</rasd:InstanceID><rasd:ResourceSubType>virtio</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>",
            escape(&nic.mac),
            escape(&nic.network),
            i + 1
        );
        id += 1;
    }
    x.push_str("    </VirtualHardwareSection>\n");
}

/// What only Pairvisor reads: the protection mode, the boot source, the snapshot exported.
fn pairvisor(x: &mut String, vm: &VmRecord, snapshot: Option<&str>) {
    x.push_str(r#"    <pv:PairvisorSection ovf:required="false">"#);
    x.push_str("\n      <Info>How Pairvisor ran this VM</Info>\n");
    let _ = writeln!(x, "      <pv:Mode>{}</pv:Mode>", vm.mode.as_str());
    match &vm.boot {
        Boot::Kernel { image } => {
            let _ = writeln!(
                x,
                "      <pv:KernelImage>{}</pv:KernelImage>",
                escape(image)
            );
        }
        Boot::Iso { name, .. } => {
            let _ = writeln!(x, "      <pv:Iso>{}</pv:Iso>", escape(name));
        }
    }
    if let Some(id) = snapshot {
        let _ = writeln!(x, "      <pv:Snapshot>{}</pv:Snapshot>", escape(id));
    }
    x.push_str("    </pv:PairvisorSection>\n");
}

/// The manifest: one `SHA256(file)= hex` line per file, in archive order.
pub fn manifest(files: &[(String, String)]) -> String {
    files
        .iter()
        .map(|(name, sha256)| format!("SHA256({name})= {sha256}\n"))
        .collect()
}

/// The manifest's size for files named `names`, before their checksums are known.
pub fn manifest_len(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| ("SHA256()= \n".len() + n.len() + 64) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Disk, DiskFormat, Mode, Nic};

    fn vm() -> VmRecord {
        let mut vm = crate::placement::tests::vm("web<1>", Mode::Ha, 2, 512, "n0");
        vm.disks = vec![Disk {
            size_bytes: 16 << 20,
            storage_group: "default".into(),
            format: DiskFormat::Raw,
            volume: "x.raw".into(),
        }];
        vm.nics = vec![Nic {
            network: "business".into(),
            mac: "52:54:00:00:00:01".into(),
        }];
        vm
    }

    #[test]
    fn descriptor_names_disks_hardware_and_the_pairvisor_section() {
        let disks = [DiskFile {
            href: disk_name("web", 0),
            size: 4096,
            capacity: 16 << 20,
        }];

        let x = descriptor(&vm(), &disks, Some("3"));

        assert!(
            x.contains(r#"<File ovf:id="file1" ovf:href="web-disk1.vmdk" ovf:size="4096"/>"#),
            "{x}"
        );
        assert!(x.contains(r#"ovf:capacity="16777216""#), "{x}");
        assert!(x.contains("<rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity>"), "{x}");
        assert!(x.contains("<rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>512</rasd:VirtualQuantity>"), "{x}");
        assert!(
            x.contains("<rasd:Connection>business</rasd:Connection>"),
            "{x}"
        );
        assert!(x.contains("<pv:Mode>ha</pv:Mode>"), "{x}");
        assert!(x.contains("<pv:KernelImage>tiny</pv:KernelImage>"), "{x}");
        assert!(x.contains("<pv:Snapshot>3</pv:Snapshot>"), "{x}");
        assert!(x.contains("<Name>web&lt;1&gt;</Name>"), "{x}");
    }

    #[test]
    fn descriptor_is_well_formed_xml() {
        let x = descriptor(&vm(), &[], None);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("vm.ovf");
        std::fs::write(&path, &x).expect("written");

        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])",
            ])
            .arg(&path)
            .output()
            .expect("python3 runs");

        assert!(
            out.status.success(),
            "{}\n{x}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn manifest_len_matches_the_manifest() {
        let names = vec!["web.ovf".to_string(), "web-disk1.vmdk".to_string()];
        let files: Vec<(String, String)> =
            names.iter().map(|n| (n.clone(), "a".repeat(64))).collect();

        assert_eq!(manifest(&files).len() as u64, manifest_len(&names));
    }
}

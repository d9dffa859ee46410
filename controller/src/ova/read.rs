//! What an import reads of an OVA: the OVF descriptor's virtual system (its name, CPUs,
//! memory, disks in guest order with their capacity, networks, and the Pairvisor section an
//! export adds) and the manifest's checksums. Descriptors from other tools are read by the
//! standard's element and attribute names, whatever their namespace prefixes; only what a
//! VM needs is read, the rest is ignored.

use std::collections::BTreeMap;

use roxmltree::{Document, Node};

use crate::model::{Boot, Mode};

/// Errors reading a descriptor or manifest.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The descriptor is not well-formed XML.
    #[error("the OVF descriptor is not well-formed XML: {0}")]
    Xml(String),
    /// Something the VM needs is missing or unreadable.
    #[error("the OVF descriptor {0}")]
    Descriptor(String),
    /// A manifest line is unreadable or uses another checksum.
    #[error("the manifest's line {line}: {reason}")]
    Manifest {
        /// The line number, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// The virtual system a descriptor describes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Appliance {
    /// Its name.
    pub name: String,
    /// Virtual CPUs, if stated.
    pub vcpus: Option<u32>,
    /// Memory in MiB, if stated.
    pub memory_mib: Option<u64>,
    /// Its disks in guest order.
    pub disks: Vec<DiskFile>,
    /// The network of each NIC.
    pub networks: Vec<String>,
    /// The protection mode a Pairvisor export recorded.
    pub mode: Option<Mode>,
    /// The boot source a Pairvisor export recorded.
    pub boot: Option<Boot>,
}

/// A disk and the archive file that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFile {
    /// The file's name in the archive.
    pub href: String,
    /// The disk's virtual size in bytes.
    pub capacity: u64,
}

/// Resource types of the CIM schema's hardware items.
const CPU: &str = "3";
const MEMORY: &str = "4";
const NIC: &str = "10";
const DISK: &str = "17";

/// Reads the virtual system of descriptor `xml`.
pub fn descriptor(xml: &str) -> Result<Appliance, Error> {
    let doc = Document::parse(xml).map_err(|e| Error::Xml(e.to_string()))?;
    let root = doc.root_element();
    let missing = |what: &str| Error::Descriptor(format!("has no {what}"));
    let system = child(root, "VirtualSystem").ok_or_else(|| missing("VirtualSystem"))?;
    let name = child(system, "Name")
        .and_then(|n| n.text())
        .or_else(|| attr(system, "id"))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| missing("name for its virtual system"))?
        .to_string();
    let hardware =
        child(system, "VirtualHardwareSection").ok_or_else(|| missing("VirtualHardwareSection"))?;
    let items: Vec<Node> = hardware
        .children()
        .filter(|n| n.tag_name().name() == "Item")
        .collect();
    let of_type = |kind: &'static str| {
        items
            .iter()
            .copied()
            .filter(move |i| field(*i, "ResourceType") == Some(kind))
    };
    let vcpus = match of_type(CPU).next() {
        Some(item) => Some(
            quantity(item)?
                .try_into()
                .map_err(|_| Error::Descriptor("states too many CPUs".into()))?,
        ),
        None => None,
    };
    let memory_mib = match of_type(MEMORY).next() {
        Some(item) => {
            let units = field(item, "AllocationUnits").unwrap_or("byte * 2^20");
            let bytes = multiply(quantity(item)?, units)?;
            Some(bytes / (1 << 20))
        }
        None => None,
    };
    let files = files(root);
    let disk_section = child(root, "DiskSection");
    let mut disks = Vec::new();
    for item in of_type(DISK) {
        let resource = field(item, "HostResource").unwrap_or_default();
        let id = resource
            .strip_prefix("ovf:/disk/")
            .or_else(|| resource.strip_prefix("/disk/"))
            .ok_or_else(|| {
                Error::Descriptor(format!("has a disk item whose host resource {resource:?} is not a disk of its DiskSection"))
            })?;
        disks.push(disk(disk_section, id, &files)?);
    }
    let networks = of_type(NIC)
        .filter_map(|i| field(i, "Connection"))
        .map(|c| c.trim().to_string())
        .collect();
    let (mode, boot) = pairvisor(system)?;
    Ok(Appliance {
        name,
        vcpus,
        memory_mib,
        disks,
        networks,
        mode,
        boot,
    })
}

/// The References section: file ID to its name in the archive.
fn files<'a>(root: Node<'a, 'a>) -> BTreeMap<&'a str, &'a str> {
    child(root, "References")
        .into_iter()
        .flat_map(|r| r.children())
        .filter(|n| n.tag_name().name() == "File")
        .filter_map(|f| Some((attr(f, "id")?, attr(f, "href")?)))
        .collect()
}

/// Disk `id` of the DiskSection with its file.
fn disk(section: Option<Node>, id: &str, files: &BTreeMap<&str, &str>) -> Result<DiskFile, Error> {
    let disk = section
        .into_iter()
        .flat_map(|s| s.children())
        .find(|n| n.tag_name().name() == "Disk" && attr(*n, "diskId") == Some(id))
        .ok_or_else(|| {
            Error::Descriptor(format!("names disk {id}, which its DiskSection lacks"))
        })?;
    let format = attr(disk, "format").unwrap_or_default();
    if !format.to_ascii_lowercase().contains("vmdk") {
        return Err(Error::Descriptor(format!(
            "gives disk {id} in format {format:?}; only VMDK disks are imported from an OVA"
        )));
    }
    let href = attr(disk, "fileRef")
        .and_then(|r| files.get(r))
        .ok_or_else(|| {
            Error::Descriptor(format!(
                "gives disk {id} no file in its References; an empty disk cannot be imported"
            ))
        })?;
    let capacity = attr(disk, "capacity")
        .and_then(|c| c.trim().parse::<u64>().ok())
        .ok_or_else(|| Error::Descriptor(format!("gives disk {id} no readable capacity")))?;
    let units = attr(disk, "capacityAllocationUnits").unwrap_or("byte");
    Ok(DiskFile {
        href: (*href).to_string(),
        capacity: multiply(capacity, units)?,
    })
}

/// The mode and boot source of the Pairvisor section, if there is one.
fn pairvisor(system: Node) -> Result<(Option<Mode>, Option<Boot>), Error> {
    let Some(section) = child(system, "PairvisorSection") else {
        return Ok((None, None));
    };
    let text = |name: &str| {
        child(section, name)
            .and_then(|n| n.text())
            .map(str::trim)
            .filter(|t| !t.is_empty())
    };
    let mode = match text("Mode") {
        None => None,
        Some("ft") => Some(Mode::Ft),
        Some("ha") => Some(Mode::Ha),
        Some("unprotected") => Some(Mode::Unprotected),
        Some(other) => {
            return Err(Error::Descriptor(format!(
                "records the unknown protection mode {other:?}"
            )));
        }
    };
    let boot = match (text("KernelImage"), text("Iso")) {
        (Some(image), _) => Some(Boot::Kernel {
            image: image.to_string(),
        }),
        (None, Some(name)) => Some(Boot::Iso {
            name: name.to_string(),
            storage_group: String::new(),
        }),
        (None, None) => None,
    };
    Ok((mode, boot))
}

/// The first child element of `node` named `name` (any namespace).
fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|n| n.is_element() && n.tag_name().name() == name)
}

/// Attribute `name` of `node` (any namespace).
fn attr<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.attributes()
        .find(|a| a.name() == name)
        .map(|a| a.value())
}

/// The text of an item's field `name`.
fn field<'a>(item: Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(item, name).and_then(|n| n.text()).map(str::trim)
}

fn quantity(item: Node) -> Result<u64, Error> {
    field(item, "VirtualQuantity")
        .and_then(|q| q.parse().ok())
        .ok_or_else(|| {
            Error::Descriptor("has a hardware item without a readable VirtualQuantity".into())
        })
}

/// `value` in allocation `units` ("byte", "byte * 2^20", "MegaBytes", ...) as bytes.
fn multiply(value: u64, units: &str) -> Result<u64, Error> {
    let compact: String = units.chars().filter(|c| !c.is_whitespace()).collect();
    let shift = match compact.to_ascii_lowercase().as_str() {
        "byte" | "bytes" => Some(0),
        "kb" | "kilobytes" => Some(10),
        "mb" | "megabytes" => Some(20),
        "gb" | "gigabytes" => Some(30),
        "tb" | "terabytes" => Some(40),
        other => other
            .strip_prefix("byte*2^")
            .and_then(|e| e.parse::<u32>().ok())
            .filter(|e| *e < 64),
    };
    shift
        .and_then(|s| value.checked_mul(1u64 << s))
        .ok_or_else(|| {
            Error::Descriptor(format!(
                "uses the allocation units {units:?}, which are unknown or overflow"
            ))
        })
}

/// The manifest's checksums by file name: `SHA256(name)= hex` lines (`SHA256 (name) = hex`
/// too). Other algorithms are refused, not skipped: a file would go unchecked.
pub fn manifest(text: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut sums = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |reason: &str| Error::Manifest {
            line: i + 1,
            reason: reason.to_string(),
        };
        let (algorithm, rest) = line
            .split_once('(')
            .ok_or_else(|| bad("expected ALGORITHM(FILE)= HEX"))?;
        let (name, hex) = rest
            .rsplit_once(')')
            .ok_or_else(|| bad("expected ALGORITHM(FILE)= HEX"))?;
        let hex = hex
            .trim()
            .trim_start_matches('=')
            .trim()
            .to_ascii_lowercase();
        if algorithm.trim() != "SHA256" {
            return Err(bad(&format!(
                "it uses {}; only SHA256 manifests are checked: re-create the archive with a SHA-256 manifest (ovftool --shaAlgorithm=SHA256), or remove its .mf to import it unchecked",
                algorithm.trim()
            )));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("the checksum is not 64 hex digits"));
        }
        let name = name.strip_prefix("./").unwrap_or(name);
        sums.insert(name.to_string(), hex);
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Disk, DiskFormat, Nic};
    use crate::ova::ovf;

    #[test]
    fn an_exported_descriptor_reads_back_as_its_vm() {
        let mut vm = crate::placement::tests::vm("web-1", Mode::Ft, 2, 512, "n0");
        vm.disks = vec![Disk {
            size_bytes: 16 << 20,
            storage_group: "sg0".into(),
            format: DiskFormat::Raw,
            volume: "x.raw".into(),
        }];
        vm.nics = vec![Nic {
            network: "business".into(),
            mac: "52:54:00:00:00:01".into(),
        }];
        vm.boot = Boot::Kernel {
            image: "tiny".into(),
        };
        let files = [ovf::DiskFile {
            href: ovf::disk_name("web-1", 0),
            size: 4096,
            capacity: 16 << 20,
        }];

        let read = descriptor(&ovf::descriptor(&vm, &files, Some("3"))).unwrap();

        assert_eq!(
            read,
            Appliance {
                name: "web-1".into(),
                vcpus: Some(2),
                memory_mib: Some(512),
                disks: vec![DiskFile {
                    href: "web-1-disk1.vmdk".into(),
                    capacity: 16 << 20
                }],
                networks: vec!["business".into()],
                mode: Some(Mode::Ft),
                boot: Some(Boot::Kernel {
                    image: "tiny".into()
                }),
            }
        );
    }

    /// A descriptor as VMware's ovftool writes it: other prefixes, units in GiB and MB, a
    /// CD-ROM and a disk without a file mixed in.
    const VMWARE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <ovf:References><ovf:File ovf:href="app-disk1.vmdk" ovf:id="file1" ovf:size="1000"/></ovf:References>
  <ovf:DiskSection><ovf:Info>Disks</ovf:Info>
    <ovf:Disk ovf:capacity="2" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </ovf:DiskSection>
  <ovf:VirtualSystem ovf:id="appliance">
    <ovf:VirtualHardwareSection>
      <ovf:Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>4</rasd:VirtualQuantity></ovf:Item>
      <ovf:Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity></ovf:Item>
      <ovf:Item><rasd:ResourceType>15</rasd:ResourceType></ovf:Item>
      <ovf:Item><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:ResourceType>17</rasd:ResourceType></ovf:Item>
    </ovf:VirtualHardwareSection>
  </ovf:VirtualSystem>
</ovf:Envelope>"#;

    #[test]
    fn a_foreign_descriptor_reads_with_its_units() {
        let read = descriptor(VMWARE).unwrap();

        assert_eq!(read.name, "appliance");
        assert_eq!(read.vcpus, Some(4));
        assert_eq!(read.memory_mib, Some(2048));
        assert_eq!(
            read.disks,
            [DiskFile {
                href: "app-disk1.vmdk".into(),
                capacity: 2 << 30
            }]
        );
        assert_eq!((read.mode, read.boot), (None, None));
    }

    #[test]
    fn broken_or_unsupported_descriptors_are_refused_with_the_reason() {
        let raw_disk = VMWARE.replace("vmdk.html#streamOptimized", "raw");
        let no_file = VMWARE.replace(r#" ovf:fileRef="file1""#, "");

        assert!(matches!(descriptor("<Envelope>"), Err(Error::Xml(_))));
        let err = descriptor(&raw_disk).unwrap_err().to_string();
        assert!(err.contains("only VMDK"), "{err}");
        let err = descriptor(&no_file).unwrap_err().to_string();
        assert!(err.contains("no file"), "{err}");
    }

    #[test]
    fn manifests_read_sha256_lines_and_refuse_other_sums() {
        let hex = "ab".repeat(32);
        let text = format!(
            "SHA256(vm.ovf)= {hex}\nSHA256 (vm-disk1.vmdk) = {}\n",
            hex.to_uppercase()
        );

        let sums = manifest(&text).unwrap();

        assert_eq!(sums["vm.ovf"], hex);
        assert_eq!(sums["vm-disk1.vmdk"], hex);
        let err = manifest(&format!("SHA1(vm.ovf)= {}\n", "a".repeat(40))).unwrap_err();
        assert!(err.to_string().contains("only SHA256"), "{err}");
        manifest("SHA256(vm.ovf)= xyz\n").unwrap_err();
    }
}

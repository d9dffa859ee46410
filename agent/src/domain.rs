//! VM spec → libvirt domain XML, as a pure function.
//!
//! The agent renders every domain itself so the XML is the same on both hosts and needs no
//! libvirt network or storage drivers: disks are plain files, NICs are bridge ports, and the
//! first serial port is appended to a log file the agent owns. `<acpi/>` is always present:
//! without it libvirt 9.0 passes `-no-acpi`, which QEMU 10 rejects, and the guest could not
//! receive the ACPI power button that a graceful shutdown sends.
//!
//! What the agent must know about a domain after a restart lives in the domain itself, as
//! libvirt metadata in the [`METADATA_NS`] namespace: whether it self-fences, and the ownership
//! generation it runs under. Each disk carries
//! a user alias (`ua-vda`, see [`disk_alias`]) so its QEMU device, and through it the block
//! node the mirror copies from, is found by name rather than guessed from libvirt's numbering.

use daemon::xml_escape as escape;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Namespace of the agent's libvirt metadata element (`<pairvisor:vm>`).
pub const METADATA_NS: &str = "https://pairvisor.dev/ns/domain/1";

/// The libvirt domain type: how QEMU runs the guest's CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    /// TCG software emulation (`<domain type='qemu'>`): works everywhere, e.g. in nested VMs.
    Qemu,
    /// Hardware virtualization (`<domain type='kvm'>`): the production choice.
    Kvm,
}

impl DomainType {
    /// The value of the XML `type` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Qemu => "qemu",
            DomainType::Kvm => "kvm",
        }
    }
}

/// Disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// Raw image.
    Raw,
    /// QCOW2 image.
    Qcow2,
}

impl DiskFormat {
    /// The name libvirt and qemu-img use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A disk attached to the domain, already resolved to a file on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Path of the volume file.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

/// A NIC attached to a bridge of this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// Host bridge the NIC is plugged into.
    pub bridge: String,
    /// Stable MAC address.
    pub mac: String,
}

/// How the domain boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// Direct kernel boot from a boot image.
    Kernel(images::BootImage),
    /// Boot from an ISO attached as a CD-ROM.
    Cdrom(PathBuf),
}

/// Everything needed to render one domain, resolved to this host's paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainSpec {
    /// libvirt UUID (the VM's UUID).
    pub uuid: String,
    /// libvirt name (the VM's name).
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks in guest order (vda, vdb, ...).
    pub disks: Vec<Disk>,
    /// NICs in guest order.
    pub nics: Vec<Nic>,
    /// Boot source.
    pub boot: Boot,
    /// File the first serial port appends to.
    pub serial_log: PathBuf,
    /// Whether QEMU serves the screen over VNC, on a Unix socket libvirt makes in the
    /// domain's private directory (FT domains have no screen).
    pub vnc: bool,
    /// Destroy the domain when this host's lease cannot be renewed (HA and FT VMs).
    pub self_fence: bool,
    /// The VM's ownership generation of the command that defined it, kept in the metadata: a
    /// domain running here under an older generation than a later command's is a run the pair
    /// has since moved to the other host.
    pub generation: u64,
    /// An FT domain's QEMU setup; `None` for every other domain.
    pub ft: Option<FtDomain>,
}

/// What an FT domain needs beyond the usual (notes/ft-checkpointing.md): guest RAM in a shared
/// file the agent reads (primary) or writes (standby), and a QMP socket of the agent's own,
/// so that the epoch loop never waits behind libvirt's per-connection thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FtDomain {
    /// The agent's QMP socket for this domain (QEMU listens on it).
    pub qmp_socket: PathBuf,
    /// The agent's serial gate socket (QEMU connects to it): output is held until its epoch
    /// commits (`ft/output.rs`), so QEMU does not write the serial log itself.
    pub serial_socket: PathBuf,
    /// A standby: QEMU waits for a device state (`-incoming defer`) and must be started paused.
    pub standby: bool,
}

/// The XML namespace of libvirt's QEMU command-line passthrough.
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Host-wide settings that shape every domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostProfile {
    /// TCG or KVM.
    pub domain_type: DomainType,
    /// QEMU binary.
    pub emulator: PathBuf,
    /// A library FT domains' QEMU preloads: the FT shim ([`crate::ft::SHIM_FILE`]).
    pub ft_preload: Option<PathBuf>,
}

/// Renders the libvirt domain XML for `spec` on a host with `host`'s settings.
pub fn domain_xml(spec: &DomainSpec, host: &HostProfile) -> String {
    let mut xml = String::with_capacity(2048);
    // Writing into a String cannot fail; the results are discarded on purpose below.
    let namespace = if spec.ft.is_some() {
        format!(" xmlns:qemu='{QEMU_NS}'")
    } else {
        String::new()
    };
    let _ = writeln!(
        xml,
        "<domain type='{}'{namespace}>",
        host.domain_type.as_str()
    );
    let _ = writeln!(xml, "  <name>{}</name>", escape(&spec.name));
    let _ = writeln!(xml, "  <uuid>{}</uuid>", escape(&spec.uuid));
    push_metadata(&mut xml, spec.self_fence, spec.generation);
    let _ = writeln!(xml, "  <memory unit='MiB'>{}</memory>", spec.memory_mib);
    let _ = writeln!(xml, "  <vcpu>{}</vcpu>", spec.vcpus);
    if spec.ft.is_some() {
        xml.push_str(
            "  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>\n",
        );
    }
    push_os(&mut xml, &spec.boot);
    xml.push_str("  <features><acpi/></features>\n");
    xml.push_str("  <on_poweroff>destroy</on_poweroff>\n");
    xml.push_str("  <on_reboot>restart</on_reboot>\n");
    xml.push_str("  <on_crash>destroy</on_crash>\n");
    xml.push_str("  <devices>\n");
    let _ = writeln!(
        xml,
        "    <emulator>{}</emulator>",
        escape(&host.emulator.to_string_lossy())
    );
    for (index, disk) in spec.disks.iter().enumerate() {
        push_disk(&mut xml, index, disk, spec.self_fence);
    }
    if let Boot::Cdrom(iso) = &spec.boot {
        push_cdrom(&mut xml, iso);
    }
    for (index, nic) in spec.nics.iter().enumerate() {
        push_nic(&mut xml, index, nic, spec.ft.is_some());
    }
    match &spec.ft {
        // Reconnecting: the gate may come back (agent restart) while the guest runs.
        Some(ft) => {
            let _ = writeln!(
                xml,
                "    <serial type='unix'><source mode='connect' path='{}'><reconnect enabled='yes' timeout='1'/></source><target port='0'/></serial>",
                escape(&ft.serial_socket.to_string_lossy())
            );
        }
        None => {
            let _ = writeln!(
                xml,
                "    <serial type='file'><source path='{}' append='on'/><target port='0'/></serial>",
                escape(&spec.serial_log.to_string_lossy())
            );
        }
    }
    // A screen for `screendump` (an ISO installer shows itself there). Not for FT: its
    // checkpoints track the guest's RAM, not video memory.
    if spec.ft.is_none() {
        xml.push_str("    <video><model type='vga' vram='16384' heads='1'/></video>\n");
        // VNC on a Unix socket only, which libvirt makes in the domain's private directory
        // for QEMU's user: the agent relays it to the console (`vnc.rs`).
        if spec.vnc {
            xml.push_str("    <graphics type='vnc'><listen type='socket'/></graphics>\n");
        }
    }
    xml.push_str("    <memballoon model='none'/>\n");
    xml.push_str("  </devices>\n");
    if let Some(ft) = &spec.ft {
        push_ft_commandline(&mut xml, ft, spec.nics.len(), host.ft_preload.as_deref());
    }
    xml.push_str("</domain>\n");
    xml
}

/// The FT domain's own QMP socket, a net filter per NIC holding its frames until their epoch
/// commits (`ft/netbuf.rs`), on a standby `-incoming defer` with what loading a bare device
/// state needs, and the FT shim `preload` (libvirt has no element for any of them). QEMU's
/// option syntax doubles commas inside a value.
fn push_ft_commandline(xml: &mut String, ft: &FtDomain, nics: usize, preload: Option<&Path>) {
    let socket = ft.qmp_socket.to_string_lossy().replace(',', ",,");
    let _ = write!(
        xml,
        "  <qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:{},server=on,wait=off'/>",
        escape(&socket)
    );
    for index in 0..nics {
        let filter = crate::ft::netbuf::filter_object(index, &netdev_id(index));
        let _ = write!(
            xml,
            "<qemu:arg value='-object'/><qemu:arg value='{}'/>",
            escape(&filter)
        );
    }
    if ft.standby {
        // The device state comes from `xen-save-devices-state`, which writes neither the
        // configuration section a migration starts with nor the device description it ends
        // with: the standby expects neither.
        xml.push_str(concat!(
            "<qemu:arg value='-incoming'/><qemu:arg value='defer'/>",
            "<qemu:arg value='-global'/><qemu:arg value='migration.send-configuration=off'/>",
            "<qemu:arg value='-machine'/><qemu:arg value='suppress-vmdesc=on'/>",
        ));
    }
    if let Some(preload) = preload {
        let _ = write!(
            xml,
            "<qemu:env name='LD_PRELOAD' value='{}'/>",
            escape(&preload.to_string_lossy())
        );
    }
    xml.push_str("</qemu:commandline>\n");
}

/// The prefix of the agent's metadata element.
pub const METADATA_PREFIX: &str = "pairvisor";

/// The agent's metadata: read back with [`self_fence_in`] and [`generation_in`] after an agent
/// restart.
fn push_metadata(xml: &mut String, self_fence: bool, generation: u64) {
    let _ = write!(
        xml,
        "  <metadata><{METADATA_PREFIX}:vm xmlns:{METADATA_PREFIX}='{METADATA_NS}'>"
    );
    if self_fence {
        xml.push_str("<pairvisor:self-fence/>");
    }
    let _ = write!(
        xml,
        "<pairvisor:generation>{generation}</pairvisor:generation>"
    );
    xml.push_str("</pairvisor:vm></metadata>\n");
}

/// The agent's metadata element as `virDomainSetMetadata` takes it (libvirt adds the prefix
/// and namespace).
pub fn metadata_element(self_fence: bool, generation: u64) -> String {
    let fence = if self_fence { "<self-fence/>" } else { "" };
    format!("<vm>{fence}<generation>{generation}</generation></vm>")
}

/// The generation the agent's metadata element records (as libvirt returns it, with or
/// without the namespace prefix); `None` for a domain defined before it was recorded.
pub fn generation_in(metadata: &str) -> Option<u64> {
    metadata.split('<').skip(1).find_map(|tag| {
        let (name, text) = tag.split_once('>')?;
        (name.rsplit(':').next() == Some("generation"))
            .then(|| text.trim().parse().ok())
            .flatten()
    })
}

/// The Unix socket a live domain XML's VNC server listens on, as libvirt chose it.
pub fn vnc_socket_in(xml: &str) -> Option<PathBuf> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let graphics = doc
        .descendants()
        .find(|n| n.has_tag_name("graphics") && n.attribute("type") == Some("vnc"))?;
    let listen = graphics
        .children()
        .find(|n| n.has_tag_name("listen") && n.attribute("type") == Some("socket"));
    listen
        .and_then(|l| l.attribute("socket"))
        .or_else(|| graphics.attribute("socket"))
        .map(PathBuf::from)
}

/// Whether the agent's metadata element, as libvirt returns it, marks the domain self-fencing.
/// libvirt drops the namespace prefix (`<vm><self-fence/></vm>`); a prefixed form counts too.
pub fn self_fence_in(metadata: &str) -> bool {
    metadata.split('<').skip(1).any(|tag| {
        let name = tag
            .split(|c: char| c.is_whitespace() || c == '/' || c == '>')
            .next()
            .unwrap_or_default();
        name.rsplit(':').next() == Some("self-fence")
    })
}

fn push_os(xml: &mut String, boot: &Boot) {
    xml.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
    match boot {
        Boot::Kernel(image) => {
            let _ = writeln!(
                xml,
                "    <kernel>{}</kernel>",
                escape(&image.kernel.to_string_lossy())
            );
            let _ = writeln!(
                xml,
                "    <initrd>{}</initrd>",
                escape(&image.initrd.to_string_lossy())
            );
            let _ = writeln!(xml, "    <cmdline>{}</cmdline>", escape(&image.cmdline));
        }
        // The firmware and the boot loader talk to the serial port too (SeaBIOS's serial
        // console, `-machine graphics=off`): with no screen, the log shows what the CD does.
        Boot::Cdrom(_) => {
            xml.push_str(
                "    <boot dev='cdrom'/>\n    <boot dev='hd'/>\n    <bios useserial='yes'/>\n",
            );
        }
    }
    xml.push_str("  </os>\n");
}

/// One virtio disk. A protected domain's (`stop_on_error`) disks pause the guest on an I/O
/// error instead of failing the request, so that the agent can move the disk onto the peer's
/// copy and let QEMU retry it there (`mirror/pivot.rs`): the guest never sees the error.
fn push_disk(xml: &mut String, index: usize, disk: &Disk, stop_on_error: bool) {
    let device = virtio_disk_name(index);
    let policy = if stop_on_error {
        " error_policy='stop' rerror_policy='stop'"
    } else {
        ""
    };
    // cache='none': the guest's flushes reach the disk and no host page cache hides a lost write.
    let _ = writeln!(
        xml,
        "    <disk type='file' device='disk'><driver name='qemu' type='{}' cache='none'{policy}/><source file='{}'/><target dev='{device}' bus='virtio'/><alias name='{}'/></disk>",
        disk.format.as_str(),
        escape(&disk.path.to_string_lossy()),
        disk_alias(&device)
    );
}

fn push_cdrom(xml: &mut String, iso: &std::path::Path) {
    let _ = writeln!(
        xml,
        "    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{}'/><target dev='hdc' bus='ide'/><readonly/></disk>",
        escape(&iso.to_string_lossy())
    );
}

/// One virtio NIC on a host bridge. An FT domain's NICs use QEMU's own virtio-net backend, not
/// vhost: QEMU's net filters, which hold an epoch's frames, cannot see vhost's.
fn push_nic(xml: &mut String, index: usize, nic: &Nic, ft: bool) {
    let driver = if ft { "<driver name='qemu'/>" } else { "" };
    let _ = writeln!(
        xml,
        "    <interface type='bridge'><mac address='{}'/><source bridge='{}'/><model type='virtio'/>{driver}<alias name='{}'/></interface>",
        escape(&nic.mac),
        escape(&nic.bridge),
        nic_alias(index)
    );
}

/// The user alias of NIC `index` (`ua-net0`).
fn nic_alias(index: usize) -> String {
    format!("ua-net{index}")
}

/// QEMU's id of NIC `index`'s netdev: libvirt names it "host" and the NIC's alias.
fn netdev_id(index: usize) -> String {
    format!("host{}", nic_alias(index))
}

/// Guest device name of the `index`th virtio disk: vda … vdz, then vdaa ….
pub fn virtio_disk_name(index: usize) -> String {
    const LETTERS: &[u8; 26] = b"abcdefghijklmnopqrstuvwxyz";
    let mut suffix = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        suffix.push(LETTERS[n % 26]);
        n /= 26;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

/// The user alias of the disk with guest device name `device` (e.g. `ua-vda`): libvirt passes
/// it to QEMU as the device's ID, so QMP shows the disk as `/machine/peripheral/ua-vda/...`.
pub fn disk_alias(device: &str) -> String {
    format!("ua-{device}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcg() -> HostProfile {
        HostProfile {
            domain_type: DomainType::Qemu,
            emulator: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            ft_preload: None,
        }
    }

    fn kernel_spec() -> DomainSpec {
        DomainSpec {
            uuid: "6c3f8a3e-0b55-4b8e-9d6b-1f6f8f0d2a11".into(),
            name: "web1".into(),
            vcpus: 2,
            memory_mib: 512,
            disks: vec![
                Disk {
                    path: "/sg0/a.raw".into(),
                    format: DiskFormat::Raw,
                },
                Disk {
                    path: "/sg0/b.qcow2".into(),
                    format: DiskFormat::Qcow2,
                },
            ],
            nics: vec![Nic {
                bridge: "biz0".into(),
                mac: "52:54:00:00:00:01".into(),
            }],
            boot: Boot::Kernel(images::BootImage {
                kernel: "/img/tiny/vmlinuz".into(),
                initrd: "/img/tiny/initrd.cpio.gz".into(),
                cmdline: "console=ttyS0 quiet".into(),
            }),
            serial_log: "/state/serial/web1.log".into(),
            vnc: true,
            self_fence: false,
            generation: 3,
            ft: None,
        }
    }

    #[test]
    fn domain_xml_kernel_boot_renders_expected_document() {
        let spec = kernel_spec();

        let xml = domain_xml(&spec, &tcg());

        assert_eq!(
            xml,
            "<domain type='qemu'>
  <name>web1</name>
  <uuid>6c3f8a3e-0b55-4b8e-9d6b-1f6f8f0d2a11</uuid>
  <metadata><pairvisor:vm xmlns:pairvisor='https://pairvisor.dev/ns/domain/1'><pairvisor:generation>3</pairvisor:generation></pairvisor:vm></metadata>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>/img/tiny/vmlinuz</kernel>
    <initrd>/img/tiny/initrd.cpio.gz</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='/sg0/a.raw'/><target dev='vda' bus='virtio'/><alias name='ua-vda'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/><source file='/sg0/b.qcow2'/><target dev='vdb' bus='virtio'/><alias name='ua-vdb'/></disk>
    <interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='biz0'/><model type='virtio'/><alias name='ua-net0'/></interface>
    <serial type='file'><source path='/state/serial/web1.log' append='on'/><target port='0'/></serial>
    <video><model type='vga' vram='16384' heads='1'/></video>
    <graphics type='vnc'><listen type='socket'/></graphics>
    <memballoon model='none'/>
  </devices>
</domain>
"
        );
    }

    #[test]
    fn domain_xml_kvm_profile_sets_kvm_type() {
        let host = HostProfile {
            domain_type: DomainType::Kvm,
            ..tcg()
        };

        let xml = domain_xml(&kernel_spec(), &host);

        assert!(xml.starts_with("<domain type='kvm'>"));
    }

    #[test]
    fn domain_xml_cdrom_boot_adds_cdrom_and_boot_order() {
        let spec = DomainSpec {
            boot: Boot::Cdrom("/isos/install.iso".into()),
            ..kernel_spec()
        };

        let xml = domain_xml(&spec, &tcg());

        assert!(
            xml.contains("<boot dev='cdrom'/>\n    <boot dev='hd'/>\n    <bios useserial='yes'/>")
        );
        assert!(xml.contains(
            "<source file='/isos/install.iso'/><target dev='hdc' bus='ide'/><readonly/>"
        ));
        assert!(!xml.contains("<kernel>"));
    }

    #[test]
    fn domain_xml_special_characters_are_escaped() {
        let spec = DomainSpec {
            serial_log: "/state/a'b&c.log".into(),
            ..kernel_spec()
        };

        let xml = domain_xml(&spec, &tcg());

        assert!(xml.contains("<source path='/state/a&apos;b&amp;c.log' append='on'/>"));
    }

    #[test]
    fn domain_xml_protected_disks_stop_on_io_error() {
        let spec = DomainSpec {
            self_fence: true,
            generation: 3,
            ..kernel_spec()
        };

        let xml = domain_xml(&spec, &tcg());

        assert!(xml.contains(
            "<driver name='qemu' type='raw' cache='none' error_policy='stop' rerror_policy='stop'/><source file='/sg0/a.raw'/>"
        ));
    }

    #[test]
    fn domain_xml_unprotected_disks_keep_qemu_error_policy() {
        let xml = domain_xml(&kernel_spec(), &tcg());

        assert!(!xml.contains("error_policy"));
    }

    /// The kernel spec as an FT domain with QMP socket `qmp`.
    fn ft_spec(qmp: &str, standby: bool) -> DomainSpec {
        DomainSpec {
            ft: Some(FtDomain {
                qmp_socket: qmp.into(),
                serial_socket: "/run/pv/a.serial".into(),
                standby,
            }),
            ..kernel_spec()
        }
    }

    #[test]
    fn domain_xml_ft_standby_shares_ram_and_waits_for_a_device_state() {
        let spec = ft_spec("/run/pv/ft,a.qmp", true);

        let xml = domain_xml(&spec, &tcg());

        assert!(xml.starts_with(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        ));
        assert!(xml.contains(
            "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"
        ));
        assert!(xml.contains(
            "<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:/run/pv/ft,,a.qmp,server=on,wait=off'/><qemu:arg value='-object'/><qemu:arg value='filter-buffer,id=ft-net0,netdev=hostua-net0,queue=rx,interval=4294967295,status=off'/><qemu:arg value='-incoming'/><qemu:arg value='defer'/><qemu:arg value='-global'/><qemu:arg value='migration.send-configuration=off'/><qemu:arg value='-machine'/><qemu:arg value='suppress-vmdesc=on'/></qemu:commandline>\n</domain>"
        ));
    }

    #[test]
    fn vnc_socket_is_read_from_the_live_xml() {
        let live = "<domain><devices><graphics type='vnc' socket='/var/lib/libvirt/qemu/domain-3-web1/vnc.sock'>\
            <listen type='socket' socket='/var/lib/libvirt/qemu/domain-3-web1/vnc.sock'/></graphics></devices></domain>";
        assert_eq!(
            vnc_socket_in(live),
            Some(PathBuf::from(
                "/var/lib/libvirt/qemu/domain-3-web1/vnc.sock"
            ))
        );
        assert_eq!(vnc_socket_in("<domain><devices/></domain>"), None);
        assert_eq!(vnc_socket_in("not xml"), None);
    }

    #[test]
    fn domain_xml_ft_has_no_screen_and_others_have_one() {
        let ft = domain_xml(&ft_spec("/run/pv/a.qmp", false), &tcg());
        let ha = domain_xml(&kernel_spec(), &tcg());

        assert!(!ft.contains("<video>"));
        assert!(!ft.contains("<graphics"));
        assert!(ha.contains("<video><model type='vga'"));
        assert!(ha.contains("<graphics type='vnc'><listen type='socket'/></graphics>"));
    }

    #[test]
    fn domain_xml_ft_nics_use_qemus_backend_under_a_filter() {
        let spec = ft_spec("/run/pv/a.qmp", false);

        let xml = domain_xml(&spec, &tcg());

        assert!(xml.contains(
            "<model type='virtio'/><driver name='qemu'/><alias name='ua-net0'/></interface>"
        ));
        assert!(xml.contains("netdev=hostua-net0,"));
    }

    #[test]
    fn domain_xml_ft_primary_runs_without_incoming() {
        let spec = ft_spec("/run/pv/a.qmp", false);

        let xml = domain_xml(&spec, &tcg());

        assert!(xml.contains(
            "<serial type='unix'><source mode='connect' path='/run/pv/a.serial'><reconnect enabled='yes' timeout='1'/></source><target port='0'/></serial>"
        ));
        assert!(xml.contains("<qemu:arg value='-qmp'/>"));
        assert!(!xml.contains("-incoming"));
    }

    #[test]
    fn domain_xml_without_ft_has_no_passthrough() {
        let xml = domain_xml(&kernel_spec(), &shim_host());

        assert!(!xml.contains("qemu:") && !xml.contains("memoryBacking"));
    }

    /// A TCG host whose FT domains preload the shim.
    fn shim_host() -> HostProfile {
        HostProfile {
            ft_preload: Some("/opt/pv/lib'pvftshim.so".into()),
            ..tcg()
        }
    }

    #[test]
    fn domain_xml_ft_domains_preload_the_shim() {
        for standby in [false, true] {
            let xml = domain_xml(&ft_spec("/run/pv/a.qmp", standby), &shim_host());

            assert!(
                xml.contains(
                    "<qemu:env name='LD_PRELOAD' value='/opt/pv/lib&apos;pvftshim.so'/></qemu:commandline>"
                ),
                "{xml}"
            );
        }
    }

    #[test]
    fn domain_xml_self_fence_renders_metadata_element() {
        let spec = DomainSpec {
            self_fence: true,
            generation: 3,
            ..kernel_spec()
        };

        let xml = domain_xml(&spec, &tcg());

        assert!(xml.contains(
            "<metadata><pairvisor:vm xmlns:pairvisor='https://pairvisor.dev/ns/domain/1'><pairvisor:self-fence/><pairvisor:generation>3</pairvisor:generation></pairvisor:vm></metadata>"
        ));
    }

    #[test]
    fn self_fence_in_metadata_as_libvirt_returns_it_is_true() {
        let marked = self_fence_in("<vm>\n  <self-fence/>\n</vm>");

        assert!(marked);
    }

    #[test]
    fn self_fence_in_prefixed_metadata_is_true() {
        let marked = self_fence_in(
            "<pairvisor:vm xmlns:pairvisor='https://pairvisor.dev/ns/domain/1'><pairvisor:self-fence/></pairvisor:vm>",
        );

        assert!(marked);
    }

    #[test]
    fn metadata_element_reads_back() {
        let element = metadata_element(true, 9);

        assert_eq!(
            (self_fence_in(&element), generation_in(&element)),
            (true, Some(9))
        );
        assert!(!self_fence_in(&metadata_element(false, 9)));
    }

    #[test]
    fn generation_in_metadata_as_libvirt_returns_it() {
        let plain = generation_in("<vm>\n  <self-fence/>\n  <generation>17</generation>\n</vm>");
        let prefixed = generation_in(
            "<pairvisor:vm xmlns:pairvisor='https://pairvisor.dev/ns/domain/1'><pairvisor:generation>4</pairvisor:generation></pairvisor:vm>",
        );

        assert_eq!((plain, prefixed), (Some(17), Some(4)));
        assert_eq!(generation_in("<vm><self-fence/></vm>"), None);
        assert_eq!(generation_in("<vm><generation>x</generation></vm>"), None);
    }

    #[test]
    fn self_fence_in_empty_element_is_false() {
        let marked = self_fence_in("<vm/>");

        assert!(!marked);
    }

    #[test]
    fn self_fence_in_similar_name_is_false() {
        let marked = self_fence_in("<vm><self-fence-later/></vm>");

        assert!(!marked);
    }

    #[test]
    fn virtio_disk_name_twelfth_disk_is_vdl() {
        let name = virtio_disk_name(11);

        assert_eq!(name, "vdl");
    }

    #[test]
    fn virtio_disk_name_after_z_wraps_to_two_letters() {
        let name = virtio_disk_name(26);

        assert_eq!(name, "vdaa");
    }
}

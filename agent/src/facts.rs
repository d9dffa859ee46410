//! Facts about this host that the controllers place VMs by.
//!
//! Static facts (CPUs, memory, libvirt and QEMU versions) are read once: under libvirtd,
//! `virConnectGetVersion` re-probes QEMU and costs 4–8 s per call (notes/libvirtd-system.md),
//! far past any poll deadline. Storage space and boot images are read on each request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use daemon::pair::{HostFacts, StorageGroupFacts};

use crate::libvirt::{Libvirt, Versions};
use crate::storage::{self, GroupFacts, StorageGroups};

/// Everything the agent reports about its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Storage groups with their space.
    pub storage_groups: Vec<GroupFacts>,
    /// Business networks: name → host bridge.
    pub networks: BTreeMap<String, String>,
    /// Complete boot images.
    pub boot_images: Vec<String>,
    /// Versions, once read (empty strings until then).
    pub versions: Versions,
}

impl Snapshot {
    /// The facts the pair places VMs by, as registered in etcd. Free space is rounded down to
    /// MiB so that a guest's writes do not rewrite the registration each time.
    pub fn host_facts(&self) -> HostFacts {
        HostFacts {
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            storage_groups: self
                .storage_groups
                .iter()
                .map(|g| {
                    let facts = StorageGroupFacts {
                        total_bytes: g.total_bytes,
                        free_bytes: g.free_bytes & !((1 << 20) - 1),
                    };
                    (g.name.clone(), facts)
                })
                .collect(),
            networks: self.networks.keys().cloned().collect(),
            boot_images: self.boot_images.iter().cloned().collect(),
            qemu_version: self.versions.qemu.clone(),
            libvirt_version: self.versions.libvirt.clone(),
        }
    }
}

/// Reads the host's facts; cheap to clone.
#[derive(Clone, Debug)]
pub struct Collector {
    inner: Arc<CollectorInner>,
}

#[derive(Debug)]
struct CollectorInner {
    cpus: u32,
    memory_mib: u64,
    versions: OnceLock<Versions>,
    storage: StorageGroups,
    image_dir: PathBuf,
    networks: BTreeMap<String, String>,
}

impl Collector {
    /// A collector for this host; reads the static facts now.
    pub fn new(
        storage: StorageGroups,
        image_dir: PathBuf,
        networks: BTreeMap<String, String>,
    ) -> std::io::Result<Collector> {
        Ok(Collector {
            inner: Arc::new(CollectorInner {
                cpus: cpus(),
                memory_mib: memory_mib()?,
                versions: OnceLock::new(),
                storage,
                image_dir,
                networks,
            }),
        })
    }

    /// Reads libvirt's and QEMU's versions once (slow: see the module doc), logging failure.
    pub async fn read_versions(&self, libvirt: &Libvirt) {
        let started = std::time::Instant::now();
        match libvirt.versions().await {
            Ok(versions) => {
                tracing::info!(qemu = %versions.qemu, libvirt = %versions.libvirt, ms = started.elapsed().as_millis(), "versions read (once)");
                let _ = self.inner.versions.set(versions);
            }
            Err(e) => {
                tracing::warn!(error = %daemon::error_chain(&e), "reading libvirt and QEMU versions failed; reported empty")
            }
        }
    }

    /// The host's facts now.
    pub fn snapshot(&self) -> Result<Snapshot, storage::Error> {
        let inner = &self.inner;
        Ok(Snapshot {
            cpus: inner.cpus,
            memory_mib: inner.memory_mib,
            storage_groups: inner.storage.facts()?,
            networks: inner.networks.clone(),
            boot_images: boot_images(&inner.image_dir),
            versions: inner.versions.get().cloned().unwrap_or(Versions {
                libvirt: String::new(),
                qemu: String::new(),
            }),
        })
    }
}

/// Logical CPUs this process may use.
fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// Total memory of this host in MiB, from /proc/meminfo.
fn memory_mib() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_mem_total_mib(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemTotal in /proc/meminfo",
        )
    })
}

fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Names of the complete boot images in `dir` (subdirectories with kernel, initrd, cmdline).
fn boot_images(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| images::BootImage::open(&e.path()).is_ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_mem_total_converts_kib_to_mib() {
        let text = "MemTotal:       24576000 kB\nMemFree:        1000 kB\n";

        let mib = parse_mem_total_mib(text);

        assert_eq!(mib, Some(24000));
    }

    #[test]
    fn parse_mem_total_missing_line_is_none() {
        let mib = parse_mem_total_mib("MemFree: 1 kB\n");

        assert_eq!(mib, None);
    }
}

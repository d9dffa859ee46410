//! The verify pass after an incremental resync: proves the peer's replica identical to the
//! disk, live, extent by extent, before the mirror is reported ready.
//!
//! Each 1 MiB extent is digested on both hosts: here from the disk's local file, there by the
//! peer's NBD server (our digest command, through the same socket the mirror uses and a plain
//! NBD client, [`super::nbd_client`]), so only 8 bytes per extent cross the A-Links. A guest
//! write may land between the two digests; the mirror is synchronous, so a mismatching extent
//! is digested again a few times, and only one that stays different is a divergence. Then
//! the disk's bitmap and verify mark are removed and its mirror job cancelled: the disk is
//! reported failed ("verify: replica differs at offset …"), the controller drops the peer's
//! copy, and the rebuild is a full one. A pass that cannot finish (I/O) is retried later.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::de::IgnoredAny;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::bitmap::{self, marker_name, resync_name};
use super::nbd_client::{self, Client};
use super::qmp::{self, BlockInfo, NamedNode};
use super::registry::{self, Verify};
use super::{JOB_PREFIX, PEER_PREFIX, Who, export_in_filename, socket_in_filename};
use crate::libvirt::Libvirt;
use crate::nbd::proto;
use crate::qmp_block::disk_file;

/// How the disk is cut for reading and how stubborn a mismatch must be to count.
#[derive(Clone, Copy, Debug)]
struct Pace {
    /// Bytes read and compared at once.
    extent: u32,
    /// Reads of a mismatching extent before it counts as different.
    tries: u32,
    /// Pause before the first re-read; doubled before each next one.
    first_retry: Duration,
}

/// 1 MiB extents; a mismatch re-read 7 times over about 1.3 s, long enough for any in-flight
/// guest write to have reached both copies.
const PACE: Pace = Pace {
    extent: 1 << 20,
    tries: 8,
    first_retry: Duration::from_millis(10),
};
/// How long the verify waits for the new mirror to be in sync (ready at once after the
/// final pass, unless the host is loaded).
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between two looks at the mirror while waiting.
const SYNC_POLL: Duration = Duration::from_millis(200);

/// Errors of the verify pass; each leaves the disk unverified, to be tried again.
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    /// The disk's local file could not be opened or sized.
    #[error("opening the disk's file {}", path.display())]
    LocalOpen {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The disk's local file could not be read.
    #[error("reading the disk's file {} at offset {offset}", path.display())]
    LocalRead {
        /// The file.
        path: PathBuf,
        /// Byte offset.
        offset: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading the peer's replica failed.
    #[error("reading the peer's replica")]
    Peer(#[from] nbd_client::Error),
    /// What to compare could not be found in QEMU.
    #[error("finding what to compare for disk {device}: {reason}")]
    Plan {
        /// Guest device.
        device: String,
        /// What is missing.
        reason: &'static str,
    },
}

/// What one disk's verify compares: its local file and the replica's export behind a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Plan {
    device: String,
    path: PathBuf,
    export: String,
    socket: PathBuf,
}

/// What the comparison found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    /// Every extent is the same on both sides.
    Equal {
        /// Extents compared.
        extents: u64,
    },
    /// The copies differ in the extent at this offset.
    Differs {
        /// Offset of the first differing extent (or where the shorter copy ends).
        offset: u64,
    },
}

/// Verifies every disk of `who.vm` marked as resynced but unverified.
pub(super) async fn run(libvirt: &Libvirt, who: Who<'_>) {
    let vm = who.vm.to_string();
    let plans = libvirt
        .with_monitor(who.vm, move |m| {
            let (nodes, blocks) = (qmp::query_nodes(m)?, qmp::query_blocks(m)?);
            let devices = bitmap::marked(&nodes);
            Ok::<_, super::Error>(
                devices
                    .into_iter()
                    .map(|d| (plan_of(&blocks, &nodes, &d), d))
                    .collect::<Vec<_>>(),
            )
        })
        .await;
    let plans = match plans {
        Ok(plans) => plans,
        Err(e) => {
            tracing::warn!(vm, node = who.node, error = %daemon::error_chain(&e), "verify: reading the disks to compare failed; retried later");
            registry::retry_later(who.vm);
            return;
        }
    };
    for (plan, device) in plans {
        match plan {
            Ok(plan) => verify_disk(libvirt, who, &plan).await,
            Err(e) => aborted(who, &device, &e),
        }
    }
}

/// Verifies one disk once its mirror is in sync, and acts on what it finds.
async fn verify_disk(libvirt: &Libvirt, who: Who<'_>, plan: &Plan) {
    let device = plan.device.as_str();
    if !wait_in_sync(libvirt, who.vm, device).await {
        tracing::info!(
            vm = who.vm,
            node = who.node,
            device,
            "verify skipped: the mirror is not in sync (the next resync verifies)"
        );
        return;
    }
    tracing::info!(vm = who.vm, node = who.node, device, file = %plan.path.display(), export = %plan.export, "verify begin");
    let started = Instant::now();
    let progress =
        |done, total| registry::set_verify(who.vm, device, Verify::Running { done, total });
    let found = compare_plan(plan, progress).await;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    match found {
        Ok(Found::Equal { extents }) => equal(libvirt, who, device, extents, ms).await,
        Ok(Found::Differs { offset }) => differs(libvirt, who, device, offset).await,
        Err(e) => aborted(who, device, &e),
    }
}

/// Opens both copies of `plan` and compares them.
async fn compare_plan(plan: &Plan, progress: impl FnMut(u64, u64)) -> Result<Found, Error> {
    let mut local = LocalFile::open(plan.path.clone()).await?;
    let mut peer = Client::connect(&plan.socket, &plan.export).await?;
    compare(&mut local, &mut peer, PACE, progress).await
}

/// The replica is identical: the verify mark goes, and the mirror is reported ready.
async fn equal(libvirt: &Libvirt, who: Who<'_>, device: &str, extents: u64, ms: f64) {
    let name = marker_name(device);
    let removed = libvirt
        .with_monitor(who.vm, move |m| {
            bitmap::remove_all(m, &qmp::query_nodes(m)?, &[name])
        })
        .await;
    if let Err(e) = removed {
        tracing::warn!(vm = who.vm, node = who.node, device, error = %daemon::error_chain(&e), "verify: equal, but removing the verify mark failed; verified again later");
        registry::retry_later(who.vm);
        return;
    }
    registry::set_verify(who.vm, device, Verify::Equal { extents });
    tracing::info!(
        vm = who.vm,
        node = who.node,
        device,
        extents,
        elapsed_ms = ms,
        "verify end: equal, {extents} extents"
    );
}

/// The replica differs: no bitmap can be trusted any more, and the mirror stops so that the
/// disk is reported failed and rebuilt in full.
async fn differs(libvirt: &Libvirt, who: Who<'_>, device: &str, offset: u64) {
    tracing::error!(
        vm = who.vm,
        node = who.node,
        device,
        offset,
        extent = offset - offset % u64::from(PACE.extent),
        "verify: replica differs at offset {offset}; the peer's copy is dropped and rebuilt in full"
    );
    registry::set_verify(who.vm, device, Verify::Differs { offset });
    let owned = device.to_string();
    let dropped = libvirt
        .with_monitor(who.vm, move |m| {
            let names = [resync_name(&owned), marker_name(&owned)];
            bitmap::remove_all(m, &qmp::query_nodes(m)?, &names)?;
            let job = format!("{JOB_PREFIX}{owned}");
            qmp::execute::<IgnoredAny>(m, "block-job-cancel", &json!({ "device": job }))
                .map(drop)
                .map_err(super::Error::from)
        })
        .await;
    if let Err(e) = dropped {
        tracing::error!(vm = who.vm, node = who.node, device, error = %daemon::error_chain(&e), "verify: stopping the mirror of a differing replica failed");
    }
}

/// The pass could not finish: the disk stays unverified and is tried again later.
fn aborted(who: Who<'_>, device: &str, e: &Error) {
    let error = daemon::error_chain(e);
    tracing::warn!(vm = who.vm, node = who.node, device, error = %error, "verify end: aborted; retried later");
    registry::set_verify(who.vm, device, Verify::Aborted { error });
    registry::retry_later(who.vm);
}

/// Waits until `device`'s mirror is in sync; false if it ended or did not get there in time.
async fn wait_in_sync(libvirt: &Libvirt, vm: &str, device: &str) -> bool {
    let job_id = format!("{JOB_PREFIX}{device}");
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while Instant::now() < deadline {
        let jobs = libvirt.with_monitor(vm, qmp::query_jobs).await;
        let Ok(jobs) = jobs else {
            return false;
        };
        match jobs.iter().find(|j| j.device == job_id) {
            Some(job) if job.in_sync() => return true,
            Some(job) if !job.status.ended() && job.error.is_none() => {}
            _ => return false,
        }
        tokio::time::sleep(SYNC_POLL).await;
    }
    false
}

/// What to compare for `device`: its local file (from `blocks`) and its replica's export and
/// socket (from the NBD target node's filename in `nodes`).
fn plan_of(blocks: &[BlockInfo], nodes: &[NamedNode], device: &str) -> Result<Plan, Error> {
    let missing = |reason| Error::Plan {
        device: device.to_string(),
        reason,
    };
    let path = disk_file(blocks, device)
        .filter(|p| p.starts_with('/'))
        .ok_or(missing("the disk is not a local file"))?;
    let target = format!("{PEER_PREFIX}{device}");
    let file = nodes
        .iter()
        .find(|n| n.node_name == target)
        .map(|n| n.file.as_str())
        .ok_or(missing("no NBD target node"))?;
    Ok(Plan {
        device: device.to_string(),
        path: PathBuf::from(path),
        export: export_in_filename(file).ok_or(missing("no export in the target's filename"))?,
        socket: socket_in_filename(file).ok_or(missing("no socket in the target's filename"))?,
    })
}

/// One copy of a disk, digested by extents where it lies.
trait Extents {
    /// Its size in bytes.
    fn size(&mut self) -> impl Future<Output = Result<u64, Error>> + Send;
    /// The [`proto::digest`] of `length` bytes at `offset`.
    fn digest(
        &mut self,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = Result<u64, Error>> + Send;
}

/// The disk's file on this host.
struct LocalFile {
    path: PathBuf,
    file: tokio::fs::File,
}

impl LocalFile {
    async fn open(path: PathBuf) -> Result<LocalFile, Error> {
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(LocalFile { path, file }),
            Err(source) => Err(Error::LocalOpen { path, source }),
        }
    }
}

impl Extents for LocalFile {
    async fn size(&mut self) -> Result<u64, Error> {
        // Seeking to the end sizes block devices too (their metadata length is 0).
        self.file
            .seek(std::io::SeekFrom::End(0))
            .await
            .map_err(|source| Error::LocalOpen {
                path: self.path.clone(),
                source,
            })
    }

    async fn digest(&mut self, offset: u64, length: u32) -> Result<u64, Error> {
        let mut data = vec![0u8; usize::try_from(length).unwrap_or(0)];
        let read = async {
            self.file.seek(std::io::SeekFrom::Start(offset)).await?;
            self.file.read_exact(&mut data).await
        };
        read.await.map_err(|source| Error::LocalRead {
            path: self.path.clone(),
            offset,
            source,
        })?;
        Ok(proto::digest(&data))
    }
}

impl Extents for Client<tokio::net::UnixStream> {
    async fn size(&mut self) -> Result<u64, Error> {
        Ok(Client::size(self))
    }

    async fn digest(&mut self, offset: u64, length: u32) -> Result<u64, Error> {
        Ok(Client::digest(self, offset, length).await?)
    }
}

/// Compares `local` and `peer` extent by extent; `progress(done, total)` follows.
async fn compare<L: Extents, P: Extents>(
    local: &mut L,
    peer: &mut P,
    pace: Pace,
    mut progress: impl FnMut(u64, u64),
) -> Result<Found, Error> {
    let (size, peer_size) = (local.size().await?, peer.size().await?);
    if size != peer_size {
        return Ok(Found::Differs {
            offset: size.min(peer_size),
        });
    }
    let mut extents = 0;
    let mut offset = 0;
    while offset < size {
        let length =
            u32::try_from((size - offset).min(u64::from(pace.extent))).unwrap_or(pace.extent);
        if let Some(at) = compare_extent(local, peer, offset, length, pace).await? {
            return Ok(Found::Differs { offset: at });
        }
        offset += u64::from(length);
        extents += 1;
        progress(offset, size);
    }
    Ok(Found::Equal { extents })
}

/// Compares one extent, digesting it again while it differs; its offset if it still differs
/// after `pace.tries` digests.
async fn compare_extent<L: Extents, P: Extents>(
    local: &mut L,
    peer: &mut P,
    offset: u64,
    length: u32,
    pace: Pace,
) -> Result<Option<u64>, Error> {
    let mut pause = pace.first_retry;
    let mut tries = 1;
    loop {
        let mine = local.digest(offset, length).await?;
        let theirs = peer.digest(offset, length).await?;
        if mine == theirs {
            return Ok(None);
        }
        if tries >= pace.tries {
            return Ok(Some(offset));
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
        tries += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A disk in memory whose successive reads see successive versions (the last one stays).
    struct Versions(VecDeque<Vec<u8>>);

    impl Versions {
        fn of(versions: &[&[u8]]) -> Versions {
            Versions(versions.iter().map(|v| v.to_vec()).collect())
        }
    }

    impl Extents for Versions {
        async fn size(&mut self) -> Result<u64, Error> {
            Ok(self.0.front().map_or(0, |v| v.len() as u64))
        }

        async fn digest(&mut self, offset: u64, length: u32) -> Result<u64, Error> {
            let disk = match self.0.len() {
                1 => self.0[0].clone(),
                _ => self.0.pop_front().unwrap_or_default(),
            };
            let start = usize::try_from(offset).unwrap();
            Ok(proto::digest(
                &disk[start..start + usize::try_from(length).unwrap()],
            ))
        }
    }

    const FAST: Pace = Pace {
        extent: 4,
        tries: 3,
        first_retry: Duration::ZERO,
    };

    #[tokio::test(flavor = "current_thread")]
    async fn compare_equal_copies_counts_extents() {
        let (mut local, mut peer) = (
            Versions::of(&[b"0123456789"]),
            Versions::of(&[b"0123456789"]),
        );

        let found = compare(&mut local, &mut peer, FAST, |_, _| {})
            .await
            .unwrap();

        assert_eq!(found, Found::Equal { extents: 3 });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn compare_lasting_difference_reports_its_extent() {
        let (mut local, mut peer) = (
            Versions::of(&[b"0123456789"]),
            Versions::of(&[b"01234X6789"]),
        );

        let found = compare(&mut local, &mut peer, FAST, |_, _| {})
            .await
            .unwrap();

        assert_eq!(found, Found::Differs { offset: 4 });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn compare_write_between_the_reads_converges_to_equal() {
        let mut local = Versions::of(&[b"AAAA", b"BBBB"]);
        let mut peer = Versions::of(&[b"BBBB"]);

        let found = compare(&mut local, &mut peer, FAST, |_, _| {})
            .await
            .unwrap();

        assert_eq!(found, Found::Equal { extents: 1 });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn compare_different_sizes_differ_where_the_shorter_ends() {
        let (mut local, mut peer) = (Versions::of(&[b"01234567"]), Versions::of(&[b"0123"]));

        let found = compare(&mut local, &mut peer, FAST, |_, _| {})
            .await
            .unwrap();

        assert_eq!(found, Found::Differs { offset: 4 });
    }

    #[test]
    fn plan_of_reads_file_export_and_socket() {
        let blocks: Vec<BlockInfo> = qmp::parse_reply(
            "query-block",
            r#"{"return":[{"qdev":"/machine/peripheral/ua-vda/virtio-backend","inserted":{"node-name":"libvirt-1-format","file":"/sg0/a.raw"}}]}"#,
        )
        .unwrap();
        let nodes: Vec<NamedNode> = qmp::parse_reply(
            "query-named-block-nodes",
            r#"{"return":[{"node-name":"pv-peer-vda","file":"nbd+unix:///a.raw?socket=/state/peer-nbd/u.sock"}]}"#,
        )
        .unwrap();

        let plan = plan_of(&blocks, &nodes, "vda").unwrap();

        assert_eq!(
            plan,
            Plan {
                device: "vda".into(),
                path: "/sg0/a.raw".into(),
                export: "a.raw".into(),
                socket: "/state/peer-nbd/u.sock".into(),
            }
        );
    }

    #[test]
    fn plan_of_without_target_is_a_plan_error() {
        let err = plan_of(&[], &[], "vda").unwrap_err();

        assert!(matches!(err, Error::Plan { .. }), "{err:?}");
    }
}

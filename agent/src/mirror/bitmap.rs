//! The dirty bitmaps of incremental resync (notes/disk-paths.md, Q4).
//!
//! * `pv-resync-<dev>` on the disk's node records every write since it was added or last
//!   cleared. It is added, and cleared once it holds [`CLEAR_AT`] bytes, only while the disk's
//!   mirror is in sync, each time in a `transaction` (drained: no write in flight), and the
//!   mirror is checked again right after: if it broke meanwhile, writes the peer lacks may
//!   have been left out, so the bitmap is removed and the next resync is a full one. While
//!   the mirror is in sync its bits are writes the peer already has; what counts is what it
//!   gathers once the mirror breaks. It is not persistent: a new QEMU means a full resync.
//!   The upkeep runs in [`super::status`] (every poll, about once a second): it reads what
//!   the status reads anyway and acts only when the bitmap is missing or too full.
//! * `pv-verify-<dev>` (disabled, one huge granule: it records nothing) marks a disk whose
//!   replica was resynced incrementally and not yet proven identical. Living in QEMU, the mark
//!   outlasts an agent restart; while it exists the mirror is reported syncing, not ready.

use serde_json::{Value, json};

use super::qmp::{self, Bitmap, BlockJob, NamedNode, find_bitmap};
use super::{Error, JOB_PREFIX, Who, device_of_job, find_source, target_is_qcow2};
use crate::libvirt::Monitor;

/// Prefix of the resync bitmaps' names; the guest device follows.
const RESYNC_PREFIX: &str = "pv-resync-";
/// Prefix of the verify marks' names; the guest device follows.
const MARKER_PREFIX: &str = "pv-verify-";
/// Granularity of a resync bitmap: a write dirties (and a resync copies) 64 KiB around it.
const GRANULARITY: u64 = 64 << 10;
/// Granularity of a verify mark: it never records, so the fewer bits the better.
const MARKER_GRANULARITY: u64 = 1 << 30;
/// Dirty bytes at which an in-sync mirror's bitmap is cleared: what a later resync copies on
/// top of what changed during the break, and how often the disk is drained for it.
pub(super) const CLEAR_AT: u64 = 64 << 20;

/// The resync bitmap's name for guest device `device`.
pub(super) fn resync_name(device: &str) -> String {
    format!("{RESYNC_PREFIX}{device}")
}

/// The verify mark's name for guest device `device`.
pub(super) fn marker_name(device: &str) -> String {
    format!("{MARKER_PREFIX}{device}")
}

/// The guest devices whose verify mark is on one of `nodes`.
pub(super) fn marked(nodes: &[NamedNode]) -> Vec<String> {
    nodes
        .iter()
        .flat_map(|n| &n.bitmaps)
        .filter_map(|b| b.name.strip_prefix(MARKER_PREFIX))
        .map(str::to_string)
        .collect()
}

/// What an in-sync mirror's resync bitmap needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Upkeep {
    /// There is none: add it.
    Add,
    /// It grew large: clear it.
    Clear,
    /// Nothing.
    Keep,
}

/// What the resync bitmap `bitmap` of a disk whose mirror is in sync needs.
pub(super) fn upkeep(bitmap: Option<&Bitmap>) -> Upkeep {
    match bitmap {
        None => Upkeep::Add,
        Some(b) if !b.busy && b.count >= CLEAR_AT => Upkeep::Clear,
        Some(_) => Upkeep::Keep,
    }
}

/// Adds or clears the resync bitmap of every raw disk whose mirror is in sync. Failures are
/// logged: the status must not fail for a bitmap (a disk without one gets a full resync).
pub(super) fn upkeep_all(m: &Monitor<'_>, who: Who<'_>, jobs: &[BlockJob], nodes: &[NamedNode]) {
    let in_sync = jobs
        .iter()
        .filter(|j| j.in_sync())
        .filter_map(|j| device_of_job(&j.device))
        .filter(|device| !target_is_qcow2(nodes, device));
    for device in in_sync {
        let name = resync_name(device);
        let found = find_bitmap(nodes, &name);
        let done = match upkeep(found.map(|(_, b)| b)) {
            Upkeep::Keep => continue,
            Upkeep::Add => {
                find_source(m, who.vm, device).and_then(|node| add(m, who, device, &node))
            }
            Upkeep::Clear => match found {
                Some((node, bitmap)) => clear(m, who, device, node, bitmap.count),
                None => continue,
            },
        };
        if let Err(e) = done {
            tracing::warn!(vm = who.vm, node = who.node, device, error = %daemon::error_chain(&e), "resync bitmap upkeep failed; retried at the next poll");
        }
    }
}

/// Adds the resync bitmap of each `(device, block node)` in one transaction: writes from now
/// on are tracked for the first mirror.
pub(super) fn add_tracking(m: &Monitor<'_>, disks: &[(String, String)]) -> Result<(), Error> {
    let actions: Vec<_> = disks
        .iter()
        .map(|(device, node)| add_action(device, node))
        .collect();
    qmp::transaction(m, &actions).map_err(Error::from)
}

/// The transaction action adding `device`'s resync bitmap on block node `node`.
fn add_action(device: &str, node: &str) -> Value {
    json!({"type": "block-dirty-bitmap-add", "data": {"node": node, "name": resync_name(device),
        "granularity": GRANULARITY, "persistent": false}})
}

/// Adds `device`'s resync bitmap on block node `node`, then checks the mirror again.
fn add(m: &Monitor<'_>, who: Who<'_>, device: &str, node: &str) -> Result<(), Error> {
    let name = resync_name(device);
    qmp::transaction(m, &[add_action(device, node)])?;
    if still_in_sync(m, who, device, node)? {
        tracing::info!(vm = who.vm, node = who.node, device, bitmap = %name, block_node = node, "resync bitmap added: writes from now on are tracked for an incremental resync");
    }
    Ok(())
}

/// Clears `device`'s resync bitmap (holding `count` bytes) on `node`, then checks the mirror
/// again.
fn clear(m: &Monitor<'_>, who: Who<'_>, device: &str, node: &str, count: u64) -> Result<(), Error> {
    let name = resync_name(device);
    let action = json!({"type": "block-dirty-bitmap-clear", "data": {"node": node, "name": name}});
    qmp::transaction(m, &[action])?;
    if still_in_sync(m, who, device, node)? {
        tracing::info!(vm = who.vm, node = who.node, device, bitmap = %name, count, "resync bitmap cleared: the peer has every write it held");
    }
    Ok(())
}

/// Whether `device`'s mirror is still in sync after its bitmap was added or cleared; if not,
/// the bitmap may lack writes the peer never got, so it is removed (the next resync is full).
fn still_in_sync(m: &Monitor<'_>, who: Who<'_>, device: &str, node: &str) -> Result<bool, Error> {
    let job_id = format!("{JOB_PREFIX}{device}");
    if qmp::query_jobs(m)?
        .iter()
        .any(|j| j.device == job_id && j.in_sync())
    {
        return Ok(true);
    }
    remove(m, node, &resync_name(device))?;
    tracing::warn!(
        vm = who.vm,
        node = who.node,
        device,
        "the mirror broke while its resync bitmap was set; bitmap removed, the next resync is a full one"
    );
    Ok(false)
}

/// Marks `device` (on block node `node`) as resynced but not yet verified.
pub(super) fn add_marker(m: &Monitor<'_>, node: &str, device: &str) -> Result<(), Error> {
    let arguments = json!({"node": node, "name": marker_name(device),
        "granularity": MARKER_GRANULARITY, "persistent": false, "disabled": true});
    qmp::execute::<serde::de::IgnoredAny>(m, "block-dirty-bitmap-add", &arguments)
        .map(drop)
        .map_err(Error::from)
}

/// Removes bitmap `name` from block node `node`.
pub(super) fn remove(m: &Monitor<'_>, node: &str, name: &str) -> Result<(), Error> {
    let arguments = json!({"node": node, "name": name});
    qmp::execute::<serde::de::IgnoredAny>(m, "block-dirty-bitmap-remove", &arguments)
        .map(drop)
        .map_err(Error::from)
}

/// Removes whichever of `names` exist on `nodes`.
pub(super) fn remove_all(
    m: &Monitor<'_>,
    nodes: &[NamedNode],
    names: &[String],
) -> Result<(), Error> {
    for name in names {
        if let Some((node, _)) = find_bitmap(nodes, name) {
            remove(m, node, name)?;
        }
    }
    Ok(())
}

/// The QMP arguments of a `blockdev-backup` of `device`'s resync bitmap from `source` into
/// `target`, as job `job_id`: only the dirty extents, as of the job's start; on success the
/// bitmap keeps only the writes made since.
pub(super) fn backup_arguments(job_id: &str, device: &str, source: &str, target: &str) -> Value {
    json!({"job-id": job_id, "device": source, "target": target, "sync": "bitmap",
        "bitmap": resync_name(device), "bitmap-mode": "on-success", "auto-dismiss": false})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(count: u64, busy: bool) -> Bitmap {
        Bitmap {
            name: resync_name("vda"),
            count,
            recording: true,
            busy,
            inconsistent: false,
        }
    }

    #[test]
    fn upkeep_without_bitmap_adds_it() {
        let action = upkeep(None);

        assert_eq!(action, Upkeep::Add);
    }

    #[test]
    fn upkeep_of_a_small_bitmap_keeps_it() {
        let action = upkeep(Some(&bitmap(CLEAR_AT - 1, false)));

        assert_eq!(action, Upkeep::Keep);
    }

    #[test]
    fn upkeep_of_a_full_bitmap_clears_it() {
        let action = upkeep(Some(&bitmap(CLEAR_AT, false)));

        assert_eq!(action, Upkeep::Clear);
    }

    #[test]
    fn upkeep_of_a_busy_bitmap_keeps_it() {
        let action = upkeep(Some(&bitmap(CLEAR_AT, true)));

        assert_eq!(action, Upkeep::Keep);
    }

    #[test]
    fn marked_lists_devices_of_verify_marks_only() {
        let text = r#"{"return":[{"node-name":"libvirt-2-format","dirty-bitmaps":[{"name":"pv-resync-vda","count":0},{"name":"pv-verify-vda","count":0}]},{"node-name":"libvirt-1-format","dirty-bitmaps":[{"name":"pv-verify-vdb","count":0}]}]}"#;
        let nodes: Vec<NamedNode> = qmp::parse_reply("query-named-block-nodes", text).unwrap();

        let devices = marked(&nodes);

        assert_eq!(devices, ["vda", "vdb"]);
    }

    #[test]
    fn backup_arguments_use_the_resync_bitmap_on_success() {
        let arguments = backup_arguments("pv-backup-vda", "vda", "libvirt-1-format", "pv-peer-vda");

        assert_eq!(
            arguments,
            json!({"job-id": "pv-backup-vda", "device": "libvirt-1-format", "target": "pv-peer-vda",
                "sync": "bitmap", "bitmap": "pv-resync-vda", "bitmap-mode": "on-success", "auto-dismiss": false})
        );
    }
}

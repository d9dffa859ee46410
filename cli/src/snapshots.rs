//! The snapshot commands: take, list, delete and restore a VM's snapshots. Warnings (such as
//! the fallback to crash consistency) go to stderr, so a cron job's output stays the result.

use clap::{Subcommand, ValueEnum};
use proto::v1 as pb;
use serde_json::{Value, json};

use crate::client::Api;
use crate::output::vm_text;
use crate::units::{human, utc};

/// The least time a snapshot command waits, whatever `--timeout` says.
pub const MIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

/// The snapshot commands (they wait at least [`MIN_TIMEOUT`]).
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot of a VM's disks, running or stopped (the guest's disk I/O is held only
    /// for an instant); a VM keeps at most 16.
    #[command(name = "vm-snapshot-create")]
    Create {
        /// VM name or UUID.
        vm: String,
        /// Words to remember it by.
        #[arg(long, default_value = "")]
        description: String,
        /// Crash-consistent, or application-consistent through the guest's agent [default:
        /// application when the guest has an agent, else crash with a warning].
        #[arg(long, value_enum)]
        consistency: Option<ConsistencyArg>,
    },
    /// List a VM's snapshots, oldest first.
    #[command(name = "vm-snapshot-list")]
    List {
        /// VM name or UUID.
        vm: String,
    },
    /// Delete a snapshot (the later ones stay restorable).
    #[command(name = "vm-snapshot-delete")]
    Delete {
        /// VM name or UUID.
        vm: String,
        /// Snapshot ID (see vm-snapshot-list).
        id: String,
    },
    /// Write a snapshot over a stopped VM's disks.
    #[command(name = "vm-snapshot-restore")]
    Restore {
        /// VM name or UUID.
        vm: String,
        /// Snapshot ID (see vm-snapshot-list).
        id: String,
    },
}

/// A snapshot's consistency.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ConsistencyArg {
    /// The disks as a power cut would leave them.
    Crash,
    /// The guest's file systems frozen first (needs its guest agent).
    Application,
}

/// Runs a snapshot command.
pub async fn run(command: SnapshotCmd, api: &Api, json: bool) -> anyhow::Result<()> {
    match command {
        SnapshotCmd::Create {
            vm,
            description,
            consistency,
        } => {
            let consistency = match consistency {
                None => pb::Consistency::Auto,
                Some(ConsistencyArg::Crash) => pb::Consistency::Crash,
                Some(ConsistencyArg::Application) => pb::Consistency::Application,
            };
            let request = pb::CreateSnapshotRequest {
                vm,
                description,
                consistency: consistency.into(),
            };
            let created = api
                .call(
                    request,
                    |mut c, r| async move { c.create_snapshot(r).await },
                )
                .await?;
            for warning in &created.warnings {
                eprintln!("pvctl: warning: {warning}");
            }
            let snapshot = created.snapshot.unwrap_or_default();
            let mut value = snapshot_json(&snapshot);
            value["warnings"] = json!(created.warnings);
            crate::print(json, &value, &snapshot_text(&snapshot));
        }
        SnapshotCmd::List { vm } => {
            let list = api
                .call(pb::ListSnapshotsRequest { vm }, |mut c, r| async move {
                    c.list_snapshots(r).await
                })
                .await?
                .snapshots;
            let value = Value::Array(list.iter().map(snapshot_json).collect());
            crate::print(json, &value, &snapshots_table(&list));
        }
        SnapshotCmd::Delete { vm, id } => {
            let request = pb::DeleteSnapshotRequest {
                vm: vm.clone(),
                id: id.clone(),
            };
            api.call(
                request,
                |mut c, r| async move { c.delete_snapshot(r).await },
            )
            .await?;
            let value = json!({ "vm": vm, "deleted": id });
            crate::print(json, &value, &format!("deleted snapshot {id} of VM {vm}\n"));
        }
        SnapshotCmd::Restore { vm, id } => {
            let request = pb::RestoreSnapshotRequest { vm, id: id.clone() };
            let restored = api
                .call(
                    request,
                    |mut c, r| async move { c.restore_snapshot(r).await },
                )
                .await?;
            let text = format!("restored snapshot {id}\n{}", vm_text(&restored));
            crate::print(json, &crate::output::vm_json(&restored), &text);
        }
    }
    Ok(())
}

fn consistency_name(c: pb::Consistency) -> &'static str {
    match c {
        pb::Consistency::Auto => "auto",
        pb::Consistency::Crash => "crash",
        pb::Consistency::Application => "application",
    }
}

fn state_name(s: pb::SnapshotState) -> &'static str {
    match s {
        pb::SnapshotState::Creating => "creating",
        pb::SnapshotState::Ready => "ready",
        pb::SnapshotState::Deleting => "deleting",
        pb::SnapshotState::Invalid => "invalid",
    }
}

/// A snapshot as JSON.
pub fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "id": s.id,
        "vm": s.vm,
        "description": s.description,
        "created_unix_ms": s.created_unix_ms,
        "consistency": consistency_name(s.consistency()),
        "nodes": s.nodes,
        "bytes": s.bytes,
        "incremental": s.incremental,
        "freeze_us": s.freeze_us,
        "state": state_name(s.state()),
    })
}

fn kind(s: &pb::Snapshot) -> &'static str {
    if s.incremental { "incremental" } else { "full" }
}

/// One snapshot as text.
pub fn snapshot_text(s: &pb::Snapshot) -> String {
    #[allow(clippy::cast_precision_loss)]
    let freeze_ms = s.freeze_us as f64 / 1e3;
    format!(
        "snapshot {} of VM {} ({}, {}, {}) on {}, {} taken {}; disk I/O held {freeze_ms:.1} ms\n",
        s.id,
        s.vm,
        kind(s),
        consistency_name(s.consistency()),
        state_name(s.state()),
        s.nodes.join("+"),
        human(s.bytes),
        utc(s.created_unix_ms),
    )
}

/// A VM's snapshots as a table.
pub fn snapshots_table(list: &[pb::Snapshot]) -> String {
    if list.is_empty() {
        return "no snapshots; take one with `pvctl vm-snapshot-create VM`\n".into();
    }
    let mut out = format!(
        "{:<4} {:<20} {:<11} {:>10} {:<11} {:<9} {:<7} DESCRIPTION\n",
        "ID", "TAKEN", "KIND", "SIZE", "CONSISTENCY", "STATE", "NODES"
    );
    for s in list {
        out.push_str(&format!(
            "{:<4} {:<20} {:<11} {:>10} {:<11} {:<9} {:<7} {}\n",
            s.id,
            utc(s.created_unix_ms),
            kind(s),
            human(s.bytes),
            consistency_name(s.consistency()),
            state_name(s.state()),
            s.nodes.join("+"),
            s.description
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: &str, incremental: bool) -> pb::Snapshot {
        pb::Snapshot {
            id: id.into(),
            vm: "web".into(),
            description: "nightly".into(),
            created_unix_ms: 0,
            consistency: pb::Consistency::Crash.into(),
            nodes: vec!["n0".into(), "n1".into()],
            bytes: 3 << 20,
            incremental,
            freeze_us: 2500,
            state: pb::SnapshotState::Ready.into(),
        }
    }

    #[test]
    fn snapshots_table_shows_kind_and_description() {
        let table = snapshots_table(&[snapshot("1", false), snapshot("2", true)]);

        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("1 ") && lines[1].contains(" full "),
            "{table}"
        );
        assert!(
            lines[2].contains(" incremental ") && lines[2].ends_with("nightly"),
            "{table}"
        );
    }

    #[test]
    fn snapshot_text_shows_the_freeze_in_ms() {
        let text = snapshot_text(&snapshot("2", true));

        assert!(text.contains("disk I/O held 2.5 ms"), "{text}");
    }
}

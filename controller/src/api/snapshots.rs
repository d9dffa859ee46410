//! Snapshots translated between the API and the engine's records.

use proto::v1 as pb;

use crate::model::{Consistency, Snapshot, SnapshotState};
use crate::snapshots::Ask;

/// The consistency a request asks for.
pub(super) fn ask_from_pb(consistency: pb::Consistency) -> Ask {
    match consistency {
        pb::Consistency::Auto => Ask::Auto,
        pb::Consistency::Crash => Ask::Crash,
        pb::Consistency::Application => Ask::Application,
    }
}

/// A snapshot of VM `vm` as the API shows it.
pub(super) fn to_pb(vm: &str, s: &Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        id: s.id.clone(),
        vm: vm.to_string(),
        description: s.description.clone(),
        created_unix_ms: s.created_unix_ms,
        consistency: match s.consistency {
            Consistency::Crash => pb::Consistency::Crash,
            Consistency::Application => pb::Consistency::Application,
        }
        .into(),
        nodes: s.nodes.clone(),
        bytes: s.bytes,
        incremental: s.incremental,
        freeze_us: s.freeze_us,
        state: match s.state {
            SnapshotState::Creating => pb::SnapshotState::Creating,
            SnapshotState::Ready => pb::SnapshotState::Ready,
            SnapshotState::Deleting => pb::SnapshotState::Deleting,
        }
        .into(),
    }
}

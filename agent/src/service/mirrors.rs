//! The service's HA mirror requests (`StartMirror`, `StopMirror`) and the mirrors in
//! `ListDomains`: proto in, [`crate::mirror`] calls, proto out.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::agent as pb;

use super::{Error, Inner, disk_format, invalid, plain_name, status_to_pb, uuid_invalid};
use crate::domain;
use crate::libvirt::{DomainState, DomainStatus};
use crate::mirror::{self, DiskMirror, DiskWrites, MirrorDisk, MirrorState};
use crate::stale::{Grant, Marker};

/// How long a listing waits for one domain's mirrors: a domain whose monitor is busy with a
/// long operation (or hung) must not hold up the list of every domain.
const MIRROR_STATUS_BUDGET: Duration = Duration::from_secs(2);

impl Inner {
    /// Every domain, the running ones with their mirrors.
    pub(super) async fn list_domains(&self) -> Result<Vec<pb::DomainStatus>, Error> {
        let domains = self.deps.libvirt.list().await?;
        let mut mirrors = self.mirrors_of_running(&domains).await;
        let mut listed = Vec::with_capacity(domains.len());
        for mut d in domains {
            if self.checkpoint_pause(&d) {
                // The epoch loop's own pause, a few milliseconds long: the guest runs.
                d.state = DomainState::Running;
            }
            let live = matches!(d.state, DomainState::Running | DomainState::Paused);
            let read = mirrors.remove(&d.uuid);
            let mirrors_unknown = live && read.is_none();
            let (found, writes) = read.unwrap_or_default();
            let mirror_path = match (&self.deps.replicas, found.is_empty()) {
                (Some(replicas), false) => replicas.path_serial(&d.uuid).await,
                _ => 0,
            };
            let ft = self.ft_status(&d.uuid).await;
            listed.push(pb::DomainStatus {
                mirrors: found.into_iter().map(mirror_to_pb).collect(),
                disk_writes: writes.into_iter().map(writes_to_pb).collect(),
                mirror_path,
                mirrors_unknown,
                ft,
                ..status_to_pb(d)
            });
        }
        Ok(listed)
    }

    /// Mirrors each disk of the running domain to the peer's replica of its volume.
    pub(super) async fn start_mirror(
        &self,
        req: pb::StartMirrorRequest,
    ) -> Result<pb::DomainStatus, Error> {
        if uuid_invalid(&req.uuid) {
            return Err(invalid(format!("{:?} is not a UUID", req.uuid)));
        }
        if !plain_name(&req.peer) {
            return Err(invalid(format!("peer {:?} is not a node name", req.peer)));
        }
        let disks = mirror_disks(&req.volumes)?;
        self.admit("start-mirror", &req.uuid, req.fence)?;
        let replicas = self
            .deps
            .replicas
            .as_deref()
            .ok_or(Error::NoALink { op: "start-mirror" })?;
        let libvirt = &self.deps.libvirt;
        // A new socket (with the lease held now) unless a mirror runs through the old one.
        let running = mirror::status(libvirt, &self.node, &req.uuid)
            .await
            .is_ok_and(|m| {
                m.iter()
                    .any(|d| !matches!(d.state, MirrorState::Failed { .. }))
            });
        let marker = self.deps.marker.as_ref();
        let generation = super::generation_of(req.fence);
        let grant = |m: &Marker| Grant {
            lease: m.lease(),
            generation,
        };
        let hold = |path| marker.map(|m| m.hold(&req.uuid, &req.peer, grant(m), path));
        let (socket, path) = replicas.peer_socket_for(&req.uuid, hold, !running).await?;
        let start = mirror::start(libvirt, &self.node, &req.uuid, &disks, &socket);
        let mirrors = self.mirror_logged("start-mirror", &req.uuid, start).await?;
        let status = libvirt.status(&req.uuid).await?;
        Ok(pb::DomainStatus {
            mirrors: mirrors.into_iter().map(mirror_to_pb).collect(),
            mirror_path: path,
            ..status_to_pb(status)
        })
    }

    /// Stops the domain's mirrors; the peer's copy falls behind.
    pub(super) async fn stop_mirror(
        &self,
        command: pb::DomainCommand,
    ) -> Result<pb::DomainStatus, Error> {
        let uuid = command.uuid;
        if uuid_invalid(&uuid) {
            return Err(invalid(format!("{uuid:?} is not a UUID")));
        }
        self.admit("stop-mirror", &uuid, command.fence)?;
        let libvirt = &self.deps.libvirt;
        let stop = async {
            mirror::stop(libvirt, &self.node, &uuid)
                .await
                .map(|()| Vec::new())
        };
        self.mirror_logged("stop-mirror", &uuid, stop).await?;
        Ok(status_to_pb(libvirt.status(&uuid).await?))
    }

    /// The mirrors of the running and paused domains among `domains`, read concurrently, and
    /// the disk writes of those with mirrors. A domain whose monitor fails or does not
    /// answer within the budget is logged and left out.
    async fn mirrors_of_running(
        &self,
        domains: &[DomainStatus],
    ) -> BTreeMap<String, (Vec<DiskMirror>, Vec<DiskWrites>)> {
        let mut reads = tokio::task::JoinSet::new();
        let live = domains
            .iter()
            .filter(|d| matches!(d.state, DomainState::Running | DomainState::Paused));
        for d in live {
            let (libvirt, uuid) = (self.deps.libvirt.clone(), d.uuid.clone());
            let node = self.node.clone();
            reads.spawn(async move {
                let status = mirror::status_with_writes(&libvirt, &node, &uuid);
                let read = tokio::time::timeout(MIRROR_STATUS_BUDGET, status).await;
                (uuid, read)
            });
        }
        let mut found = BTreeMap::new();
        while let Some(Ok((uuid, read))) = reads.join_next().await {
            match read {
                Ok(Ok(mirrors)) => {
                    found.insert(uuid, mirrors);
                }
                Ok(Err(e)) => {
                    tracing::warn!(vm = %uuid, node = %self.node, error = %daemon::error_chain(&e), "reading the domain's mirrors failed; listed without them");
                }
                Err(_) => {
                    tracing::warn!(vm = %uuid, node = %self.node, budget_ms = MIRROR_STATUS_BUDGET.as_millis(), "the domain's monitor did not answer in time; listed without mirrors");
                }
            }
        }
        found
    }

    /// Runs a mirror operation between a begin and an end log line sharing vm/node/op fields.
    async fn mirror_logged<F>(
        &self,
        op: &'static str,
        uuid: &str,
        f: F,
    ) -> Result<Vec<DiskMirror>, Error>
    where
        F: Future<Output = Result<Vec<DiskMirror>, mirror::Error>>,
    {
        tracing::info!(vm = %uuid, node = %self.node, op, "mirror op begin");
        let result = f.await;
        match &result {
            Ok(mirrors) => {
                let states: Vec<_> = mirrors.iter().map(|m| (&m.device, &m.state)).collect();
                tracing::info!(vm = %uuid, node = %self.node, op, mirrors = ?states, "mirror op end: ok");
            }
            Err(e) => {
                tracing::warn!(vm = %uuid, node = %self.node, op, error = %daemon::error_chain(e), "mirror op end: failed");
            }
        }
        Ok(result?)
    }
}

/// The disks a mirror request names: volume i is disk i's replica, exported under its name.
fn mirror_disks(volumes: &[pb::VolumeRef]) -> Result<Vec<MirrorDisk>, Error> {
    if volumes.is_empty() {
        return Err(invalid("the request names no volumes"));
    }
    volumes
        .iter()
        .enumerate()
        .map(|(index, v)| {
            if !plain_name(&v.volume) {
                return Err(invalid(format!("{:?} is not a volume name", v.volume)));
            }
            Ok(MirrorDisk {
                device: domain::virtio_disk_name(index),
                export: v.volume.clone(),
                format: disk_format(v.format())?,
            })
        })
        .collect()
}

fn writes_to_pb(w: DiskWrites) -> pb::DiskWrites {
    pb::DiskWrites {
        device: w.device,
        count: w.count,
        total_ns: w.total_ns,
    }
}

fn mirror_to_pb(m: DiskMirror) -> pb::DiskMirror {
    let verifying = m.state == MirrorState::Syncing
        && m.resync
            .as_ref()
            .is_some_and(|r| matches!(r.verify, mirror::Verify::Running { .. }));
    let (state, error) = match m.state {
        MirrorState::Syncing => (pb::MirrorState::Syncing, String::new()),
        MirrorState::Ready => (pb::MirrorState::Ready, String::new()),
        MirrorState::Failed { error } => (pb::MirrorState::Failed, error),
        MirrorState::OnPeer => (pb::MirrorState::OnPeer, String::new()),
    };
    pb::DiskMirror {
        device: m.device,
        export_name: m.export,
        state: state.into(),
        offset: m.offset,
        length: m.length,
        error,
        verifying,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(name: &str) -> pb::VolumeRef {
        pb::VolumeRef {
            storage_group: "sg0".into(),
            volume: name.into(),
            format: pb::VolumeFormat::Raw.into(),
            size_bytes: 16 << 20,
        }
    }

    #[test]
    fn mirror_disks_second_volume_is_vdb() {
        let disks = mirror_disks(&[volume("a.raw"), volume("b.raw")]).unwrap();

        assert_eq!(
            disks[1],
            MirrorDisk {
                device: "vdb".into(),
                export: "b.raw".into(),
                format: domain::DiskFormat::Raw,
            }
        );
    }

    #[test]
    fn mirror_disks_path_in_volume_name_is_invalid() {
        let err = mirror_disks(&[volume("../x")]).unwrap_err();

        assert!(matches!(err, Error::InvalidRequest { .. }), "{err:?}");
    }

    #[test]
    fn mirror_to_pb_syncing_mirror_whose_verify_runs_is_verifying() {
        let mirror = DiskMirror {
            device: "vda".into(),
            export: "a.raw".into(),
            state: MirrorState::Syncing,
            offset: 1,
            length: 2,
            resync: Some(mirror::Resync {
                mode: mirror::ResyncMode::Incremental,
                copied: 65536,
                verify: mirror::Verify::Running { done: 1, total: 2 },
            }),
        };

        assert!(mirror_to_pb(mirror).verifying);
    }

    #[test]
    fn mirror_to_pb_failed_mirror_carries_error() {
        let mirror = DiskMirror {
            device: "vda".into(),
            export: "a.raw".into(),
            state: MirrorState::Failed {
                error: "Input/output error".into(),
            },
            offset: 1,
            length: 2,
            resync: None,
        };

        let pb = mirror_to_pb(mirror);

        assert_eq!(pb.state(), pb::MirrorState::Failed);
        assert_eq!(pb.error, "Input/output error");
    }
}

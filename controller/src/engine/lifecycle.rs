//! The API's mutating requests: validation, placement and records for create and modify, and
//! the events that start, stop and delete a VM. A request with an ID that already applied
//! (a retry) is answered with that first attempt's outcome instead of acting twice.

use tokio::time::Instant;

use super::Modify;
use super::Reply;
use super::actor::{Engine, Entry};
use super::effects::Waiter;
use crate::error::ApiError;
use crate::ha;
use crate::health::HostState;
use crate::model::{Disk, Mode, Nic, VmRecord, VmSpec, VmState};
use crate::placement::{self, Candidate, Inventory};
use crate::store::{RequestRecord, Stored, Tag};
use crate::validate;
use crate::vm::{PROVISION, VmEvent};

impl Engine {
    /// The tag for request `id` doing `op` on VM `vm`.
    pub(super) fn tag(&self, id: Option<String>, op: &str, vm: &str) -> Option<Tag> {
        id.map(|id| Tag {
            id,
            record: RequestRecord {
                op: op.to_string(),
                vm: vm.to_string(),
                snapshot: String::new(),
            },
            lease: self.request_lease.0,
        })
    }

    /// Remembers that the request of `tag` applied (its record is in etcd with it).
    pub(super) fn remember(&mut self, tag: Tag) {
        self.requests.insert(tag.id, (tag.record, Instant::now()));
    }

    /// The VM a request with ID `id` already acted on, if it did.
    fn replayed(&self, id: Option<&str>, op: &str) -> Option<String> {
        let (record, _) = self.requests.get(id?)?;
        (record.op == op).then(|| record.vm.clone())
    }

    /// Waits (through `waiter`) for a VM a retried request already acted on.
    fn rewait(&mut self, uuid: &str, waiter: Waiter) {
        tracing::info!(vm = %uuid, "request retried: answering with the first attempt's outcome");
        self.waiters
            .entry(uuid.to_string())
            .or_default()
            .push(waiter);
        self.settle(uuid);
    }

    pub(super) async fn create(
        &mut self,
        spec: VmSpec,
        request: Option<String>,
        reply: Reply<VmRecord>,
    ) {
        if let Some(uuid) = self.replayed(request.as_deref(), "create") {
            self.rewait(&uuid, Waiter::Created(reply));
            return;
        }
        let record = match self.admit(spec) {
            Ok(record) => record,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let uuid = record.uuid.clone();
        let tag = self.tag(request, "create", &uuid);
        tracing::info!(vm = %record.name, uuid = %uuid, node = %record.node, mode = record.mode.as_str(), "create begin");
        match self.ctx.writer.create_vm(&record, tag.as_ref()).await {
            Ok(revision) => {
                let stored = Stored {
                    value: record,
                    revision,
                    key: String::new(),
                };
                self.vms.insert(uuid.clone(), Entry::new(stored));
            }
            Err(e) => {
                let err = self.after_store_error(&uuid, e).await;
                // Unless an attempt applied after all (the re-read shows it), the create failed.
                if !self.vms.get(&uuid).is_some_and(|e| e.record == record) {
                    tracing::warn!(vm = %uuid, error = %err, "create end: failed");
                    let _ = reply.send(Err(err));
                    return;
                }
            }
        }
        if let Some(tag) = tag {
            self.remember(tag);
        }
        self.waiters
            .entry(uuid.clone())
            .or_default()
            .push(Waiter::Created(reply));
        self.queue(&uuid, PROVISION.to_vec());
    }

    /// Validates `spec`, checks capacity and chooses a node: the new VM's record.
    pub(super) fn admit(&self, mut spec: VmSpec) -> Result<VmRecord, ApiError> {
        crate::isos::resolve_boot(&mut spec.boot, &self.isos)?;
        let inventory = self.inventory()?;
        validate::spec(&spec, &inventory)?;
        if self.vms.values().any(|e| e.record.name == spec.name) {
            return Err(ApiError::AlreadyExists { name: spec.name });
        }
        placement::check(
            &self.ctx.policy,
            &inventory,
            self.vms.values().map(|e| &e.record),
            &Candidate {
                mode: spec.mode,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                new_disks: &spec.disks,
            },
        )?;
        let all: Vec<&VmRecord> = self.vms.values().map(|e| &e.record).collect();
        let node = placement::choose_node(&self.usable(&inventory), &all).ok_or_else(|| {
            ApiError::Unavailable(
                "no node is up with its agent answering, so the VM has nowhere to go; retry when a node is up"
                    .into(),
            )
        })?;
        Ok(new_record(spec, node, crate::now_unix_ms()))
    }

    /// The nodes of `inventory` where a VM can go now: registered, healthy, agent answering.
    pub(super) fn usable(&self, inventory: &Inventory) -> Inventory {
        Inventory {
            nodes: inventory
                .nodes
                .iter()
                .filter(|n| {
                    let healthy = self
                        .hosts
                        .get(&n.name)
                        .is_none_or(|h| h.state == HostState::Up);
                    // Before the first poll (just after a takeover) the registration decides.
                    let answering = self
                        .last_health
                        .as_ref()
                        .is_none_or(|p| p.answered(&n.name));
                    healthy && answering && self.registered.contains_key(&n.name)
                })
                .cloned()
                .collect(),
        }
    }

    pub(super) async fn start_vm(
        &mut self,
        vm: &str,
        request: Option<String>,
        reply: Reply<VmRecord>,
    ) {
        if let Err(e) = self.find(vm).and_then(|uuid| self.snapshot_busy(&uuid)) {
            return refuse(Waiter::Running(reply), e);
        }
        if let Err(e) = self.home_on_current_copy(vm).await {
            return refuse(Waiter::Running(reply), e);
        }
        self.request(vm, request, "start", VmEvent::Start, Waiter::Running(reply))
            .await;
    }

    /// Moves a stopped protected VM's home to the peer when only the peer's copy is current
    /// (see [`ha::start_host`]), so that its start goes where every acknowledged write is.
    async fn home_on_current_copy(&mut self, vm: &str) -> Result<(), ApiError> {
        let Ok(uuid) = self.find(vm) else {
            // The request itself reports the unknown VM.
            return Ok(());
        };
        let entry = &self.vms[&uuid];
        let record = &entry.record;
        if record.state != VmState::Stopped || record.mode == Mode::Unprotected {
            return Ok(());
        }
        let node = record.node.clone();
        let peer = self.peer_of(&node);
        let target = ha::start_host(
            &record.protection,
            &node,
            self.marked_behind(record, &node),
            peer.as_deref()
                .map(|p| (p, self.node_usable(p), self.marked_behind(record, p))),
        );
        let Some(to) = target.filter(|t| *t != node) else {
            return Ok(());
        };
        let mut moved = record.clone();
        moved.node = to.to_string();
        moved.updated_unix_ms = crate::now_unix_ms();
        match self
            .ctx
            .writer
            .update_vm(&moved, entry.revision, None)
            .await
        {
            Ok(revision) => {
                tracing::info!(vm = %moved.name, node = %node, to = %moved.node, "VM's home moved: its disks are current only on {}, so it starts there", moved.node);
                if let Some(entry) = self.vms.get_mut(&uuid) {
                    entry.record = moved;
                    entry.revision = revision;
                }
                Ok(())
            }
            Err(e) => Err(self.after_store_error(&uuid, e).await),
        }
    }

    /// Shuts down or powers off a VM; `reply` is answered once it is stopped.
    pub(super) async fn stop_vm(
        &mut self,
        vm: &str,
        event: VmEvent,
        request: Option<String>,
        reply: Reply<VmRecord>,
    ) {
        let op = if event == VmEvent::PowerOff {
            "power-off"
        } else {
            "shutdown"
        };
        self.request(vm, request, op, event, Waiter::Stopped(reply))
            .await;
    }

    pub(super) async fn delete(&mut self, vm: &str, request: Option<String>, reply: Reply<String>) {
        if let Err(e) = self.find(vm).and_then(|uuid| self.snapshot_busy(&uuid)) {
            return refuse(Waiter::Deleted(reply), e);
        }
        self.request(
            vm,
            request,
            "delete",
            VmEvent::Delete,
            Waiter::Deleted(reply),
        )
        .await;
    }

    /// Applies an API event to a VM and waits for its outcome through `waiter`.
    async fn request(
        &mut self,
        vm: &str,
        request: Option<String>,
        op: &str,
        event: VmEvent,
        waiter: Waiter,
    ) {
        if let Some(uuid) = self.replayed(request.as_deref(), op) {
            self.rewait(&uuid, waiter);
            return;
        }
        let uuid = match self.find(vm) {
            Ok(uuid) => uuid,
            Err(e) => return refuse(waiter, e),
        };
        let tag = self.tag(request, op, &uuid);
        // A refused request answers only its own caller; others wait on.
        match self.drive(&uuid, event, tag).await {
            Ok(()) => {
                self.waiters.entry(uuid.clone()).or_default().push(waiter);
                self.settle(&uuid);
            }
            Err(e) => refuse(waiter, e),
        }
    }

    pub(super) async fn modify(
        &mut self,
        vm: &str,
        change: Modify,
        request: Option<String>,
    ) -> Result<VmRecord, ApiError> {
        if let Some(uuid) = self.replayed(request.as_deref(), "modify") {
            return self
                .vms
                .get(&uuid)
                .map(|e| e.record.clone())
                .ok_or_else(|| ApiError::NotFound { vm: vm.into() });
        }
        let uuid = self.find(vm)?;
        self.snapshot_busy(&uuid)?;
        let entry = &self.vms[&uuid];
        let mut record = entry.record.clone();
        if record.state != VmState::Stopped {
            return Err(ApiError::FailedPrecondition(format!(
                "VM {} is {}; its mode, vCPUs and memory change only while it is stopped: shut it down first",
                record.name,
                record.state.name()
            )));
        }
        record.mode = change.mode.unwrap_or(record.mode);
        record.vcpus = change.vcpus.unwrap_or(record.vcpus);
        record.memory_mib = change.memory_mib.unwrap_or(record.memory_mib);
        validate::size(record.vcpus, record.memory_mib)?;
        validate::protected_formats(record.mode, record.disks.iter().map(|d| d.format))?;
        let inventory = self.inventory()?;
        placement::check(
            &self.ctx.policy,
            &inventory,
            self.vms
                .values()
                .filter(|e| e.record.uuid != uuid)
                .map(|e| &e.record),
            &Candidate {
                mode: record.mode,
                vcpus: record.vcpus,
                memory_mib: record.memory_mib,
                new_disks: &[],
            },
        )?;
        record.updated_unix_ms = crate::now_unix_ms();
        let tag = self.tag(request, "modify", &uuid);
        let revision = match self
            .ctx
            .writer
            .update_vm(&record, entry.revision, tag.as_ref())
            .await
        {
            Ok(revision) => revision,
            Err(e) => return Err(self.after_store_error(&uuid, e).await),
        };
        if let Some(tag) = tag {
            self.remember(tag);
        }
        tracing::info!(vm = %record.name, mode = record.mode.as_str(), vcpus = record.vcpus, memory_mib = record.memory_mib, "VM modified");
        let entry = self
            .vms
            .get_mut(&uuid)
            .ok_or_else(|| ApiError::NotFound { vm: vm.into() })?;
        entry.record = record.clone();
        entry.revision = revision;
        entry.last_command = Instant::now();
        Ok(record)
    }
}

/// Answers `waiter` with `error` at once.
fn refuse(waiter: Waiter, error: ApiError) {
    match waiter {
        Waiter::Running(r) | Waiter::Stopped(r) | Waiter::Created(r) => {
            let _ = r.send(Err(error));
        }
        Waiter::Deleted(r) => {
            let _ = r.send(Err(error));
        }
    }
}

/// A new VM record: fresh UUID, volume names and MACs, generation 1, in state `Creating` on
/// `node`.
fn new_record(spec: VmSpec, node: String, now_unix_ms: i64) -> VmRecord {
    let uuid = uuid::Uuid::new_v4().to_string();
    let disks = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| Disk {
            size_bytes: d.size_bytes,
            storage_group: d.storage_group.clone(),
            format: d.format,
            volume: format!("{uuid}-disk{i}.{}", d.format.extension()),
        })
        .collect();
    let nics = spec
        .networks
        .iter()
        .map(|network| Nic {
            network: network.clone(),
            mac: random_mac(),
        })
        .collect();
    VmRecord {
        uuid,
        name: spec.name,
        mode: spec.mode,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        disks,
        nics,
        boot: spec.boot,
        node,
        generation: 1,
        state: VmState::Creating,
        state_reason: "creating".into(),
        created_unix_ms: now_unix_ms,
        updated_unix_ms: now_unix_ms,
        protection: crate::ha::Protection::default(),
        snapshots: Vec::new(),
        next_snapshot: 1,
    }
}

/// A random locally administered MAC in QEMU's 52:54:00 range.
fn random_mac() -> String {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        bytes[0], bytes[1], bytes[2]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Boot, DiskFormat, DiskRequest, Mode};

    fn spec() -> VmSpec {
        VmSpec {
            name: "web".into(),
            mode: Mode::Ha,
            vcpus: 1,
            memory_mib: 256,
            disks: vec![
                DiskRequest {
                    size_bytes: 1 << 20,
                    storage_group: "sg0".into(),
                    format: DiskFormat::Raw,
                },
                DiskRequest {
                    size_bytes: 2 << 20,
                    storage_group: "sg0".into(),
                    format: DiskFormat::Qcow2,
                },
            ],
            networks: vec!["business".into()],
            boot: Boot::Kernel {
                image: "tiny".into(),
            },
        }
    }

    #[test]
    fn new_record_names_volumes_after_uuid_and_index() {
        let record = new_record(spec(), "n0".into(), 7);

        assert_eq!(
            record.disks[1].volume,
            format!("{}-disk1.qcow2", record.uuid)
        );
        assert_eq!(record.state, VmState::Creating);
    }

    #[test]
    fn new_record_gives_each_nic_a_qemu_mac() {
        let record = new_record(spec(), "n0".into(), 7);

        assert!(record.nics[0].mac.starts_with("52:54:00:"));
        assert_eq!(record.nics[0].mac.len(), 17);
    }

    #[test]
    fn new_record_starts_at_generation_one() {
        let record = new_record(spec(), "n0".into(), 7);

        assert_eq!(record.generation, 1);
    }
}

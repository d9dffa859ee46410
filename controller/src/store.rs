//! The pair's state in etcd.
//!
//! Keys (values are JSON):
//! - `/pairvisor/vms/<uuid>`   → [`VmRecord`]
//! - `/pairvisor/names/<name>` → the UUID owning the name (names are unique by construction)
//! - `/pairvisor/owners/<uuid>` → the VM's ownership generation, written with every write of its
//!   record (stale marks are conditional on it, see `daemon::pair::OWNERS`)
//! - `/pairvisor/nodes/<name>` → [`NodeRecord`], written by the host's agent, bound to its
//!   host lease (see `daemon::pair`); `/pairvisor/members/<name>` keeps it while the host is down
//! - `/pairvisor/controllers/<name>` → [`ControllerRecord`], bound to that controller's lease
//! - `/pairvisor/requests/<id>` → [`RequestRecord`]: a mutating API request that applied,
//!   written in the same transaction as its first change, expiring after minutes
//! - `/pairvisor/alerts/<id>`  → [`Alert`]: an open alert (a path down, a host lost, a domain
//!   running outside the API); deleted when cleared
//! - `/pairvisor/isos/<name>`  → [`IsoRecord`]: an ISO of the library
//! - `/pairvisor/config/health` → the host-health timeouts ([`crate::health::Config`])
//! - `/pairvisor/serving/…`    → etcd election of the serving controller ([`ELECTION`])
//! - `/pairvisor/leader`       → who serves, with its term (`daemon::pair::LeaderInfo`)
//!
//! Only the serving controller writes VM, request, alert and config keys, through a
//! [`Writer`]: every write is a transaction that also requires the writer's election key to
//! still exist with its creation revision, so a controller that lost its lease can no longer
//! change anything (fencing).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

pub use daemon::etcd::Etcd;
use daemon::pair::{self, StaleMark, encode};
pub use daemon::pair::{LEADER, MEMBERS, NODES, PREFIX, member_key, node_key};

use crate::health;
use crate::model::{IsoRecord, NodeRecord, VmRecord};

/// Prefix of VM records.
pub const VMS: &str = "/pairvisor/vms/";
/// Prefix of name reservations.
pub const NAMES: &str = "/pairvisor/names/";
/// Prefix of controller registrations.
pub const CONTROLLERS: &str = "/pairvisor/controllers/";
/// Prefix of applied requests.
pub const REQUESTS: &str = "/pairvisor/requests/";
/// Prefix of open alerts.
pub const ALERTS: &str = "/pairvisor/alerts/";
/// Prefix of the ISO library's records.
pub const ISOS: &str = "/pairvisor/isos/";
/// The host-health configuration.
pub const HEALTH_CONFIG: &str = "/pairvisor/config/health";
/// Name of the serving-controller election.
pub const ELECTION: &str = "/pairvisor/serving";

pub use daemon::etcd::REQUEST_TIMEOUT;
/// How long a request may keep trying members: losing one and re-electing etcd's leader
/// takes a few seconds.
pub const REQUEST_BUDGET: Duration = Duration::from_secs(8);

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key changed since it was read: another writer was faster.
    #[error("{key} changed concurrently")]
    Conflict {
        /// The key.
        key: String,
    },
    /// A stored value is not the JSON we expect.
    #[error("decoding {key}")]
    Decode {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The cluster did not answer.
    #[error("the pair's state store")]
    Etcd(#[from] daemon::etcd::Error),
    /// The name is taken.
    #[error("the name {name} is taken")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// This controller is no longer the serving one; it must not write.
    #[error("this controller lost its serving role")]
    NotLeader,
}

/// The write of `vm`'s owner generation that goes with every write of its record.
fn owner_put(vm: &VmRecord) -> TxnOp {
    TxnOp::put(
        pair::owner_key(&vm.uuid),
        pair::owner_value(vm.generation),
        None,
    )
}

/// Key of a VM record.
pub fn vm_key(uuid: &str) -> String {
    format!("{VMS}{uuid}")
}

/// Key of a name reservation.
pub fn name_key(name: &str) -> String {
    format!("{NAMES}{name}")
}

/// Key of a controller registration.
pub fn controller_key(name: &str) -> String {
    format!("{CONTROLLERS}{name}")
}

/// Key of an applied request.
pub fn request_key(id: &str) -> String {
    format!("{REQUESTS}{id}")
}

/// Key of an alert.
pub fn alert_key(id: &str) -> String {
    format!("{ALERTS}{id}")
}

/// Key of an ISO record.
pub fn iso_key(name: &str) -> String {
    format!("{ISOS}{name}")
}

/// A controller as it registers itself, bound to its lease: present while it lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerRecord {
    /// Node name.
    pub name: String,
    /// Its API address.
    pub api_address: String,
}

/// A mutating API request that applied: a retry with the same ID returns its outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The API method, e.g. "create".
    pub op: String,
    /// The VM it acted on.
    pub vm: String,
    /// The snapshot it took, for a snapshot's creation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snapshot: String,
}

/// An open alert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Stable ID, e.g. `path/n1/alink1` or `unknown-domain/n0/<uuid>`: raising it again is a no-op.
    pub id: String,
    /// The node it concerns, if any.
    pub node: String,
    /// The VM it concerns, if any.
    pub vm: String,
    /// What is wrong and what to do, in words.
    pub message: String,
    /// When it was raised.
    pub raised_unix_ms: i64,
    /// Who cleared it while its cause stays (empty: open).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cleared_by: String,
}

impl Alert {
    /// Whether it is open: raised and not cleared by an admin.
    pub fn open(&self) -> bool {
        self.cleared_by.is_empty()
    }
}

/// A request's tag for the transaction that applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag {
    /// The request ID (from the `x-pairvisor-request-id` header).
    pub id: String,
    /// What it did.
    pub record: RequestRecord,
    /// The lease its record expires with.
    pub lease: i64,
}

/// A value with the revision it was last written at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored<T> {
    /// The value.
    pub value: T,
    /// etcd's mod_revision of the key.
    pub revision: i64,
    /// The key.
    pub key: String,
}

/// Every VM record.
pub async fn load_vms(etcd: &Etcd) -> Result<Vec<Stored<VmRecord>>, Error> {
    load_prefix(etcd, VMS).await
}

/// The VM record of `uuid`, if it exists.
pub async fn load_vm(etcd: &Etcd, uuid: &str) -> Result<Option<Stored<VmRecord>>, Error> {
    get(etcd, &vm_key(uuid))
        .await?
        .map(|kv| decode(&kv))
        .transpose()
}

/// Every live host registration (its agent's lease holds).
pub async fn load_nodes(etcd: &Etcd) -> Result<Vec<Stored<NodeRecord>>, Error> {
    load_prefix(etcd, NODES).await
}

/// The live registration of host `name`, if its agent's lease holds.
pub async fn find_node(etcd: &Etcd, name: &str) -> Result<Option<NodeRecord>, Error> {
    get(etcd, &node_key(name))
        .await?
        .map(|kv| decode(&kv).map(|s| s.value))
        .transpose()
}

/// Every member of the pair, with its last known facts (live or not).
pub async fn load_members(etcd: &Etcd) -> Result<Vec<NodeRecord>, Error> {
    Ok(load_prefix(etcd, MEMBERS)
        .await?
        .into_iter()
        .map(|s: Stored<NodeRecord>| s.value)
        .collect())
}

/// Every live controller registration.
pub async fn load_controllers(etcd: &Etcd) -> Result<Vec<ControllerRecord>, Error> {
    Ok(load_prefix(etcd, CONTROLLERS)
        .await?
        .into_iter()
        .map(|s: Stored<ControllerRecord>| s.value)
        .collect())
}

/// Every applied request still remembered, by ID.
pub async fn load_requests(etcd: &Etcd) -> Result<Vec<(String, RequestRecord)>, Error> {
    Ok(load_prefix(etcd, REQUESTS)
        .await?
        .into_iter()
        .map(|s: Stored<RequestRecord>| (s.key[REQUESTS.len()..].to_string(), s.value))
        .collect())
}

/// Every open alert.
pub async fn load_alerts(etcd: &Etcd) -> Result<Vec<Alert>, Error> {
    Ok(load_prefix(etcd, ALERTS)
        .await?
        .into_iter()
        .map(|s: Stored<Alert>| s.value)
        .collect())
}

/// Every ISO of the library.
pub async fn load_isos(etcd: &Etcd) -> Result<Vec<IsoRecord>, Error> {
    Ok(load_prefix(etcd, ISOS)
        .await?
        .into_iter()
        .map(|s: Stored<IsoRecord>| s.value)
        .collect())
}

/// The host-health configuration (the defaults until an admin changes it).
pub async fn load_health_config(etcd: &Etcd) -> Result<health::Config, Error> {
    Ok(get(etcd, HEALTH_CONFIG)
        .await?
        .map(|kv| decode(&kv).map(|s| s.value))
        .transpose()?
        .unwrap_or_default())
}

/// Registers this controller under `lease` (its API address, for node-info and forwarding).
pub async fn put_controller(
    etcd: &Etcd,
    record: &ControllerRecord,
    lease: i64,
) -> Result<(), Error> {
    let key = controller_key(&record.name);
    let value = encode(record);
    etcd.request("registering controller", REQUEST_BUDGET, |mut c| {
        let (key, value) = (key.clone(), value.clone());
        async move {
            c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
        }
    })
    .await?;
    Ok(())
}

/// The raw value of `key`, if it exists.
async fn get(etcd: &Etcd, key: &str) -> Result<Option<etcd_client::KeyValue>, Error> {
    let resp = etcd
        .request("reading a key", REQUEST_BUDGET, |mut c| {
            let key = key.to_string();
            async move { c.get(key, None).await }
        })
        .await?;
    Ok(resp.kvs().first().cloned())
}

/// The VM named by `vm`, which is a name or a UUID.
pub async fn find_vm(etcd: &Etcd, vm: &str) -> Result<Option<VmRecord>, Error> {
    if let Some(kv) = get(etcd, &vm_key(vm)).await? {
        return decode(&kv).map(|s| Some(s.value));
    }
    let Some(name) = get(etcd, &name_key(vm)).await? else {
        return Ok(None);
    };
    let uuid = String::from_utf8_lossy(name.value()).into_owned();
    get(etcd, &vm_key(&uuid))
        .await?
        .map(|kv| decode(&kv).map(|s| s.value))
        .transpose()
}

async fn load_prefix<T: serde::de::DeserializeOwned>(
    etcd: &Etcd,
    prefix: &str,
) -> Result<Vec<Stored<T>>, Error> {
    Ok(load_prefix_at(etcd, prefix).await?.0)
}

/// Every record under `prefix`, and the store revision they were read at (watch from the
/// next one to miss nothing).
pub async fn load_prefix_at<T: serde::de::DeserializeOwned>(
    etcd: &Etcd,
    prefix: &str,
) -> Result<(Vec<Stored<T>>, i64), Error> {
    let resp = etcd
        .request("loading state", REQUEST_BUDGET, |mut c| {
            let prefix = prefix.to_string();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    // One record that does not decode (say, written by a newer version) must not take the
    // whole pair's state with it: skip it, loudly.
    let records = resp
        .kvs()
        .iter()
        .filter_map(|kv| match decode(kv) {
            Ok(stored) => Some(stored),
            Err(e) => {
                tracing::error!(error = %crate::error::chain(&e), "skipping a stored record that does not decode");
                None
            }
        })
        .collect();
    Ok((records, revision))
}

/// The UUIDs of the VMs that have an owner generation key (one read).
pub async fn load_owners(etcd: &Etcd) -> Result<BTreeSet<String>, Error> {
    let (owners, _) = load_prefix_at::<u64>(etcd, pair::OWNERS).await?;
    Ok(owners
        .into_iter()
        .filter_map(|o| o.key.strip_prefix(pair::OWNERS).map(str::to_string))
        .collect())
}

/// Decodes a JSON value with its revision.
pub fn decode<T: serde::de::DeserializeOwned>(
    kv: &etcd_client::KeyValue,
) -> Result<Stored<T>, Error> {
    let value = serde_json::from_slice(kv.value()).map_err(|source| Error::Decode {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        source,
    })?;
    Ok(Stored {
        value,
        revision: kv.mod_revision(),
        key: String::from_utf8_lossy(kv.key()).into_owned(),
    })
}

/// How a fenced transaction ended.
enum Outcome {
    /// It applied, at this revision.
    Committed(i64),
    /// Its data compare failed; `retried` says whether an earlier attempt may have applied.
    CompareFailed {
        /// More than one attempt was made.
        retried: bool,
    },
}

/// A VM's stale mark as the engine last read it, for a write that depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkGuard {
    /// The mark's mod revision when read (0: there was none).
    pub mod_revision: i64,
    /// Whether the write removes the mark (it is obsolete).
    pub remove: bool,
}

/// Every VM's stale mark, with its mod revision.
pub async fn load_marks(etcd: &Etcd) -> Result<BTreeMap<String, (StaleMark, i64)>, Error> {
    let (marks, _) = load_prefix_at::<StaleMark>(etcd, pair::STALE).await?;
    Ok(marks
        .into_iter()
        .map(|stored| {
            let vm = stored.key.trim_start_matches(pair::STALE).to_string();
            (vm, (stored.value, stored.revision))
        })
        .collect())
}

/// The serving controller's fenced writes: each commits only while its election key lives.
#[derive(Clone, Debug)]
pub struct Writer {
    etcd: Etcd,
    leader_key: Vec<u8>,
    leader_revision: i64,
}

impl Writer {
    /// A writer fenced by the election key `leader_key` created at `leader_revision`.
    pub fn new(etcd: Etcd, leader_key: Vec<u8>, leader_revision: i64) -> Writer {
        Writer {
            etcd,
            leader_key,
            leader_revision,
        }
    }

    /// The term this writer serves: its election key's creation revision. Agents refuse
    /// commands of older terms.
    pub fn term(&self) -> i64 {
        self.leader_revision
    }

    fn still_leader(&self) -> Compare {
        Compare::create_revision(
            self.leader_key.clone(),
            CompareOp::Equal,
            self.leader_revision,
        )
    }

    fn txn(&self, compares: Vec<Compare>, mut ops: Vec<TxnOp>, tag: Option<&Tag>) -> Txn {
        let mut all = vec![self.still_leader()];
        all.extend(compares);
        if let Some(tag) = tag {
            ops.push(TxnOp::put(
                request_key(&tag.id),
                encode(&tag.record),
                Some(PutOptions::new().with_lease(tag.lease)),
            ));
        }
        Txn::new()
            .when(all)
            .and_then(ops)
            .or_else([TxnOp::get(self.leader_key.clone(), None)])
    }

    /// Records that this controller serves, where its API is and its term.
    pub async fn announce(&self, leader: &impl serde::Serialize) -> Result<(), Error> {
        let value = encode(leader);
        let outcome = self
            .commit("announcing the serving controller", || {
                self.txn(vec![], vec![TxnOp::put(LEADER, value.clone(), None)], None)
            })
            .await?;
        match outcome {
            Outcome::Committed(_) => Ok(()),
            Outcome::CompareFailed { .. } => Err(Error::NotLeader),
        }
    }

    /// Writes `vm`'s owner generation key unless it exists: records written before the pair
    /// kept the key (an upgrade) get it when a controller takes over, so the stale marks of
    /// their mirrors, conditional on it, can land.
    pub async fn claim_owner(&self, vm: &VmRecord) -> Result<(), Error> {
        let key = pair::owner_key(&vm.uuid);
        let outcome = self
            .commit("writing a VM's owner generation", || {
                self.txn(
                    vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
                    vec![owner_put(vm)],
                    None,
                )
            })
            .await?;
        // A key that exists already (the usual case) fails the compare: nothing to do.
        match outcome {
            Outcome::Committed(_) | Outcome::CompareFailed { .. } => Ok(()),
        }
    }

    /// Stores a new VM and reserves its name; fails if the name or UUID exists.
    pub async fn create_vm(&self, vm: &VmRecord, tag: Option<&Tag>) -> Result<i64, Error> {
        let key = vm_key(&vm.uuid);
        let name = name_key(&vm.name);
        let value = encode(vm);
        let outcome = self
            .commit("creating VM", || {
                self.txn(
                    vec![
                        Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                        Compare::create_revision(name.clone(), CompareOp::Equal, 0),
                    ],
                    vec![
                        TxnOp::put(key.clone(), value.clone(), None),
                        TxnOp::put(name.clone(), vm.uuid.clone(), None),
                        owner_put(vm),
                    ],
                    tag,
                )
            })
            .await?;
        self.resolve(outcome, &key, Some(&value))
            .await?
            .ok_or_else(|| Error::NameTaken {
                name: vm.name.clone(),
            })
    }

    /// Replaces a VM record last read at `revision`; returns the new revision.
    pub async fn update_vm(
        &self,
        vm: &VmRecord,
        revision: i64,
        tag: Option<&Tag>,
    ) -> Result<i64, Error> {
        self.update_vm_marked(vm, revision, tag, None).await
    }

    /// [`Writer::update_vm`] that commits only if the VM's stale mark is as `mark` saw it,
    /// and removes it if `mark` says so.
    pub async fn update_vm_marked(
        &self,
        vm: &VmRecord,
        revision: i64,
        tag: Option<&Tag>,
        mark: Option<&MarkGuard>,
    ) -> Result<i64, Error> {
        let key = vm_key(&vm.uuid);
        let value = encode(vm);
        let mut compares = vec![Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            revision,
        )];
        let mut ops = vec![TxnOp::put(key.clone(), value.clone(), None), owner_put(vm)];
        if let Some(mark) = mark {
            let mark_key = pair::stale_key(&vm.uuid);
            compares.push(Compare::mod_revision(
                mark_key.clone(),
                CompareOp::Equal,
                mark.mod_revision,
            ));
            if mark.remove {
                ops.push(TxnOp::delete(mark_key, None));
            }
        }
        let outcome = self
            .commit("updating VM", || {
                self.txn(compares.clone(), ops.clone(), tag)
            })
            .await?;
        self.resolve(outcome, &key, Some(&value))
            .await?
            .ok_or(Error::Conflict { key })
    }

    /// Removes a VM record last read at `revision`, and its name.
    pub async fn remove_vm(&self, vm: &VmRecord, revision: i64) -> Result<(), Error> {
        let key = vm_key(&vm.uuid);
        let outcome = self
            .commit("removing VM", || {
                self.txn(
                    vec![Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        revision,
                    )],
                    vec![
                        TxnOp::delete(key.clone(), None),
                        TxnOp::delete(name_key(&vm.name), None),
                        TxnOp::delete(pair::stale_key(&vm.uuid), None),
                        TxnOp::delete(pair::owner_key(&vm.uuid), None),
                    ],
                    None,
                )
            })
            .await?;
        self.resolve(outcome, &key, None)
            .await?
            .map(|_| ())
            .ok_or(Error::Conflict { key })
    }

    /// Raises `alert` (replacing an open one of the same ID).
    pub async fn raise_alert(&self, alert: &Alert) -> Result<(), Error> {
        let value = encode(alert);
        let key = alert_key(&alert.id);
        self.write("raising an alert", || {
            self.txn(
                vec![],
                vec![TxnOp::put(key.clone(), value.clone(), None)],
                None,
            )
        })
        .await
    }

    /// Clears the alert `id` (a missing one is fine).
    pub async fn clear_alert(&self, id: &str) -> Result<(), Error> {
        let key = alert_key(id);
        self.write("clearing an alert", || {
            self.txn(vec![], vec![TxnOp::delete(key.clone(), None)], None)
        })
        .await
    }

    /// Stores a new ISO record; fails with [`Error::NameTaken`] if one of that name exists.
    pub async fn create_iso(&self, iso: &IsoRecord) -> Result<(), Error> {
        let key = iso_key(&iso.name);
        let value = encode(iso);
        let outcome = self
            .commit("adding an ISO", || {
                self.txn(
                    vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
                    vec![TxnOp::put(key.clone(), value.clone(), None)],
                    None,
                )
            })
            .await?;
        self.resolve(outcome, &key, Some(&value))
            .await?
            .map(drop)
            .ok_or_else(|| Error::NameTaken {
                name: iso.name.clone(),
            })
    }

    /// Replaces an ISO record (the engine is its only writer).
    pub async fn put_iso(&self, iso: &IsoRecord) -> Result<(), Error> {
        let key = iso_key(&iso.name);
        let value = encode(iso);
        self.write("updating an ISO", || {
            self.txn(
                vec![],
                vec![TxnOp::put(key.clone(), value.clone(), None)],
                None,
            )
        })
        .await
    }

    /// Removes an ISO record.
    pub async fn remove_iso(&self, name: &str) -> Result<(), Error> {
        let key = iso_key(name);
        self.write("removing an ISO", || {
            self.txn(vec![], vec![TxnOp::delete(key.clone(), None)], None)
        })
        .await
    }

    /// Stores the host-health configuration.
    pub async fn put_health_config(&self, config: &health::Config) -> Result<(), Error> {
        let value = encode(config);
        self.write("changing the health configuration", || {
            self.txn(
                vec![],
                vec![TxnOp::put(HEALTH_CONFIG, value.clone(), None)],
                None,
            )
        })
        .await
    }

    /// Commits an unconditional (but fenced) write; idempotent, so a retry is harmless.
    async fn write(&self, op: &'static str, txn: impl Fn() -> Txn) -> Result<(), Error> {
        match self.commit(op, txn).await? {
            Outcome::Committed(_) => Ok(()),
            Outcome::CompareFailed { .. } => Err(Error::NotLeader),
        }
    }

    /// The revision our write of `key` applied at, if it did: committed now, or — after a
    /// failed compare following an uncertain attempt — found in place (`expected`, or the key
    /// gone for `None`). `None` means another writer got there first.
    async fn resolve(
        &self,
        outcome: Outcome,
        key: &str,
        expected: Option<&[u8]>,
    ) -> Result<Option<i64>, Error> {
        match outcome {
            Outcome::Committed(revision) => return Ok(Some(revision)),
            Outcome::CompareFailed { retried: false } => return Ok(None),
            Outcome::CompareFailed { retried: true } => {}
        }
        let current = get(&self.etcd, key).await?;
        Ok(match (current, expected) {
            (Some(kv), Some(value)) if kv.value() == value => Some(kv.mod_revision()),
            (None, None) => Some(0),
            _ => None,
        })
    }

    /// Commits the transaction built by `txn`, trying other members on failure.
    async fn commit(&self, op: &'static str, txn: impl Fn() -> Txn) -> Result<Outcome, Error> {
        let attempts = AtomicUsize::new(0);
        let resp = self
            .etcd
            .request(op, REQUEST_BUDGET, |mut c| {
                attempts.fetch_add(1, Ordering::Relaxed);
                let txn = txn();
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            return Ok(Outcome::Committed(revision));
        }
        let leader_alive = resp.op_responses().iter().any(|r| match r {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == self.leader_revision),
            _ => false,
        });
        if !leader_alive {
            return Err(Error::NotLeader);
        }
        Ok(Outcome::CompareFailed {
            retried: attempts.load(Ordering::Relaxed) > 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alert_stored_before_clearing_existed_reads_as_open_and_stays_compact() {
        let stored = r#"{"id":"host/n1","node":"n1","vm":"","message":"lost","raised_unix_ms":5}"#;
        let alert: Alert = serde_json::from_str(stored).unwrap();
        assert!(alert.open());
        assert_eq!(serde_json::to_string(&alert).unwrap(), stored);
        let cleared = Alert {
            cleared_by: "admin".into(),
            ..alert
        };
        assert!(!cleared.open());
        let again: Alert = serde_json::from_str(&serde_json::to_string(&cleared).unwrap()).unwrap();
        assert_eq!(again, cleared);
    }
}

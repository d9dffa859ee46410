//! The pair's state in etcd.
//!
//! Keys (values are JSON):
//! - `/pairvisor/vms/<uuid>`   → [`VmRecord`]
//! - `/pairvisor/names/<name>` → the UUID owning the name (names are unique by construction)
//! - `/pairvisor/nodes/<name>` → [`NodeRecord`], bound to that node controller's lease
//! - `/pairvisor/members/<name>` → the same record without a lease: the pair's nodes and their
//!   last known facts, kept while a node is down so capacity still counts the smaller node
//! - `/pairvisor/serving/…`    → etcd election of the serving controller ([`ELECTION`])
//!
//! Only the serving controller writes VM keys, through a [`Writer`]: every write is a
//! transaction that also requires the writer's election key to still exist with its creation
//! revision, so a controller that lost its lease can no longer change anything (fencing).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

pub use crate::etcd::Etcd;
use crate::model::{NodeRecord, VmRecord};

/// Prefix of every key Pairvisor owns.
pub const PREFIX: &str = "/pairvisor/";
/// Prefix of VM records.
pub const VMS: &str = "/pairvisor/vms/";
/// Prefix of name reservations.
pub const NAMES: &str = "/pairvisor/names/";
/// Prefix of node registrations.
pub const NODES: &str = "/pairvisor/nodes/";
/// Prefix of the pair's members (node records without a lease).
pub const MEMBERS: &str = "/pairvisor/members/";
/// Name of the serving-controller election.
pub const ELECTION: &str = "/pairvisor/serving";
/// Who serves now: written by the elected controller once it has taken over.
pub const LEADER: &str = "/pairvisor/leader";

/// How long one attempt on one member may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
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
    Etcd(#[from] crate::etcd::Error),
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

/// Key of a VM record.
pub fn vm_key(uuid: &str) -> String {
    format!("{VMS}{uuid}")
}

/// Key of a name reservation.
pub fn name_key(name: &str) -> String {
    format!("{NAMES}{name}")
}

/// Key of a node registration.
pub fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

/// Key of a pair member.
pub fn member_key(name: &str) -> String {
    format!("{MEMBERS}{name}")
}

/// A value with the revision it was last written at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored<T> {
    /// The value.
    pub value: T,
    /// etcd's mod_revision of the key.
    pub revision: i64,
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

/// Every live node registration.
pub async fn load_nodes(etcd: &Etcd) -> Result<Vec<NodeRecord>, Error> {
    Ok(load_prefix(etcd, NODES)
        .await?
        .into_iter()
        .map(|s: Stored<NodeRecord>| s.value)
        .collect())
}

/// Every member of the pair, with its last known facts (live or not).
pub async fn load_members(etcd: &Etcd) -> Result<Vec<NodeRecord>, Error> {
    Ok(load_prefix(etcd, MEMBERS)
        .await?
        .into_iter()
        .map(|s: Stored<NodeRecord>| s.value)
        .collect())
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

/// The node registration of `name`, if that node's controller is alive.
pub async fn find_node(etcd: &Etcd, name: &str) -> Result<Option<NodeRecord>, Error> {
    get(etcd, &node_key(name))
        .await?
        .map(|kv| decode(&kv).map(|s| s.value))
        .transpose()
}

/// Registers (or refreshes) this node under `lease`, and records it as a member of the pair.
pub async fn put_node(etcd: &Etcd, record: &NodeRecord, lease: i64) -> Result<(), Error> {
    let (node, member) = (node_key(&record.name), member_key(&record.name));
    let value = encode(record);
    etcd.request("registering node", REQUEST_BUDGET, |mut c| {
        let txn = Txn::new().and_then([
            TxnOp::put(
                node.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::put(member.clone(), value.clone(), None),
        ]);
        async move { c.txn(txn).await }
    })
    .await?;
    Ok(())
}

async fn load_prefix<T: serde::de::DeserializeOwned>(
    etcd: &Etcd,
    prefix: &str,
) -> Result<Vec<Stored<T>>, Error> {
    let resp = etcd
        .request("loading state", REQUEST_BUDGET, |mut c| {
            let prefix = prefix.to_string();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
    // One record that does not decode (say, written by a newer version) must not take the
    // whole pair's state with it: skip it, loudly.
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| match decode(kv) {
            Ok(stored) => Some(stored),
            Err(e) => {
                tracing::error!(error = %crate::error::chain(&e), "skipping a stored record that does not decode");
                None
            }
        })
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
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Our records are plain structs of strings and numbers: serializing them cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
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

    fn still_leader(&self) -> Compare {
        Compare::create_revision(
            self.leader_key.clone(),
            CompareOp::Equal,
            self.leader_revision,
        )
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Txn {
        let mut all = vec![self.still_leader()];
        all.extend(compares);
        Txn::new()
            .when(all)
            .and_then(ops)
            .or_else([TxnOp::get(self.leader_key.clone(), None)])
    }

    /// Records that this controller serves, with where its API is.
    pub async fn announce(&self, leader: &impl serde::Serialize) -> Result<(), Error> {
        let value = encode(leader);
        let outcome = self
            .commit("announcing the serving controller", || {
                self.txn(vec![], vec![TxnOp::put(LEADER, value.clone(), None)])
            })
            .await?;
        match outcome {
            Outcome::Committed(_) => Ok(()),
            Outcome::CompareFailed { .. } => Err(Error::NotLeader),
        }
    }

    /// Stores a new VM and reserves its name; fails if the name or UUID exists.
    pub async fn create_vm(&self, vm: &VmRecord) -> Result<i64, Error> {
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
                    ],
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
    pub async fn update_vm(&self, vm: &VmRecord, revision: i64) -> Result<i64, Error> {
        let key = vm_key(&vm.uuid);
        let value = encode(vm);
        let outcome = self
            .commit("updating VM", || {
                self.txn(
                    vec![Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        revision,
                    )],
                    vec![TxnOp::put(key.clone(), value.clone(), None)],
                )
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
                    ],
                )
            })
            .await?;
        self.resolve(outcome, &key, None)
            .await?
            .map(|_| ())
            .ok_or(Error::Conflict { key })
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

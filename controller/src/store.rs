//! The pair's state in etcd.
//!
//! Keys (values are JSON):
//! - `/pairvisor/vms/<uuid>`   → [`VmRecord`]
//! - `/pairvisor/names/<name>` → the UUID owning the name (names are unique by construction)
//! - `/pairvisor/nodes/<name>` → [`NodeRecord`], bound to that node controller's lease
//! - `/pairvisor/serving/…`    → etcd election of the serving controller ([`ELECTION`])
//!
//! Only the serving controller writes VM keys, through a [`Writer`]: every write is a
//! transaction that also requires the writer's election key to still exist with its creation
//! revision, so a controller that lost its lease can no longer change anything (fencing).

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use crate::model::{NodeRecord, VmRecord};

/// Prefix of every key Pairvisor owns.
pub const PREFIX: &str = "/pairvisor/";
/// Prefix of VM records.
pub const VMS: &str = "/pairvisor/vms/";
/// Prefix of name reservations.
pub const NAMES: &str = "/pairvisor/names/";
/// Prefix of node registrations.
pub const NODES: &str = "/pairvisor/nodes/";
/// Name of the serving-controller election.
pub const ELECTION: &str = "/pairvisor/serving";
/// Who serves now: written by the elected controller once it has taken over.
pub const LEADER: &str = "/pairvisor/leader";

/// How long to wait for an etcd member to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one etcd request may take (a commit needs a majority, which may be re-electing).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// An etcd request failed.
    #[error("etcd: {op}")]
    Etcd {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: etcd_client::Error,
    },
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

/// A handle to the etcd cluster (a cheap clone of etcd-client's `Client`, printable in logs).
#[derive(Clone)]
pub struct Etcd(Client);

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Etcd")
    }
}

impl std::ops::Deref for Etcd {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.0
    }
}

impl std::ops::DerefMut for Etcd {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.0
    }
}

fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Error {
    move |source| Error::Etcd { op, source }
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

/// Connects to the etcd cluster. Requests time out after `request_timeout`; a client for
/// calls that block by design (a campaign) passes `None` and relies on keep-alives to notice
/// a dead member.
pub async fn connect(
    endpoints: &[String],
    request_timeout: Option<Duration>,
) -> Result<Etcd, Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some(timeout) = request_timeout {
        options = options.with_timeout(timeout);
    }
    Client::connect(endpoints, Some(options))
        .await
        .map(Etcd)
        .map_err(etcd("connecting"))
}

/// A VM record with the revision it was last written at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored<T> {
    /// The value.
    pub value: T,
    /// etcd's mod_revision of the key.
    pub revision: i64,
}

/// Every VM record.
pub async fn load_vms(client: &Etcd) -> Result<Vec<Stored<VmRecord>>, Error> {
    load_prefix(client, VMS).await
}

/// Every live node registration.
pub async fn load_nodes(client: &Etcd) -> Result<Vec<NodeRecord>, Error> {
    Ok(load_prefix(client, NODES)
        .await?
        .into_iter()
        .map(|s: Stored<NodeRecord>| s.value)
        .collect())
}

/// The VM named by `vm`, which is a name or a UUID.
pub async fn find_vm(client: &Etcd, vm: &str) -> Result<Option<VmRecord>, Error> {
    let mut c = client.clone();
    let by_uuid = c.get(vm_key(vm), None).await.map_err(etcd("reading VM"))?;
    if let Some(kv) = by_uuid.kvs().first() {
        return decode(kv).map(|s| Some(s.value));
    }
    let name = c
        .get(name_key(vm), None)
        .await
        .map_err(etcd("reading VM name"))?;
    let Some(uuid) = name.kvs().first().map(|kv| kv.value().to_vec()) else {
        return Ok(None);
    };
    let record = c
        .get(vm_key(&String::from_utf8_lossy(&uuid)), None)
        .await
        .map_err(etcd("reading VM"))?;
    record
        .kvs()
        .first()
        .map(decode)
        .transpose()
        .map(|s| s.map(|s| s.value))
}

/// The node registration of `name`, if that node's controller is alive.
pub async fn find_node(client: &Etcd, name: &str) -> Result<Option<NodeRecord>, Error> {
    let mut c = client.clone();
    let resp = c
        .get(node_key(name), None)
        .await
        .map_err(etcd("reading node"))?;
    resp.kvs()
        .first()
        .map(decode)
        .transpose()
        .map(|s| s.map(|s| s.value))
}

/// Registers (or refreshes) this node under `lease`.
pub async fn put_node(client: &Etcd, record: &NodeRecord, lease: i64) -> Result<(), Error> {
    let value = encode(record);
    let mut c = client.clone();
    c.put(
        node_key(&record.name),
        value,
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .map_err(etcd("registering node"))?;
    Ok(())
}

async fn load_prefix<T: serde::de::DeserializeOwned>(
    client: &Etcd,
    prefix: &str,
) -> Result<Vec<Stored<T>>, Error> {
    let mut c = client.clone();
    let resp = c
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(etcd("loading state"))?;
    resp.kvs().iter().map(decode).collect()
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

/// The serving controller's fenced writes: each commits only while its election key lives.
#[derive(Clone, Debug)]
pub struct Writer {
    client: Etcd,
    leader_key: Vec<u8>,
    leader_revision: i64,
}

impl Writer {
    /// A writer fenced by the election key `leader_key` created at `leader_revision`.
    pub fn new(client: Etcd, leader_key: Vec<u8>, leader_revision: i64) -> Writer {
        Writer {
            client,
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

    /// Records that this controller serves, with where its API is.
    pub async fn announce(&self, leader: &impl serde::Serialize) -> Result<(), Error> {
        let txn = Txn::new()
            .when([self.still_leader()])
            .and_then([TxnOp::put(LEADER, encode(leader), None)])
            .or_else([TxnOp::get(self.leader_key.clone(), None)]);
        self.commit(txn, "announcing the serving controller")
            .await?
            .map(|_| ())
            .ok_or(Error::NotLeader)
    }

    /// Stores a new VM and reserves its name; fails if the name or UUID exists.
    pub async fn create_vm(&self, vm: &VmRecord) -> Result<i64, Error> {
        let key = vm_key(&vm.uuid);
        let name = name_key(&vm.name);
        let txn = Txn::new()
            .when([
                self.still_leader(),
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Compare::create_revision(name.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(key.clone(), encode(vm), None),
                TxnOp::put(name, vm.uuid.clone(), None),
            ])
            .or_else([TxnOp::get(self.leader_key.clone(), None)]);
        match self.commit(txn, "creating VM").await? {
            Some(revision) => Ok(revision),
            None => Err(Error::NameTaken {
                name: vm.name.clone(),
            }),
        }
    }

    /// Replaces a VM record last read at `revision`; returns the new revision.
    pub async fn update_vm(&self, vm: &VmRecord, revision: i64) -> Result<i64, Error> {
        let key = vm_key(&vm.uuid);
        let txn = Txn::new()
            .when([
                self.still_leader(),
                Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
            ])
            .and_then([TxnOp::put(key.clone(), encode(vm), None)])
            .or_else([TxnOp::get(self.leader_key.clone(), None)]);
        self.commit(txn, "updating VM")
            .await?
            .ok_or(Error::Conflict { key })
    }

    /// Removes a VM record last read at `revision`, and its name.
    pub async fn remove_vm(&self, vm: &VmRecord, revision: i64) -> Result<(), Error> {
        let key = vm_key(&vm.uuid);
        let txn = Txn::new()
            .when([
                self.still_leader(),
                Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
            ])
            .and_then([
                TxnOp::delete(key.clone(), None),
                TxnOp::delete(name_key(&vm.name), None),
            ])
            .or_else([TxnOp::get(self.leader_key.clone(), None)]);
        self.commit(txn, "removing VM")
            .await?
            .map(|_| ())
            .ok_or(Error::Conflict { key })
    }

    /// Commits `txn`: `Some(revision)` on success, `None` when a data compare failed,
    /// `Err(NotLeader)` when the election key is gone.
    async fn commit(&self, txn: Txn, op: &'static str) -> Result<Option<i64>, Error> {
        let mut c = self.client.clone();
        let resp = c.txn(txn).await.map_err(etcd(op))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        if resp.succeeded() {
            return Ok(Some(revision));
        }
        let leader_alive = resp.op_responses().iter().any(|r| match r {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == self.leader_revision),
            _ => false,
        });
        if leader_alive {
            Ok(None)
        } else {
            Err(Error::NotLeader)
        }
    }
}

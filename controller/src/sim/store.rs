//! The simulator's etcd: keys with create and mod revisions, leases with TTLs on the virtual
//! clock, the election (lowest creation revision under a prefix wins), fenced puts, and a
//! leader change that extends every lease like a new Raft leader does (`Promote`).

use std::collections::BTreeMap;

/// A key's value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub value: String,
    pub create: i64,
    pub modified: i64,
    pub lease: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    ttl_ms: u64,
    expires_ms: u64,
}

/// The in-memory store.
#[derive(Clone, Debug, Default)]
pub struct Store {
    revision: i64,
    next_lease: i64,
    keys: BTreeMap<String, Kv>,
    leases: BTreeMap<i64, Lease>,
}

/// Election prefix of the serving controller.
pub const SERVING: &str = "serving/";
/// Who serves with its term (written by the serving controller).
pub const LEADER: &str = "leader";

impl Store {
    /// Grants a lease of `ttl_ms` at `now_ms`.
    pub fn grant(&mut self, now_ms: u64, ttl_ms: u64) -> i64 {
        self.next_lease += 1;
        let id = self.next_lease;
        self.leases.insert(
            id,
            Lease {
                ttl_ms,
                expires_ms: now_ms + ttl_ms,
            },
        );
        id
    }

    /// Renews `lease` at `now_ms`: its TTL, or `None` if it is gone.
    pub fn keep_alive(&mut self, now_ms: u64, lease: i64) -> Option<u64> {
        let entry = self.leases.get_mut(&lease)?;
        entry.expires_ms = now_ms + entry.ttl_ms;
        Some(entry.ttl_ms)
    }

    /// Whether `lease` exists.
    pub fn lease_alive(&self, lease: i64) -> bool {
        self.leases.contains_key(&lease)
    }

    /// Revokes `lease` and deletes its keys.
    pub fn revoke(&mut self, lease: i64) {
        if self.leases.remove(&lease).is_some() {
            self.revision += 1;
            self.keys.retain(|_, kv| kv.lease != Some(lease));
        }
    }

    /// Expires every lease past its deadline at `now_ms` (with its keys).
    pub fn expire(&mut self, now_ms: u64) {
        let due: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for lease in due {
            self.revoke(lease);
        }
    }

    /// A new Raft leader: every lease lives a full TTL from `now_ms` on.
    pub fn promote(&mut self, now_ms: u64) {
        for lease in self.leases.values_mut() {
            lease.expires_ms = lease.expires_ms.max(now_ms + lease.ttl_ms);
        }
    }

    /// Puts `key`, bound to `lease` if given (and alive); returns the revision.
    pub fn put(&mut self, key: &str, value: &str, lease: Option<i64>) -> Option<i64> {
        if lease.is_some_and(|l| !self.lease_alive(l)) {
            return None;
        }
        self.revision += 1;
        let create = self.keys.get(key).map_or(self.revision, |kv| kv.create);
        self.keys.insert(
            key.to_string(),
            Kv {
                value: value.to_string(),
                create,
                modified: self.revision,
                lease,
            },
        );
        Some(self.revision)
    }

    /// Puts `key` only while the election key `leader_key` exists with creation revision
    /// `term` (the engine's fenced writes); `None` when the writer lost its role.
    pub fn put_fenced(
        &mut self,
        leader_key: &str,
        term: i64,
        key: &str,
        value: &str,
    ) -> Option<i64> {
        let holds = self
            .keys
            .get(leader_key)
            .is_some_and(|kv| kv.create == term);
        if !holds {
            return None;
        }
        self.put(key, value, None)
    }

    /// Deletes `key` if it exists.
    pub fn delete(&mut self, key: &str) {
        if self.keys.remove(key).is_some() {
            self.revision += 1;
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Kv> {
        self.keys.get(key)
    }

    /// Campaigns with `lease`: its election key (created if absent) and its creation revision.
    pub fn campaign(&mut self, lease: i64, value: &str) -> Option<(String, i64)> {
        let key = format!("{SERVING}{lease}");
        if self.get(&key).is_none() {
            self.put(&key, value, Some(lease))?;
        }
        self.get(&key).map(|kv| (key.clone(), kv.create))
    }

    /// The elected key: the lowest creation revision under the election prefix.
    pub fn elected(&self) -> Option<(String, i64)> {
        self.keys
            .iter()
            .filter(|(k, _)| k.starts_with(SERVING))
            .min_by_key(|(_, kv)| kv.create)
            .map(|(k, kv)| (k.clone(), kv.create))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expire_deletes_the_leases_keys() {
        let mut store = Store::default();
        let lease = store.grant(0, 2000);
        store.put("nodes/n0", "x", Some(lease));

        store.expire(2000);

        assert_eq!(store.get("nodes/n0"), None);
    }

    #[test]
    fn elected_is_the_oldest_campaign() {
        let mut store = Store::default();
        let first = store.grant(0, 2000);
        let second = store.grant(0, 2000);
        store.campaign(second, "n1");
        store.campaign(first, "n0");

        let (key, _) = store.elected().unwrap();

        assert_eq!(key, format!("{SERVING}{second}"));
    }

    #[test]
    fn put_fenced_after_the_key_is_gone_is_refused() {
        let mut store = Store::default();
        let lease = store.grant(0, 2000);
        let (key, term) = store.campaign(lease, "n0").unwrap();
        store.revoke(lease);

        let written = store.put_fenced(&key, term, "vms/a", "x");

        assert_eq!(written, None);
    }

    #[test]
    fn promote_extends_a_lease_about_to_expire() {
        let mut store = Store::default();
        let lease = store.grant(0, 2000);
        store.promote(1900);

        store.expire(3000);

        assert!(store.lease_alive(lease));
    }
}

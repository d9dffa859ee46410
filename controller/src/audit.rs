//! The audit log: who called which admin method of the public API, on what, and how it
//! ended. Records live in etcd under [`AUDIT`] (keys sort by time), so either controller
//! lists the whole pair's; each is also a log line (target `audit`). Records older than
//! [`KEEP`] are pruned as new ones come.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{DeleteOptions, GetOptions, SortOrder, SortTarget};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::auth::Caller;
use crate::error::chain;
use crate::store::Etcd;

/// Prefix of audit records.
pub const AUDIT: &str = "/pairvisor/audit/";
/// How long records are kept.
pub const KEEP: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long writing a record may wait for etcd.
const BUDGET: Duration = Duration::from_secs(3);
/// Prune once per this many records written.
const PRUNE_EVERY: u64 = 256;
/// The most records one listing returns.
pub const MAX_LIST: u32 = 10_000;

/// One audited call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When it ended.
    pub at_unix_ms: i64,
    /// The caller's token ID.
    pub token_id: String,
    /// The caller's token name.
    pub token_name: String,
    /// The gRPC method.
    pub method: String,
    /// What it acted on ("" when nothing in particular).
    pub subject: String,
    /// Its request ID, if any.
    #[serde(default)]
    pub request_id: String,
    /// "ok", or the status code and message.
    pub outcome: String,
    /// The controller that served it.
    pub node: String,
}

/// What a request acts on, for its audit record.
pub trait Subject {
    /// The VM, ISO, token… the request names ("" when none).
    fn subject(&self) -> String;
}

/// The outcome of a call, as recorded.
pub fn outcome<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "ok".to_string(),
        Err(status) => status_outcome(status),
    }
}

fn status_outcome(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Writes and lists the audit log.
#[derive(Debug)]
pub struct Audit {
    etcd: Etcd,
    node: String,
    written: AtomicU64,
}

impl Audit {
    /// The audit log of the pair in `etcd`, written by controller `node`.
    pub fn new(etcd: Etcd, node: &str) -> Audit {
        Audit {
            etcd,
            node: node.to_string(),
            written: AtomicU64::new(0),
        }
    }

    /// Records a call of `caller` on `subject` that ended with `outcome`.
    pub async fn record(
        &self,
        caller: &Caller,
        subject: String,
        request_id: Option<&str>,
        outcome: String,
    ) {
        let record = Record {
            at_unix_ms: crate::now_unix_ms(),
            token_id: caller.token_id.clone(),
            token_name: caller.name.clone(),
            method: caller.method.clone(),
            subject,
            request_id: request_id.unwrap_or_default().to_string(),
            outcome,
            node: self.node.clone(),
        };
        tracing::info!(
            target: "audit",
            token = %record.token_id,
            who = %record.token_name,
            method = %record.method,
            subject = %record.subject,
            request_id = %record.request_id,
            outcome = %record.outcome,
            "audit"
        );
        let seq = self.written.fetch_add(1, Ordering::Relaxed);
        let key = format!(
            "{AUDIT}{:016}-{}-{seq:08}",
            record.at_unix_ms.max(0),
            self.node
        );
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let stored = self
            .etcd
            .request("writing an audit record", BUDGET, |mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.put(key, value, None).await }
            })
            .await;
        if let Err(e) = stored {
            tracing::error!(node = %self.node, method = %record.method, error = %chain(&e), "audit record not stored in etcd (it is in this log)");
        }
        if seq.is_multiple_of(PRUNE_EVERY) {
            self.prune(record.at_unix_ms).await;
        }
    }

    /// Records that `caller`'s call was refused with `status`.
    pub async fn refused(&self, caller: &Caller, status: &Status) {
        self.record(caller, String::new(), None, status_outcome(status))
            .await;
    }

    /// Deletes the records older than [`KEEP`].
    async fn prune(&self, now_unix_ms: i64) {
        let keep_ms = i64::try_from(KEEP.as_millis()).unwrap_or(i64::MAX);
        let cutoff = format!("{AUDIT}{:016}", now_unix_ms.saturating_sub(keep_ms).max(0));
        let pruned = self
            .etcd
            .request("pruning the audit log", BUDGET, |mut c| {
                let cutoff = cutoff.clone();
                async move {
                    c.delete(AUDIT, Some(DeleteOptions::new().with_range(cutoff)))
                        .await
                }
            })
            .await;
        match pruned {
            Ok(resp) if resp.deleted() > 0 => {
                tracing::info!(node = %self.node, deleted = resp.deleted(), "pruned old audit records");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(node = %self.node, error = %chain(&e), "pruning the audit log failed")
            }
        }
    }

    /// The newest `limit` records (0: 100), newest first.
    pub async fn list(&self, limit: u32) -> Result<Vec<Record>, daemon::etcd::Error> {
        let limit = match limit {
            0 => 100,
            n => n.min(MAX_LIST),
        };
        let resp = self
            .etcd
            .request(
                "listing the audit log",
                crate::store::REQUEST_BUDGET,
                |mut c| {
                    let options = GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(i64::from(limit));
                    async move { c.get(AUDIT, Some(options)).await }
                },
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_the_code_and_message() {
        let failed: Result<(), Status> = Err(Status::not_found("no VM named web"));

        assert_eq!(outcome(&Ok::<(), Status>(())), "ok");
        assert_eq!(outcome(&failed), "NotFound: no VM named web");
    }
}

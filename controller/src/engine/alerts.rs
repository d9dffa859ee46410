//! The pair's alerts: raised and cleared as the engine's looks find causes come and go
//! (stored in etcd, so any controller serves the same list), and cleared by an admin by ID
//! while their cause stays.

use std::collections::BTreeMap;

use super::actor::Engine;
use super::effects::store_error;
use super::observe::DomainsPoll;
use crate::error::{ApiError, chain};
use crate::store::Alert;

impl Engine {
    /// Raises the domain alerts found now and clears those of polled nodes that are gone.
    pub(super) async fn sync_domain_alerts(
        &mut self,
        found: BTreeMap<String, (String, String, String)>,
        poll: &DomainsPoll,
    ) {
        let stale: Vec<String> = self
            .alerts
            .values()
            .filter(|a| a.id.starts_with("domain/") && !found.contains_key(&a.id))
            .filter(|a| poll.answered(&a.node))
            .map(|a| a.id.clone())
            .collect();
        for id in stale {
            self.clear(&id).await;
        }
        for (id, (node, vm, message)) in found {
            self.raise(&id, &node, &vm, message).await;
        }
    }

    /// Raises alert `id` unless it is open with the same message.
    pub(super) async fn raise(&mut self, id: &str, node: &str, vm: &str, message: String) {
        if self.alerts.get(id).is_some_and(|a| a.message == message) {
            return;
        }
        let alert = Alert {
            id: id.to_string(),
            node: node.to_string(),
            vm: vm.to_string(),
            message,
            raised_unix_ms: crate::now_unix_ms(),
            cleared_by: String::new(),
        };
        match self.ctx.writer.raise_alert(&alert).await {
            Ok(()) => {
                tracing::warn!(alert = id, node, message = %alert.message, "alert raised");
                self.alerts.insert(id.to_string(), alert);
            }
            Err(e) => {
                tracing::warn!(alert = id, error = %chain(&e), "raising alert failed");
                self.note_store_error(&e);
            }
        }
    }

    /// Marks open alert `id` cleared by `by`: it stays out of the open alerts while its
    /// cause stays as it is (raising it again with the same message keeps it cleared).
    pub(super) async fn clear_by_admin(&mut self, id: &str, by: &str) -> Result<Alert, ApiError> {
        let Some(open) = self.alerts.get(id).filter(|a| a.open()) else {
            return Err(ApiError::AlertNotFound(id.to_string()));
        };
        let alert = Alert {
            cleared_by: by.to_string(),
            ..open.clone()
        };
        tracing::info!(alert = id, by, "alert clear begin");
        if let Err(e) = self.ctx.writer.raise_alert(&alert).await {
            tracing::warn!(alert = id, by, error = %chain(&e), "alert clear end: failed");
            self.note_store_error(&e);
            return Err(store_error(e));
        }
        tracing::info!(alert = id, by, "alert clear end: cleared");
        self.alerts.insert(id.to_string(), alert.clone());
        Ok(alert)
    }

    /// Clears alert `id` if it is open.
    pub(super) async fn clear(&mut self, id: &str) {
        if !self.alerts.contains_key(id) {
            return;
        }
        match self.ctx.writer.clear_alert(id).await {
            Ok(()) => {
                tracing::info!(alert = id, "alert cleared");
                self.alerts.remove(id);
            }
            Err(e) => {
                tracing::warn!(alert = id, error = %chain(&e), "clearing alert failed");
                self.note_store_error(&e);
            }
        }
    }
}

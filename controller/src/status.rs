//! The pair's status in one word, for the unauthenticated `GET /health` (monitoring's
//! status page): FAILED when a guest cannot run or nobody serves the pair, WARNING when
//! something needs an admin (an open alert, a host down), OK otherwise. The reasons go to
//! the log, not to unauthenticated callers.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::chain;
use crate::model::VmState;
use crate::store::{self, ELECTION, Etcd};

/// How long an assessment is reused: the endpoint is open to anyone, etcd is not.
const REUSE_FOR: Duration = Duration::from_secs(1);

/// The pair's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// All is well.
    Ok,
    /// Something needs an admin; every guest runs.
    Warning,
    /// A guest is down or frozen, or the pair cannot be managed.
    Failed,
}

impl Level {
    /// The word `/health` answers.
    pub fn word(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Failed => "FAILED",
        }
    }
}

/// What the status is judged from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// Whether a controller serves the pair.
    pub serving: bool,
    /// Open alerts.
    pub alerts: usize,
    /// Member hosts whose agent is not registered (down, or lost).
    pub hosts_down: Vec<String>,
    /// VMs that should run but cannot be seen running (paused, or on a lost host).
    pub vms_down: Vec<String>,
}

/// The level `facts` mean, with the reasons for anything short of OK.
pub fn assess(facts: &Facts) -> (Level, Vec<String>) {
    let mut reasons = Vec::new();
    let mut level = Level::Ok;
    let mut raise = |at: Level, reason: String| {
        level = level.max(at);
        reasons.push(reason);
    };
    if !facts.serving {
        raise(Level::Failed, "no controller serves the pair".into());
    }
    for vm in &facts.vms_down {
        raise(
            Level::Failed,
            format!("VM {vm} is paused or on a lost host"),
        );
    }
    for host in &facts.hosts_down {
        raise(Level::Warning, format!("host {host} is down"));
    }
    if facts.alerts > 0 {
        raise(Level::Warning, format!("{} open alert(s)", facts.alerts));
    }
    (level, reasons)
}

/// Reads the facts from etcd.
pub async fn gather(etcd: &Etcd) -> Result<Facts, store::Error> {
    let serving = etcd
        .request(
            "finding the serving controller",
            store::REQUEST_TIMEOUT,
            |mut c| async move { c.leader(ELECTION).await },
        )
        .await
        .is_ok_and(|leader| leader.kv().is_some());
    let live: Vec<String> = store::load_nodes(etcd)
        .await?
        .into_iter()
        .map(|n| n.value.name)
        .collect();
    let hosts_down = store::load_members(etcd)
        .await?
        .into_iter()
        .map(|m| m.name)
        .filter(|name| !live.contains(name))
        .collect();
    let vms_down = store::load_vms(etcd)
        .await?
        .into_iter()
        .filter(|vm| matches!(vm.value.state, VmState::Paused | VmState::Lost { .. }))
        .map(|vm| vm.value.name)
        .collect();
    Ok(Facts {
        serving,
        alerts: store::load_alerts(etcd)
            .await?
            .iter()
            .filter(|a| a.open())
            .count(),
        hosts_down,
        vms_down,
    })
}

/// Answers `/health`, reusing an assessment for a second.
#[derive(Debug)]
pub struct Health {
    etcd: Etcd,
    node: String,
    last: Mutex<Option<(Instant, Level)>>,
}

impl Health {
    /// The status of the pair in `etcd`, as controller `node` sees it.
    pub fn new(etcd: Etcd, node: &str) -> Health {
        Health {
            etcd,
            node: node.to_string(),
            last: Mutex::new(None),
        }
    }

    /// The pair's level now (FAILED when etcd does not answer: nothing can be managed).
    pub async fn level(&self) -> Level {
        if let Some((at, level)) = *self.last()
            && at.elapsed() < REUSE_FOR
        {
            return level;
        }
        let (level, reasons) = match gather(&self.etcd).await {
            Ok(facts) => assess(&facts),
            Err(e) => (Level::Failed, vec![format!("etcd: {}", chain(&e))]),
        };
        let mut last = self.last();
        let changed = last.is_none_or(|(_, before)| before != level);
        *last = Some((Instant::now(), level));
        if changed {
            tracing::info!(node = %self.node, status = level.word(), reasons = %reasons.join("; "), "pair status");
        }
        level
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Level)>> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Facts {
        Facts {
            serving: true,
            ..Facts::default()
        }
    }

    #[test]
    fn healthy_pair_is_ok() {
        let (level, reasons) = assess(&healthy());

        assert_eq!(level, Level::Ok);
        assert!(reasons.is_empty());
    }

    #[test]
    fn alert_or_host_down_is_a_warning() {
        let alert = Facts {
            alerts: 1,
            ..healthy()
        };
        let host = Facts {
            hosts_down: vec!["n1".into()],
            ..healthy()
        };

        assert_eq!(assess(&alert).0, Level::Warning);
        assert_eq!(assess(&host).0, Level::Warning);
    }

    #[test]
    fn vm_down_or_nobody_serving_fails_whatever_else() {
        let vm = Facts {
            vms_down: vec!["web".into()],
            alerts: 3,
            ..healthy()
        };
        let unserved = Facts::default();

        let (level, reasons) = assess(&vm);

        assert_eq!(level, Level::Failed);
        assert!(reasons.iter().any(|r| r.contains("web")));
        assert_eq!(assess(&unserved).0, Level::Failed);
    }
}

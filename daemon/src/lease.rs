//! An etcd lease kept alive, with an honest view of whether it still holds.
//!
//! Both daemons hold one: the agent's is its host's liveness in the pair, the controller's
//! carries its serving role. etcd expires a lease `ttl` after it *received* the last renewal,
//! which is no earlier than when we *sent* it; so the lease surely holds until `sent + ttl` of
//! the last renewal etcd confirmed. Past that point we do not know: etcd may have expired it, or
//! kept it (a new etcd leader extends every lease by its full TTL, so a Raft election never
//! expires one). The keeper then reports [`LeaseStatus::Doubt`] and keeps trying; only etcd
//! saying so (an answer with TTL 0, or "lease not found") makes it [`LeaseStatus::Expired`].
//! A holder that must not act on an expired lease stops acting in doubt, and resumes when a
//! renewal is confirmed, without giving up what it holds (no churn on etcd faults).
//!
//! ```text
//!  holder                                  etcd
//!    │ LeaseGrant(ttl) ─────────────────────► lease L        valid_until = sent + ttl
//!    │ KeepAlive(L) every ttl/10 ───────────► TTL=ttl        valid_until = sent + ttl
//!    │ ... no answer (member died, Raft election) ...
//!    │ now > valid_until: Doubt (stop acting, keep trying)
//!    │ KeepAlive(L) ────────────────────────► TTL=ttl        Alive again
//!    │                                  or ─► TTL=0          Expired: start over
//! ```

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::etcd::Etcd;

/// How long one renewal waits for an answer. A member still following a dead Raft leader
/// holds a renewal until a new leader is elected, so it can still be confirmed then; later
/// renewals are on their way meanwhile.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(700);

/// Errors granting or keeping a lease.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd did not grant a lease.
    #[error("granting a {ttl_seconds} s lease")]
    Grant {
        /// The TTL asked for.
        ttl_seconds: i64,
        /// The cause.
        #[source]
        source: crate::etcd::Error,
    },
    /// etcd says the lease has expired (or was revoked).
    #[error("lease {lease:x} expired")]
    Expired {
        /// The lease.
        lease: i64,
    },
}

/// What the holder may assume about its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseStatus {
    /// A renewal was confirmed recently enough that the lease surely holds.
    Alive,
    /// No renewal was confirmed within the TTL: the lease may have expired.
    Doubt,
    /// etcd said the lease is gone (or there is none).
    Expired,
}

/// The pure part: when the lease surely holds, from confirmed renewals. The bound keeps a
/// margin of a tenth of the TTL short of `sent + ttl`, for a command in flight and clock drift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    ttl: Duration,
    valid_until: Instant,
}

impl Validity {
    /// A lease granted by a request sent at `sent`.
    pub fn granted(sent: Instant, ttl: Duration) -> Validity {
        Validity {
            ttl,
            valid_until: sent + ttl - ttl / 10,
        }
    }

    /// etcd confirmed a renewal sent at `sent` (a late answer never moves the bound back).
    pub fn confirmed(&mut self, sent: Instant) {
        self.valid_until = self.valid_until.max(sent + self.ttl - self.ttl / 10);
    }

    /// Whether the lease surely holds at `now`.
    pub fn status(&self, now: Instant) -> LeaseStatus {
        if now < self.valid_until {
            LeaseStatus::Alive
        } else {
            LeaseStatus::Doubt
        }
    }
}

/// What a holder's tasks see of its lease: until when it surely holds, or that it is gone.
/// The status is worked out at the moment of use, never cached: a process that was paused or
/// starved past the bound sees doubt at once, before any renewal has had a chance to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseView {
    validity: Option<Validity>,
}

impl LeaseView {
    /// No lease (or etcd said it is gone).
    pub const NONE: LeaseView = LeaseView { validity: None };

    /// The lease's status now.
    pub fn status(&self) -> LeaseStatus {
        self.status_at(Instant::now())
    }

    /// The lease's status at `now`.
    pub fn status_at(&self, now: Instant) -> LeaseStatus {
        self.validity
            .map_or(LeaseStatus::Expired, |v| v.status(now))
    }

    /// When doubt begins, if the lease is alive now.
    pub fn doubt_at(&self) -> Option<Instant> {
        self.validity
            .map(|v| v.valid_until)
            .filter(|t| *t > Instant::now())
    }
}

impl From<Validity> for LeaseView {
    /// The view of a lease that holds as `validity` says.
    fn from(validity: Validity) -> LeaseView {
        LeaseView {
            validity: Some(validity),
        }
    }
}

/// Time allowed for a self-fence, in percent of the host lease's TTL. The agent destroys its
/// self-fencing guests (HA and FT VMs) as soon as its lease is in doubt, a tenth of the TTL
/// before etcd can expire it; a controller that fails those VMs over without a fence waits
/// this long past the expiry too, so the destroy has a quarter of the TTL (0.5 s at 2 s) to
/// finish. libvirt's destroy signals QEMU at once.
pub const SELF_FENCE_MARGIN_PERCENT: u32 = 15;

/// [`SELF_FENCE_MARGIN_PERCENT`] of `ttl`: how long past a host lease's expiry the pair waits
/// before it restarts that host's guests without a fence.
pub fn self_fence_margin(ttl: Duration) -> Duration {
    ttl * SELF_FENCE_MARGIN_PERCENT / 100
}

/// Whether a host's agent must self-fence at `now`: its lease is no longer surely held (in
/// doubt, or gone). Any later and the guests might outlive the lease; any earlier and an
/// etcd election on the majority side (which extends every lease) would stop guests for
/// nothing. One rule for the agent and the pair simulator.
pub fn self_fence_due(view: LeaseView, now: Instant) -> bool {
    view.status_at(now) != LeaseStatus::Alive
}

/// Grants a lease of `ttl_seconds`, trying members for up to `budget`; returns its ID and when
/// the request was sent.
pub async fn grant(
    etcd: &Etcd,
    ttl_seconds: i64,
    budget: Duration,
) -> Result<(i64, Instant), Error> {
    let sent = Instant::now();
    let lease = etcd
        .request("granting lease", budget, |mut c| async move {
            c.lease_grant(ttl_seconds, None).await
        })
        .await
        .map_err(|source| Error::Grant {
            ttl_seconds,
            source,
        })?;
    Ok((lease.id(), sent))
}

/// How often a keeper sends a renewal: a tenth of the TTL. Renewals do not wait for each
/// other, so a short period makes the last confirmed one recent when etcd answers again.
pub fn renew_period(ttl: Duration) -> Duration {
    ttl / 10
}

/// Renews `lease` every [`renew_period`], publishing what it knows on `view`, until etcd says
/// it has expired; returns that error. Doubt never ends the lease by itself.
///
/// Each renewal goes to every member at once ([`Etcd::request_any`]) and runs on its own: one
/// stuck on a dead member, or held by a member until a new Raft leader is elected, never
/// delays the next; so the lease is confirmed again as soon as etcd has a leader. (Before,
/// one member at a time and one renewal at a time: a dead leader's member cost a whole
/// attempt, and a survivor under load self-fenced its guests during a 1 s election.)
pub async fn keep(
    etcd: Etcd,
    lease: i64,
    ttl: Duration,
    granted: Instant,
    view: watch::Sender<LeaseView>,
) -> Error {
    let mut validity = Validity::granted(granted, ttl);
    view.send_replace(LeaseView {
        validity: Some(validity),
    });
    let mut tick = tokio::time::interval(renew_period(ttl));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut renewals = tokio::task::JoinSet::new();
    let mut was = LeaseStatus::Alive;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (etcd, sent) = (etcd.clone(), Instant::now());
                renewals.spawn(async move { (sent, renew_once(&etcd, lease).await) });
            }
            Some(done) = renewals.join_next() => match done {
                Ok((sent, Ok(true))) => {
                    validity.confirmed(sent);
                    view.send_replace(LeaseView {
                        validity: Some(validity),
                    });
                }
                Ok((_, Ok(false))) => {
                    view.send_replace(LeaseView::NONE);
                    return Error::Expired { lease };
                }
                Ok((_, Err(e))) => {
                    tracing::debug!(lease = format!("{lease:x}"), error = %crate::error_chain(&e), "lease renewal failed; the next one is on its way");
                }
                Err(e) => {
                    tracing::debug!(lease = format!("{lease:x}"), error = %e, "lease renewal task ended without an answer");
                }
            },
        }
        let now = validity.status(Instant::now());
        if now != was {
            was = now;
            match now {
                LeaseStatus::Doubt => {
                    tracing::warn!(
                        lease = format!("{lease:x}"),
                        "lease in doubt: no renewal confirmed within its TTL; holding still until etcd answers"
                    )
                }
                _ => tracing::info!(
                    lease = format!("{lease:x}"),
                    "lease renewal confirmed again"
                ),
            }
        }
    }
}

/// Renews `lease` once through every member at once; `Ok(false)` when etcd says it has
/// expired.
async fn renew_once(etcd: &Etcd, lease: i64) -> Result<bool, crate::etcd::Error> {
    etcd.request_any("renewing lease", ATTEMPT_TIMEOUT, move |mut c| async move {
        // Opening the keep-alive stream sends one renewal and reads its answer: success means
        // etcd granted a TTL; etcd-client reports a TTL of 0 (lease gone) as "lease not found".
        match c.lease_keep_alive(lease).await {
            Ok(_) => Ok(true),
            Err(etcd_client::Error::LeaseKeepAliveError(reason))
                if reason.contains("not found") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    })
    .await
}

/// Revokes `lease` (within `budget`): what a holder does when it gives up what it holds. A
/// lease etcd no longer knows counts as revoked.
pub async fn revoke(etcd: &Etcd, lease: i64, budget: Duration) -> Result<(), crate::etcd::Error> {
    etcd.request("revoking lease", budget, |mut c| async move {
        match c.lease_revoke(lease).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(status))
                if status.code() == tonic::Code::NotFound =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    #[test]
    fn status_within_ttl_less_margin_of_grant_is_alive() {
        let start = Instant::now();
        let validity = Validity::granted(start, TTL);

        let status = validity.status(start + Duration::from_millis(2650));

        assert_eq!(status, LeaseStatus::Alive);
    }

    #[test]
    fn status_within_margin_of_ttl_is_doubt() {
        let start = Instant::now();
        let validity = Validity::granted(start, TTL);

        let status = validity.status(start + Duration::from_millis(2750));

        assert_eq!(status, LeaseStatus::Doubt);
    }

    #[test]
    fn confirmed_renewal_counts_from_its_send() {
        let start = Instant::now();
        let mut validity = Validity::granted(start, TTL);

        validity.confirmed(start + Duration::from_secs(2));

        assert_eq!(
            validity.status(start + Duration::from_millis(4650)),
            LeaseStatus::Alive
        );
    }

    #[test]
    fn confirmed_older_send_never_shortens_validity() {
        let start = Instant::now();
        let mut validity = Validity::granted(start + Duration::from_secs(2), TTL);

        validity.confirmed(start);

        assert_eq!(
            validity.status(start + Duration::from_millis(4650)),
            LeaseStatus::Alive
        );
    }

    #[test]
    fn view_without_lease_is_expired() {
        let status = LeaseView::NONE.status();

        assert_eq!(status, LeaseStatus::Expired);
    }

    #[test]
    fn self_fence_due_fresh_lease_is_false() {
        let start = Instant::now();
        let view = LeaseView::from(Validity::granted(start, TTL));

        let due = self_fence_due(view, start + Duration::from_millis(2600));

        assert!(!due);
    }

    #[test]
    fn self_fence_due_lease_in_doubt_is_true() {
        let start = Instant::now();
        let view = LeaseView::from(Validity::granted(start, TTL));

        let due = self_fence_due(view, start + Duration::from_millis(2800));

        assert!(due);
    }

    #[test]
    fn self_fence_due_renewed_lease_is_false() {
        let start = Instant::now();
        let mut validity = Validity::granted(start, TTL);
        validity.confirmed(start + Duration::from_millis(1000));

        let due = self_fence_due(
            LeaseView::from(validity),
            start + Duration::from_millis(2800),
        );

        assert!(!due);
    }

    #[test]
    fn self_fence_due_without_lease_is_true() {
        let due = self_fence_due(LeaseView::NONE, Instant::now());

        assert!(due);
    }
}

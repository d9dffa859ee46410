//! Host health: per host `Up → Suspect → Lost → Fenced` (and back), pure.
//!
//! The serving controller judges each host from three signals, fed in as an [`Observation`]
//! every few hundred milliseconds:
//! - the host's own lease in etcd, held by its **agent** (the process that outlives a
//!   controller crash): alive while its registration exists;
//! - heartbeats on every path between the hosts (priv0, both A-Links, management), as heard
//!   by the *other* host's agent, and whether the host's agent answers the judge directly;
//! - whether the judge itself still has quorum (its own lease confirmed in etcd);
//! - whether the host's controller is registered: an agent that crashed on a live host is not
//!   a lost host.
//!
//! ```text
//!        lease alive, heard on a path (or its agent answers)
//!   ┌──────────────────────────────────────────────────────────────┐
//!   ▼        some signal gone                   confirmed, quorum   │
//!   Up ───────────────────────────► Suspect ─────────────────────► Lost ──FenceConfirmed──► Fenced
//!   │ some paths silent: alert            ▲ silent everywhere + lease alive: partition,
//!   │ naming each, nothing else            │ the host keeps what it runs (nothing is taken over)
//! ```
//! `Lost` needs all of: lease expired, silent on every path, its agent not answering, its
//! controller not registered, the judge holding quorum, for `lost_confirm_ms`. A judge without quorum never declares a host
//! lost: the minority side cannot tell a dead peer from its own isolation.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// How long a host must show its agent down (lease expired, silent, its controller alive)
/// before [`Host::agent_down`] says so. A host that lost power loses its controller's lease
/// within a sixth of a TTL of its agent's (both renew every TTL/6 and stop together): for that
/// moment it looks like a host without its agent, and must not count as one.
pub const AGENT_DOWN_CONFIRM_MS: u64 = 3_000;

/// Timeouts of host health, changeable at runtime through the API (stored in etcd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A path is silent when no heartbeat was heard on it for this long.
    pub path_timeout_ms: u64,
    /// How long a host must look dead on every signal before it is `Lost`.
    pub lost_confirm_ms: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            path_timeout_ms: 600,
            lost_confirm_ms: 0,
        }
    }
}

/// Errors of a health configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A timeout is out of range.
    #[error("{field} = {value} ms: {reason}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value given.
        value: u64,
        /// The allowed range and why.
        reason: &'static str,
    },
}

impl Config {
    /// Checks the values against what the heartbeats and leases can deliver.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !(300..=30_000).contains(&self.path_timeout_ms) {
            return Err(ConfigError::OutOfRange {
                field: "path_timeout_ms",
                value: self.path_timeout_ms,
                reason: "give 300 to 30000: heartbeats go every 100-200 ms",
            });
        }
        if self.lost_confirm_ms > 60_000 {
            return Err(ConfigError::OutOfRange {
                field: "lost_confirm_ms",
                value: self.lost_confirm_ms,
                reason: "give 0 to 60000",
            });
        }
        Ok(())
    }
}

/// A host's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Alive and reachable.
    Up,
    /// Some signal is missing; nothing is taken over.
    Suspect,
    /// Dead by every signal: its VMs are lost until it returns (or, with protection, fenced).
    Lost,
    /// Lost, and confirmed powered off by its fence.
    Fenced,
}

impl HostState {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Suspect => "suspect",
            HostState::Lost => "lost",
            HostState::Fenced => "fenced",
        }
    }
}

/// What the other host hears of this one on one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathHeard {
    /// Path name.
    pub name: String,
    /// Milliseconds since the last heartbeat, or `None` if never heard.
    pub since_ms: Option<u64>,
}

/// One look at a host's signals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// When, in milliseconds on the judge's clock.
    pub now_ms: u64,
    /// Whether the host's registration (bound to its agent's lease) exists.
    pub lease_alive: bool,
    /// What the other host's agent hears on each path; `None` when it did not answer.
    pub paths: Option<Vec<PathHeard>>,
    /// Whether the host's agent answered the judge.
    pub agent_answers: bool,
    /// Whether the host's controller is registered (its lease holds).
    pub controller_alive: bool,
    /// Whether the judge holds quorum (its own lease is confirmed).
    pub quorum: bool,
}

/// What happens to a host's health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The signals were read.
    Observed(Observation),
    /// The host's fence confirmed it is powered off.
    FenceConfirmed,
}

/// What the engine does about a health change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Raise an alert: the other host no longer hears this one on `path`.
    PathSilent {
        /// The path.
        path: String,
    },
    /// Clear that alert.
    PathHeard {
        /// The path.
        path: String,
    },
    /// The host became `Suspect`, `Lost` or `Fenced`, or its reason changed: raise (or replace)
    /// its alert.
    Degraded {
        /// The new state.
        state: HostState,
        /// Why, in words.
        reason: String,
    },
    /// The host is `Lost`: every VM recorded there is lost until it returns.
    Lost,
    /// The host is `Up` again after being degraded: clear its alert.
    Recovered {
        /// Whether it had been `Lost` or `Fenced` (its VMs are reconciled again).
        was_lost: bool,
    },
}

/// A host's health, as the judge tracks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Its state.
    pub state: HostState,
    /// Why it is in that state.
    pub reason: String,
    /// Paths on which the other host hears nothing while it hears others (alerted).
    pub silent_paths: BTreeSet<String>,
    /// Since when every signal says dead (for `lost_confirm_ms`).
    dead_since_ms: Option<u64>,
    /// Its agent is down while the host runs (lease expired, silent on every path, its
    /// controller alive, for [`AGENT_DOWN_CONFIRM_MS`]): its guests may run on with no agent,
    /// so nothing the agent carried (an HA mirror's path to the peer) can be trusted.
    pub agent_down: bool,
    /// Silent on every path and its agent not answering, judged with quorum and with the
    /// other host's agent answering: dead, or cut off from the other host, whatever its lease
    /// says. Only an FT VM acts on it at once, by resuming its standby (`engine::protect`):
    /// its old run can release output only through a stale mark, which the failover's new
    /// owner generation refuses. Everything else waits for `Lost`.
    pub unreachable: bool,
    /// Since when it looks like a host without its agent.
    agent_down_since_ms: Option<u64>,
}

impl Default for Host {
    /// A host not yet observed: assumed up, so a restarted judge declares nothing lost before
    /// its signals have had time to show it.
    fn default() -> Host {
        Host {
            state: HostState::Up,
            reason: "up".into(),
            silent_paths: BTreeSet::new(),
            dead_since_ms: None,
            agent_down: false,
            agent_down_since_ms: None,
            unreachable: false,
        }
    }
}

/// Applies `event` to `host`; returns its new health and what to do about it.
pub fn step(host: &Host, config: &Config, event: &Event) -> (Host, Vec<Action>) {
    match event {
        // Lost --FenceConfirmed--> Fenced
        Event::FenceConfirmed if host.state == HostState::Lost => {
            let next = Host {
                state: HostState::Fenced,
                reason: "powered off by its fence".into(),
                ..host.clone()
            };
            let actions = vec![Action::Degraded {
                state: next.state,
                reason: next.reason.clone(),
            }];
            (next, actions)
        }
        // Up|Suspect|Fenced --FenceConfirmed--> unchanged: only a lost host is fenced.
        Event::FenceConfirmed => (host.clone(), Vec::new()),
        Event::Observed(observation) => observe(host, config, observation),
    }
}

fn observe(host: &Host, config: &Config, o: &Observation) -> (Host, Vec<Action>) {
    let mut actions = Vec::new();
    let silent = silent_paths(config, o);
    let alerting = silent.as_ref().map(|s| alerting_paths(s, o));
    if let Some(alerting) = &alerting {
        for path in alerting.difference(&host.silent_paths) {
            actions.push(Action::PathSilent { path: path.clone() });
        }
        for path in host.silent_paths.difference(alerting) {
            actions.push(Action::PathHeard { path: path.clone() });
        }
    }
    let heard_somewhere = o
        .paths
        .as_ref()
        .zip(silent.as_ref())
        .is_some_and(|(paths, silent)| paths.len() > silent.len());
    let silent_everywhere = o
        .paths
        .as_ref()
        .zip(silent.as_ref())
        .is_some_and(|(paths, silent)| !paths.is_empty() && paths.len() == silent.len());
    let alive_somehow = heard_somewhere || o.agent_answers;
    let dead = !o.lease_alive && !alive_somehow && !o.controller_alive;
    let dead_since_ms = if dead {
        Some(host.dead_since_ms.unwrap_or(o.now_ms))
    } else {
        None
    };
    let confirmed =
        dead_since_ms.is_some_and(|since| o.now_ms.saturating_sub(since) >= config.lost_confirm_ms);
    let (state, reason) = judge(host.state, o, alive_somehow, confirmed);
    let agent_down_since_ms = (!o.lease_alive && !alive_somehow && o.controller_alive)
        .then(|| host.agent_down_since_ms.unwrap_or(o.now_ms));
    let next = Host {
        state,
        reason,
        silent_paths: alerting.unwrap_or_else(|| host.silent_paths.clone()),
        dead_since_ms,
        agent_down: agent_down_since_ms
            .is_some_and(|since| o.now_ms.saturating_sub(since) >= AGENT_DOWN_CONFIRM_MS),
        agent_down_since_ms,
        unreachable: silent_everywhere && !o.agent_answers && o.quorum,
    };
    actions.extend(changes(host, &next));
    (next, actions)
}

/// The paths heard from longer ago than the timeout (or never); `None` without a view.
fn silent_paths(config: &Config, o: &Observation) -> Option<BTreeSet<String>> {
    let paths = o.paths.as_ref()?;
    Some(
        paths
            .iter()
            .filter(|p| p.since_ms.is_none_or(|ms| ms >= config.path_timeout_ms))
            .map(|p| p.name.clone())
            .collect(),
    )
}

/// The paths to raise alerts for: the silent ones, unless every path is (then the host's own
/// state says it, in one alert).
fn alerting_paths(silent: &BTreeSet<String>, o: &Observation) -> BTreeSet<String> {
    let all = o.paths.as_ref().map_or(0, Vec::len);
    if silent.len() == all {
        BTreeSet::new()
    } else {
        silent.clone()
    }
}

/// The state and reason the signals mean.
fn judge(
    from: HostState,
    o: &Observation,
    alive_somehow: bool,
    confirmed: bool,
) -> (HostState, String) {
    match (o.lease_alive, alive_somehow) {
        (true, true) => (HostState::Up, "up".into()),
        // No agent answered the judge at all (the judge itself stalled, most likely): with its
        // lease alive, an up host stays up rather than flap to suspect.
        (true, false) if o.paths.is_none() && from == HostState::Up => (from, "up".into()),
        (true, false) => (
            HostState::Suspect,
            "partitioned: silent on every path but its lease is alive; it keeps what it runs"
                .into(),
        ),
        (false, true) => (
            HostState::Suspect,
            "its lease expired but it is heard: its agent cannot reach etcd".into(),
        ),
        // A fenced host stays fenced until it is heard again.
        (false, false) if from == HostState::Fenced => (from, "powered off by its fence".into()),
        (false, false) if o.controller_alive => (
            HostState::Suspect,
            "its agent is down (lease expired, silent on every path) but its controller is alive"
                .into(),
        ),
        (false, false) if !o.quorum => (
            HostState::Suspect,
            "silent everywhere, but this controller lacks quorum to judge it".into(),
        ),
        (false, false) if confirmed => (
            HostState::Lost,
            "down: lease expired and silent on every path".into(),
        ),
        (false, false) => (
            HostState::Suspect,
            "lease expired and silent on every path; confirming".into(),
        ),
    }
}

/// The actions for a change of state or reason.
fn changes(from: &Host, to: &Host) -> Vec<Action> {
    let was_lost = matches!(from.state, HostState::Lost | HostState::Fenced);
    match (from.state, to.state) {
        (HostState::Up, HostState::Up) => Vec::new(),
        (_, HostState::Up) => vec![Action::Recovered { was_lost }],
        (HostState::Lost, HostState::Lost) | (HostState::Fenced, HostState::Fenced) => Vec::new(),
        (_, HostState::Lost) => vec![
            Action::Degraded {
                state: to.state,
                reason: to.reason.clone(),
            },
            Action::Lost,
        ],
        _ if from.state == to.state && from.reason == to.reason => Vec::new(),
        _ => vec![Action::Degraded {
            state: to.state,
            reason: to.reason.clone(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATHS: [&str; 4] = ["priv0", "alink1", "alink2", "mgmt"];

    fn heard(silent: &[&str]) -> Option<Vec<PathHeard>> {
        Some(
            PATHS
                .iter()
                .map(|name| PathHeard {
                    name: (*name).to_string(),
                    since_ms: if silent.contains(name) {
                        Some(5000)
                    } else {
                        Some(50)
                    },
                })
                .collect(),
        )
    }

    fn seen(lease_alive: bool, paths: Option<Vec<PathHeard>>, now_ms: u64) -> Event {
        Event::Observed(Observation {
            now_ms,
            lease_alive,
            paths,
            agent_answers: false,
            controller_alive: false,
            quorum: true,
        })
    }

    fn up_host() -> Host {
        Host::default()
    }

    fn lost_host() -> Host {
        step(
            &up_host(),
            &Config::default(),
            &seen(false, heard(&PATHS), 1),
        )
        .0
    }

    fn unreachable_after(observation: Observation) -> bool {
        step(
            &up_host(),
            &Config::default(),
            &Event::Observed(observation),
        )
        .0
        .unreachable
    }

    fn silent_everywhere_with_lease() -> Observation {
        Observation {
            now_ms: 1,
            lease_alive: true,
            paths: heard(&PATHS),
            agent_answers: false,
            controller_alive: true,
            quorum: true,
        }
    }

    #[test]
    fn unreachable_is_silence_everywhere_whatever_the_lease_says() {
        let alive = silent_everywhere_with_lease();
        let expired = Observation {
            lease_alive: false,
            controller_alive: false,
            ..silent_everywhere_with_lease()
        };

        assert!(unreachable_after(alive));
        assert!(unreachable_after(expired));
    }

    #[test]
    fn unreachable_needs_every_path_silent_no_answer_quorum_and_a_view() {
        let one_path_heard = Observation {
            paths: heard(&["priv0", "alink1", "alink2"]),
            ..silent_everywhere_with_lease()
        };
        let answers = Observation {
            agent_answers: true,
            ..silent_everywhere_with_lease()
        };
        let no_quorum = Observation {
            quorum: false,
            ..silent_everywhere_with_lease()
        };
        let no_view = Observation {
            paths: None,
            ..silent_everywhere_with_lease()
        };
        let no_paths = Observation {
            paths: Some(Vec::new()),
            ..silent_everywhere_with_lease()
        };

        for observation in [one_path_heard, answers, no_quorum, no_view, no_paths] {
            assert!(!unreachable_after(observation.clone()), "{observation:?}");
        }
    }

    #[test]
    fn step_one_path_silent_alerts_that_path_only() {
        let (next, actions) = step(
            &up_host(),
            &Config::default(),
            &seen(true, heard(&["alink1"]), 1),
        );

        assert_eq!(next.state, HostState::Up);
        assert_eq!(
            actions,
            vec![Action::PathSilent {
                path: "alink1".into()
            }]
        );
    }

    #[test]
    fn step_path_heard_again_clears_its_alert() {
        let (cut, _) = step(
            &up_host(),
            &Config::default(),
            &seen(true, heard(&["alink1"]), 1),
        );

        let (_, actions) = step(&cut, &Config::default(), &seen(true, heard(&[]), 2));

        assert_eq!(
            actions,
            vec![Action::PathHeard {
                path: "alink1".into()
            }]
        );
    }

    #[test]
    fn step_silent_everywhere_with_lease_is_partition_not_lost() {
        let (next, actions) = step(
            &up_host(),
            &Config::default(),
            &seen(true, heard(&PATHS), 1),
        );

        assert_eq!(next.state, HostState::Suspect);
        assert!(!actions.contains(&Action::Lost));
    }

    #[test]
    fn step_silent_everywhere_raises_no_path_alerts() {
        let (next, actions) = step(
            &up_host(),
            &Config::default(),
            &seen(true, heard(&PATHS), 1),
        );

        assert_eq!(next.silent_paths, BTreeSet::new());
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::PathSilent { .. }))
        );
    }

    #[test]
    fn step_silent_everywhere_without_lease_is_lost() {
        let (next, actions) = step(
            &up_host(),
            &Config::default(),
            &seen(false, heard(&PATHS), 1),
        );

        assert_eq!(next.state, HostState::Lost);
        assert!(actions.contains(&Action::Lost));
    }

    #[test]
    fn step_lease_expired_but_heard_is_suspect() {
        let (next, _) = step(
            &up_host(),
            &Config::default(),
            &seen(false, heard(&["priv0"]), 1),
        );

        assert_eq!(next.state, HostState::Suspect);
    }

    #[test]
    fn step_without_quorum_never_declares_lost() {
        let event = Event::Observed(Observation {
            now_ms: 1,
            lease_alive: false,
            paths: heard(&PATHS),
            agent_answers: false,
            controller_alive: false,
            quorum: false,
        });

        let (next, _) = step(&up_host(), &Config::default(), &event);

        assert_eq!(next.state, HostState::Suspect);
    }

    #[test]
    fn step_agent_answering_keeps_host_from_lost() {
        let event = Event::Observed(Observation {
            now_ms: 1,
            lease_alive: false,
            paths: None,
            agent_answers: true,
            controller_alive: false,
            quorum: true,
        });

        let (next, _) = step(&up_host(), &Config::default(), &event);

        assert_eq!(next.state, HostState::Suspect);
    }

    #[test]
    fn step_agent_dead_with_controller_alive_is_suspect_not_lost() {
        let event = Event::Observed(Observation {
            now_ms: 1,
            lease_alive: false,
            paths: heard(&PATHS),
            agent_answers: false,
            controller_alive: true,
            quorum: true,
        });

        let (next, actions) = step(&up_host(), &Config::default(), &event);

        assert_eq!(next.state, HostState::Suspect);
        assert!(!actions.contains(&Action::Lost));
        assert!(!next.agent_down, "not confirmed yet");
        assert!(
            !lost_host().agent_down,
            "a dead host is not a host without its agent"
        );
    }

    #[test]
    fn step_agent_down_for_the_confirm_time_is_agent_down() {
        let at = |now_ms| {
            Event::Observed(Observation {
                now_ms,
                lease_alive: false,
                paths: heard(&PATHS),
                agent_answers: false,
                controller_alive: true,
                quorum: true,
            })
        };
        let config = Config::default();

        let (first, _) = step(&up_host(), &config, &at(1));
        let (later, _) = step(&first, &config, &at(1 + AGENT_DOWN_CONFIRM_MS));

        assert!(!first.agent_down);
        assert!(later.agent_down);
    }

    #[test]
    fn step_dead_within_confirm_window_stays_suspect() {
        let config = Config {
            lost_confirm_ms: 1000,
            ..Config::default()
        };
        let (first, _) = step(&up_host(), &config, &seen(false, heard(&PATHS), 100));

        let (next, _) = step(&first, &config, &seen(false, heard(&PATHS), 900));

        assert_eq!(next.state, HostState::Suspect);
    }

    #[test]
    fn step_dead_past_confirm_window_is_lost() {
        let config = Config {
            lost_confirm_ms: 1000,
            ..Config::default()
        };
        let (first, _) = step(&up_host(), &config, &seen(false, heard(&PATHS), 100));

        let (next, _) = step(&first, &config, &seen(false, heard(&PATHS), 1100));

        assert_eq!(next.state, HostState::Lost);
    }

    #[test]
    fn step_lost_host_heard_with_lease_recovers() {
        let (next, actions) = step(&lost_host(), &Config::default(), &seen(true, heard(&[]), 2));

        assert_eq!(next.state, HostState::Up);
        assert!(actions.contains(&Action::Recovered { was_lost: true }));
    }

    #[test]
    fn step_lost_fence_confirmed_is_fenced() {
        let (next, _) = step(&lost_host(), &Config::default(), &Event::FenceConfirmed);

        assert_eq!(next.state, HostState::Fenced);
    }

    #[test]
    fn step_up_fence_confirmed_changes_nothing() {
        let (next, actions) = step(&up_host(), &Config::default(), &Event::FenceConfirmed);

        assert_eq!(next, up_host());
        assert_eq!(actions, vec![]);
    }

    #[test]
    fn step_no_path_view_raises_no_path_alerts() {
        let event = Event::Observed(Observation {
            now_ms: 1,
            lease_alive: true,
            paths: None,
            agent_answers: true,
            controller_alive: false,
            quorum: true,
        });

        let (next, actions) = step(&up_host(), &Config::default(), &event);

        assert_eq!(next.state, HostState::Up);
        assert_eq!(actions, vec![]);
    }

    #[test]
    fn step_up_host_without_any_report_but_lease_stays_up() {
        let event = Event::Observed(Observation {
            now_ms: 1,
            lease_alive: true,
            paths: None,
            agent_answers: false,
            controller_alive: true,
            quorum: true,
        });

        let (next, actions) = step(&up_host(), &Config::default(), &event);

        assert_eq!(next.state, HostState::Up);
        assert_eq!(actions, vec![]);
    }

    #[test]
    fn check_path_timeout_below_heartbeat_period_is_refused() {
        let config = Config {
            path_timeout_ms: 100,
            ..Config::default()
        };

        let err = config.check().unwrap_err();

        assert!(matches!(
            err,
            ConfigError::OutOfRange {
                field: "path_timeout_ms",
                ..
            }
        ));
    }
}

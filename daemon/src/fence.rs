//! Fencing tokens: the rule every agent applies to every mutating request, pure.
//!
//! A request carries the serving controller's *term* (the creation revision of its etcd
//! election key) and the VM's ownership *generation*; the agent admits it only if neither is
//! older than the highest it has seen, and remembers any raise before it acts (the agent's
//! `fence` module persists it). The pair simulator's fake agents apply the same rule.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The authority a request acts under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// The serving controller's term.
    pub term: i64,
    /// The VM's ownership generation.
    pub generation: u64,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request carries no fence (term 0).
    #[error("the request carries no fencing term; only a serving controller may change this host")]
    Missing,
    /// The VM's generation is older than one this host has acted under.
    #[error(
        "stale generation {got} for VM {vm}: this host has seen generation {seen}; the VM was reassigned since"
    )]
    StaleGeneration {
        /// The VM.
        vm: String,
        /// The highest generation seen.
        seen: u64,
        /// The request's generation.
        got: u64,
    },
    /// The term is older than one this host has seen: another controller serves now.
    #[error(
        "stale term {got}: this host has seen term {seen}; another controller serves the pair now"
    )]
    StaleTerm {
        /// The highest term seen.
        seen: i64,
        /// The request's term.
        got: i64,
    },
}

/// The highest term and per-VM generations seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Highest term.
    pub term: i64,
    /// Highest generation per VM UUID.
    pub generations: BTreeMap<String, u64>,
}

impl State {
    /// Checks `token` for `vm`; returns the raised state when it moves anything up.
    pub fn admit(&self, token: Token, vm: &str) -> Result<Option<State>, Refusal> {
        if token.term <= 0 {
            return Err(Refusal::Missing);
        }
        if token.term < self.term {
            return Err(Refusal::StaleTerm {
                seen: self.term,
                got: token.term,
            });
        }
        let seen = self.generations.get(vm).copied().unwrap_or(0);
        if token.generation < seen {
            return Err(Refusal::StaleGeneration {
                vm: vm.to_string(),
                seen,
                got: token.generation,
            });
        }
        if token.term == self.term && token.generation == seen {
            return Ok(None);
        }
        let mut raised = self.clone();
        raised.term = token.term;
        raised.generations.insert(vm.to_string(), token.generation);
        Ok(Some(raised))
    }

    /// The state raised to `term` (a new leader was announced), if that is a raise.
    pub fn observe(&self, term: i64) -> Option<State> {
        (term > self.term).then(|| State {
            term,
            generations: self.generations.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "6c3f8a3e-0b55-4b8e-9d6b-1f6f8f0d2a11";

    fn state(term: i64, generation: u64) -> State {
        State {
            term,
            generations: BTreeMap::from([(VM.to_string(), generation)]),
        }
    }

    fn token(term: i64, generation: u64) -> Token {
        Token { term, generation }
    }

    #[test]
    fn admit_same_term_and_generation_changes_nothing() {
        let raised = state(7, 3).admit(token(7, 3), VM).unwrap();

        assert_eq!(raised, None);
    }

    #[test]
    fn admit_newer_term_raises_it() {
        let raised = state(7, 3).admit(token(9, 3), VM).unwrap();

        assert_eq!(raised, Some(state(9, 3)));
    }

    #[test]
    fn admit_older_term_is_refused() {
        let err = state(9, 3).admit(token(7, 3), VM).unwrap_err();

        assert_eq!(
            err.to_string(),
            "stale term 7: this host has seen term 9; another controller serves the pair now"
        );
    }

    #[test]
    fn admit_older_generation_is_refused() {
        let err = state(9, 4).admit(token(9, 3), VM).unwrap_err();

        assert!(matches!(
            err,
            Refusal::StaleGeneration {
                seen: 4,
                got: 3,
                ..
            }
        ));
    }

    #[test]
    fn admit_without_term_is_refused() {
        let err = State::default().admit(token(0, 0), VM).unwrap_err();

        assert_eq!(err, Refusal::Missing);
    }

    #[test]
    fn admit_unknown_vm_records_its_generation() {
        let raised = State::default().admit(token(5, 1), VM).unwrap();

        assert_eq!(raised, Some(state(5, 1)));
    }

    #[test]
    fn observe_older_term_is_no_raise() {
        let raised = state(9, 1).observe(8);

        assert_eq!(raised, None);
    }
}

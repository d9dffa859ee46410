//! Fencing tokens, enforced where the action happens.
//!
//! Every mutating request carries the serving controller's *term* (the creation revision of
//! its etcd election key) and the VM's ownership *generation*. The agent keeps the highest of
//! each it has seen in a file (temp + fsync + rename, before the request runs) and refuses
//! anything older. The term also rises when the agent sees a new leader announced in etcd,
//! so a controller that was paused or cut off while the other took over has every command
//! refused, even one that reaches this agent before the new controller's first.
//!
//! ```text
//!  old controller (term 7)      agent (highest 7)      new controller (term 9)
//!        │  ... paused ...           │ ◄── leader key: term 9 (etcd watch) → highest 9
//!        │                           │ ◄── Start(term 9, gen 4): ok
//!        │ Destroy(term 7) ────────► │ refused: stale term 7 < 9 → old controller steps down
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The authority a request acts under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// The serving controller's term.
    pub term: i64,
    /// The VM's ownership generation.
    pub generation: u64,
}

/// Why a request was refused (or the state could not be kept).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The fence file cannot be read or parsed.
    #[error(
        "reading fence state {path}; if the file is damaged, stop every controller, remove it and restart the agent"
    )]
    Load {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The request carries no fence (term 0).
    #[error("the request carries no fencing term; only a serving controller may change this host")]
    Missing,
    /// Writing the raised state failed; the request was not run.
    #[error("persisting fence state {path}")]
    Persist {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM's generation is older than one this agent has acted under.
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
    /// The term is older than one this agent has seen: another controller serves now.
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
    pub fn admit(&self, token: Token, vm: &str) -> Result<Option<State>, Error> {
        if token.term <= 0 {
            return Err(Error::Missing);
        }
        if token.term < self.term {
            return Err(Error::StaleTerm {
                seen: self.term,
                got: token.term,
            });
        }
        let seen = self.generations.get(vm).copied().unwrap_or(0);
        if token.generation < seen {
            return Err(Error::StaleGeneration {
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
}

/// The agent's fence: the persisted [`State`], shared by every request.
#[derive(Debug)]
pub struct Fence {
    path: PathBuf,
    state: Mutex<State>,
}

impl Fence {
    /// Opens the fence kept in `path` (a missing file is a fresh host).
    pub fn open(path: &Path) -> Result<Fence, Error> {
        let load = |source| Error::Load {
            path: path.to_path_buf(),
            source,
        };
        let state = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| load(e.into()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(load(e)),
        };
        Ok(Fence {
            path: path.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    /// Admits a request for `vm` under `token`, persisting any raise before it returns.
    pub fn admit(&self, token: Token, vm: &str) -> Result<(), Error> {
        let mut state = self.lock();
        if let Some(raised) = state.admit(token, vm)? {
            self.persist(&raised)?;
            if raised.term > state.term {
                tracing::info!(
                    term = raised.term,
                    previous = state.term,
                    "fence: new serving term"
                );
            }
            *state = raised;
        }
        Ok(())
    }

    /// Raises the term to `term` (a new leader was announced); lower terms are ignored.
    pub fn observe_term(&self, term: i64) -> Result<(), Error> {
        let mut state = self.lock();
        if term <= state.term {
            return Ok(());
        }
        let mut raised = state.clone();
        raised.term = term;
        self.persist(&raised)?;
        tracing::info!(
            term,
            previous = state.term,
            "fence: new serving term announced"
        );
        *state = raised;
        Ok(())
    }

    /// The highest term seen.
    pub fn term(&self) -> i64 {
        self.lock().term
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn persist(&self, state: &State) -> Result<(), Error> {
        let bytes = serde_json::to_vec(state).unwrap_or_default();
        daemon::fsutil::write_atomic(&self.path, &bytes).map_err(|source| Error::Persist {
            path: self.path.clone(),
            source,
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
            Error::StaleGeneration {
                seen: 4,
                got: 3,
                ..
            }
        ));
    }

    #[test]
    fn admit_without_term_is_refused() {
        let err = State::default().admit(token(0, 0), VM).unwrap_err();

        assert!(matches!(err, Error::Missing));
    }

    #[test]
    fn admit_unknown_vm_records_its_generation() {
        let raised = State::default().admit(token(5, 1), VM).unwrap();

        assert_eq!(raised, Some(state(5, 1)));
    }

    #[test]
    fn fence_reopened_remembers_raised_term() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence.json");
        Fence::open(&path).unwrap().observe_term(12).unwrap();

        let reopened = Fence::open(&path).unwrap();

        assert_eq!(reopened.term(), 12);
    }

    #[test]
    fn fence_after_observed_term_refuses_older_request() {
        let dir = tempfile::tempdir().unwrap();
        let fence = Fence::open(&dir.path().join("fence.json")).unwrap();
        fence.observe_term(12).unwrap();

        let err = fence.admit(token(11, 1), VM).unwrap_err();

        assert!(matches!(err, Error::StaleTerm { seen: 12, got: 11 }));
    }
}

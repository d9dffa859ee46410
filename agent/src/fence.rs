//! Fencing tokens, enforced where the action happens.
//!
//! Every mutating request carries the serving controller's *term* (the creation revision of
//! its etcd election key) and the VM's ownership *generation*. The agent keeps the highest of
//! each it has seen in a file (temp + fsync + rename, before the request runs) and refuses
//! anything older ([`daemon::fence`] holds the rule). The term also rises when the agent sees a
//! new leader announced in etcd, so a controller that was paused or cut off while the other
//! took over has every command refused, even one that reaches this agent before the new
//! controller's first.
//!
//! ```text
//!  old controller (term 7)      agent (highest 7)      new controller (term 9)
//!        │  ... paused ...           │ ◄── leader key: term 9 (etcd watch) → highest 9
//!        │                           │ ◄── Start(term 9, gen 4): ok
//!        │ Destroy(term 7) ────────► │ refused: stale term 7 < 9 → old controller steps down
//! ```

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

pub use daemon::fence::{Refusal, State, Token};

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
    /// Writing the raised state failed; the request was not run.
    #[error("persisting fence state {path}")]
    Persist {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The fence refused the request.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// The agent's fence: the persisted [`State`], shared by every request.
#[derive(Debug)]
pub struct Fence {
    path: PathBuf,
    state: Mutex<State>,
    /// The state's term, readable without waiting behind a raise's fsync.
    term: AtomicI64,
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
            term: AtomicI64::new(state.term),
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
            self.term.store(raised.term, Ordering::Release);
            *state = raised;
        }
        Ok(())
    }

    /// Admits a request that concerns no VM (the ISO library) under `term`.
    pub fn admit_term(&self, term: i64) -> Result<(), Error> {
        let mut state = self.lock();
        if term <= 0 {
            return Err(Refusal::Missing.into());
        }
        if term < state.term {
            return Err(Refusal::StaleTerm {
                seen: state.term,
                got: term,
            }
            .into());
        }
        if let Some(raised) = state.observe(term) {
            self.persist(&raised)?;
            self.term.store(raised.term, Ordering::Release);
            *state = raised;
        }
        Ok(())
    }

    /// Raises the term to `term` (a new leader was announced); lower terms are ignored.
    pub fn observe_term(&self, term: i64) -> Result<(), Error> {
        let mut state = self.lock();
        let Some(raised) = state.observe(term) else {
            return Ok(());
        };
        self.persist(&raised)?;
        tracing::info!(
            term,
            previous = state.term,
            "fence: new serving term announced"
        );
        self.term.store(raised.term, Ordering::Release);
        *state = raised;
        Ok(())
    }

    /// The highest term seen.
    pub fn term(&self) -> i64 {
        self.term.load(Ordering::Acquire)
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

    #[test]
    fn admit_term_refuses_older_terms_and_keeps_newer_ones() {
        let dir = tempfile::tempdir().unwrap();
        let fence = Fence::open(&dir.path().join("fence.json")).unwrap();
        fence.admit_term(7).unwrap();

        let older = fence.admit_term(6).unwrap_err();

        assert!(matches!(
            older,
            Error::Refused(Refusal::StaleTerm { seen: 7, got: 6 })
        ));
        assert!(matches!(
            fence.admit_term(0),
            Err(Error::Refused(Refusal::Missing))
        ));
        assert_eq!(fence.term(), 7);
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

        let err = fence
            .admit(
                Token {
                    term: 11,
                    generation: 1,
                },
                VM,
            )
            .unwrap_err();

        assert!(matches!(
            err,
            Error::Refused(Refusal::StaleTerm { seen: 12, got: 11 })
        ));
    }
}

//! The pair's tokens: those made through the API, kept in etcd under [`TOKENS`], and those
//! of the controllers' token file (the install's first admin token, which no etcd mishap
//! can take away). A token checked recently is trusted from memory for a few seconds, and
//! for as long as etcd does not answer: reads keep working through an etcd election.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use proto::auth::{Role, Token, TokenRecord};

use crate::error::chain;
use crate::store::Etcd;

/// Prefix of the tokens made through the API.
pub const TOKENS: &str = "/pairvisor/tokens/";
/// How long a checked token is trusted without asking etcd again: a deleted token is
/// refused within this.
const FRESH_FOR: Duration = Duration::from_secs(5);
/// How long a token check may wait for etcd.
const BUDGET: Duration = Duration::from_secs(3);

/// Errors of the token store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token file cannot be read.
    #[error("reading the token file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The token file is not a JSON list of token records.
    #[error("the token file {path} is not a JSON list of tokens")]
    FileFormat {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// etcd failed.
    #[error("the pair's state store")]
    Etcd(#[from] daemon::etcd::Error),
    /// The system's random source failed.
    #[error(transparent)]
    Random(#[from] proto::auth::TokenError),
    /// No token has that ID.
    #[error("no token has ID {id}; `pvctl token-list` lists them")]
    NotFound {
        /// The ID asked for.
        id: String,
    },
    /// Tokens are checked against the token file only (tests): none can be made or deleted.
    #[error("this controller keeps no tokens of its own: only its token file's are known")]
    NoStore,
    /// The token comes from the token file.
    #[error(
        "token {id} comes from the controllers' token file {path}; remove it there (on both hosts)"
    )]
    FromFile {
        /// The token's ID.
        id: String,
        /// The file.
        path: PathBuf,
    },
}

/// Why a token was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token of that ID, or not its secret: deleted, or mistyped.
    Unknown,
    /// etcd did not answer and the token is not known from before.
    Unavailable(String),
}

/// The pair's tokens.
#[derive(Debug)]
pub struct Tokens {
    /// The token file's tokens by ID, and the file.
    file: (HashMap<String, TokenRecord>, PathBuf),
    etcd: Option<Etcd>,
    /// Tokens from etcd checked lately, with when.
    seen: Mutex<HashMap<String, (TokenRecord, Instant)>>,
}

impl Tokens {
    /// The tokens of `file` and of `etcd` (`None`: the file's only).
    pub fn load(file: &Path, etcd: Option<Etcd>) -> Result<Tokens, Error> {
        let text = std::fs::read(file).map_err(|source| Error::ReadFile {
            path: file.to_path_buf(),
            source,
        })?;
        let records: Vec<TokenRecord> =
            serde_json::from_slice(&text).map_err(|source| Error::FileFormat {
                path: file.to_path_buf(),
                source,
            })?;
        Ok(Tokens {
            file: (
                records.into_iter().map(|r| (r.id.clone(), r)).collect(),
                file.to_path_buf(),
            ),
            etcd,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// The record of `token` if the pair knows it and its secret matches.
    pub async fn check(&self, token: &Token) -> Result<TokenRecord, Refusal> {
        let matching = |record: TokenRecord| {
            if token.matches(&record.sha256) {
                Ok(record)
            } else {
                Err(Refusal::Unknown)
            }
        };
        if let Some(record) = self.file.0.get(&token.id) {
            return matching(record.clone());
        }
        let Some(etcd) = &self.etcd else {
            return Err(Refusal::Unknown);
        };
        let seen = self.seen().get(&token.id).cloned();
        if let Some((record, at)) = &seen
            && at.elapsed() < FRESH_FOR
        {
            return matching(record.clone());
        }
        match fetch(etcd, &token.id).await {
            Ok(Some(record)) => {
                self.seen()
                    .insert(token.id.clone(), (record.clone(), Instant::now()));
                matching(record)
            }
            Ok(None) => {
                self.seen().remove(&token.id);
                Err(Refusal::Unknown)
            }
            Err(e) => match seen {
                Some((record, _)) => {
                    tracing::warn!(token = %token.id, error = %chain(&e), "etcd does not answer: admitting a token checked before");
                    matching(record)
                }
                None => Err(Refusal::Unavailable(chain(&e))),
            },
        }
    }

    /// Makes a token named `name` with `role`; returns it with its record.
    pub async fn create(
        &self,
        name: &str,
        role: Role,
        created_by: &str,
    ) -> Result<(TokenRecord, Token), Error> {
        let etcd = self.store()?;
        loop {
            let token = Token::generate()?;
            let record = TokenRecord::of(&token, name, role, created_by, crate::now_unix_ms());
            if self.file.0.contains_key(&token.id) {
                continue;
            }
            let key = format!("{TOKENS}{}", token.id);
            let value = serde_json::to_vec(&record).unwrap_or_default();
            let created = etcd
                .request("storing a token", BUDGET, |mut c| {
                    let txn = Txn::new()
                        .when(vec![Compare::create_revision(
                            key.clone(),
                            CompareOp::Equal,
                            0,
                        )])
                        .and_then(vec![TxnOp::put(key.clone(), value.clone(), None)]);
                    async move { c.txn(txn).await }
                })
                .await?;
            // An ID drawn twice (2^-48 odds): draw again.
            if created.succeeded() {
                return Ok((record, token));
            }
        }
    }

    /// Every token, with whether it comes from the token file.
    pub async fn list(&self) -> Result<Vec<(TokenRecord, bool)>, Error> {
        let mut all: Vec<(TokenRecord, bool)> =
            self.file.0.values().map(|r| (r.clone(), true)).collect();
        if let Some(etcd) = &self.etcd {
            let resp = etcd
                .request("listing tokens", BUDGET, |mut c| async move {
                    c.get(TOKENS, Some(GetOptions::new().with_prefix())).await
                })
                .await?;
            all.extend(
                resp.kvs()
                    .iter()
                    .filter_map(|kv| decode(kv.value()))
                    .map(|r| (r, false)),
            );
        }
        all.sort_by_key(|(r, _)| r.created_unix_ms);
        Ok(all)
    }

    /// Deletes token `id`: calls with it are refused within seconds (`FRESH_FOR`).
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        if self.file.0.contains_key(id) {
            return Err(Error::FromFile {
                id: id.to_string(),
                path: self.file.1.clone(),
            });
        }
        let etcd = self.store()?;
        let key = format!("{TOKENS}{id}");
        let resp = etcd
            .request("deleting a token", BUDGET, |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        self.seen().remove(id);
        if resp.deleted() == 0 {
            return Err(Error::NotFound { id: id.to_string() });
        }
        Ok(())
    }

    fn store(&self) -> Result<&Etcd, Error> {
        self.etcd.as_ref().ok_or(Error::NoStore)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, (TokenRecord, Instant)>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The record of token `id` in etcd, if any.
async fn fetch(etcd: &Etcd, id: &str) -> Result<Option<TokenRecord>, daemon::etcd::Error> {
    let key = format!("{TOKENS}{id}");
    let resp = etcd
        .request("checking a token", BUDGET, |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })
        .await?;
    Ok(resp.kvs().first().and_then(|kv| decode(kv.value())))
}

/// A stored token record; one that does not decode is no token (and is logged).
fn decode(value: &[u8]) -> Option<TokenRecord> {
    serde_json::from_slice(value)
        .inspect_err(
            |e| tracing::error!(error = %e, "a stored token does not decode; it is refused"),
        )
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(records: &[TokenRecord]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), serde_json::to_vec(records).unwrap()).unwrap();
        file
    }

    #[tokio::test]
    async fn file_token_is_admitted_with_its_secret_only() {
        let token = Token::generate().unwrap();
        let record = TokenRecord::of(&token, "install", Role::Admin, "install", 1);
        let file = file_with(std::slice::from_ref(&record));
        let tokens = Tokens::load(file.path(), None).unwrap();
        let forged = Token::parse(&format!("pvt_{}_{}", token.id, "0".repeat(64))).unwrap();

        assert_eq!(tokens.check(&token).await, Ok(record));
        assert_eq!(tokens.check(&forged).await, Err(Refusal::Unknown));
        assert_eq!(
            tokens.check(&Token::generate().unwrap()).await,
            Err(Refusal::Unknown)
        );
    }

    #[tokio::test]
    async fn file_token_cannot_be_deleted_through_the_api() {
        let token = Token::generate().unwrap();
        let file = file_with(&[TokenRecord::of(&token, "x", Role::Admin, "install", 1)]);
        let tokens = Tokens::load(file.path(), None).unwrap();

        let deleted = tokens.delete(&token.id).await;

        assert!(
            matches!(deleted, Err(Error::FromFile { .. })),
            "{deleted:?}"
        );
    }

    #[test]
    fn malformed_token_file_names_the_file() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"{ not json").unwrap();

        let loaded = Tokens::load(file.path(), None);

        let Err(e) = loaded else { panic!("loaded") };
        assert!(e.to_string().contains(&file.path().display().to_string()));
    }
}

//! Access to the pair: which token pvctl presents, `pvctl login`/`logout`/`whoami`, the
//! token commands and the audit log.
//!
//! pvctl takes its token from `PVCTL_TOKEN` (the token's text), else the file named by
//! `--token-file`/`PVCTL_TOKEN_FILE`, else the one `pvctl login` stored
//! (`$XDG_CONFIG_HOME/pairvisor/token` or `~/.config/pairvisor/token`, mode 0600), else the
//! default lab's first admin token if this user may read it.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use proto::auth::{Role, Token};
use proto::v1 as pb;
use serde_json::json;

use crate::client::{Api, Endpoints};
use crate::units::utc;

/// The default lab's first admin token.
const LAB_TOKEN: &str = "/var/lib/pairvisor-lab/pki/admin.token";

/// The access commands.
#[derive(Debug, Subcommand)]
pub enum AccessCmd {
    /// Check a token and store it for later commands (mode 0600). Reads the token from
    /// --token-file, else from standard input.
    Login,
    /// Forget the stored token.
    Logout,
    /// Show the token in use: its ID, name and role.
    Whoami,
    /// Make a token; its text is shown once, here (admin only).
    TokenCreate {
        /// Whose or what it is for: 1-64 letters, digits, '.', '_', '-', '@'.
        name: String,
        /// What it may do.
        #[arg(long, value_enum, default_value_t = RoleArg::ReadOnly)]
        role: RoleArg,
    },
    /// List the tokens (admin only).
    TokenList,
    /// Revoke a token: calls with it are refused within seconds (admin only).
    TokenDelete {
        /// The token's ID (`pvctl token-list`).
        id: String,
    },
    /// Show the audit log, newest first: who called which admin method on what (admin only).
    Audit {
        /// Show at most this many records.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// A token's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Every command.
    Admin,
    /// Only commands that change nothing.
    ReadOnly,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Role {
        match role {
            RoleArg::Admin => Role::Admin,
            RoleArg::ReadOnly => Role::ReadOnly,
        }
    }
}

/// Where `pvctl login` keeps the token.
fn login_file() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("pairvisor").join("token"))
}

fn read_token(path: &Path) -> anyhow::Result<Token> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Token::parse(&text).with_context(|| format!("the token in {}", path.display()))
}

/// The token to present, as the module doc says.
pub fn find_token(token_file: Option<&Path>) -> anyhow::Result<Option<Token>> {
    if let Ok(text) = std::env::var("PVCTL_TOKEN")
        && !text.is_empty()
    {
        return Token::parse(&text).context("PVCTL_TOKEN").map(Some);
    }
    if let Some(path) = token_file {
        return read_token(path).map(Some);
    }
    if let Some(path) = login_file().filter(|p| p.exists()) {
        return read_token(&path).map(Some);
    }
    // The lab's token is root's: another user simply has none.
    Ok(read_token(Path::new(LAB_TOKEN)).ok())
}

/// Writes `token` to `path` (mode 0600, its directory 0700) through a synced temporary file.
fn store(path: &Path, token: &Token) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::files::write_file(path, format!("{token}\n"), 0o600)
}

fn role_name(role: pb::Role) -> &'static str {
    Role::from_pb(role).map_or("unspecified", Role::name)
}

fn caller_json(me: &pb::Caller) -> serde_json::Value {
    json!({ "token_id": me.token_id, "name": me.name, "role": role_name(me.role()) })
}

/// Runs an access command.
pub async fn run(
    command: AccessCmd,
    endpoints: &Endpoints,
    token_file: Option<&Path>,
    timeout: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    let api = Api::new(endpoints, timeout);
    match command {
        AccessCmd::Login => login(endpoints, token_file, timeout, json).await?,
        AccessCmd::Logout => {
            let path = login_file().context("no home directory to keep a token in")?;
            match std::fs::remove_file(&path) {
                Ok(()) => println!("removed {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("not logged in ({} does not exist)", path.display());
                }
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
        AccessCmd::Whoami => {
            let me = api
                .call(pb::WhoAmIRequest {}, |mut c, r| async move {
                    c.who_am_i(r).await
                })
                .await?;
            let text = format!(
                "{} ({}), token {}\n",
                me.name,
                role_name(me.role()),
                me.token_id
            );
            crate::print(json, &caller_json(&me), &text);
        }
        AccessCmd::TokenCreate { name, role } => {
            let request = pb::CreateTokenRequest {
                name,
                role: Role::from(role).to_pb().into(),
            };
            let made = api
                .call(request, |mut c, r| async move { c.create_token(r).await })
                .await?;
            let token = made.token.unwrap_or_default();
            let value = json!({ "id": token.id, "name": token.name, "role": role_name(token.role()), "token": made.secret });
            let text = format!(
                "token {} ({}, {}):\n{}\nIt is shown only now; give it to `pvctl login`.\n",
                token.id,
                token.name,
                role_name(token.role()),
                made.secret
            );
            crate::print(json, &value, &text);
        }
        AccessCmd::TokenList => {
            let list = api
                .call(pb::ListTokensRequest {}, |mut c, r| async move {
                    c.list_tokens(r).await
                })
                .await?;
            crate::print(
                json,
                &tokens_json(&list.tokens),
                &tokens_table(&list.tokens),
            );
        }
        AccessCmd::TokenDelete { id } => {
            api.call(
                pb::DeleteTokenRequest { id: id.clone() },
                |mut c, r| async move { c.delete_token(r).await },
            )
            .await?;
            crate::print(
                json,
                &json!({ "deleted": id }),
                &format!("deleted token {id}\n"),
            );
        }
        AccessCmd::Audit { limit } => {
            let log = api
                .call(pb::ListAuditRequest { limit }, |mut c, r| async move {
                    c.list_audit(r).await
                })
                .await?;
            crate::print(json, &audit_json(&log.records), &audit_table(&log.records));
        }
    }
    Ok(())
}

/// `pvctl login`: checks the given token with the pair, then stores it.
async fn login(
    endpoints: &Endpoints,
    token_file: Option<&Path>,
    timeout: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    let token = match token_file {
        Some(path) => read_token(path)?,
        None => {
            eprint!("token: ");
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the token from standard input")?;
            Token::parse(&line).context("the token given")?
        }
    };
    let with_token = Endpoints {
        token: Some(token.clone()),
        ..endpoints.clone()
    };
    let me = Api::new(&with_token, timeout)
        .call(pb::WhoAmIRequest {}, |mut c, r| async move {
            c.who_am_i(r).await
        })
        .await?;
    let Some(path) = login_file() else {
        bail!("no home directory to keep the token in (set HOME or XDG_CONFIG_HOME)");
    };
    store(&path, &token)?;
    let text = format!(
        "logged in as {} ({}); token kept in {}\n",
        me.name,
        role_name(me.role()),
        path.display()
    );
    crate::print(json, &caller_json(&me), &text);
    Ok(())
}

fn tokens_json(tokens: &[pb::Token]) -> serde_json::Value {
    tokens
        .iter()
        .map(|t| {
            json!({
                "id": t.id, "name": t.name, "role": role_name(t.role()),
                "created_unix_ms": t.created_unix_ms, "created_by": t.created_by,
                "from_file": t.from_file,
            })
        })
        .collect()
}

fn tokens_table(tokens: &[pb::Token]) -> String {
    let mut out = format!(
        "{:<12}  {:<20}  {:<9}  {:<23}  {}\n",
        "ID", "NAME", "ROLE", "CREATED", "BY"
    );
    for t in tokens {
        let by = if t.from_file {
            format!("{} (token file)", t.created_by)
        } else {
            t.created_by.clone()
        };
        out.push_str(&format!(
            "{:<12}  {:<20}  {:<9}  {:<23}  {by}\n",
            t.id,
            t.name,
            role_name(t.role()),
            utc(t.created_unix_ms)
        ));
    }
    out
}

fn audit_json(records: &[pb::AuditRecord]) -> serde_json::Value {
    records
        .iter()
        .map(|r| {
            json!({
                "at_unix_ms": r.at_unix_ms, "token_id": r.token_id, "token_name": r.token_name,
                "method": r.method, "subject": r.subject, "request_id": r.request_id,
                "outcome": r.outcome, "node": r.node,
            })
        })
        .collect()
}

fn audit_table(records: &[pb::AuditRecord]) -> String {
    let mut out = format!(
        "{:<23}  {:<16}  {:<16}  {:<20}  {:<4}  {}\n",
        "TIME", "WHO", "METHOD", "SUBJECT", "NODE", "OUTCOME"
    );
    for r in records {
        out.push_str(&format!(
            "{:<23}  {:<16}  {:<16}  {:<20}  {:<4}  {}\n",
            utc(r.at_unix_ms),
            r.token_name,
            r.method,
            r.subject,
            r.node,
            r.outcome
        ));
    }
    out
}

/// The lab's admin token, for `lab up`'s own calls.
pub fn lab_token(path: &Path) -> anyhow::Result<Token> {
    read_token(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_token_is_private_and_reads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairvisor").join("token");
        let token = Token::generate().unwrap();

        store(&path, &token).unwrap();

        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_token(&path).unwrap(), token);
    }

    #[test]
    fn malformed_token_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "hunter2\n").unwrap();

        let read = read_token(&path);

        let Err(e) = read else { panic!("parsed") };
        assert!(format!("{e:#}").contains(&path.display().to_string()));
    }

    #[test]
    fn audit_table_shows_who_did_what() {
        let record = pb::AuditRecord {
            at_unix_ms: 0,
            token_id: "0a1b2c3d4e5f".into(),
            token_name: "ops".into(),
            method: "DeleteVm".into(),
            subject: "web".into(),
            request_id: String::new(),
            outcome: "ok".into(),
            node: "n0".into(),
        };

        let table = audit_table(&[record]);

        let row = table.lines().nth(1).unwrap();
        assert!(row.contains("ops") && row.contains("DeleteVm") && row.contains("web"));
        assert!(row.ends_with("ok"));
    }
}

//! The API's access methods (who am I, tokens, the audit log), served by either controller
//! straight from etcd, and what each request acts on for its audit record.

use proto::auth::Role;
use proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::audit::{self, Audit, Subject};
use crate::auth::Caller;
use crate::auth::tokens::{self, Tokens};
use crate::error::{ApiError, chain};

/// The caller the guard admitted (the API is only served behind it).
pub fn caller<T>(request: &Request<T>) -> Result<Caller, ApiError> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("the call reached the API without its caller".into()))
}

/// The API's tokens, or the error that the pair keeps none (tokens are off).
fn store(tokens: Option<&Tokens>) -> Result<&Tokens, ApiError> {
    tokens.ok_or_else(|| {
        ApiError::FailedPrecondition(
            "this pair runs without tokens ([auth] is not in the controllers' config)".into(),
        )
    })
}

fn token_to_pb(record: proto::auth::TokenRecord, from_file: bool) -> pb::Token {
    pb::Token {
        id: record.id,
        name: record.name,
        role: record.role.to_pb().into(),
        created_unix_ms: record.created_unix_ms,
        created_by: record.created_by,
        from_file,
    }
}

/// A token name: 1 to 64 letters, digits, '.', '_', '-' or '@'.
fn valid_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "name",
            "give 1 to 64 letters, digits, '.', '_', '-' or '@' (whose or what the token is for)",
        ))
    }
}

fn store_error(e: &tokens::Error) -> ApiError {
    match e {
        tokens::Error::NotFound { .. } => ApiError::TokenNotFound(e.to_string()),
        tokens::Error::FromFile { .. } | tokens::Error::NoStore => {
            ApiError::FailedPrecondition(e.to_string())
        }
        _ => ApiError::Unavailable(chain(e)),
    }
}

/// WhoAmI.
pub fn who_am_i(request: &Request<pb::WhoAmIRequest>) -> Result<Response<pb::Caller>, Status> {
    let caller = caller(request)?;
    Ok(Response::new(pb::Caller {
        token_id: caller.token_id,
        name: caller.name,
        role: caller.role.to_pb().into(),
    }))
}

/// CreateToken.
pub async fn create_token(
    tokens: Option<&Tokens>,
    audit: &Audit,
    request: Request<pb::CreateTokenRequest>,
) -> Result<Response<pb::CreateTokenResponse>, Status> {
    let caller = caller(&request)?;
    let message = request.into_inner();
    let result = async {
        valid_name(&message.name)?;
        let role = Role::from_pb(message.role())
            .ok_or_else(|| ApiError::invalid("role", "give admin or read-only"))?;
        let (record, token) = store(tokens)?
            .create(&message.name, role, &caller.name)
            .await
            .map_err(|e| store_error(&e))?;
        tracing::info!(token = %record.id, name = %record.name, role = record.role.name(), by = %caller.name, "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(token_to_pb(record, false)),
            secret: token.to_string(),
        }))
    }
    .await;
    let subject = result.as_ref().map_or(message.name.clone(), |r| {
        let id = r.get_ref().token.as_ref().map(|t| t.id.as_str());
        format!("token {} ({})", message.name, id.unwrap_or_default())
    });
    audit
        .record(&caller, subject, None, audit::outcome(&result))
        .await;
    result
}

/// ListTokens.
pub async fn list_tokens(
    tokens: Option<&Tokens>,
) -> Result<Response<pb::ListTokensResponse>, Status> {
    let all = store(tokens)?.list().await.map_err(|e| store_error(&e))?;
    Ok(Response::new(pb::ListTokensResponse {
        tokens: all
            .into_iter()
            .map(|(record, from_file)| token_to_pb(record, from_file))
            .collect(),
    }))
}

/// DeleteToken.
pub async fn delete_token(
    tokens: Option<&Tokens>,
    audit: &Audit,
    request: Request<pb::DeleteTokenRequest>,
) -> Result<Response<pb::DeleteTokenResponse>, Status> {
    let caller = caller(&request)?;
    let id = request.into_inner().id;
    let result: Result<_, Status> = async {
        store(tokens)?
            .delete(&id)
            .await
            .map_err(|e| store_error(&e))?;
        tracing::info!(token = %id, by = %caller.name, "token deleted");
        Ok(Response::new(pb::DeleteTokenResponse {}))
    }
    .await;
    audit
        .record(
            &caller,
            format!("token {id}"),
            None,
            audit::outcome(&result),
        )
        .await;
    result
}

/// ListAudit.
pub async fn list_audit(
    audit: &Audit,
    request: Request<pb::ListAuditRequest>,
) -> Result<Response<pb::ListAuditResponse>, Status> {
    let records = audit
        .list(request.into_inner().limit)
        .await
        .map_err(|e| ApiError::Unavailable(chain(&e)))?;
    Ok(Response::new(pb::ListAuditResponse {
        records: records
            .into_iter()
            .map(|r| pb::AuditRecord {
                at_unix_ms: r.at_unix_ms,
                token_id: r.token_id,
                token_name: r.token_name,
                method: r.method,
                subject: r.subject,
                request_id: r.request_id,
                outcome: r.outcome,
                node: r.node,
            })
            .collect(),
    }))
}

/// Implements [`Subject`] for request types from a field expression.
macro_rules! subjects {
    ($($ty:ty => |$m:ident| $subject:expr),* $(,)?) => {
        $(impl Subject for $ty {
            fn subject(&self) -> String {
                let $m = self;
                $subject
            }
        })*
    };
}

subjects! {
    pb::CreateVmRequest => |m| m.name.clone(),
    pb::StartVmRequest => |m| m.vm.clone(),
    pb::ShutdownVmRequest => |m| m.vm.clone(),
    pb::PowerOffVmRequest => |m| m.vm.clone(),
    pb::DeleteVmRequest => |m| m.vm.clone(),
    pb::ModifyVmRequest => |m| m.vm.clone(),
    pb::GetVmRequest => |m| m.vm.clone(),
    pb::ListVmsRequest => |_m| String::new(),
    pb::ListNodesRequest => |_m| String::new(),
    pb::ListAlertsRequest => |_m| String::new(),
    pb::ClearAlertRequest => |m| format!("alert {}", m.id),
    pb::GetHealthConfigRequest => |_m| String::new(),
    pb::HealthConfig => |m| format!("health config (path timeout {} ms, lost after {} ms)", m.path_timeout_ms, m.lost_confirm_ms),
    pb::CreateSnapshotRequest => |m| m.vm.clone(),
    pb::ListSnapshotsRequest => |m| m.vm.clone(),
    pb::DeleteSnapshotRequest => |m| format!("{} snapshot {}", m.vm, m.id),
    pb::RestoreSnapshotRequest => |m| format!("{} snapshot {}", m.vm, m.id),
    pb::ExportVmRequest => |m| if m.snapshot.is_empty() { m.vm.clone() } else { format!("{} snapshot {}", m.vm, m.snapshot) },
    pb::ListIsosRequest => |_m| String::new(),
    pb::DeleteIsoRequest => |m| format!("ISO {}", m.name),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_names_are_checked() {
        let refused =
            |name: &str| matches!(valid_name(name), Err(ApiError::InvalidArgument { .. }));

        assert!(!refused("ops@site-1"));
        assert!(refused(""));
        assert!(refused("two words"));
        assert!(refused(&"x".repeat(65)));
    }

    #[test]
    fn call_without_caller_is_an_internal_error() {
        let request = Request::new(pb::WhoAmIRequest {});

        let refused = who_am_i(&request).unwrap_err();

        assert_eq!(refused.code(), tonic::Code::Internal);
    }

    #[test]
    fn who_am_i_says_the_callers_token() {
        let mut request = Request::new(pb::WhoAmIRequest {});
        request.extensions_mut().insert(Caller {
            token_id: "0a1b2c3d4e5f".into(),
            name: "ops".into(),
            role: Role::ReadOnly,
            method: "WhoAmI".into(),
        });

        let me = who_am_i(&request).unwrap().into_inner();

        assert_eq!(me.name, "ops");
        assert_eq!(me.role(), pb::Role::ReadOnly);
    }
}

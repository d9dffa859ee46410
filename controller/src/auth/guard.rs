//! The guard in front of the public API: admits a call only with a known token whose role
//! may call the method, and hands the caller on to the API in the call's extensions.
//! A refusal is a gRPC status the client can act on; an admin method refused to a
//! read-only token is also written to the audit log.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use super::tokens::{Refusal, Tokens};
use super::{Caller, policy};
use crate::api::Access;

/// `inner` (a gRPC service) behind the token check.
#[derive(Clone, Debug)]
pub struct Guarded<S> {
    inner: S,
    access: Access,
}

impl<S> Guarded<S> {
    /// Guards `inner` with `access`' tokens (none: every call is admitted as an anonymous
    /// admin, tests only), recording refusals in its audit log and every call in its metrics.
    pub fn new(inner: S, access: Access) -> Guarded<S> {
        Guarded { inner, access }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

type Reply = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> Service<http::Request<Body>> for Guarded<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Reply;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Reply {
        // The clone is not ready; the one polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let access = self.access.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let method = policy::method_of(request.uri().path()).to_string();
            let metadata = MetadataMap::from_headers(request.headers().clone());
            let response = match admit(access.tokens.as_deref(), &metadata, &method).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await?
                }
                Err(refused) => {
                    if let Some(caller) = &refused.caller {
                        access.audit.refused(caller, &refused.status).await;
                    }
                    tracing::warn!(method, code = ?refused.status.code(), reason = refused.status.message(), "API call refused");
                    refused.status.into_http()
                }
            };
            let code = code_of(&response);
            access.metrics.observe_call(
                &method,
                &format!("{code:?}"),
                started.elapsed().as_secs_f64(),
            );
            Ok(response)
        })
    }
}

/// The gRPC code of a response: in its headers when it failed at once (trailers-only),
/// else OK (a unary call's status follows its message, a stream's its end).
fn code_of(response: &http::Response<Body>) -> tonic::Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

/// A refused call: the status to answer, and the caller if the token was good.
#[derive(Debug)]
pub struct Refused {
    /// What the client is told.
    pub status: Status,
    /// The token's owner, when only its role was wanting.
    pub caller: Option<Caller>,
}

/// The caller of a call to `method` carrying `metadata`, if it may make it.
pub async fn admit(
    tokens: Option<&Tokens>,
    metadata: &MetadataMap,
    method: &str,
) -> Result<Caller, Refused> {
    let Some(tokens) = tokens else {
        return Ok(Caller::anonymous(method));
    };
    let unauthenticated = |message: String| Refused {
        status: Status::unauthenticated(message),
        caller: None,
    };
    let token = match proto::auth::presented(metadata) {
        None => {
            return Err(unauthenticated(
                "this call needs a token: log in with `pvctl login` (or set PVCTL_TOKEN); an admin makes tokens with `pvctl token-create`".into(),
            ));
        }
        Some(Err(e)) => return Err(unauthenticated(format!("authorization: {e}"))),
        Some(Ok(token)) => token,
    };
    let record = match tokens.check(&token).await {
        Ok(record) => record,
        Err(Refusal::Unknown) => {
            return Err(unauthenticated(format!(
                "the pair does not know token {} (deleted, or its secret mistyped); log in with a valid token",
                token.id
            )));
        }
        Err(Refusal::Unavailable(why)) => {
            return Err(Refused {
                status: Status::unavailable(format!(
                    "cannot check the call's token: the pair's state store does not answer ({why}); retry"
                )),
                caller: None,
            });
        }
    };
    let caller = Caller {
        token_id: record.id,
        name: record.name,
        role: record.role,
        method: method.to_string(),
    };
    let needed = policy::needs(method);
    if !caller.role.may(needed) {
        return Err(Refused {
            status: Status::permission_denied(format!(
                "token {} ({}) is {}; {method} needs an {} token",
                caller.name,
                caller.token_id,
                caller.role.name(),
                needed.name()
            )),
            caller: Some(caller),
        });
    }
    Ok(caller)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::auth::{Role, Token, TokenRecord};

    struct Pair {
        tokens: Tokens,
        admin: Token,
        reader: Token,
        _file: tempfile::NamedTempFile,
    }

    fn pair() -> Pair {
        let admin = Token::generate().unwrap();
        let reader = Token::generate().unwrap();
        let records = [
            TokenRecord::of(&admin, "root", Role::Admin, "install", 1),
            TokenRecord::of(&reader, "watcher", Role::ReadOnly, "root", 2),
        ];
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), serde_json::to_vec(&records).unwrap()).unwrap();
        Pair {
            tokens: Tokens::load(file.path(), None).unwrap(),
            admin,
            reader,
            _file: file,
        }
    }

    fn carrying(token: &Token) -> MetadataMap {
        let mut request = tonic::Request::new(());
        token.bearer().apply(&mut request);
        request.metadata().clone()
    }

    #[tokio::test]
    async fn call_without_token_is_unauthenticated() {
        let pair = pair();

        let refused = admit(Some(&pair.tokens), &MetadataMap::new(), "ListVms")
            .await
            .unwrap_err();

        assert_eq!(refused.status.code(), tonic::Code::Unauthenticated);
        assert!(refused.status.message().contains("pvctl login"));
    }

    #[tokio::test]
    async fn unknown_token_is_unauthenticated() {
        let pair = pair();

        let refused = admit(
            Some(&pair.tokens),
            &carrying(&Token::generate().unwrap()),
            "ListVms",
        )
        .await
        .unwrap_err();

        assert_eq!(refused.status.code(), tonic::Code::Unauthenticated);
        assert!(refused.caller.is_none());
    }

    #[tokio::test]
    async fn read_only_token_reads_but_may_not_change() {
        let pair = pair();
        let metadata = carrying(&pair.reader);

        let read = admit(Some(&pair.tokens), &metadata, "ListVms")
            .await
            .unwrap();
        let refused = admit(Some(&pair.tokens), &metadata, "CreateVm")
            .await
            .unwrap_err();

        assert_eq!(read.name, "watcher");
        assert_eq!(refused.status.code(), tonic::Code::PermissionDenied);
        assert!(
            refused
                .status
                .message()
                .contains("CreateVm needs an admin token")
        );
        assert_eq!(refused.caller.map(|c| c.name).as_deref(), Some("watcher"));
    }

    #[tokio::test]
    async fn admin_token_may_change() {
        let pair = pair();

        let caller = admit(Some(&pair.tokens), &carrying(&pair.admin), "DeleteVm")
            .await
            .unwrap();

        assert_eq!(caller.role, Role::Admin);
        assert_eq!(caller.method, "DeleteVm");
        assert!(caller.audited());
    }
}

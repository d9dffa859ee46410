//! The console's live view of a VM's screen: a websocket at `/vnc/{vm}` carrying RFB between
//! the browser's noVNC and the VM's QEMU, relayed by the agent of the host the VM runs on
//! (QEMU serves VNC on a Unix socket only that agent reaches). A browser cannot set headers
//! on a websocket, so the token rides in a subprotocol, `pairvisor.token.<token>`, beside
//! `binary`. Only an admin may open one (it types into the guest); each session is audited.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::api::{Access, Api};
use crate::auth::Caller;
use crate::auth::guard::admit;
use crate::error::ApiError;
use crate::model::Mode;

/// The name the role policy and the audit log know the websocket by.
pub const METHOD: &str = "/vnc";
/// The subprotocol the server answers with (noVNC's frames are binary).
const PROTOCOL: &str = "binary";
/// The subprotocol prefix that carries the caller's token.
const TOKEN_PREFIX: &str = "pairvisor.token.";
/// Messages from the browser queued towards the agent.
const QUEUE: usize = 32;

/// What the handlers share.
#[derive(Clone, Debug)]
struct Screens {
    api: Api,
    access: Access,
}

/// Adds the `/vnc/{vm}` websocket to `router`.
pub fn add_route(router: axum::Router, api: Api, access: Access) -> axum::Router {
    let screens = Screens { api, access };
    router.route("/vnc/{vm}", axum::routing::get(open).with_state(screens))
}

/// Admits the caller, reaches the VM's screen through its agent, then upgrades.
async fn open(
    State(screens): State<Screens>,
    Path(vm): Path<String>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let caller = match admit_caller(&screens.access, &headers).await {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let audit = |outcome: String| {
        let (access, caller, vm) = (screens.access.clone(), caller.clone(), vm.clone());
        async move {
            access
                .audit
                .record(&caller, format!("vm {vm}"), None, outcome)
                .await;
        }
    };
    let (record, agent) = match screens.api.agent_of(&vm).await {
        Ok(found) => found,
        Err(e) => {
            audit(format!("refused: {e}")).await;
            return refusal(&e);
        }
    };
    if record.mode == Mode::Ft {
        let e = ApiError::FailedPrecondition(format!(
            "VM {} is FT: FT VMs have no screen (a checkpoint would have to carry video memory); use its serial console",
            record.name
        ));
        audit(format!("refused: {e}")).await;
        return refusal(&e);
    }
    let (to_agent, from_browser) = mpsc::channel::<Vec<u8>>(QUEUE);
    let replies = match agent
        .vnc(&record.uuid, ReceiverStream::new(from_browser))
        .await
    {
        Ok(replies) => replies,
        Err(e) => {
            let e = ApiError::FailedPrecondition(daemon::error_chain(&e));
            audit(format!("refused: {e}")).await;
            return refusal(&e);
        }
    };
    audit("opened".to_string()).await;
    let (name, node, who) = (record.name, record.node, caller.name);
    ws.protocols([PROTOCOL])
        .on_upgrade(move |socket| async move {
            tracing::info!(vm = %name, node = %node, caller = %who, "VNC session begin");
            let outcome = pipe(socket, to_agent, replies).await;
            tracing::info!(vm = %name, node = %node, caller = %who, outcome, "VNC session end");
        })
}

/// The caller of a websocket request whose token is in its subprotocols, if an admin.
async fn admit_caller(access: &Access, headers: &HeaderMap) -> Result<Caller, Response> {
    let mut metadata = MetadataMap::new();
    if let Some(token) = token_of(headers) {
        let Ok(value) = MetadataValue::try_from(format!("Bearer {token}")) else {
            return Err((StatusCode::UNAUTHORIZED, "the token is not text\n").into_response());
        };
        metadata.insert("authorization", value);
    }
    match admit(access.tokens.as_deref(), &metadata, METHOD).await {
        Ok(caller) => Ok(caller),
        Err(refused) => {
            if let Some(caller) = &refused.caller {
                access.audit.refused(caller, &refused.status).await;
            }
            tracing::warn!(method = METHOD, code = ?refused.status.code(), reason = refused.status.message(), "VNC websocket refused");
            Err(crate::front::http_refusal(&refused.status))
        }
    }
}

/// The token among the request's websocket subprotocols.
fn token_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(TOKEN_PREFIX).map(str::to_string))
}

/// An API error as the HTTP answer to the upgrade request.
fn refusal(e: &ApiError) -> Response {
    crate::front::http_refusal(&tonic::Status::from(e.clone()))
}

/// Carries the session until either side ends; says which did.
async fn pipe(
    mut socket: WebSocket,
    to_agent: mpsc::Sender<Vec<u8>>,
    mut replies: tonic::Streaming<proto::agent::VncData>,
) -> String {
    loop {
        tokio::select! {
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(data))) => {
                    if to_agent.send(data.to_vec()).await.is_err() {
                        return "the agent's side closed".into();
                    }
                }
                Some(Ok(Message::Close(_))) | None => return "the browser closed".into(),
                // Pings are answered by the websocket layer; RFB sends no text.
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("the browser's side failed: {e}"),
            },
            reply = replies.message() => match reply {
                Ok(Some(piece)) => {
                    if let Err(e) = socket.send(Message::Binary(piece.data.into())).await {
                        return format!("sending to the browser failed: {e}");
                    }
                }
                Ok(None) => {
                    let _ = socket.send(Message::Close(None)).await;
                    return "the VM's screen closed (VM stopped?)".into();
                }
                Err(status) => {
                    let _ = socket.send(Message::Close(None)).await;
                    return format!("the agent failed: {}", status.message());
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_found_among_the_subprotocols() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "sec-websocket-protocol",
            "binary, pairvisor.token.pvt_ab12_0f0f".parse().unwrap(),
        );
        assert_eq!(token_of(&headers).as_deref(), Some("pvt_ab12_0f0f"));
        headers.insert("sec-websocket-protocol", "binary".parse().unwrap());
        assert_eq!(token_of(&headers), None);
        assert_eq!(token_of(&HeaderMap::new()), None);
    }
}

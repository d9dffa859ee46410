//! What a controller serves on its API port: the public gRPC API behind the token guard (also
//! as gRPC-Web, for the browser console), the console's files ([`crate::console`]) and its
//! VNC websocket ([`crate::vnc`]), the unauthenticated `GET /health` ([`crate::status`]) and
//! `GET /metrics` ([`crate::metrics`], for any token: Prometheus' `authorization` with a
//! read-only one). [`crate::serve`] serves them.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use tonic::metadata::MetadataMap;
use tonic::service::Routes;
use tower_layer::Layer;

use crate::api::{Access, Api};
use crate::auth::guard::{Guarded, admit};
use crate::status::{Health, Level};

/// The routes of the API port of controller `node`.
pub fn routes(api: Api, access: &Access, health: Arc<Health>, node: &str) -> axum::Router {
    // gRPC-Web is translated to gRPC before the guard, so both meet the same checks.
    let grpc = tonic_web::GrpcWebLayer::new().layer(Guarded::new(
        proto::v1::pairvisor_server::PairvisorServer::new(api.clone()),
        access.clone(),
    ));
    let status = health.clone();
    let scrape = Scrape {
        api: api.clone(),
        access: access.clone(),
        health,
        node: node.to_string(),
    };
    let router = Routes::new(grpc).prepare().into_axum_router();
    let router = crate::console::add_routes(router);
    crate::vnc::add_route(router, api, access.clone())
        .route(
            "/health",
            axum::routing::get(move || async move {
                let level = status.level().await;
                let code = match level {
                    Level::Failed => StatusCode::SERVICE_UNAVAILABLE,
                    Level::Ok | Level::Warning => StatusCode::OK,
                };
                (code, format!("{}\n", level.word()))
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(
                move |headers: HeaderMap| async move { scrape.answer(headers).await },
            ),
        )
}

/// A refused token check as a plain HTTP answer: its status code and the API's words.
pub fn http_refusal(status: &tonic::Status) -> axum::response::Response {
    let code = match status.code() {
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, format!("{}\n", status.message())).into_response()
}

/// What `/metrics` needs.
#[derive(Clone, Debug)]
struct Scrape {
    api: Api,
    access: Access,
    health: Arc<Health>,
    node: String,
}

impl Scrape {
    async fn answer(&self, headers: HeaderMap) -> axum::response::Response {
        let metadata = MetadataMap::from_headers(headers);
        if let Err(refused) = admit(self.access.tokens.as_deref(), &metadata, "/metrics").await {
            return http_refusal(&refused.status);
        }
        let level = self.health.level().await;
        let text = self
            .access
            .metrics
            .render(&self.node, level, self.api.pair_view().as_ref());
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
    }
}

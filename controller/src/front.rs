//! What a controller serves on its API port: the public gRPC API behind the token guard,
//! and the unauthenticated `GET /health` ([`crate::status`]).

use std::sync::Arc;

use axum::http::StatusCode;
use tonic::service::Routes;

use crate::api::{Access, Api};
use crate::auth::guard::Guarded;
use crate::status::{Health, Level};

/// The routes of the API port.
pub fn routes(api: Api, access: &Access, health: Arc<Health>) -> Routes {
    let grpc = Guarded::new(
        proto::v1::pairvisor_server::PairvisorServer::new(api),
        access.tokens.clone(),
        access.audit.clone(),
    );
    let router = Routes::new(grpc).prepare().into_axum_router().route(
        "/health",
        axum::routing::get(move || async move {
            let level = health.level().await;
            let code = match level {
                Level::Failed => StatusCode::SERVICE_UNAVAILABLE,
                Level::Ok | Level::Warning => StatusCode::OK,
            };
            (code, format!("{}\n", level.word()))
        }),
    );
    Routes::from(router)
}

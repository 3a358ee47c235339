//! The HTTP API: router, shared state, one file per endpoint group, extractors and the
//! problem+json error type. Handlers validate, make one call to `staging` (writes) or
//! `store` (reads), and answer; they never touch Redis or SQL directly.

mod consents;
mod data;
mod error;
mod extract;
mod ops;

pub use error::{ApiError, problem};

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::config::Settings;
use crate::staging::Staging;
use crate::store::Store;

/// What handlers share: the two store handles and the settings. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub staging: Staging,
    pub store: Store,
    pub settings: Arc<Settings>,
}

/// The whole API. Paths also answer with a trailing `/`, as the predecessor's did.
pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.max_body_bytes;
    Router::new()
        .route("/data", get(data::list))
        .route("/data/", get(data::list))
        .route("/data/{customer_id}/{dialog_id}", post(data::ingest))
        .route("/data/{customer_id}/{dialog_id}/", post(data::ingest))
        .route("/consents/{dialog_id}", post(consents::decide))
        .route("/consents/{dialog_id}/", post(consents::decide))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

//! The HTTP API: router, shared state, one file per endpoint group, extractors, access,
//! limits, the OpenAPI document and the problem+json error type. Handlers read and
//! validate requests into the domain's types, call `ingest`, `erasure`, `staging` or
//! `store` for the work (an ingest one script call, or two with a PostgreSQL lookup
//! between for a dialog new to Redis; a decision up to six calls: `crate::ingest`), and
//! map the outcome to a status and a body; they never touch Redis or SQL directly.

mod access;
mod consents;
mod data;
mod encoding;
mod error;
mod export;
mod extract;
mod ingest;
mod json;
mod limits;
mod observe;
mod openapi;
mod ops;
mod privacy;

pub use access::{Access, Caller, Role};
pub use error::{ApiError, problem};

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, OriginalUri, Request};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::{Extension, Router};
use tower::ServiceBuilder;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::router::UtoipaMethodRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::{Config, SwaggerUi};

use crate::staging::Staging;
use crate::store::Store;
use limits::{Guard, Limits};
use observe::observe;

/// What handlers share: the two store handles and the settings, behind one `Arc` — axum
/// clones the state for every request, and this makes that clone one reference count
/// (measured in BENCHMARKS.md, "Ingest").
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`].
#[derive(Debug)]
pub struct Shared {
    pub staging: Staging,
    pub store: Store,
    pub settings: Arc<crate::config::Settings>,
    /// Dialogs this process staged lately (see [`crate::ingest::Recent`]).
    recent: crate::ingest::Recent,
}

impl AppState {
    pub fn new(staging: Staging, store: Store, settings: Arc<crate::config::Settings>) -> Self {
        Self(Arc::new(Shared {
            staging,
            store,
            settings,
            recent: crate::ingest::Recent::default(),
        }))
    }

    /// What staging a message needs of the shared state.
    fn ingest_path(&self) -> crate::ingest::IngestPath<'_> {
        crate::ingest::IngestPath {
            staging: &self.staging,
            store: &self.store,
            recent: &self.recent,
            staging_ttl: self.settings.staging_ttl,
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Every documented route, grouped by what guards it. The OpenAPI document is gathered
/// from this same list, so a route cannot be served without being described.
fn routes(
    access: Access,
    limits: Limits,
    batch_bytes: usize,
    ingest: UtoipaMethodRouter<AppState>,
) -> OpenApiRouter<AppState> {
    let guard = |role| Guard {
        limits: limits.clone(),
        access: access.clone(),
        role,
    };
    // A batch may be larger than any other body; its route sets its own limit (inner
    // layers run after the router-wide `DefaultBodyLimit` and override it).
    let batch = OpenApiRouter::new()
        .routes(routes!(ingest::ingest_batch))
        .layer(DefaultBodyLimit::max(batch_bytes));
    // Layers run outside in, as listed: the guard (limits, token), then the body's
    // decoding. One `ServiceBuilder` rather than a `route_layer` each: axum boxes every
    // layer added on its own and clones the boxes on every request (~9 % of a single
    // POST's instructions with six).
    let ingest = OpenApiRouter::new()
        .routes(ingest)
        .routes(routes!(consents::decide))
        .merge(batch)
        .route_layer(
            ServiceBuilder::new()
                .layer(from_fn_with_state(guard(Role::Ingest), limits::guard))
                .layer(from_fn(encoding::decode_bodies)),
        );
    let read = OpenApiRouter::new()
        .routes(routes!(data::list))
        .routes(routes!(export::export))
        .route_layer(
            ServiceBuilder::new()
                .layer(from_fn_with_state(guard(Role::Read), limits::guard))
                .layer(from_fn(encoding::spell_out_any_coding))
                .layer(encoding::encoding()),
        );
    let privacy = OpenApiRouter::new()
        .routes(routes!(privacy::erase_customer))
        .routes(routes!(privacy::erasure_receipt))
        .routes(routes!(privacy::audit))
        .route_layer(from_fn_with_state(guard(Role::Privacy), limits::guard));
    let status = OpenApiRouter::new()
        .routes(routes!(privacy::consent_status))
        .route_layer(from_fn_with_state(guard(Role::Status), limits::guard));
    let api = ingest.merge(read).merge(privacy).merge(status);
    let operations = operations().routes(routes!(ops::openapi));
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(api)
        .merge(operations)
}

/// The operations endpoints every dapi process serves, whatever its role: liveness,
/// readiness, metrics. No token, no limits.
fn operations() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
}

/// The whole API, with the browsable document at `/docs`.
pub fn router(state: AppState) -> Router {
    build(state, routes!(ingest::ingest))
}

/// The whole API with `ingest` in place of dapi's handler for
/// `POST /data/{customerId}/{dialogId}`: the same routes, layers and limits around it.
/// The ingest benchmark serves a handler that answers without Redis through it, to
/// measure what the layers cost (`benches/ingest.rs`); dapi itself never calls it.
pub fn router_with_ingest(state: AppState, ingest: UtoipaMethodRouter<AppState>) -> Router {
    build(state, ingest)
}

/// The operations endpoints alone (`/healthz`, `/readyz`, `/metrics`), for a process
/// that runs no API (`dapi flusher`), so that orchestrators and scrapers reach every
/// role the same way. Anything else answers 404 `not_found`.
pub fn ops_router(state: AppState) -> Router {
    let (operations, _) = operations().split_for_parts();
    operations
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(from_fn(observe))
        .with_state(state)
}

fn build(state: AppState, ingest: UtoipaMethodRouter<AppState>) -> Router {
    let body_limit = state.settings.max_body_bytes;
    let settings = &state.settings;
    let access = Access::new(&settings.tokens);
    let limits = Limits::new(settings.max_in_flight, settings.request_timeout);
    let (api, document) = routes(access, limits, settings.max_batch_bytes, ingest).split_for_parts();
    let document = Arc::new(serde_json::to_value(&document).unwrap_or_default());
    api.merge(SwaggerUi::new("/docs").config(Config::new(["/openapi.json"])))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(
            ServiceBuilder::new()
                .layer(Extension(document))
                .layer(DefaultBodyLimit::max(body_limit))
                .layer(from_fn(observe)),
        )
        .with_state(state)
}

/// What every request goes through before the router (`app::serve` applies it): records
/// the URI as sent (`OriginalUri`, for `next`/`previous` links), then answers `/data/`
/// and `/data/1/2/` as their routes without the slash, as the predecessor's clients
/// expect (`/docs/` keeps its own: the page lives there). A plain function in `serve`'s
/// `map_request` rather than a router around the router: that one was a second routing
/// pass and three boxed futures on every request (`Router::layer` cannot do it: it runs
/// after routing, too late to change the path matched).
pub fn before_routing(mut request: Request) -> Request {
    if request.extensions().get::<OriginalUri>().is_none() {
        let original = OriginalUri(request.uri().clone());
        request.extensions_mut().insert(original);
    }
    drop_trailing_slash(request)
}

fn drop_trailing_slash(mut request: Request) -> Request {
    let path = request.uri().path();
    if path.len() > 1 && path.ends_with('/') && !path.starts_with("/docs") {
        let trimmed = path.trim_end_matches('/');
        let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
        let path_and_query = match request.uri().query() {
            Some(query) => format!("{trimmed}?{query}"),
            None => trimmed.to_owned(),
        };
        let mut parts = request.uri().clone().into_parts();
        if let Ok(pq) = path_and_query.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    request
}

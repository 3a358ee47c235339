//! The HTTP API: router, shared state, one file per endpoint group, extractors, access,
//! limits, the OpenAPI document and the problem+json error type. Handlers validate, make
//! one call to `staging` (writes) or `store` (reads), and answer; they never touch Redis
//! or SQL directly.

mod access;
mod consents;
mod data;
mod error;
mod extract;
mod limits;
mod openapi;
mod ops;

pub use access::{Access, Role};
pub use error::{ApiError, problem};

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, OriginalUri, Request};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::{Extension, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::router::UtoipaMethodRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::{Config, SwaggerUi};

use crate::staging::Staging;
use crate::store::Store;
use limits::{Guard, Limits};

/// What handlers share: the two store handles and the settings. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub staging: Staging,
    pub store: Store,
    pub settings: Arc<crate::config::Settings>,
}

/// Every documented route, grouped by what guards it. The OpenAPI document is gathered
/// from this same list, so a route cannot be served without being described.
fn routes(access: Access, limits: Limits, ingest: UtoipaMethodRouter<AppState>) -> OpenApiRouter<AppState> {
    let guard = |role| Guard {
        limits: limits.clone(),
        access: access.clone(),
        role,
    };
    let ingest = OpenApiRouter::new()
        .routes(ingest)
        .routes(routes!(consents::decide))
        .route_layer(from_fn_with_state(guard(Role::Ingest), limits::guard));
    let read = OpenApiRouter::new()
        .routes(routes!(data::list))
        .route_layer(from_fn_with_state(guard(Role::Read), limits::guard));
    let api = ingest.merge(read);
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

/// The OpenAPI document of this API.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let open = Access::new(&crate::config::Tokens::default());
    let (_, document) = routes(
        open,
        Limits::new(1, std::time::Duration::from_secs(1)),
        routes!(data::ingest),
    )
    .split_for_parts();
    document
}

/// The whole API, with the browsable document at `/docs`.
pub fn router(state: AppState) -> Router {
    build(state, routes!(data::ingest))
}

/// The same router with an ingest handler that validates and answers 202 without
/// touching Redis: the ceiling the ingest benchmark measures dapi against.
pub fn ceiling_router(state: AppState) -> Router {
    build(state, routes!(data::ingest_ceiling))
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
    let (api, document) = routes(access, limits, ingest).split_for_parts();
    let document = Arc::new(serde_json::to_value(&document).unwrap_or_default());
    api.merge(SwaggerUi::new("/docs").config(Config::new(["/openapi.json"])))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(from_fn(observe))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(Extension(document))
        .with_state(state)
}

/// Middleware: one span per request, carrying its request id, which is taken from
/// `x-request-id` when the client sent a sensible one (≤ 64 of `A-Z a-z 0-9 - _ .`),
/// else made up, and returned in the answer's `x-request-id`; and the request metrics.
/// No header, query value or body goes into the span: tokens and customer text stay out
/// of the logs.
async fn observe(mut request: Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::http::HeaderValue;
    use tracing::Instrument;

    const HEADER: &str = "x-request-id";
    let given = request
        .headers()
        .get(HEADER)
        .filter(|v| {
            v.len() <= 64
                && v.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
        })
        .filter(|v| !v.is_empty())
        .cloned();
    let id = given.unwrap_or_else(|| HeaderValue::from_str(&new_request_id()).unwrap_or(HeaderValue::from_static("-")));
    request.headers_mut().insert(HEADER, id.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %id.to_str().unwrap_or("-"),
        method = %request.method(),
        path = %request.uri().path(),
    );
    let started = std::time::Instant::now();
    let route = request.extensions().get::<axum::extract::MatchedPath>().cloned();
    let method = request.method().clone();
    let mut response = async move {
        let response = next.run(request).await;
        limits::measure(route.as_ref(), &method, response.status(), started);
        tracing::debug!(
            status = response.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "answered"
        );
        response
    }
    .instrument(span)
    .await;
    response.headers_mut().insert(HEADER, id);
    response
}

/// A request id unique in this process and, by its prefix, across processes.
fn new_request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = PREFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("{:x}{:x}", std::process::id(), nanos & 0xffff_ffff)
    });
    format!("{prefix}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Prepares a request before routing: keeps the URI as sent (for `next`/`previous`
/// links) and drops a trailing slash, so `/data/` and `/data/1/2/` reach their routes
/// as the predecessor's clients expect. (`/docs/` keeps its own: the page lives there.)
pub fn normalize(mut request: Request) -> Request {
    let original = OriginalUri(request.uri().clone());
    request.extensions_mut().insert(original);
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

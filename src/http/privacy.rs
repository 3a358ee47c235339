//! What a privacy officer (and a bot's backend) asks: where a dialog's consent stands
//! (`GET /consents/{dialogId}`), the erasure of a whole customer with its receipt
//! (`DELETE /customers/{customerId}`, `GET /erasures/{erasureId}`), and the consent and
//! erasure trail (`GET /audit`). The work is `crate::erasure`'s and `store::erasure`'s;
//! these handlers speak HTTP.

use axum::Json;
use axum::extract::{OriginalUri, Path, RawQuery, State};
use axum::http::HeaderMap;
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::access::Caller;
use super::data::{ListQuery, RFC3339_MICROS, base_url};
use super::extract::{ConsentPath, CustomerPath};
use super::{ApiError, AppState};
use crate::domain::{Cursor, CustomerId, Decision, DialogId};
use crate::erasure::{self, ErasureError};
use crate::store::erasure::{AuditEvent, Receipt, audit_position};
use crate::store::time_of;

fn timestamp(at: OffsetDateTime) -> String {
    at.format(RFC3339_MICROS).unwrap_or_default()
}

/// Where a dialog's consent stands.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"dialogId": 7, "customerId": 1, "consent": "granted", "decidedAt": "2026-12-05T10:00:00.123456Z", "staged": 0, "stored": 5, "erasedAt": null}))]
pub struct ConsentStatus {
    dialog_id: i64,
    customer_id: i64,
    /// `pending`, `granted` or `refused`: the latest decision.
    consent: &'static str,
    /// When the latest decision was recorded (null while pending).
    decided_at: Option<String>,
    /// Messages waiting in Redis, not yet stored.
    staged: i64,
    /// Messages readable through GET /data.
    stored: i64,
    /// When the latest completed refusal or customer erasure covering the dialog finished
    /// its erasure (null if none has).
    erased_at: Option<String>,
}

/// Where a dialog's consent stands.
///
/// For the bot's backend and the privacy officer (an ingest or a privacy token); a read
/// token sees granted dialogs only (any other answers 404, as an unknown one).
#[utoipa::path(
    get,
    path = "/consents/{dialogId}",
    tag = "privacy",
    params(("dialogId" = i64, Path, minimum = 0, description = "0 … 9223372036854775807")),
    responses(
        (status = 200, description = "Where the dialog stands", body = ConsentStatus),
        (status = 400, description = "A path ID that is not such an integer (`invalid_id`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 401, description = "No or unknown token (`unauthorized`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 404, description = "dapi knows nothing of the dialog, or a read token asked of one not granted (`dialog_not_found`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 503, description = "Redis or PostgreSQL cannot be reached, or dapi is at its limit (`redis_unavailable`, `postgres_unavailable`, `overloaded`, `request_timeout`)", content_type = "application/problem+json", body = super::error::Problem)
    ),
    security(("bearer" = []))
)]
pub async fn consent_status(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    ConsentPath { dialog }: ConsentPath,
) -> Result<Json<ConsentStatus>, ApiError> {
    let (staged, stored) = tokio::join!(state.staging.status(dialog), state.store.stored_status(dialog));
    let (staged, stored) = (staged?, stored?);
    let stored_grant = stored.as_ref().filter(|s| s.decision == Decision::Granted.as_str());
    let status = match (&staged, &stored) {
        (Some(redis), _) => {
            // Flushed and not yet trimmed: counted once, as stored.
            let last_stored = stored_grant.map_or(0, |s| s.last_seq);
            let waiting = redis.staged.iter().filter(|&&seq| seq > last_stored).count();
            ConsentStatus {
                dialog_id: dialog.get(),
                customer_id: redis.customer.get(),
                consent: redis.decision.as_str(),
                decided_at: (redis.decision != Decision::Pending).then(|| timestamp(time_of(redis.decided_at_us))),
                staged: if redis.decision == Decision::Refused {
                    0
                } else {
                    waiting as i64
                },
                stored: if redis.decision == Decision::Granted {
                    stored_grant.map_or(0, |s| s.stored)
                } else {
                    0
                },
                erased_at: stored.as_ref().and_then(|s| s.erased_at).map(timestamp),
            }
        }
        (None, Some(pg)) => {
            let granted = pg.decision == Decision::Granted.as_str();
            ConsentStatus {
                dialog_id: dialog.get(),
                customer_id: pg.customer_id,
                consent: if granted { "granted" } else { "refused" },
                decided_at: Some(timestamp(pg.decided_at)),
                staged: 0,
                stored: if granted { pg.stored } else { 0 },
                erased_at: pg.erased_at.map(timestamp),
            }
        }
        (None, None) => return Err(ApiError::DialogNotFound),
    };
    // Analysts see only consented data.
    if caller.is_some_and(|c| c.0 == Caller::Read) && status.consent != "granted" {
        return Err(ApiError::DialogNotFound);
    }
    Ok(Json(status))
}

/// An erasure receipt.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"erasureId": "0193a7c2-5b1e-7c3d-9a40-2f6f1d3c8e11", "customerId": 17, "status": "completed", "dialogs": 3, "messages": 42, "requestedAt": "2026-12-05T10:00:00.100000Z", "completedAt": "2026-12-05T10:00:00.140000Z"}))]
pub struct ReceiptOut {
    erasure_id: String,
    customer_id: i64,
    /// `pending` or `completed`.
    status: String,
    /// The customer's dialogs from which this erasure removed at least one message.
    dialogs: i64,
    /// The distinct messages (by dialogId and seq) it removed from Redis and PostgreSQL.
    messages: i64,
    requested_at: String,
    /// Null while pending.
    completed_at: Option<String>,
}

impl From<&Receipt> for ReceiptOut {
    fn from(r: &Receipt) -> Self {
        Self {
            erasure_id: r.erasure_id.hyphenated().to_string(),
            customer_id: r.customer_id,
            status: r.status.clone(),
            dialogs: r.dialogs,
            messages: r.messages,
            requested_at: timestamp(r.requested_at),
            completed_at: r.completed_at.map(timestamp),
        }
    }
}

fn pending(receipt: &Receipt) -> ApiError {
    ApiError::CustomerErasurePending(Box::new(
        serde_json::to_value(ReceiptOut::from(receipt)).unwrap_or_default(),
    ))
}

/// Erase everything of one customer.
///
/// The answer to a data subject's erasure request. Synchronous: when the 200 is sent,
/// every message of the customer acknowledged before the request arrived is gone from
/// Redis, PostgreSQL and reads, and every dialog of the customer dapi knows is refused.
/// Past `DAPI_REQUEST_TIMEOUT`, or with a store away: 503 `erasure_pending` with the
/// receipt (`erasure`), and dapi finishes the erasure by itself.
#[utoipa::path(
    delete,
    path = "/customers/{customerId}",
    tag = "privacy",
    params(("customerId" = i64, Path, minimum = 0, description = "0 … 9223372036854775807")),
    responses(
        (status = 200, description = "Erased: the receipt", body = ReceiptOut),
        (status = 400, description = "A path ID that is not such an integer (`invalid_id`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 401, description = "No or unknown token (`unauthorized`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 403, description = "Not a privacy token (`forbidden`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 503, description = "`erasure_pending`: recorded and under way, the receipt in `erasure`; `redis_unavailable`: neither store could record it, nothing was recorded; `overloaded`", content_type = "application/problem+json", body = super::error::Problem)
    ),
    security(("bearer" = []))
)]
pub async fn erase_customer(
    State(state): State<AppState>,
    CustomerPath { customer }: CustomerPath,
) -> Result<Json<ReceiptOut>, ApiError> {
    // Within the guard's bound (DAPI_REQUEST_TIMEOUT), with room to answer.
    let bound = state.settings.request_timeout.mul_f64(0.8);
    match erasure::erase_customer(
        &state.staging,
        &state.store,
        customer,
        state.settings.replica_wait,
        bound,
    )
    .await
    {
        Ok(Ok(done)) => Ok(Json(ReceiptOut::from(&done))),
        Ok(Err(still)) => Err(pending(&still)),
        Err(ErasureError::Store(e)) if e.is_unavailable() => {
            // PostgreSQL cannot record it: Redis does, and refuses what it holds now.
            let recorded = erasure::record_while_store_is_away(&state.staging, customer).await?;
            Err(pending(&recorded))
        }
        Err(ErasureError::Store(e)) => Err(e.into()),
        Err(ErasureError::Staging(e)) => Err(e.into()),
    }
}

/// An erasure receipt, pending or completed.
#[utoipa::path(
    get,
    path = "/erasures/{erasureId}",
    tag = "privacy",
    params(("erasureId" = String, Path, description = "as dapi issued it: lowercase, hyphenated")),
    responses(
        (status = 200, description = "The receipt", body = ReceiptOut),
        (status = 401, description = "No or unknown token (`unauthorized`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 403, description = "Not a privacy token (`forbidden`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 404, description = "No such erasure (`erasure_not_found`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 503, description = "The store holding the receipt cannot be reached (`postgres_unavailable`, `redis_unavailable`)", content_type = "application/problem+json", body = super::error::Problem)
    ),
    security(("bearer" = []))
)]
pub async fn erasure_receipt(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<ReceiptOut>, ApiError> {
    let id = Uuid::parse_str(&raw)
        .ok()
        .filter(|id| id.hyphenated().to_string() == raw)
        .ok_or(ApiError::ErasureNotFound)?;
    let from_store = state.store.receipt(id).await;
    if let Ok(Some(receipt)) = &from_store {
        return Ok(Json(ReceiptOut::from(receipt)));
    }
    // Not (yet) in PostgreSQL: an erasure Redis recorded while PostgreSQL was away.
    match state.staging.erasure_record(id).await {
        Ok(Some(record)) => Ok(Json(ReceiptOut::from(&Receipt {
            erasure_id: id,
            customer_id: record.customer.get(),
            status: "pending".to_owned(),
            dialogs: 0,
            messages: 0,
            requested_at: time_of(record.requested_at_us),
            completed_at: None,
        }))),
        Ok(None) => match from_store {
            Ok(_) => Err(ApiError::ErasureNotFound),
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(match from_store {
            Err(store) => store.into(),
            Ok(_) => e.into(),
        }),
    }
}

/// One audit event.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"at": "2026-12-05T10:00:00.123456Z", "event": "granted", "customerId": 1, "dialogId": 7, "messages": null, "erasureId": null}))]
pub struct EventOut {
    at: String,
    /// `granted`, `refused`, `customer_erased` or `retention`.
    event: String,
    customer_id: Option<i64>,
    dialog_id: Option<i64>,
    messages: Option<i64>,
    erasure_id: Option<String>,
}

impl From<&AuditEvent> for EventOut {
    fn from(e: &AuditEvent) -> Self {
        Self {
            at: timestamp(e.at),
            event: e.event.clone(),
            customer_id: e.customer_id,
            dialog_id: e.dialog_id,
            messages: e.messages,
            erasure_id: e.erasure_id.map(|id| id.hyphenated().to_string()),
        }
    }
}

/// A step through the audit trail.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    /// Absolute URL of the next step, or null at the end.
    next: Option<String>,
    results: Vec<EventOut>,
}

/// The query of GET /audit (all optional; unknown parameters are ignored).
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, non_snake_case)] // describes the query; the handler parses it itself
pub struct AuditParams {
    /// Only this customer's events.
    #[param(minimum = 0)]
    customerId: Option<i64>,
    /// Only this dialog's events.
    #[param(minimum = 0)]
    dialogId: Option<i64>,
    /// 1 … 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pageSize: Option<i64>,
    /// Where to continue (from `next`); empty or absent starts at the newest event.
    cursor: Option<String>,
}

/// The consent and erasure trail, newest first.
///
/// What a controller shows to demonstrate consent and erasure: never a text, a language
/// or a messageId. Cursor mode only (`page` is 400 `invalid_query`).
#[utoipa::path(
    get,
    path = "/audit",
    tag = "privacy",
    params(AuditParams),
    responses(
        (status = 200, description = "Events, newest first", body = AuditPage),
        (status = 400, description = "A bad parameter, or `page` (`invalid_query`, `invalid_cursor`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 401, description = "No or unknown token (`unauthorized`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 403, description = "Not a privacy token (`forbidden`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 503, description = "PostgreSQL cannot be reached (`postgres_unavailable`)", content_type = "application/problem+json", body = super::error::Problem)
    ),
    security(("bearer" = []))
)]
pub async fn audit(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<AuditPage>, ApiError> {
    let query = ListQuery::parse(raw.as_deref());
    if query.get("page").is_some() {
        return Err(ApiError::InvalidQuery(
            "the audit trail is read in cursor mode only: follow `next`".into(),
        ));
    }
    let id = |name: &str| {
        query
            .given(name)
            .map(|raw| CustomerId::parse(raw).map(CustomerId::get))
            .transpose()
            .map_err(|_| ApiError::InvalidQuery(format!("`{name}` must be a non-negative decimal integer")))
    };
    let customer = id("customerId")?.map(CustomerId::from_stored);
    let dialog = id("dialogId")?.map(DialogId::from_stored);
    let size = query.page_size()?;
    let cursor = match query.given("cursor") {
        None => None,
        Some(raw) => {
            let c = Cursor::parse(raw).map_err(ApiError::InvalidCursor)?;
            // Events are dated from 1970 to 9999: any other position was not issued here.
            if !(0..=253_402_300_799_999_999).contains(&c.received_at_us) {
                return Err(ApiError::InvalidCursor(crate::domain::Invalid::Cursor));
            }
            Some((c.received_at_us, c.dialog_id))
        }
    };
    let mut rows = state.store.audit_page(customer, dialog, cursor, size + 1).await?;
    let more = rows.len() > usize::try_from(size).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
    let base = base_url(&state, &uri, &headers);
    let next = rows.last().filter(|_| more).map(|last| {
        let (at, event_id) = audit_position(last);
        // The data cursor's checksummed form, its fields holding (at, event id; seq 1).
        let cursor = Cursor {
            received_at_us: at,
            dialog_id: event_id,
            seq: 1,
        };
        query.link(&base, "cursor", Some(cursor.encode()))
    });
    Ok(Json(AuditPage {
        next,
        results: rows.iter().map(EventOut::from).collect(),
    }))
}

//! `POST /data/{customerId}/{dialogId}` (one message) and `POST /data` (a batch): the
//! bodies read and validated into [`Offer`]s, staged by [`crate::ingest::stage`], and
//! each outcome answered as 202 or a problem.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::extract::{BatchBody, DataPath, JsonBody};
use super::{ApiError, AppState, json};
use crate::domain::{CustomerId, DialogId, Invalid, parse_message, parse_message_fields};
use crate::ingest::{Offer, stage};
use crate::staging::{IngestOutcome, StagingError};
use crate::telemetry::{STAGED_DIALOGS, STAGED_MESSAGES};

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"customerId": 1, "dialogId": 2, "seq": 1, "consent": "pending"}))]
pub struct IngestAnswer {
    customer_id: i64,
    dialog_id: i64,
    /// 1, 2, 3 … in arrival order within the dialog.
    seq: i64,
    /// `pending` or `granted`.
    consent: &'static str,
    /// Present (true) when this repeats a `messageId` already accepted for the dialog:
    /// nothing was stored, and `seq` and `consent` are the first answer's.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

impl IngestAnswer {
    fn of(offer: &Offer, outcome: IngestOutcome) -> Result<Self, ApiError> {
        match outcome {
            IngestOutcome::Accepted {
                seq,
                decision,
                duplicate,
            } => {
                if !duplicate {
                    metrics::counter!(STAGED_MESSAGES).increment(1);
                    if seq == 1 {
                        metrics::counter!(STAGED_DIALOGS).increment(1);
                    }
                }
                Ok(Self {
                    customer_id: offer.customer.get(),
                    dialog_id: offer.dialog.get(),
                    seq,
                    consent: decision.as_str(),
                    duplicate,
                })
            }
            IngestOutcome::CustomerMismatch => Err(ApiError::CustomerMismatch),
            IngestOutcome::ConsentRefused => Err(ApiError::ConsentRefused),
            IngestOutcome::Unknown | IngestOutcome::SetAside => Err(ApiError::Staging(StagingError::Corrupt(
                "the ingest script did not create the dialog it was told to",
            ))),
        }
    }
}

/// Stage one message of a dialog.
///
/// 202 means the message is in Redis; it reaches PostgreSQL once the dialog's consent is
/// granted (at once, if it already is). A repeat of a `messageId` accepted for the dialog
/// within `DAPI_IDEMPOTENCY_WINDOW` stores nothing and answers the first answer with
/// `"duplicate": true`.
#[utoipa::path(
    post,
    path = "/data/{customerId}/{dialogId}",
    tag = "ingest",
    params(
        ("customerId" = i64, Path, minimum = 0, description = "0 … 9223372036854775807"),
        ("dialogId" = i64, Path, minimum = 0, description = "0 … 9223372036854775807")
    ),
    request_body(content = super::openapi::MessageBody, content_type = "application/json"),
    responses(
        (status = 202, description = "Staged (or a repeat of a `messageId`: `duplicate`)", body = IngestAnswer),
        (status = 400, description = "Malformed JSON, or a path ID that is not such an integer (`malformed_json`, `invalid_id`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 401, description = "No or unknown token (`unauthorized`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 403, description = "Not an ingest token (`forbidden`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 409, description = "The dialog belongs to another customer, or its consent was refused (`customer_mismatch`, `consent_refused`); nothing stored", content_type = "application/problem+json", body = super::error::Problem),
        (status = 413, description = "Body over `DAPI_MAX_BODY_BYTES` (`payload_too_large`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 422, description = "Missing or wrong-typed field, empty or oversized text, U+0000, bad language tag, bad `messageId` (`invalid_body`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 503, description = "Redis cannot be reached, or dapi is at its limit (`redis_unavailable`, `overloaded`, `request_timeout`); nothing acknowledged. `replication_timeout`: the Redis replicas asked for (`DAPI_REDIS_WAIT_REPLICAS`) did not confirm in time; the message may be staged, a retry with the same `messageId` is safe", content_type = "application/problem+json", body = super::error::Problem)
    ),
    security(("bearer" = []))
)]
pub async fn ingest(
    State(state): State<AppState>,
    DataPath { customer, dialog }: DataPath,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<IngestAnswer>), ApiError> {
    let message = parse_message(body, state.settings.max_text_bytes).map_err(ApiError::InvalidBody)?;
    let offer = Offer {
        customer,
        dialog,
        message,
    };
    let outcome = stage(&state.ingest_path(), std::slice::from_ref(&offer))
        .await?
        .pop()
        .ok_or(ApiError::Staging(StagingError::Corrupt("no outcome")))??;
    Ok((StatusCode::ACCEPTED, Json(IngestAnswer::of(&offer, outcome)?)))
}

/// One item's result in a batch answer: a 202 answer, or a problem.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ItemResult {
    Staged {
        /// 202
        status: u16,
        #[serde(flatten)]
        answer: IngestAnswer,
    },
    Failed {
        /// 409, 422 or 503
        status: u16,
        /// As in problem+json: `customer_mismatch`, `consent_refused`, `invalid_body`,
        /// `redis_unavailable`.
        code: &'static str,
        detail: String,
    },
}

impl ItemResult {
    fn failed(error: &ApiError) -> Self {
        let (status, code) = error.status_and_code();
        ItemResult::Failed {
            status: status.as_u16(),
            code,
            detail: error.public_detail(),
        }
    }
}

/// `POST /data`'s answer: one result per item, in order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchAnswer {
    results: Vec<ItemResult>,
}

/// Stage many messages in one request.
///
/// Each item is validated and staged as a single POST would be, on its own: one bad item
/// never spoils the others, and items of one dialog get their `seq` in batch order. When
/// Redis fails part-way, the items staged answer 202 and the others 503
/// `redis_unavailable`; retrying the whole batch with the same `messageId`s stores
/// nothing twice.
#[utoipa::path(
    post,
    path = "/data",
    tag = "ingest",
    request_body(content = super::openapi::BatchBody, content_type = "application/json"),
    responses(
        (status = 200, description = "One result per item, in order", body = BatchAnswer),
        (status = 400, description = "Malformed JSON (`malformed_json`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 401, description = "No or unknown token (`unauthorized`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 403, description = "Not an ingest token (`forbidden`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 413, description = "Body over `DAPI_MAX_BATCH_BYTES` (`payload_too_large`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 415, description = "Not JSON (`unsupported_media_type`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 422, description = "Not an object with a `messages` array of 1 … `DAPI_MAX_BATCH_MESSAGES` items (`invalid_body`); nothing staged", content_type = "application/problem+json", body = super::error::Problem),
        (status = 503, description = "Redis cannot be reached before any item is staged, or dapi is at its limit (`redis_unavailable`, `overloaded`, `request_timeout`)", content_type = "application/problem+json", body = super::error::Problem)
    ),
    security(("bearer" = []))
)]
pub async fn ingest_batch(
    State(state): State<AppState>,
    BatchBody(body): BatchBody,
) -> Result<Json<BatchAnswer>, ApiError> {
    let max = state.settings.max_batch_messages;
    // serde reads a struct from a JSON array too (`[[…]]` as `messages`): only an object is one.
    let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let items = match serde_json::from_slice::<RawBatch<'_>>(&body) {
        Ok(RawBatch { messages: Some(items) }) if object && (1..=max).contains(&items.len()) => items,
        Ok(_) => return Err(ApiError::InvalidBatch { max }),
        Err(e) if json::is_duplicate_key(&e) => return Err(ApiError::DuplicateKey),
        // Well-formed JSON of another shape (not an object, `messages` not an array).
        Err(e) if e.classify() == serde_json::error::Category::Data => return Err(ApiError::InvalidBatch { max }),
        Err(e) => return Err(ApiError::MalformedJson(e)),
    };
    // Parse every item; the valid ones are staged together, in order.
    let mut slots: Vec<Result<(), ApiError>> = Vec::with_capacity(items.len());
    let mut offers = Vec::with_capacity(items.len());
    for item in items {
        let item = match serde_json::from_str::<json::Strict>(item.get()) {
            Ok(item) => Ok(item.0),
            // A key named twice makes the body ambiguous: the whole batch is refused.
            Err(e) if json::is_duplicate_key(&e) => return Err(ApiError::DuplicateKey),
            Err(_) => Err(Invalid::UnreadableItem),
        };
        match item.and_then(|item| parse_item(item, state.settings.max_text_bytes)) {
            Ok(offer) => {
                offers.push(offer);
                slots.push(Ok(()));
            }
            Err(invalid) => slots.push(Err(ApiError::InvalidBody(invalid))),
        }
    }
    let mut staged = offers.iter().zip(stage(&state.ingest_path(), &offers).await?);
    let results = slots
        .iter()
        .map(|slot| match slot {
            Err(invalid) => ItemResult::failed(invalid),
            Ok(()) => {
                let answer = match staged.next() {
                    Some((offer, outcome)) => outcome
                        .map_err(ApiError::from)
                        .and_then(|outcome| IngestAnswer::of(offer, outcome)),
                    None => Err(ApiError::Staging(StagingError::Corrupt("no outcome"))),
                };
                match answer {
                    Ok(answer) => ItemResult::Staged {
                        status: StatusCode::ACCEPTED.as_u16(),
                        answer,
                    },
                    Err(e) => ItemResult::failed(&e),
                }
            }
        })
        .collect();
    Ok(Json(BatchAnswer { results }))
}

/// A batch body as its items' JSON text, each read on its own (unknown fields ignored,
/// but read: no key may be named twice, anywhere in the body).
struct RawBatch<'a> {
    messages: Option<Vec<&'a RawValue>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawBatch<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = RawBatch<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object with a `messages` array")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RawBatch<'de>, A::Error> {
                let mut messages = None;
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if !seen.insert(key.clone()) {
                        return Err(json::duplicate_key());
                    }
                    if key == "messages" {
                        messages = map.next_value::<Option<Vec<&'de RawValue>>>()?;
                    } else {
                        map.next_value::<json::Strict>()?;
                    }
                }
                Ok(RawBatch { messages })
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// One batch item: `customerId` and `dialogId` (JSON integers, 0 … 2^63−1) beside the
/// fields of a single POST's body.
fn parse_item(item: Value, max_text_bytes: usize) -> Result<Offer, Invalid> {
    let Value::Object(mut fields) = item else {
        return Err(Invalid::WrongType {
            field: "messages[]",
            expected: "an object with `customerId`, `dialogId`, `text` and `language`",
        });
    };
    let mut id = |field: &'static str| match fields.remove(field) {
        None | Some(Value::Null) => Err(Invalid::Missing(field)),
        Some(Value::Number(n)) => n.as_i64().filter(|n| *n >= 0).ok_or(Invalid::Id(field)),
        Some(_) => Err(Invalid::Id(field)),
    };
    let customer = CustomerId::from_stored(id("customerId")?);
    let dialog = DialogId::from_stored(id("dialogId")?);
    let message = parse_message_fields(fields, max_text_bytes)?;
    Ok(Offer {
        customer,
        dialog,
        message,
    })
}

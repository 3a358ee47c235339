//! Extractors that turn raw requests into domain values or an [`ApiError`]: path IDs,
//! and JSON bodies with the contract's statuses (415 not JSON, 413 too large, 400
//! malformed), never axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};

use super::{ApiError, AppState};
use crate::domain::{CustomerId, DialogId};

/// `/data/{customerId}/{dialogId}`.
#[derive(Debug, Clone, Copy)]
pub struct DataPath {
    pub customer: CustomerId,
    pub dialog: DialogId,
}

impl<S: Send + Sync> FromRequestParts<S> for DataPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((customer, dialog)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::InvalidId(crate::domain::Invalid::Id("customerId")))?;
        Ok(Self {
            customer: CustomerId::parse(&customer).map_err(ApiError::InvalidId)?,
            dialog: DialogId::parse(&dialog).map_err(ApiError::InvalidId)?,
        })
    }
}

/// `/customers/{customerId}`.
#[derive(Debug, Clone, Copy)]
pub struct CustomerPath {
    pub customer: CustomerId,
}

impl<S: Send + Sync> FromRequestParts<S> for CustomerPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(customer) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::InvalidId(crate::domain::Invalid::Id("customerId")))?;
        Ok(Self {
            customer: CustomerId::parse(&customer).map_err(ApiError::InvalidId)?,
        })
    }
}

/// `/consents/{dialogId}`.
#[derive(Debug, Clone, Copy)]
pub struct ConsentPath {
    pub dialog: DialogId,
}

impl<S: Send + Sync> FromRequestParts<S> for ConsentPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(dialog) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::InvalidId(crate::domain::Invalid::Id("dialogId")))?;
        Ok(Self {
            dialog: DialogId::parse(&dialog).map_err(ApiError::InvalidId)?,
        })
    }
}

/// A JSON body, parsed to a [`serde_json::Value`] so that handlers check fields
/// themselves and no error message ever quotes the caller's text back.
#[derive(Debug)]
pub struct JsonBody(pub serde_json::Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        read_json(req, state, state.settings.max_body_bytes).await.map(JsonBody)
    }
}

/// The body of `POST /data` (a batch), up to `DAPI_MAX_BATCH_BYTES` (the route sets that
/// limit; see `http::routes`), as bytes: the handler reads its items one by one, so that
/// an item JSON's reader cannot hold (a number past a float's range, nesting past 128
/// levels) fails that item alone.
#[derive(Debug)]
pub struct BatchBody(pub Bytes);

impl FromRequest<AppState> for BatchBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        read_body(req, state, state.settings.max_batch_bytes)
            .await
            .map(BatchBody)
    }
}

/// Reads a JSON body within the route's body limit (`limit` only names it in the error).
/// The limit applies to the decoded body, counted as it is decoded (see `http::encoding`).
async fn read_json(req: Request, state: &AppState, limit: usize) -> Result<serde_json::Value, ApiError> {
    let bytes = read_body(req, state, limit).await?;
    match serde_json::from_slice::<super::json::Strict>(&bytes) {
        Ok(json) => Ok(json.0),
        Err(e) if super::json::is_duplicate_key(&e) => Err(ApiError::DuplicateKey),
        Err(e) => Err(ApiError::MalformedJson(e)),
    }
}

/// Reads a JSON request's body within the route's body limit, undecoded as JSON.
async fn read_body(req: Request, state: &AppState, limit: usize) -> Result<Bytes, ApiError> {
    if !is_json(req.headers()) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let encoded = req.extensions().get::<super::encoding::Encoded>().is_some();
    // A plain body declared larger than the limit is refused before any of it is read
    // (an encoded one's declared length was the encoded size, and is gone by now).
    let declared = req.headers().get(header::CONTENT_LENGTH);
    if declared
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > limit as u64)
    {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else if encoded {
            // A compressed body that fails to read is, but for a broken connection, one
            // that does not decode.
            ApiError::MalformedBody
        } else {
            ApiError::UnreadableBody
        }
    })
}

/// `application/json`, or any `application/…+json`, parameters (charset) allowed.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn json_media_types_are_recognised() {
        let check = |ct: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).expect("valid header")); // allow: test
            is_json(&headers)
        };
        assert!(check("application/json"));
        assert!(check("Application/JSON; charset=utf-8"));
        assert!(check("application/merge-patch+json"));
        assert!(!check("text/plain"));
        assert!(!check("application/x-www-form-urlencoded"));
        assert!(!is_json(&HeaderMap::new()));
    }
}

//! `GET /data/`: consented messages page by page, or by cursor. (Staging them is
//! `http::ingest`.)

use axum::Json;
use axum::extract::{OriginalUri, RawQuery, State};
use axum::http::{HeaderMap, header};
use serde::Serialize;
use time::format_description::FormatItem;
use time::macros::format_description;

use super::{ApiError, AppState};
use crate::domain::{Cursor, CustomerId, Language};
use crate::store::{Filter, Range, StoredMessage};

const DEFAULT_PAGE_SIZE: i64 = 100;
const MAX_PAGE_SIZE: i64 = 1000;

/// One consented message on the wire.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageOut {
    customer_id: i64,
    dialog_id: i64,
    seq: i64,
    text: String,
    language: String,
    /// When dapi accepted the message: UTC, RFC 3339 with microseconds.
    #[schema(example = "2026-11-27T18:04:05.123456Z")]
    received_at: String,
    /// The client's `messageId` for it, or null.
    message_id: Option<String>,
}

pub(super) const RFC3339_MICROS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

impl From<StoredMessage> for MessageOut {
    fn from(m: StoredMessage) -> Self {
        let received_at = m
            .received_at
            .to_offset(time::UtcOffset::UTC)
            .format(RFC3339_MICROS)
            .unwrap_or_default();
        Self {
            customer_id: m.customer_id,
            dialog_id: m.dialog_id,
            seq: m.seq,
            text: m.text,
            language: m.language,
            received_at,
            message_id: m.message_id,
        }
    }
}

/// An RFC 3339 instant (`2026-11-27T18:04:05Z`, `2026-11-27T19:04:05.5+01:00`). A `+` in
/// a query string decodes as a space, so a space where the offset's sign belongs is read
/// as the `+` that was meant.
pub(super) fn instant(name: &str, raw: &str) -> Result<time::OffsetDateTime, ApiError> {
    let raw = raw.replace(' ', "+");
    time::OffsetDateTime::parse(&raw, &time::format_description::well_known::Rfc3339).map_err(|_| {
        ApiError::InvalidQuery(format!(
            "`{name}` must be an RFC 3339 instant such as 2026-11-27T18:04:05Z (a `+` offset written %2B)"
        ))
    })
}

/// A page (page mode), in Django REST framework's page-number shape.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)] // for the schema: `additionalProperties: false`
pub struct PageOut {
    /// How many messages match the filters, exactly.
    count: i64,
    /// Absolute URL of the next page, or null.
    next: Option<String>,
    /// Absolute URL of the previous page, or null.
    previous: Option<String>,
    results: Vec<MessageOut>,
}

/// A keyset step (cursor mode).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)] // for the schema: `additionalProperties: false`
pub struct CursorPageOut {
    /// Absolute URL of the next step (it carries an opaque cursor), or null at the end.
    next: Option<String>,
    results: Vec<MessageOut>,
}

/// What GET /data answers: a page, or in cursor mode a keyset step.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ListAnswer {
    Page(PageOut),
    Cursor(CursorPageOut),
}

/// The query parameters of GET /data (all optional; unknown ones are ignored).
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, non_snake_case)] // describes the query; the handler parses it itself
pub struct ListParams {
    /// Only messages in this language (case-insensitive).
    language: Option<String>,
    /// Only this customer's messages.
    #[param(minimum = 0)]
    customerId: Option<i64>,
    /// 1-based page number (default 1); page mode only (with `cursor`: 400 `invalid_query`).
    #[param(minimum = 1)]
    page: Option<i64>,
    /// 1 … 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pageSize: Option<i64>,
    /// Switches to cursor mode; empty starts at the newest message. Not with `page`.
    cursor: Option<String>,
    /// Only messages received strictly after this RFC 3339 instant.
    #[param(format = DateTime, example = "2026-11-27T00:00:00Z")]
    receivedAfter: Option<String>,
    /// Only messages received strictly before this RFC 3339 instant (a range whose
    /// start is not before its end holds nothing).
    #[param(format = DateTime, example = "2026-11-28T00:00:00Z")]
    receivedBefore: Option<String>,
}

/// The query string of GET /data, parsed. Django's `QueryDict.get` takes the last of
/// repeated parameters; so do we.
pub(super) struct ListQuery {
    pairs: Vec<(String, String)>,
}

impl ListQuery {
    pub(super) fn parse(raw: Option<&str>) -> Self {
        // form-urlencoded parsing never fails: bad escapes are kept as they are.
        let pairs = serde_urlencoded::from_str(raw.unwrap_or_default()).unwrap_or_default();
        Self { pairs }
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A parameter that is absent or empty counts as not given.
    pub(super) fn given(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    /// The filters; `None` when they can match nothing (a `language` that is not a
    /// language tag cannot be stored, so it is answered without asking PostgreSQL).
    pub(super) fn filter(&self) -> Result<Option<Filter>, ApiError> {
        let customer = self
            .given("customerId")
            .map(CustomerId::parse)
            .transpose()
            .map_err(|e| ApiError::InvalidQuery(e.to_string()))?;
        let language = match self.given("language") {
            None => None,
            Some(raw) => match Language::parse(raw.to_owned()) {
                Ok(language) => Some(language.as_str().to_owned()),
                Err(_) => return Ok(None),
            },
        };
        let range = self.range()?;
        Ok(Some(Filter {
            language,
            customer,
            range,
        }))
    }

    /// `receivedAfter` and `receivedBefore`: exclusive bounds, RFC 3339 instants. A range
    /// whose start is not before its end is a valid range that holds nothing.
    pub(super) fn range(&self) -> Result<Range, ApiError> {
        let after = self
            .given("receivedAfter")
            .map(|raw| instant("receivedAfter", raw))
            .transpose()?;
        let before = self
            .given("receivedBefore")
            .map(|raw| instant("receivedBefore", raw))
            .transpose()?;
        Ok(Range::from_instants(after, before))
    }

    pub(super) fn page_size(&self) -> Result<i64, ApiError> {
        match self.given("pageSize") {
            None => Ok(DEFAULT_PAGE_SIZE),
            Some(raw) => raw
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                .ok_or_else(|| {
                    ApiError::InvalidQuery(format!("`pageSize` must be an integer from 1 to {MAX_PAGE_SIZE}"))
                }),
        }
    }

    fn page(&self) -> Result<i64, ApiError> {
        let Some(raw) = self.given("page") else {
            return Ok(1);
        };
        let digits = raw.strip_prefix('-').unwrap_or(raw);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::InvalidQuery("`page` must be an integer".into()));
        }
        // An integer too large for i64 is simply a page past the last one.
        let page = raw.parse::<i64>().unwrap_or(i64::MAX);
        if page < 1 {
            return Err(ApiError::InvalidPage("`page` must be 1 or more".into()));
        }
        Ok(page)
    }

    /// An absolute link to this resource with `name` set to `value` (or removed), the
    /// other parameters kept, in key order as Django REST framework writes them.
    pub(super) fn link(&self, base: &str, name: &str, value: Option<String>) -> String {
        let mut pairs: Vec<(&str, &str)> = self
            .pairs
            .iter()
            .filter(|(k, _)| k != name)
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Some(value) = &value {
            pairs.push((name, value));
        }
        pairs.sort_by_key(|(k, _)| *k);
        let query = serde_urlencoded::to_string(&pairs).unwrap_or_default();
        if query.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{query}")
        }
    }
}

/// Read consented messages, newest first.
///
/// Ordered by `receivedAt`, then `dialogId`, then `seq`, all descending. `receivedAfter`
/// and `receivedBefore` bound `receivedAt` (exclusive) in both modes; `count` counts
/// within them. Page mode answers
/// `count`, `next`, `previous`, `results`; with `cursor` (cursor mode) `next` and
/// `results`, at a cost that does not grow with depth.
#[utoipa::path(
    get,
    path = "/data",
    tag = "read",
    params(ListParams),
    responses(
        (status = 200, description = "A page (page mode) or a keyset step (cursor mode)", body = ListAnswer),
        (status = 400, description = "A non-integer `page`, `pageSize` or `customerId`, `pageSize` outside 1 … 1000, a `receivedAfter` or `receivedBefore` that is not an RFC 3339 instant, a cursor not issued by dapi, `page` together with `cursor` (`invalid_query`, `invalid_cursor`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 401, description = "No or unknown token (`unauthorized`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 403, description = "Not a read token (`forbidden`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 404, description = "A page past the last one, or `page` < 1 (`invalid_page`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 503, description = "PostgreSQL cannot be reached, or dapi is at its limit (`postgres_unavailable`, `overloaded`, `request_timeout`)", content_type = "application/problem+json", body = super::error::Problem)
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<ListAnswer>, ApiError> {
    let query = ListQuery::parse(raw.as_deref());
    let filter = query.filter()?;
    let size = query.page_size()?;
    let base = base_url(&state, &uri, &headers);

    if let Some(raw_cursor) = query.get("cursor") {
        // Cursor mode has no pages; a `page` beside a cursor is a client's mistake, not
        // something to ignore silently (docs/api.md: 400 `invalid_query`).
        if query.get("page").is_some() {
            return Err(ApiError::InvalidQuery("`page` cannot be combined with `cursor`".into()));
        }
        let cursor = match raw_cursor {
            "" => None,
            raw => Some(Cursor::parse(raw).map_err(ApiError::InvalidCursor)?),
        };
        // One extra row tells whether there is a next step.
        let mut rows = match &filter {
            Some(filter) => state.store.after(filter, cursor, size + 1).await?,
            None => Vec::new(),
        };
        let more = rows.len() > usize::try_from(size).unwrap_or(usize::MAX);
        rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        let next = rows
            .last()
            .filter(|_| more)
            .map(|last| query.link(&base, "cursor", Some(last.cursor().encode())));
        let out = ListAnswer::Cursor(CursorPageOut {
            next,
            results: rows.into_iter().map(MessageOut::from).collect(),
        });
        return Ok(Json(out));
    }

    let page = query.page()?;
    let offset = (page - 1).checked_mul(size).ok_or_else(past_last)?;
    let (count, rows) = match &filter {
        Some(filter) => state.store.page(filter, offset, size).await?,
        None => (0, Vec::new()),
    };
    let last_page = ((count + size - 1) / size).max(1);
    if page > last_page {
        return Err(past_last());
    }
    let next = (page < last_page).then(|| query.link(&base, "page", Some((page + 1).to_string())));
    let previous = (page > 1).then(|| {
        // Django REST framework links page 1 without a `page` parameter.
        let value = (page > 2).then(|| (page - 1).to_string());
        query.link(&base, "page", value)
    });
    let out = ListAnswer::Page(PageOut {
        count,
        next,
        previous,
        results: rows.into_iter().map(MessageOut::from).collect(),
    });
    Ok(Json(out))
}

fn past_last() -> ApiError {
    ApiError::InvalidPage("this page is past the last page of results".into())
}

/// The absolute URL of the resource asked for, for `next` / `previous` links: from
/// `DAPI_PUBLIC_URL` when set, else from the request's Host.
pub(super) fn base_url(state: &AppState, uri: &axum::http::Uri, headers: &HeaderMap) -> String {
    match &state.settings.public_url {
        Some(url) => format!("{url}{}", uri.path()),
        None => format!("http://{}{}", host_of(headers), uri.path()),
    }
}

/// The request's Host, when it is a plausible authority; else `localhost`.
fn host_of(headers: &HeaderMap) -> &str {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b)))
        .unwrap_or("localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_keep_other_parameters_sorted_and_encoded() {
        let q = ListQuery::parse(Some("pageSize=2&language=pt%2DBR&page=3&x=a+b"));
        assert_eq!(
            q.link("http://h/data/", "page", Some("4".into())),
            "http://h/data/?language=pt-BR&page=4&pageSize=2&x=a+b"
        );
        assert_eq!(
            q.link("http://h/data/", "page", None),
            "http://h/data/?language=pt-BR&pageSize=2&x=a+b"
        );
        assert_eq!(
            ListQuery::parse(None).link("http://h/data", "page", None),
            "http://h/data"
        );
    }

    #[test]
    fn page_numbers_distinguish_bad_from_out_of_range() {
        let page = |raw: &str| ListQuery::parse(Some(raw)).page();
        assert!(matches!(page("page=2"), Ok(2)));
        assert!(matches!(page(""), Ok(1)));
        assert!(matches!(page("page="), Ok(1)));
        assert!(matches!(page("page=abc"), Err(ApiError::InvalidQuery(_))));
        assert!(matches!(page("page=1.5"), Err(ApiError::InvalidQuery(_))));
        assert!(matches!(page("page=0"), Err(ApiError::InvalidPage(_))));
        assert!(matches!(page("page=-3"), Err(ApiError::InvalidPage(_))));
        assert!(matches!(page("page=99999999999999999999"), Ok(i64::MAX)));
    }
}

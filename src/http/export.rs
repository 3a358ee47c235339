//! `GET /data/export`: every consented message matching the filters, oldest first, as
//! NDJSON, then a resume token that continues exactly after it (docs/api.md, "The
//! export"; the order's argument: docs/design.md, "The export's order").
//!
//! The body is streamed: keyset steps of about [`STEP_BYTES`], each one statement of its
//! own (its own snapshot), the next read while this one is written, never the whole
//! result in memory. An error
//! after the status was sent ends the body without its resume line: the client, which
//! never saw a last line, retries from its previous token.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::data::{ListQuery, MessageOut};
use super::{ApiError, AppState};
use crate::domain::{CustomerId, Invalid, Language, checksum};
use crate::store::export::{ExportPosition, ExportRow, MessageKey};
use crate::store::{Filter, Range, Store, StoredMessage};

/// Messages read by the first statement; later ones read about [`STEP_BYTES`] of
/// messages, between [`MIN_STEP`] and [`MAX_STEP`] (memory: this step and the one read
/// ahead).
const STEP: i64 = 1000;
const STEP_BYTES: i64 = 1 << 20;
const MIN_STEP: i64 = 100;
const MAX_STEP: i64 = 5000;

/// The query parameters of GET /data/export (all optional; unknown ones are ignored).
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, non_snake_case)] // describes the query; the handler parses it itself
pub struct ExportParams {
    /// Only messages in this language (case-insensitive).
    language: Option<String>,
    /// Only this customer's messages.
    #[param(minimum = 0)]
    customerId: Option<i64>,
    /// Only messages received strictly after this RFC 3339 instant.
    #[param(format = DateTime, example = "2026-11-27T00:00:00Z")]
    receivedAfter: Option<String>,
    /// Only messages received strictly before this RFC 3339 instant.
    #[param(format = DateTime, example = "2026-11-28T00:00:00Z")]
    receivedBefore: Option<String>,
    /// The token of a previous export's last line: continue exactly after it. It carries
    /// that export's filters; filters given beside it must be the same.
    resume: Option<String>,
    /// Stop after this many messages (the resume line follows).
    #[param(minimum = 0)]
    limit: Option<i64>,
}

/// The last line of an export.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeLine {
    /// Pass as `resume` to continue exactly after the last message sent.
    resume: String,
}

/// Export consented messages, oldest first, as NDJSON.
///
/// One message a line (the fields of `GET /data`'s `results`), in (`receivedAt`,
/// `dialogId`, `seq`) ascending order, then a last line `{"resume": "<token>"}`.
/// `?resume=<token>` continues exactly after the last message sent, including messages
/// that became readable since although received before it: each resumed export streams
/// what became readable since the token, oldest first. A body without the resume line
/// is incomplete (an error after the status was sent): continue from the previous token.
#[utoipa::path(
    get,
    path = "/data/export",
    tag = "read",
    params(ExportParams),
    responses(
        (status = 200, description = "Messages as NDJSON (one `MessageOut` a line), then a last line `ResumeLine`", content_type = "application/x-ndjson", body = MessageOut),
        (status = 400, description = "A non-integer `customerId` or `limit`, a `language` that is not a language tag, a `receivedAfter` or `receivedBefore` that is not an RFC 3339 instant, filters other than the token's (`invalid_query`), a resume token not issued by dapi (`invalid_cursor`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 401, description = "No or unknown token (`unauthorized`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 403, description = "Not a read token (`forbidden`)", content_type = "application/problem+json", body = super::error::Problem),
        (status = 503, description = "PostgreSQL cannot be reached, or dapi is at its limit (`postgres_unavailable`, `overloaded`, `request_timeout`)", content_type = "application/problem+json", body = super::error::Problem)
    ),
    security(("bearer" = []))
)]
pub async fn export(State(state): State<AppState>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let query = ListQuery::parse(raw.as_deref());
    let given = Filters::given(&query)?;
    let limit = match query.given("limit") {
        None => None,
        Some(raw) => Some(
            raw.parse::<u64>()
                .map_err(|_| ApiError::InvalidQuery("`limit` must be an integer, 0 or more".into()))?,
        ),
    };
    let resumed = query
        .given("resume")
        .map(|raw| Token::parse(raw).map_err(ApiError::InvalidCursor))
        .transpose()?;
    let filters = match &resumed {
        Some(token) if !given.agrees_with(&token.filters) => {
            return Err(ApiError::InvalidQuery(
                "the filters differ from those the resume token was issued for: repeat them, or leave them out".into(),
            ));
        }
        Some(token) => token.filters.clone(),
        None => given,
    };
    let upto = state.store.close_export_epoch(state.settings.replica_wait).await?;
    let position = match resumed {
        None => ExportPosition::Window {
            below: upto,
            at: MessageKey::START,
        },
        Some(token) => {
            // A position beyond the epochs closed so far was not issued here.
            let epoch = match token.position {
                ExportPosition::Window { below, .. } => below,
                ExportPosition::Epochs { epoch, .. } => epoch,
            };
            if epoch > upto || epoch < 0 {
                return Err(ApiError::InvalidCursor(Invalid::ResumeToken));
            }
            token.position
        }
    };
    let sync = Sync {
        store: state.store.clone(),
        filter: filters.filter(),
        filters,
        position,
        upto,
        left: limit,
        ahead: None,
        step: STEP,
        done: false,
    };
    let steps = futures_util::stream::unfold(sync, |mut sync| async move {
        if sync.done {
            return None;
        }
        let chunk = sync.next_chunk().await;
        if chunk.is_err() {
            sync.done = true;
        }
        Some((chunk, sync))
    });
    // Fused: the compression layer polls a body once more after its end.
    let body = Body::from_stream(futures_util::StreamExt::fuse(steps));
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(response)
}

/// A step being read.
type Step = tokio::task::JoinHandle<Result<Vec<ExportRow>, crate::store::StoreError>>;

/// One export's progress while its body streams.
struct Sync {
    store: Store,
    filters: Filters,
    filter: Filter,
    position: ExportPosition,
    /// The current epoch when the export began: it streams the epochs before it.
    upto: i64,
    /// Messages still to send under `limit`.
    left: Option<u64>,
    /// The next step, read while this one is written (PostgreSQL and the serialising
    /// work on two cores), and how many messages it asked for.
    ahead: Option<(Step, i64)>,
    /// Messages per step, sized by the last step's.
    step: i64,
    done: bool,
}

impl Sync {
    /// How many messages the next step asks for.
    fn want(&self) -> i64 {
        self.left.map_or(self.step, |left| {
            self.step.min(i64::try_from(left).unwrap_or(self.step))
        })
    }

    /// Starts reading the step after the current position.
    fn read_ahead(&mut self) {
        let want = self.want();
        let (store, filter, position, upto) = (self.store.clone(), self.filter.clone(), self.position, self.upto);
        let step = tokio::spawn(async move { store.export_step(&filter, &position, upto, want).await });
        self.ahead = Some((step, want));
    }

    /// The next lines of the body: a step's messages, and the resume line after the last.
    async fn next_chunk(&mut self) -> Result<Vec<u8>, std::io::Error> {
        let mut out = Vec::new();
        loop {
            if self.ahead.is_none() {
                if self.want() == 0 {
                    return Ok(self.finish(out));
                }
                self.read_ahead();
            }
            let Some((step, asked)) = self.ahead.take() else {
                return Ok(self.finish(out));
            };
            let rows = match step.await {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => return Err(stopped(&e)),
                Err(e) => return Err(stopped(&e)),
            };
            let complete = rows.len() < usize::try_from(asked).unwrap_or(usize::MAX);
            if !rows.is_empty() {
                let bytes: usize = rows.iter().map(|r| 160 + r.message.text.len()).sum();
                let per_message = i64::try_from(bytes / rows.len()).unwrap_or(i64::MAX).max(1);
                self.step = (STEP_BYTES / per_message).clamp(MIN_STEP, MAX_STEP);
            }
            if let Some(last) = rows.last() {
                self.position = self.position.after(last);
            }
            if let Some(left) = &mut self.left {
                *left = left.saturating_sub(rows.len() as u64);
            }
            let mut finished = false;
            if complete {
                match self.position {
                    // The fresh export's window is done: what became readable since its
                    // start follows, epoch by epoch.
                    ExportPosition::Window { below, .. } => {
                        self.position = ExportPosition::Epochs {
                            epoch: below,
                            at: MessageKey::START,
                        };
                    }
                    // Every epoch before `upto` is sent: the next export starts at it.
                    ExportPosition::Epochs { .. } => {
                        self.position = ExportPosition::Epochs {
                            epoch: self.upto,
                            at: MessageKey::START,
                        };
                        finished = true;
                    }
                }
            }
            if !finished && self.want() > 0 {
                self.read_ahead();
            }
            out.reserve(rows.len() * 160);
            for row in &rows {
                write_line(&mut out, &row.message);
            }
            if finished || self.want() == 0 {
                return Ok(self.finish(out));
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    fn finish(&mut self, mut out: Vec<u8>) -> Vec<u8> {
        self.done = true;
        let token = Token {
            position: self.position,
            filters: self.filters.clone(),
        };
        let _ = serde_json::to_writer(&mut out, &ResumeLine { resume: token.encode() });
        out.push(b'\n');
        out
    }
}

/// An error after the status was sent: logged, and the body ends without its resume line.
fn stopped(e: &dyn std::error::Error) -> std::io::Error {
    tracing::warn!(error = %crate::telemetry::chain(e), "an export stopped before its end: the body has no resume line");
    std::io::Error::other("the export stopped")
}

/// One message as an NDJSON line: the bytes `serde_json` writes for `MessageOut`, written
/// without building one (the export's hot loop).
fn write_line(out: &mut Vec<u8>, m: &StoredMessage) {
    use std::io::Write;
    let at = m.received_at.to_offset(time::UtcOffset::UTC);
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "{{\"customerId\":{},\"dialogId\":{},\"seq\":{},\"text\":",
        m.customer_id, m.dialog_id, m.seq
    );
    let _ = serde_json::to_writer(&mut *out, &m.text);
    out.extend_from_slice(b",\"language\":");
    let _ = serde_json::to_writer(&mut *out, &m.language);
    let _ = write!(
        out,
        ",\"receivedAt\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z\",\"messageId\":",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    );
    match &m.message_id {
        Some(id) => {
            let _ = serde_json::to_writer(&mut *out, id);
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b"}\n");
}

/// An export's filters as given, kept in its token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Filters {
    customer: Option<i64>,
    /// Lower-cased.
    language: Option<String>,
    range: Range,
}

impl Filters {
    fn given(query: &ListQuery) -> Result<Self, ApiError> {
        let customer = query
            .given("customerId")
            .map(CustomerId::parse)
            .transpose()
            .map_err(|e| ApiError::InvalidQuery(e.to_string()))?
            .map(CustomerId::get);
        let language = query
            .given("language")
            .map(|raw| Language::parse(raw.to_owned()))
            .transpose()
            .map_err(|_| ApiError::InvalidQuery("`language` must be a language tag such as `en` or `pt-BR`".into()))?
            .map(|l| l.as_str().to_ascii_lowercase());
        Ok(Self {
            customer,
            language,
            range: query.range()?,
        })
    }

    /// Whether filters given beside a token are the token's: those not given are.
    fn agrees_with(&self, token: &Filters) -> bool {
        self.customer.is_none_or(|c| token.customer == Some(c))
            && self
                .language
                .as_ref()
                .is_none_or(|l| token.language.as_ref() == Some(l))
            && self.range.after_us.is_none_or(|a| token.range.after_us == Some(a))
            && self.range.before_us.is_none_or(|b| token.range.before_us == Some(b))
    }

    fn filter(&self) -> Filter {
        Filter {
            language: self.language.clone(),
            customer: self.customer.map(CustomerId::from_stored),
            range: self.range,
        }
    }
}

/// A resume token: the position and the filters, versioned and checksummed as GET
/// /data's cursor is (`domain::Cursor`). It guards against typos and truncation, and a
/// position past the epochs closed so far is refused; a token made up by hand can only
/// name a position among messages a read token may read anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    position: ExportPosition,
    filters: Filters,
}

const TOKEN_VERSION: u8 = 0xe1;
const WINDOW: u8 = 0;
const EPOCHS: u8 = 1;
const HAS_CUSTOMER: u8 = 1;
const HAS_AFTER: u8 = 2;
const HAS_BEFORE: u8 = 4;

impl Token {
    fn encode(&self) -> String {
        let (mode, epoch, at) = match self.position {
            ExportPosition::Window { below, at } => (WINDOW, below, at),
            ExportPosition::Epochs { epoch, at } => (EPOCHS, epoch, at),
        };
        let f = &self.filters;
        let flags = u8::from(f.customer.is_some()) * HAS_CUSTOMER
            + u8::from(f.range.after_us.is_some()) * HAS_AFTER
            + u8::from(f.range.before_us.is_some()) * HAS_BEFORE;
        let language = f.language.as_deref().unwrap_or_default().as_bytes();
        let mut bytes = vec![TOKEN_VERSION, mode, flags];
        for word in [
            epoch,
            at.received_at_us,
            at.dialog_id,
            at.seq,
            f.customer.unwrap_or(0),
            f.range.after_us.unwrap_or(0),
            f.range.before_us.unwrap_or(0),
        ] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        // At most 35 bytes (`Language::MAX_LEN`).
        bytes.push(u8::try_from(language.len()).unwrap_or(0));
        bytes.extend_from_slice(language);
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum.to_be_bytes());
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn parse(raw: &str) -> Result<Self, Invalid> {
        const FIXED: usize = 3 + 7 * 8 + 1;
        let bad = || Invalid::ResumeToken;
        if !raw.is_ascii()
            || !raw.len().is_multiple_of(2)
            || raw.len() < 2 * (FIXED + 4)
            || raw.len() > 2 * (FIXED + 4 + 35)
        {
            return Err(bad());
        }
        let bytes = (0..raw.len() / 2)
            .map(|i| u8::from_str_radix(&raw[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad())?;
        let (body, sum) = bytes.split_at(bytes.len() - 4);
        if body[0] != TOKEN_VERSION || checksum(body).to_be_bytes() != sum {
            return Err(bad());
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&body[3 + 8 * i..11 + 8 * i]);
            i64::from_be_bytes(w)
        };
        let language = &body[FIXED..];
        if language.len() != usize::from(body[FIXED - 1]) {
            return Err(bad());
        }
        let language = match std::str::from_utf8(language).map_err(|_| bad())? {
            "" => None,
            l => Some(Language::parse(l.to_owned()).map_err(|_| bad())?.as_str().to_owned()),
        };
        let (mode, flags) = (body[1], body[2]);
        let at = MessageKey {
            received_at_us: word(1),
            dialog_id: word(2),
            seq: word(3),
        };
        let position = match mode {
            WINDOW => ExportPosition::Window { below: word(0), at },
            EPOCHS => ExportPosition::Epochs { epoch: word(0), at },
            _ => return Err(bad()),
        };
        if flags & !(HAS_CUSTOMER | HAS_AFTER | HAS_BEFORE) != 0 {
            return Err(bad());
        }
        let filters = Filters {
            customer: (flags & HAS_CUSTOMER != 0).then(|| word(4)),
            language,
            range: Range {
                after_us: (flags & HAS_AFTER != 0).then(|| word(5)),
                before_us: (flags & HAS_BEFORE != 0).then(|| word(6)),
            },
        };
        if filters.customer.is_some_and(|c| c < 0) {
            return Err(bad());
        }
        Ok(Self { position, filters })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token {
            position: ExportPosition::Epochs {
                epoch: 7,
                at: MessageKey {
                    received_at_us: 1_795_000_000_123_456,
                    dialog_id: 42,
                    seq: 3,
                },
            },
            filters: Filters {
                customer: Some(5),
                language: Some("pt-br".into()),
                range: Range {
                    after_us: Some(1),
                    before_us: None,
                },
            },
        }
    }

    #[test]
    fn lines_are_what_serde_writes_for_a_message() {
        for (text, message_id, at) in [
            (
                "Hello, \"World\"\n\u{1}é😀",
                Some("m-1".to_owned()),
                1_795_000_000_123_456_i64,
            ),
            ("x", None, 0),
            ("", None, 253_402_300_799_999_999),
        ] {
            let m = StoredMessage {
                customer_id: 7,
                dialog_id: i64::MAX,
                seq: 1,
                text: text.to_owned(),
                language: "pt-BR".to_owned(),
                received_at: crate::store::time_of(at),
                message_id,
            };
            let mut line = Vec::new();
            write_line(&mut line, &m);
            let mut expected = serde_json::to_vec(&MessageOut::from(m)).unwrap_or_default();
            expected.push(b'\n');
            assert_eq!(String::from_utf8_lossy(&line), String::from_utf8_lossy(&expected));
        }
    }

    #[test]
    fn tokens_round_trip_and_refuse_any_change() {
        let t = token();
        let encoded = t.encode();
        assert_eq!(Token::parse(&encoded), Ok(t));
        let fresh = Token {
            position: ExportPosition::Window {
                below: 3,
                at: MessageKey::START,
            },
            filters: Filters::default(),
        };
        assert_eq!(Token::parse(&fresh.encode()), Ok(fresh));
        for i in 0..encoded.len() {
            let mut changed = encoded.clone().into_bytes();
            changed[i] = if changed[i] == b'0' { b'1' } else { b'0' };
            let changed = String::from_utf8(changed).unwrap_or_default();
            assert_eq!(Token::parse(&changed), Err(Invalid::ResumeToken), "byte {i}");
        }
        for bad in ["", "zz", &encoded[..encoded.len() - 2], &format!("{encoded}00"), "é"] {
            assert_eq!(Token::parse(bad), Err(Invalid::ResumeToken), "{bad:?}");
        }
        // GET /data's cursors are not resume tokens.
        let cursor = crate::domain::Cursor {
            received_at_us: 1,
            dialog_id: 2,
            seq: 3,
        };
        assert_eq!(Token::parse(&cursor.encode()), Err(Invalid::ResumeToken));
    }
}

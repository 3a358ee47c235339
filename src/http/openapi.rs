//! The OpenAPI 3.1 document. Paths come from the handlers' `#[utoipa::path]` attributes,
//! gathered by the same `OpenApiRouter` that routes them (see `http::routes`), so a route
//! cannot be served without being described; this module adds what is shared: info,
//! the bearer scheme, the problem+json schema.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::error::Problem;
use super::export::ResumeLine;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dapi",
        description = "Stages chatbot dialogs in Redis, stores consented ones in PostgreSQL, serves them page by page. Errors are application/problem+json (RFC 9457) with a stable `code`.",
        license(name = "MIT")
    ),
    components(schemas(Problem, MessageBody, BatchItem, BatchBody, ConsentBody, ResumeLine)),
    modifiers(&BearerAuth),
    tags(
        (name = "ingest", description = "Chatbots: stage messages, record consent (ingest token)"),
        (name = "read", description = "Analysts: consented messages, newest first or as a resumable NDJSON export (read token)"),
        (name = "operations", description = "Health, readiness, metrics, this document (no token)")
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `POST /data/{customerId}/{dialogId}` body. Unknown fields are ignored.
#[derive(Debug, ToSchema)]
#[schema(example = json!({"text": "Hello, World", "language": "EN"}))]
#[allow(dead_code)] // describes the body; the handler reads it field by field
pub struct MessageBody {
    /// 1 … `DAPI_MAX_TEXT_BYTES` (default 32768) UTF-8 bytes, without U+0000. (The
    /// schema's bound of 8192 characters is what always fits: a character takes up to 4
    /// bytes.)
    #[schema(min_length = 1, max_length = 8192, pattern = "^[^\\u0000]+$")]
    text: String,
    /// A language tag, stored as sent.
    #[schema(pattern = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$", max_length = 35)]
    language: String,
    /// The client's own id for this message: a repeat within `DAPI_IDEMPOTENCY_WINDOW`
    /// stores nothing and answers the first answer with `"duplicate": true`.
    #[schema(
        rename = "messageId",
        pattern = r"^[A-Za-z0-9._:-]{1,64}$",
        min_length = 1,
        max_length = 64
    )]
    message_id: Option<String>,
}

/// One item of `POST /data`: a message with its dialog.
#[derive(Debug, ToSchema)]
#[schema(example = json!({"customerId": 1, "dialogId": 2, "text": "Hello", "language": "EN", "messageId": "m-1"}))]
#[allow(dead_code, non_snake_case)] // describes the body; the handler reads it field by field
pub struct BatchItem {
    #[schema(minimum = 0)]
    customerId: i64,
    #[schema(minimum = 0)]
    dialogId: i64,
    #[schema(min_length = 1, max_length = 8192, pattern = "^[^\\u0000]+$")]
    text: String,
    #[schema(pattern = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$", max_length = 35)]
    language: String,
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,64}$", min_length = 1, max_length = 64)]
    messageId: Option<String>,
}

/// `POST /data` body: 1 … `DAPI_MAX_BATCH_MESSAGES` (default 1000) messages, the whole
/// body at most `DAPI_MAX_BATCH_BYTES` (default 4 MiB) once decoded.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // describes the body; the handler reads it field by field
pub struct BatchBody {
    #[schema(min_items = 1, max_items = 1000)]
    messages: Vec<BatchItem>,
}

/// `POST /consents/{dialogId}` body: `{"approved": true}`, `{"approved": "true"}` (any
/// case), or a bare `true` / `false`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // describes the body; the handler reads it as JSON
pub enum ConsentBody {
    Object(ApprovedObject),
    Bare(bool),
}

#[derive(Debug, serde::Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ApprovedObject {
    approved: Approved,
}

/// A JSON boolean, or the string "true" / "false" in any case.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum Approved {
    Bool(bool),
    Word(ApprovedWord),
}

/// "true" or "false", in any case.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[schema(pattern = "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])$")]
#[allow(dead_code)]
pub struct ApprovedWord(String);

//! Compressed bodies: requests may come as `Content-Encoding: gzip` or `zstd`, and
//! `GET /data` answers compressed when `Accept-Encoding` allows `gzip`, `zstd` or `br`.
//!
//! Decoding is tower-http's, streamed: the body extractor counts the *decoded* bytes
//! against the route's limit as they come (axum's `DefaultBodyLimit` wraps the decoding
//! body), so a small compressed bomb is refused with 413 as soon as it passes the limit
//! and never expands in memory. What tower-http would answer in plain text is answered
//! here first as problem+json: an encoding other than gzip or zstd is 415
//! `unsupported_encoding`; a body that does not decode is 400 `malformed_body` (the
//! extractor knows, by [`Encoded`]).

use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;

use super::ApiError;

/// Marks a request whose body arrived compressed.
#[derive(Debug, Clone, Copy)]
pub struct Encoded;

/// Middleware before decoding: lets through bodies that are plain, gzip or zstd (one
/// coding), refuses the rest.
pub async fn accept_encodings(mut request: Request, next: Next) -> Response {
    let coding = match request.headers().get(header::CONTENT_ENCODING) {
        None => return next.run(request).await,
        Some(value) => value.to_str().unwrap_or_default().trim().to_ascii_lowercase(),
    };
    match coding.as_str() {
        "identity" | "" => next.run(request).await,
        "gzip" | "x-gzip" | "zstd" => {
            request.extensions_mut().insert(Encoded);
            next.run(request).await
        }
        _ => ApiError::UnsupportedEncoding.into_response(),
    }
}

/// Decodes gzip and zstd request bodies.
pub fn decoding() -> RequestDecompressionLayer {
    RequestDecompressionLayer::new().no_br().no_deflate()
}

/// Compresses answers as the client accepts: gzip, zstd or br.
pub fn encoding() -> CompressionLayer {
    CompressionLayer::new().no_deflate()
}

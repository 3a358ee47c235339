//! Compressed bodies: requests may come as `Content-Encoding: gzip` or `zstd`, and
//! `GET /data` answers compressed when `Accept-Encoding` allows `gzip`, `zstd` or `br`.
//!
//! Decoding is streamed: [`decode_bodies`] swaps the request's body for a decoder over
//! it, and the body extractor counts the *decoded* bytes against the route's limit as
//! they come (axum's `DefaultBodyLimit` wraps whatever body the request holds), so a
//! small compressed bomb is refused with 413 as soon as it passes the limit and never
//! expands in memory. An encoding other than gzip or zstd is 415 `unsupported_encoding`;
//! a body that does not decode is 400 `malformed_body` (the extractor knows, by
//! [`Encoded`]).
//!
//! Our own layer, not tower-http's `RequestDecompressionLayer` (used before 6e12fb3):
//! that one matched coding names case-sensitively and answered `GZIP` with a bare 415,
//! and decoded only a gzip body's first member, so a multi-member body (RFC 1952) lost
//! its rest and trailing garbage was taken silently. The decoders are the same
//! async-compression ones it wraps.

use std::io;

use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use async_compression::zstd::DParameter;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use tokio::io::AsyncBufRead;
use tokio_util::io::{ReaderStream, StreamReader};
use tower_http::compression::CompressionLayer;

use super::ApiError;

/// Marks a request whose body arrived compressed.
#[derive(Debug, Clone, Copy)]
pub struct Encoded;

/// The largest zstd window a body may ask for: 8 MiB, the most an HTTP zstd encoder may
/// use (RFC 9659) — the decoder allocates the window, so a frame asking for zstd's own
/// default maximum (128 MiB) would cost that much memory per request.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Decoded bytes handed on at a time.
const CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
    Zstd,
}

/// The body's coding from every `Content-Encoding` line: names in any case, `x-gzip`
/// as `gzip` (RFC 9110, 8.4.1.3), `identity` and empty entries as none. `None`: a coding
/// dapi does not decode, or more than one (a body encoded twice).
fn coding(headers: &HeaderMap) -> Option<Coding> {
    let mut found = Coding::Identity;
    for value in headers.get_all(header::CONTENT_ENCODING) {
        for name in value.to_str().ok()?.split(',').map(str::trim) {
            let this = if name.is_empty() || name.eq_ignore_ascii_case("identity") {
                continue;
            } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                Coding::Gzip
            } else if name.eq_ignore_ascii_case("zstd") {
                Coding::Zstd
            } else {
                return None;
            };
            if found != Coding::Identity {
                return None;
            }
            found = this;
        }
    }
    Some(found)
}

/// Middleware: refuses codings dapi does not decode, and gives a gzip or zstd request a
/// decoding body (without its `Content-Encoding` and `Content-Length`, which described
/// the encoded one).
pub async fn decode_bodies(mut request: Request, next: Next) -> Response {
    if !request.headers().contains_key(header::CONTENT_ENCODING) {
        return next.run(request).await;
    }
    let Some(coding) = coding(request.headers()) else {
        return ApiError::UnsupportedEncoding.into_response();
    };
    let headers = request.headers_mut();
    headers.remove(header::CONTENT_ENCODING);
    if coding == Coding::Identity {
        return next.run(request).await;
    }
    headers.remove(header::CONTENT_LENGTH);
    request.extensions_mut().insert(Encoded);
    next.run(request.map(|body| decode(body, coding))).await
}

fn decode(body: Body, coding: Coding) -> Body {
    match coding {
        Coding::Identity => body,
        Coding::Gzip => {
            let mut decoder = GzipDecoder::new(encoded(body));
            // Every member, and an error for anything after the last that is not one.
            decoder.multiple_members(true);
            Body::from_stream(ReaderStream::with_capacity(decoder, CHUNK))
        }
        Coding::Zstd => {
            let params = [DParameter::window_log_max(ZSTD_WINDOW_LOG_MAX)];
            let mut decoder = ZstdDecoder::with_params(encoded(body), &params);
            decoder.multiple_members(true);
            Body::from_stream(ReaderStream::with_capacity(decoder, CHUNK))
        }
    }
}

/// The encoded body as a reader for a decoder.
fn encoded(body: Body) -> impl AsyncBufRead + Send + 'static {
    StreamReader::new(body.into_data_stream().map_err(io::Error::other))
}

/// Middleware before [`encoding`]: tower-http ignores `*` in `Accept-Encoding`, which
/// allows every coding not listed (RFC 9110, 12.5.3); so `*` is spelt out as the
/// codings dapi answers with that are not listed, at `*`'s weight.
pub async fn spell_out_any_coding(mut request: Request, next: Next) -> Response {
    if let Some(extra) = any_coding(request.headers()) {
        request.headers_mut().append(header::ACCEPT_ENCODING, extra);
    }
    next.run(request).await
}

fn any_coding(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut star = None;
    let mut listed = Vec::new();
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        for entry in value.to_str().ok()?.split(',') {
            let mut parts = entry.splitn(2, ';');
            let name = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            if name == "*" {
                star = Some(parts.next().map(str::trim).unwrap_or_default().to_owned());
            } else {
                listed.push(name);
            }
        }
    }
    let weight = star?;
    let extra: Vec<String> = ["zstd", "br", "gzip"]
        .into_iter()
        .filter(|name| !listed.iter().any(|l| l == name))
        .map(|name| {
            if weight.is_empty() {
                name.to_owned()
            } else {
                format!("{name};{weight}")
            }
        })
        .collect();
    if extra.is_empty() {
        return None;
    }
    HeaderValue::from_str(&extra.join(", ")).ok()
}

/// Compresses answers as the client accepts: gzip, zstd or br.
pub fn encoding() -> CompressionLayer {
    CompressionLayer::new().no_deflate()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: header::HeaderName, values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(name.clone(), HeaderValue::from_str(v).unwrap()); // allow: a unit test
        }
        map
    }

    #[test]
    fn coding_names_are_matched_in_any_case_and_one_at_most() {
        let of = |values: &[&str]| coding(&headers(header::CONTENT_ENCODING, values));
        assert_eq!(of(&["GZIP"]), Some(Coding::Gzip));
        assert_eq!(of(&["x-gzip"]), Some(Coding::Gzip));
        assert_eq!(of(&["Zstd"]), Some(Coding::Zstd));
        assert_eq!(of(&["Identity"]), Some(Coding::Identity));
        assert_eq!(of(&[""]), Some(Coding::Identity));
        assert_eq!(of(&["identity, gzip"]), Some(Coding::Gzip));
        assert_eq!(of(&["gzip, gzip"]), None);
        assert_eq!(of(&["gzip", "zstd"]), None);
        assert_eq!(of(&["br"]), None);
    }

    #[test]
    fn any_coding_is_spelt_out_without_overriding_what_is_listed() {
        let of = |value: &str| any_coding(&headers(header::ACCEPT_ENCODING, &[value]));
        assert_eq!(of("*").unwrap(), "zstd, br, gzip"); // allow: a unit test
        assert_eq!(of("gzip;q=0, *;q=0.5").unwrap(), "zstd;q=0.5, br;q=0.5"); // allow: a unit test
        assert_eq!(of("gzip, zstd, br, *"), None);
        assert_eq!(of("gzip"), None);
    }
}

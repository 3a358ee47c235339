//! Logging: the tracing subscriber, configured once at start. Knows no domain type.
//!
//! The filter comes from `DAPI_LOG`, else `RUST_LOG`, else `info`; `DAPI_LOG_FORMAT=json`
//! writes one JSON object per line. Customer text never reaches a log line: the types
//! that hold it print only their length.

use std::error::Error;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Calling it twice keeps the first (tests do).
pub fn init(format: LogFormat) {
    let filter = std::env::var("DAPI_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// An error and all its causes on one line: `outer: middle: root`.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

//! dapi stages what customers type to a chatbot in Redis, moves a dialog into PostgreSQL
//! once its consent arrives, erases it everywhere on a refusal, and serves consented
//! messages to analysts page by page.
//!
//! The modules, in the order a message travels through them:
//!
//! - [`config`] — settings: every environment variable dapi reads, as an option that
//!   `dapi --help` documents; parsed and validated once.
//! - [`telemetry`] — the tracing subscriber and the metrics recorder; error chains for logs.
//! - [`domain`] — IDs, text, language tags, decisions, cursors: parsing, no I/O.
//! - [`http`] — router, extractors, handlers, the problem+json error type.
//! - [`ingest`] — the request path's decisions: staging messages, recording a consent
//!   decision (reviving a dialog Redis forgot, erasing a refusal).
//! - [`staging`] — the Redis keyspace, its Lua scripts with their typed wire, and the
//!   flush queue.
//! - [`store`] — PostgreSQL: migrations, the fenced batch write, reads and counts.
//! - [`flusher`] — moves consented dialogs from `staging` to `store`.
//! - [`erasure`] — erases a whole customer, and finishes every erasure left pending.
//! - [`app`] — builds everything, runs it, stops it.
//!
//! Beside them, `group_commit`: the one helper that gathers concurrent callers' work into
//! one batched call (single POSTs' script calls, PostgreSQL lookups, `WAIT` rounds).

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod domain;
pub mod erasure;
pub mod flusher;
mod group_commit;
pub mod http;
pub mod ingest;
pub mod staging;
pub mod store;
pub mod telemetry;

//! Integration tests: the real app against the real PostgreSQL and Redis.

#![allow(clippy::unwrap_used)]

mod access;
mod binary;
mod cleanup;
mod consent;
mod edges;
mod faults;
mod flusher;
mod fuzz;
mod harness;
mod helpers;
mod ingest;
mod limits;
mod observe;
mod ops;
mod outage;
mod plans;
mod read;
mod store;

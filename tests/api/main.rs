//! Integration tests: the real app against the real PostgreSQL and Redis.

#![allow(clippy::unwrap_used)]

mod access;
mod batch;
mod binary;
mod cleanup;
mod cluster;
mod config;
mod consent;
mod contract;
mod encoding;
mod expiry;
mod export;
mod failover;
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
mod privacy;
mod quarantine;
mod read;
mod redis_loss;
mod redis_replicas;
mod replica;
mod retention;
mod store;
mod untrusted;

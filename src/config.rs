//! Settings: every environment variable dapi reads is declared here, once, as a clap
//! option with its variable, default and meaning — so `dapi --help` documents them all
//! and nothing else in the process reads the environment. [`SettingsArgs`] is what clap
//! parses (raw text); [`Settings`] is what the rest of dapi gets: parsed, checked, shared
//! read-only. Opens no connection. Every variable is optional; the defaults serve a
//! machine with PostgreSQL and Redis on localhost (docs/operations.md).
//!
//! An empty variable counts as unset, as in most shells' `${X:-default}`. An invalid value
//! is a [`ConfigError`] that names the variable; `main` turns it into exit code 2.

use std::net::SocketAddr;
use std::time::Duration;

/// The defaults, shown by `dapi --help` and used when a variable is unset or empty.
mod default {
    pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/dapi";
    pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
    pub const BIND: &str = "127.0.0.1:8000";
    pub const STAGING_TTL: &str = "7d";
    pub const MAX_TEXT_BYTES: &str = "32768";
    pub const MAX_BODY_BYTES: &str = "65536";
    pub const ALLOW_OPEN: &str = "false";
    pub const FLUSH_CLAIM_IDLE: &str = "5s";
    pub const SHUTDOWN_TIMEOUT: &str = "30s";
    pub const MIGRATE: &str = "true";
    pub const LOG: &str = "info";
    pub const LOG_FORMAT: &str = "text";
    pub const REDIS_PREFIX: &str = "dapi";
    pub const FLUSHERS: &str = "2";
    pub const FLUSH_BATCH: &str = "256";
    pub const REQUEST_TIMEOUT: &str = "10s";
    pub const MAX_IN_FLIGHT: &str = "1024";
    pub const HEADER_TIMEOUT: &str = "10s";
    pub const HOST_NAME: &str = "dapi";
    pub const IDEMPOTENCY_WINDOW: &str = "24h";
    pub const MAX_BATCH_MESSAGES: &str = "1000";
    pub const MAX_BATCH_BYTES: &str = "4194304";
    pub const REPLICA_WAIT: &str = "5s";
    pub const REDIS_WAIT_REPLICAS: &str = "0";
    pub const REDIS_CLUSTER: &str = "false";
}

/// How values are written; `dapi --help` shows it below the options.
pub const VALUE_FORMATS: &str = "\
Each option is usually set through the environment variable shown beside it; an empty
variable counts as unset. Durations: 500ms, 30s, 5m, 2h, 7d (a bare number is seconds).
Booleans: true or false (also 1/0, yes/no, on/off). An invalid value stops dapi with a
one-line message naming the variable, exit code 2.";

/// The settings as clap reads them: one option per environment variable, raw text.
/// [`Settings::try_from`] parses and checks them. Every option is global, so that
/// `dapi <command> --help` lists them too, and hides the variable's current value, so
/// that `--help` never prints a secret (tokens, a password in a URL) and reads the same
/// everywhere.
#[derive(Clone, clap::Args)]
#[command(next_help_heading = "Settings")]
pub struct SettingsArgs {
    /// PostgreSQL, as postgres://user:password@host:port/database; the database is created
    /// when missing and the role may create it
    #[arg(long, env = "DATABASE_URL", value_name = "URL", default_value = default::DATABASE_URL,
          hide_env_values = true, global = true)]
    pub database_url: String,

    /// Redis, as redis://[:password@]host:port[/N] (a /N database number is honoured)
    #[arg(long, env = "REDIS_URL", value_name = "URL", default_value = default::REDIS_URL,
          hide_env_values = true, global = true)]
    pub redis_url: String,

    /// Speak Redis Cluster: REDIS_URL may then list seed nodes, comma-separated
    /// (redis://a:7000,redis://b:7000); every node must be reachable by the addresses the
    /// cluster announces
    #[arg(long, env = "DAPI_REDIS_CLUSTER", value_name = "BOOL", default_value = default::REDIS_CLUSTER,
          hide_env_values = true, global = true)]
    pub redis_cluster: String,

    /// Answer a write (a message, a decision) only once this many Redis replicas hold it
    /// (WAIT, at most 1s; else 503 replication_timeout); 0: do not wait
    #[arg(long, env = "DAPI_REDIS_WAIT_REPLICAS", value_name = "N", default_value = default::REDIS_WAIT_REPLICAS,
          hide_env_values = true, global = true)]
    pub redis_wait_replicas: String,

    /// PostgreSQL that GET /data reads, such as a streaming replica (unset: DATABASE_URL);
    /// writes and erasures always go to DATABASE_URL
    #[arg(
        long,
        env = "DATABASE_READ_URL",
        value_name = "URL",
        hide_env_values = true,
        global = true
    )]
    pub database_read_url: Option<String>,

    /// How long a refusal waits for the read replica to replay its erasure before it
    /// answers 503 erasure_pending (only with DATABASE_READ_URL)
    #[arg(long, env = "DAPI_REPLICA_WAIT", value_name = "DURATION", default_value = default::REPLICA_WAIT,
          hide_env_values = true, global = true)]
    pub replica_wait: String,

    /// Address to listen on, an IP address and a port (the API, or a flusher's operations
    /// endpoints)
    #[arg(long, env = "DAPI_BIND", value_name = "IP:PORT", default_value = default::BIND,
          hide_env_values = true, global = true)]
    pub bind: String,

    /// Absolute http(s) base URL for next/previous links, for a dapi behind a proxy
    /// (unset: http:// and the request's Host)
    #[arg(
        long,
        env = "DAPI_PUBLIC_URL",
        value_name = "URL",
        hide_env_values = true,
        global = true
    )]
    pub public_url: Option<String>,

    /// How long an undecided or refused dialog is remembered (at least 1s)
    #[arg(long, env = "DAPI_STAGING_TTL", value_name = "DURATION", default_value = default::STAGING_TTL,
          hide_env_values = true, global = true)]
    pub staging_ttl: String,

    /// Consented messages older than this (by receivedAt) are deleted, a month's
    /// partition at a time, by the processes that run flushers (unset: kept for ever;
    /// at least 1d)
    #[arg(
        long,
        env = "DAPI_RETENTION",
        value_name = "DURATION",
        hide_env_values = true,
        global = true
    )]
    pub retention: Option<String>,

    /// Largest `text` of a message, in UTF-8 bytes
    #[arg(long, env = "DAPI_MAX_TEXT_BYTES", value_name = "BYTES", default_value = default::MAX_TEXT_BYTES,
          hide_env_values = true, global = true)]
    pub max_text_bytes: String,

    /// Largest request body, in bytes; at least DAPI_MAX_TEXT_BYTES + 4096
    #[arg(long, env = "DAPI_MAX_BODY_BYTES", value_name = "BYTES", default_value = default::MAX_BODY_BYTES,
          hide_env_values = true, global = true)]
    pub max_body_bytes: String,

    /// Comma-separated bearer tokens that may POST /data and /consents. Secret: set it in
    /// the environment (or use DAPI_TOKENS_FILE), where other users cannot read it
    #[arg(
        long,
        env = "DAPI_INGEST_TOKENS",
        value_name = "TOKENS",
        hide_env_values = true,
        global = true
    )]
    pub ingest_tokens: Option<String>,

    /// Comma-separated bearer tokens that may GET /data. Secret, like DAPI_INGEST_TOKENS
    #[arg(
        long,
        env = "DAPI_READ_TOKENS",
        value_name = "TOKENS",
        hide_env_values = true,
        global = true
    )]
    pub read_tokens: Option<String>,

    /// Comma-separated bearer tokens of the privacy role: DELETE /customers/{id}, GET
    /// /erasures/{id}, GET /audit and GET /consents/{id}, nothing else. Secret, like
    /// DAPI_INGEST_TOKENS
    #[arg(
        long,
        env = "DAPI_PRIVACY_TOKENS",
        value_name = "TOKENS",
        hide_env_values = true,
        global = true
    )]
    pub privacy_tokens: Option<String>,

    /// Audit events and completed erasure receipts older than this are deleted (unset:
    /// kept for ever; at least DAPI_RETENTION plus 31 days, so that the proof of a grant
    /// outlives its data). Pending receipts are never deleted
    #[arg(
        long,
        env = "DAPI_AUDIT_RETENTION",
        value_name = "DURATION",
        hide_env_values = true,
        global = true
    )]
    pub audit_retention: Option<String>,

    /// File of `ingest <token>` / `read <token>` / `privacy <token>` lines (# comments
    /// allowed), merged with the token lists. No tokens at all: the service is open
    #[arg(
        long,
        env = "DAPI_TOKENS_FILE",
        value_name = "PATH",
        hide_env_values = true,
        global = true
    )]
    pub tokens_file: Option<String>,

    /// Serve without tokens on a non-loopback address
    #[arg(long, env = "DAPI_ALLOW_OPEN", value_name = "BOOL", default_value = default::ALLOW_OPEN,
          hide_env_values = true, global = true)]
    pub allow_open: String,

    /// Idle time after which a dead flusher's queue entries are taken over
    #[arg(long, env = "DAPI_FLUSH_CLAIM_IDLE", value_name = "DURATION", default_value = default::FLUSH_CLAIM_IDLE,
          hide_env_values = true, global = true)]
    pub flush_claim_idle: String,

    /// Bound on a graceful shutdown (SIGTERM, SIGINT); past it dapi exits 1
    #[arg(long, env = "DAPI_SHUTDOWN_TIMEOUT", value_name = "DURATION", default_value = default::SHUTDOWN_TIMEOUT,
          hide_env_values = true, global = true)]
    pub shutdown_timeout: String,

    /// Apply the database migrations at start
    #[arg(long, env = "DAPI_MIGRATE", value_name = "BOOL", default_value = default::MIGRATE,
          hide_env_values = true, global = true)]
    pub migrate: String,

    /// Log filter: tracing EnvFilter directives such as `info` or `warn,dapi=debug`
    /// (unset: RUST_LOG, else info)
    #[arg(long, env = "DAPI_LOG", value_name = "FILTER", hide_env_values = true, global = true)]
    pub log: Option<String>,

    /// Log filter used when DAPI_LOG is unset
    #[arg(long, env = "RUST_LOG", value_name = "FILTER", hide_env_values = true, global = true)]
    pub rust_log: Option<String>,

    /// Log lines as `text`, or `json` (one object per line); logs go to stderr
    #[arg(long, env = "DAPI_LOG_FORMAT", value_name = "FORMAT", default_value = default::LOG_FORMAT,
          hide_env_values = true, global = true)]
    pub log_format: String,

    /// First part of every Redis key; lets several deployments share one Redis (no
    /// braces, spaces or * ? [ ] \)
    #[arg(long, env = "DAPI_REDIS_PREFIX", value_name = "PREFIX", default_value = default::REDIS_PREFIX,
          hide_env_values = true, global = true)]
    pub redis_prefix: String,

    /// Flusher tasks per process
    #[arg(long, env = "DAPI_FLUSHERS", value_name = "N", default_value = default::FLUSHERS,
          hide_env_values = true, global = true)]
    pub flushers: String,

    /// Flush-queue entries (dialogs) one flusher takes per batch, 1 to 4096
    #[arg(long, env = "DAPI_FLUSH_BATCH", value_name = "N", default_value = default::FLUSH_BATCH,
          hide_env_values = true, global = true)]
    pub flush_batch: String,

    /// Bound on one API request; past it the answer is 503 request_timeout
    #[arg(long, env = "DAPI_REQUEST_TIMEOUT", value_name = "DURATION", default_value = default::REQUEST_TIMEOUT,
          hide_env_values = true, global = true)]
    pub request_timeout: String,

    /// API requests handled at once; past it the answer is 503 overloaded, at once
    #[arg(long, env = "DAPI_MAX_IN_FLIGHT", value_name = "N", default_value = default::MAX_IN_FLIGHT,
          hide_env_values = true, global = true)]
    pub max_in_flight: String,

    /// Time a client has to send its request headers; past it the connection is closed
    #[arg(long, env = "DAPI_HEADER_TIMEOUT", value_name = "DURATION", default_value = default::HEADER_TIMEOUT,
          hide_env_values = true, global = true)]
    pub header_timeout: String,

    /// How long a `messageId` is remembered per dialog: a repeat within it stores nothing
    /// and answers the first answer
    #[arg(long, env = "DAPI_IDEMPOTENCY_WINDOW", value_name = "DURATION", default_value = default::IDEMPOTENCY_WINDOW,
          hide_env_values = true, global = true)]
    pub idempotency_window: String,

    /// Most items in one POST /data (a batch)
    #[arg(long, env = "DAPI_MAX_BATCH_MESSAGES", value_name = "N", default_value = default::MAX_BATCH_MESSAGES,
          hide_env_values = true, global = true)]
    pub max_batch_messages: String,

    /// Largest POST /data body (a batch) in bytes, once decoded; at least DAPI_MAX_BODY_BYTES
    #[arg(long, env = "DAPI_MAX_BATCH_BYTES", value_name = "BYTES", default_value = default::MAX_BATCH_BYTES,
          hide_env_values = true, global = true)]
    pub max_batch_bytes: String,

    /// This host's name, the first part of each flusher's consumer name in Redis
    /// (unset: /etc/hostname, else dapi)
    #[arg(long, env = "HOSTNAME", value_name = "NAME", hide_env_values = true, global = true)]
    pub host_name: Option<String>,

    /// For fault tests only, never in production: `crash-after-commit` aborts the process
    /// after a flush batch's commit and before its acknowledgement
    #[arg(
        long,
        env = "DAPI_FAILPOINT",
        value_name = "FAULT",
        hide_env_values = true,
        global = true
    )]
    pub failpoint: Option<String>,
}

impl std::fmt::Debug for SettingsArgs {
    /// Names the fields without their values: the URLs may hold passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettingsArgs").finish_non_exhaustive()
    }
}

/// Everything the process is told from outside, parsed and checked. `Debug` leaves out
/// the URLs (they may hold passwords); tokens show only how many.
#[derive(Clone)]
pub struct Settings {
    /// A PostgreSQL URL that parses as `PgConnectOptions` (`DATABASE_URL`).
    pub database_url: String,
    /// A Redis URL that parses as a `redis::ConnectionInfo` (`REDIS_URL`).
    pub redis_url: String,
    /// `REDIS_URL` lists seed nodes of a Redis Cluster (`DAPI_REDIS_CLUSTER`).
    pub redis_cluster: bool,
    /// Redis replicas that must hold a write before it is answered (`DAPI_REDIS_WAIT_REPLICAS`).
    pub redis_wait_replicas: usize,
    /// The PostgreSQL that reads go to, when not `database_url` (`DATABASE_READ_URL`).
    pub database_read_url: Option<String>,
    /// How long a refusal waits for the read replica (`DAPI_REPLICA_WAIT`).
    pub replica_wait: Duration,
    /// Listen address (`DAPI_BIND`).
    pub bind: SocketAddr,
    /// Base URL for `next` / `previous` links: absolute http(s), without a trailing `/`.
    pub public_url: Option<String>,
    pub staging_ttl: Duration,
    /// Delete consented messages older than this (`DAPI_RETENTION`; `None`: keep).
    pub retention: Option<Duration>,
    /// Delete audit events and completed receipts older than this
    /// (`DAPI_AUDIT_RETENTION`; `None`: keep).
    pub audit_retention: Option<Duration>,
    pub max_text_bytes: usize,
    pub max_body_bytes: usize,
    pub flush_claim_idle: Duration,
    pub shutdown_timeout: Duration,
    pub migrate: bool,
    /// Log filter directives, checked to parse (`DAPI_LOG`, else `RUST_LOG`, else `info`).
    pub log_filter: String,
    pub log_format: LogFormat,
    /// First part of every Redis key (`DAPI_REDIS_PREFIX`, default `dapi`); lets several
    /// deployments, or tests, share one Redis.
    pub redis_prefix: String,
    /// Flusher tasks per process (`DAPI_FLUSHERS`, default 2).
    pub flushers: usize,
    /// Flush-queue entries (dialogs) one flusher takes per batch (`DAPI_FLUSH_BATCH`).
    pub flush_batch: usize,
    /// Bearer tokens by role, from `DAPI_INGEST_TOKENS`, `DAPI_READ_TOKENS` and
    /// `DAPI_TOKENS_FILE`. Empty: the service is open.
    pub tokens: Tokens,
    /// Allow an open service on a non-loopback address (`DAPI_ALLOW_OPEN`).
    pub allow_open: bool,
    /// Bound on one request, after which it is answered 503 (`DAPI_REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// Requests handled at once; past it dapi answers 503 at once (`DAPI_MAX_IN_FLIGHT`).
    pub max_in_flight: usize,
    /// Time a client has to send its request headers (`DAPI_HEADER_TIMEOUT`).
    pub header_timeout: Duration,
    /// How long a `messageId` is remembered per dialog (`DAPI_IDEMPOTENCY_WINDOW`).
    pub idempotency_window: Duration,
    /// Most items in one `POST /data` (`DAPI_MAX_BATCH_MESSAGES`).
    pub max_batch_messages: usize,
    /// Largest decoded `POST /data` body (`DAPI_MAX_BATCH_BYTES`).
    pub max_batch_bytes: usize,
    /// This host's name, for flusher consumer names (`HOSTNAME`, else /etc/hostname).
    pub host_name: String,
    /// A fault to inject, for the fault tests (`DAPI_FAILPOINT`).
    pub failpoint: Option<Failpoint>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("bind", &self.bind)
            .field("public_url", &self.public_url.is_some())
            .field("read_replica", &self.database_read_url.is_some())
            .field("staging_ttl", &self.staging_ttl)
            .field("redis_prefix", &self.redis_prefix)
            .field("flushers", &self.flushers)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// Bearer tokens by role. `Debug` shows how many, never a token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    pub ingest: Vec<String>,
    pub read: Vec<String>,
    pub privacy: Vec<String>,
}

impl Tokens {
    pub fn is_empty(&self) -> bool {
        self.ingest.is_empty() && self.read.is_empty() && self.privacy.is_empty()
    }

    /// Reads `role token` lines (`ingest`, `read` or `privacy`); blank lines and `#` comments are
    /// skipped. An error names the line, never its token.
    pub fn parse_file(text: &str) -> Result<Self, String> {
        let mut tokens = Tokens::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(role), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!(
                    "line {}: expected `ingest <token>`, `read <token>` or `privacy <token>`",
                    number + 1
                ));
            };
            match role {
                "ingest" => tokens.ingest.push(token.to_owned()),
                "read" => tokens.read.push(token.to_owned()),
                "privacy" => tokens.privacy.push(token.to_owned()),
                _ => {
                    return Err(format!(
                        "line {}: the role must be `ingest`, `read` or `privacy`",
                        number + 1
                    ));
                }
            }
        }
        Ok(tokens)
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ingest", &self.ingest.len())
            .field("read", &self.read.len())
            .field("privacy", &self.privacy.len())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A fault the fault tests ask a `dapi` process to inject (`DAPI_FAILPOINT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// Abort right after a flush batch's PostgreSQL commit, before its acknowledgement:
    /// the worst instant for a crash.
    CrashAfterCommit,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("the settings do not parse")]
    Args(#[source] clap::Error),
}

impl Settings {
    /// Reads settings through `lookup` instead of the process environment (tests and
    /// benches supply their own), with the same options, defaults and checks as
    /// `dapi`'s command line.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        use clap::{Args, FromArgMatches};

        let mut argv = vec!["dapi".to_owned()];
        let command = SettingsArgs::augment_args(clap::Command::new("dapi")).mut_args(|arg| {
            let value = arg.get_env().and_then(|name| name.to_str()).and_then(&lookup);
            if let (Some(value), Some(long)) = (value, arg.get_long()) {
                argv.push(format!("--{long}={value}"));
            }
            // The process environment must not leak in.
            arg.env(None::<&'static str>)
        });
        let matches = command.try_get_matches_from(argv).map_err(ConfigError::Args)?;
        let args = SettingsArgs::from_arg_matches(&matches).map_err(ConfigError::Args)?;
        Settings::try_from(args)
    }
}

impl TryFrom<SettingsArgs> for Settings {
    type Error = ConfigError;

    fn try_from(args: SettingsArgs) -> Result<Self, ConfigError> {
        let redis_cluster = boolean("DAPI_REDIS_CLUSTER", or(&args.redis_cluster, default::REDIS_CLUSTER))?;
        let settings = Settings {
            database_url: postgres_url("DATABASE_URL", or(&args.database_url, default::DATABASE_URL))?,
            redis_cluster,
            redis_url: redis_url("REDIS_URL", or(&args.redis_url, default::REDIS_URL), redis_cluster)?,
            redis_wait_replicas: number(
                "DAPI_REDIS_WAIT_REPLICAS",
                or(&args.redis_wait_replicas, default::REDIS_WAIT_REPLICAS),
            )?,
            database_read_url: given(args.database_read_url.as_deref())
                .map(|url| postgres_url("DATABASE_READ_URL", url))
                .transpose()?,
            replica_wait: duration("DAPI_REPLICA_WAIT", or(&args.replica_wait, default::REPLICA_WAIT))?,
            bind: bind("DAPI_BIND", or(&args.bind, default::BIND))?,
            public_url: given(args.public_url.as_deref())
                .map(|url| public_url("DAPI_PUBLIC_URL", url))
                .transpose()?,
            staging_ttl: duration("DAPI_STAGING_TTL", or(&args.staging_ttl, default::STAGING_TTL))?,
            retention: given(args.retention.as_deref())
                .map(|raw| duration("DAPI_RETENTION", raw))
                .transpose()?,
            audit_retention: given(args.audit_retention.as_deref())
                .map(|raw| duration("DAPI_AUDIT_RETENTION", raw))
                .transpose()?,
            max_text_bytes: number("DAPI_MAX_TEXT_BYTES", or(&args.max_text_bytes, default::MAX_TEXT_BYTES))?,
            max_body_bytes: number("DAPI_MAX_BODY_BYTES", or(&args.max_body_bytes, default::MAX_BODY_BYTES))?,
            flush_claim_idle: duration(
                "DAPI_FLUSH_CLAIM_IDLE",
                or(&args.flush_claim_idle, default::FLUSH_CLAIM_IDLE),
            )?,
            shutdown_timeout: duration(
                "DAPI_SHUTDOWN_TIMEOUT",
                or(&args.shutdown_timeout, default::SHUTDOWN_TIMEOUT),
            )?,
            migrate: boolean("DAPI_MIGRATE", or(&args.migrate, default::MIGRATE))?,
            log_filter: log_filter(given(args.log.as_deref()), given(args.rust_log.as_deref()))?,
            log_format: match or(&args.log_format, default::LOG_FORMAT).to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(invalid("DAPI_LOG_FORMAT", "expected text or json")),
            },
            redis_prefix: or(&args.redis_prefix, default::REDIS_PREFIX).to_owned(),
            flushers: number("DAPI_FLUSHERS", or(&args.flushers, default::FLUSHERS))?,
            flush_batch: number("DAPI_FLUSH_BATCH", or(&args.flush_batch, default::FLUSH_BATCH))?,
            tokens: tokens(
                given(args.ingest_tokens.as_deref()),
                given(args.read_tokens.as_deref()),
                given(args.privacy_tokens.as_deref()),
                given(args.tokens_file.as_deref()),
            )?,
            allow_open: boolean("DAPI_ALLOW_OPEN", or(&args.allow_open, default::ALLOW_OPEN))?,
            request_timeout: duration(
                "DAPI_REQUEST_TIMEOUT",
                or(&args.request_timeout, default::REQUEST_TIMEOUT),
            )?,
            max_in_flight: number("DAPI_MAX_IN_FLIGHT", or(&args.max_in_flight, default::MAX_IN_FLIGHT))?,
            header_timeout: duration("DAPI_HEADER_TIMEOUT", or(&args.header_timeout, default::HEADER_TIMEOUT))?,
            host_name: host_name(given(args.host_name.as_deref()))?,
            failpoint: given(args.failpoint.as_deref())
                .map(|raw| match raw {
                    "crash-after-commit" => Ok(Failpoint::CrashAfterCommit),
                    _ => Err(invalid(
                        "DAPI_FAILPOINT",
                        "the one fault (for fault tests) is crash-after-commit",
                    )),
                })
                .transpose()?,
            idempotency_window: duration(
                "DAPI_IDEMPOTENCY_WINDOW",
                or(&args.idempotency_window, default::IDEMPOTENCY_WINDOW),
            )?,
            max_batch_messages: number(
                "DAPI_MAX_BATCH_MESSAGES",
                or(&args.max_batch_messages, default::MAX_BATCH_MESSAGES),
            )?,
            max_batch_bytes: number(
                "DAPI_MAX_BATCH_BYTES",
                or(&args.max_batch_bytes, default::MAX_BATCH_BYTES),
            )?,
        };
        settings.validate()
    }
}

impl Settings {
    /// The checks that span several variables, or bound one.
    fn validate(self) -> Result<Self, ConfigError> {
        if self.staging_ttl < Duration::from_secs(1) {
            return Err(invalid("DAPI_STAGING_TTL", "must be at least 1s"));
        }
        if self.retention.is_some_and(|r| r < Duration::from_secs(86_400)) {
            return Err(invalid("DAPI_RETENTION", "must be at least 1d"));
        }
        if let Some(audit) = self.audit_retention {
            // The proof of a grant outlives its data: a month past the data's retention.
            let floor = self.retention.unwrap_or(Duration::ZERO) + Duration::from_secs(31 * 86_400);
            if self.retention.is_none() || audit < floor {
                return Err(invalid(
                    "DAPI_AUDIT_RETENTION",
                    "must be at least DAPI_RETENTION plus 31 days (and needs DAPI_RETENTION set: without it the data is kept for ever, and so must its proof be)",
                ));
            }
        }
        if self.max_text_bytes == 0 {
            return Err(invalid("DAPI_MAX_TEXT_BYTES", "must be at least 1"));
        }
        if self.max_body_bytes < self.max_text_bytes.saturating_add(4096) {
            return Err(invalid(
                "DAPI_MAX_BODY_BYTES",
                "must be at least DAPI_MAX_TEXT_BYTES + 4096, or a text of the largest allowed size could not be sent",
            ));
        }
        if self.flushers == 0 {
            return Err(invalid("DAPI_FLUSHERS", "must be at least 1"));
        }
        if !(1..=4096).contains(&self.flush_batch) {
            return Err(invalid("DAPI_FLUSH_BATCH", "must be 1 to 4096"));
        }
        if self.max_in_flight == 0 {
            return Err(invalid("DAPI_MAX_IN_FLIGHT", "must be at least 1"));
        }
        if self.request_timeout.is_zero() {
            return Err(invalid("DAPI_REQUEST_TIMEOUT", "must be more than 0"));
        }
        if self.header_timeout.is_zero() {
            return Err(invalid("DAPI_HEADER_TIMEOUT", "must be more than 0"));
        }
        // 0 would make every stop unclean (nothing finishes in no time), and flushers
        // claim each other's entries the moment they are read.
        if self.shutdown_timeout.is_zero() {
            return Err(invalid("DAPI_SHUTDOWN_TIMEOUT", "must be more than 0"));
        }
        if self.flush_claim_idle.is_zero() {
            return Err(invalid("DAPI_FLUSH_CLAIM_IDLE", "must be more than 0"));
        }
        if self.idempotency_window < Duration::from_millis(1) {
            return Err(invalid("DAPI_IDEMPOTENCY_WINDOW", "must be at least 1ms"));
        }
        if self.max_batch_messages == 0 {
            return Err(invalid("DAPI_MAX_BATCH_MESSAGES", "must be at least 1"));
        }
        if self.max_batch_bytes < self.max_body_bytes {
            return Err(invalid(
                "DAPI_MAX_BATCH_BYTES",
                "must be at least DAPI_MAX_BODY_BYTES, or a message a single POST takes could not be batched",
            ));
        }
        // Braces would change the keys' hash tags; glob characters would make the `SCAN`
        // patterns that walk dapi's keys match other keys, or none.
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}', ' ', '*', '?', '[', ']', '\\']) {
            return Err(invalid(
                "DAPI_REDIS_PREFIX",
                "must not be empty nor contain braces, spaces or * ? [ ] \\",
            ));
        }
        Ok(self)
    }
}

/// A value that is set and not blank, trimmed.
fn given(raw: Option<&str>) -> Option<&str> {
    raw.map(str::trim).filter(|v| !v.is_empty())
}

/// The value, or `default` when it is blank (an empty variable counts as unset).
fn or<'a>(raw: &'a str, default: &'a str) -> &'a str {
    given(Some(raw)).unwrap_or(default)
}

fn duration(name: &'static str, raw: &str) -> Result<Duration, ConfigError> {
    parse_duration(raw).ok_or_else(|| invalid(name, "expected a duration such as 500ms, 30s, 5m, 2h or 7d"))
}

fn number(name: &'static str, raw: &str) -> Result<usize, ConfigError> {
    raw.parse()
        .map_err(|_| invalid(name, "expected a non-negative integer"))
}

fn boolean(name: &'static str, raw: &str) -> Result<bool, ConfigError> {
    match raw.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(invalid(name, "expected true or false")),
    }
}

// The URL checks never echo the URL: it may hold a password.

fn postgres_url(name: &'static str, raw: &str) -> Result<String, ConfigError> {
    let url = url::Url::parse(raw).map_err(|e| invalid(name, &format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(invalid(name, "expected a postgres:// URL"));
    }
    raw.parse::<sqlx::postgres::PgConnectOptions>()
        .map_err(|e| invalid(name, &format!("not a PostgreSQL URL ({e})")))?;
    // Without one, PostgreSQL's default is the user's own database (often the shared
    // `postgres`): dapi's tables would land there.
    let named =
        !url.path().trim_matches('/').is_empty() || url.query_pairs().any(|(k, v)| k == "dbname" && !v.is_empty());
    if !named {
        return Err(invalid(name, "must name a database, as postgres://user@host:port/dapi"));
    }
    Ok(raw.to_owned())
}

/// One Redis URL, or with `cluster` one or more seed URLs separated by commas.
fn redis_url(name: &'static str, raw: &str, cluster: bool) -> Result<String, ConfigError> {
    let urls: Vec<&str> = if cluster {
        raw.split(',').map(str::trim).collect()
    } else {
        vec![raw]
    };
    for url in urls {
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| invalid(name, &format!("not a Redis URL ({e}); expected redis://host:port[/N]")))?;
        if cluster && info.redis_settings().db() != 0 {
            return Err(invalid(name, "a Redis Cluster has only database 0: drop the /N"));
        }
    }
    Ok(raw.to_owned())
}

fn bind(name: &'static str, raw: &str) -> Result<SocketAddr, ConfigError> {
    raw.parse().map_err(|_| {
        invalid(
            name,
            "expected an IP address and a port, such as 127.0.0.1:8000, 0.0.0.0:8000 or [::]:8000",
        )
    })
}

fn public_url(name: &'static str, raw: &str) -> Result<String, ConfigError> {
    let url = url::Url::parse(raw).map_err(|e| invalid(name, &format!("not an absolute URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(name, "expected an http:// or https:// URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            name,
            "must not have a query or a fragment: paths are appended to it",
        ));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

/// `DAPI_LOG` wins over `RUST_LOG`; the one in force must parse as a tracing filter, so a
/// typo stops dapi rather than silently logging something else.
fn log_filter(dapi_log: Option<&str>, rust_log: Option<&str>) -> Result<String, ConfigError> {
    let (name, filter) = match (dapi_log, rust_log) {
        (Some(filter), _) => ("DAPI_LOG", filter),
        (None, Some(filter)) => ("RUST_LOG", filter),
        (None, None) => ("DAPI_LOG", default::LOG),
    };
    tracing_subscriber::EnvFilter::builder().parse(filter).map_err(|e| {
        invalid(
            name,
            &format!("not a log filter ({e}); expected e.g. info or warn,dapi=debug"),
        )
    })?;
    // A bare word is a target at every level to tracing, so `warning` or `inf0` would
    // switch off every log line, the start-up warnings too: here a bare word must be a
    // level, and a target is written `target=level`.
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let bare = |d: &str| !d.contains(['=', '[']) && !LEVELS.iter().any(|l| d.eq_ignore_ascii_case(l));
    if filter.split(',').map(str::trim).any(|d| !d.is_empty() && bare(d)) {
        return Err(invalid(
            name,
            "a bare word must be a level (trace, debug, info, warn, error, off); write a target as target=level, e.g. warn,dapi=debug",
        ));
    }
    Ok(filter.to_owned())
}

/// The flushers' consumer names are Redis stream consumer names built from this.
fn host_name(from_env: Option<&str>) -> Result<String, ConfigError> {
    let usable = |h: &str| !h.contains(['{', '}']) && !h.contains(char::is_whitespace);
    match from_env {
        Some(name) if usable(name) => Ok(name.to_owned()),
        Some(_) => Err(invalid("HOSTNAME", "must not contain braces or spaces")),
        // Not a setting the operator chose: fall back rather than refuse.
        None => Ok(std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && usable(h))
            .unwrap_or_else(|| default::HOST_NAME.to_owned())),
    }
}

/// Tokens from the two lists (comma-separated) and the file, merged.
fn tokens(
    ingest: Option<&str>,
    read: Option<&str>,
    privacy: Option<&str>,
    file: Option<&str>,
) -> Result<Tokens, ConfigError> {
    let list = |raw: Option<&str>| -> Vec<String> {
        raw.map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
    };
    let mut tokens = Tokens {
        ingest: list(ingest),
        read: list(read),
        privacy: list(privacy),
    };
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("DAPI_TOKENS_FILE", &format!("cannot read the file: {e}")))?;
        let from_file = Tokens::parse_file(&text).map_err(|reason| invalid("DAPI_TOKENS_FILE", &reason))?;
        tokens.ingest.extend(from_file.ingest);
        tokens.read.extend(from_file.read);
        tokens.privacy.extend(from_file.privacy);
    }
    Ok(tokens)
}

fn invalid(name: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        name,
        reason: reason.to_owned(),
    }
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `7d`, or a bare number of seconds.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let value: u64 = digits.parse().ok()?;
    let millis = match unit.trim() {
        "ms" => value,
        "" | "s" => value.checked_mul(1000)?,
        "m" => value.checked_mul(60_000)?,
        "h" => value.checked_mul(3_600_000)?,
        "d" => value.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        Settings::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_serve_a_local_machine() {
        let s = settings(&[]).expect("defaults are valid"); // allow: test
        assert_eq!(s.database_url, "postgres://postgres@127.0.0.1:5432/dapi");
        assert_eq!(s.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(s.bind, SocketAddr::from(([127, 0, 0, 1], 8000)));
        assert_eq!(s.public_url, None);
        assert_eq!(s.staging_ttl, Duration::from_secs(604_800));
        assert_eq!((s.max_text_bytes, s.max_body_bytes), (32_768, 65_536));
        assert_eq!(s.flush_claim_idle, Duration::from_secs(5));
        assert_eq!(s.shutdown_timeout, Duration::from_secs(30));
        assert!(s.migrate);
        assert!(!s.allow_open);
        assert_eq!(s.log_filter, "info");
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.redis_prefix, "dapi");
        assert_eq!((s.flushers, s.flush_batch, s.max_in_flight), (2, 256, 1024));
        assert_eq!(
            (s.request_timeout, s.header_timeout),
            (Duration::from_secs(10), Duration::from_secs(10))
        );
        assert!(s.tokens.is_empty());
        assert!(!s.host_name.is_empty());
        assert_eq!(s.failpoint, None);
    }

    #[test]
    fn every_variable_is_read() {
        let s = settings(&[
            ("DATABASE_URL", "postgresql://u:p@db.example:6432/x?sslmode=require"),
            ("REDIS_URL", "redis://:p@cache.example:6380/3"),
            ("DAPI_BIND", "[::]:9000"),
            ("DAPI_PUBLIC_URL", "https://api.example.com/dapi/"),
            ("DAPI_STAGING_TTL", "2h"),
            ("DAPI_MAX_TEXT_BYTES", "100"),
            ("DAPI_MAX_BODY_BYTES", "5000"),
            ("DAPI_INGEST_TOKENS", "i"),
            ("DAPI_READ_TOKENS", "r"),
            ("DAPI_PRIVACY_TOKENS", "pv"),
            ("DAPI_RETENTION", "30d"),
            ("DAPI_AUDIT_RETENTION", "400d"),
            ("DAPI_ALLOW_OPEN", "yes"),
            ("DAPI_FLUSH_CLAIM_IDLE", "750ms"),
            ("DAPI_SHUTDOWN_TIMEOUT", "5"),
            ("DAPI_MIGRATE", "off"),
            ("DAPI_LOG", "warn,dapi=debug"),
            ("DAPI_LOG_FORMAT", "JSON"),
            ("DAPI_REDIS_PREFIX", "p"),
            ("DAPI_FLUSHERS", "3"),
            ("DAPI_FLUSH_BATCH", "4096"),
            ("DAPI_REQUEST_TIMEOUT", "1m"),
            ("DAPI_MAX_IN_FLIGHT", "7"),
            ("DAPI_HEADER_TIMEOUT", "2s"),
            ("HOSTNAME", "box-1"),
            ("DAPI_FAILPOINT", "crash-after-commit"),
        ])
        .expect("valid"); // allow: test
        assert_eq!(s.database_url, "postgresql://u:p@db.example:6432/x?sslmode=require");
        assert_eq!(s.redis_url, "redis://:p@cache.example:6380/3");
        assert_eq!(s.bind, "[::]:9000".parse::<SocketAddr>().expect("an address")); // allow: test
        assert_eq!(s.public_url.as_deref(), Some("https://api.example.com/dapi"));
        assert_eq!(s.staging_ttl, Duration::from_secs(7200));
        assert_eq!((s.max_text_bytes, s.max_body_bytes), (100, 5000));
        assert_eq!(
            (
                s.tokens.ingest.as_slice(),
                s.tokens.read.as_slice(),
                s.tokens.privacy.as_slice()
            ),
            (&["i".to_owned()][..], &["r".to_owned()][..], &["pv".to_owned()][..])
        );
        assert_eq!(
            (s.retention, s.audit_retention),
            (
                Some(Duration::from_secs(30 * 86_400)),
                Some(Duration::from_secs(400 * 86_400))
            )
        );
        assert!(s.allow_open);
        assert_eq!(s.flush_claim_idle, Duration::from_millis(750));
        assert_eq!(s.shutdown_timeout, Duration::from_secs(5));
        assert!(!s.migrate);
        assert_eq!(s.log_filter, "warn,dapi=debug");
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.redis_prefix, "p");
        assert_eq!((s.flushers, s.flush_batch, s.max_in_flight), (3, 4096, 7));
        assert_eq!(
            (s.request_timeout, s.header_timeout),
            (Duration::from_secs(60), Duration::from_secs(2))
        );
        assert_eq!(s.host_name, "box-1");
        assert_eq!(s.failpoint, Some(Failpoint::CrashAfterCommit));
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let s = settings(&[
            ("DAPI_BIND", ""),
            ("DAPI_STAGING_TTL", " "),
            ("DAPI_PUBLIC_URL", ""),
            ("DAPI_LOG", ""),
        ])
        .expect("valid"); // allow: test
        assert_eq!(s.bind, SocketAddr::from(([127, 0, 0, 1], 8000)));
        assert_eq!(s.staging_ttl, Duration::from_secs(604_800));
        assert_eq!(s.public_url, None);
        assert_eq!(s.log_filter, "info");
    }

    #[test]
    fn dapi_log_wins_over_rust_log() {
        let both = settings(&[("DAPI_LOG", "debug"), ("RUST_LOG", "trace")]).expect("valid"); // allow: test
        assert_eq!(both.log_filter, "debug");
        let rust_log = settings(&[("RUST_LOG", "trace")]).expect("valid"); // allow: test
        assert_eq!(rust_log.log_filter, "trace");
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("7 d"), Some(Duration::from_secs(604_800)));
        for bad in ["", "s", "1.5s", "-1s", "3w"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_log_filter_bare_word_must_be_a_level() {
        for good in [
            "warn",
            "INFO",
            "warn,dapi=debug",
            "dapi::flusher=trace",
            "off",
            "info,sqlx=warn",
        ] {
            assert_eq!(settings(&[("DAPI_LOG", good)]).expect("valid").log_filter, good); // allow: test
        }
        for typo in ["warning", "inf0", "info,dapi", "dapi::http"] {
            let err = settings(&[("DAPI_LOG", typo)]).expect_err("must fail");
            assert!(err.to_string().starts_with("DAPI_LOG"), "{err}");
        }
    }

    #[test]
    fn a_database_url_must_name_the_database() {
        for unnamed in [
            "postgres://postgres@127.0.0.1:5432",
            "postgres://postgres@127.0.0.1:5432/",
        ] {
            let err = settings(&[("DATABASE_URL", unnamed)]).expect_err("must fail");
            assert!(err.to_string().contains("must name a database"), "{err}");
        }
        let by_query = settings(&[("DATABASE_URL", "postgres://postgres@127.0.0.1:5432?dbname=dapi")]);
        assert!(by_query.is_ok());
    }

    #[test]
    fn a_zero_shutdown_or_claim_time_is_refused() {
        for name in ["DAPI_SHUTDOWN_TIMEOUT", "DAPI_FLUSH_CLAIM_IDLE"] {
            let err = settings(&[(name, "0s")]).expect_err("must fail");
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }

    #[test]
    fn a_body_limit_below_the_text_limit_is_refused() {
        let err = settings(&[("DAPI_MAX_TEXT_BYTES", "65536")]).expect_err("must fail");
        assert!(err.to_string().starts_with("DAPI_MAX_BODY_BYTES"), "{err}");
    }

    #[test]
    fn tokens_come_from_variables_and_a_file() {
        let dir = std::env::temp_dir().join(format!("dapi-tokens-{}", std::process::id()));
        std::fs::write(
            &dir,
            "# tokens\ningest file-ingest\n\nread file-read\nprivacy file-privacy\n",
        )
        .expect("writable temp dir"); // allow: test
        let path = dir.to_string_lossy().into_owned();
        let s = settings(&[
            ("DAPI_INGEST_TOKENS", "a, b,"),
            ("DAPI_READ_TOKENS", "r"),
            ("DAPI_TOKENS_FILE", &path),
        ])
        .expect("valid"); // allow: test
        assert_eq!(s.tokens.ingest, ["a", "b", "file-ingest"]);
        assert_eq!(s.tokens.read, ["r", "file-read"]);
        assert_eq!(s.tokens.privacy, ["file-privacy"]);
        assert_eq!(format!("{:?}", s.tokens), "Tokens { ingest: 3, read: 2, privacy: 1 }");
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn a_bad_tokens_file_line_is_named_without_its_token() {
        let err = Tokens::parse_file("ingest ok\nadmin s3cret\n").expect_err("must fail");
        assert_eq!(err, "line 2: the role must be `ingest`, `read` or `privacy`");
        assert!(Tokens::parse_file("ingest").is_err());
        assert!(Tokens::parse_file("read a b").is_err());
    }

    #[test]
    fn the_audit_is_kept_a_month_longer_than_the_data_or_dapi_refuses_to_start() {
        for (retention, audit) in [(None, "400d"), (Some("30d"), "60d")] {
            let mut vars = vec![("DAPI_AUDIT_RETENTION", audit)];
            vars.extend(retention.map(|r| ("DAPI_RETENTION", r)));
            let err = settings(&vars).expect_err(audit); // allow: test
            assert!(err.to_string().starts_with("DAPI_AUDIT_RETENTION"), "{err}");
        }
        let s = settings(&[("DAPI_RETENTION", "30d"), ("DAPI_AUDIT_RETENTION", "61d")]).expect("valid"); // allow: test
        assert_eq!(s.audit_retention, Some(Duration::from_secs(61 * 86_400)));
    }

    #[test]
    fn a_cluster_takes_seed_urls_without_a_database_number() {
        let s = settings(&[
            ("DAPI_REDIS_CLUSTER", "true"),
            ("REDIS_URL", "redis://10.0.0.1:7000, redis://10.0.0.2:7000"),
        ])
        .expect("valid"); // allow: test
        assert!(s.redis_cluster);
        for url in ["redis://10.0.0.1:7000/2", "redis://10.0.0.1:7000,nonsense"] {
            let err = settings(&[("DAPI_REDIS_CLUSTER", "true"), ("REDIS_URL", url)]).expect_err(url); // allow: test
            assert!(err.to_string().contains("REDIS_URL"), "{err}");
        }
        // One Redis: one URL.
        assert!(settings(&[("REDIS_URL", "redis://a:1,redis://b:1")]).is_err());
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("DATABASE_URL", "not a url"),
            ("DATABASE_URL", "mysql://127.0.0.1/dapi"),
            ("DATABASE_URL", "postgres://127.0.0.1:port/dapi"),
            ("DATABASE_URL", "postgres://127.0.0.1/dapi?sslmode=sometimes"),
            ("REDIS_URL", "127.0.0.1:6379"),
            ("REDIS_URL", "redis://127.0.0.1:6379/zero"),
            ("DAPI_BIND", "localhost:8000"),
            ("DAPI_BIND", "127.0.0.1"),
            ("DAPI_PUBLIC_URL", "api.example.com"),
            ("DAPI_PUBLIC_URL", "ftp://api.example.com"),
            ("DAPI_PUBLIC_URL", "https://api.example.com/?x=1"),
            ("DAPI_STAGING_TTL", "soon"),
            ("DAPI_STAGING_TTL", "500ms"),
            ("DAPI_MAX_TEXT_BYTES", "-1"),
            ("DAPI_MAX_BODY_BYTES", "1k"),
            ("DAPI_ALLOW_OPEN", "please"),
            ("DAPI_MIGRATE", "maybe"),
            ("DAPI_LOG", "dapi=chatty"),
            ("RUST_LOG", "info,[{"),
            ("DAPI_LOG_FORMAT", "xml"),
            ("DAPI_REDIS_PREFIX", "a{b}"),
            ("DAPI_REDIS_PREFIX", "p[1]"),
            ("DAPI_FLUSHERS", "0"),
            ("DAPI_FLUSH_BATCH", "4097"),
            ("DAPI_MAX_IN_FLIGHT", "0"),
            ("DAPI_REQUEST_TIMEOUT", "0s"),
            ("DAPI_HEADER_TIMEOUT", "never"),
            ("DAPI_TOKENS_FILE", "/nonexistent/dapi-tokens"),
            ("HOSTNAME", "a b"),
            ("DAPI_FAILPOINT", "crash"),
        ] {
            let err = settings(&[(name, value)]).expect_err(value);
            assert!(err.to_string().contains(name), "{name}={value:?}: {err}");
            assert!(!err.to_string().contains('\n'), "{name}={value:?}: {err}");
        }
    }

    #[test]
    fn a_bad_url_is_reported_without_its_password() {
        for (name, value) in [
            ("DATABASE_URL", "postgres://dapi:s3cret@127.0.0.1:port/dapi"),
            ("DATABASE_URL", "mysql://dapi:s3cret@127.0.0.1/dapi"),
            ("REDIS_URL", "redis://:s3cret@127.0.0.1:6379/zero"),
            ("DAPI_PUBLIC_URL", "ftp://user:s3cret@example.com"),
        ] {
            let err = settings(&[(name, value)]).expect_err(value);
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn every_option_has_its_variable_a_meaning_and_hides_its_value() {
        use clap::Args;
        let command = SettingsArgs::augment_args(clap::Command::new("dapi"));
        for arg in command.get_arguments() {
            let id = arg.get_id();
            assert!(arg.get_env().is_some(), "{id} has no variable");
            assert!(arg.is_hide_env_values_set(), "{id} would print its variable's value");
            assert!(arg.is_global_set(), "{id} is missing from the commands' help");
            assert!(
                arg.get_help().is_some_and(|h| !h.to_string().is_empty()),
                "{id} has no help"
            );
        }
    }
}

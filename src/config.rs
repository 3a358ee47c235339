//! Settings: every environment variable dapi reads is declared here, once, as a row of
//! the `settings!` table below: its option and variable, value name, default, meaning
//! (the row's doc comment, which `dapi --help` prints) and, for a variable that is a
//! setting of its own, its type and parser. From the table come [`SettingsArgs`] (what
//! clap parses: raw text), [`Settings`] (what the rest of dapi gets: parsed, checked,
//! shared read-only), the conversion between them and [`VARIABLES`]. Nothing else in the
//! process reads the environment. Opens no connection. Every variable is optional; the
//! defaults serve a machine with PostgreSQL and Redis on localhost (docs/operations.md).
//!
//! An empty variable counts as unset, as in most shells' `${X:-default}`. An invalid value
//! is a [`ConfigError`] that names the variable; `main` turns it into exit code 2.

use std::net::SocketAddr;
use std::time::Duration;

/// Builds [`SettingsArgs`], [`Settings`], `TryFrom<SettingsArgs> for Settings` and
/// [`VARIABLES`] from one table. A row is its help as a doc comment (what `dapi --help`
/// shows), then `field: Type => parser, env "VARIABLE", value "VALUE NAME", default
/// ["text"];`. `parser` is `fn(variable, &str) -> Result<T, ConfigError>`, given the trimmed value
/// (or the default). A row with a default gives `Type = T`; one with `default []` gives
/// `Type = Option<T>`, `None` when the variable is unset or blank. A row without
/// `: Type => parser` is an option only, read by a `derived` setting, whose function
/// takes the whole `SettingsArgs`. The rows go in `options { }` in `dapi --help`'s
/// order, the derived settings in `derived { }`.
macro_rules! settings {
    (
        options {
            $(
                $(#[doc = $doc:tt])*
                $field:ident $(: $ty:ty => $parse:ident)?,
                    env $env:tt, value $value_name:tt, default $default:tt;
            )*
        }
        derived {
            $(
                $(#[doc = $derived_doc:tt])*
                $derived:ident: $derived_ty:ty => $derive:ident;
            )*
        }
    ) => {
        /// The settings as clap reads them: one option per environment variable, raw text.
        /// [`Settings::try_from`] parses and checks them. Every option is global, so that
        /// `dapi <command> --help` lists them too, and hides the variable's current value,
        /// so that `--help` never prints a secret (tokens, a password in a URL) and reads
        /// the same everywhere.
        #[derive(Clone, clap::Args)]
        #[command(next_help_heading = "Settings")]
        pub struct SettingsArgs {
            $(
                $(#[doc = $doc])*
                #[arg(long, env = $env, value_name = $value_name,
                      default_value = settings!(@clap_default $default),
                      hide_env_values = true, global = true)]
                pub $field: Option<String>,
            )*
        }

        /// Every environment variable dapi reads, in `dapi --help`'s order.
        pub const VARIABLES: &[&str] = &[$($env),*];

        /// Everything the process is told from outside, parsed and checked. `Debug` leaves
        /// out the URLs (they may hold passwords); tokens show only how many.
        #[derive(Clone, PartialEq)]
        pub struct Settings {
            $($(
                #[doc = concat!("`", $env, "`, parsed: see [`SettingsArgs::", stringify!($field), "`].")]
                pub $field: $ty,
            )?)*
            $(
                $(#[doc = $derived_doc])*
                pub $derived: $derived_ty,
            )*
        }

        impl TryFrom<SettingsArgs> for Settings {
            type Error = ConfigError;

            fn try_from(args: SettingsArgs) -> Result<Self, ConfigError> {
                let settings = Settings {
                    $($(
                        $field: settings!(@read $parse, $env, args.$field.as_deref(), $default)?,
                    )?)*
                    $(
                        $derived: $derive(&args)?,
                    )*
                };
                settings.validate()
            }
        }
    };
    (@clap_default [$default:tt]) => { Some($default) };
    (@clap_default []) => { None::<&'static str> };
    (@read $parse:ident, $env:tt, $raw:expr, [$default:tt]) => {
        $parse($env, given($raw).unwrap_or($default))
    };
    (@read $parse:ident, $env:tt, $raw:expr, []) => {
        given($raw).map(|raw| $parse($env, raw)).transpose()
    };
}

settings! {
    options {
        /// PostgreSQL, as postgres://user:password@host:port/database; the database is created
        /// when missing and the role may create it
        database_url: String => postgres_url,
            env "DATABASE_URL", value "URL", default ["postgres://postgres@127.0.0.1:5432/dapi"];

        /// Redis, as redis://[:password@]host:port[/N] (a /N database number is honoured)
        redis_url: String => text,
            env "REDIS_URL", value "URL", default ["redis://127.0.0.1:6379"];

        /// Speak Redis Cluster: REDIS_URL may then list seed nodes, comma-separated
        /// (redis://a:7000,redis://b:7000); every node must be reachable by the addresses the
        /// cluster announces
        redis_cluster: bool => boolean,
            env "DAPI_REDIS_CLUSTER", value "BOOL", default ["false"];

        /// Answer a write (a message, a decision) only once this many Redis replicas hold it
        /// (WAIT, at most 1s; else 503 replication_timeout); 0: do not wait
        redis_wait_replicas: usize => number,
            env "DAPI_REDIS_WAIT_REPLICAS", value "N", default ["0"];

        /// PostgreSQL that GET /data reads, such as a streaming replica (unset: DATABASE_URL);
        /// writes and erasures always go to DATABASE_URL
        database_read_url: Option<String> => postgres_url,
            env "DATABASE_READ_URL", value "URL", default [];

        /// How long a refusal waits for the read replica to replay its erasure before it
        /// answers 503 erasure_pending (only with DATABASE_READ_URL)
        replica_wait: Duration => duration,
            env "DAPI_REPLICA_WAIT", value "DURATION", default ["5s"];

        /// Address to listen on, an IP address and a port (the API, or a flusher's operations
        /// endpoints)
        bind: SocketAddr => bind,
            env "DAPI_BIND", value "IP:PORT", default ["127.0.0.1:8000"];

        /// Absolute http(s) base URL for next/previous links, for a dapi behind a proxy
        /// (unset: http:// and the request's Host)
        public_url: Option<String> => public_url,
            env "DAPI_PUBLIC_URL", value "URL", default [];

        /// How long an undecided or refused dialog is remembered (at least 1s)
        staging_ttl: Duration => duration,
            env "DAPI_STAGING_TTL", value "DURATION", default ["7d"];

        /// Consented messages older than this (by receivedAt) are deleted, a month's
        /// partition at a time, by the processes that run flushers (unset: kept for ever;
        /// at least 1d)
        retention: Option<Duration> => duration,
            env "DAPI_RETENTION", value "DURATION", default [];

        /// Largest `text` of a message, in UTF-8 bytes
        max_text_bytes: usize => number,
            env "DAPI_MAX_TEXT_BYTES", value "BYTES", default ["32768"];

        /// Largest request body, in bytes; at least DAPI_MAX_TEXT_BYTES + 4096
        max_body_bytes: usize => number,
            env "DAPI_MAX_BODY_BYTES", value "BYTES", default ["65536"];

        /// Comma-separated bearer tokens that may POST /data and /consents. Secret: set it in
        /// the environment (or use DAPI_TOKENS_FILE), where other users cannot read it
        ingest_tokens,
            env "DAPI_INGEST_TOKENS", value "TOKENS", default [];

        /// Comma-separated bearer tokens that may GET /data. Secret, like DAPI_INGEST_TOKENS
        read_tokens,
            env "DAPI_READ_TOKENS", value "TOKENS", default [];

        /// Comma-separated bearer tokens of the privacy role: DELETE /customers/{id}, GET
        /// /erasures/{id}, GET /audit and GET /consents/{id}, nothing else. Secret, like
        /// DAPI_INGEST_TOKENS
        privacy_tokens,
            env "DAPI_PRIVACY_TOKENS", value "TOKENS", default [];

        /// Audit events and completed erasure receipts older than this are deleted (unset:
        /// kept for ever; at least DAPI_RETENTION plus 31 days, so that the proof of a grant
        /// outlives its data). Pending receipts are never deleted
        audit_retention: Option<Duration> => duration,
            env "DAPI_AUDIT_RETENTION", value "DURATION", default [];

        /// File of `ingest <token>` / `read <token>` / `privacy <token>` lines (# comments
        /// allowed), merged with the token lists. No tokens at all: the service is open
        tokens_file,
            env "DAPI_TOKENS_FILE", value "PATH", default [];

        /// Serve without tokens on a non-loopback address
        allow_open: bool => boolean,
            env "DAPI_ALLOW_OPEN", value "BOOL", default ["false"];

        /// Idle time after which a dead flusher's queue entries are taken over
        flush_claim_idle: Duration => duration,
            env "DAPI_FLUSH_CLAIM_IDLE", value "DURATION", default ["5s"];

        /// Bound on a graceful shutdown (SIGTERM, SIGINT); past it dapi exits 1
        shutdown_timeout: Duration => duration,
            env "DAPI_SHUTDOWN_TIMEOUT", value "DURATION", default ["30s"];

        /// Apply the database migrations at start
        migrate: bool => boolean,
            env "DAPI_MIGRATE", value "BOOL", default ["true"];

        /// Log filter: tracing EnvFilter directives such as `info` or `warn,dapi=debug`
        /// (unset: RUST_LOG, else info)
        log,
            env "DAPI_LOG", value "FILTER", default [];

        /// Log filter used when DAPI_LOG is unset
        rust_log,
            env "RUST_LOG", value "FILTER", default [];

        /// Log lines as `text`, or `json` (one object per line); logs go to stderr
        log_format: LogFormat => log_format,
            env "DAPI_LOG_FORMAT", value "FORMAT", default ["text"];

        /// First part of every Redis key; lets several deployments share one Redis (no
        /// braces, spaces or * ? [ ] \)
        redis_prefix: String => text,
            env "DAPI_REDIS_PREFIX", value "PREFIX", default ["dapi"];

        /// Flusher tasks per process
        flushers: usize => number,
            env "DAPI_FLUSHERS", value "N", default ["2"];

        /// Flush-queue entries (dialogs) one flusher takes per batch, 1 to 4096
        flush_batch: usize => number,
            env "DAPI_FLUSH_BATCH", value "N", default ["256"];

        /// Bound on one API request; past it the answer is 503 request_timeout
        request_timeout: Duration => duration,
            env "DAPI_REQUEST_TIMEOUT", value "DURATION", default ["10s"];

        /// API requests handled at once; past it the answer is 503 overloaded, at once
        max_in_flight: usize => number,
            env "DAPI_MAX_IN_FLIGHT", value "N", default ["1024"];

        /// Time a client has to send its request headers; past it the connection is closed
        header_timeout: Duration => duration,
            env "DAPI_HEADER_TIMEOUT", value "DURATION", default ["10s"];

        /// How long a `messageId` is remembered per dialog: a repeat within it stores nothing
        /// and answers the first answer
        idempotency_window: Duration => duration,
            env "DAPI_IDEMPOTENCY_WINDOW", value "DURATION", default ["24h"];

        /// Most items in one POST /data (a batch)
        max_batch_messages: usize => number,
            env "DAPI_MAX_BATCH_MESSAGES", value "N", default ["1000"];

        /// Largest POST /data body (a batch) in bytes, once decoded; at least DAPI_MAX_BODY_BYTES
        max_batch_bytes: usize => number,
            env "DAPI_MAX_BATCH_BYTES", value "BYTES", default ["4194304"];

        /// This host's name, the first part of each flusher's consumer name in Redis
        /// (unset: /etc/hostname, else dapi)
        host_name,
            env "HOSTNAME", value "NAME", default [];

        /// For fault tests only, never in production: `crash-after-commit` aborts the process
        /// after a flush batch's commit and before its acknowledgement
        failpoint: Option<Failpoint> => failpoint,
            env "DAPI_FAILPOINT", value "FAULT", default [];
    }

    derived {
        /// Log filter directives, checked to parse (`DAPI_LOG`, else `RUST_LOG`, else `info`).
        log_filter: String => log_filter;
        /// Bearer tokens by role, from `DAPI_INGEST_TOKENS`, `DAPI_READ_TOKENS`,
        /// `DAPI_PRIVACY_TOKENS` and `DAPI_TOKENS_FILE`. Empty: the service is open.
        tokens: Tokens => tokens;
        /// This host's name, for flusher consumer names (`HOSTNAME`, else /etc/hostname).
        host_name: String => host_name;
    }
}

/// How values are written; `dapi --help` shows it below the options.
pub const VALUE_FORMATS: &str = "\
Each option is usually set through the environment variable shown beside it; an empty
variable counts as unset. Durations: 500ms, 30s, 5m, 2h, 7d (a bare number is seconds).
Booleans: true or false (also 1/0, yes/no, on/off). An invalid value stops dapi with a
one-line message naming the variable, exit code 2.";

impl std::fmt::Debug for SettingsArgs {
    /// Names the fields without their values: the URLs may hold passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettingsArgs").finish_non_exhaustive()
    }
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

impl Settings {
    /// The checks that span several variables, or bound one.
    fn validate(self) -> Result<Self, ConfigError> {
        redis_url("REDIS_URL", &self.redis_url, self.redis_cluster)?;
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

fn duration(name: &'static str, raw: &str) -> Result<Duration, ConfigError> {
    parse_duration(raw).ok_or_else(|| invalid(name, "expected a duration such as 500ms, 30s, 5m, 2h or 7d"))
}

fn number(name: &'static str, raw: &str) -> Result<usize, ConfigError> {
    raw.parse()
        .map_err(|_| invalid(name, "expected a non-negative integer"))
}

fn text(_name: &'static str, raw: &str) -> Result<String, ConfigError> {
    Ok(raw.to_owned())
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
fn redis_url(name: &'static str, raw: &str, cluster: bool) -> Result<(), ConfigError> {
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
    Ok(())
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

fn log_format(name: &'static str, raw: &str) -> Result<LogFormat, ConfigError> {
    match raw.to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(invalid(name, "expected text or json")),
    }
}

fn failpoint(name: &'static str, raw: &str) -> Result<Failpoint, ConfigError> {
    match raw {
        "crash-after-commit" => Ok(Failpoint::CrashAfterCommit),
        _ => Err(invalid(name, "the one fault (for fault tests) is crash-after-commit")),
    }
}

/// `DAPI_LOG` wins over `RUST_LOG`; the one in force must parse as a tracing filter, so a
/// typo stops dapi rather than silently logging something else.
fn log_filter(args: &SettingsArgs) -> Result<String, ConfigError> {
    let (name, filter) = match (given(args.log.as_deref()), given(args.rust_log.as_deref())) {
        (Some(filter), _) => ("DAPI_LOG", filter),
        (None, Some(filter)) => ("RUST_LOG", filter),
        (None, None) => ("DAPI_LOG", "info"),
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
fn host_name(args: &SettingsArgs) -> Result<String, ConfigError> {
    let usable = |h: &str| !h.contains(['{', '}']) && !h.contains(char::is_whitespace);
    match given(args.host_name.as_deref()) {
        Some(name) if usable(name) => Ok(name.to_owned()),
        Some(_) => Err(invalid("HOSTNAME", "must not contain braces or spaces")),
        // Not a setting the operator chose: fall back rather than refuse.
        None => Ok(std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && usable(h))
            .unwrap_or_else(|| "dapi".to_owned())),
    }
}

/// Tokens from the three lists (comma-separated) and the file, merged.
fn tokens(args: &SettingsArgs) -> Result<Tokens, ConfigError> {
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
        ingest: list(given(args.ingest_tokens.as_deref())),
        read: list(given(args.read_tokens.as_deref())),
        privacy: list(given(args.privacy_tokens.as_deref())),
    };
    if let Some(path) = given(args.tokens_file.as_deref()) {
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

    /// A value of each variable that is valid and not its default.
    fn examples(tokens_file: &str) -> Vec<(&'static str, String)> {
        [
            ("DATABASE_URL", "postgresql://u:p@db.example:6432/x?sslmode=require"),
            ("REDIS_URL", "redis://:p@cache.example:6380/3"),
            ("DAPI_REDIS_CLUSTER", "true"),
            ("DAPI_REDIS_WAIT_REPLICAS", "1"),
            ("DATABASE_READ_URL", "postgres://u@replica.example/x"),
            ("DAPI_REPLICA_WAIT", "2s"),
            ("DAPI_BIND", "[::]:9000"),
            ("DAPI_PUBLIC_URL", "https://api.example.com/dapi/"),
            ("DAPI_STAGING_TTL", "2h"),
            ("DAPI_RETENTION", "30d"),
            ("DAPI_MAX_TEXT_BYTES", "100"),
            ("DAPI_MAX_BODY_BYTES", "40000"),
            ("DAPI_INGEST_TOKENS", "i"),
            ("DAPI_READ_TOKENS", "r"),
            ("DAPI_PRIVACY_TOKENS", "pv"),
            ("DAPI_AUDIT_RETENTION", "400d"),
            ("DAPI_TOKENS_FILE", tokens_file),
            ("DAPI_ALLOW_OPEN", "yes"),
            ("DAPI_FLUSH_CLAIM_IDLE", "750ms"),
            ("DAPI_SHUTDOWN_TIMEOUT", "5"),
            ("DAPI_MIGRATE", "off"),
            ("DAPI_LOG", "warn,dapi=debug"),
            ("RUST_LOG", "trace"),
            ("DAPI_LOG_FORMAT", "JSON"),
            ("DAPI_REDIS_PREFIX", "p"),
            ("DAPI_FLUSHERS", "3"),
            ("DAPI_FLUSH_BATCH", "4096"),
            ("DAPI_REQUEST_TIMEOUT", "1m"),
            ("DAPI_MAX_IN_FLIGHT", "7"),
            ("DAPI_HEADER_TIMEOUT", "2s"),
            ("DAPI_IDEMPOTENCY_WINDOW", "1h"),
            ("DAPI_MAX_BATCH_MESSAGES", "10"),
            ("DAPI_MAX_BATCH_BYTES", "100000"),
            ("HOSTNAME", "example-host-1"),
            ("DAPI_FAILPOINT", "crash-after-commit"),
        ]
        .into_iter()
        .map(|(name, value)| (name, value.to_owned()))
        .collect()
    }

    /// Every variable the table declares changes the settings when set (so dapi reads
    /// it), and docs/operations.md's configuration section names it.
    #[test]
    fn every_variable_is_read() {
        let file = std::env::temp_dir().join(format!("dapi-example-tokens-{}", std::process::id()));
        std::fs::write(&file, "read from-the-file\n").expect("writable temp dir"); // allow: test
        let examples = examples(&file.to_string_lossy());
        let guide =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).expect("the guide"); // allow: test
        let section = guide
            .split_once("\n## Configuration\n")
            .and_then(|(_, rest)| rest.split("\n## ").next())
            .expect("docs/operations.md has a Configuration section"); // allow: test

        let named: Vec<&str> = examples.iter().map(|(name, ..)| *name).collect();
        assert_eq!(named, VARIABLES, "each declared variable needs an example here");
        for (name, value) in &examples {
            // An audit retention is valid only beside a retention of the data.
            let mut vars = match *name {
                "DAPI_AUDIT_RETENTION" => vec![("DAPI_RETENTION", "30d")],
                _ => Vec::new(),
            };
            let without = settings(&vars).expect(name); // allow: test
            vars.push((name, value.as_str()));
            let with = settings(&vars).unwrap_or_else(|e| panic!("{name}={value}: {e}"));
            assert!(with != without, "{name} is declared but not read");
            assert!(
                section.contains(&format!("[env: {name}]")),
                "docs/operations.md's configuration section does not name {name}"
            );
        }
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn each_variable_sets_its_own_setting() {
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
            ("DAPI_REDIS_WAIT_REPLICAS", "2"),
            ("DATABASE_READ_URL", "postgres://u@replica.example/x"),
            ("DAPI_REPLICA_WAIT", "2s"),
            ("DAPI_IDEMPOTENCY_WINDOW", "1h"),
            ("DAPI_MAX_BATCH_MESSAGES", "10"),
            ("DAPI_MAX_BATCH_BYTES", "100000"),
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
        assert_eq!(s.redis_wait_replicas, 2);
        assert_eq!(s.database_read_url.as_deref(), Some("postgres://u@replica.example/x"));
        assert_eq!(s.replica_wait, Duration::from_secs(2));
        assert_eq!(s.idempotency_window, Duration::from_secs(3600));
        assert_eq!((s.max_batch_messages, s.max_batch_bytes), (10, 100_000));
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

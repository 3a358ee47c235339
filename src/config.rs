//! Settings: read from the environment once at start, validated, then shared read-only.
//! Opens no connection. Every variable is optional; the defaults serve a machine with
//! PostgreSQL and Redis on localhost (SPEC.md, "Operating surface").

use std::time::Duration;

/// Everything the process is told from outside.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub redis_url: String,
    /// Listen address, `host:port`.
    pub bind: String,
    /// Base URL for `next` / `previous` links, without a trailing `/`.
    pub public_url: Option<String>,
    pub staging_ttl: Duration,
    pub max_text_bytes: usize,
    pub max_body_bytes: usize,
    pub flush_claim_idle: Duration,
    pub shutdown_timeout: Duration,
    pub migrate: bool,
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
}

/// Bearer tokens by role. `Debug` shows how many, never a token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    pub ingest: Vec<String>,
    pub read: Vec<String>,
}

impl Tokens {
    pub fn is_empty(&self) -> bool {
        self.ingest.is_empty() && self.read.is_empty()
    }

    /// Reads `role token` lines (`ingest` or `read`); blank lines and `#` comments are
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
                    "line {}: expected `ingest <token>` or `read <token>`",
                    number + 1
                ));
            };
            match role {
                "ingest" => tokens.ingest.push(token.to_owned()),
                "read" => tokens.read.push(token.to_owned()),
                _ => return Err(format!("line {}: the role must be `ingest` or `read`", number + 1)),
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
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests can supply their own environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // An empty variable counts as unset, as in most shells' `${X:-default}`.
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let duration = |name: &'static str, default: Duration| {
            get(name).map_or(Ok(default), |raw| {
                parse_duration(&raw)
                    .ok_or_else(|| invalid(name, "expected a duration such as 500ms, 30s, 5m, 2h or 7d"))
            })
        };
        let number = |name: &'static str, default: usize| {
            get(name).map_or(Ok(default), |raw| {
                raw.trim()
                    .parse::<usize>()
                    .map_err(|_| invalid(name, "expected a non-negative integer"))
            })
        };
        let boolean = |name: &'static str, default: bool| {
            get(name).map_or(Ok(default), |raw| match raw.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(invalid(name, "expected true or false")),
            })
        };

        let settings = Settings {
            database_url: get("DATABASE_URL").unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/dapi".into()),
            redis_url: get("REDIS_URL").unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            bind: get("DAPI_BIND").unwrap_or_else(|| "127.0.0.1:8000".into()),
            public_url: get("DAPI_PUBLIC_URL").map(|url| url.trim().trim_end_matches('/').to_owned()),
            staging_ttl: duration("DAPI_STAGING_TTL", Duration::from_secs(7 * 24 * 3600))?,
            max_text_bytes: number("DAPI_MAX_TEXT_BYTES", 32 * 1024)?,
            max_body_bytes: number("DAPI_MAX_BODY_BYTES", 64 * 1024)?,
            flush_claim_idle: duration("DAPI_FLUSH_CLAIM_IDLE", Duration::from_secs(5))?,
            shutdown_timeout: duration("DAPI_SHUTDOWN_TIMEOUT", Duration::from_secs(30))?,
            migrate: boolean("DAPI_MIGRATE", true)?,
            log_format: match get("DAPI_LOG_FORMAT").map(|f| f.trim().to_ascii_lowercase()) {
                None => LogFormat::Text,
                Some(f) if f == "text" => LogFormat::Text,
                Some(f) if f == "json" => LogFormat::Json,
                Some(_) => return Err(invalid("DAPI_LOG_FORMAT", "expected text or json")),
            },
            redis_prefix: get("DAPI_REDIS_PREFIX").unwrap_or_else(|| "dapi".into()),
            flushers: number("DAPI_FLUSHERS", 2)?,
            flush_batch: number("DAPI_FLUSH_BATCH", 256)?,
            tokens: tokens(&get)?,
            allow_open: boolean("DAPI_ALLOW_OPEN", false)?,
            request_timeout: duration("DAPI_REQUEST_TIMEOUT", Duration::from_secs(10))?,
            max_in_flight: number("DAPI_MAX_IN_FLIGHT", 1024)?,
            header_timeout: duration("DAPI_HEADER_TIMEOUT", Duration::from_secs(10))?,
            idempotency_window: duration("DAPI_IDEMPOTENCY_WINDOW", Duration::from_secs(24 * 3600))?,
            max_batch_messages: number("DAPI_MAX_BATCH_MESSAGES", 1000)?,
            max_batch_bytes: number("DAPI_MAX_BATCH_BYTES", 4 * 1024 * 1024)?,
        };
        settings.validate()
    }

    fn validate(self) -> Result<Self, ConfigError> {
        if self.staging_ttl < Duration::from_secs(1) {
            return Err(invalid("DAPI_STAGING_TTL", "must be at least 1s"));
        }
        if self.max_text_bytes == 0 {
            return Err(invalid("DAPI_MAX_TEXT_BYTES", "must be at least 1"));
        }
        if self.max_body_bytes < self.max_text_bytes + 4096 {
            return Err(invalid(
                "DAPI_MAX_BODY_BYTES",
                "must be at least DAPI_MAX_TEXT_BYTES + 4096, or a text of the largest allowed size could not be sent",
            ));
        }
        if self.flushers == 0 || self.flush_batch == 0 || self.flush_batch > 4096 {
            return Err(invalid(
                "DAPI_FLUSHERS / DAPI_FLUSH_BATCH",
                "must be at least 1 (a batch at most 4096)",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(invalid("DAPI_MAX_IN_FLIGHT", "must be at least 1"));
        }
        if self.request_timeout.is_zero() || self.header_timeout.is_zero() {
            return Err(invalid(
                "DAPI_REQUEST_TIMEOUT / DAPI_HEADER_TIMEOUT",
                "must be more than 0",
            ));
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
        if self.redis_prefix.contains(['{', '}', ' ']) {
            return Err(invalid("DAPI_REDIS_PREFIX", "must not contain braces or spaces"));
        }
        Ok(self)
    }
}

/// Tokens from the two variables (comma-separated) and the file, merged.
fn tokens(get: &impl Fn(&str) -> Option<String>) -> Result<Tokens, ConfigError> {
    let list = |name: &str| -> Vec<String> {
        get(name)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut tokens = Tokens {
        ingest: list("DAPI_INGEST_TOKENS"),
        read: list("DAPI_READ_TOKENS"),
    };
    if let Some(path) = get("DAPI_TOKENS_FILE") {
        let text = std::fs::read_to_string(path.trim())
            .map_err(|e| invalid("DAPI_TOKENS_FILE", &format!("cannot read the file: {e}")))?;
        let from_file = Tokens::parse_file(&text).map_err(|reason| invalid("DAPI_TOKENS_FILE", &reason))?;
        tokens.ingest.extend(from_file.ingest);
        tokens.read.extend(from_file.read);
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
        assert_eq!(s.bind, "127.0.0.1:8000");
        assert_eq!(s.staging_ttl, Duration::from_secs(604_800));
        assert_eq!((s.max_text_bytes, s.max_body_bytes), (32_768, 65_536));
        assert_eq!(s.shutdown_timeout, Duration::from_secs(30));
        assert!(s.migrate);
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
    fn a_body_limit_below_the_text_limit_is_refused() {
        let err = settings(&[("DAPI_MAX_TEXT_BYTES", "65536")]).expect_err("must fail");
        assert!(err.to_string().starts_with("DAPI_MAX_BODY_BYTES"), "{err}");
    }

    #[test]
    fn tokens_come_from_variables_and_a_file() {
        let dir = std::env::temp_dir().join(format!("dapi-tokens-{}", std::process::id()));
        std::fs::write(&dir, "# tokens\ningest file-ingest\n\nread file-read\n").expect("writable temp dir"); // allow: test
        let path = dir.to_string_lossy().into_owned();
        let s = settings(&[
            ("DAPI_INGEST_TOKENS", "a, b,"),
            ("DAPI_READ_TOKENS", "r"),
            ("DAPI_TOKENS_FILE", &path),
        ])
        .expect("valid"); // allow: test
        assert_eq!(s.tokens.ingest, ["a", "b", "file-ingest"]);
        assert_eq!(s.tokens.read, ["r", "file-read"]);
        assert_eq!(format!("{:?}", s.tokens), "Tokens { ingest: 3, read: 2 }");
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn a_bad_tokens_file_line_is_named_without_its_token() {
        let err = Tokens::parse_file("ingest ok\nadmin s3cret\n").expect_err("must fail");
        assert_eq!(err, "line 2: the role must be `ingest` or `read`");
        assert!(Tokens::parse_file("ingest").is_err());
        assert!(Tokens::parse_file("read a b").is_err());
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("DAPI_STAGING_TTL", "soon"),
            ("DAPI_MIGRATE", "maybe"),
            ("DAPI_LOG_FORMAT", "xml"),
        ] {
            let err = settings(&[(name, value)]).expect_err("must fail");
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }
}

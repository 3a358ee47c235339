//! Start-up and shutdown: builds the store and staging handles from the settings,
//! migrates, binds, spawns the HTTP server and the flushers, and stops them all through
//! one cancellation token. The one module that knows every other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::flusher::Flusher;
use axum::Router;

use crate::http::{AppState, ops_router, router};
use crate::staging::{Connector, FlushQueue, Keyspace, Staging, StagingError, unique_consumer_name};
use crate::store::{Store, StoreError};
use crate::telemetry::chain;

/// How long start-up keeps trying to reach PostgreSQL before giving up.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);
/// How long a flusher's blocking read waits for new entries.
const FLUSH_BLOCK: Duration = Duration::from_secs(1);
/// How often the processes that run flushers look for customer erasures left pending.
const ERASURE_PASS: Duration = Duration::from_secs(2);
/// How often a flusher-role process checks the partitions of `messages`.
const PARTITION_MAINTENANCE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid REDIS_URL")]
    RedisUrl(#[source] redis::RedisError),
    #[error("cannot set up Redis")]
    Staging(#[from] StagingError),
    #[error("cannot set up PostgreSQL")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to serve without access tokens on {0}, which is not a loopback address: set DAPI_INGEST_TOKENS and DAPI_READ_TOKENS (or DAPI_TOKENS_FILE), or DAPI_ALLOW_OPEN=true"
    )]
    OpenOnNetwork(SocketAddr),
}

/// Which parts of dapi this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub http: bool,
    pub flusher: bool,
}

/// Connects the stores: creates the database when missing and migrates (when enabled),
/// retrying while PostgreSQL is not up yet. Redis is connected lazily.
pub async fn connect(settings: &Settings) -> Result<(Staging, Store, Connector), StartError> {
    let store = with_patience("PostgreSQL", || async {
        let store = Store::connect(&settings.database_url).await?;
        if settings.migrate {
            store.migrate().await?;
        }
        match &settings.database_read_url {
            Some(replica) => store.with_replica(replica),
            None => Ok(store),
        }
    })
    .await?;
    if settings.database_read_url.is_some() {
        // Reads go to the replica: give it the time a refusal would (DAPI_REPLICA_WAIT) to
        // replay the database's creation and migrations. Not fatal: until it has, reads
        // answer 503 and /readyz names the replica.
        if let Err(e) = store.replica_caught_up(settings.replica_wait).await {
            tracing::warn!(error = %chain(&e), "the read replica has not replayed the primary's schema yet");
        }
    }
    let connector = Connector::new(&settings.redis_url, settings.redis_cluster).map_err(StartError::RedisUrl)?;
    let staging = Staging::new(connector.clone(), &settings.redis_prefix, settings.staging_ttl)?
        .with_idempotency_window(settings.idempotency_window)
        .with_wait_replicas(settings.redis_wait_replicas)?;
    Ok((staging, store, connector))
}

/// Applies migrations and returns (`dapi migrate`).
pub async fn migrate(settings: &Settings) -> Result<(), StartError> {
    with_patience("PostgreSQL", || async {
        Store::connect(&settings.database_url).await?.migrate().await
    })
    .await?;
    Ok(())
}

async fn with_patience<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    loop {
        match attempt().await {
            Err(e) if e.is_unavailable() && started.elapsed() < STARTUP_PATIENCE => {
                tracing::warn!(error = %chain(&e), "{what} is not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// A started dapi: the address it listens on and the handles to stop it.
#[derive(Debug)]
pub struct Running {
    pub local_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    shutdown_timeout: Duration,
}

impl Running {
    /// A token whose cancellation stops everything (signal handlers cancel it).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until shutdown is requested, then for every task to finish (bounded by
    /// `DAPI_SHUTDOWN_TIMEOUT`). Returns false when the bound was hit, after logging
    /// how many tasks it abandons.
    pub async fn wait(self) -> bool {
        self.shutdown.cancelled().await;
        self.tasks.close();
        let finished = tokio::time::timeout(self.shutdown_timeout, self.tasks.wait())
            .await
            .is_ok();
        if !finished {
            // The tasks are the HTTP server (waiting for the requests it still answers),
            // the metrics upkeep and the flushers.
            tracing::error!(
                still_running = self.tasks.len(),
                timeout = ?self.shutdown_timeout,
                "shutdown timed out (DAPI_SHUTDOWN_TIMEOUT): abandoning the tasks still running; requests in flight get no answer, and an unacknowledged flush batch runs again later, as after a crash"
            );
        }
        finished
    }

    /// Requests shutdown and waits for it.
    pub async fn stop(self) -> bool {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Starts the roles asked for and returns at once. Every role listens on `DAPI_BIND`:
/// the HTTP role serves the whole API, a flusher-only process the operations endpoints
/// (`/healthz`, `/readyz`, `/metrics`), so that health checks and scrapes reach it too.
pub async fn start(settings: Settings, roles: Roles) -> Result<Running, StartError> {
    let settings = Arc::new(settings);
    let (staging, store, connector) = connect(&settings).await?;
    let listener = TcpListener::bind(settings.bind)
        .await
        .map_err(|source| StartError::Bind {
            addr: settings.bind,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: settings.bind,
        source,
    })?;
    if roles.http {
        check_access(&settings, local_addr)?;
    }
    // Installed before any task runs, so that /metrics counts from the first batch.
    let metrics = crate::telemetry::metrics();
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    if roles.flusher {
        for _ in 0..settings.flushers {
            let queue = FlushQueue::new(
                &connector,
                Keyspace::new(&settings.redis_prefix),
                unique_consumer_name(&settings.host_name),
                settings.flush_claim_idle,
                FLUSH_BLOCK,
                settings.staging_ttl,
            )?;
            let flusher = Flusher::new(queue, store.clone(), settings.flush_batch).with_failpoint(settings.failpoint);
            tasks.spawn(flusher.run(shutdown.clone()));
        }
    }

    // Partitions of `messages`: months ahead created, months past DAPI_RETENTION
    // dropped (src/store/retention.rs), at start and then hourly.
    if roles.flusher {
        let (store, stop, retention) = (store.clone(), shutdown.clone(), settings.retention);
        tasks.spawn(async move {
            let mut every = tokio::time::interval(PARTITION_MAINTENANCE);
            loop {
                tokio::select! {
                    _ = every.tick() => maintain_partitions(&store, retention).await,
                    () = stop.cancelled() => break,
                }
            }
        });
    }
    // Customer erasures left pending (a crash, an outage, a request past its bound) are
    // finished here, every few seconds, by the processes that run flushers; the customer
    // index is swept of dialogs gone (staging::IndexSweep); and audit events past
    // DAPI_AUDIT_RETENTION leave. Never cancelled mid-pass (a transaction
    // must not be dropped half-way): shutdown is checked between passes.
    if roles.flusher {
        let (staging, store, stop) = (staging.clone(), store.clone(), shutdown.clone());
        let replica_wait = settings.replica_wait;
        let audit_retention = settings.audit_retention;
        tasks.spawn(async move {
            let mut pass = 0_u64;
            let mut sweep = crate::staging::IndexSweep::default();
            while !stop.is_cancelled() {
                crate::erasure::finish_pending(&staging, &store, replica_wait).await;
                match sweep.pass(&staging).await {
                    Ok(0) => {}
                    Ok(removed) => tracing::debug!(removed, "swept the customer index of dialogs gone"),
                    Err(e) => tracing::debug!(error = %chain(&e), "could not sweep the customer index; the next pass will"),
                }
                if let Some(retention) = audit_retention.filter(|_| pass.is_multiple_of(1800)) {
                    match store.drop_old_audit(time::OffsetDateTime::now_utc() - retention).await {
                        Ok((partitions, receipts)) => {
                            for name in partitions {
                                tracing::info!(partition = %name, "dropped a month of audit events past DAPI_AUDIT_RETENTION");
                            }
                            if receipts > 0 {
                                tracing::info!(receipts, "deleted completed erasure receipts past DAPI_AUDIT_RETENTION");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %chain(&e), "could not drop old audit events; the next pass will")
                        }
                    }
                }
                pass += 1;
                tokio::select! {
                    () = tokio::time::sleep(ERASURE_PASS) => {}
                    () = stop.cancelled() => {}
                }
            }
        });
    }
    let state = AppState::new(staging, store, settings.clone());
    let app = if roles.http { router(state) } else { ops_router(state) };
    tracing::info!(addr = %local_addr, api = roles.http, flusher = roles.flusher, "listening");
    tasks.spawn(serve(listener, app, shutdown.clone(), settings.header_timeout));
    let stop = shutdown.clone();
    // Histograms grow until upkeep drains them (metrics #467).
    tasks.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = every.tick() => metrics.run_upkeep(),
                () = stop.cancelled() => break,
            }
        }
    });

    Ok(Running {
        local_addr,
        shutdown,
        tasks,
        shutdown_timeout: settings.shutdown_timeout,
    })
}

async fn maintain_partitions(store: &Store, retention: Option<Duration>) {
    match store
        .maintain_partitions(time::OffsetDateTime::now_utc(), retention)
        .await
    {
        Ok(done) => {
            for name in &done.created {
                tracing::info!(partition = %name, "created a partition of messages ahead");
            }
            for name in &done.dropped {
                tracing::info!(partition = %name, "dropped a partition of messages past DAPI_RETENTION");
            }
            metrics::counter!(crate::telemetry::PARTITIONS_DROPPED).increment(done.dropped.len() as u64);
        }
        Err(e) => {
            tracing::warn!(error = %chain(&e), "could not maintain the partitions of messages; trying again within the hour")
        }
    }
}

/// An open service (no tokens) is for local use: it warns, and refuses a non-loopback
/// address unless the operator says `DAPI_ALLOW_OPEN=true`.
fn check_access(settings: &Settings, addr: SocketAddr) -> Result<(), StartError> {
    if !settings.tokens.is_empty() {
        return Ok(());
    }
    if !addr.ip().is_loopback() && !settings.allow_open {
        return Err(StartError::OpenOnNetwork(addr));
    }
    tracing::warn!(%addr, "no access tokens are configured: anyone who reaches this address may post and read");
    Ok(())
}

/// Serves `app` on `listener` until `shutdown`, then lets the requests in flight finish.
/// Each connection must send its request headers within `header_timeout`, so a stalled
/// client holds a connection, and delays a shutdown (hyper waits for a request head
/// begun), at most that long.
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken, header_timeout: Duration) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let service = app.map_request(|request: axum::http::Request<hyper::body::Incoming>| {
        crate::http::before_routing(request.map(axum::body::Body::new))
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Asks the dapi listening on `bind` for `GET /healthz` over plain HTTP/1.1 (for container
/// health checks: the runtime image has no curl). A wildcard address is asked on loopback.
pub async fn healthcheck(bind: SocketAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut target = bind;
    if target.ip().is_unspecified() {
        target.set_ip(match target.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let check = async {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(head.starts_with(b"HTTP/1.1 200"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(3), check).await, Ok(Ok(true)))
}

/// Resolves when the process receives SIGTERM or SIGINT. The handlers are in place when
/// this returns, before the future is first polled: a signal from then on is not missed
/// (nor kills the process the default way). Call it within the runtime.
pub fn termination_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (term, interrupt) {
                (Ok(mut term), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM and SIGINT; only SIGINT may stop dapi");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

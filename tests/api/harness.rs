//! The fault harness: real `dapi` processes (the built binary) that a test can SIGKILL or
//! SIGTERM, a TCP proxy of our own between dapi and PostgreSQL or Redis that a test can
//! cut and restore (an outage that never touches the machine's shared servers), and a
//! load driver that records every message it got a 202 for and every decision it got an
//! answer to, and then checks the stores against that ledger.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dapi::config::Settings;
use dapi::store::Store;
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::{unique, wait_until};

// ---------------------------------------------------------------------------- proxy

/// A TCP proxy to `upstream`. `cut` drops every connection and refuses new ones until
/// `restore`; `cut_after_answers(n)` cuts right after the n-th read from upstream has
/// been passed on (for Redis, the n-th answer), to fail a client between two calls.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Answers still to pass on before cutting; 0: not armed.
    cut_after: Arc<AtomicUsize>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let cut_after = Arc::new(AtomicUsize::new(0));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = {
            let (cut, cut_after, connections) = (cut.clone(), cut_after.clone(), connections.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let (cut, cut_after, all) = (cut.clone(), cut_after.clone(), connections.clone());
                    let task = tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (mut from_client, mut to_client) = inbound.into_split();
                        let (mut from_upstream, mut to_upstream) = outbound.into_split();
                        let requests = tokio::io::copy(&mut from_client, &mut to_upstream);
                        let answers = async {
                            let mut buffer = vec![0u8; 64 * 1024];
                            loop {
                                let n = from_upstream.read(&mut buffer).await?;
                                if n == 0 {
                                    return Ok::<(), std::io::Error>(());
                                }
                                to_client.write_all(&buffer[..n]).await?;
                                let armed = cut_after
                                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1));
                                if armed == Ok(1) {
                                    to_client.flush().await?;
                                    cut_all(&cut, &all);
                                    return Ok(());
                                }
                            }
                        };
                        tokio::select! {
                            _ = requests => {}
                            _ = answers => {}
                        }
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            })
            .abort_handle()
        };
        Proxy {
            addr,
            cut,
            cut_after,
            connections,
            accept,
        }
    }

    pub fn cut(&self) {
        cut_all(&self.cut, &self.connections);
    }

    /// Cuts (as [`Proxy::cut`]) right after the next `n` reads from upstream have been
    /// passed on to the client.
    pub fn cut_after_answers(&self, n: usize) {
        self.cut_after.store(n, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn cut_all(cut: &AtomicBool, connections: &Mutex<Vec<AbortHandle>>) {
    cut.store(true, Ordering::SeqCst);
    for connection in connections.lock().unwrap().drain(..) {
        connection.abort();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `postgres://…@host:port/db` with host and port replaced by `addr`.
pub fn through(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let credentials = authority
        .rsplit_once('@')
        .map(|(c, _)| format!("{c}@"))
        .unwrap_or_default();
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("/{path}")
    };
    format!("{scheme}://{credentials}{addr}{path}")
}

/// The `host:port` a URL points at.
pub fn upstream_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().unwrap()
}

// ---------------------------------------------------------------------------- processes

/// One `dapi` process, killed (SIGKILL) when dropped. Its log (stderr) goes to a file,
/// printed when the test fails.
pub struct Dapi {
    child: Child,
    /// Where it listens: the API, or a flusher's operations endpoints.
    pub base: String,
    log: PathBuf,
}

impl Dapi {
    /// Starts `dapi <args>` with `settings` plus `extra` variables, on a port of its own
    /// choosing (`DAPI_BIND=127.0.0.1:0`, read back from its `listening` log line), and
    /// waits until it answers /healthz.
    pub async fn start(settings: &Settings, args: &[&str], extra: &[(&str, &str)]) -> Dapi {
        let log = std::env::temp_dir().join(format!("{}.log", unique("dapi_fault")));
        let mut command = Command::new(env!("CARGO_BIN_EXE_dapi"));
        command
            .args(args)
            .env("DATABASE_URL", &settings.database_url)
            .env("REDIS_URL", &settings.redis_url)
            .env("DAPI_REDIS_CLUSTER", settings.redis_cluster.to_string())
            .env("DAPI_REDIS_PREFIX", &settings.redis_prefix)
            .env("DAPI_BIND", "127.0.0.1:0")
            .env(
                "DAPI_FLUSH_CLAIM_IDLE",
                format!("{}ms", settings.flush_claim_idle.as_millis()),
            )
            .env("DAPI_STAGING_TTL", format!("{}ms", settings.staging_ttl.as_millis()))
            .env(
                "DAPI_SHUTDOWN_TIMEOUT",
                format!("{}ms", settings.shutdown_timeout.as_millis()),
            )
            .env("DAPI_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (name, value) in extra {
            command.env(name, value);
        }
        let mut dapi = Dapi {
            child: command.spawn().unwrap(),
            base: String::new(),
            log,
        };
        let addr = wait_until(Duration::from_secs(40), async || {
            if let Ok(Some(status)) = dapi.child.try_wait() {
                panic!("dapi exited at start ({status}):\n{}", dapi.logs());
            }
            dapi.logs()
                .lines()
                .find_map(listening_addr)
                .ok_or_else(|| format!("dapi logged no `listening` line:\n{}", dapi.logs()))
        })
        .await;
        dapi.base = format!("http://{addr}");
        let http = reqwest::Client::new();
        wait_until(Duration::from_secs(10), async || {
            match http.get(format!("{}/healthz", dapi.base)).send().await {
                Ok(answer) if answer.status() == StatusCode::OK => Ok(()),
                other => Err(format!("/healthz answered {other:?}:\n{}", dapi.logs())),
            }
        })
        .await;
        dapi
    }

    /// The process id, to read its `/proc` entry.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Waits for the process to exit, at most `bound`.
    pub async fn exit_within(&mut self, bound: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < bound {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its /metrics, as text.
    pub async fn metrics(&self) -> String {
        let answer = reqwest::get(format!("{}/metrics", self.base)).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        answer.text().await.unwrap()
    }
}

impl Drop for Dapi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log of dapi at {} ---\n{}", self.base, self.logs());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The address in dapi's `listening` log line, in either log format:
/// `… listening addr=127.0.0.1:41234 api=true …` or JSON with `"addr":"127.0.0.1:41234"`.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    let (_, rest) = line.split_once("addr=").or_else(|| line.split_once("\"addr\":\""))?;
    let end = rest.find([' ', '"', ',', '}']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

// ---------------------------------------------------------------------------- load

/// What the load driver was told: the messages answered 202 and the decisions answered.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Per dialog: each seq answered 202, with the text sent under it.
    acked: Mutex<HashMap<i64, BTreeMap<i64, String>>>,
    granted: Mutex<BTreeSet<i64>>,
    refused: Mutex<BTreeSet<i64>>,
}

impl Ledger {
    pub fn acked_messages(&self) -> usize {
        self.acked.lock().unwrap().values().map(BTreeMap::len).sum()
    }

    /// Waits (bounded) until the load has been answered 202 for at least `messages`
    /// messages: a fault injected then lands in the middle of the load, however fast or
    /// slow the machine.
    pub async fn wait_for_acked(&self, messages: usize) {
        wait_until(Duration::from_secs(30), async || {
            let acked = self.acked_messages();
            (acked >= messages)
                .then_some(())
                .ok_or_else(|| format!("the load has {acked} messages answered 202, waiting for {messages}"))
        })
        .await;
    }

    /// Checks the stores against the ledger: every acknowledged message of a granted
    /// dialog is in PostgreSQL under the seq it was acknowledged with, and only once (no
    /// text twice: a retry stored again would be), nothing of a refused dialog is, and
    /// the exact count agrees with the rows (a batch applied twice would count twice; a
    /// row twice is the primary key's to prevent).
    pub async fn verify(&self, store: &Store) {
        let granted = self.granted.lock().unwrap().clone();
        let refused = self.refused.lock().unwrap().clone();
        let acked = self.acked.lock().unwrap().clone();
        assert!(!granted.is_empty() && !refused.is_empty(), "the load made no decisions");
        let rows: Vec<(i64, i64, String)> = sqlx::query_as("SELECT dialog_id, seq, text FROM messages")
            .fetch_all(store.pool())
            .await
            .unwrap();
        let mut stored: HashMap<i64, BTreeMap<i64, String>> = HashMap::new();
        for (dialog, seq, text) in rows {
            stored.entry(dialog).or_default().insert(seq, text);
        }
        for dialog in &granted {
            let want = acked.get(dialog).cloned().unwrap_or_default();
            let have = stored.get(dialog).cloned().unwrap_or_default();
            let lost: Vec<&i64> = want.keys().filter(|seq| !have.contains_key(seq)).collect();
            assert!(
                lost.is_empty(),
                "dialog {dialog} (granted) lost acknowledged seqs {lost:?}"
            );
            let swapped: Vec<(&i64, &String, &String)> = want
                .iter()
                .filter_map(|(seq, text)| Some((seq, text, have.get(seq)?)).filter(|(_, sent, kept)| sent != kept))
                .collect();
            assert!(
                swapped.is_empty(),
                "dialog {dialog}: (seq, text acknowledged, text stored) {swapped:?}"
            );
            let texts: BTreeSet<&String> = have.values().collect();
            assert_eq!(
                texts.len(),
                have.len(),
                "dialog {dialog}: a message stored twice: {have:?}"
            );
        }
        for dialog in &refused {
            assert!(
                !stored.contains_key(dialog),
                "dialog {dialog} was refused but is stored: {:?}",
                stored[dialog]
            );
        }
        let total: i64 = stored.values().map(|s| s.len() as i64).sum();
        let counted: Option<i64> =
            sqlx::query_scalar("SELECT sum(n)::int8 FROM message_counts WHERE customer_id = -1 AND language = ''")
                .fetch_optional(store.pool())
                .await
                .unwrap();
        assert_eq!(counted.unwrap_or(0), total, "the exact count disagrees with the rows");
    }
}

/// Drives dialogs `dialogs` through any of `bases` (whichever answers): each dialog gets
/// `messages` messages, then a final decision — even dialogs are refused, odd granted —
/// retried until some dapi answers it. Stops early when `stop` is cancelled.
pub async fn drive(
    bases: Arc<Mutex<Vec<String>>>,
    dialogs: std::ops::Range<i64>,
    messages: usize,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for dialog in dialogs {
        let (http, bases, ledger, stop) = (http.clone(), bases.clone(), ledger.clone(), stop.clone());
        tasks.spawn(async move {
            let customer = dialog % 7;
            for i in 0..messages {
                if stop.is_cancelled() {
                    return;
                }
                let text = format!("message {i} of {dialog}");
                // Every retry carries the same messageId, as a client's would: a message
                // that was staged but answered 503 (its replicas did not confirm it, or
                // the answer was lost) is answered with its first seq, never stored twice.
                let body = json!({"text": text, "language": "EN", "messageId": format!("m{i}")});
                let answer = send(&http, &bases, &format!("/data/{customer}/{dialog}"), &body, 200).await;
                if let Some((StatusCode::ACCEPTED, reply)) = answer {
                    let seq = reply["seq"].as_i64().unwrap();
                    ledger
                        .acked
                        .lock()
                        .unwrap()
                        .entry(dialog)
                        .or_default()
                        .insert(seq, text);
                }
            }
            let approved = dialog % 2 == 1;
            // The final decision must be known: retry until a dapi answers it.
            let answer = send(&http, &bases, &format!("/consents/{dialog}"), &json!(approved), 200).await;
            match answer {
                Some((status, reply)) if status.is_success() || reply["code"] == "erasure_pending" => {
                    let decisions = if approved { &ledger.granted } else { &ledger.refused };
                    decisions.lock().unwrap().insert(dialog);
                }
                // No message was acknowledged: dapi rightly knows nothing of the dialog.
                // (With one acknowledged, a 404 means dapi lost it.)
                Some((StatusCode::NOT_FOUND, _)) if !ledger.acked.lock().unwrap().contains_key(&dialog) => {}
                other => panic!("dialog {dialog}: its decision was answered {other:?} (None: by no dapi)"),
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// POSTs `body` to `path` on the first of `bases` that answers, trying up to `attempts`
/// rounds (50 ms apart). A 503 counts as no answer (and is retried), except a refusal
/// whose erasure waits for PostgreSQL, which already holds.
async fn send(
    http: &reqwest::Client,
    bases: &Mutex<Vec<String>>,
    path: &str,
    body: &serde_json::Value,
    attempts: usize,
) -> Option<(StatusCode, serde_json::Value)> {
    for attempt in 0..attempts {
        let candidates = bases.lock().unwrap().clone();
        for base in candidates.iter().cycle().skip(attempt).take(candidates.len()) {
            if let Ok(response) = http.post(format!("{base}{path}")).json(body).send().await {
                let status = response.status();
                let reply: serde_json::Value = response.json().await.unwrap_or_default();
                // A refusal whose erasure waits for PostgreSQL holds already: an answer.
                let holds = reply["code"] == "erasure_pending";
                if status == StatusCode::SERVICE_UNAVAILABLE && !holds && attempt + 1 < attempts {
                    continue;
                }
                return Some((status, reply));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

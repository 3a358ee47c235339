//! The HTTP client: one try, resends after a timeout, a broken connection or a 503
//! (with backoff), and a batch's per-item results.

use std::time::Duration;

use serde_json::{Value, json};

use crate::record::{Cause, Tally};

/// The wait of the loss check's reads and of the probes, whatever `--timeout` says.
pub(crate) const PATIENT: Duration = Duration::from_secs(30);

/// One try's outcome.
pub(crate) enum Reply {
    Answer(u16, Value),
    Failed(Cause),
}

/// One message's result: its status and, for a 202, its `seq` and whether it repeated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Staged {
    pub(crate) status: u16,
    pub(crate) seq: Option<i64>,
    pub(crate) duplicate: bool,
}

impl Staged {
    pub(crate) fn of(status: u16, answer: &Value) -> Self {
        Self {
            status,
            seq: if status == 202 { answer["seq"].as_i64() } else { None },
            duplicate: answer["duplicate"].as_bool() == Some(true),
        }
    }
}

pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50 * u64::from(attempt))
}

pub(crate) struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) url: String,
    pub(crate) ingest_token: Option<String>,
    pub(crate) read_token: Option<String>,
    /// For `DELETE /customers/{customerId}`, `GET /erasures/{erasureId}` and the check's
    /// `GET /consents/{dialogId}` (the ingest token there when there is none).
    pub(crate) privacy_token: Option<String>,
    /// Per-request timeout of the traffic, and resends after a timeout, a broken
    /// connection or a 503.
    pub(crate) timeout: Duration,
    pub(crate) retries: u32,
}

impl Client {
    pub(crate) fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http") {
            path_or_url.to_owned()
        } else {
            format!("{}{path_or_url}", self.url)
        }
    }

    /// One try: a POST of `body` with the ingest token, or a GET with the read token.
    pub(crate) async fn once(&self, url: &str, body: Option<&Value>, timeout: Duration) -> Reply {
        let request = match body {
            Some(body) => self.http.post(url).json(body),
            None => self.http.get(url),
        };
        let token = if body.is_some() {
            &self.ingest_token
        } else {
            &self.read_token
        };
        self.send(request, token.as_deref(), timeout).await
    }

    /// One try of a privacy request with the privacy token: `DELETE` (`delete`) or `GET`
    /// of `path`.
    pub(crate) async fn privacy(&self, path: &str, delete: bool, timeout: Duration) -> Reply {
        let url = self.url(path);
        let request = if delete {
            self.http.delete(url)
        } else {
            self.http.get(url)
        };
        self.send(request, self.privacy_token.as_deref(), timeout).await
    }

    /// One try of `GET /consents/{dialogId}`: with the privacy token, else the ingest one.
    pub(crate) async fn consent(&self, dialog: i64, timeout: Duration) -> Reply {
        let request = self.http.get(self.url(&format!("/consents/{dialog}")));
        let token = self.privacy_token.as_deref().or(self.ingest_token.as_deref());
        self.send(request, token, timeout).await
    }

    async fn send(&self, request: reqwest::RequestBuilder, token: Option<&str>, timeout: Duration) -> Reply {
        let mut request = request.timeout(timeout);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let failed = |e: reqwest::Error| {
            Reply::Failed(if e.is_timeout() {
                Cause::Timeout
            } else {
                Cause::Transport
            })
        };
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return failed(e),
        };
        let status = response.status().as_u16();
        match response.bytes().await {
            Ok(bytes) => Reply::Answer(status, serde_json::from_slice(&bytes).unwrap_or_default()),
            Err(e) => failed(e),
        }
    }

    /// A request, resent unchanged after a timeout, a broken connection or a 503, up to
    /// `retries` times; `None` when no try got an answer.
    pub(crate) async fn call(
        &self,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        retries: u32,
        tally: &mut Tally,
    ) -> Option<(u16, Value)> {
        let url = self.url(path);
        let mut attempt = 0;
        loop {
            let cause = match self.once(&url, body, timeout).await {
                Reply::Answer(503, _) if attempt < retries => Cause::Unavailable,
                Reply::Answer(status, answer) => return Some((status, answer)),
                Reply::Failed(cause) if attempt < retries => cause,
                Reply::Failed(_) => return None,
            };
            attempt += 1;
            tally.note(cause);
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    pub(crate) async fn post(&self, path: &str, body: &Value, tally: &mut Tally) -> Option<(u16, Value)> {
        self.call(path, Some(body), self.timeout, self.retries, tally).await
    }

    pub(crate) async fn get(&self, path: &str, tally: &mut Tally) -> Option<(u16, Value)> {
        self.call(path, None, self.timeout, self.retries, tally).await
    }

    /// `POST /data` of `items`, resent whole after a timeout, a broken connection or a
    /// 503, and with just its 503 items after a 200 that has some, up to `retries` times
    /// in all. Returns the last try's status (`None`: no answer) and each item's last
    /// result (`None`: never answered).
    pub(crate) async fn batch(&self, items: &[Value], tally: &mut Tally) -> (Option<u16>, Vec<Option<Staged>>) {
        let url = self.url("/data");
        let mut results: Vec<Option<Staged>> = vec![None; items.len()];
        let mut pending: Vec<usize> = (0..items.len()).collect();
        let mut attempt = 0;
        loop {
            let body = json!({ "messages": pending.iter().map(|&i| &items[i]).collect::<Vec<_>>() });
            let (status, cause) = match self.once(&url, Some(&body), self.timeout).await {
                Reply::Answer(200, answer) => {
                    let answers = answer["results"].as_array();
                    let mut again = Vec::new();
                    for (k, &i) in pending.iter().enumerate() {
                        let Some(item) = answers.and_then(|a| a.get(k)) else {
                            continue;
                        };
                        let Some(status) = item["status"].as_u64().and_then(|s| u16::try_from(s).ok()) else {
                            continue;
                        };
                        results[i] = Some(Staged::of(status, item));
                        if status == 503 {
                            again.push(i);
                        }
                    }
                    if again.is_empty() {
                        return (Some(200), results);
                    }
                    pending = again;
                    (Some(200), Cause::Unavailable)
                }
                Reply::Answer(503, _) => (Some(503), Cause::Unavailable),
                Reply::Answer(status, _) => return (Some(status), results),
                Reply::Failed(cause) => (None, cause),
            };
            if attempt >= self.retries {
                return (status, results);
            }
            attempt += 1;
            tally.note(cause);
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
}

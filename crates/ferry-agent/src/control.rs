//! The agent's side of the control plane: the servers it may talk to, which one it talks to, and
//! how what it sends survives a server dying (docs/design.md#control-plane).
//!
//! Its job: registration and reports reach *a* server as long as one is up, and the host's
//! desired state reaches the agent by a watch it holds open ([`Agent::watch_forever`]), on
//! whichever server answers. It must never lose a report because one server died, never send
//! again a request that a server may have applied unless that request is idempotent (both
//! registration and reports are: a report carries an ID the server records once), and never
//! spin: every retry waits, with a bounded backoff.

use crate::machines::Agent;
use ferry_api::watch::{WatchLine, KEEPALIVE};
use futures::StreamExt;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first pause after a failed try; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a report is retried (across every server) before the agent gives it up: long enough
/// to ride out a server restart or an etcd election, bounded so reports never pile up forever.
const REPORT_DEADLINE: Duration = Duration::from_secs(120);

/// Why a request reached no server.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A server answered and refused it (4xx): another server would answer the same.
    #[error("server {server} refused it: {status}: {body}")]
    Refused {
        server: String,
        status: u16,
        body: String,
    },
    /// No server took it (down, unreachable, or failing with 5xx).
    #[error("no server took it (last: {0})")]
    Unavailable(String),
}

/// The fleet's API servers, in the operator's order, and the one that answered last.
pub struct Servers {
    urls: Vec<String>,
    current: AtomicUsize,
    http: reqwest::Client,
    /// For the watch: no overall timeout (it lasts), only the connect one.
    http_stream: reqwest::Client,
}

impl Servers {
    /// `urls` must not be empty (the command line checks it). `token` (a join token) goes with
    /// every request: the servers' agent routes refuse calls without one.
    ///
    /// `ca_pem`: the CA that signed the servers' certificates (`https://` servers are trusted
    /// through it alone). `identity`: the host's certificate and key (PEM, PEM), presented to
    /// the servers' agent listeners, which take no other proof of who a host is.
    pub fn new(
        urls: Vec<String>,
        token: Option<&str>,
        ca_pem: Option<&[u8]>,
        identity: Option<(&str, &str)>,
    ) -> Servers {
        assert!(!urls.is_empty(), "an agent needs a server");
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .expect("a token is printable ASCII (the command line checks it)");
            v.set_sensitive(true); // never in a debug print
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let builder = || {
            let b = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(1))
                .use_rustls_tls();
            let b = match ca_pem {
                Some(pem) => b.tls_built_in_root_certs(false).add_root_certificate(
                    reqwest::Certificate::from_pem(pem)
                        .expect("a PEM certificate (the command line checks it)"),
                ),
                None => b,
            };
            match identity {
                Some((cert, key)) => b.identity(
                    reqwest::Identity::from_pem(format!("{key}\n{cert}").as_bytes())
                        .expect("the host's key and certificate (checked when loaded)"),
                ),
                None => b,
            }
        };
        let http = builder()
            .timeout(Duration::from_secs(10))
            .default_headers(headers.clone())
            .build()
            .expect("building an HTTP client");
        let http_stream = builder()
            .default_headers(headers)
            .build()
            .expect("building an HTTP client");
        Servers {
            urls,
            current: AtomicUsize::new(0),
            http,
            http_stream,
        }
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The servers in the order to try them: the one that answered last, then the others.
    fn order(&self) -> impl Iterator<Item = usize> + '_ {
        let first = self.current.load(Ordering::Relaxed);
        (0..self.urls.len()).map(move |i| (first + i) % self.urls.len())
    }

    /// POSTs `body` (an idempotent request: it may reach two servers) to `path` on the first
    /// server that takes it; one round over the servers.
    pub async fn post_idempotent<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(), SendError> {
        let mut last = String::new();
        for i in self.order() {
            let url = &self.urls[i];
            match self
                .http
                .post(format!("{url}{path}"))
                .json(body)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(());
                }
                // The store behind it is unreachable, or the server failed: another may do.
                Ok(r) if r.status().is_server_error() => {
                    last = format!("{url}: {}", r.status());
                }
                Ok(r) => {
                    return Err(SendError::Refused {
                        server: url.clone(),
                        status: r.status().as_u16(),
                        body: r.text().await.unwrap_or_default(),
                    })
                }
                // Refused, reset or timed out: the server may be dead, or may have applied it
                // and died before answering; either way the next one may take it (idempotent).
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(SendError::Unavailable(last))
    }

    /// [`Servers::post_idempotent`] again and again (waiting between rounds) until a server
    /// takes it, one refuses it, or `deadline` passes.
    pub async fn post_until<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        let mut delay = BACKOFF_MIN;
        loop {
            match self.post_idempotent(path, body).await {
                Err(SendError::Unavailable(e)) => {
                    if deadline.is_some_and(|d| Instant::now() + delay > d) {
                        return Err(SendError::Unavailable(e));
                    }
                    tracing::warn!("{path}: {e}; trying again in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
                r => return r,
            }
        }
    }
}

/// A report's ID: unique per agent process and report.
pub(crate) fn report_id() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// What the agent's watch is doing, for `GET /v1/state` (tests and operators).
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchStatus {
    /// The server whose stream is open now, if any.
    pub server: Option<String>,
    /// State lines received and applied since the agent started.
    pub updates: u64,
    /// Streams opened since the agent started.
    pub streams: u64,
    pub last_error: Option<String>,
}

impl Agent {
    /// Sends a report to whichever server takes it, in the background: retried across servers
    /// for [`REPORT_DEADLINE`] (the report carries an ID, so a server that gets it twice records
    /// it once).
    pub(crate) fn send_report(&self, mut r: ferry_core::proto::AgentReport) {
        r.report_id = report_id();
        let servers = self.servers.clone();
        self.rt.spawn(async move {
            let deadline = Instant::now() + REPORT_DEADLINE;
            match servers
                .post_until("/internal/v1/reports", &r, Some(deadline))
                .await
            {
                Ok(()) => {}
                // E.g. the machine was destroyed meanwhile: nothing to record it on.
                Err(e @ SendError::Refused { .. }) => {
                    tracing::warn!("report {} for {}: {e}", r.kind, r.machine_id)
                }
                Err(e) => tracing::error!("report {} for {} lost: {e}", r.kind, r.machine_id),
            }
        });
    }

    /// Holds a watch stream open on one server after the other, forever: each state line is
    /// applied as a push is. A stream that ends, breaks, or says nothing for three keep-alive
    /// periods is given up and the next server is tried, after a pause that doubles up to
    /// [`BACKOFF_MAX`] (reset once a stream delivered something).
    pub async fn watch_forever(self: Arc<Self>) {
        let mut delay = BACKOFF_MIN;
        let n = self.servers.urls.len();
        let mut i = self.servers.current.load(Ordering::Relaxed);
        loop {
            let url = self.servers.urls[i].clone();
            let r = self.watch_once(&url).await;
            {
                let mut st = self.watch_status.lock().unwrap();
                st.server = None;
                match r {
                    Ok(true) => delay = BACKOFF_MIN,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!("watch on {url}: {e}");
                        st.last_error = Some(format!("{url}: {e}"));
                    }
                }
            }
            i = (i + 1) % n;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream, until it ends. `Ok(true)` if it delivered at least one line.
    async fn watch_once(self: &Arc<Self>, url: &str) -> Result<bool, String> {
        let path = format!("{url}/internal/v1/hosts/{:x}/watch", self.cfg.host_id.get());
        let resp = tokio::time::timeout(KEEPALIVE, self.servers.http_stream.get(&path).send())
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{}", resp.status()));
        }
        {
            let mut st = self.watch_status.lock().unwrap();
            st.server = Some(url.to_owned());
            st.streams += 1;
        }
        // The same, for whoever runs this agent (`ferry dev` waits on it): `GET /v1/state` is
        // for the fleet's servers only.
        let _ = std::fs::write(self.cfg.state_dir.join("watching"), url);
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut got = false;
        loop {
            let chunk = match tokio::time::timeout(KEEPALIVE * 3, body.next()).await {
                Err(_) => return Err("silent for too long".into()),
                Ok(None) => return Ok(got),
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(Some(Ok(c))) => c,
            };
            buf.extend_from_slice(&chunk);
            while let Some(at) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=at).collect();
                got = true;
                match serde_json::from_slice::<WatchLine>(&line) {
                    Ok(WatchLine::Bridge(sync)) => {
                        self.apply_line("applying the bridge state", move |a| a.apply_bridge(&sync))
                            .await?
                    }
                    Ok(WatchLine::Dns(snapshot)) => {
                        self.apply_line("applying the DNS snapshot", move |a| a.dns.apply(snapshot))
                            .await?
                    }
                    Ok(WatchLine::Hosts(peers)) => {
                        self.apply_line("routing to the other hosts", move |a| {
                            a.apply_peers(&peers)
                        })
                        .await?
                    }
                    Ok(WatchLine::Keepalive {}) => {}
                    Err(e) => return Err(format!("not a watch line: {e}")),
                }
            }
        }
    }

    /// Applies one state line on a blocking thread (netlink, cgroups and files block) and counts
    /// it, or says why it could not (`what` failed); the stream goes on either way. `Err` only
    /// if the blocking task itself died.
    async fn apply_line(
        self: &Arc<Self>,
        what: &str,
        f: impl FnOnce(&Agent) -> Result<(), crate::AgentError> + Send + 'static,
    ) -> Result<(), String> {
        let a = self.clone();
        let applied = tokio::task::spawn_blocking(move || f(&a))
            .await
            .map_err(|e| e.to_string())?;
        match applied {
            Ok(()) => self.watch_status.lock().unwrap().updates += 1,
            Err(e) => tracing::warn!("{what}: {e}"),
        }
        Ok(())
    }
}

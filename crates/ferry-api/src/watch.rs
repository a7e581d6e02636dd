//! The agents' watch: `GET /internal/v1/hosts/{host}/watch` answers newline-delimited JSON
//! ([`WatchLine`]) for as long as the agent holds it open: the host's whole desired bridge state
//! and the fleet's `.internal` DNS snapshot at once, then each again whenever it changes, and a
//! keep-alive line when nothing changed for [`KEEPALIVE`].
//!
//! Its job: an agent converges without anyone pushing to it: one that missed a push (it was
//! restarting, the pushing server died between its store write and its push) or whose server
//! died (it opens the watch on another server, which sends the state first thing). It learns of
//! changes from the store's subscription ([`ferry_store::Store::subscribe`]: an etcd watch on
//! etcd), so a change made through any server reaches an agent watching any other.
//!
//! It must never send a partial state (each line is the whole state, as a push is) and never
//! end the stream because the store is unreachable: the agent keeps what it has and the stream
//! goes on with keep-alives until the store answers again. The synchronous pushes
//! ([`ferry_core::bridge::sync_all`]) stay: the migration driver waits for them before it starts a
//! machine on its destination (see ARCHITECTURE.md).

use crate::error::ApiError;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use ferry_addr::HostId;
use ferry_core::bridge::host_state;
use ferry_core::proto::{BridgeSync, PeerHost};
use ferry_core::Core;
use ferry_store::Subscription;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How long a stream stays silent at most: the agent takes a stream that said nothing for three
/// times this long as dead (a server cut off without closing its connections).
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// One line of the watch stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchLine {
    /// The host's whole desired bridge state (as a push sends it).
    Bridge(BridgeSync),
    /// The whole `.internal` zone (a `ferry_dns::Snapshot`), which the agent serves at
    /// `fdaa::3` to its machines until the next one. Kept as JSON here: the HTTP edge does not
    /// need to know DNS to pass it on.
    Dns(serde_json::Value),
    /// The other hosts with an underlay address: the agent keeps exactly one route per other
    /// host (docs/design.md#underlay). Sent first and whenever the fleet's hosts change.
    Hosts(Vec<PeerHost>),
    /// Nothing changed; the server and the stream are alive.
    Keepalive {},
}

struct Stream {
    ctx: Arc<Core>,
    host: HostId,
    sub: Option<Subscription>,
    /// The last bridge state sent (mappings and gates: its generation differs on every read),
    /// so an unrelated change sends nothing.
    last: Option<(
        Vec<ferry_core::proto::BridgeMapping>,
        std::collections::BTreeMap<String, bool>,
    )>,
    /// The last hosts line sent, likewise.
    last_hosts: Option<String>,
    first: bool,
    /// The control plane's DNS snapshots ([`Core::dns_state`]).
    dns: tokio::sync::watch::Receiver<Option<Arc<str>>>,
    /// Lines due after the one being returned.
    pending: std::collections::VecDeque<String>,
    /// The store's change counters as of the last wake-up: which parts changed since.
    seen: ferry_store::Changes,
    /// When the bridge state was last read, and when it is due again because machines or the
    /// bridge changed meanwhile ([`BRIDGE_COALESCE`]).
    bridge_read_at: Option<tokio::time::Instant>,
    bridge_due: Option<tokio::time::Instant>,
}

/// How often at most a stream reads the host's bridge state again because machines or the
/// bridge changed (a busy fleet changes them hundreds of times a second, and each read lists
/// every machine of the host). Every change of the bridge is pushed to every agent by the
/// server that made it ([`ferry_core::bridge`]), and a machine's own gate reaches its agent with
/// its start: the watch only repairs what a push missed, so a quarter second is early enough.
const BRIDGE_COALESCE: Duration = Duration::from_millis(250);

impl Stream {
    /// The next line to send; waits for a change or the keep-alive period.
    async fn next(&mut self) -> String {
        if let Some(line) = self.pending.pop_front() {
            return line;
        }
        loop {
            let mut timed_out = false;
            let mut dns_changed = self.first;
            let (mut want_hosts, mut want_bridge) = (self.first, self.first);
            if !self.first {
                let sub = &mut self.sub;
                let changed = async {
                    match sub.as_mut() {
                        Some(s) => s.changed().await.map(|_| *s.borrow_and_update()).ok(),
                        None => std::future::pending().await,
                    }
                };
                let due = self.bridge_due;
                let coalesced = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    c = changed => match c {
                        None => {
                            // The feed ended: read everything once more; keep-alives go on.
                            self.sub = None;
                            (want_hosts, want_bridge) = (true, true);
                        }
                        Some(c) => {
                            want_hosts = c.hosts != self.seen.hosts;
                            let moved = c.bridge != self.seen.bridge || c.machines != self.seen.machines;
                            if moved && self.bridge_due.is_none() {
                                let earliest = self.bridge_read_at.map(|t| t + BRIDGE_COALESCE);
                                let now = tokio::time::Instant::now();
                                match earliest {
                                    Some(t) if t > now => self.bridge_due = Some(t),
                                    _ => want_bridge = true,
                                }
                            }
                            self.seen = c;
                        }
                    },
                    _ = coalesced => want_bridge = true,
                    r = self.dns.changed() => {
                        if r.is_err() {
                            // The core is gone (the server is stopping): no more snapshots.
                            self.dns = tokio::sync::watch::channel(None).1;
                        }
                        dns_changed = true;
                    }
                    _ = tokio::time::sleep(KEEPALIVE) => timed_out = true,
                }
            }
            self.first = false;
            if timed_out {
                // Read everything again now and then: a change the feed could not tell apart is
                // caught here at the latest.
                (want_hosts, want_bridge) = (true, true);
            }
            let dns_line = if dns_changed {
                // Sent as it is: `{"dns": <snapshot>}` is a WatchLine::Dns.
                self.dns
                    .borrow_and_update()
                    .as_ref()
                    .map(|snap| format!("{{\"dns\":{snap}}}\n"))
            } else {
                None
            };
            // Routes first: a new host's machines are reachable before anything names them.
            if want_hosts {
                let hosts = self.hosts_line().await;
                self.pending.extend(hosts);
            }
            if want_bridge {
                self.bridge_due = None;
                self.bridge_read_at = Some(tokio::time::Instant::now());
                let bridge = self.bridge_line().await;
                self.pending.extend(bridge);
            }
            self.pending.extend(dns_line);
            if let Some(line) = self.pending.pop_front() {
                return line;
            }
            if timed_out {
                let line = serde_json::to_string(&WatchLine::Keepalive {}).expect("serializable");
                return line + "\n";
            }
        }
    }

    /// The fleet's other hosts as a line, if it differs from the last one sent.
    async fn hosts_line(&mut self) -> Option<String> {
        let ctx = self.ctx.clone();
        let me = self.host.get();
        let peers = tokio::task::spawn_blocking(move || ferry_core::hosts::peers(&ctx))
            .await
            .ok()?
            .ok()?;
        let others = peers.into_iter().filter(|p| p.id != me).collect();
        let line = serde_json::to_string(&WatchLine::Hosts(others)).expect("serializable");
        if self.last_hosts.as_ref() == Some(&line) {
            return None;
        }
        self.last_hosts = Some(line.clone());
        Some(line + "\n")
    }

    /// The host's bridge state as a line, if it differs from the last one sent.
    async fn bridge_line(&mut self) -> Option<String> {
        let ctx = self.ctx.clone();
        let host = self.host;
        let sync = tokio::task::spawn_blocking(move || host_state(&ctx, host))
            .await
            .ok()?
            .ok()?;
        if self
            .last
            .as_ref()
            .is_some_and(|(m, g)| *m == sync.mappings && *g == sync.gates)
        {
            return None;
        }
        self.last = Some((sync.mappings.clone(), sync.gates.clone()));
        let line = serde_json::to_string(&WatchLine::Bridge(sync)).expect("serializable");
        Some(line + "\n")
    }
}

/// `GET /internal/v1/hosts/{host}/watch` (host ID in hex): see the module doc. 404 if the host
/// never registered.
pub async fn host_watch(
    State(ctx): State<Arc<Core>>,
    crate::server::Auth(caller): crate::server::Auth,
    crate::server::Path(host): crate::server::Path<String>,
) -> Result<Response, ApiError> {
    caller.require_host()?;
    let id = u32::from_str_radix(&host, 16)
        .ok()
        .and_then(|v| HostId::new(v).ok())
        .ok_or_else(|| ApiError::invalid(format!("host {host:?}: not a host ID")))?;
    ctx.store.get_host(id)?;
    let mut sub = ctx.store_changes();
    // What the first lines read is at least this fresh.
    let seen = sub
        .as_mut()
        .map(|s| *s.borrow_and_update())
        .unwrap_or_default();
    let dns = ctx.dns_state.subscribe();
    let s = Stream {
        ctx,
        host: id,
        sub,
        last: None,
        last_hosts: None,
        first: true,
        dns,
        pending: Default::default(),
        seen,
        bridge_read_at: None,
        bridge_due: None,
    };
    let lines = futures::stream::unfold(s, |mut s| async move {
        let line = s.next().await;
        Some((Ok::<_, std::convert::Infallible>(line), s))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

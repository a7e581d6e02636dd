//! The control plane's components, the same under `ferry server` and `ferry dev` (which only
//! adds hosts and agents around them): the API, DNS state republished after every change, and,
//! once started, the background work that keeps the fleet right without anyone asking:
//! unfinished migrations resume (or roll back) and the volumes of finished ones expire. The
//! bridge state reaches every host that registers (in the API's registration handler).

use anyhow::{Context, Result};
use ferry_api::server;
use ferry_core::Core;
use ferry_dns::ZoneData;
use ferry_store::Store;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How DNS snapshot builds are paced: a few at once ([`DNS_BURST`]: a stop or a start is two or
/// three changes, each seen in answers at once), then one per [`DNS_REBUILD_GAP`]. A build reads
/// every machine (on etcd, a range of every record) and the snapshot goes whole to every agent,
/// which parses it; a drain changes machines hundreds of times a second, and rebuilt back to
/// back that was the etcd cluster's largest single load. In a long burst, names are at most
/// one gap (plus a build) behind; a moved machine's old address works meanwhile (the bridge).
/// A build that finds nothing new to publish gives its token back ([`BuildPace::refund`]): most
/// wake-ups are not DNS changes (a migration's phase saved, a machine going from `stopping` to
/// `stopped`, the store's feed repeating this server's own change), and a migration's last
/// change, its start, must not wait a gap behind them. Such builds are still spaced
/// [`DNS_UNCHANGED_GAP`] apart, so wake-ups that change nothing cannot keep a core busy.
/// A token bucket, written here because it is ten lines and the publisher is its only user.
#[derive(Debug)]
struct BuildPace {
    tokens: f64,
    at: std::time::Instant,
    /// No build before this (set by a build that published nothing).
    quiet_until: std::time::Instant,
}

const DNS_BURST: f64 = 4.0;
/// Short enough that a change in a long burst is answered within 100 ms (docs/design.md#dns).
const DNS_REBUILD_GAP: std::time::Duration = std::time::Duration::from_millis(50);
/// After a build that published nothing: at most this many of them a second, 100.
const DNS_UNCHANGED_GAP: std::time::Duration = std::time::Duration::from_millis(10);

impl BuildPace {
    fn new(now: std::time::Instant) -> Self {
        BuildPace {
            tokens: DNS_BURST,
            at: now,
            quiet_until: now,
        }
    }

    /// How long to wait before a build wanted at `now`; the build is counted as made then.
    fn take(&mut self, now: std::time::Instant) -> std::time::Duration {
        let refill =
            now.saturating_duration_since(self.at).as_secs_f64() / DNS_REBUILD_GAP.as_secs_f64();
        self.tokens = (self.tokens + refill).min(DNS_BURST);
        self.at = now;
        let wait = if self.tokens >= 1.0 {
            std::time::Duration::ZERO
        } else {
            DNS_REBUILD_GAP.mul_f64(1.0 - self.tokens)
        }
        .max(self.quiet_until.saturating_duration_since(now));
        // The token the build spends, refilled meanwhile if it has to wait.
        self.tokens -= 1.0;
        wait
    }

    /// The build made at `now` published nothing (its snapshot was the one already out): its
    /// token back, and the next build not before [`DNS_UNCHANGED_GAP`].
    fn refund(&mut self, now: std::time::Instant) {
        self.tokens = (self.tokens + 1.0).min(DNS_BURST);
        self.quiet_until = now + DNS_UNCHANGED_GAP;
    }
}

/// Hands a snapshot to the agents' watch streams (they send it only when it changed).
fn publish_for_agents(ctx: &Core, snap: &ferry_dns::Snapshot) {
    let json = serde_json::to_string(snap).expect("a snapshot serializes");
    ctx.dns_state.send_if_modified(|cur| {
        let changed = cur.as_deref() != Some(json.as_str());
        if changed {
            *cur = Some(json.into());
        }
        changed
    });
}

pub struct ControlPlane {
    pub ctx: Arc<Core>,
    /// An admin token of this fleet (`<state dir>/admin.token`): for its operator.
    pub admin_token: String,
    /// A join token of this fleet (`<state dir>/join.token`): for its agents.
    pub join_token: String,
    /// The API is served over TLS (`ferry server init` ran on the state directory).
    pub tls: bool,
    /// The agent listener's URL (`https://...`, always TLS): agents' `--server`.
    pub agent_url: String,
}

/// Where the control plane writes its agent listener's URL (for `ferry dev`, tests, operators).
pub fn agent_url_file(state_dir: &Path) -> PathBuf {
    state_dir.join("agent-api.url")
}

/// The agent listener: where hosts join, register, report and watch (docs/design.md#tokens).
pub struct AgentListen {
    pub addr: SocketAddr,
    /// Names (DNS or IP) agents reach this server at, besides localhost and the listener's own
    /// address: they go in the server's role certificate.
    pub names: Vec<String>,
}

/// The server's role certificate for `listen` (and the TLS client identity of its calls to
/// agents): made at every start, in memory, by the fleet CA.
fn role_identity(ca: &ferry_pki::Ca, listen: &AgentListen) -> Result<ferry_pki::Issued> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !listen.addr.ip().is_unspecified() {
        names.push(listen.addr.ip().to_string());
    }
    for n in &listen.names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    Ok(ca.issue_server_role(&names)?)
}

/// Where the control plane keeps the admin token it made for its operator.
pub fn admin_token_file(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.token")
}

/// Where the control plane keeps the join token it made for its hosts' agents.
pub fn join_token_file(state_dir: &Path) -> PathBuf {
    state_dir.join("join.token")
}

/// The token of `kind` kept in `file` if the store still takes it; else a new one, written
/// there (mode 0600, atomically). So a restarted server hands out the same tokens, and a file
/// whose token was revoked (or a state directory moved to another store) gets a fresh one.
fn bootstrap_token(ctx: &Core, file: &Path, kind: &str) -> Result<String> {
    use ferry_core::auth::{authenticate, Scope};
    if let Ok(t) = std::fs::read_to_string(file) {
        let t = t.trim();
        let fits = match authenticate(ctx, Some(t)) {
            Ok(c) => match c.scope {
                Scope::Admin => kind == "admin",
                Scope::Join => kind == "join",
                Scope::Org(_) => false,
            },
            Err(_) => false,
        };
        if fits {
            return Ok(t.to_owned());
        }
    }
    let made = ferry_core::auth::issue(
        ctx,
        ferry_core::auth::CreateToken {
            kind: kind.into(),
            description: Some(format!("made by the control plane for {}", file.display())),
            ..Default::default()
        },
    )
    .map_err(|e| anyhow::anyhow!("making the {kind} token: {e}"))?;
    write_secret(file, &made.token)?;
    Ok(made.token)
}

/// Writes a secret readable by its owner only, atomically (a reader never sees half of it).
pub fn write_secret(file: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = file.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = file.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(format!("{secret}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, file).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

impl ControlPlane {
    /// Serves the API on `listen` and `.internal` DNS for operators on `dns` (UDP and TCP), from
    /// a snapshot published after every machine change; the same snapshot goes to every host's
    /// agent (its watch stream), which answers its machines at `[fdaa::3]:53`.
    /// The admin and join tokens are kept in `state_dir` (see [`bootstrap_token`]).
    pub fn start(
        rt: &tokio::runtime::Runtime,
        store: Arc<dyn Store>,
        state_dir: &Path,
        volumes_dir: PathBuf,
        listen: SocketAddr,
        agent_listen: &AgentListen,
        dns: Option<SocketAddr>,
    ) -> Result<ControlPlane> {
        // The fleet CA always exists (made at the first start): hosts get their certificates
        // from it when they join, whether or not the operator API is TLS.
        let ca = super::tls::fleet_ca(state_dir)?;
        let role = role_identity(&ca, agent_listen)?;
        let agent_tls = ferry_api::AgentTls {
            ca_pem: ca.pem().to_owned(),
            identity: role.clone(),
        };
        let ctx = ferry_api::http_core_with(store.clone(), volumes_dir, Some(&agent_tls))
            .context("the HTTP client of the agents")?;
        // A store written before the typed records keeps its data: copied over once.
        match ferry_core::legacy::import(&ctx) {
            Ok(n) if n != Default::default() => tracing::info!("imported legacy records: {n:?}"),
            Ok(_) => {}
            Err(e) => anyhow::bail!("importing the store's legacy records: {e}"),
        }
        let admin_token = bootstrap_token(&ctx, &admin_token_file(state_dir), "admin")?;
        let join_token = bootstrap_token(&ctx, &join_token_file(state_dir), "join")?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(listen))
            .with_context(|| {
                format!("listening on {listen} (is another ferry server or dev running?)")
            })?;
        let zone = Arc::new(ZoneData::new());
        // With the store unreachable there is no new snapshot, and DNS keeps answering the
        // last one it had.
        let first = super::dns::snapshot(store.as_ref());
        if let Some(s) = first.clone() {
            publish_for_agents(&ctx, &s);
            zone.publish(s);
        }
        // A new snapshot after every machine change, built off the request's path: changes
        // that land while one is being built are folded into the next (the watch channel keeps
        // only "changed since you last looked"), so a burst of N changes costs a few rebuilds,
        // not N full reads of the store inside N requests.
        let (z, s, c) = (zone.clone(), store.clone(), ctx.clone());
        let mut changes = ctx.changes.subscribe();
        rt.spawn(async move {
            let mut pace = BuildPace::new(std::time::Instant::now());
            let mut last = first;
            while changes.changed().await.is_ok() {
                // Paced (BuildPace): the changes that land during a wait fold into this build.
                let wait = pace.take(std::time::Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                    changes.borrow_and_update();
                }
                let s = s.clone();
                // No snapshot (the store did not answer): DNS keeps the last one.
                let built = tokio::task::spawn_blocking(move || super::dns::snapshot(s.as_ref()));
                if let Ok(Some(snap)) = built.await {
                    if last.as_ref() == Some(&snap) {
                        pace.refund(std::time::Instant::now());
                        continue;
                    }
                    last = Some(snap.clone());
                    publish_for_agents(&c, &snap);
                    for e in z.publish(snap) {
                        tracing::warn!("a machine left out of DNS: {e}");
                    }
                }
            }
        });
        if let Some(dns) = dns {
            super::dns::serve(rt, zone.clone(), dns)?;
        }
        // DNS responses by RCODE in the server's metrics: the zone counts, a scrape catches up.
        let (z, seen) = (zone.clone(), std::sync::Mutex::new([0u64; 16]));
        ctx.metrics.on_scrape(Box::new(move |m| {
            let now = z.answered();
            let mut seen = seen.lock().unwrap();
            for (code, (n, before)) in now.iter().zip(seen.iter()).enumerate() {
                if n > before {
                    let rcode = ZoneData::rcode_name(code);
                    m.dns_responses
                        .get_or_create(&ferry_core::metrics::RcodeLabels { rcode })
                        .inc_by(n - before);
                }
            }
            *seen = now;
        }));
        // Changes this server did not make (another server on the same etcd) reach its DNS and
        // its `wait` callers too: the store says when machines or hosts changed.
        match ctx.store_changes() {
            Some(mut sub) => {
                let c = ctx.clone();
                rt.spawn(async move {
                    let mut seen = *sub.borrow_and_update();
                    while sub.changed().await.is_ok() {
                        let now = *sub.borrow_and_update();
                        if (now.machines, now.hosts) != (seen.machines, seen.hosts) {
                            // Only wakes the DNS publisher and the waiters: nothing blocks here.
                            c.changed();
                        }
                        seen = now;
                    }
                });
            }
            None => tracing::warn!(
                "not following store changes: DNS follows this server's own changes only"
            ),
        }
        let agent_listener = rt
            .block_on(tokio::net::TcpListener::bind(agent_listen.addr))
            .with_context(|| format!("listening for agents on {}", agent_listen.addr))?;
        let agent_url = {
            let a = agent_listener.local_addr()?;
            // What an agent on this machine dials; the certificate names both loopbacks.
            let ip = match a.ip() {
                ip if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
                ip => ip,
            };
            format!("https://{}", SocketAddr::new(ip, a.port()))
        };
        std::fs::write(agent_url_file(state_dir), &agent_url)?;
        let agent_config =
            ferry_pki::server_config(&role, ferry_pki::ClientAuth::Optional(ca.pem()))
                .context("the agent listener's TLS")?;
        rt.spawn(super::tls::serve_peers(
            agent_listener,
            ferry_api::agent_api::router(ctx.clone(), Arc::new(ca)),
            agent_config,
            |cert| Some(ferry_api::agent_api::Peer::of(cert)),
        ));
        let app = server::router(ctx.clone());
        // TLS only, once `ferry server init` made the certificates: tokens must not cross the
        // network in clear.
        let tls = super::tls::server_config(state_dir)?;
        match tls.clone() {
            Some(config) => {
                rt.spawn(super::tls::serve(listener, app, config));
            }
            None => {
                rt.spawn(async move { axum::serve(listener, app).await });
            }
        }
        Ok(ControlPlane {
            ctx,
            admin_token,
            join_token,
            tls: tls.is_some(),
            agent_url,
        })
    }

    /// Starts the background work: migrations a crash or a stop interrupted carry on from their
    /// last recorded step, and the volume expiry loop runs. Call once the hosts can be reached
    /// (`ferry dev`: after its agents registered; `ferry server`: at once, agents come and go).
    pub fn resume(&self, rt: &tokio::runtime::Runtime) {
        let _guard = rt.enter();
        ferry_core::migrate::resume_unfinished(&self.ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn dns_builds_go_at_once_in_a_short_burst_then_one_per_gap() {
        let t0 = Instant::now();
        let mut p = BuildPace::new(t0);
        // A stop and a start, back to back: every build at once.
        for _ in 0..4 {
            assert_eq!(p.take(t0), Duration::ZERO);
        }
        // The fifth in the same instant waits one gap; the next waits from where that one left.
        assert_eq!(p.take(t0), DNS_REBUILD_GAP);
        let later = t0 + DNS_REBUILD_GAP;
        assert_eq!(p.take(later), DNS_REBUILD_GAP);
        // After a quiet spell the whole burst is back, no more.
        let quiet = later + DNS_REBUILD_GAP * 20;
        for _ in 0..4 {
            assert_eq!(p.take(quiet), Duration::ZERO);
        }
        assert!(p.take(quiet) > Duration::ZERO);
    }

    #[test]
    fn a_dns_build_that_published_nothing_costs_no_token() {
        let t0 = Instant::now();
        let mut p = BuildPace::new(t0);
        // Wake-ups that change nothing DNS answers: each build is given back, and the next
        // comes one unchanged-gap later, not at once.
        let mut t = t0;
        for _ in 0..10 {
            assert_eq!(p.take(t), Duration::ZERO);
            p.refund(t);
            assert_eq!(p.take(t), DNS_UNCHANGED_GAP);
            p.refund(t + DNS_UNCHANGED_GAP);
            t += DNS_UNCHANGED_GAP * 2;
        }
        // The burst is whole for the changes that follow; refunds never make it larger.
        for _ in 0..4 {
            assert_eq!(p.take(t), Duration::ZERO);
        }
        assert_eq!(p.take(t), DNS_REBUILD_GAP);
    }
}

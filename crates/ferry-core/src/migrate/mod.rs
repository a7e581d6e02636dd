//! Migration (docs/design.md#migration): move a machine to another host with the same ID, a new instance and a new
//! address, its volumes forked over the fabric, DNS and the bridge following it.
//!
//! A migration is a durable record (`migration/<id>` in the store) advanced by one driver task
//! through [`Phase`]s. Every phase is written before the next one begins, and every step is
//! idempotent, so a server restarted at any point calls [`resume_unfinished`] and the driver
//! carries on from the recorded phase (or rolls back). The invariants the order of steps keeps:
//!
//! * **One running copy.** The source instance is stopped (`Stopped`) and its host forgets it
//!   (`Switched`) before the destination is started; a rollback stops and forgets the destination
//!   before the source starts again.
//! * **No start on an unverified volume.** `Switched` requires every volume's final copy round to
//!   be verified (the receiver's BLAKE3 root over what it wrote equals the sender's root).
//! * **No lost byte.** The source volume is kept (`pending_destroy`) for the app's retention
//!   period; a rollback after the destination ran copies the destination's bytes back first.
//! * **One migration per network at a time.** The per-network lock is a store lock with a TTL,
//!   refreshed while the driver lives: a dead server's lock expires and another can proceed.

use crate::auth::Caller;
use crate::config::{validate_machine_id, MachineConfig};
use crate::error::{Error, Result};
use crate::hosts::{host_hex, parse_host};
use crate::machines::machine_of;
use crate::proto::{VolumeProgress, VolumeRemove};
use crate::random_hex;
use crate::views::{rfc3339, VolumeView};
use crate::volumes::{put_volume, volumes};
use crate::Core;
use ferry_addr::HostId;
use ferry_store::{Machine, MachineState as S, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use utoipa::ToSchema;

/// How long the per-network lock lives without a refresh (a dead coordinator's lock expires).
const LOCK_TTL_MS: u64 = 15_000;
/// How long a server's claim on driving a migration outlives its last heartbeat: the longest a
/// migration waits for another server to take it over after its server died.
pub const CLAIM_TTL_MS: u64 = 5_000;
/// How often a migration waiting for its network's lock tries again when nothing woke it (the
/// lock was released by another server, or its holder died and it expired). A release by this
/// server wakes the next waiter at once; each poll is two store round trips, and a drain's
/// waiters number in the hundreds.
const LOCK_POLL: Duration = Duration::from_secs(2);
/// How often every server looks for unfinished migrations nobody drives: a dead server's
/// migration is taken over at most this long after its claim lapsed (the claim's TTL), so
/// takeover stays within TTL + 1 s with room for the first step. Migrations this server drives
/// cost nothing in a scan; one driven elsewhere costs a claim attempt.
const TAKEOVER_SCAN: Duration = Duration::from_millis(500);
/// Transient failures (an agent restarting) are retried this many times before a rollback.
const MAX_RETRIES: u32 = 40;

/// Where a migration is. Each value means "this step is done and recorded".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Created; waiting for the network's lock.
    Pending,
    /// Holds the lock; destination, new address and volume copies chosen.
    Locked,
    /// The notice went out (event, webhook) and its period passed.
    Noticed,
    /// The volumes were copied while the machine ran.
    Precopied,
    /// The source instance is stopped (the downtime starts here).
    Stopped,
    /// The final copy rounds moved what changed and were verified.
    Synced,
    /// The store points at the destination; the source host forgot the machine.
    Switched,
    /// The bridge maps the old address to the new one on every host (before the start, so
    /// clients of the old address reach the new instance as soon as it listens).
    Mapped,
    /// Started on the destination (if it was running).
    Started,
    Done,
    RollingBack,
    RolledBack,
}

impl Phase {
    pub fn finished(self) -> bool {
        matches!(self, Phase::Done | Phase::RolledBack)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Locked => "locked",
            Phase::Noticed => "noticed",
            Phase::Precopied => "precopied",
            Phase::Stopped => "stopped",
            Phase::Synced => "synced",
            Phase::Switched => "switched",
            Phase::Started => "started",
            Phase::Mapped => "mapped",
            Phase::Done => "done",
            Phase::RollingBack => "rolling_back",
            Phase::RolledBack => "rolled_back",
        }
    }
}

/// One volume being forked to the destination.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeFork {
    pub mount_path: String,
    pub src_volume: String,
    pub src_dir: String,
    pub dst_volume: String,
    /// Chosen by the destination agent on the first round.
    pub dst_dir: Option<String>,
    pub session: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub token: String,
    /// BLAKE3 root of the final, verified copy.
    pub root: Option<String>,
    pub verified: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct MigrationStats {
    pub precopy_ms: u64,
    pub precopy_bytes: u64,
    pub final_sync_ms: u64,
    pub final_bytes: u64,
    pub final_chunks: u64,
    /// Chunks the receiver found corrupt or missing and got again (all rounds).
    #[serde(default)]
    pub chunks_resent: u64,
    /// When the source was stopped and the destination started (ms since the epoch).
    pub stopped_at_ms: Option<i64>,
    pub started_at_ms: Option<i64>,
    /// From the stop of the source to the start on the destination.
    pub downtime_ms: Option<u64>,
}

/// The durable record of one migration (also what the API shows).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    pub id: String,
    pub machine_id: String,
    pub app: String,
    pub network_id: u32,
    pub phase: Phase,
    /// Host IDs in hex.
    pub from_host: String,
    pub to_host: String,
    pub old_instance_id: String,
    pub old_ip: String,
    pub old_field: u32,
    pub new_instance_id: String,
    pub new_ip: String,
    pub new_field: u32,
    /// The machine was started when the migration took it (a stopped machine moves stopped).
    pub was_running: bool,
    /// Copy the volumes while the machine runs (default). Off: stop, copy everything, start
    /// (a "cold" migration; the benchmark's baseline).
    #[serde(default = "yes")]
    pub precopy: bool,
    pub volumes: Vec<VolumeFork>,
    /// Why it rolled back (or the last transient error while it retries).
    pub error: Option<String>,
    pub rollback_from: Option<Phase>,
    /// Part of `ferry host drain` (its host).
    pub drain: Option<String>,
    pub stats: MigrationStats,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lock_nonce: Option<String>,
    #[serde(default)]
    pub notice_at_ms: Option<i64>,
    #[serde(default)]
    pub launch_recorded: bool,
    #[serde(default)]
    pub retries: u32,
    /// While a copy round runs: the source agent's progress (not stored).
    #[serde(default)]
    pub progress: Option<VolumeProgress>,
    /// The store revision this copy was read at: a save names it, so two writers never lose
    /// each other's update (the second gets a conflict).
    #[serde(skip)]
    pub revision: u64,
    /// What the running step did, for the machine's event log: written by the next save, in
    /// the same transaction ([`record_event`]).
    #[serde(skip)]
    pub(crate) pending_event: Option<ferry_store::NewEvent>,
}

/// An app's rules for moving its machines.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MigratePolicy {
    /// At most this many of the app's machines may be unavailable at once, counting the one
    /// about to stop. Default 1. A machine is unavailable when it should be running and is not
    /// ready: it is `starting`, `started` with a check not passing, `failed`, or `stopped` by
    /// itself (it exited or crashed). A machine stopped on purpose (`ferry machine stop`) or
    /// never started does not count, so idle machines never block their app's moves or a drain.
    pub max_unavailable: u32,
    /// A moved machine must have been ready this long before the migration is done (and the next
    /// one of the app may start): running, with every check passing if it has checks. One that
    /// exits before rolls back at once. Milliseconds; default 10 s (as Nomad's migrate block).
    pub min_healthy_time_ms: u64,
    /// If the moved machine is not healthy this long after its start, the migration rolls back.
    pub healthy_deadline_ms: u64,
    /// Between the notice (event, webhook) and the stop.
    pub notice_period_ms: u64,
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key for the webhook's `X-Ferry-Signature` (never shown back).
    #[serde(skip_serializing, default)]
    pub webhook_secret: Option<String>,
    #[serde(default)]
    pub webhook_secret_set: bool,
    /// How long a migrated machine's source volume is kept (`pending_destroy`).
    pub volume_retention_ms: u64,
}

impl Default for MigratePolicy {
    fn default() -> Self {
        MigratePolicy {
            max_unavailable: 1,
            min_healthy_time_ms: 10_000,
            healthy_deadline_ms: 60_000,
            notice_period_ms: 0,
            webhook_url: None,
            webhook_secret: None,
            webhook_secret_set: false,
            volume_retention_ms: 24 * 3600 * 1000,
        }
    }
}

/// `PUT`-like update of an app's policy: only the given fields change. Durations are strings
/// like "10s", "1m", "250ms".
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    pub max_unavailable: Option<u32>,
    pub min_healthy_time: Option<String>,
    pub healthy_deadline: Option<String>,
    pub notice_period: Option<String>,
    /// An http:// or https:// URL; "" removes the webhook.
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub volume_retention: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination host ID (hex); default: the least-loaded other uncordoned host.
    pub to: Option<String>,
    /// Copy volumes while the machine runs (default true); false: stop, copy all, start.
    pub precopy: Option<bool>,
}

fn yes() -> bool {
    true
}

/// A previous instance of a machine (e.g. the one a migration replaced).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstanceRecord {
    pub instance_id: String,
    pub host: String,
    pub private_ip: String,
    /// `migrated`, or `rolled_back` for a destination instance a rollback abandoned.
    pub state: String,
    pub ended_at: String,
    pub migration: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DrainView {
    pub host: String,
    pub cordoned: bool,
    pub migrations: Vec<String>,
    /// Machines not moved, with the reason.
    pub skipped: Vec<(String, String)>,
}

// ---- records ----------------------------------------------------------------------------------

/// The store's typed record of a migration: the fields it indexes, and the rest as detail.
pub(crate) fn record(m: &Migration) -> Result<ferry_store::MigrationRecord> {
    let mut stored = m.clone();
    stored.progress = None;
    Ok(ferry_store::MigrationRecord {
        id: m.id.clone(),
        machine_id: m.machine_id.clone(),
        app: m.app.clone(),
        network_id: m.network_id,
        phase: m.phase.as_str().into(),
        finished: m.phase.finished(),
        drain: m.drain.clone(),
        detail: serde_json::to_value(&stored).map_err(Error::internal)?,
        revision: m.revision,
        created_at_ms: m.created_at_ms,
        updated_at_ms: m.updated_at_ms,
    })
}

fn from_record(r: ferry_store::MigrationRecord) -> Result<Migration> {
    let mut m: Migration = serde_json::from_value(r.detail).map_err(Error::internal)?;
    m.revision = r.revision;
    Ok(m)
}

fn load(core: &Core, id: &str) -> Result<Migration> {
    from_record(core.store.get_migration(id)?)
}

/// Writes the migration if nobody else changed it since it was read (compare-and-swap on its
/// revision); a conflict otherwise, and nothing is written.
/// An event that [`record_event`] left pending goes into the same write: both or neither.
fn save(core: &Core, m: &mut Migration) -> Result<()> {
    m.updated_at_ms = core.store.now_ms();
    let r = core
        .store
        .update_migration_recorded(&record(m)?, m.pending_event.as_ref())?;
    m.revision = r.revision;
    m.pending_event = None;
    Ok(())
}

/// Puts `ev` in the machine's log with the migration's next save: one write for the phase and
/// the record of it instead of two (on etcd each is a round trip through the cluster, and most
/// steps sit on the downtime's path), and a step resumed after a crash cannot log what it did
/// twice. An event still pending is written first.
fn record_event(core: &Core, m: &mut Migration, ev: ferry_store::NewEvent) -> Result<()> {
    if let Some(ev) = m.pending_event.take() {
        core.store.add_event(
            &m.machine_id,
            &ev.r#type,
            &ev.status,
            &ev.source,
            ev.request,
        )?;
    }
    m.pending_event = Some(ev);
    Ok(())
}

fn list_where(core: &Core, f: ferry_store::MigrationFilter<'_>) -> Result<Vec<Migration>> {
    core.store
        .list_migrations(f)?
        .into_iter()
        .map(from_record)
        .collect()
}

pub fn load_policy(core: &Core, app: &str) -> Result<MigratePolicy> {
    Ok(load_policy_rev(core, app)?.0)
}

/// The app's policy (webhook secret included) and the revision it was read at (0: none stored).
fn load_policy_rev(core: &Core, app: &str) -> Result<(MigratePolicy, u64)> {
    match core.store.get_policy(app)? {
        Some(r) => Ok((
            serde_json::from_value(r.detail).map_err(Error::internal)?,
            r.revision,
        )),
        None => Ok((MigratePolicy::default(), 0)),
    }
}

fn endpoint(core: &Core, host: &str) -> Result<String> {
    // From the hosts' cache: each step calls an agent or two, and on etcd a read is a round
    // trip. A host that registered again moments ago may still show its old endpoint here;
    // the call then fails and the step is retried with the new one.
    let h = crate::cache::host(core, parse_host(host)?)?;
    if h.endpoint.is_empty() {
        return Err(Error::unavailable(format!(
            "the agent of host {host} is not registered"
        )));
    }
    Ok(h.endpoint)
}

/// What this server process knows of the migrations it drives (not durable: the store has
/// everything that must survive; this is per process, so two servers in one test or one process
/// never see each other's).
#[derive(Default)]
pub struct InFlight {
    /// Live copy progress per migration: only ever a view of a running round.
    pub(crate) progress: Arc<Mutex<HashMap<String, VolumeProgress>>>,
    /// Migrations that have a driver here.
    pub(crate) driving: Mutex<HashSet<String>>,
    /// What the heartbeat refreshes for each of them (see `driver::heartbeat`).
    pub(crate) held: Mutex<HashMap<String, driver::Held>>,
    /// Whether this server's heartbeat runs.
    pub(crate) heartbeat: std::sync::OnceLock<()>,
    /// Per network: woken when a migration driven here releases the network's lock, so the
    /// next one of that network starts at once instead of at its next poll.
    network_freed: Mutex<HashMap<u32, Arc<tokio::sync::Notify>>>,
}

impl InFlight {
    /// What a migration waiting for `network`'s lock waits on.
    pub(crate) fn network_notify(&self, network: u32) -> Arc<tokio::sync::Notify> {
        self.network_freed
            .lock()
            .unwrap()
            .entry(network)
            .or_default()
            .clone()
    }
}

// ---- API --------------------------------------------------------------------------------------

/// Starts a migration of the machine and answers at once; the driver moves it from then on.
pub fn migrate_machine(
    core: &Arc<Core>,
    app: &str,
    id: &str,
    lease: Option<&str>,
    req: MigrateRequest,
) -> Result<Migration> {
    let m = machine_of(core, app, id)?;
    core.store.check_lease(id, lease)?;
    let to = req.to.as_deref().map(parse_host).transpose()?;
    let mut mig = create(core, &m, to, None)?;
    if req.precopy == Some(false) {
        mig.precopy = false;
        save(core, &mut mig)?;
    }
    spawn_driver(core.clone(), mig.id.clone());
    Ok(mig)
}

/// Refuses a machine that cannot move now: only started or stopped machines migrate.
pub(crate) fn movable(m: &Machine) -> Result<()> {
    if !matches!(m.state, S::Started | S::Stopped) {
        return Err(Error::conflict(
            "machine_not_movable",
            format!(
                "machine {} is {}: only started or stopped machines migrate",
                m.id,
                m.state.as_str()
            ),
        ));
    }
    Ok(())
}

/// The host `m` would move from, with `to` (if given) checked as its destination: another host,
/// not cordoned.
pub(crate) fn move_from(core: &Core, m: &Machine, to: Option<HostId>) -> Result<HostId> {
    let from = m
        .host
        .ok_or_else(|| Error::conflict("not_placed", format!("machine {} has no host", m.id)))?;
    if let Some(t) = to {
        let h = core.store.get_host(t)?;
        if t == from {
            return Err(Error::conflict(
                "same_host",
                format!("machine {} already runs on host {}", m.id, host_hex(t)),
            ));
        }
        if h.cordoned {
            return Err(Error::conflict(
                "host_cordoned",
                format!("host {} is cordoned (draining)", host_hex(t)),
            ));
        }
    }
    Ok(from)
}

/// Validates and records a new migration of `m` (phase `pending`).
fn create(
    core: &Core,
    m: &Machine,
    to: Option<HostId>,
    drain: Option<String>,
) -> Result<Migration> {
    validate_machine_id(&m.id)?;
    movable(m)?;
    let from = move_from(core, m, to)?;
    // One migration per machine at a time: the store records it as the machine's active one in
    // the same step, or refuses (migration_in_progress) if the machine has one.
    let result = (|| {
        let now = core.store.now_ms();
        let mut mig = Migration {
            id: format!("mig_{}", random_hex(8)),
            machine_id: m.id.clone(),
            app: m.app.clone(),
            network_id: m.network_id.get(),
            phase: Phase::Pending,
            from_host: host_hex(from),
            to_host: to.map(host_hex).unwrap_or_default(),
            old_instance_id: m.instance_id.clone(),
            old_ip: m.private_ip.clone().unwrap_or_default(),
            old_field: m.machine_field.map(|f| f.0).unwrap_or_default(),
            new_instance_id: String::new(),
            new_ip: String::new(),
            new_field: 0,
            was_running: m.state == S::Started,
            precopy: true,
            volumes: Vec::new(),
            error: None,
            rollback_from: None,
            drain,
            stats: MigrationStats::default(),
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
            lock_nonce: None,
            notice_at_ms: None,
            launch_recorded: false,
            retries: 0,
            progress: None,
            revision: 0,
            pending_event: None,
        };
        mig.revision = core.store.create_migration(&record(&mig)?)?.revision;
        core.store.add_event(
            &m.id,
            "migrate",
            "pending",
            "user",
            crate::auth::stamp(serde_json::json!({"migration": mig.id, "to": mig.to_host})),
        )?;
        Ok(mig)
    })();
    result
}

/// Migrations, oldest first: of one machine, of one host's drain, or all.
pub fn list(
    core: &Core,
    caller: &Caller,
    machine: Option<&str>,
    drain: Option<&str>,
) -> Result<Vec<Migration>> {
    // An org token sees its own network's migrations only; a drain is an admin's affair, and
    // filtering by one shows an org its machines that a drain moves.
    let confined = crate::auth::network(core, caller)?;
    let filter = match (machine, drain) {
        (Some(m), _) => ferry_store::MigrationFilter::Machine(m),
        (None, Some(d)) => ferry_store::MigrationFilter::Drain(d),
        (None, None) => ferry_store::MigrationFilter::All,
    };
    let mut out = Vec::new();
    for m in list_where(core, filter)? {
        if machine.is_some_and(|x| x != m.machine_id)
            || drain.is_some_and(|d| m.drain.as_deref() != Some(d))
            || !crate::auth::sees_network(confined, m.network_id)
        {
            continue;
        }
        out.push(with_progress(core, m));
    }
    Ok(out)
}

fn with_progress(core: &Core, mut m: Migration) -> Migration {
    m.progress = core.migrations.progress.lock().unwrap().get(&m.id).cloned();
    m.lock_nonce = None;
    m.volumes.iter_mut().for_each(|v| v.token.clear());
    m
}

/// One migration, with its live copy progress if this process drives it.
pub fn get(core: &Core, caller: &Caller, id: &str) -> Result<Migration> {
    let confined = crate::auth::network(core, caller)?;
    if !id.starts_with("mig_") || id.len() != 20 || !id[4..].bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(Error::invalid(format!(
            "{id:?} is not a migration ID (mig_ + 16 hex)"
        )));
    }
    let m = load(core, id)?;
    if !crate::auth::sees_network(confined, m.network_id) {
        // Another org's migration is one that does not exist: the store's own words for that.
        return Err(ferry_store::StoreError::NotFound {
            kind: "migration",
            id: id.to_owned(),
        }
        .into());
    }
    Ok(with_progress(core, m))
}

/// The app's migration policy.
pub fn get_policy(core: &Core, app: &str) -> Result<MigratePolicy> {
    core.store.get_app(app)?;
    load_policy(core, app)
}

fn parse_duration(what: &str, s: &str, max: Duration) -> Result<u64> {
    let d = humantime::parse_duration(s)
        .map_err(|_| Error::invalid(format!("{what} {s:?} is not a duration like \"10s\"")))?;
    if d > max {
        return Err(Error::invalid(format!(
            "{what} {s:?} is over the maximum of {}",
            humantime::format_duration(max)
        )));
    }
    Ok(d.as_millis() as u64)
}

/// Changes the given fields of the app's policy; everything is checked before any is stored.
pub fn set_policy(core: &Core, app: &str, req: PolicyUpdate) -> Result<MigratePolicy> {
    core.store.get_app(app)?;
    let (mut p, revision) = load_policy_rev(core, app)?;
    if let Some(n) = req.max_unavailable {
        if !(1..=10_000).contains(&n) {
            return Err(Error::invalid("max_unavailable must be 1..=10000"));
        }
        p.max_unavailable = n;
    }
    let hour = Duration::from_secs(3600);
    if let Some(s) = &req.min_healthy_time {
        p.min_healthy_time_ms = parse_duration("min_healthy_time", s, hour)?;
    }
    if let Some(s) = &req.healthy_deadline {
        p.healthy_deadline_ms = parse_duration("healthy_deadline", s, hour)?;
        if p.healthy_deadline_ms == 0 {
            return Err(Error::invalid("healthy_deadline must be above zero"));
        }
    }
    if let Some(s) = &req.notice_period {
        p.notice_period_ms = parse_duration("notice_period", s, hour)?;
    }
    if let Some(s) = &req.volume_retention {
        p.volume_retention_ms =
            parse_duration("volume_retention", s, Duration::from_secs(90 * 24 * 3600))?;
    }
    if let Some(u) = &req.webhook_url {
        if u.is_empty() {
            p.webhook_url = None;
        } else {
            let ok = (u.starts_with("http://") || u.starts_with("https://"))
                && u.len() <= 2048
                && url::Url::parse(u).is_ok_and(|x| x.host().is_some());
            if !ok {
                return Err(Error::invalid(format!(
                    "webhook_url {u:?} is not an http:// or https:// URL with a host"
                )));
            }
            p.webhook_url = Some(u.clone());
        }
    }
    if let Some(s) = &req.webhook_secret {
        if !(16..=256).contains(&s.len()) {
            return Err(Error::invalid("webhook_secret must be 16..=256 bytes"));
        }
        p.webhook_secret = Some(s.clone());
    }
    if p.min_healthy_time_ms >= p.healthy_deadline_ms {
        return Err(Error::invalid(
            "min_healthy_time must be shorter than healthy_deadline",
        ));
    }
    p.webhook_secret_set = p.webhook_secret.is_some();
    // The secret is not shown back, so it is stored separately from what GET returns.
    let mut stored = serde_json::to_value(&p).map_err(Error::internal)?;
    stored["webhook_secret"] = serde_json::json!(p.webhook_secret);
    // Compare-and-swap: a concurrent change of the same policy is a conflict, not a lost update.
    core.store.put_policy(&ferry_store::PolicyRecord {
        app: app.to_owned(),
        detail: stored,
        revision,
    })?;
    Ok(p)
}

/// Drains a host: cordon, then a migration for every machine on it. Within a network they run
/// one at a time (the network lock), each waiting for its machine to be healthy for the app's
/// `min_healthy_time` before the next starts; networks proceed in parallel.
pub fn drain(core: &Arc<Core>, host: &str) -> Result<DrainView> {
    let id = parse_host(host)?;
    core.store.get_host(id)?;
    let others = core
        .store
        .list_hosts()?
        .into_iter()
        .filter(|h| h.id != id && !h.cordoned)
        .count();
    if others == 0 {
        return Err(Error::conflict(
            "no_destination",
            format!("no other uncordoned host to move host {host}'s machines to"),
        ));
    }
    core.store.set_cordoned(id, true)?;
    core.cache.hosts_changed();
    let mut view = DrainView {
        host: host_hex(id),
        cordoned: true,
        migrations: Vec::new(),
        skipped: Vec::new(),
    };
    for m in core.store.list_machines_on_host(id)? {
        match create(core, &m, None, Some(host_hex(id))) {
            Ok(mig) => {
                spawn_driver(core.clone(), mig.id.clone());
                view.migrations.push(mig.id);
            }
            Err(e) => view.skipped.push((m.id.clone(), e.message)),
        }
    }
    Ok(view)
}

/// Drives every unfinished migration (after a server restart), and expires volumes from then on.
pub fn resume_unfinished(core: &Arc<Core>) {
    // Now and from then on: a migration whose server died (its claim expired) is taken over by
    // whichever server claims it first; the others' drivers see the claim held and stop at once.
    let c = core.clone();
    tokio::spawn(async move {
        loop {
            for m in list_where(&c, ferry_store::MigrationFilter::Unfinished).unwrap_or_default() {
                spawn_driver(c.clone(), m.id);
            }
            tokio::time::sleep(TAKEOVER_SCAN).await;
        }
    });
    let c = core.clone();
    tokio::spawn(async move {
        loop {
            expire_volumes(&c).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
}

/// Marks a volume as kept for `retention_ms` from `now_ms`, then destroyed (by
/// [`expire_volumes`]).
fn mark_pending_destroy(v: &mut VolumeView, now_ms: i64, retention_ms: u64) {
    let after = now_ms + retention_ms as i64;
    v.state = "pending_destroy".into();
    v.destroy_after_ms = Some(after);
    v.destroy_after = Some(rfc3339(after));
}

/// Deletes the source volumes whose retention ran out (best effort; retried on the next call).
pub async fn expire_volumes(core: &Core) {
    let now = core.store.now_ms();
    for mut v in volumes(core, Some("pending_destroy")).unwrap_or_default() {
        if v.state != "pending_destroy" || v.destroy_after_ms.is_none_or(|t| t > now) {
            continue;
        }
        let removed = match &v.host {
            Some(h) => match endpoint(core, h) {
                Ok(ep) => core
                    .agents
                    .volume_remove(
                        &ep,
                        &VolumeRemove {
                            dir: v.host_dir.clone(),
                        },
                    )
                    .await
                    .is_ok(),
                Err(_) => false,
            },
            // Only what the server itself created (never an operator's host_dir volume).
            None if v.size_mb.is_some()
                && std::path::Path::new(&v.host_dir).starts_with(&core.volumes_dir) =>
            {
                std::fs::remove_dir_all(&v.host_dir).is_ok()
                    || !std::path::Path::new(&v.host_dir).exists()
            }
            None => true,
        };
        if removed {
            v.state = "destroyed".into();
            let _ = put_volume(core, &v);
        }
    }
}

pub fn instances(core: &Core, machine: &str) -> Vec<InstanceRecord> {
    core.store
        .list_instances(machine)
        .unwrap_or_default()
        .into_iter()
        .map(|r| InstanceRecord {
            instance_id: r.instance_id,
            host: r.host,
            private_ip: r.private_ip,
            state: r.state,
            ended_at: r.ended_at,
            migration: r.migration,
        })
        .collect()
}

/// Appends to the machine's instance history (idempotent: a resumed migration repeats it).
fn add_instance(core: &Core, machine: &str, rec: InstanceRecord) -> Result<()> {
    core.store.append_instance(&ferry_store::InstanceRecord {
        machine_id: machine.to_owned(),
        instance_id: rec.instance_id,
        host: rec.host,
        private_ip: rec.private_ip,
        state: rec.state,
        ended_at: rec.ended_at,
        migration: rec.migration,
    })?;
    Ok(())
}

mod driver;
pub mod preview;
pub use driver::spawn_driver;

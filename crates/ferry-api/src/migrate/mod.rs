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

use crate::config::{validate_machine_id, MachineConfig};
use crate::doc::{
    AgentFailed, AppPath, BadRequest, Conflict, HostPath, MachinePath, MigrationPath, NotFound,
    ServerFailed, Unprocessable,
};
use crate::error::ApiError;
use crate::proto::{VolumeProgress, VolumeRemove};
use crate::server::{self, parse_host, random_hex, Body, Ctx, Path, Query};
use crate::views::{rfc3339, CordonView, VolumeView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_addr::HostId;
use ferry_store::{Machine, MachineState as S, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use utoipa::ToSchema;

type Result<T> = std::result::Result<T, ApiError>;
type Shared = State<Arc<Ctx>>;

/// How long the per-network lock lives without a refresh (a dead coordinator's lock expires).
const LOCK_TTL_MS: u64 = 15_000;
/// How long a server's claim on driving a migration outlives its last heartbeat: the longest a
/// migration waits for another server to take it over after its server died.
pub const CLAIM_TTL_MS: u64 = 5_000;
/// How often every server looks for unfinished migrations nobody drives.
const TAKEOVER_SCAN: Duration = Duration::from_secs(1);
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
        detail: serde_json::to_value(&stored).map_err(ApiError::internal)?,
        revision: m.revision,
        created_at_ms: m.created_at_ms,
        updated_at_ms: m.updated_at_ms,
    })
}

fn from_record(r: ferry_store::MigrationRecord) -> Result<Migration> {
    let mut m: Migration = serde_json::from_value(r.detail).map_err(ApiError::internal)?;
    m.revision = r.revision;
    Ok(m)
}

fn load(ctx: &Ctx, id: &str) -> Result<Migration> {
    from_record(ctx.store.get_migration(id)?)
}

/// Writes the migration if nobody else changed it since it was read (compare-and-swap on its
/// revision); a conflict otherwise, and nothing is written.
fn save(ctx: &Ctx, m: &mut Migration) -> Result<()> {
    m.updated_at_ms = ctx.store.now_ms();
    let r = ctx.store.update_migration(&record(m)?)?;
    m.revision = r.revision;
    Ok(())
}

fn list_where(ctx: &Ctx, f: ferry_store::MigrationFilter<'_>) -> Result<Vec<Migration>> {
    ctx.store
        .list_migrations(f)?
        .into_iter()
        .map(from_record)
        .collect()
}

pub fn load_policy(ctx: &Ctx, app: &str) -> Result<MigratePolicy> {
    Ok(load_policy_rev(ctx, app)?.0)
}

/// The app's policy (webhook secret included) and the revision it was read at (0: none stored).
fn load_policy_rev(ctx: &Ctx, app: &str) -> Result<(MigratePolicy, u64)> {
    match ctx.store.get_policy(app)? {
        Some(r) => Ok((
            serde_json::from_value(r.detail).map_err(ApiError::internal)?,
            r.revision,
        )),
        None => Ok((MigratePolicy::default(), 0)),
    }
}

fn host_hex(h: HostId) -> String {
    format!("{:x}", h.get())
}

fn endpoint(ctx: &Ctx, host: &str) -> Result<String> {
    let h = ctx.store.get_host(parse_host(host)?)?;
    if h.endpoint.is_empty() {
        return Err(ApiError::unavailable(format!(
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
}

// ---- API --------------------------------------------------------------------------------------

/// `POST /v1/apps/{app}/machines/{id}/migrate`: starts a migration and answers at once (202);
/// follow it with `GET /v1/migrations/{id}`.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/migrate", tag = "migrations", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), request_body(content = Option<MigrateRequest>, description = "Optional: the destination host and options."), responses((status = 202, description = "The migration, started; follow it at /v1/migrations/{id}.", body = Migration, links(("GetMigration" = (operation_id = "get_migration", parameters(("id" = "$response.body#/id")))))), BadRequest, NotFound, Conflict, Unprocessable, AgentFailed, ServerFailed))]
pub async fn migrate_machine(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Migration>)> {
    let req: MigrateRequest = if body.iter().all(|c| c.is_ascii_whitespace()) {
        MigrateRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("malformed request body: {e}")))?
    };
    let m = server::machine_of(&ctx, &app, &id)?;
    ctx.store.check_lease(&id, server::lease_nonce(&headers))?;
    let to = req.to.as_deref().map(parse_host).transpose()?;
    let mut mig = create(&ctx, &m, to, None)?;
    if req.precopy == Some(false) {
        mig.precopy = false;
        save(&ctx, &mut mig)?;
    }
    spawn_driver(ctx.clone(), mig.id.clone());
    Ok((StatusCode::ACCEPTED, Json(mig)))
}

/// Validates and records a new migration of `m` (phase `pending`).
fn create(ctx: &Ctx, m: &Machine, to: Option<HostId>, drain: Option<String>) -> Result<Migration> {
    validate_machine_id(&m.id)?;
    if !matches!(m.state, S::Started | S::Stopped) {
        return Err(ApiError::conflict(
            "machine_not_movable",
            format!(
                "machine {} is {}: only started or stopped machines migrate",
                m.id,
                m.state.as_str()
            ),
        ));
    }
    let from = m
        .host
        .ok_or_else(|| ApiError::conflict("not_placed", format!("machine {} has no host", m.id)))?;
    if let Some(t) = to {
        let h = ctx.store.get_host(t)?;
        if t == from {
            return Err(ApiError::conflict(
                "same_host",
                format!("machine {} already runs on host {}", m.id, host_hex(t)),
            ));
        }
        if h.cordoned {
            return Err(ApiError::conflict(
                "host_cordoned",
                format!("host {} is cordoned (draining)", host_hex(t)),
            ));
        }
    }
    // One migration per machine at a time: the store records it as the machine's active one in
    // the same step, or refuses (migration_in_progress) if the machine has one.
    let result = (|| {
        let now = ctx.store.now_ms();
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
        };
        mig.revision = ctx.store.create_migration(&record(&mig)?)?.revision;
        ctx.store.add_event(
            &m.id,
            "migrate",
            "pending",
            "user",
            serde_json::json!({"migration": mig.id, "to": mig.to_host}),
        )?;
        Ok(mig)
    })();
    result
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this machine's migrations.
    machine: Option<String>,
    /// Only the migrations of this host's drain (the host's ID).
    drain: Option<String>,
}

/// `GET /v1/migrations`: newest last.
#[utoipa::path(get, path = "/v1/migrations", operation_id = "list_migrations", tag = "migrations", params(ListQuery), responses((status = 200, description = "Migrations, oldest first.", body = [Migration]), BadRequest, ServerFailed))]
pub async fn list(State(ctx): Shared, Query(q): Query<ListQuery>) -> Result<Json<Vec<Migration>>> {
    let filter = match (&q.machine, &q.drain) {
        (Some(m), _) => ferry_store::MigrationFilter::Machine(m),
        (None, Some(d)) => ferry_store::MigrationFilter::Drain(d),
        (None, None) => ferry_store::MigrationFilter::All,
    };
    let mut out = Vec::new();
    for m in list_where(&ctx, filter)? {
        if q.machine.as_ref().is_some_and(|x| *x != m.machine_id)
            || q.drain
                .as_ref()
                .is_some_and(|d| m.drain.as_ref() != Some(d))
        {
            continue;
        }
        out.push(with_progress(&ctx, m));
    }
    Ok(Json(out))
}

fn with_progress(ctx: &Ctx, mut m: Migration) -> Migration {
    m.progress = ctx.migrations.progress.lock().unwrap().get(&m.id).cloned();
    m.lock_nonce = None;
    m.volumes.iter_mut().for_each(|v| v.token.clear());
    m
}

/// `GET /v1/migrations/{id}`.
#[utoipa::path(get, path = "/v1/migrations/{id}", operation_id = "get_migration", tag = "migrations", params(MigrationPath), responses((status = 200, body = Migration), BadRequest, NotFound, ServerFailed))]
pub async fn get(State(ctx): Shared, Path(id): Path<String>) -> Result<Json<Migration>> {
    if !id.starts_with("mig_") || id.len() != 20 || !id[4..].bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(ApiError::invalid(format!(
            "{id:?} is not a migration ID (mig_ + 16 hex)"
        )));
    }
    Ok(Json(with_progress(&ctx, load(&ctx, &id)?)))
}

/// `GET /v1/apps/{app}/policy`.
#[utoipa::path(get, path = "/v1/apps/{app}/policy", tag = "migrations", params(AppPath), responses((status = 200, body = MigratePolicy), BadRequest, NotFound, ServerFailed))]
pub async fn get_policy(
    State(ctx): Shared,
    Path(app): Path<String>,
) -> Result<Json<MigratePolicy>> {
    ctx.store.get_app(&app)?;
    Ok(Json(load_policy(&ctx, &app)?))
}

fn parse_duration(what: &str, s: &str, max: Duration) -> Result<u64> {
    let d = humantime::parse_duration(s)
        .map_err(|_| ApiError::invalid(format!("{what} {s:?} is not a duration like \"10s\"")))?;
    if d > max {
        return Err(ApiError::invalid(format!(
            "{what} {s:?} is over the maximum of {}",
            humantime::format_duration(max)
        )));
    }
    Ok(d.as_millis() as u64)
}

/// `POST /v1/apps/{app}/policy`: changes the given fields; everything is checked before any is
/// stored.
#[utoipa::path(post, path = "/v1/apps/{app}/policy", tag = "migrations", params(AppPath), request_body = PolicyUpdate, responses((status = 200, description = "The policy now in force.", body = MigratePolicy), BadRequest, NotFound, ServerFailed))]
pub async fn set_policy(
    State(ctx): Shared,
    Path(app): Path<String>,
    Body(req): Body<PolicyUpdate>,
) -> Result<Json<MigratePolicy>> {
    ctx.store.get_app(&app)?;
    let (mut p, revision) = load_policy_rev(&ctx, &app)?;
    if let Some(n) = req.max_unavailable {
        if !(1..=10_000).contains(&n) {
            return Err(ApiError::invalid("max_unavailable must be 1..=10000"));
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
            return Err(ApiError::invalid("healthy_deadline must be above zero"));
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
                && reqwest::Url::parse(u).is_ok_and(|x| x.host().is_some());
            if !ok {
                return Err(ApiError::invalid(format!(
                    "webhook_url {u:?} is not an http:// or https:// URL with a host"
                )));
            }
            p.webhook_url = Some(u.clone());
        }
    }
    if let Some(s) = &req.webhook_secret {
        if !(16..=256).contains(&s.len()) {
            return Err(ApiError::invalid("webhook_secret must be 16..=256 bytes"));
        }
        p.webhook_secret = Some(s.clone());
    }
    if p.min_healthy_time_ms >= p.healthy_deadline_ms {
        return Err(ApiError::invalid(
            "min_healthy_time must be shorter than healthy_deadline",
        ));
    }
    p.webhook_secret_set = p.webhook_secret.is_some();
    // The secret is not shown back, so it is stored separately from what GET returns.
    let mut stored = serde_json::to_value(&p).map_err(ApiError::internal)?;
    stored["webhook_secret"] = serde_json::json!(p.webhook_secret);
    // Compare-and-swap: a concurrent change of the same policy is a conflict, not a lost update.
    ctx.store.put_policy(&ferry_store::PolicyRecord {
        app: app.clone(),
        detail: stored,
        revision,
    })?;
    Ok(Json(p))
}

/// `POST /v1/hosts/{id}/cordon` and `/uncordon`.
#[utoipa::path(post, path = "/v1/hosts/{id}/cordon", tag = "hosts", params(HostPath), responses((status = 200, description = "The host takes no new machines.", body = CordonView), BadRequest, NotFound, ServerFailed))]
pub async fn cordon(State(ctx): Shared, Path(host): Path<String>) -> Result<Json<CordonView>> {
    let h = ctx.store.set_cordoned(parse_host(&host)?, true)?;
    Ok(Json(CordonView {
        host: host_hex(h.id),
        cordoned: h.cordoned,
    }))
}

#[utoipa::path(post, path = "/v1/hosts/{id}/uncordon", tag = "hosts", params(HostPath), responses((status = 200, description = "The host takes machines again.", body = CordonView), BadRequest, NotFound, ServerFailed))]
pub async fn uncordon(State(ctx): Shared, Path(host): Path<String>) -> Result<Json<CordonView>> {
    let h = ctx.store.set_cordoned(parse_host(&host)?, false)?;
    Ok(Json(CordonView {
        host: host_hex(h.id),
        cordoned: h.cordoned,
    }))
}

/// `POST /v1/hosts/{id}/drain`: cordon, then a migration for every machine on the host. Within a
/// network they run one at a time (the network lock), each waiting for its machine to be healthy
/// for the app's `min_healthy_time` before the next starts; networks proceed in parallel.
#[utoipa::path(post, path = "/v1/hosts/{id}/drain", tag = "hosts", params(HostPath), responses((status = 202, description = "The host is cordoned and its machines are moving.", body = DrainView), BadRequest, NotFound, Conflict, ServerFailed))]
pub async fn drain(
    State(ctx): Shared,
    Path(host): Path<String>,
) -> Result<(StatusCode, Json<DrainView>)> {
    let id = parse_host(&host)?;
    ctx.store.get_host(id)?;
    let others = ctx
        .store
        .list_hosts()?
        .into_iter()
        .filter(|h| h.id != id && !h.cordoned)
        .count();
    if others == 0 {
        return Err(ApiError::conflict(
            "no_destination",
            format!("no other uncordoned host to move host {host}'s machines to"),
        ));
    }
    ctx.store.set_cordoned(id, true)?;
    let mut view = DrainView {
        host: host_hex(id),
        cordoned: true,
        migrations: Vec::new(),
        skipped: Vec::new(),
    };
    for m in ctx.store.list_machines_on_host(id)? {
        match create(&ctx, &m, None, Some(host_hex(id))) {
            Ok(mig) => {
                spawn_driver(ctx.clone(), mig.id.clone());
                view.migrations.push(mig.id);
            }
            Err(e) => view.skipped.push((m.id.clone(), e.message)),
        }
    }
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Drives every unfinished migration (after a server restart), and expires volumes from then on.
pub fn resume_unfinished(ctx: &Arc<Ctx>) {
    // Now and from then on: a migration whose server died (its claim expired) is taken over by
    // whichever server claims it first; the others' drivers see the claim held and stop at once.
    let c = ctx.clone();
    tokio::spawn(async move {
        loop {
            for m in list_where(&c, ferry_store::MigrationFilter::Unfinished).unwrap_or_default() {
                spawn_driver(c.clone(), m.id);
            }
            tokio::time::sleep(TAKEOVER_SCAN).await;
        }
    });
    let c = ctx.clone();
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
pub async fn expire_volumes(ctx: &Ctx) {
    let now = ctx.store.now_ms();
    for mut v in server::volumes(ctx, Some("pending_destroy")).unwrap_or_default() {
        if v.state != "pending_destroy" || v.destroy_after_ms.is_none_or(|t| t > now) {
            continue;
        }
        let removed = match &v.host {
            Some(h) => match endpoint(ctx, h) {
                Ok(ep) => ctx
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
                && std::path::Path::new(&v.host_dir).starts_with(&ctx.volumes_dir) =>
            {
                std::fs::remove_dir_all(&v.host_dir).is_ok()
                    || !std::path::Path::new(&v.host_dir).exists()
            }
            None => true,
        };
        if removed {
            v.state = "destroyed".into();
            let _ = server::put_volume(ctx, &v);
        }
    }
}

pub fn instances(ctx: &Ctx, machine: &str) -> Vec<InstanceRecord> {
    ctx.store
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
fn add_instance(ctx: &Ctx, machine: &str, rec: InstanceRecord) -> Result<()> {
    ctx.store.append_instance(&ferry_store::InstanceRecord {
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
pub use driver::spawn_driver;

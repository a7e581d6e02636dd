//! Migration (SPEC §7): move a machine to another host with the same ID, a new instance and a new
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
use crate::error::ApiError;
use crate::proto::{
    VolumeExpect, VolumeExpected, VolumeProgress, VolumeRemove, VolumeRound, VolumeSend,
};
use crate::server::{self, Body, Ctx};
use crate::views::{rfc3339, StopRequest, VolumeView};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use ferry_addr::{FleetAddr, HostId, MachineField};
use ferry_store::{new_instance_id, Machine, MachineState as S, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use utoipa::ToSchema;

type Result<T> = std::result::Result<T, ApiError>;
type Shared = State<Arc<Ctx>>;

/// How long the per-network lock lives without a refresh (a dead coordinator's lock expires).
const LOCK_TTL_MS: u64 = 15_000;
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
}

/// An app's rules for moving its machines.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MigratePolicy {
    /// At most this many of the app's machines may be unavailable (not ready) at once, counting
    /// the one about to stop. Default 1.
    pub max_unavailable: u32,
    /// A moved machine must have been ready this long before the migration is done (and the next
    /// one of the app may start). Milliseconds.
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
            min_healthy_time_ms: 0,
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

fn key(id: &str) -> String {
    format!("migration/{id}")
}

fn load(ctx: &Ctx, id: &str) -> Result<Migration> {
    let raw = ctx
        .store
        .kv_get(&key(id))?
        .ok_or_else(|| ApiError::not_found(format!("migration {id}")))?;
    serde_json::from_str(&raw).map_err(ApiError::internal)
}

fn save(ctx: &Ctx, m: &mut Migration) -> Result<()> {
    m.updated_at_ms = ctx.store.now_ms();
    let mut stored = m.clone();
    stored.progress = None;
    ctx.store.kv_put(
        &key(&m.id),
        &serde_json::to_string(&stored).map_err(ApiError::internal)?,
    )?;
    Ok(())
}

fn ids(ctx: &Ctx) -> Result<Vec<String>> {
    Ok(ctx
        .store
        .kv_get("migrations")?
        .map(|s| serde_json::from_str(&s).unwrap_or_default())
        .unwrap_or_default())
}

pub fn load_policy(ctx: &Ctx, app: &str) -> Result<MigratePolicy> {
    match ctx.store.kv_get(&format!("policy/{app}"))? {
        Some(s) => serde_json::from_str(&s).map_err(ApiError::internal),
        None => Ok(MigratePolicy::default()),
    }
}

fn host_hex(h: HostId) -> String {
    format!("{:x}", h.get())
}

fn parse_host(s: &str) -> Result<HostId> {
    u32::from_str_radix(s, 16)
        .ok()
        .and_then(|v| HostId::new(v).ok())
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "host {s:?} is not a host ID (hex, as `ferry host list` shows)"
            ))
        })
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

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Live copy progress per migration (not durable: it is only ever a view of a running round).
static PROGRESS: LazyLock<Mutex<HashMap<String, VolumeProgress>>> = LazyLock::new(Default::default);
/// Migrations that have a driver in this process.
static DRIVING: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

// ---- API --------------------------------------------------------------------------------------

/// `POST /v1/apps/{app}/machines/{id}/migrate`: starts a migration and answers at once (202);
/// follow it with `GET /v1/migrations/{id}`.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/migrate", request_body = MigrateRequest,
    responses((status = 202, body = Migration), (status = 409, body = crate::error::ErrorBody), (status = 400, body = crate::error::ErrorBody)))]
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
    // One migration per machine at a time. The check and the write are under a short lock so two
    // concurrent requests cannot both pass the check.
    let guard = format!("migrate/machine/{}", m.id);
    let lock = ctx.store.acquire_lock(&guard, 5_000, "api").map_err(|_| {
        ApiError::conflict(
            "migration_in_progress",
            "a migration of this machine is being created",
        )
    })?;
    let result = (|| {
        if let Some(active) = ctx.store.kv_get(&format!("migrating/{}", m.id))? {
            if load(ctx, &active).is_ok_and(|a| !a.phase.finished()) {
                return Err(ApiError::conflict(
                    "migration_in_progress",
                    format!("machine {} is already migrating ({active})", m.id),
                ));
            }
        }
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
        };
        save(ctx, &mut mig)?;
        let mut all = ids(ctx)?;
        all.push(mig.id.clone());
        ctx.store.kv_put(
            "migrations",
            &serde_json::to_string(&all).map_err(ApiError::internal)?,
        )?;
        ctx.store.kv_put(&format!("migrating/{}", m.id), &mig.id)?;
        ctx.store.add_event(
            &m.id,
            "migrate",
            "pending",
            "user",
            serde_json::json!({"migration": mig.id, "to": mig.to_host}),
        )?;
        Ok(mig)
    })();
    let _ = ctx.store.release_lock(&guard, &lock.nonce);
    result
}

#[derive(Deserialize)]
pub struct ListQuery {
    machine: Option<String>,
    drain: Option<String>,
}

/// `GET /v1/migrations`: newest last.
#[utoipa::path(get, path = "/v1/migrations", responses((status = 200, body = [Migration])))]
pub async fn list(State(ctx): Shared, Query(q): Query<ListQuery>) -> Result<Json<Vec<Migration>>> {
    let mut out = Vec::new();
    for id in ids(&ctx)? {
        let m = load(&ctx, &id)?;
        if q.machine.as_ref().is_some_and(|x| *x != m.machine_id)
            || q.drain
                .as_ref()
                .is_some_and(|d| m.drain.as_ref() != Some(d))
        {
            continue;
        }
        out.push(with_progress(m));
    }
    Ok(Json(out))
}

fn with_progress(mut m: Migration) -> Migration {
    m.progress = PROGRESS.lock().unwrap().get(&m.id).cloned();
    m.lock_nonce = None;
    m.volumes.iter_mut().for_each(|v| v.token.clear());
    m
}

/// `GET /v1/migrations/{id}`.
#[utoipa::path(get, path = "/v1/migrations/{id}", responses((status = 200, body = Migration), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(State(ctx): Shared, Path(id): Path<String>) -> Result<Json<Migration>> {
    if !id.starts_with("mig_") || id.len() != 20 || !id[4..].bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(ApiError::invalid(format!(
            "{id:?} is not a migration ID (mig_ + 16 hex)"
        )));
    }
    Ok(Json(with_progress(load(&ctx, &id)?)))
}

/// `GET /v1/apps/{app}/policy`.
#[utoipa::path(get, path = "/v1/apps/{app}/policy", responses((status = 200, body = MigratePolicy)))]
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
#[utoipa::path(post, path = "/v1/apps/{app}/policy", request_body = PolicyUpdate,
    responses((status = 200, body = MigratePolicy), (status = 400, body = crate::error::ErrorBody)))]
pub async fn set_policy(
    State(ctx): Shared,
    Path(app): Path<String>,
    Body(req): Body<PolicyUpdate>,
) -> Result<Json<MigratePolicy>> {
    ctx.store.get_app(&app)?;
    let mut p = load_policy(&ctx, &app)?;
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
    ctx.store
        .kv_put(&format!("policy/{app}"), &stored.to_string())?;
    Ok(Json(p))
}

/// `POST /v1/hosts/{id}/cordon` and `/uncordon`.
#[utoipa::path(post, path = "/v1/hosts/{id}/cordon", responses((status = 200), (status = 404, body = crate::error::ErrorBody)))]
pub async fn cordon(
    State(ctx): Shared,
    Path(host): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let h = ctx.store.set_cordoned(parse_host(&host)?, true)?;
    Ok(Json(
        serde_json::json!({"host": host_hex(h.id), "cordoned": true}),
    ))
}

#[utoipa::path(post, path = "/v1/hosts/{id}/uncordon", responses((status = 200), (status = 404, body = crate::error::ErrorBody)))]
pub async fn uncordon(
    State(ctx): Shared,
    Path(host): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let h = ctx.store.set_cordoned(parse_host(&host)?, false)?;
    Ok(Json(
        serde_json::json!({"host": host_hex(h.id), "cordoned": false}),
    ))
}

/// `POST /v1/hosts/{id}/drain`: cordon, then a migration for every machine on the host. Within a
/// network they run one at a time (the network lock), each waiting for its machine to be healthy
/// for the app's `min_healthy_time` before the next starts; networks proceed in parallel.
#[utoipa::path(post, path = "/v1/hosts/{id}/drain", responses((status = 202, body = DrainView), (status = 409, body = crate::error::ErrorBody)))]
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
    for id in ids(ctx).unwrap_or_default() {
        if load(ctx, &id).is_ok_and(|m| !m.phase.finished()) {
            spawn_driver(ctx.clone(), id);
        }
    }
    let c = ctx.clone();
    tokio::spawn(async move {
        loop {
            expire_volumes(&c).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
}

/// Deletes the source volumes whose retention ran out (best effort; retried on the next call).
pub async fn expire_volumes(ctx: &Ctx) {
    let now = ctx.store.now_ms();
    for id in server::volume_ids(ctx).unwrap_or_default() {
        let Ok(mut v) = server::volume(ctx, &id) else {
            continue;
        };
        if v.state != "pending_destroy" || v.destroy_after_ms.is_none_or(|t| t > now) {
            continue;
        }
        let removed = match &v.host {
            Some(h) => match endpoint(ctx, h) {
                Ok(ep) => server::call_agent::<_, serde_json::Value>(
                    ctx,
                    &format!("{ep}/v1/volumes/remove"),
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
        .kv_get(&format!("instances/{machine}"))
        .ok()
        .flatten()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

fn add_instance(ctx: &Ctx, machine: &str, rec: InstanceRecord) -> Result<()> {
    let mut all = instances(ctx, machine);
    if all.iter().any(|r| r.instance_id == rec.instance_id) {
        return Ok(()); // idempotent on resume
    }
    all.push(rec);
    ctx.store.kv_put(
        &format!("instances/{machine}"),
        &serde_json::to_string(&all).map_err(ApiError::internal)?,
    )?;
    Ok(())
}

// ---- the driver -------------------------------------------------------------------------------

enum StepError {
    /// Try the same step again (an agent restarting, a lock held by another migration).
    Retry(String),
    /// Give up and undo.
    RollBack(String),
}

impl From<ApiError> for StepError {
    fn from(e: ApiError) -> Self {
        // Conflicts and bad input will not fix themselves; unavailable agents and 5xx may.
        if e.status >= 500 {
            StepError::Retry(e.message)
        } else {
            StepError::RollBack(e.message)
        }
    }
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        StepError::from(ApiError::from(e))
    }
}

type Step<T> = std::result::Result<T, StepError>;

pub fn spawn_driver(ctx: Arc<Ctx>, id: String) {
    if !DRIVING.lock().unwrap().insert(id.clone()) {
        return;
    }
    tokio::spawn(async move {
        drive(&ctx, &id).await;
        DRIVING.lock().unwrap().remove(&id);
        PROGRESS.lock().unwrap().remove(&id);
    });
}

async fn drive(ctx: &Arc<Ctx>, id: &str) {
    // The lock's heartbeat: refreshed while this driver lives, so only a dead coordinator's lock
    // expires.
    let hb = {
        let (ctx, id) = (ctx.clone(), id.to_owned());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(LOCK_TTL_MS / 3)).await;
                if let Ok(m) = load(&ctx, &id) {
                    if let Some(n) = &m.lock_nonce {
                        let _ = ctx.store.refresh_lock(&lock_name(&m), n, LOCK_TTL_MS);
                    }
                }
            }
        })
    };
    loop {
        let mut mig = match load(ctx, id) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("migration {id}: {e}");
                break;
            }
        };
        if mig.phase.finished() {
            break;
        }
        // Every step after `pending` runs under the network's lock. A server that was down
        // longer than the TTL may have lost it to another migration: then wait for it again.
        if mig.phase != Phase::Pending {
            match hold_lock(ctx, &mut mig) {
                Ok(true) => {}
                Ok(false) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!("migration {id}: lock: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let before = mig.phase;
        match step(ctx, &mut mig).await {
            Ok(()) => {
                if mig.phase != before {
                    mig.retries = 0;
                    if mig.phase != Phase::RolledBack {
                        mig.error = None; // a retried step succeeded; a rollback keeps its reason
                    }
                    if save(ctx, &mut mig).is_err() {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    ctx.changed();
                    crate::crash_point(mig.phase.as_str());
                }
            }
            Err(StepError::Retry(e)) => {
                mig.retries += 1;
                tracing::warn!("migration {id} at {}: {e} (retrying)", mig.phase.as_str());
                if mig.retries > MAX_RETRIES && mig.phase != Phase::RollingBack {
                    start_rollback(&mut mig, format!("gave up after {MAX_RETRIES} tries: {e}"));
                } else {
                    mig.error = Some(e);
                }
                let _ = save(ctx, &mut mig);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(StepError::RollBack(e)) => {
                if mig.phase == Phase::RollingBack {
                    // Undoing failed in a way retrying will not fix: stay here, say why, retry
                    // slowly (an operator may fix the host).
                    mig.error = Some(format!("rollback blocked: {e}"));
                    let _ = save(ctx, &mut mig);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
                tracing::warn!("migration {id} rolls back from {}: {e}", mig.phase.as_str());
                start_rollback(&mut mig, e);
                let _ = save(ctx, &mut mig);
            }
        }
    }
    hb.abort();
}

/// Refreshes the network lock this migration holds, or takes it again if it expired and is
/// free. `Ok(false)`: another migration holds it now.
fn hold_lock(ctx: &Ctx, mig: &mut Migration) -> Result<bool> {
    let name = lock_name(mig);
    if let Some(n) = &mig.lock_nonce {
        if ctx.store.refresh_lock(&name, n, LOCK_TTL_MS).is_ok() {
            return Ok(true);
        }
    }
    match ctx.store.acquire_lock(&name, LOCK_TTL_MS, &mig.id) {
        Ok(l) => {
            mig.lock_nonce = Some(l.nonce);
            save(ctx, mig)?;
            Ok(true)
        }
        Err(StoreError::LockHeld { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn start_rollback(mig: &mut Migration, reason: String) {
    mig.rollback_from = Some(mig.phase);
    mig.phase = Phase::RollingBack;
    mig.error = Some(reason);
    mig.retries = 0;
}

fn lock_name(m: &Migration) -> String {
    format!("migrate/network/{}", m.network_id)
}

/// One step: does the work of the next phase and sets `mig.phase` to it (the driver saves), or
/// leaves the phase as it is to be called again (waiting).
async fn step(ctx: &Arc<Ctx>, mig: &mut Migration) -> Step<()> {
    match mig.phase {
        Phase::Pending => lock_and_plan(ctx, mig).await,
        Phase::Locked => notice(ctx, mig).await,
        Phase::Noticed => precopy(ctx, mig).await,
        Phase::Precopied => stop_source(ctx, mig).await,
        Phase::Stopped => final_sync(ctx, mig).await,
        Phase::Synced => switch(ctx, mig).await,
        Phase::Switched => map_old_address(ctx, mig).await,
        Phase::Mapped => start_destination(ctx, mig).await,
        Phase::Started => wait_healthy(ctx, mig).await,
        Phase::RollingBack => roll_back(ctx, mig).await,
        Phase::Done | Phase::RolledBack => Ok(()),
    }
}

async fn lock_and_plan(ctx: &Ctx, mig: &mut Migration) -> Step<()> {
    let name = lock_name(mig);
    let holds = match &mig.lock_nonce {
        Some(n) => ctx.store.refresh_lock(&name, n, LOCK_TTL_MS).is_ok(),
        None => false,
    };
    if !holds {
        match ctx.store.acquire_lock(&name, LOCK_TTL_MS, &mig.id) {
            Ok(l) => {
                mig.lock_nonce = Some(l.nonce);
                save(ctx, mig)?;
            }
            Err(StoreError::LockHeld { .. }) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(()); // wait: another migration of this network runs
            }
            Err(e) => return Err(e.into()),
        }
    }
    let m = ctx.store.get_machine(&mig.machine_id)?;
    if m.instance_id != mig.old_instance_id || !matches!(m.state, S::Started | S::Stopped) {
        return Err(StepError::RollBack(format!(
            "machine {} changed while the migration waited (now {}, instance {})",
            m.id,
            m.state.as_str(),
            m.instance_id
        )));
    }
    mig.was_running = m.state == S::Started;
    let from = parse_host(&mig.from_host)?;
    let to = if mig.to_host.is_empty() {
        pick_destination(ctx, from)?
    } else {
        let t = parse_host(&mig.to_host)?;
        if ctx.store.get_host(t)?.cordoned {
            return Err(StepError::RollBack(format!(
                "host {} was cordoned",
                mig.to_host
            )));
        }
        t
    };
    // A field never used on the destination: the new address is fresh, the old one is never
    // handed out again (allocators only move forward).
    let field = ctx.store.allocate_machine_field(to)?;
    mig.to_host = host_hex(to);
    mig.new_field = field.0;
    mig.new_ip = FleetAddr::primary(m.network_id, to, field).to_string();
    mig.new_instance_id = new_instance_id();
    let config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
    mig.volumes = Vec::new();
    for (i, mount) in config.mounts.iter().enumerate() {
        let v = server::volume(ctx, &mount.volume)?;
        mig.volumes.push(VolumeFork {
            mount_path: mount.path.clone(),
            src_volume: v.id.clone(),
            src_dir: v.host_dir.clone(),
            dst_volume: format!("vol_{}", random_hex(8)),
            dst_dir: None,
            session: format!("{}-{i}", mig.id),
            token: random_hex(16),
            root: None,
            verified: false,
        });
    }
    mig.phase = Phase::Locked;
    Ok(())
}

fn pick_destination(ctx: &Ctx, from: HostId) -> Result<HostId> {
    let mut best: Option<(usize, HostId)> = None;
    for h in ctx.store.list_hosts()? {
        if h.id == from || h.cordoned || h.endpoint.is_empty() {
            continue;
        }
        let load = ctx.store.list_machines_on_host(h.id)?.len();
        if best.is_none_or(|(l, _)| load < l) {
            best = Some((load, h.id));
        }
    }
    best.map(|(_, h)| h).ok_or_else(|| {
        ApiError::conflict(
            "no_destination",
            "no other uncordoned host with a running agent",
        )
    })
}

async fn notice(ctx: &Ctx, mig: &mut Migration) -> Step<()> {
    let policy = load_policy(ctx, &mig.app)?;
    let now = ctx.store.now_ms();
    let at = match mig.notice_at_ms {
        Some(t) => t,
        None => {
            let deadline = now + policy.notice_period_ms as i64;
            let payload = serde_json::json!({
                "event": "machine.migrate.notice",
                "migration": mig.id,
                "machine_id": mig.machine_id,
                "app": mig.app,
                "from_host": mig.from_host,
                "to_host": mig.to_host,
                "private_ip": mig.old_ip,
                "new_private_ip": mig.new_ip,
                "stop_not_before": rfc3339(deadline),
                "stop_not_before_ms": deadline,
                "sent_at_ms": now,
            });
            let webhook = match &policy.webhook_url {
                Some(url) => {
                    Some(send_webhook(ctx, url, policy.webhook_secret.as_deref(), &payload).await)
                }
                None => None,
            };
            ctx.store.add_event(
                &mig.machine_id,
                "migrate",
                "notice",
                "ferry",
                serde_json::json!({"notice": payload, "webhook": webhook}),
            )?;
            mig.notice_at_ms = Some(now);
            save(ctx, mig)?;
            now
        }
    };
    let until = at + policy.notice_period_ms as i64;
    if ctx.store.now_ms() < until {
        let left = (until - ctx.store.now_ms()).clamp(0, 1000) as u64;
        tokio::time::sleep(Duration::from_millis(left)).await;
        return Ok(()); // come back: the notice period is not over
    }
    mig.phase = Phase::Noticed;
    Ok(())
}

/// POSTs the notice; the body is signed with HMAC-SHA256 (`X-Ferry-Signature: sha256=<hex>`).
/// The outcome goes into the event; a failing webhook does not stop the migration (the event is
/// the notice of record).
async fn send_webhook(
    ctx: &Ctx,
    url: &str,
    secret: Option<&str>,
    payload: &serde_json::Value,
) -> serde_json::Value {
    use hmac::Mac;
    let body = payload.to_string();
    let mut req = ctx
        .http
        .post(url)
        .timeout(Duration::from_secs(5))
        .header("content-type", "application/json")
        .header("x-ferry-event", "machine.migrate.notice");
    if let Some(s) = secret {
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(s.as_bytes()).expect("any key length");
        mac.update(body.as_bytes());
        let sig = hex::encode(mac.finalize().into_bytes());
        req = req.header("x-ferry-signature", format!("sha256={sig}"));
    }
    match req.body(body).send().await {
        Ok(r) => serde_json::json!({"url": url, "status": r.status().as_u16()}),
        Err(e) => serde_json::json!({"url": url, "error": e.to_string()}),
    }
}

/// One copy round of `fork` from `from` to `to` (agents), `dir` forcing the destination
/// directory (rollback). Progress is published while it runs.
#[allow(clippy::too_many_arguments)]
async fn copy_round(
    ctx: &Ctx,
    mig_id: &str,
    session: &str,
    token: &str,
    src_dir: &str,
    target_volume: &str,
    from: &str,
    to: &str,
    dir: Option<String>,
) -> Step<(VolumeRound, String)> {
    let (src_ep, dst_ep) = (endpoint(ctx, from)?, endpoint(ctx, to)?);
    let exp: VolumeExpected = server::call_agent(
        ctx,
        &format!("{dst_ep}/v1/volumes/expect"),
        &VolumeExpect {
            session: session.to_owned(),
            token: token.to_owned(),
            volume_id: target_volume.to_owned(),
            dir,
        },
    )
    .await?;
    let send = VolumeSend {
        session: session.to_owned(),
        token: token.to_owned(),
        src_dir: src_dir.to_owned(),
        addr: exp.addr.clone(),
        target: target_volume.to_owned(),
    };
    let poll = {
        let (http, url, id) = (
            ctx.http.clone(),
            format!("{src_ep}/v1/volumes/progress/{session}"),
            mig_id.to_owned(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(150)).await;
                if let Ok(r) = http.get(&url).send().await {
                    if let Ok(p) = r.json::<VolumeProgress>().await {
                        PROGRESS.lock().unwrap().insert(id.clone(), p);
                    }
                }
            }
        })
    };
    let r = server::call_agent::<_, VolumeRound>(ctx, &format!("{src_ep}/v1/volumes/send"), &send)
        .await;
    poll.abort();
    PROGRESS.lock().unwrap().remove(mig_id);
    Ok((r?, exp.dir))
}

/// One copy round of volume `i` from the source host to the destination.
async fn forward_round(ctx: &Ctx, mig: &Migration, i: usize) -> Step<(VolumeRound, String)> {
    let v = &mig.volumes[i];
    copy_round(
        ctx,
        &mig.id,
        &v.session,
        &v.token,
        &v.src_dir,
        &v.dst_volume,
        &mig.from_host,
        &mig.to_host,
        None,
    )
    .await
}

async fn precopy(ctx: &Ctx, mig: &mut Migration) -> Step<()> {
    if !mig.precopy {
        mig.phase = Phase::Precopied;
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let mut bytes = 0;
    // Two rounds: the first moves everything while the machine runs (long), the second what
    // changed meanwhile, so the final round after the stop has little left.
    for round in 0..2 {
        for i in 0..mig.volumes.len() {
            let (r, dir) = forward_round(ctx, mig, i).await?;
            bytes += r.bytes_sent;
            mig.stats.chunks_resent += r.chunks_resent;
            if mig.volumes[i].dst_dir.as_deref() != Some(&dir) {
                mig.volumes[i].dst_dir = Some(dir);
                save(ctx, mig)?;
            }
            if round == 0 {
                crate::crash_point("precopy-round");
            }
        }
    }
    mig.stats.precopy_ms = t0.elapsed().as_millis() as u64;
    mig.stats.precopy_bytes = bytes;
    ctx.store.add_event(
        &mig.machine_id,
        "migrate",
        "precopied",
        "ferry",
        serde_json::json!({"migration": mig.id, "bytes": bytes, "ms": mig.stats.precopy_ms}),
    )?;
    mig.phase = Phase::Precopied;
    Ok(())
}

/// Started and every check of the current instance passing (or no checks).
fn ready(ctx: &Ctx, m: &Machine) -> bool {
    if m.state != S::Started {
        return false;
    }
    let Ok(config) = serde_json::from_value::<MachineConfig>(m.config.clone()) else {
        return false;
    };
    if config.checks.is_empty() {
        return true;
    }
    let Ok(events) = ctx.store.events(&m.id) else {
        return false;
    };
    // The latest result of each check from this instance (the agent reports a check when its
    // result changes, tagged with the instance).
    config.checks.keys().all(|name| {
        events
            .iter()
            .rev()
            .filter(|e| e.r#type == "check" && e.request["instance_id"] == m.instance_id.as_str())
            .find(|e| e.request["detail"]["name"] == name.as_str())
            .is_some_and(|e| e.request["detail"]["passing"] == true)
    })
}

async fn stop_source(ctx: &Arc<Ctx>, mig: &mut Migration) -> Step<()> {
    let m = ctx.store.get_machine(&mig.machine_id)?;
    if mig.was_running && mig.stats.stopped_at_ms.is_none() {
        // max_unavailable: the others that are not ready, plus this one, must fit.
        let policy = load_policy(ctx, &mig.app)?;
        let down = ctx
            .store
            .list_machines(Some(&mig.app))?
            .iter()
            .filter(|o| o.id != m.id && !ready(ctx, o))
            .count() as u32;
        if down + 1 > policy.max_unavailable {
            let waited = ctx.store.now_ms() - mig.updated_at_ms;
            if waited > policy.healthy_deadline_ms as i64 {
                return Err(StepError::RollBack(format!(
                    "{down} other machines of app {} are not ready and max_unavailable is {}",
                    mig.app, policy.max_unavailable
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(());
        }
    }
    if mig.stats.stopped_at_ms.is_none() {
        mig.stats.stopped_at_ms = Some(ctx.store.now_ms());
        save(ctx, mig)?;
        ctx.store.add_event(
            &m.id,
            "migrate",
            "stopping",
            "ferry",
            serde_json::json!({"migration": mig.id}),
        )?;
    }
    stop_machine_now(ctx, &m).await?;
    mig.phase = Phase::Stopped;
    Ok(())
}

/// Stops the machine where the store places it, with its stop_config (idempotent; also finishes
/// a stop a crashed server left in `stopping`).
async fn stop_machine_now(ctx: &Ctx, m: &Machine) -> Step<()> {
    let config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
    let params = server::stop_params(&StopRequest::default(), &config)?;
    match m.state {
        S::Started | S::Starting => {
            server::stop_inner(ctx, &m.id, params, S::Stopped).await?;
        }
        S::Stopping => {
            let url = server::agent_url(ctx, m, "/stop")?;
            match server::call_agent::<_, serde_json::Value>(ctx, &url, &params).await {
                Ok(_) => {}
                // Not running (or unknown) on its host any more: stopped is what we want.
                Err(e)
                    if e.status == 502
                        && (e.message.contains("not running")
                            || e.message.contains("not found")
                            || e.message.contains("unknown")) => {}
                Err(e) => return Err(StepError::Retry(e.message)),
            }
            ctx.store.transition(&m.id, &[S::Stopping], S::Stopped)?;
            ctx.changed();
        }
        _ => {}
    }
    Ok(())
}

async fn final_sync(ctx: &Ctx, mig: &mut Migration) -> Step<()> {
    let t0 = std::time::Instant::now();
    let (mut bytes, mut chunks) = (0, 0);
    for i in 0..mig.volumes.len() {
        let v = mig.volumes[i].clone();
        let (r, dir) = forward_round(ctx, mig, i).await?;
        if !r.verified {
            return Err(StepError::Retry(format!(
                "volume {} copy not verified (root {})",
                v.src_volume, r.root
            )));
        }
        bytes += r.bytes_sent;
        chunks += r.chunks_sent;
        mig.stats.chunks_resent += r.chunks_resent;
        let f = &mut mig.volumes[i];
        f.dst_dir = Some(dir);
        f.root = Some(r.root);
        f.verified = true;
    }
    mig.stats.final_sync_ms = t0.elapsed().as_millis() as u64;
    mig.stats.final_bytes = bytes;
    mig.stats.final_chunks = chunks;
    ctx.store.add_event(
        &mig.machine_id,
        "migrate",
        "synced",
        "ferry",
        serde_json::json!({"migration": mig.id, "bytes": bytes, "chunks": chunks,
            "roots": mig.volumes.iter().map(|v| v.root.clone()).collect::<Vec<_>>()}),
    )?;
    mig.phase = Phase::Synced;
    Ok(())
}

/// Removes a machine's local state (process, namespace, cgroup, run dir) on `host`.
async fn forget_on(ctx: &Ctx, machine: &str, host: &str) -> Step<()> {
    let ep = endpoint(ctx, host)?;
    server::call_agent::<_, serde_json::Value>(
        ctx,
        &format!("{ep}/v1/machines/{machine}/destroy"),
        &serde_json::json!({}),
    )
    .await?;
    Ok(())
}

async fn switch(ctx: &Arc<Ctx>, mig: &mut Migration) -> Step<()> {
    if mig
        .volumes
        .iter()
        .any(|v| !v.verified || v.dst_dir.is_none())
    {
        // Never start on an unverified volume.
        return Err(StepError::RollBack("a volume copy is not verified".into()));
    }
    let m = ctx.store.get_machine(&mig.machine_id)?;
    let to = parse_host(&mig.to_host)?;
    let already = m.instance_id == mig.new_instance_id;
    if !already {
        // The source copy must never run again.
        forget_on(ctx, &m.id, &mig.from_host).await?;
        let policy = load_policy(ctx, &mig.app)?;
        let now = ctx.store.now_ms();
        for v in &mig.volumes {
            let src = server::volume(ctx, &v.src_volume)?;
            server::put_volume(
                ctx,
                &VolumeView {
                    id: v.dst_volume.clone(),
                    host_dir: v.dst_dir.clone().unwrap_or_default(),
                    size_mb: src.size_mb,
                    created_at: rfc3339(now),
                    host: Some(mig.to_host.clone()),
                    state: "active".into(),
                    forked_from: Some(src.id.clone()),
                    destroy_after: None,
                    destroy_after_ms: None,
                },
            )?;
        }
        let mut config: MachineConfig =
            serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
        for mount in config.mounts.iter_mut() {
            if let Some(v) = mig.volumes.iter().find(|v| v.src_volume == mount.volume) {
                mount.volume = v.dst_volume.clone();
            }
        }
        let host = ctx.store.get_host(to)?;
        let mut next = m.clone();
        next.host = Some(to);
        next.region = host.region.clone();
        next.machine_field = Some(MachineField(mig.new_field));
        next.private_ip = Some(mig.new_ip.clone());
        next.instance_id = mig.new_instance_id.clone();
        next.config = serde_json::to_value(&config).map_err(ApiError::internal)?;
        // The commit point: from here the machine is the destination's.
        ctx.store
            .update_machine_if(&next, &[S::Stopped, S::Failed, S::Created])?;
        for v in &mig.volumes {
            let mut src = server::volume(ctx, &v.src_volume)?;
            src.state = "pending_destroy".into();
            let after = now + policy.volume_retention_ms as i64;
            src.destroy_after_ms = Some(after);
            src.destroy_after = Some(rfc3339(after));
            server::put_volume(ctx, &src)?;
        }
        ctx.changed();
    }
    add_instance(
        ctx,
        &m.id,
        InstanceRecord {
            instance_id: mig.old_instance_id.clone(),
            host: mig.from_host.clone(),
            private_ip: mig.old_ip.clone(),
            state: "migrated".into(),
            ended_at: rfc3339(ctx.store.now_ms()),
            migration: mig.id.clone(),
        },
    )?;
    mig.phase = Phase::Switched;
    Ok(())
}

async fn start_destination(ctx: &Arc<Ctx>, mig: &mut Migration) -> Step<()> {
    let m = ctx.store.get_machine(&mig.machine_id)?;
    if !mig.launch_recorded {
        ctx.store.add_event(
            &m.id,
            "launch",
            "migrated",
            "ferry",
            serde_json::json!({"migrated": true, "migration": mig.id, "from_host": mig.from_host,
                "to_host": mig.to_host, "old_instance_id": mig.old_instance_id,
                "instance_id": mig.new_instance_id, "old_ip": mig.old_ip, "private_ip": mig.new_ip}),
        )?;
        mig.launch_recorded = true;
        save(ctx, mig)?;
    }
    if mig.was_running && m.state != S::Started {
        let config: MachineConfig =
            serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
        let dirs = server::resolve_volumes(ctx, &config)?;
        if let Err(e) =
            server::launch(ctx, &m.id, dirs, &[S::Stopped, S::Failed, S::Starting]).await
        {
            return Err(StepError::RollBack(format!(
                "starting on host {}: {}",
                mig.to_host, e.message
            )));
        }
    }
    let now = ctx.store.now_ms();
    mig.stats.started_at_ms = Some(now);
    mig.stats.downtime_ms = mig.stats.stopped_at_ms.map(|s| (now - s).max(0) as u64);
    mig.phase = Phase::Started;
    Ok(())
}

async fn map_old_address(ctx: &Arc<Ctx>, mig: &mut Migration) -> Step<()> {
    let old: FleetAddr = mig
        .old_ip
        .parse()
        .map_err(|e| ApiError::internal(format!("{e}")))?;
    let new: FleetAddr = mig
        .new_ip
        .parse()
        .map_err(|e| ApiError::internal(format!("{e}")))?;
    crate::bridge::install(ctx, old, new).await?;
    mig.phase = Phase::Mapped;
    Ok(())
}

async fn wait_healthy(ctx: &Arc<Ctx>, mig: &mut Migration) -> Step<()> {
    let policy = load_policy(ctx, &mig.app)?;
    if mig.was_running {
        let started = mig
            .stats
            .started_at_ms
            .unwrap_or_else(|| ctx.store.now_ms());
        let deadline = started + policy.healthy_deadline_ms as i64;
        let mut ready_since: Option<i64> = None;
        loop {
            let m = ctx.store.get_machine(&mig.machine_id)?;
            let now = ctx.store.now_ms();
            if ready(ctx, &m) {
                let since = *ready_since.get_or_insert(now);
                if now - since >= policy.min_healthy_time_ms as i64 {
                    break;
                }
            } else {
                ready_since = None;
            }
            if now > deadline {
                return Err(StepError::RollBack(format!(
                    "machine not healthy for {} ms within the healthy_deadline of {} ms",
                    policy.min_healthy_time_ms, policy.healthy_deadline_ms
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    finish(ctx, mig, "done", None)?;
    mig.phase = Phase::Done;
    Ok(())
}

fn finish(ctx: &Ctx, mig: &mut Migration, status: &str, reason: Option<&str>) -> Result<()> {
    if let Some(n) = mig.lock_nonce.take() {
        let _ = ctx.store.release_lock(&lock_name(mig), &n);
    }
    mig.finished_at_ms = Some(ctx.store.now_ms());
    ctx.store.add_event(
        &mig.machine_id,
        "migrate",
        status,
        "ferry",
        serde_json::json!({"migration": mig.id, "from_host": mig.from_host, "to_host": mig.to_host,
            "downtime_ms": mig.stats.downtime_ms, "reason": reason}),
    )?;
    Ok(())
}

async fn roll_back(ctx: &Arc<Ctx>, mig: &mut Migration) -> Step<()> {
    let from = mig.rollback_from.unwrap_or(Phase::Pending);
    let reason = mig.error.clone().unwrap_or_default();
    let m = ctx.store.get_machine(&mig.machine_id)?;
    // The store says whether the switch happened (a crash may have hit between the switch and
    // the phase's record), not the phase.
    let _ = from;
    if m.instance_id != mig.old_instance_id {
        undo_switch(ctx, mig, &m).await?;
    } else {
        // Never switched: the source still owns the machine; drop the partial copies.
        for v in &mig.volumes {
            if let (Some(dir), Ok(ep)) = (&v.dst_dir, endpoint(ctx, &mig.to_host)) {
                let _ = server::call_agent::<_, serde_json::Value>(
                    ctx,
                    &format!("{ep}/v1/volumes/remove"),
                    &VolumeRemove { dir: dir.clone() },
                )
                .await;
            }
        }
        if mig.was_running {
            let m = ctx.store.get_machine(&mig.machine_id)?;
            if m.state == S::Stopping {
                stop_machine_now(ctx, &m).await?;
            }
            let m = ctx.store.get_machine(&mig.machine_id)?;
            if m.state != S::Started {
                let config: MachineConfig =
                    serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
                let dirs = server::resolve_volumes(ctx, &config)?;
                server::launch(ctx, &m.id, dirs, &[S::Stopped, S::Failed, S::Starting])
                    .await
                    .map_err(|e| StepError::Retry(e.message))?;
            }
        }
    }
    finish(ctx, mig, "rolled_back", Some(&reason))?;
    mig.phase = Phase::RolledBack;
    Ok(())
}

/// Rollback after the destination owned the machine: stop and forget it there, copy its volumes
/// back (it may have written to them), point the store at the source again, drop the mapping.
async fn undo_switch(ctx: &Arc<Ctx>, mig: &mut Migration, m: &Machine) -> Step<()> {
    let from = parse_host(&mig.from_host)?;
    // Already pointed back at the source by an earlier attempt (then the source may have run and
    // written since: copying back again would lose that).
    let switched_back = m.host == Some(from) && m.private_ip.as_deref() == Some(&mig.old_ip);
    if !switched_back {
        copy_back(ctx, mig, m).await?;
    }
    let m = ctx.store.get_machine(&mig.machine_id)?;
    let config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
    let now = ctx.store.now_ms();
    let policy = load_policy(ctx, &mig.app)?;
    for v in &mig.volumes {
        if let Ok(mut src) = server::volume(ctx, &v.src_volume) {
            src.state = "active".into();
            src.destroy_after = None;
            src.destroy_after_ms = None;
            server::put_volume(ctx, &src)?;
        }
        if let Ok(mut dst) = server::volume(ctx, &v.dst_volume) {
            if dst.state == "active" {
                dst.state = "pending_destroy".into();
                let after = now + policy.volume_retention_ms as i64;
                dst.destroy_after_ms = Some(after);
                dst.destroy_after = Some(rfc3339(after));
                server::put_volume(ctx, &dst)?;
            }
        }
    }
    add_instance(
        ctx,
        &m.id,
        InstanceRecord {
            instance_id: mig.new_instance_id.clone(),
            host: mig.to_host.clone(),
            private_ip: mig.new_ip.clone(),
            state: "rolled_back".into(),
            ended_at: rfc3339(now),
            migration: mig.id.clone(),
        },
    )?;
    crate::bridge::uninstall(ctx, &mig.old_ip, &mig.new_ip).await?;
    ctx.changed();
    if mig.was_running && m.state != S::Started {
        let dirs = server::resolve_volumes(ctx, &config)?;
        server::launch(ctx, &m.id, dirs, &[S::Stopped, S::Failed, S::Starting])
            .await
            .map_err(|e| StepError::Retry(e.message))?;
    }
    Ok(())
}

/// Stops and forgets the destination instance, copies its volumes back over the source's, and
/// points the store at the source placement again (a fresh instance ID, the old address).
async fn copy_back(ctx: &Arc<Ctx>, mig: &mut Migration, m: &Machine) -> Step<()> {
    stop_machine_now(ctx, m).await?;
    forget_on(ctx, &m.id, &mig.to_host).await?;
    for v in mig.volumes.clone() {
        let Some(dst_dir) = &v.dst_dir else { continue };
        let (r, _) = copy_round(
            ctx,
            &mig.id,
            &format!("{}-back", v.session),
            &v.token,
            dst_dir,
            &v.src_volume,
            &mig.to_host,
            &mig.from_host,
            Some(v.src_dir.clone()),
        )
        .await?;
        if !r.verified {
            return Err(StepError::Retry(
                "copying the volume back: not verified".into(),
            ));
        }
    }
    let m = ctx.store.get_machine(&mig.machine_id)?;
    let mut config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
    for mount in config.mounts.iter_mut() {
        if let Some(v) = mig.volumes.iter().find(|v| v.dst_volume == mount.volume) {
            mount.volume = v.src_volume.clone();
        }
    }
    let from = parse_host(&mig.from_host)?;
    let mut back = m.clone();
    back.host = Some(from);
    back.region = ctx.store.get_host(from)?.region;
    back.machine_field = Some(MachineField(mig.old_field));
    back.private_ip = Some(mig.old_ip.clone());
    back.instance_id = new_instance_id();
    back.config = serde_json::to_value(&config).map_err(ApiError::internal)?;
    ctx.store
        .update_machine_if(&back, &[S::Stopped, S::Failed, S::Created])?;
    Ok(())
}

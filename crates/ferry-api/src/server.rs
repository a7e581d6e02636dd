//! The API server: an axum router over a [`Store`] and the hosts' agents.
//!
//! Every handler follows one shape: validate the input (nothing is written before that), check
//! the lease, move the machine's state with a compare-and-set in the store, call the agent, record
//! the outcome and an event. Illegal transitions are refused with 409 and change nothing.

use crate::config::{
    validate_machine_id, validate_name, validate_volume_id, MachineConfig, ALLOWED_SIGNALS,
    MAX_STOP_TIMEOUT,
};
use crate::doc::{
    AgentFailed, AppPath, BadRequest, Conflict, MachinePath, NotFound, ServerFailed, Unprocessable,
    WaitTimeout,
};
use crate::error::ApiError;
use crate::proto::{
    AgentReport, ExecRequest, ExecResult, ExitInfo, RegisterHost, RunMachine, StopMachine,
    VolumeRef,
};
use crate::views::*;
use crate::LEASE_HEADER;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_addr::{FleetAddr, HostId};
use ferry_store::{new_instance_id, new_machine_id, Machine, MachineState, Store};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

type Result<T> = std::result::Result<T, ApiError>;
use MachineState as S;

/// What runs after every machine state change.
pub type ChangeHook = Box<dyn Fn(&dyn Store) + Send + Sync>;

/// Shared by every handler.
pub struct Ctx {
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    /// Every call to a host's agent goes through this ([`crate::agents`]).
    pub agents: Arc<dyn crate::agents::Agents>,
    /// The migrations this process drives.
    pub migrations: crate::migrate::InFlight,
    /// This server process among the fleet's servers (its claims on migrations carry it).
    pub server_id: String,
    /// Where operators' directory volumes (`host_dir`) may be: below one of these only.
    host_dir_roots: std::sync::RwLock<Vec<PathBuf>>,
    /// Bumped on every machine state change; `wait` listens to it.
    pub changes: tokio::sync::watch::Sender<u64>,
    /// Where new volumes are created.
    pub volumes_dir: PathBuf,
    /// Called after every machine state change (e.g. to publish a new DNS snapshot), so
    /// listeners see changes as soon as the store has them.
    pub on_change: std::sync::OnceLock<ChangeHook>,
    /// The store subscription behind the agents' watch streams ([`crate::watch`]).
    pub watch: crate::watch::Hub,
}

impl Ctx {
    pub fn new(store: Arc<dyn Store>, volumes_dir: PathBuf) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(330)) // above the longest stop timeout
            .build()
            .expect("building an HTTP client");
        Self::with_agents(
            store,
            volumes_dir,
            Arc::new(crate::agents::HttpAgents::new(http)),
        )
    }

    /// A context whose agent calls go to `agents` (a recording double in unit tests).
    pub fn with_agents(
        store: Arc<dyn Store>,
        volumes_dir: PathBuf,
        agents: Arc<dyn crate::agents::Agents>,
    ) -> Arc<Self> {
        let http = reqwest::Client::new();
        Arc::new(Ctx {
            store,
            http,
            agents,
            migrations: Default::default(),
            server_id: format!("server-{}", random_hex(6)),
            host_dir_roots: Default::default(),
            changes: tokio::sync::watch::channel(0).0,
            volumes_dir,
            on_change: std::sync::OnceLock::new(),
            watch: Default::default(),
        })
    }
    /// Allows directory volumes (`host_dir`) below these directories. None by default: a
    /// directory volume is a host directory mounted read-write into a machine (as the
    /// machine's root), so only directories the operator set aside for it may be one.
    pub fn allow_host_dirs(&self, roots: Vec<PathBuf>) -> std::io::Result<()> {
        let roots = roots
            .iter()
            .map(|r| r.canonicalize())
            .collect::<std::io::Result<Vec<_>>>()?;
        *self.host_dir_roots.write().unwrap() = roots;
        Ok(())
    }

    /// `d` as a directory volume may have it: an existing directory that is, with every
    /// symlink and `..` resolved, below an allowed root.
    fn allowed_host_dir(&self, d: &str) -> Result<PathBuf> {
        let roots = self.host_dir_roots.read().unwrap().clone();
        if roots.is_empty() {
            return Err(ApiError::invalid(
                "directory volumes are off on this server (its operator allows them below \
                 chosen directories with --host-dir-root); use size_mb",
            ));
        }
        let p = PathBuf::from(d);
        let real = p
            .is_absolute()
            .then(|| p.canonicalize().ok())
            .flatten()
            .filter(|r| r.is_dir())
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "host_dir {d:?} is not an existing absolute directory"
                ))
            })?;
        if !roots.iter().any(|r| real.starts_with(r) && real != *r) {
            return Err(ApiError::invalid(format!(
                "host_dir {d:?} is not below a directory this server allows for volumes ({})",
                roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(real)
    }

    /// Publishes a machine change (DNS snapshot, waiters).
    pub fn changed(&self) {
        if let Some(f) = self.on_change.get() {
            f(self.store.as_ref());
        }
        self.changes.send_modify(|v| *v += 1);
    }
}

type Shared = State<Arc<Ctx>>;

/// The document's frame: its info and the schemas no route names directly. Paths come from the
/// router itself ([`api`]), so a public route cannot exist without its documentation.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ferry",
        description = "Run machines on a fleet of hosts (Fly Machines-shaped). Every error is \
                       a JSON `ErrorBody` with a stable `code`; each operation lists the \
                       statuses it can answer.",
        version = "1"
    ),
    components(schemas(
        crate::error::ErrorBody,
        crate::migrate::Phase,
        crate::migrate::VolumeFork,
        crate::migrate::MigrationStats,
        crate::migrate::InstanceRecord,
        crate::proto::VolumeProgress
    ))
)]
pub struct ApiDoc;

/// The public API: every route with its OpenAPI operation, registered together.
fn api() -> OpenApiRouter<Arc<Ctx>> {
    use crate::{bridge, images, migrate};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_app, list_apps))
        .routes(routes!(get_app, delete_app))
        .routes(routes!(list_machines, create_machine))
        .routes(routes!(get_machine, destroy_machine))
        .routes(routes!(stop_machine))
        .routes(routes!(start_machine))
        .routes(routes!(wait_machine))
        .routes(routes!(machine_events))
        .routes(routes!(acquire_lease, get_lease, release_lease))
        .routes(routes!(exec_machine))
        .routes(routes!(migrate::migrate_machine))
        .routes(routes!(migrate::get_policy, migrate::set_policy))
        .routes(routes!(list_hosts))
        .routes(routes!(migrate::drain))
        .routes(routes!(migrate::cordon))
        .routes(routes!(migrate::uncordon))
        .routes(routes!(migrate::list))
        .routes(routes!(migrate::get))
        .routes(routes!(create_volume, list_volumes))
        .routes(routes!(bridge::list, bridge::map))
        .routes(routes!(bridge::report))
        .routes(routes!(bridge::retire))
        .routes(routes!(bridge::set_gate))
        .routes(routes!(images::list))
        .routes(routes!(images::pull))
        .routes(routes!(images::remove))
        .routes(routes!(images::list_registries))
        .routes(routes!(images::put_registry, images::delete_registry))
}

/// The OpenAPI document, exactly as `/openapi.json` serves it.
pub fn openapi() -> serde_json::Value {
    document(&api().into_openapi())
}

/// The document as JSON. utoipa 5.5 serializes a response link's fields in snake case
/// (`operation_id`), which the OpenAPI schema rejects and clients ignore; renamed here so the
/// links from create to get/stop/start/destroy are real ones.
fn document(doc: &utoipa::openapi::OpenApi) -> serde_json::Value {
    fn fix(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(links) = map.get_mut("links").and_then(|l| l.as_object_mut()) {
                    for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
                        for (from, to) in [
                            ("operation_id", "operationId"),
                            ("operation_ref", "operationRef"),
                            ("request_body", "requestBody"),
                        ] {
                            if let Some(x) = link.remove(from) {
                                link.insert(to.into(), x);
                            }
                        }
                    }
                }
                map.values_mut().for_each(fix);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(fix),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(doc).expect("the OpenAPI document serializes");
    fix(&mut v);
    v
}

pub fn router(ctx: Arc<Ctx>) -> Router {
    let (public, doc) = api().split_for_parts();
    let doc = Arc::new(document(&doc));
    public
        .route(
            "/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        // The agents' side of the protocol (registration and reports), not part of the public
        // document: no user client calls it, and generated requests must not register hosts.
        .route("/internal/v1/hosts", post(register_host))
        .route("/internal/v1/reports", post(agent_report))
        .route(
            "/internal/v1/hosts/{host}/watch",
            get(crate::watch::host_watch),
        )
        .fallback(|| async { ApiError::not_found("route") })
        .with_state(ctx)
}

/// JSON bodies that fail to parse become our 400 error, not axum's plain-text one.
pub struct Body<T>(pub T);
impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError::invalid(format!(
                "malformed request body: {}",
                e.body_text()
            ))),
        }
    }
}

/// A path parameter that fails to parse (e.g. not UTF-8) is our JSON 400 too.
pub struct Path<T>(pub T);
impl<T, S> axum::extract::FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(ApiError::invalid(format!(
                "malformed path parameter: {}",
                e.body_text()
            ))),
        }
    }
}

/// A query string that fails to parse (a word where a number goes) is our JSON 400 too.
pub struct Query<T>(pub T);
impl<T, S> axum::extract::FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(ApiError::invalid(format!(
                "malformed query: {}",
                e.body_text()
            ))),
        }
    }
}

/// A body that may be absent (an empty POST means the defaults).
fn optional_body<T: serde::de::DeserializeOwned + Default>(b: &[u8]) -> Result<T> {
    if b.iter().all(|c| c.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| ApiError::invalid(format!("malformed request body: {e}")))
}

// ---- apps -------------------------------------------------------------------------------------

fn app_view(a: &ferry_store::App) -> AppView {
    let n = a.network_id.get();
    AppView {
        name: a.name.clone(),
        org: a.org.clone(),
        network_id: n,
        network: format!("fdaa:{:x}:{:x}::/48", n >> 16, n & 0xffff),
        created_at: rfc3339(a.created_at_ms),
    }
}

#[utoipa::path(post, path = "/v1/apps", tag = "apps", request_body = CreateApp, responses((status = 201, description = "The app, in its org's network.", body = AppView, links(("CreateMachine" = (operation_id = "create_machine", parameters(("app" = "$response.body#/name")))), ("GetApp" = (operation_id = "get_app", parameters(("app" = "$response.body#/name")))), ("ListMachines" = (operation_id = "list_machines", parameters(("app" = "$response.body#/name")))), ("DeleteApp" = (operation_id = "delete_app", parameters(("app" = "$response.body#/name")))))), BadRequest, Conflict, ServerFailed))]
async fn create_app(
    State(ctx): Shared,
    Body(req): Body<CreateApp>,
) -> Result<(StatusCode, Json<AppView>)> {
    validate_name("app name", &req.app_name)?;
    let org = req.org_slug.unwrap_or_else(|| "personal".into());
    validate_name("org", &org)?;
    let app = ctx.store.create_app(&req.app_name, &org)?;
    Ok((StatusCode::CREATED, Json(app_view(&app))))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct OrgQuery {
    /// Only this org's apps.
    org_slug: Option<String>,
}

#[utoipa::path(get, path = "/v1/apps", tag = "apps", params(OrgQuery), responses((status = 200, description = "Apps by name.", body = [AppView]), BadRequest, ServerFailed))]
async fn list_apps(State(ctx): Shared, Query(q): Query<OrgQuery>) -> Result<Json<Vec<AppView>>> {
    Ok(Json(
        ctx.store
            .list_apps(q.org_slug.as_deref())?
            .iter()
            .map(app_view)
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/apps/{app}", tag = "apps", params(AppPath), responses((status = 200, body = AppView), BadRequest, NotFound, ServerFailed))]
async fn get_app(State(ctx): Shared, Path(app): Path<String>) -> Result<Json<AppView>> {
    Ok(Json(app_view(&ctx.store.get_app(&app)?)))
}

#[utoipa::path(delete, path = "/v1/apps/{app}", tag = "apps", params(AppPath), responses((status = 200, description = "Deleted, with its destroyed machines' records.", body = OkView), BadRequest, NotFound, Conflict, ServerFailed))]
async fn delete_app(State(ctx): Shared, Path(app): Path<String>) -> Result<Json<OkView>> {
    ctx.store.delete_app(&app)?;
    Ok(Json(OkView { ok: true }))
}

// ---- machines ---------------------------------------------------------------------------------

/// Loads a machine and checks it belongs to `app` (another app's machine is "not found").
pub(crate) fn machine_of(ctx: &Ctx, app: &str, id: &str) -> Result<Machine> {
    validate_machine_id(id)?;
    let m = ctx.store.get_machine(id)?;
    if m.app != app {
        return Err(ApiError::not_found(format!("machine {id} in app {app}")));
    }
    Ok(m)
}

pub(crate) fn lease_nonce(h: &HeaderMap) -> Option<&str> {
    h.get(LEASE_HEADER).and_then(|v| v.to_str().ok())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Also list destroyed and migrated-away machines.
    #[serde(default)]
    include_deleted: bool,
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines", tag = "machines", params(AppPath, ListQuery), responses((status = 200, description = "The app's machines, oldest first.", body = [MachineView]), BadRequest, NotFound, ServerFailed))]
async fn list_machines(
    State(ctx): Shared,
    Path(app): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<MachineView>>> {
    ctx.store.get_app(&app)?;
    let ms = if q.include_deleted {
        ctx.store.list_machines_all(Some(&app))?
    } else {
        ctx.store.list_machines(Some(&app))?
    };
    Ok(Json(ms.iter().map(|m| MachineView::new(m, None)).collect()))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines", tag = "machines", params(AppPath), request_body = CreateMachine, responses((status = 200, description = "The machine, placed and started (or `failed` with the agent's reason in its events).", body = MachineView, links(("GetMachine" = (operation_id = "get_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("StopMachine" = (operation_id = "stop_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("StartMachine" = (operation_id = "start_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("WaitMachine" = (operation_id = "wait_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("MachineEvents" = (operation_id = "machine_events", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("DestroyMachine" = (operation_id = "destroy_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("ExecMachine" = (operation_id = "exec_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("AcquireLease" = (operation_id = "acquire_lease", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("GetLease" = (operation_id = "get_lease", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("MigrateMachine" = (operation_id = "migrate_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))))), BadRequest, NotFound, Conflict, Unprocessable, AgentFailed, ServerFailed))]
async fn create_machine(
    State(ctx): Shared,
    Path(app): Path<String>,
    Body(req): Body<CreateMachine>,
) -> Result<Json<MachineView>> {
    req.config.validate()?;
    if let Some(n) = &req.name {
        validate_name("machine name", n)?;
    }
    let app = ctx.store.get_app(&app)?;
    let volume_dirs = resolve_volumes(&ctx, &req.config)?;
    // A volume that lives on a host already takes its machine there.
    let mut want = req.host.clone();
    for mount in &req.config.mounts {
        let v = volume(&ctx, &mount.volume)?;
        if let (true, Some(h)) = (v.kept_by_agent, &v.host) {
            match &want {
                Some(w) if parse_host(w)? != parse_host(h)? => {
                    return Err(ApiError::conflict(
                        "volume_elsewhere",
                        format!("volume {} lives on host {h}, not on host {w}", v.id),
                    ))
                }
                _ => want = Some(h.clone()),
            }
        }
    }
    let host = place(&ctx, want.as_deref())?;
    // The host pulls the image first (nothing exists yet if that fails); the config records
    // the digest it resolved, never the tag.
    let mut req = req;
    if let Some(image) = req.config.image.clone() {
        req.config.image = Some(crate::images::ensure_on_host(&ctx, &host, &image).await?);
    }
    let field = ctx.store.allocate_machine_field(host.id)?;
    let addr = FleetAddr::primary(app.network_id, host.id, field);
    let id = new_machine_id();
    let m = Machine {
        id: id.clone(),
        name: req
            .name
            .unwrap_or_else(|| format!("{}-{}", app.name, &id[..6])),
        app: app.name.clone(),
        org: app.org.clone(),
        network_id: app.network_id,
        host: Some(host.id),
        region: host.region.clone(),
        machine_field: Some(field),
        private_ip: Some(addr.to_string()),
        instance_id: new_instance_id(),
        state: S::Created,
        config: serde_json::to_value(&req.config).map_err(ApiError::internal)?,
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    ctx.store.create_machine(&m)?;
    ctx.store.add_event(
        &id,
        "launch",
        "created",
        "user",
        serde_json::json!({"config": m.config}),
    )?;
    ctx.changed();
    let m = if req.skip_launch {
        ctx.store.get_machine(&id)?
    } else {
        launch(&ctx, &id, volume_dirs, &[S::Created]).await?
    };
    Ok(Json(MachineView::new(&m, None)))
}

/// A host ID as the API and CLI write it (hex).
pub(crate) fn parse_host(s: &str) -> Result<HostId> {
    u32::from_str_radix(s, 16)
        .ok()
        .and_then(|v| HostId::new(v).ok())
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "host {s:?} is not a host ID (hex, as `ferry host list` shows)"
            ))
        })
}

/// `bytes` random bytes as lowercase hex (IDs of volumes and migrations, secrets).
pub(crate) fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// `vol_` and sixteen random lowercase hex characters.
pub(crate) fn new_volume_id() -> String {
    format!("vol_{}", random_hex(8))
}

/// The host for a new machine: the one asked for, or the least-loaded uncordoned one.
fn place(ctx: &Ctx, want: Option<&str>) -> Result<ferry_store::Host> {
    let hosts = ctx.store.list_hosts()?;
    if let Some(w) = want {
        let id = parse_host(w)?;
        let h = hosts
            .into_iter()
            .find(|h| h.id == id)
            .ok_or_else(|| ApiError::not_found(format!("host {w}")))?;
        if h.cordoned {
            return Err(ApiError::conflict(
                "host_cordoned",
                format!("host {w} is cordoned (draining)"),
            ));
        }
        return Ok(h);
    }
    let mut best: Option<(usize, ferry_store::Host)> = None;
    for h in hosts.into_iter().filter(|h| !h.cordoned) {
        let load = ctx.store.list_machines_on_host(h.id)?.len();
        if best.as_ref().is_none_or(|(l, _)| load < *l) {
            best = Some((load, h));
        }
    }
    best.map(|(_, h)| h).ok_or_else(|| {
        ApiError::unavailable("no host is available (none registered, or all cordoned)")
    })
}

pub(crate) fn resolve_volumes(ctx: &Ctx, c: &MachineConfig) -> Result<Vec<String>> {
    c.mounts
        .iter()
        .map(|m| {
            let v = volume(ctx, &m.volume)?;
            Ok(v.host_dir)
        })
        .collect()
}

pub(crate) fn volume(ctx: &Ctx, id: &str) -> Result<VolumeView> {
    validate_volume_id(id)?;
    volume_view(ctx.store.get_volume(id)?)
}

fn volume_view(r: ferry_store::VolumeRecord) -> Result<VolumeView> {
    let mut v: VolumeView = serde_json::from_value(r.detail).map_err(ApiError::internal)?;
    v.revision = r.revision;
    Ok(v)
}

/// The endpoint of the agent of the machine's host.
pub(crate) fn machine_endpoint(ctx: &Ctx, m: &Machine) -> Result<String> {
    let host = m
        .host
        .ok_or_else(|| ApiError::conflict("not_placed", format!("machine {} has no host", m.id)))?;
    Ok(ctx.store.get_host(host)?.endpoint)
}

/// Starts a machine that is in one of `from`: -> starting -> (agent) -> started | failed.
pub(crate) async fn launch(
    ctx: &Ctx,
    id: &str,
    volume_dirs: Vec<String>,
    from: &[MachineState],
) -> Result<Machine> {
    let mut m = ctx.store.transition(id, from, S::Starting)?;
    ctx.changed();
    let config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
    let run = RunMachine {
        id: m.id.clone(),
        app: m.app.clone(),
        instance_id: m.instance_id.clone(),
        network_id: m.network_id.get(),
        machine_field: m.machine_field.map(|f| f.0).unwrap_or_default(),
        private_ip: m.private_ip.clone().unwrap_or_default(),
        region: m.region.clone(),
        volumes: config
            .mounts
            .iter()
            .map(|mount| {
                let v = volume(ctx, &mount.volume)?;
                Ok(VolumeRef {
                    size_mb: v.agent_size_mb(),
                    id: v.id,
                })
            })
            .collect::<Result<_>>()?,
        config,
        volume_dirs,
        bridge_enabled: crate::bridge::gate(ctx, &m)?,
    };
    let ep = machine_endpoint(ctx, &m)?;
    match ctx.agents.start(&ep, &run).await {
        Ok(reply) => {
            // A size-limited volume used for the first time now lives on this host.
            for (r, dir) in run.volumes.iter().zip(&reply.volume_dirs) {
                let mut v = volume(ctx, &r.id)?;
                let host = m.host.map(|h| format!("{:x}", h.get()));
                if v.kept_by_agent && (&v.host_dir != dir || v.host != host) {
                    v.host_dir = dir.to_owned();
                    v.host = host;
                    put_volume(ctx, &v)?;
                }
            }
            m = ctx.store.transition(id, &[S::Starting], S::Started)?;
            ctx.store
                .add_event(id, "start", "started", "flyd", serde_json::json!({}))?;
        }
        Err(e) => {
            ctx.store.transition(id, &[S::Starting], S::Failed)?;
            ctx.store.add_event(
                id,
                "start",
                "failed",
                "flyd",
                serde_json::json!({"error": e.message}),
            )?;
            ctx.changed();
            return Err(e);
        }
    }
    ctx.changed();
    Ok(m)
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}", tag = "machines", params(MachinePath), responses((status = 200, body = MachineView), BadRequest, NotFound, ServerFailed))]
async fn get_machine(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<MachineView>> {
    let m = machine_of(&ctx, &app, &id)?;
    let events = ctx.store.events(&id)?;
    let mut v = MachineView::new(&m, Some(events));
    v.previous_instances = crate::migrate::instances(&ctx, &id);
    Ok(Json(v))
}

pub(crate) fn stop_params(req: &StopRequest, config: &MachineConfig) -> Result<StopMachine> {
    let signal = req
        .signal
        .clone()
        .unwrap_or_else(|| config.stop_config.signal().to_owned())
        .to_ascii_uppercase();
    let signal = if signal.starts_with("SIG") {
        signal
    } else {
        format!("SIG{signal}")
    };
    if !ALLOWED_SIGNALS.contains(&signal.as_str()) {
        return Err(ApiError::invalid(format!(
            "signal {signal} is not one of {}",
            ALLOWED_SIGNALS.join(" ")
        )));
    }
    let timeout = match &req.timeout {
        Some(t) => humantime::parse_duration(t).map_err(|_| {
            ApiError::invalid(format!("timeout {t:?} is not a duration like \"5s\""))
        })?,
        None => config.stop_config.timeout(),
    };
    if timeout > MAX_STOP_TIMEOUT {
        return Err(ApiError::invalid(format!(
            "timeout {:?} is over the maximum of 300s",
            timeout
        )));
    }
    Ok(StopMachine {
        signal,
        timeout_ms: timeout.as_millis() as u64,
    })
}

/// started -> stopping -> (agent stops with signal, timeout, SIGKILL) -> stopped.
pub(crate) async fn stop_inner(
    ctx: &Ctx,
    id: &str,
    params: StopMachine,
    next: MachineState,
) -> Result<(Machine, ExitInfo)> {
    let m = ctx
        .store
        .transition(id, &[S::Started, S::Starting], S::Stopping)?;
    ctx.changed();
    let ep = machine_endpoint(ctx, &m)?;
    let exit: ExitInfo = match ctx.agents.stop(&ep, id, &params).await {
        Ok(e) => e,
        Err(e) => {
            ctx.store.transition(id, &[S::Stopping], S::Failed)?;
            ctx.store.add_event(
                id,
                "exit",
                "failed",
                "flyd",
                serde_json::json!({"error": e.message}),
            )?;
            ctx.changed();
            return Err(e);
        }
    };
    let m = ctx.store.transition(id, &[S::Stopping], next)?;
    let ended_by = if exit.escalated_to_sigkill {
        "SIGKILL after timeout".to_owned()
    } else {
        params.signal.clone()
    };
    ctx.store.add_event(
        id,
        "exit",
        "stopped",
        "flyd",
        serde_json::json!({"exit_event": exit, "signal": params.signal, "timeout_ms": params.timeout_ms, "ended_by": ended_by}),
    )?;
    ctx.changed();
    Ok((m, exit))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/stop", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), request_body(content = Option<StopRequest>, description = "Optional: the signal and timeout (defaults from the machine's config)."), responses((status = 200, description = "The machine, stopped.", body = MachineView), BadRequest, NotFound, Conflict, AgentFailed, ServerFailed))]
async fn stop_machine(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<MachineView>> {
    let m = machine_of(&ctx, &app, &id)?;
    let config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
    let params = stop_params(&optional_body::<StopRequest>(&body)?, &config)?;
    ctx.store.check_lease(&id, lease_nonce(&headers))?;
    let (m, _) = stop_inner(&ctx, &id, params, S::Stopped).await?;
    Ok(Json(MachineView::new(&m, None)))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/start", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), responses((status = 200, description = "The machine, started (or `failed`).", body = MachineView), BadRequest, NotFound, Conflict, AgentFailed, ServerFailed))]
async fn start_machine(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<MachineView>> {
    let m = machine_of(&ctx, &app, &id)?;
    ctx.store.check_lease(&id, lease_nonce(&headers))?;
    let config: MachineConfig =
        serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
    let dirs = resolve_volumes(&ctx, &config)?;
    let m = launch(&ctx, &id, dirs, &[S::Created, S::Stopped, S::Failed]).await?;
    Ok(Json(MachineView::new(&m, None)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DestroyQuery {
    /// Destroy a running machine (it is stopped first) instead of answering 409.
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/v1/apps/{app}/machines/{id}", tag = "machines", params(MachinePath, DestroyQuery, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), responses((status = 200, description = "The machine, destroyed.", body = MachineView), BadRequest, NotFound, Conflict, AgentFailed, ServerFailed))]
async fn destroy_machine(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<DestroyQuery>,
    headers: HeaderMap,
) -> Result<Json<MachineView>> {
    let m = machine_of(&ctx, &app, &id)?;
    ctx.store.check_lease(&id, lease_nonce(&headers))?;
    if matches!(m.state, S::Started | S::Starting) {
        if !q.force {
            return Err(ApiError::conflict(
                "machine_running",
                format!(
                    "machine {id} is {}: stop it first, or destroy with force",
                    m.state.as_str()
                ),
            ));
        }
        let config: MachineConfig =
            serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
        stop_inner(
            &ctx,
            &id,
            stop_params(&StopRequest::default(), &config)?,
            S::Stopped,
        )
        .await?;
    }
    let m = ctx
        .store
        .transition(&id, &[S::Created, S::Stopped, S::Failed], S::Destroying)?;
    ctx.changed();
    let ep = machine_endpoint(&ctx, &m)?;
    ctx.agents.destroy(&ep, &id).await?;
    let m = ctx.store.transition(&id, &[S::Destroying], S::Destroyed)?;
    ctx.store
        .add_event(&id, "destroy", "destroyed", "user", serde_json::json!({}))?;
    ctx.changed();
    Ok(Json(MachineView::new(&m, None)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct WaitQuery {
    /// The state to wait for (default `started`): created, starting, started, stopping,
    /// stopped, destroying, destroyed, failed, migrated.
    state: Option<String>,
    /// Seconds to wait at most, 0..=300 (default 60). The answer comes within this bound: 200
    /// as soon as the machine is in the state, 408 when the time is up.
    #[param(minimum = 0, maximum = 300)]
    timeout: Option<u64>,
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/wait", tag = "machines", params(MachinePath, WaitQuery), responses((status = 200, description = "The machine is in the state asked for.", body = WaitView), BadRequest, NotFound, WaitTimeout, ServerFailed))]
async fn wait_machine(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<WaitView>> {
    let want: MachineState = q
        .state
        .as_deref()
        .unwrap_or("started")
        .parse()
        .map_err(|_| {
            ApiError::invalid(format!(
                "state {:?} is not a machine state",
                q.state.clone().unwrap_or_default()
            ))
        })?;
    let timeout = q.timeout.unwrap_or(60);
    if timeout > 300 {
        return Err(ApiError::invalid("timeout is at most 300 seconds"));
    }
    machine_of(&ctx, &app, &id)?;
    let mut rx = ctx.changes.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let m = ctx.store.get_machine(&id)?;
        if m.state == want {
            return Ok(Json(WaitView {
                ok: true,
                state: m.state.as_str().into(),
            }));
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return Err(ApiError::new(
                408,
                "timeout",
                format!(
                    "machine {id} is {}, not {}",
                    m.state.as_str(),
                    want.as_str()
                ),
            ));
        }
    }
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/events", tag = "machines", params(MachinePath), responses((status = 200, description = "The machine's events, oldest first.", body = [EventView]), BadRequest, NotFound, ServerFailed))]
async fn machine_events(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<Vec<EventView>>> {
    machine_of(&ctx, &app, &id)?;
    Ok(Json(
        ctx.store
            .events(&id)?
            .iter()
            .rev()
            .map(EventView::from)
            .collect(),
    ))
}

fn lease_view(l: &ferry_store::Lease) -> LeaseView {
    LeaseView {
        nonce: l.nonce.clone(),
        expires_at: l.expires_at_ms,
        owner: l.owner.clone(),
        description: l.description.clone(),
    }
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/lease", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "Refresh the lease with this nonce instead of taking a new one.")), request_body = LeaseRequest, responses((status = 201, description = "The lease and its nonce.", body = LeaseView), BadRequest, NotFound, Conflict, ServerFailed))]
async fn acquire_lease(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<LeaseView>)> {
    machine_of(&ctx, &app, &id)?;
    let req = optional_body::<LeaseRequest>(&body)?;
    let ttl = req.ttl.unwrap_or(30);
    if !(1..=3600).contains(&ttl) {
        return Err(ApiError::invalid("lease ttl must be 1..=3600 seconds"));
    }
    let desc = req.description.unwrap_or_default();
    if desc.len() > 256 {
        return Err(ApiError::invalid("lease description is at most 256 bytes"));
    }
    // Holding the nonce refreshes; otherwise a new lease (409 while someone else holds one).
    let lease = match lease_nonce(&headers) {
        Some(n) => ctx.store.refresh_lease(&id, n, ttl * 1000)?,
        None => ctx.store.acquire_lease(&id, ttl * 1000, "api", &desc)?,
    };
    Ok((StatusCode::CREATED, Json(lease_view(&lease))))
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/lease", tag = "machines", params(MachinePath), responses((status = 200, body = LeaseView), BadRequest, NotFound, ServerFailed))]
async fn get_lease(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<LeaseView>> {
    machine_of(&ctx, &app, &id)?;
    let l = ctx
        .store
        .current_lease(&id)?
        .ok_or_else(|| ApiError::not_found(format!("lease on machine {id}")))?;
    Ok(Json(lease_view(&l)))
}

#[utoipa::path(delete, path = "/v1/apps/{app}/machines/{id}/lease", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = String, Header, description = "The nonce of the lease to release.")), responses((status = 200, description = "Released (or already gone).", body = OkView), BadRequest, NotFound, Conflict, ServerFailed))]
async fn release_lease(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<OkView>> {
    machine_of(&ctx, &app, &id)?;
    let nonce = lease_nonce(&headers).ok_or_else(|| {
        ApiError::invalid(format!("releasing a lease needs the {LEASE_HEADER} header"))
    })?;
    ctx.store.release_lease(&id, nonce)?;
    Ok(Json(OkView { ok: true }))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/exec", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), request_body = ExecBody, responses((status = 200, description = "The command's exit code and output.", body = ExecView), BadRequest, NotFound, Conflict, AgentFailed, ServerFailed))]
async fn exec_machine(
    State(ctx): Shared,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    Body(req): Body<ExecBody>,
) -> Result<Json<ExecView>> {
    let m = machine_of(&ctx, &app, &id)?;
    if req.cmd.is_empty() || req.cmd[0].is_empty() || req.cmd.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::invalid("cmd must name a program (no NUL bytes)"));
    }
    let timeout = req.timeout.unwrap_or(30);
    if !(1..=600).contains(&timeout) {
        return Err(ApiError::invalid("exec timeout must be 1..=600 seconds"));
    }
    ctx.store.check_lease(&id, lease_nonce(&headers))?;
    if m.state != S::Started {
        return Err(ApiError::conflict(
            "machine_not_started",
            format!("machine {id} is {}", m.state.as_str()),
        ));
    }
    let ep = machine_endpoint(&ctx, &m)?;
    let r: ExecResult = ctx
        .agents
        .exec(
            &ep,
            &id,
            &ExecRequest {
                cmd: req.cmd,
                timeout_ms: timeout * 1000,
            },
        )
        .await?;
    Ok(Json(ExecView {
        exit_code: r.exit_code,
        stdout: r.stdout,
        stderr: r.stderr,
    }))
}

// ---- hosts and volumes ------------------------------------------------------------------------

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", responses((status = 200, description = "Hosts by ID, with their machine counts.", body = [HostView]), ServerFailed))]
async fn list_hosts(State(ctx): Shared) -> Result<Json<Vec<HostView>>> {
    let mut out = Vec::new();
    for h in ctx.store.list_hosts()? {
        out.push(HostView {
            id: format!("{:x}", h.id.get()),
            region: h.region.clone(),
            endpoint: h.endpoint.clone(),
            cordoned: h.cordoned,
            infra_prefix: ferry_addr::host_infra_prefix(h.id).to_string(),
            machines: ctx.store.list_machines_on_host(h.id)?.len(),
        });
    }
    Ok(Json(out))
}

#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", request_body = CreateVolume, responses((status = 201, body = VolumeView), BadRequest, NotFound, Conflict, ServerFailed))]
async fn create_volume(
    State(ctx): Shared,
    Body(req): Body<CreateVolume>,
) -> Result<(StatusCode, Json<VolumeView>)> {
    let id = new_volume_id();
    let (dir, size) = match (req.size_mb, req.host_dir) {
        (Some(s), None) => {
            if !(MIN_VOLUME_MB..=1_048_576).contains(&s) {
                return Err(ApiError::invalid(format!(
                    "size_mb {s} is outside {MIN_VOLUME_MB}..=1048576 (1 TiB)"
                )));
            }
            // Made by the agent of the first machine that mounts it: the server keeps no
            // volume data.
            (PathBuf::new(), Some(s))
        }
        (None, Some(d)) => (ctx.allowed_host_dir(&d)?, None),
        _ => return Err(ApiError::invalid("give exactly one of size_mb or host_dir")),
    };
    let v = VolumeView {
        id: id.clone(),
        host_dir: dir.display().to_string(),
        size_mb: size,
        kept_by_agent: size.is_some(),
        created_at: rfc3339(ctx.store.now_ms()),
        host: None,
        state: "active".into(),
        forked_from: None,
        destroy_after: None,
        destroy_after_ms: None,
        revision: 0,
    };
    put_volume(&ctx, &v)?;
    Ok((StatusCode::CREATED, Json(v)))
}

/// Smallest size-limited volume (an ext4 file system with a journal needs a few MiB).
pub const MIN_VOLUME_MB: u64 = 8;

/// Records a volume. One read before (`v.revision` from [`volume`]): a compare-and-swap, so a
/// concurrent change is a conflict instead of a lost update. A new one (revision 0): created,
/// or, when its creator repeats the step after a crash, replaced.
pub(crate) fn put_volume(ctx: &Ctx, v: &VolumeView) -> Result<()> {
    let mut rec = ferry_store::VolumeRecord {
        id: v.id.clone(),
        state: v.state.clone(),
        host: v.host.clone(),
        destroy_after_ms: v.destroy_after_ms,
        detail: serde_json::to_value(v).map_err(ApiError::internal)?,
        revision: v.revision,
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    if v.revision != 0 {
        ctx.store.update_volume(&rec)?;
        return Ok(());
    }
    match ctx.store.create_volume(&rec) {
        Ok(_) => Ok(()),
        Err(ferry_store::StoreError::Exists { .. }) => {
            rec.revision = ctx.store.get_volume(&v.id)?.revision;
            ctx.store.update_volume(&rec)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Every volume, oldest first.
pub(crate) fn volumes(ctx: &Ctx, state: Option<&str>) -> Result<Vec<VolumeView>> {
    ctx.store
        .list_volumes(state)?
        .into_iter()
        .map(volume_view)
        .collect()
}

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", responses((status = 200, body = [VolumeView]), ServerFailed))]
async fn list_volumes(State(ctx): Shared) -> Result<Json<Vec<VolumeView>>> {
    crate::migrate::expire_volumes(&ctx).await;
    Ok(Json(volumes(&ctx, None)?))
}

// ---- agents -----------------------------------------------------------------------------------

async fn register_host(
    State(ctx): Shared,
    Json(req): Json<RegisterHost>,
) -> Result<Json<serde_json::Value>> {
    let id = HostId::new(req.host_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    // The same registration sent again (the agent's first try reached a server that died before
    // answering): its effects are in the store already, so it adds no event a second time.
    let mut again = false;
    let host = match ctx.store.get_host(id) {
        Ok(mut h) => {
            again = h.endpoint == req.endpoint;
            h.endpoint = req.endpoint.clone();
            h.region = req.region.clone();
            ctx.store.put_host(&h)?
        }
        Err(_) => ctx.store.put_host(&ferry_store::Host {
            id,
            region: req.region.clone(),
            endpoint: req.endpoint.clone(),
            cordoned: false,
            created_at_ms: ctx.store.now_ms(),
        })?,
    };
    // What the store believes runs there but the agent did not find: it died while no agent
    // watched it.
    for m in ctx.store.list_machines_on_host(id)? {
        if m.state == S::Started && !req.running.contains(&m.id) {
            ctx.store.transition(&m.id, &[S::Started], S::Stopped)?;
            ctx.store.add_event(
                &m.id,
                "exit",
                "stopped",
                "flyd",
                serde_json::json!({"reason": "not running when its agent restarted"}),
            )?;
        } else if m.state == S::Started && !again {
            ctx.store.add_event(
                &m.id,
                "reattach",
                "started",
                "flyd",
                serde_json::json!({"host": format!("{:x}", id.get())}),
            )?;
        }
    }
    ctx.changed();
    // The bridge state, after the reply: the agent may wait for this answer before it serves.
    let (c, h) = (ctx.clone(), host.clone());
    tokio::spawn(async move {
        if let Err(e) = crate::bridge::sync_host(&c, &h).await {
            tracing::warn!("pushing the bridge state to a host that registered: {e}");
        }
    });
    Ok(Json(
        serde_json::json!({"host": format!("{:x}", host.id.get())}),
    ))
}

async fn agent_report(
    State(ctx): Shared,
    Json(r): Json<AgentReport>,
) -> Result<Json<serde_json::Value>> {
    let m = ctx.store.get_machine(&r.machine_id)?;
    if m.instance_id != r.instance_id {
        return Ok(Json(serde_json::json!({"ignored": "stale instance"})));
    }
    let to: MachineState = r
        .state
        .parse()
        .map_err(|_| ApiError::invalid(format!("state {:?}", r.state)))?;
    // A report sent again (to another server, after the first one died before answering) is
    // recognized by its ID in the machine's events: recorded once.
    if !r.report_id.is_empty()
        && ctx
            .store
            .events(&m.id)?
            .iter()
            .any(|e| e.request["report_id"] == r.report_id.as_str())
    {
        return Ok(Json(serde_json::json!({"ok": true, "duplicate": true})));
    }
    // A check result changes no state; and a machine the server is still starting becomes
    // `started` by the server's own hand when the agent answers. Refusing those reports would
    // lose them (the agent reports a check only when its result changes).
    let news = r.kind != "check" && !(to == S::Started && m.state == S::Starting);
    if to != m.state && news {
        // Only a running machine can change by itself; anything else is the server's doing.
        ctx.store.transition(&m.id, &[S::Started], to)?;
    }
    ctx.store.add_event(
        &m.id,
        &r.kind,
        &r.state,
        "flyd",
        serde_json::json!({"exit_event": r.exit, "detail": r.detail, "instance_id": r.instance_id, "report_id": r.report_id}),
    )?;
    ctx.changed();
    Ok(Json(serde_json::json!({"ok": true})))
}

/// Starts again every machine in `ids` that is stopped (used when a dev fleet comes back).
pub async fn resume(ctx: &Ctx, ids: &[String]) -> Vec<(String, Result<()>)> {
    let mut out = Vec::new();
    for id in ids {
        let r = async {
            let m = ctx.store.get_machine(id)?;
            let config: MachineConfig =
                serde_json::from_value(m.config.clone()).map_err(ApiError::internal)?;
            let dirs = resolve_volumes(ctx, &config)?;
            launch(ctx, id, dirs, &[S::Stopped, S::Failed, S::Started])
                .await
                .map(|_| ())
        }
        .await;
        out.push((id.clone(), r));
    }
    out
}

/// Stops every started machine (dev shutdown) and returns their IDs.
pub async fn stop_all(ctx: &Ctx) -> Vec<String> {
    let mut stopped = Vec::new();
    let Ok(ms) = ctx.store.list_machines(None) else {
        return stopped;
    };
    let mut tasks = Vec::new();
    for m in ms.into_iter().filter(|m| m.state == S::Started) {
        let Ok(config) = serde_json::from_value::<MachineConfig>(m.config.clone()) else {
            continue;
        };
        let Ok(p) = stop_params(&StopRequest::default(), &config) else {
            continue;
        };
        tasks.push(async move { (m.id.clone(), stop_inner(ctx, &m.id, p, S::Stopped).await) });
    }
    // Concurrently: each stop may wait out its machine's stop timeout.
    for (id, r) in futures::future::join_all(tasks).await {
        if r.is_ok() {
            stopped.push(id);
        }
    }
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent's error code reaches the caller as a code (the driver decides by it), and a
    /// permanent volume error keeps its own status.
    #[tokio::test]
    async fn agent_error_codes_reach_the_caller() {
        let agent = Router::new()
            .route(
                "/stop",
                post(|| async { ApiError::conflict("not_running", "machine x is not running") }),
            )
            .route(
                "/fork",
                post(|| async { ApiError::new(422, crate::error::PERMANENT_VOLUME_ERROR, "dev") }),
            )
            .route(
                "/plain",
                post(|| async { (StatusCode::BAD_GATEWAY, "proxy") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, agent).await });
        let dir = tempfile::tempdir().unwrap();
        let ctx = Ctx::new(
            Arc::new(ferry_store::SqliteStore::in_memory().unwrap()),
            dir.path().into(),
        );
        let call = |p: &str| {
            let url = format!("{base}{p}");
            let http = ctx.http.clone();
            async move {
                crate::agents::answer::<serde_json::Value>(http.post(url).send().await)
                    .await
                    .unwrap_err()
            }
        };
        let e = call("/stop").await;
        assert_eq!((e.status, e.code), (502, "agent_error"));
        assert_eq!(e.agent_code.as_deref(), Some("not_running"));
        let e = call("/fork").await;
        assert_eq!(
            (e.status, e.code),
            (422, crate::error::PERMANENT_VOLUME_ERROR)
        );
        let e = call("/plain").await;
        assert_eq!((e.status, e.agent_code), (502, None));
    }
}

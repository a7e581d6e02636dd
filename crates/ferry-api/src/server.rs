//! The API server: an axum router over the core ([`ferry_core`]). A handler only parses its
//! input (path, query, headers, body), calls one core operation and answers its result; every
//! rule lives in the core.

use crate::doc::{
    AgentFailed, AppPath, BadRequest, Conflict, MachinePath, MetadataPath, NotFound, Refused,
    ServerFailed, TokenPath, Unprocessable, WaitTimeout,
};
use crate::error::ApiError;
use crate::LEASE_HEADER;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use ferry_core::auth::{self, Caller};
use ferry_core::views::*;
use ferry_core::{hosts, machines, volumes, Core};
use serde::Deserialize;
use std::sync::Arc;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

type Result<T> = std::result::Result<T, ApiError>;

pub(crate) type Shared = State<Arc<Core>>;

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
    modifiers(&BearerAuth),
    components(schemas(
        ferry_core::error::ErrorBody,
        ferry_core::migrate::Phase,
        ferry_core::migrate::VolumeFork,
        ferry_core::migrate::MigrationStats,
        ferry_core::migrate::InstanceRecord,
        ferry_core::logs::LogLine,
        ferry_core::dashboard::DashboardEvent,
        ferry_core::proto::VolumeProgress
    ))
)]
pub struct ApiDoc;

/// Every operation needs `Authorization: Bearer <token>` (docs/design.md#tokens): declared once
/// for the whole document.
struct BearerAuth;
impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                utoipa::openapi::security::SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "An API token (`ferry token create`): admin, or scoped to one org.",
                        ))
                        .build(),
                ),
            );
        doc.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// The public API: every route with its OpenAPI operation, registered together.
fn api() -> OpenApiRouter<Arc<Core>> {
    use crate::routes::{bridge, images, migrate};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_app, list_apps))
        .routes(routes!(get_app, delete_app))
        .routes(routes!(list_machines, create_machine))
        .routes(routes!(get_machine, destroy_machine, update_machine))
        .routes(routes!(restart_machine))
        .routes(routes!(signal_machine))
        .routes(routes!(crate::routes::logs::machine_logs))
        .routes(routes!(get_metadata))
        .routes(routes!(set_metadata, delete_metadata))
        .routes(routes!(stop_machine))
        .routes(routes!(start_machine))
        .routes(routes!(wait_machine))
        .routes(routes!(machine_events))
        .routes(routes!(acquire_lease, get_lease, release_lease))
        .routes(routes!(exec_machine))
        .routes(routes!(migrate::migrate_machine))
        .routes(routes!(migrate::migrate_plan))
        .routes(routes!(migrate::drain_plan))
        .routes(routes!(migrate::get_policy, migrate::set_policy))
        .routes(routes!(list_hosts))
        .routes(routes!(migrate::drain))
        .routes(routes!(migrate::remove_host))
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
        .routes(routes!(crate::routes::dashboard::snapshot))
        .routes(routes!(crate::routes::dashboard::events))
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(revoke_token))
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

pub fn router(ctx: Arc<Core>) -> Router {
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
        // The dashboard's page (it reads /v1/dashboard and /v1/dashboard/events).
        .route("/ui", get(crate::routes::dashboard::index))
        .route("/ui/", get(crate::routes::dashboard::index))
        .route("/ui/app.js", get(crate::routes::dashboard::app_js))
        .route("/ui/style.css", get(crate::routes::dashboard::style))
        .route("/ui/favicon.svg", get(crate::routes::dashboard::icon))
        .route("/favicon.ico", get(crate::routes::dashboard::icon))
        // Prometheus' scrape target (OpenMetrics text), outside the JSON document.
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("route") })
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), measure))
        .with_state(ctx)
}

/// Who is calling: the bearer token becomes a [`Caller`] (the core decides; this only extracts
/// the header), or the request is answered 401 here. Only the API document and the dashboard's
/// static page need no token.
/// The events recorded while serving the request name its token ([`auth::acting`]).
async fn authenticate(
    State(ctx): Shared,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // The API document and the dashboard's page (its HTML, script, style and icon hold no data;
    // the page asks for a token and sends it with every read) need none.
    let path = req.uri().path();
    if path == "/openapi.json"
        || path == "/ui"
        || path == "/favicon.ico"
        || path
            .strip_prefix("/ui/")
            .is_some_and(|f| matches!(f, "" | "app.js" | "style.css" | "favicon.svg"))
    {
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::to_owned);
    match auth::authenticate(&ctx, bearer.as_deref()) {
        Ok(caller) => {
            req.extensions_mut().insert(caller.clone());
            auth::acting(&caller, next.run(req)).await
        }
        Err(e) => ApiError(e).into_response(),
    }
}

/// The authenticated caller of a request (set by [`authenticate`]).
pub struct Auth(pub Caller);
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Auth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .map(Auth)
            .ok_or_else(|| ApiError(auth::unauthenticated("no caller on this request")))
    }
}

/// Times every request by method, route template and status (`ferry_api_request_duration_*`).
pub(crate) async fn measure(
    State(ctx): Shared,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    ctx.metrics
        .api_requests
        .get_or_create(&ferry_core::metrics::RouteLabels {
            method,
            route,
            status: resp.status().as_u16().to_string(),
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

async fn metrics(
    State(ctx): Shared,
    Auth(caller): Auth,
) -> Result<impl axum::response::IntoResponse> {
    // Machines, migrations and bridge hits of every org: a cross-org view.
    caller.require_admin()?;
    let text = ferry_core::metrics::scrape(&ctx).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
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
pub(crate) fn optional_body<T: serde::de::DeserializeOwned + Default>(b: &[u8]) -> Result<T> {
    if b.iter().all(|c| c.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| ApiError::invalid(format!("malformed request body: {e}")))
}

#[utoipa::path(post, path = "/v1/apps", tag = "apps", request_body = CreateApp, responses((status = 201, description = "The app, in its org's network.", body = AppView, links(("CreateMachine" = (operation_id = "create_machine", parameters(("app" = "$response.body#/name")))), ("GetApp" = (operation_id = "get_app", parameters(("app" = "$response.body#/name")))), ("ListMachines" = (operation_id = "list_machines", parameters(("app" = "$response.body#/name")))), ("DeleteApp" = (operation_id = "delete_app", parameters(("app" = "$response.body#/name")))))), BadRequest, Conflict, Refused, ServerFailed))]
async fn create_app(
    State(ctx): Shared,
    Auth(caller): Auth,
    Body(req): Body<CreateApp>,
) -> Result<(StatusCode, Json<AppView>)> {
    Ok((
        StatusCode::CREATED,
        Json(machines::create_app(&ctx, &caller, req)?),
    ))
}

#[utoipa::path(get, path = "/v1/apps", tag = "apps", params(OrgQuery), responses((status = 200, description = "Apps by name.", body = [AppView]), BadRequest, Refused, ServerFailed))]
async fn list_apps(
    State(ctx): Shared,
    Auth(caller): Auth,
    Query(q): Query<OrgQuery>,
) -> Result<Json<Vec<AppView>>> {
    Ok(Json(machines::list_apps(
        &ctx,
        &caller,
        q.org_slug.as_deref(),
    )?))
}

#[utoipa::path(get, path = "/v1/apps/{app}", tag = "apps", params(AppPath), responses((status = 200, body = AppView), BadRequest, NotFound, Refused, ServerFailed))]
async fn get_app(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(app): Path<String>,
) -> Result<Json<AppView>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(machines::get_app(&ctx, &app)?))
}

#[utoipa::path(delete, path = "/v1/apps/{app}", tag = "apps", params(AppPath), responses((status = 200, description = "Deleted, with its destroyed machines' records.", body = OkView), BadRequest, NotFound, Conflict, Refused, ServerFailed))]
async fn delete_app(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(app): Path<String>,
) -> Result<Json<OkView>> {
    auth::app(&ctx, &caller, &app)?;
    machines::delete_app(&ctx, &app)?;
    Ok(Json(OkView { ok: true }))
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines", tag = "machines", params(AppPath, ListQuery), responses((status = 200, description = "The app's machines, oldest first.", body = [MachineView]), BadRequest, NotFound, Refused, ServerFailed))]
async fn list_machines(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(app): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<MachineView>>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(machines::list_machines(
        &ctx,
        &app,
        q.include_deleted,
    )?))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines", tag = "machines", params(AppPath), request_body = CreateMachine, responses((status = 200, description = "The machine, placed and started (or `failed` with the agent's reason in its events).", body = MachineView, links(("GetMachine" = (operation_id = "get_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("StopMachine" = (operation_id = "stop_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("StartMachine" = (operation_id = "start_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("WaitMachine" = (operation_id = "wait_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("MachineEvents" = (operation_id = "machine_events", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("DestroyMachine" = (operation_id = "destroy_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("ExecMachine" = (operation_id = "exec_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("AcquireLease" = (operation_id = "acquire_lease", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("GetLease" = (operation_id = "get_lease", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))), ("MigrateMachine" = (operation_id = "migrate_machine", parameters(("app" = "$request.path.app"), ("id" = "$response.body#/id")))))), BadRequest, NotFound, Conflict, Unprocessable, AgentFailed, Refused, ServerFailed))]
async fn create_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(app): Path<String>,
    Body(req): Body<CreateMachine>,
) -> Result<Json<MachineView>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(machines::create_machine(&ctx, &app, req).await?))
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}", tag = "machines", params(MachinePath), responses((status = 200, body = MachineView), BadRequest, NotFound, Refused, ServerFailed))]
async fn get_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<MachineView>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(machines::get_machine(&ctx, &app, &id)?))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/stop", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), request_body(content = Option<StopRequest>, description = "Optional: the signal and timeout (defaults from the machine's config)."), responses((status = 200, description = "The machine, stopped.", body = MachineView), BadRequest, NotFound, Conflict, AgentFailed, Refused, ServerFailed))]
async fn stop_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<MachineView>> {
    auth::app(&ctx, &caller, &app)?;
    let req = optional_body::<StopRequest>(&body)?;
    Ok(Json(
        machines::stop_machine(&ctx, &app, &id, lease_nonce(&headers), req).await?,
    ))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/start", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), responses((status = 200, description = "The machine, started (or `failed`).", body = MachineView), BadRequest, NotFound, Conflict, AgentFailed, Refused, ServerFailed))]
async fn start_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<MachineView>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(
        machines::start_machine(&ctx, &app, &id, lease_nonce(&headers)).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/apps/{app}/machines/{id}", tag = "machines", params(MachinePath, DestroyQuery, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), responses((status = 200, description = "The machine, destroyed.", body = MachineView), BadRequest, NotFound, Conflict, AgentFailed, Refused, ServerFailed))]
async fn destroy_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<DestroyQuery>,
    headers: HeaderMap,
) -> Result<Json<MachineView>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(
        machines::destroy_machine(&ctx, &app, &id, q.force, lease_nonce(&headers)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/wait", tag = "machines", params(MachinePath, WaitQuery), responses((status = 200, description = "The machine is in the state asked for.", body = WaitView), BadRequest, NotFound, WaitTimeout, Refused, ServerFailed))]
async fn wait_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<WaitView>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(
        machines::wait_machine(&ctx, &app, &id, q.state.as_deref(), q.timeout).await?,
    ))
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/events", tag = "machines", params(MachinePath), responses((status = 200, description = "The machine's events, oldest first.", body = [EventView]), BadRequest, NotFound, Refused, ServerFailed))]
async fn machine_events(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<Vec<EventView>>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(machines::machine_events(&ctx, &app, &id)?))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/lease", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "Refresh the lease with this nonce instead of taking a new one.")), request_body = LeaseRequest, responses((status = 201, description = "The lease and its nonce.", body = LeaseView), BadRequest, NotFound, Conflict, Refused, ServerFailed))]
async fn acquire_lease(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<LeaseView>)> {
    auth::app(&ctx, &caller, &app)?;
    let req = optional_body::<LeaseRequest>(&body)?;
    // Holding the nonce refreshes; otherwise a new lease (409 while someone else holds one).
    let lease = machines::acquire_lease(&ctx, &app, &id, lease_nonce(&headers), req)?;
    Ok((StatusCode::CREATED, Json(lease)))
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/lease", tag = "machines", params(MachinePath), responses((status = 200, body = LeaseView), BadRequest, NotFound, Refused, ServerFailed))]
async fn get_lease(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<LeaseView>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(machines::get_lease(&ctx, &app, &id)?))
}

#[utoipa::path(delete, path = "/v1/apps/{app}/machines/{id}/lease", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = String, Header, description = "The nonce of the lease to release.")), responses((status = 200, description = "Released (or already gone).", body = OkView), BadRequest, NotFound, Conflict, Refused, ServerFailed))]
async fn release_lease(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<OkView>> {
    auth::app(&ctx, &caller, &app)?;
    let nonce = lease_nonce(&headers).ok_or_else(|| {
        ApiError::invalid(format!("releasing a lease needs the {LEASE_HEADER} header"))
    })?;
    machines::release_lease(&ctx, &app, &id, nonce)?;
    Ok(Json(OkView { ok: true }))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), request_body = UpdateMachine, responses((status = 200, description = "The machine with its new config and a new instance ID; started again if it was running (unless `skip_launch`).", body = MachineView), BadRequest, NotFound, Conflict, Unprocessable, AgentFailed, Refused, ServerFailed))]
async fn update_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    Body(req): Body<UpdateMachine>,
) -> Result<Json<MachineView>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(
        machines::update_machine(&ctx, &app, &id, lease_nonce(&headers), req).await?,
    ))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/restart", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), request_body(content = Option<StopRequest>, description = "Optional: the signal and timeout of the stop (defaults from the machine's config)."), responses((status = 200, description = "The machine, started again (or `failed`).", body = MachineView), BadRequest, NotFound, Conflict, AgentFailed, Refused, ServerFailed))]
async fn restart_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<MachineView>> {
    auth::app(&ctx, &caller, &app)?;
    let req = optional_body::<StopRequest>(&body)?;
    Ok(Json(
        machines::restart_machine(&ctx, &app, &id, lease_nonce(&headers), req).await?,
    ))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/signal", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), request_body = SignalRequest, responses((status = 200, description = "Sent to the machine's command.", body = OkView), BadRequest, NotFound, Conflict, AgentFailed, Refused, ServerFailed))]
async fn signal_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    Body(req): Body<SignalRequest>,
) -> Result<Json<OkView>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(
        machines::signal_machine(&ctx, &app, &id, lease_nonce(&headers), req).await?,
    ))
}

#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/metadata", tag = "machines", params(MachinePath), responses((status = 200, description = "The machine's metadata (`config.metadata`).", body = MetadataView), BadRequest, NotFound, Refused, ServerFailed))]
async fn get_metadata(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<MetadataView>> {
    auth::app(&ctx, &caller, &app)?;
    let metadata = machines::get_metadata(&ctx, &app, &id)?;
    Ok(Json(MetadataView { metadata }))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/metadata/{key}", tag = "machines", params(MetadataPath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), request_body = MetadataValue, responses((status = 200, description = "The metadata now; no restart, no new instance.", body = MetadataView), BadRequest, NotFound, Conflict, Refused, ServerFailed))]
async fn set_metadata(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id, key)): Path<(String, String, String)>,
    headers: HeaderMap,
    Body(req): Body<MetadataValue>,
) -> Result<Json<MetadataView>> {
    auth::app(&ctx, &caller, &app)?;
    let nonce = lease_nonce(&headers);
    let metadata = machines::set_metadata(&ctx, &app, &id, nonce, &key, Some(req.value))?;
    Ok(Json(MetadataView { metadata }))
}

#[utoipa::path(delete, path = "/v1/apps/{app}/machines/{id}/metadata/{key}", tag = "machines", params(MetadataPath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), responses((status = 200, description = "The metadata now.", body = MetadataView), BadRequest, NotFound, Conflict, Refused, ServerFailed))]
async fn delete_metadata(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id, key)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Json<MetadataView>> {
    auth::app(&ctx, &caller, &app)?;
    let nonce = lease_nonce(&headers);
    let metadata = machines::set_metadata(&ctx, &app, &id, nonce, &key, None)?;
    Ok(Json(MetadataView { metadata }))
}

#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/exec", tag = "machines", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), request_body = ExecBody, responses((status = 200, description = "The command's exit code and output.", body = ExecView), BadRequest, NotFound, Conflict, AgentFailed, Refused, ServerFailed))]
async fn exec_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    Body(req): Body<ExecBody>,
) -> Result<Json<ExecView>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(
        machines::exec_machine(&ctx, &app, &id, lease_nonce(&headers), req).await?,
    ))
}

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", responses((status = 200, description = "Hosts by ID, with their machine counts.", body = [HostView]), Refused, ServerFailed))]
async fn list_hosts(State(ctx): Shared, Auth(caller): Auth) -> Result<Json<Vec<HostView>>> {
    caller.require_admin()?;
    Ok(Json(hosts::list_hosts(&ctx)?))
}

#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", request_body = CreateVolume, responses((status = 201, body = VolumeView), BadRequest, NotFound, Conflict, Refused, ServerFailed))]
async fn create_volume(
    State(ctx): Shared,
    Auth(caller): Auth,
    Body(req): Body<CreateVolume>,
) -> Result<(StatusCode, Json<VolumeView>)> {
    Ok((
        StatusCode::CREATED,
        Json(volumes::create_volume(&ctx, &caller, req)?),
    ))
}

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", responses((status = 200, body = [VolumeView]), Refused, ServerFailed))]
async fn list_volumes(State(ctx): Shared, Auth(caller): Auth) -> Result<Json<Vec<VolumeView>>> {
    Ok(Json(volumes::list_volumes(&ctx, &caller).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct OrgQuery {
    /// Only this org's apps.
    org_slug: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Also list destroyed and migrated-away machines.
    #[serde(default)]
    include_deleted: bool,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DestroyQuery {
    /// Destroy a running machine (it is stopped first) instead of answering 409.
    #[serde(default)]
    force: bool,
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

pub(crate) fn lease_nonce(h: &HeaderMap) -> Option<&str> {
    h.get(LEASE_HEADER).and_then(|v| v.to_str().ok())
}

#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = auth::CreateToken, responses((status = 201, description = "The token: its secret is shown this once (the store keeps only its hash).", body = auth::CreatedToken), BadRequest, Refused, ServerFailed))]
async fn create_token(
    State(ctx): Shared,
    Auth(caller): Auth,
    Body(req): Body<auth::CreateToken>,
) -> Result<(StatusCode, Json<auth::CreatedToken>)> {
    Ok((
        StatusCode::CREATED,
        Json(auth::create_token(&ctx, &caller, req)?),
    ))
}

#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", responses((status = 200, description = "Every token, revoked ones too, without secrets.", body = [auth::TokenView]), Refused, ServerFailed))]
async fn list_tokens(State(ctx): Shared, Auth(caller): Auth) -> Result<Json<Vec<auth::TokenView>>> {
    Ok(Json(auth::list_tokens(&ctx, &caller)?))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", params(TokenPath), responses((status = 200, description = "Revoked: every later call with it answers 401.", body = auth::TokenView), BadRequest, NotFound, Refused, ServerFailed))]
async fn revoke_token(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<Json<auth::TokenView>> {
    Ok(Json(auth::revoke_token(&ctx, &caller, &id)?))
}

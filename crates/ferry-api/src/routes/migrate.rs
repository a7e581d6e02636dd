//! Migrations, migration policies, cordons and drains over HTTP (the rules: [`migrate`]).

use crate::doc::{
    AgentFailed, AppPath, BadRequest, Conflict, HostPath, MachinePath, MigrationPath, NotFound,
    Refused, ServerFailed, Unprocessable,
};
use crate::server::{lease_nonce, optional_body, Auth, Body, Path, Query, Shared};
use crate::ApiError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_core::auth;
use ferry_core::hosts;
use ferry_core::migrate::preview::{self, MovePlan};
use ferry_core::migrate::{
    self, DrainView, MigratePolicy, MigrateRequest, Migration, PolicyUpdate,
};
use ferry_core::views::{CordonView, HostView};
use serde::Deserialize;

type Result<T> = std::result::Result<T, ApiError>;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this machine's migrations.
    machine: Option<String>,
    /// Only the migrations of this host's drain (the host's ID).
    drain: Option<String>,
}

/// `POST /v1/apps/{app}/machines/{id}/migrate`: starts a migration and answers at once (202);
/// follow it with `GET /v1/migrations/{id}`.
#[utoipa::path(post, path = "/v1/apps/{app}/machines/{id}/migrate", tag = "migrations", params(MachinePath, ("fly-machine-lease-nonce" = Option<String>, Header, description = "The nonce of the lease you hold; required while someone holds the machine's lease.")), request_body(content = Option<MigrateRequest>, description = "Optional: the destination host and options."), responses((status = 202, description = "The migration, started; follow it at /v1/migrations/{id}.", body = Migration, links(("GetMigration" = (operation_id = "get_migration", parameters(("id" = "$response.body#/id")))))), BadRequest, NotFound, Conflict, Unprocessable, AgentFailed, Refused, ServerFailed))]
pub async fn migrate_machine(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Migration>)> {
    auth::app(&ctx, &caller, &app)?;
    let req: MigrateRequest = optional_body(&body)?;
    let mig = migrate::migrate_machine(&ctx, &app, &id, lease_nonce(&headers), req)?;
    Ok((StatusCode::ACCEPTED, Json(mig)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PlanQuery {
    /// The destination host (hex); default: placement's choice.
    to: Option<String>,
}

/// `GET /v1/apps/{app}/machines/{id}/migrate/plan`: what migrating it would do, and who holds
/// its address; changes nothing.
#[utoipa::path(get, path = "/v1/apps/{app}/machines/{id}/migrate/plan", operation_id = "migrate_plan", tag = "migrations", params(MachinePath, PlanQuery), responses((status = 200, description = "The plan and its impact. Nothing was changed.", body = MovePlan), BadRequest, NotFound, Conflict, Refused, ServerFailed))]
pub async fn migrate_plan(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<PlanQuery>,
) -> Result<Json<MovePlan>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(
        preview::migrate_plan(&ctx, &app, &id, q.to.as_deref()).await?,
    ))
}

/// `GET /v1/hosts/{id}/drain/plan`: what draining the host would do, and who would break;
/// changes nothing.
#[utoipa::path(get, path = "/v1/hosts/{id}/drain/plan", operation_id = "drain_plan", tag = "hosts", params(HostPath), responses((status = 200, description = "The plan and its impact. Nothing was changed (the host is not cordoned).", body = MovePlan), BadRequest, NotFound, Refused, ServerFailed))]
pub async fn drain_plan(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(host): Path<String>,
) -> Result<Json<MovePlan>> {
    caller.require_admin()?;
    Ok(Json(preview::drain_plan(&ctx, &host).await?))
}

/// `GET /v1/migrations`: newest last.
#[utoipa::path(get, path = "/v1/migrations", operation_id = "list_migrations", tag = "migrations", params(ListQuery), responses((status = 200, description = "Migrations, oldest first.", body = [Migration]), BadRequest, Refused, ServerFailed))]
pub async fn list(
    State(ctx): Shared,
    Auth(caller): Auth,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Migration>>> {
    Ok(Json(migrate::list(
        &ctx,
        &caller,
        q.machine.as_deref(),
        q.drain.as_deref(),
    )?))
}

/// `GET /v1/migrations/{id}`.
#[utoipa::path(get, path = "/v1/migrations/{id}", operation_id = "get_migration", tag = "migrations", params(MigrationPath), responses((status = 200, body = Migration), BadRequest, NotFound, Refused, ServerFailed))]
pub async fn get(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(id): Path<String>,
) -> Result<Json<Migration>> {
    Ok(Json(migrate::get(&ctx, &caller, &id)?))
}

/// `GET /v1/apps/{app}/policy`.
#[utoipa::path(get, path = "/v1/apps/{app}/policy", tag = "migrations", params(AppPath), responses((status = 200, body = MigratePolicy), BadRequest, NotFound, Refused, ServerFailed))]
pub async fn get_policy(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(app): Path<String>,
) -> Result<Json<MigratePolicy>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(migrate::get_policy(&ctx, &app)?))
}

/// `POST /v1/apps/{app}/policy`: changes the given fields; everything is checked before any is
/// stored.
#[utoipa::path(post, path = "/v1/apps/{app}/policy", tag = "migrations", params(AppPath), request_body = PolicyUpdate, responses((status = 200, description = "The policy now in force.", body = MigratePolicy), BadRequest, NotFound, Refused, ServerFailed))]
pub async fn set_policy(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(app): Path<String>,
    Body(req): Body<PolicyUpdate>,
) -> Result<Json<MigratePolicy>> {
    auth::app(&ctx, &caller, &app)?;
    Ok(Json(migrate::set_policy(&ctx, &app, req)?))
}

/// `DELETE /v1/hosts/{id}`: the host leaves the fleet.
#[utoipa::path(delete, path = "/v1/hosts/{id}", operation_id = "remove_host", tag = "hosts", params(HostPath), responses((status = 200, description = "The host as it was. Every other host drops its route to it; its ID is never used again. Stop its agent first.", body = HostView), BadRequest, NotFound, Conflict, Refused, ServerFailed))]
pub async fn remove_host(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(host): Path<String>,
) -> Result<Json<HostView>> {
    caller.require_admin()?;
    Ok(Json(hosts::remove_host(&ctx, &host)?))
}

/// `POST /v1/hosts/{id}/cordon` and `/uncordon`.
#[utoipa::path(post, path = "/v1/hosts/{id}/cordon", tag = "hosts", params(HostPath), responses((status = 200, description = "The host takes no new machines.", body = CordonView), BadRequest, NotFound, Refused, ServerFailed))]
pub async fn cordon(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(host): Path<String>,
) -> Result<Json<CordonView>> {
    caller.require_admin()?;
    Ok(Json(hosts::set_cordoned(&ctx, &host, true)?))
}

#[utoipa::path(post, path = "/v1/hosts/{id}/uncordon", tag = "hosts", params(HostPath), responses((status = 200, description = "The host takes machines again.", body = CordonView), BadRequest, NotFound, Refused, ServerFailed))]
pub async fn uncordon(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(host): Path<String>,
) -> Result<Json<CordonView>> {
    caller.require_admin()?;
    Ok(Json(hosts::set_cordoned(&ctx, &host, false)?))
}

/// `POST /v1/hosts/{id}/drain`: cordon, then a migration for every machine on the host. Within a
/// network they run one at a time (the network lock), each waiting for its machine to be healthy
/// for the app's `min_healthy_time` before the next starts; networks proceed in parallel.
#[utoipa::path(post, path = "/v1/hosts/{id}/drain", tag = "hosts", params(HostPath), responses((status = 202, description = "The host is cordoned and its machines are moving.", body = DrainView), BadRequest, NotFound, Conflict, Refused, ServerFailed))]
pub async fn drain(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(host): Path<String>,
) -> Result<(StatusCode, Json<DrainView>)> {
    caller.require_admin()?;
    Ok((StatusCode::ACCEPTED, Json(migrate::drain(&ctx, &host)?)))
}

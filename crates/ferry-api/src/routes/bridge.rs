//! The bridge over HTTP (the rules: [`bridge`]).

use crate::doc::{BadRequest, Conflict, NotFound, Refused, ServerFailed};
use crate::server::{Auth, Body, Shared};
use crate::ApiError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_core::bridge::{
    self, GateRequest, Gates, MapRequest, MappingView, ReportLine, RetireRequest,
};

type Result<T> = std::result::Result<T, ApiError>;

/// `POST /v1/bridge`: map OLD to NEW (both in one org's network).
#[utoipa::path(post, path = "/v1/bridge", operation_id = "map_address", tag = "bridge", request_body = MapRequest, responses((status = 201, description = "The mapping, pushed to every host.", body = MappingView), BadRequest, Conflict, Refused, ServerFailed))]
pub async fn map(
    State(ctx): Shared,
    Auth(caller): Auth,
    Body(req): Body<MapRequest>,
) -> Result<(StatusCode, Json<MappingView>)> {
    Ok((
        StatusCode::CREATED,
        Json(bridge::map(&ctx, &caller, req).await?),
    ))
}

/// `GET /v1/bridge`: every mapping with its hits.
#[utoipa::path(get, path = "/v1/bridge", operation_id = "list_bridge_mappings", tag = "bridge", responses((status = 200, description = "Every mapping, with its hits so far.", body = [MappingView]), Refused, ServerFailed))]
pub async fn list(State(ctx): Shared, Auth(caller): Auth) -> Result<Json<Vec<MappingView>>> {
    Ok(Json(bridge::list(&ctx, &caller).await?))
}

/// `GET /v1/bridge/report`: per machine, the old addresses it still dials.
#[utoipa::path(get, path = "/v1/bridge/report", operation_id = "bridge_report", tag = "bridge", responses((status = 200, description = "Per machine, the old addresses it still dials.", body = [ReportLine]), Refused, ServerFailed))]
pub async fn report(State(ctx): Shared, Auth(caller): Auth) -> Result<Json<Vec<ReportLine>>> {
    Ok(Json(bridge::report(&ctx, &caller).await?))
}

/// `POST /v1/bridge/retire`: the old address fails fast from now on and never reaches anyone.
#[utoipa::path(post, path = "/v1/bridge/retire", operation_id = "retire_bridge_mappings", tag = "bridge", request_body = RetireRequest, responses((status = 200, description = "The mappings retired by this call.", body = [MappingView]), BadRequest, NotFound, Refused, ServerFailed))]
pub async fn retire(
    State(ctx): Shared,
    Auth(caller): Auth,
    Body(req): Body<RetireRequest>,
) -> Result<Json<Vec<MappingView>>> {
    Ok(Json(bridge::retire(&ctx, &caller, req).await?))
}

/// `POST /v1/bridge/gate`: switch the bridge on or off for an org or an app.
#[utoipa::path(post, path = "/v1/bridge/gate", operation_id = "set_bridge_gate", tag = "bridge", request_body = GateRequest, responses((status = 200, description = "The gates now in force.", body = Gates), BadRequest, NotFound, Refused, ServerFailed))]
pub async fn set_gate(
    State(ctx): Shared,
    Auth(caller): Auth,
    Body(req): Body<GateRequest>,
) -> Result<Json<Gates>> {
    Ok(Json(bridge::set_gate(&ctx, &caller, req).await?))
}

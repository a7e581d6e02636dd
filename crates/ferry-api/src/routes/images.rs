//! Images and registries over HTTP (the rules: [`images`]).

use crate::doc::{AgentFailed, BadRequest, Conflict, NotFound, Refused, ServerFailed};
use crate::server::{Auth, Body, Path, Shared};
use crate::ApiError;
use axum::extract::State;
use axum::Json;
use ferry_core::images::{
    self, PullRequest, RegistrySettings, RegistryView, RemoveRequest, RemovedView,
};
use ferry_core::proto::{ImageInfo, PullLine};
use futures::StreamExt;
use serde::Deserialize;

type Result<T, E = ApiError> = std::result::Result<T, E>;

/// `/v1/registries/{registry}`
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RegistryPath {
    /// `host[:port]`, as image references name it.
    pub registry: String,
}

/// `POST /v1/images/pull`: pulls on one host or on all, answering newline-delimited JSON as it
/// goes: `{"progress": {...}}` lines, then per host one `{"image": {...}}` (with `host` set) or
/// `{"error": {"status", "code", "message"}}`. A bad request is refused before the stream.
#[utoipa::path(post, path = "/v1/images/pull", operation_id = "pull_image", tag = "images", request_body = PullRequest,
    responses(
        (status = 200, description = "Newline-delimited JSON, one PullLine per line: progress, then per host the image (with `host`) or an error.", content_type = "application/x-ndjson", body = PullLine),
        BadRequest, NotFound, Refused, ServerFailed))]
pub async fn pull(
    State(ctx): Shared,
    Auth(caller): Auth,
    Body(req): Body<PullRequest>,
) -> Result<impl axum::response::IntoResponse> {
    caller.require_admin()?;
    let lines = images::pull(ctx, req)?;
    let body = lines.map(|line| {
        let mut bytes = serde_json::to_vec(&line).expect("serializable");
        bytes.push(b'\n');
        Ok::<_, std::convert::Infallible>(bytes)
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(body),
    ))
}

/// `GET /v1/images`: every image on every host, with the machines using it.
#[utoipa::path(get, path = "/v1/images", operation_id = "list_images", tag = "images",
    responses((status = 200, description = "Every image on every host, with the machines using it.", body = [ImageInfo]), AgentFailed, Refused, ServerFailed))]
pub async fn list(State(ctx): Shared, Auth(caller): Auth) -> Result<Json<Vec<ImageInfo>>> {
    caller.require_admin()?;
    Ok(Json(images::list(&ctx).await?))
}

/// `POST /v1/images/remove`: removes the image from the hosts that hold it, and with it every
/// layer no other image there uses. Refused (409 `image_in_use`, nothing removed anywhere) while
/// a machine names it.
#[utoipa::path(post, path = "/v1/images/remove", operation_id = "remove_image", tag = "images", request_body = RemoveRequest,
    responses(
        (status = 200, description = "What was removed on each host.", body = [RemovedView]),
        BadRequest, NotFound, Conflict, AgentFailed, Refused, ServerFailed))]
pub async fn remove(
    State(ctx): Shared,
    Auth(caller): Auth,
    Body(req): Body<RemoveRequest>,
) -> Result<Json<Vec<RemovedView>>> {
    caller.require_admin()?;
    Ok(Json(images::remove(&ctx, req).await?))
}

/// `GET /v1/registries`: settings of every registry (no secrets).
#[utoipa::path(get, path = "/v1/registries", tag = "images",
    responses((status = 200, description = "Registry settings, without secrets.", body = [RegistryView]), Refused, ServerFailed))]
pub async fn list_registries(
    State(ctx): Shared,
    Auth(caller): Auth,
) -> Result<Json<Vec<RegistryView>>> {
    caller.require_admin()?;
    Ok(Json(images::list_registries(&ctx)?))
}

/// `PUT /v1/registries/{registry}`: plain HTTP and credentials for one registry.
#[utoipa::path(put, path = "/v1/registries/{registry}", tag = "images", request_body = RegistrySettings,
    params(RegistryPath),
    responses((status = 200, body = RegistryView), BadRequest, Refused, ServerFailed))]
pub async fn put_registry(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(registry): Path<String>,
    Body(s): Body<RegistrySettings>,
) -> Result<Json<RegistryView>> {
    caller.require_admin()?;
    Ok(Json(images::put_registry(&ctx, &registry, s)?))
}

/// `DELETE /v1/registries/{registry}`: forget its settings (and credentials).
#[utoipa::path(delete, path = "/v1/registries/{registry}", tag = "images",
    params(RegistryPath),
    responses((status = 200, description = "The settings that were removed.", body = RegistryView), BadRequest, NotFound, Refused, ServerFailed))]
pub async fn delete_registry(
    State(ctx): Shared,
    Auth(caller): Auth,
    Path(registry): Path<String>,
) -> Result<Json<RegistryView>> {
    caller.require_admin()?;
    Ok(Json(images::delete_registry(&ctx, &registry)?))
}

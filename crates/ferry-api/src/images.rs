//! OCI images through the API: pulls on hosts (with progress), the fleet's image list, removal,
//! registry settings (plain HTTP, credentials), and the step every machine with an image goes
//! through before the server creates or moves it: [`ensure_on_host`], which makes the host's
//! agent pull the image and answers the pinned reference (`registry/repo@sha256:...`) that the
//! machine's config then records.
//!
//! Credentials live in the store (key `registries`), go to an agent only inside a pull request,
//! and are never logged or returned: the API shows which kind of auth a registry has, not the
//! secret.
//!
//! **Invariant:** a machine is created (or moved) only after its host holds its image, so an
//! image that cannot be pulled, verified or unpacked creates nothing.

use crate::doc::{AgentFailed, BadRequest, Conflict, NotFound, ServerFailed};
use crate::error::ApiError;
use crate::proto::{ImageInfo, ImagePull, ImageRemove, PullLine, RegistryCredentials};
use crate::server::{parse_host, Body, Ctx, Path};
use axum::extract::State;
use axum::Json;
use ferry_store::Host;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa::ToSchema;

type Result<T, E = ApiError> = std::result::Result<T, E>;
type Shared = State<Arc<Ctx>>;

const REGISTRIES_KEY: &str = "registries";

/// How the fleet talks to one registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// Plain HTTP instead of HTTPS (registries on loopback are always spoken to so).
    #[serde(default)]
    pub insecure: bool,
    /// Basic (`username`, `password`) or bearer (`token`) credentials.
    #[serde(default)]
    pub credentials: Option<RegistryCredentials>,
}

/// A registry's settings as the API shows them: never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegistryView {
    /// `host[:port]`, as image references name it.
    pub registry: String,
    pub insecure: bool,
    /// `none`, `basic` or `bearer`.
    pub auth: String,
    /// The basic-auth user name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
}

impl RegistryView {
    fn new(registry: &str, s: &RegistrySettings) -> Self {
        let (auth, username) = match &s.credentials {
            None => ("none", None),
            Some(RegistryCredentials::Basic { username, .. }) => ("basic", Some(username.clone())),
            Some(RegistryCredentials::Bearer { .. }) => ("bearer", None),
        };
        RegistryView {
            registry: registry.into(),
            insecure: s.insecure,
            auth: auth.into(),
            username,
        }
    }
}

/// Every registry's settings.
pub fn registries(ctx: &Ctx) -> Result<BTreeMap<String, RegistrySettings>> {
    match ctx.store.kv_get(REGISTRIES_KEY)? {
        None => Ok(BTreeMap::new()),
        Some(raw) => serde_json::from_str(&raw).map_err(ApiError::internal),
    }
}

/// Sets (or with `None`, forgets) one registry's settings; `ferry dev --registry` and
/// `--registry-auth` use this at start.
pub fn set_registry(ctx: &Ctx, registry: &str, s: Option<RegistrySettings>) -> Result<()> {
    validate_registry(registry)?;
    let mut all = registries(ctx)?;
    match s {
        Some(s) => all.insert(registry.to_string(), s),
        None => all.remove(registry),
    };
    ctx.store.kv_put(
        REGISTRIES_KEY,
        &serde_json::to_string(&all).map_err(ApiError::internal)?,
    )?;
    Ok(())
}

fn validate_registry(r: &str) -> Result<()> {
    let ok = !r.is_empty()
        && r.len() <= 255
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "registry {r:?} is not a host[:port] like localhost:5000"
        )))
    }
}

/// The registry an image reference names (its first component when that looks like a host,
/// as the reference grammar says; Docker Hub otherwise).
pub fn registry_of(image: &str) -> String {
    let first = image.split('/').next().unwrap_or("");
    if image.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost") {
        first.to_string()
    } else {
        "docker.io".into()
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(h, p)| p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':'))
        .map_or(registry, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

fn pull_request(ctx: &Ctx, image: &str) -> Result<ImagePull> {
    let registry = registry_of(image);
    let s = registries(ctx)?.remove(&registry).unwrap_or_default();
    Ok(ImagePull {
        reference: image.to_string(),
        insecure: s.insecure || is_loopback(&registry),
        credentials: s.credentials,
    })
}

/// The stable codes an agent's image errors carry (the API's codes are `&'static str`).
fn static_code(code: &str) -> &'static str {
    const CODES: [&str; 12] = [
        "invalid",
        "image_not_found",
        "registry_unreachable",
        "registry_unauthorized",
        "registry_error",
        "image_digest_mismatch",
        "image_invalid",
        "image_platform",
        "image_too_big",
        "image_layer_escape",
        "image_in_use",
        "not_found",
    ];
    CODES
        .iter()
        .find(|c| **c == code)
        .map_or("agent_error", |c| match *c {
            "invalid" => "invalid_argument",
            c => c,
        })
}

fn line_error(host: &Host, status: u16, code: &str, message: &str) -> ApiError {
    ApiError::new(
        status,
        static_code(code),
        format!("host {:x}: {message}", host.id.get()),
    )
}

/// Starts a pull on `host`'s agent; the stream of its answer lines.
async fn agent_pull(
    ctx: &Ctx,
    host: &Host,
    req: &ImagePull,
) -> Result<futures::stream::BoxStream<'static, PullLine>> {
    ctx.agents.image_pull(&host.endpoint, req).await
}

/// Makes `host` hold `image` (pulling what it lacks) and answers the pinned reference a
/// machine's config records. Every image error comes back with its own status and code.
pub async fn ensure_on_host(ctx: &Ctx, host: &Host, image: &str) -> Result<String> {
    crate::config::validate_image_ref(image)?;
    let req = pull_request(ctx, image)?;
    let mut lines = Box::pin(agent_pull(ctx, host, &req).await?);
    while let Some(line) = lines.next().await {
        match line {
            PullLine::Progress(_) => {}
            PullLine::Image(info) => return Ok(info.pinned),
            PullLine::Error {
                status,
                code,
                message,
            } => return Err(line_error(host, status, &code, &message)),
        }
    }
    Err(ApiError::new(
        502,
        "agent_error",
        format!("host {:x}: the pull ended without an answer", host.id.get()),
    ))
}

/// `POST /v1/images/pull` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// `registry/repository:tag` or `...@sha256:...`.
    pub image: String,
    /// One host (hex); every uncordoned host if absent.
    #[serde(default)]
    pub host: Option<String>,
}

fn target_hosts(ctx: &Ctx, host: Option<&str>) -> Result<Vec<Host>> {
    let hosts = ctx.store.list_hosts()?;
    match host {
        Some(h) => {
            let id = parse_host(h)?;
            let found = hosts
                .into_iter()
                .find(|x| x.id == id)
                .ok_or_else(|| ApiError::not_found(format!("host {h}")))?;
            Ok(vec![found])
        }
        None => {
            let hs: Vec<Host> = hosts.into_iter().filter(|h| !h.cordoned).collect();
            if hs.is_empty() {
                return Err(ApiError::unavailable("no host is available"));
            }
            Ok(hs)
        }
    }
}

/// `POST /v1/images/pull`: pulls on one host or on all, answering newline-delimited JSON as it
/// goes: `{"progress": {...}}` lines, then per host one `{"image": {...}}` (with `host` set) or
/// `{"error": {"status", "code", "message"}}`. A bad request is refused before the stream.
#[utoipa::path(post, path = "/v1/images/pull", operation_id = "pull_image", tag = "images", request_body = PullRequest,
    responses(
        (status = 200, description = "Newline-delimited JSON, one PullLine per line: progress, then per host the image (with `host`) or an error.", content_type = "application/x-ndjson", body = PullLine),
        BadRequest, NotFound, ServerFailed))]
pub async fn pull(
    State(ctx): Shared,
    Body(req): Body<PullRequest>,
) -> Result<impl axum::response::IntoResponse> {
    crate::config::validate_image_ref(&req.image)?;
    let hosts = target_hosts(&ctx, req.host.as_deref())?;
    let pull = pull_request(&ctx, &req.image)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<PullLine>();
    tokio::spawn(async move {
        for h in hosts {
            let hex = format!("{:x}", h.id.get());
            match agent_pull(&ctx, &h, &pull).await {
                Err(e) => {
                    let _ = tx.send(PullLine::Error {
                        status: e.status,
                        code: e.code.into(),
                        message: e.message,
                    });
                }
                Ok(lines) => {
                    let mut lines = Box::pin(lines);
                    while let Some(l) = lines.next().await {
                        let l = match l {
                            PullLine::Image(mut i) => {
                                i.host = Some(hex.clone());
                                PullLine::Image(i)
                            }
                            PullLine::Progress(mut p) => {
                                p["host"] = serde_json::Value::String(hex.clone());
                                PullLine::Progress(p)
                            }
                            e => e,
                        };
                        let _ = tx.send(l);
                    }
                }
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        let mut bytes = serde_json::to_vec(&line).expect("serializable");
        bytes.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(bytes), rx))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(body),
    ))
}

async fn host_images(ctx: &Ctx, h: &Host) -> Result<Vec<ImageInfo>> {
    let mut v = ctx.agents.image_list(&h.endpoint).await.map_err(|mut e| {
        e.message = format!("host {:x}: {}", h.id.get(), e.message);
        e
    })?;
    for i in &mut v {
        i.host = Some(format!("{:x}", h.id.get()));
    }
    Ok(v)
}

/// `GET /v1/images`: every image on every host, with the machines using it.
#[utoipa::path(get, path = "/v1/images", operation_id = "list_images", tag = "images",
    responses((status = 200, description = "Every image on every host, with the machines using it.", body = [ImageInfo]), AgentFailed, ServerFailed))]
pub async fn list(State(ctx): Shared) -> Result<Json<Vec<ImageInfo>>> {
    let mut out = Vec::new();
    for h in ctx.store.list_hosts()? {
        out.extend(host_images(&ctx, &h).await?);
    }
    Ok(Json(out))
}

/// `POST /v1/images/remove` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    /// A digest, a pinned reference or a name the image was pulled as.
    pub image: String,
    /// One host (hex); every host holding the image if absent.
    #[serde(default)]
    pub host: Option<String>,
}

/// What a removal did on one host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RemovedView {
    pub host: String,
    /// Layers that no image on the host uses any more, now deleted.
    pub removed_layers: Vec<String>,
}

/// `POST /v1/images/remove`: removes the image from the hosts that hold it, and with it every
/// layer no other image there uses. Refused (409 `image_in_use`, nothing removed anywhere) while
/// a machine names it.
#[utoipa::path(post, path = "/v1/images/remove", operation_id = "remove_image", tag = "images", request_body = RemoveRequest,
    responses(
        (status = 200, description = "What was removed on each host.", body = [RemovedView]),
        BadRequest, NotFound, Conflict, AgentFailed, ServerFailed))]
pub async fn remove(
    State(ctx): Shared,
    Body(req): Body<RemoveRequest>,
) -> Result<Json<Vec<RemovedView>>> {
    crate::config::validate_image_ref(&req.image)
        .or_else(|_| crate::config::validate_image_ref(&format!("x@{}", req.image)))?;
    let hosts = match &req.host {
        Some(h) => target_hosts(&ctx, Some(h))?,
        None => ctx.store.list_hosts()?,
    };
    // Check everywhere first: a refusal on one host must not leave the others half done.
    let matches = |i: &ImageInfo| {
        i.digest == req.image || i.pinned == req.image || i.names.contains(&req.image)
    };
    let mut holders = Vec::new();
    for h in hosts {
        let imgs = host_images(&ctx, &h).await?;
        if let Some(i) = imgs.iter().find(|i| matches(i)) {
            if let Some(m) = i.machines.first() {
                return Err(ApiError::conflict(
                    "image_in_use",
                    format!(
                        "image {} is used by machine {m} on host {:x}",
                        req.image,
                        h.id.get()
                    ),
                ));
            }
            holders.push((h, i.digest.clone()));
        }
    }
    if holders.is_empty() {
        return Err(ApiError::not_found(format!("image {}", req.image)));
    }
    let mut out = Vec::new();
    for (h, digest) in holders {
        let removed_layers = ctx
            .agents
            .image_remove(&h.endpoint, &ImageRemove { reference: digest })
            .await?;
        out.push(RemovedView {
            host: format!("{:x}", h.id.get()),
            removed_layers,
        });
    }
    Ok(Json(out))
}

/// `GET /v1/registries`: settings of every registry (no secrets).
#[utoipa::path(get, path = "/v1/registries", tag = "images",
    responses((status = 200, description = "Registry settings, without secrets.", body = [RegistryView]), ServerFailed))]
pub async fn list_registries(State(ctx): Shared) -> Result<Json<Vec<RegistryView>>> {
    Ok(Json(
        registries(&ctx)?
            .iter()
            .map(|(r, s)| RegistryView::new(r, s))
            .collect(),
    ))
}

/// `PUT /v1/registries/{registry}`: plain HTTP and credentials for one registry.
#[utoipa::path(put, path = "/v1/registries/{registry}", tag = "images", request_body = RegistrySettings,
    params(RegistryPath),
    responses((status = 200, body = RegistryView), BadRequest, ServerFailed))]
pub async fn put_registry(
    State(ctx): Shared,
    Path(registry): Path<String>,
    Body(s): Body<RegistrySettings>,
) -> Result<Json<RegistryView>> {
    if let Some(c) = &s.credentials {
        let empty = match c {
            RegistryCredentials::Basic { username, password } => {
                username.is_empty() || password.is_empty()
            }
            RegistryCredentials::Bearer { token } => token.is_empty(),
        };
        if empty {
            return Err(ApiError::invalid("credentials: a field is empty"));
        }
    }
    set_registry(&ctx, &registry, Some(s.clone()))?;
    Ok(Json(RegistryView::new(&registry, &s)))
}

/// `DELETE /v1/registries/{registry}`: forget its settings (and credentials).
#[utoipa::path(delete, path = "/v1/registries/{registry}", tag = "images",
    params(RegistryPath),
    responses((status = 200, description = "The settings that were removed.", body = RegistryView), BadRequest, NotFound, ServerFailed))]
pub async fn delete_registry(
    State(ctx): Shared,
    Path(registry): Path<String>,
) -> Result<Json<RegistryView>> {
    validate_registry(&registry)?;
    let s = registries(&ctx)?
        .remove(&registry)
        .ok_or_else(|| ApiError::not_found(format!("registry {registry}")))?;
    set_registry(&ctx, &registry, None)?;
    Ok(Json(RegistryView::new(&registry, &s)))
}

/// `/v1/registries/{registry}`
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RegistryPath {
    /// `host[:port]`, as image references name it.
    pub registry: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_and_loopback() {
        assert_eq!(registry_of("127.0.0.1:5000/busybox:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("localhost/x"), "localhost");
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("library/busybox"), "docker.io");
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("registry.example:5000"));
        assert_eq!(static_code("image_too_big"), "image_too_big");
        assert_eq!(static_code("surprise"), "agent_error");
    }

    #[test]
    fn views_never_show_secrets() {
        let s = RegistrySettings {
            insecure: false,
            credentials: Some(RegistryCredentials::Basic {
                username: "u".into(),
                password: "hunter2".into(),
            }),
        };
        let v = serde_json::to_string(&RegistryView::new("r:1", &s)).unwrap();
        assert!(!v.contains("hunter2"), "{v}");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}

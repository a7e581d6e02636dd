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

use crate::error::{Error, Kind, Result};
use crate::hosts::parse_host;
use crate::proto::{ImageInfo, ImagePull, ImageRemove, PullLine, RegistryCredentials};
use crate::Core;
use ferry_store::Host;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa::ToSchema;

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
pub fn registries(core: &Core) -> Result<BTreeMap<String, RegistrySettings>> {
    match core.store.kv_get(REGISTRIES_KEY)? {
        None => Ok(BTreeMap::new()),
        Some(raw) => serde_json::from_str(&raw).map_err(Error::internal),
    }
}

/// Sets (or with `None`, forgets) one registry's settings; `ferry dev --registry` and
/// `--registry-auth` use this at start.
pub fn set_registry(core: &Core, registry: &str, s: Option<RegistrySettings>) -> Result<()> {
    validate_registry(registry)?;
    let mut all = registries(core)?;
    match s {
        Some(s) => all.insert(registry.to_string(), s),
        None => all.remove(registry),
    };
    core.store.kv_put(
        REGISTRIES_KEY,
        &serde_json::to_string(&all).map_err(Error::internal)?,
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
        Err(Error::invalid(format!(
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

fn pull_request(core: &Core, image: &str) -> Result<ImagePull> {
    let registry = registry_of(image);
    let s = registries(core)?.remove(&registry).unwrap_or_default();
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

fn line_error(host: &Host, status: u16, code: &str, message: &str) -> Error {
    Error::new(
        Kind::from_wire(status),
        static_code(code),
        format!("host {:x}: {message}", host.id.get()),
    )
}

/// Starts a pull on `host`'s agent; the stream of its answer lines.
async fn agent_pull(
    core: &Core,
    host: &Host,
    req: &ImagePull,
) -> Result<futures::stream::BoxStream<'static, PullLine>> {
    core.agents.image_pull(&host.endpoint, req).await
}

/// Makes `host` hold `image` (pulling what it lacks) and answers the pinned reference a
/// machine's config records. Every image error comes back with its own status and code.
pub async fn ensure_on_host(core: &Core, host: &Host, image: &str) -> Result<String> {
    crate::config::validate_image_ref(image)?;
    let req = pull_request(core, image)?;
    let mut lines = Box::pin(agent_pull(core, host, &req).await?);
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
    Err(Error::new(
        Kind::Agent,
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

fn target_hosts(core: &Core, host: Option<&str>) -> Result<Vec<Host>> {
    let hosts = core.store.list_hosts()?;
    match host {
        Some(h) => {
            let id = parse_host(h)?;
            let found = hosts
                .into_iter()
                .find(|x| x.id == id)
                .ok_or_else(|| Error::not_found(format!("host {h}")))?;
            Ok(vec![found])
        }
        None => {
            let hs: Vec<Host> = hosts.into_iter().filter(|h| !h.cordoned).collect();
            if hs.is_empty() {
                return Err(Error::unavailable("no host is available"));
            }
            Ok(hs)
        }
    }
}

/// `POST /v1/images/pull`: pulls on one host or on all, answering newline-delimited JSON as it
/// goes: `{"progress": {...}}` lines, then per host one `{"image": {...}}` (with `host` set) or
/// `{"error": {"status", "code", "message"}}`. A bad request is refused before the stream.
pub fn pull(
    core: Arc<Core>,
    req: PullRequest,
) -> Result<impl futures::Stream<Item = PullLine> + Send + 'static> {
    crate::config::validate_image_ref(&req.image)?;
    let hosts = target_hosts(&core, req.host.as_deref())?;
    let pull = pull_request(&core, &req.image)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<PullLine>();
    tokio::spawn(async move {
        for h in hosts {
            let hex = format!("{:x}", h.id.get());
            match agent_pull(&core, &h, &pull).await {
                Err(e) => {
                    let _ = tx.send(PullLine::Error {
                        status: crate::proto::wire_status(e.kind),
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
    Ok(futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        Some((line, rx))
    }))
}

async fn host_images(core: &Core, h: &Host) -> Result<Vec<ImageInfo>> {
    let mut v = core.agents.image_list(&h.endpoint).await.map_err(|mut e| {
        e.message = format!("host {:x}: {}", h.id.get(), e.message);
        e
    })?;
    for i in &mut v {
        i.host = Some(format!("{:x}", h.id.get()));
    }
    Ok(v)
}

/// `GET /v1/images`: every image on every host, with the machines using it.
pub async fn list(core: &Core) -> Result<Vec<ImageInfo>> {
    let mut out = Vec::new();
    for h in core.store.list_hosts()? {
        out.extend(host_images(core, &h).await?);
    }
    Ok(out)
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
pub async fn remove(core: &Core, req: RemoveRequest) -> Result<Vec<RemovedView>> {
    crate::config::validate_image_ref(&req.image)
        .or_else(|_| crate::config::validate_image_ref(&format!("x@{}", req.image)))?;
    let hosts = match &req.host {
        Some(h) => target_hosts(core, Some(h))?,
        None => core.store.list_hosts()?,
    };
    // Check everywhere first: a refusal on one host must not leave the others half done.
    let matches = |i: &ImageInfo| {
        i.digest == req.image || i.pinned == req.image || i.names.contains(&req.image)
    };
    let mut holders = Vec::new();
    for h in hosts {
        let imgs = host_images(core, &h).await?;
        if let Some(i) = imgs.iter().find(|i| matches(i)) {
            if let Some(m) = i.machines.first() {
                return Err(Error::conflict(
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
        return Err(Error::not_found(format!("image {}", req.image)));
    }
    let mut out = Vec::new();
    for (h, digest) in holders {
        let removed_layers = core
            .agents
            .image_remove(&h.endpoint, &ImageRemove { reference: digest })
            .await?;
        out.push(RemovedView {
            host: format!("{:x}", h.id.get()),
            removed_layers,
        });
    }
    Ok(out)
}

/// `GET /v1/registries`: settings of every registry (no secrets).
pub fn list_registries(core: &Core) -> Result<Vec<RegistryView>> {
    Ok(registries(core)?
        .iter()
        .map(|(r, s)| RegistryView::new(r, s))
        .collect())
}

/// `PUT /v1/registries/{registry}`: plain HTTP and credentials for one registry.
pub fn put_registry(core: &Core, registry: &str, s: RegistrySettings) -> Result<RegistryView> {
    if let Some(c) = &s.credentials {
        let empty = match c {
            RegistryCredentials::Basic { username, password } => {
                username.is_empty() || password.is_empty()
            }
            RegistryCredentials::Bearer { token } => token.is_empty(),
        };
        if empty {
            return Err(Error::invalid("credentials: a field is empty"));
        }
    }
    set_registry(core, registry, Some(s.clone()))?;
    Ok(RegistryView::new(registry, &s))
}

/// `DELETE /v1/registries/{registry}`: forget its settings (and credentials).
pub fn delete_registry(core: &Core, registry: &str) -> Result<RegistryView> {
    validate_registry(registry)?;
    let s = registries(core)?
        .remove(registry)
        .ok_or_else(|| Error::not_found(format!("registry {registry}")))?;
    set_registry(core, registry, None)?;
    Ok(RegistryView::new(registry, &s))
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

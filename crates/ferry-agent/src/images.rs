//! The host's OCI images: pulls the server asks for (answered as newline-delimited JSON, so
//! the CLI can show progress), the list with the machines using each image, removal, and the
//! root filesystem a machine gets from its image.
//!
//! **Invariant:** an image a machine of this host names (running or not) is never removed, so
//! its layers stay under the machine's overlay.

use crate::machines::Agent;
use crate::AgentError;
use axum::body::Body;
use axum::extract::State;
use axum::Json;
use ferry_api::ApiError;
use ferry_core::proto::{ImageInfo, ImagePull, ImageRemove, PullLine, RegistryCredentials};
use ferry_image::{Credentials, Digest, ImageError, ImageRecord, PullOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The digest a pinned reference (`...@sha256:...`) names.
pub(crate) fn pinned_digest(reference: &str) -> Option<Digest> {
    reference
        .rsplit_once('@')
        .and_then(|(_, d)| Digest::parse(d).ok())
}

pub(crate) fn image_err(e: ImageError) -> ApiError {
    ApiError::new(e.status(), e.code(), e.to_string())
}

fn info(rec: &ImageRecord, users: &BTreeMap<Digest, Vec<String>>) -> ImageInfo {
    let base = rec
        .names
        .last()
        .map(|n| {
            ferry_image::pull::pinned(n, &rec.digest).unwrap_or_else(|_| rec.digest.to_string())
        })
        .unwrap_or_else(|| rec.digest.to_string());
    ImageInfo {
        digest: rec.digest.to_string(),
        pinned: base,
        names: rec.names.clone(),
        layers: rec.layers.len(),
        size: rec.size,
        pulled_at_ms: rec.pulled_at_ms,
        machines: users.get(&rec.digest).cloned().unwrap_or_default(),
        host: None,
    }
}

impl Agent {
    /// The root filesystem, command, env, workdir and user of a machine with `image` (a pinned
    /// reference the server resolved): the image's layers as one overlay, topmost first.
    pub(crate) fn image_root(
        &self,
        image: &str,
    ) -> Result<(ferry_runtime::Layer, ferry_image::ImageConfig), AgentError> {
        let store = self.images.store();
        let digest = pinned_digest(image)
            .or_else(|| store.find(image).map(|r| r.digest))
            .ok_or_else(|| AgentError::Invalid(format!("image {image} is not on this host")))?;
        let res = store
            .resolved(&digest)
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let mut dirs = res.layer_dirs.into_iter();
        let top = dirs.next().expect("an image has at least one layer");
        Ok((
            ferry_runtime::Layer {
                source: top,
                target: "/".into(),
                below: dirs.collect(),
            },
            res.config,
        ))
    }
}

/// `POST /v1/images/pull`: one JSON object per line; the last is `image` or `error`.
pub(crate) async fn pull(State(a): State<Arc<Agent>>, Json(req): Json<ImagePull>) -> Body {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<PullLine>();
    tokio::spawn(async move {
        let opts = PullOptions {
            insecure: req.insecure,
            credentials: match req.credentials {
                None => Credentials::Anonymous,
                Some(RegistryCredentials::Basic { username, password }) => {
                    Credentials::Basic { username, password }
                }
                Some(RegistryCredentials::Bearer { token }) => Credentials::Bearer { token },
            },
            limits: a.image_limits(),
        };
        let ptx = tx.clone();
        let progress = move |p: ferry_image::Progress| {
            let _ = ptx.send(PullLine::Progress(
                serde_json::to_value(p).expect("serializable"),
            ));
        };
        let line = match a.images.pull(&req.reference, &opts, &progress).await {
            Ok(rec) => PullLine::Image(info(&rec, &a.image_users())),
            Err(e) => {
                tracing::info!("pull of {} failed: {e}", req.reference);
                PullLine::Error {
                    status: e.status(),
                    code: e.code().into(),
                    message: e.to_string(),
                }
            }
        };
        let _ = tx.send(line);
    });
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        let mut bytes = serde_json::to_vec(&line).expect("serializable");
        bytes.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(bytes), rx))
    });
    Body::from_stream(lines)
}

/// `GET /v1/images`.
pub(crate) async fn list(State(a): State<Arc<Agent>>) -> Json<Vec<ImageInfo>> {
    let users = a.image_users();
    Json(
        a.images
            .store()
            .list()
            .iter()
            .map(|r| info(r, &users))
            .collect(),
    )
}

/// `POST /v1/images/remove`: refused (409) while a machine of this host names the image.
pub(crate) async fn remove(
    State(a): State<Arc<Agent>>,
    Json(req): Json<ImageRemove>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = a.images.store().clone();
    let rec = store
        .find(&req.reference)
        .ok_or_else(|| image_err(ImageError::NotPulled(req.reference.clone())))?;
    let users = a.image_users();
    if let Some(m) = users.get(&rec.digest).and_then(|v| v.first()) {
        return Err(image_err(ImageError::InUse {
            image: req.reference.clone(),
            machine: m.clone(),
        }));
    }
    let in_use: BTreeSet<Digest> = users.keys().cloned().collect();
    let removed = a
        .images
        .remove(&rec.digest, &in_use)
        .await
        .map_err(image_err)?;
    Ok(Json(serde_json::json!({
        "removed_layers": removed.iter().map(|d| d.to_string()).collect::<Vec<_>>()
    })))
}

//! OCI images for machines: pull an image from a registry through the OCI distribution API,
//! verify every blob against its digest, unpack each layer once into a content-addressed store
//! shared by every machine of the host, and hand the sandbox the layer directories (overlayfs
//! lower layers, topmost first) and the image's config (entrypoint, cmd, env, user, workdir).
//!
//! - [`manifest`]: pure parsing and validation of manifests, indexes and configs (media types,
//!   digests, sizes, platform); no I/O, so it can be fuzzed.
//! - [`unpack`]: a layer tarball into a directory, in overlayfs' own terms (a whiteout becomes a
//!   0/0 character device, an opaque directory gets `trusted.overlay.opaque`). It never follows a
//!   symlink while writing and refuses any entry that would land outside the layer.
//! - [`store`]: the host's layers and image records; removal and GC of unused layers.
//! - [`pull`]: the registry client (the `oci-client` crate for the protocol and auth).
//!
//! Design decisions:
//! - A blob is downloaded to a file and verified (size and digest) before a byte of it is
//!   unpacked; the uncompressed stream is then checked against the config's `diff_id`. An
//!   unverified layer never becomes visible: it is unpacked into a temporary directory and
//!   renamed into place only once complete.
//! - Layers are keyed by the digest of their compressed blob (what the manifest names), so two
//!   images sharing a base share its directories.
//! - What is refused is refused with a typed error that says which rule was broken, so the
//!   server can answer with a stable code and create nothing.
//!
//! This crate never touches namespaces or mounts; the sandbox (ferry-runtime) does.

pub mod manifest;
pub mod pull;
pub mod store;
pub mod unpack;

pub use manifest::{Digest, ImageConfig, Platform};
pub use pull::{Credentials, Progress, PullOptions, Puller};
pub use store::{ImageRecord, Store};

use std::path::PathBuf;

/// What can go wrong with an image. Each variant maps to one stable API code ([`code`]).
///
/// [`code`]: ImageError::code
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    #[error("image reference {0:?} is not valid: {1}")]
    BadReference(String, String),
    #[error("image {0} does not exist in its registry")]
    NotFound(String),
    #[error("registry {registry} cannot be reached: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("registry {registry} refused the credentials (or none were given): {detail}")]
    Unauthorized { registry: String, detail: String },
    #[error("registry error: {0}")]
    Registry(String),
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("invalid manifest: {0}")]
    BadManifest(String),
    #[error("no manifest for platform {wanted} (the image has: {available})")]
    WrongPlatform { wanted: String, available: String },
    #[error("{what} is {size} bytes, more than the limit of {limit} bytes")]
    TooBig { what: String, size: u64, limit: u64 },
    #[error("layer {layer}: entry {path:?} {reason}")]
    Escape {
        layer: String,
        path: String,
        reason: String,
    },
    #[error("layer {layer}: {detail}")]
    BadLayer { layer: String, detail: String },
    #[error("image {0} is not on this host")]
    NotPulled(String),
    #[error("image {image} is used by machine {machine}")]
    InUse { image: String, machine: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn io_at(what: &str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::io(format!("{what} {}", path.display()), source)
    }

    /// The stable code the API answers with; the HTTP status is [`status`](Self::status).
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::BadReference(..) => "invalid",
            ImageError::NotFound(_) => "image_not_found",
            ImageError::Unreachable { .. } => "registry_unreachable",
            ImageError::Unauthorized { .. } => "registry_unauthorized",
            ImageError::Registry(_) => "registry_error",
            ImageError::DigestMismatch { .. } => "image_digest_mismatch",
            ImageError::BadManifest(_) => "image_invalid",
            ImageError::WrongPlatform { .. } => "image_platform",
            ImageError::TooBig { .. } => "image_too_big",
            ImageError::Escape { .. } => "image_layer_escape",
            ImageError::BadLayer { .. } => "image_invalid",
            ImageError::NotPulled(_) => "not_found",
            ImageError::InUse { .. } => "image_in_use",
            ImageError::Io { .. } => "internal",
        }
    }

    /// The HTTP status for [`code`](Self::code): 4xx for what the image or the caller got
    /// wrong, 502/504 for a registry that failed, 500 for this host's own trouble.
    pub fn status(&self) -> u16 {
        match self {
            ImageError::BadReference(..) => 400,
            ImageError::NotFound(_) | ImageError::NotPulled(_) => 404,
            ImageError::InUse { .. } => 409,
            ImageError::Unauthorized { .. } => 401,
            ImageError::DigestMismatch { .. }
            | ImageError::BadManifest(_)
            | ImageError::WrongPlatform { .. }
            | ImageError::TooBig { .. }
            | ImageError::Escape { .. }
            | ImageError::BadLayer { .. } => 422,
            ImageError::Unreachable { .. } => 504,
            ImageError::Registry(_) => 502,
            ImageError::Io { .. } => 500,
        }
    }
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Limits on what a pull accepts: a registry (or an image) is untrusted input.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest compressed layer blob.
    pub max_layer_bytes: u64,
    /// Largest layer once uncompressed (a small gzip can expand enormously).
    pub max_unpacked_layer_bytes: u64,
    /// Most layers in one image (overlayfs stacks at most 500 lower directories).
    pub max_layers: usize,
    /// Largest manifest, index or config document.
    pub max_document_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_layer_bytes: 2 << 30,
            max_unpacked_layer_bytes: 8 << 30,
            max_layers: 128,
            max_document_bytes: 4 << 20,
        }
    }
}

/// Where a machine's root filesystem comes from once an image is on the host.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The image manifest's digest (the platform's manifest, never an index's).
    pub digest: Digest,
    /// Layer directories, topmost first (overlayfs' `lowerdir` order).
    pub layer_dirs: Vec<PathBuf>,
    pub config: ImageConfig,
}

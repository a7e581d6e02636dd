//! Pulling an image: resolve the reference to this platform's manifest, fetch the config and
//! the layers this host lacks, verify each against its digest, unpack, record.
//!
//! The protocol (URLs, token auth, redirects) is `oci-client`'s; every document and blob it
//! returns is checked here again against the digest that names it, so a registry (or anything
//! between) that serves other bytes is caught whatever the client did.

use crate::manifest::{self, Descriptor, Digest, Manifest, Platform};
use crate::store::{ImageRecord, Store};
use crate::{ImageError, Limits, Result};
use futures::StreamExt;
use oci_client::Reference;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Registry credentials. `Debug` never shows the secret; neither does any error or log line.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Credentials {
    #[default]
    #[serde(skip)]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    Bearer {
        token: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::Bearer { .. } => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl Credentials {
    fn auth(&self) -> oci_client::secrets::RegistryAuth {
        use oci_client::secrets::RegistryAuth as A;
        match self {
            Credentials::Anonymous => A::Anonymous,
            Credentials::Basic { username, password } => {
                A::Basic(username.clone(), password.clone())
            }
            Credentials::Bearer { token } => A::Bearer(token.clone()),
        }
    }
}

/// How one pull talks to its registry.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP instead of HTTPS (a registry on loopback, or one the operator marked so).
    pub insecure: bool,
    pub credentials: Credentials,
    pub limits: Limits,
}

/// What a pull reports as it goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Progress {
    /// The manifest is known: `layers` layers, `bytes` in all, `cached` of them already here.
    Resolved {
        digest: String,
        layers: usize,
        bytes: u64,
        cached: usize,
    },
    /// Bytes of layer `index` (bottom first) downloaded so far.
    Layer {
        index: usize,
        digest: String,
        done: u64,
        total: u64,
    },
    /// Layer `index` is verified and unpacked.
    Unpacked { index: usize, digest: String },
}

/// The host's puller: one per store; concurrent pulls of a shared layer download it once.
pub struct Puller {
    store: Store,
    platform: Platform,
    layer_locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls hold it shared, removal and GC exclusively: a layer a pull just unpacked has no
    /// record yet, and GC must not take it from under that pull.
    gc_lock: Arc<tokio::sync::RwLock<()>>,
}

/// `registry/repository` of a reference, and the pinned form `registry/repository@digest`.
pub fn pinned(reference: &str, digest: &Digest) -> Result<String> {
    let r = parse_reference(reference)?;
    Ok(format!("{}/{}@{}", r.registry(), r.repository(), digest))
}

/// The registry (host[:port]) a reference names.
pub fn registry_of(reference: &str) -> Result<String> {
    Ok(parse_reference(reference)?.registry().to_string())
}

fn parse_reference(reference: &str) -> Result<Reference> {
    if reference.len() > 1024
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ImageError::BadReference(
            reference.into(),
            "too long, or holds spaces or control characters".into(),
        ));
    }
    let r: Reference = reference
        .parse()
        .map_err(|e| ImageError::BadReference(reference.into(), format!("{e}")))?;
    if let Some(d) = r.digest() {
        Digest::parse(d).map_err(|e| ImageError::BadReference(reference.into(), e.to_string()))?;
    }
    Ok(r)
}

/// Checks a reference's syntax (for validation at the API's edge).
pub fn validate_reference(reference: &str) -> Result<()> {
    parse_reference(reference).map(|_| ())
}

impl Puller {
    pub fn new(store: Store) -> Puller {
        Puller {
            store,
            platform: Platform::host(),
            layer_locks: Mutex::new(HashMap::new()),
            gc_lock: Arc::new(tokio::sync::RwLock::new(())),
        }
    }

    /// Removes an image and the layers no other image uses, once no pull is under way (see
    /// [`Store::remove`]).
    pub async fn remove(
        &self,
        digest: &Digest,
        in_use: &std::collections::BTreeSet<Digest>,
    ) -> Result<Vec<Digest>> {
        let guard = self.gc_lock.clone().write_owned().await;
        let (store, digest, in_use) = (self.store.clone(), digest.clone(), in_use.clone());
        tokio::task::spawn_blocking(move || {
            let r = store.remove(&digest, &in_use);
            drop(guard);
            r
        })
        .await
        .map_err(|e| ImageError::io("removing", std::io::Error::other(e.to_string())))?
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Pulls `reference` (a tag or a digest) unless this host has it: a reference pinned to a
    /// digest whose image is here needs no registry at all; a tag is always asked for (it may
    /// have moved), but only missing layers are downloaded.
    pub async fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<ImageRecord> {
        let r = parse_reference(reference)?;
        let name = r.whole();
        let gc_guard = self.gc_lock.read().await;
        if let Some(d) = r.digest() {
            let d = Digest::parse(d)?;
            if self.store.resolved(&d).is_ok() {
                let rec = self.store.get(&d).expect("resolved implies a record");
                progress(Progress::Resolved {
                    digest: d.to_string(),
                    layers: rec.layers.len(),
                    bytes: rec.size,
                    cached: rec.layers.len(),
                });
                return Ok(rec);
            }
        }
        let client = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: if opts.insecure {
                oci_client::client::ClientProtocol::Http
            } else {
                oci_client::client::ClientProtocol::Https
            },
            connect_timeout: Some(std::time::Duration::from_secs(5)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        });
        let auth = opts.credentials.auth();
        let limits = &opts.limits;

        // The manifest: this platform's entry if the reference names an index.
        let (bytes, _) = client
            .pull_manifest_raw(&r, &auth, &manifest::ACCEPTED)
            .await
            .map_err(|e| registry_error(&name, e))?;
        check_digest(&name, &bytes, r.digest())?;
        let (bytes, image_ref) = match manifest::parse_manifest(&bytes, limits)? {
            Manifest::Index(list) => {
                let entry = manifest::select_platform(&list, &self.platform)?;
                let pr = Reference::with_digest(
                    r.registry().to_string(),
                    r.repository().to_string(),
                    entry.digest.to_string(),
                );
                let (b, _) = client
                    .pull_manifest_raw(&pr, &auth, &manifest::ACCEPTED)
                    .await
                    .map_err(|e| registry_error(&name, e))?;
                check_digest(&pr.whole(), &b, Some(entry.digest.as_str()))?;
                (b, pr)
            }
            Manifest::Image { .. } => (bytes, r.clone()),
        };
        let Manifest::Image { config, layers } = manifest::parse_manifest(&bytes, limits)? else {
            return Err(ImageError::BadManifest(
                "an index names another index, not an image manifest".into(),
            ));
        };
        let digest = Digest::of(&bytes);
        let cached = layers
            .iter()
            .filter(|l| self.store.has_layer(&l.digest))
            .count();
        progress(Progress::Resolved {
            digest: digest.to_string(),
            layers: layers.len(),
            bytes: layers.iter().map(|l| l.size).sum(),
            cached,
        });
        if let Ok(res) = self.store.resolved(&digest) {
            let _ = res;
            let mut rec = self.store.get(&digest).expect("resolved implies a record");
            rec.names = vec![name];
            return self.store.put(rec);
        }

        // The config, in memory (bounded by the manifest check), verified.
        let mut cfg_bytes = Vec::new();
        let mut s = client
            .pull_blob_stream(&image_ref, &oci_desc(&config))
            .await
            .map_err(|e| registry_error(&name, e))?;
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| stream_error(&name, e))?;
            cfg_bytes.extend_from_slice(&chunk);
            if cfg_bytes.len() as u64 > config.size {
                break;
            }
        }
        check_blob(&format!("config of {name}"), &config, &cfg_bytes)?;
        let cfg = manifest::parse_config(&cfg_bytes, layers.len(), &self.platform)?;

        // Layers: download one while the previous one unpacks.
        let mut unpacks = Vec::new();
        let mut first_err = None;
        for (i, l) in layers.iter().enumerate() {
            if self.store.has_layer(&l.digest) {
                progress(Progress::Unpacked {
                    index: i,
                    digest: l.digest.to_string(),
                });
                continue;
            }
            let lock = self
                .layer_locks
                .lock()
                .unwrap()
                .entry(l.digest.clone())
                .or_default()
                .clone();
            let guard = lock.lock_owned().await;
            if self.store.has_layer(&l.digest) {
                continue; // another pull finished it while we waited
            }
            let blob = match self
                .download(&client, &image_ref, &name, i, l, limits, progress)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    // Unpacks already under way finish (or fail) before the cleanup below.
                    first_err = Some(e);
                    break;
                }
            };
            let store = self.store.clone();
            let desc = l.clone();
            let diff_id = cfg.diff_ids[i].clone();
            let max = limits.max_unpacked_layer_bytes;
            unpacks.push((
                i,
                l.digest.clone(),
                tokio::task::spawn_blocking(move || {
                    let r = unpack_blob(&store, &blob, &desc, &diff_id, max);
                    let _ = std::fs::remove_file(&blob);
                    drop(guard);
                    r
                }),
            ));
        }
        for (i, d, h) in unpacks {
            match h.await {
                Ok(Ok(())) => progress(Progress::Unpacked {
                    index: i,
                    digest: d.to_string(),
                }),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(ImageError::io(
                        "unpacking",
                        std::io::Error::other(e.to_string()),
                    ));
                }
            }
        }
        if let Some(e) = first_err {
            // Layers of this image that did unpack are kept only if another image uses them;
            // with other pulls under way (which may need them) the next GC takes them instead.
            drop(gc_guard);
            if let Ok(_only_one) = self.gc_lock.try_write() {
                let _ = self.store.gc();
            }
            return Err(e);
        }
        let rec = ImageRecord {
            digest,
            names: vec![name],
            layers: layers.iter().map(|l| l.digest.clone()).collect(),
            size: layers.iter().map(|l| l.size).sum(),
            config: cfg,
            pulled_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        };
        self.store.put(rec)
    }

    /// Downloads one blob to a file, counting and hashing as it streams; refuses more bytes than
    /// the manifest announced and a digest that differs.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        client: &oci_client::Client,
        image: &Reference,
        name: &str,
        index: usize,
        l: &Descriptor,
        limits: &Limits,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PathBuf> {
        let path =
            self.store
                .tmp_dir()
                .join(format!("{}.{}.blob", l.digest.hex(), std::process::id()));
        let mut f =
            std::fs::File::create(&path).map_err(|e| ImageError::io_at("creating", &path, e))?;
        let res: Result<()> = async {
            let mut s = client
                .pull_blob_stream(image, &oci_desc(l))
                .await
                .map_err(|e| registry_error(name, e))?;
            let mut hasher = sha2::Sha256::new();
            let mut done = 0u64;
            let mut last = 0u64;
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(|e| stream_error(name, e))?;
                done += chunk.len() as u64;
                if done > l.size {
                    // More than announced: a lying registry, or a blob that is not this one.
                    if done > limits.max_layer_bytes {
                        return Err(ImageError::TooBig {
                            what: format!("layer {}", l.digest),
                            size: done,
                            limit: limits.max_layer_bytes,
                        });
                    }
                    return Err(ImageError::DigestMismatch {
                        what: format!("layer {} of {name}", l.digest),
                        expected: format!("{} ({} bytes)", l.digest, l.size),
                        actual: format!("more than {} bytes", l.size),
                    });
                }
                hasher.update(&chunk);
                f.write_all(&chunk)
                    .map_err(|e| ImageError::io_at("writing", &path, e))?;
                if done - last >= 1 << 20 || done == l.size {
                    last = done;
                    progress(Progress::Layer {
                        index,
                        digest: l.digest.to_string(),
                        done,
                        total: l.size,
                    });
                }
            }
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual != l.digest.as_str() || done != l.size {
                return Err(ImageError::DigestMismatch {
                    what: format!("layer {} of {name}", l.digest),
                    expected: l.digest.to_string(),
                    actual: format!("{actual} ({done} of {} bytes)", l.size),
                });
            }
            Ok(())
        }
        .await;
        if let Err(e) = res {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }
}

fn oci_desc(d: &Descriptor) -> oci_client::manifest::OciDescriptor {
    oci_client::manifest::OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: d.size as i64,
        ..Default::default()
    }
}

fn check_digest(what: &str, bytes: &[u8], expected: Option<&str>) -> Result<()> {
    if let Some(exp) = expected {
        let actual = Digest::of(bytes);
        if actual.as_str() != exp {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest of {what}"),
                expected: exp.to_string(),
                actual: actual.to_string(),
            });
        }
    }
    Ok(())
}

fn check_blob(what: &str, d: &Descriptor, bytes: &[u8]) -> Result<()> {
    let actual = Digest::of(bytes);
    if actual != d.digest || bytes.len() as u64 != d.size {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: d.digest.to_string(),
            actual: format!("{actual} ({} bytes)", bytes.len()),
        });
    }
    Ok(())
}

/// Unpacks a verified blob into a temporary directory, checks the uncompressed stream against
/// the config's `diff_id`, and renames it into the store.
fn unpack_blob(
    store: &Store,
    blob: &Path,
    desc: &Descriptor,
    diff_id: &Digest,
    max_bytes: u64,
) -> Result<()> {
    let dir = store.tmp_dir().join(format!(
        "{}.{}.unpack",
        desc.digest.hex(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| ImageError::io_at("creating", &dir, e))?;
    let r = (|| {
        let f = std::fs::File::open(blob).map_err(|e| ImageError::io_at("opening", blob, e))?;
        let f = std::io::BufReader::with_capacity(1 << 20, f);
        let input: Box<dyn Read> = if desc.media_type == manifest::OCI_LAYER_TAR {
            Box::new(f)
        } else {
            Box::new(flate2::read::GzDecoder::new(f))
        };
        let mut hashing = HashingReader {
            inner: input,
            hasher: sha2::Sha256::new(),
        };
        let layer = desc.digest.to_string();
        crate::unpack::unpack(&mut hashing, &dir, &layer, max_bytes)?;
        // The tar's end blocks and padding count in the diff_id too.
        std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| ImageError::BadLayer {
            layer: layer.clone(),
            detail: format!("reading past the tar: {e}"),
        })?;
        let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if actual != diff_id.as_str() {
            return Err(ImageError::DigestMismatch {
                what: format!("uncompressed layer {layer}"),
                expected: diff_id.to_string(),
                actual,
            });
        }
        // The layer's root looks like a root directory whatever the tar said about "./".
        let target = store.layer_dir(&desc.digest);
        std::fs::rename(&dir, &target).map_err(|e| ImageError::io_at("publishing", &target, e))
    })();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A transfer that broke off mid-blob, or bytes the client's own check found wrong.
fn stream_error(name: &str, e: std::io::Error) -> ImageError {
    if let Some(d) = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<oci_client::errors::DigestError>())
    {
        return ImageError::DigestMismatch {
            what: format!("a blob of {name}"),
            expected: "the digest that names it".into(),
            actual: d.to_string(),
        };
    }
    ImageError::Unreachable {
        registry: name.split('/').next().unwrap_or(name).to_string(),
        detail: format!("the transfer broke off: {e}"),
    }
}

/// Turns the client's error into what the caller can act on. Never includes credentials: the
/// client's errors carry URLs and registry messages only.
fn registry_error(name: &str, e: oci_client::errors::OciDistributionError) -> ImageError {
    use oci_client::errors::OciDistributionError as E;
    let registry = name.split('/').next().unwrap_or(name).to_string();
    match e {
        E::ImageManifestNotFoundError(_) => ImageError::NotFound(name.into()),
        E::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|x| format!("{:?}", x.code))
                .collect();
            let text = format!("{envelope}");
            if codes.iter().any(|c| {
                matches!(
                    c.as_str(),
                    "ManifestUnknown" | "NameUnknown" | "BlobUnknown"
                )
            }) {
                ImageError::NotFound(name.into())
            } else if codes
                .iter()
                .any(|c| matches!(c.as_str(), "Unauthorized" | "Denied"))
            {
                ImageError::Unauthorized {
                    registry,
                    detail: text,
                }
            } else {
                ImageError::Registry(text)
            }
        }
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => ImageError::Unauthorized {
            registry,
            detail: e.to_string(),
        },
        E::ServerError { code: 404, .. } => ImageError::NotFound(name.into()),
        E::RequestError(ref re) if re.is_connect() || re.is_timeout() => ImageError::Unreachable {
            registry,
            detail: e.to_string(),
        },
        E::DigestError(_) => ImageError::DigestMismatch {
            what: name.into(),
            expected: "the digest that names it".into(),
            actual: e.to_string(),
        },
        other => ImageError::Registry(other.to_string()),
    }
}

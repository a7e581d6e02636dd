//! Manifests, indexes and image configs: parsed from untrusted bytes and validated (media
//! types, digests, sizes, platform), with no I/O.

use crate::{ImageError, Limits, Result};
use serde::{Deserialize, Serialize};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// What a pull asks the registry for (an index or a manifest, OCI or Docker v2).
pub const ACCEPTED: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// A `sha256:` content digest (the only algorithm accepted: it is what registries use).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| ImageError::BadManifest(format!("digest {s:?} is not sha256:")))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ImageError::BadManifest(format!(
                "digest {s:?} is not 64 lowercase hex characters"
            )));
        }
        Ok(Digest(s.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
    }

    /// The 64 hex characters (a safe file name).
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = ImageError;
    fn try_from(s: String) -> Result<Digest> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

/// An OS/architecture pair, e.g. `linux/amd64`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// This host's platform in OCI's words.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
        }
    }

    fn matches(&self, os: &str, arch: &str) -> bool {
        self.os == os && self.architecture == arch
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A reference to a blob or manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Deserialize)]
struct RawDoc {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
}

/// A parsed manifest document.
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    /// A list of per-platform manifests.
    Index(Vec<Descriptor>),
    /// One platform's image.
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Parses a manifest or index, checking what the rest of the pull relies on: schema version 2,
/// known media types, valid digests, at most `limits.max_layers` layers, layer sizes within
/// `limits.max_layer_bytes`.
pub fn parse_manifest(bytes: &[u8], limits: &Limits) -> Result<Manifest> {
    if bytes.len() as u64 > limits.max_document_bytes {
        return Err(ImageError::TooBig {
            what: "the manifest".into(),
            size: bytes.len() as u64,
            limit: limits.max_document_bytes,
        });
    }
    let doc: RawDoc = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::BadManifest(format!("not a manifest: {e}")))?;
    if doc.schema_version != Some(2) {
        return Err(ImageError::BadManifest(format!(
            "schemaVersion {:?} (only 2 is supported)",
            doc.schema_version
        )));
    }
    let mt = doc.media_type.as_deref();
    match (doc.manifests, doc.config, doc.layers) {
        (Some(list), None, None) => {
            if !matches!(mt, None | Some(OCI_INDEX) | Some(DOCKER_LIST)) {
                return Err(ImageError::BadManifest(format!(
                    "an index with media type {mt:?}"
                )));
            }
            Ok(Manifest::Index(list))
        }
        (None, Some(config), Some(layers)) => {
            if !matches!(mt, None | Some(OCI_MANIFEST) | Some(DOCKER_MANIFEST)) {
                return Err(ImageError::BadManifest(format!(
                    "a manifest with media type {mt:?}"
                )));
            }
            if !matches!(config.media_type.as_str(), OCI_CONFIG | DOCKER_CONFIG) {
                return Err(ImageError::BadManifest(format!(
                    "config media type {:?} is not an image config (an artifact, not an image?)",
                    config.media_type
                )));
            }
            if config.size > limits.max_document_bytes {
                return Err(ImageError::TooBig {
                    what: "the image config".into(),
                    size: config.size,
                    limit: limits.max_document_bytes,
                });
            }
            if layers.is_empty() {
                return Err(ImageError::BadManifest("the image has no layers".into()));
            }
            if layers.len() > limits.max_layers {
                return Err(ImageError::BadManifest(format!(
                    "{} layers (at most {})",
                    layers.len(),
                    limits.max_layers
                )));
            }
            for l in &layers {
                if !matches!(
                    l.media_type.as_str(),
                    OCI_LAYER_TAR | OCI_LAYER_GZIP | DOCKER_LAYER_GZIP
                ) {
                    return Err(ImageError::BadManifest(format!(
                        "layer {} has media type {:?} (supported: tar, tar+gzip)",
                        l.digest, l.media_type
                    )));
                }
                if l.size > limits.max_layer_bytes {
                    return Err(ImageError::TooBig {
                        what: format!("layer {}", l.digest),
                        size: l.size,
                        limit: limits.max_layer_bytes,
                    });
                }
            }
            Ok(Manifest::Image { config, layers })
        }
        _ => Err(ImageError::BadManifest(
            "neither an index (manifests) nor an image manifest (config and layers)".into(),
        )),
    }
}

/// The entry of an index for `want` (variants are not told apart: the first match wins).
pub fn select_platform<'a>(list: &'a [Descriptor], want: &Platform) -> Result<&'a Descriptor> {
    list.iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.matches(&want.os, &want.architecture))
        })
        .ok_or_else(|| ImageError::WrongPlatform {
            wanted: want.to_string(),
            available: list
                .iter()
                .map(|d| {
                    d.platform
                        .as_ref()
                        .map_or("unknown".to_string(), |p| p.to_string())
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// What a machine takes from its image's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `KEY=value` strings, in order.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub working_dir: String,
    /// One per layer, bottom first: the digest of the uncompressed tar.
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
    pub platform: Platform,
}

#[derive(Deserialize)]
struct RawConfig {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<RawRunConfig>,
    rootfs: RawRootfs,
}

#[derive(Deserialize, Default)]
struct RawRunConfig {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "User", default)]
    user: Option<String>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<Digest>,
}

/// Parses an image config and checks it against its manifest's `layer_count` and the `want`ed
/// platform (an image manifest pulled by digest has no index to choose from, so the config is
/// where a wrong platform shows).
pub fn parse_config(bytes: &[u8], layer_count: usize, want: &Platform) -> Result<ImageConfig> {
    let raw: RawConfig = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::BadManifest(format!("image config: {e}")))?;
    if raw.rootfs.kind != "layers" || raw.rootfs.diff_ids.len() != layer_count {
        return Err(ImageError::BadManifest(format!(
            "image config: rootfs has {} diff_ids of type {:?} for {layer_count} layers",
            raw.rootfs.diff_ids.len(),
            raw.rootfs.kind
        )));
    }
    let platform = Platform {
        os: raw.os,
        architecture: raw.architecture,
        variant: raw.variant,
    };
    if !platform.matches(&want.os, &want.architecture) {
        return Err(ImageError::WrongPlatform {
            wanted: want.to_string(),
            available: platform.to_string(),
        });
    }
    let c = raw.config.unwrap_or_default();
    let env = c.env.unwrap_or_default();
    let bad_str = |s: &String| s.contains('\0');
    if env
        .iter()
        .any(|e| bad_str(e) || !e.contains('=') || e.starts_with('='))
        || c.entrypoint.iter().flatten().any(bad_str)
        || c.cmd.iter().flatten().any(bad_str)
    {
        return Err(ImageError::BadManifest(
            "image config: an env entry is not KEY=value, or a command holds a NUL byte".into(),
        ));
    }
    let working_dir = c.working_dir.unwrap_or_default();
    if !working_dir.is_empty() && (!working_dir.starts_with('/') || working_dir.contains('\0')) {
        return Err(ImageError::BadManifest(format!(
            "image config: WorkingDir {working_dir:?} is not an absolute path"
        )));
    }
    Ok(ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env,
        user: c.user.unwrap_or_default(),
        working_dir,
        diff_ids: raw.rootfs.diff_ids,
        platform,
    })
}

impl ImageConfig {
    /// The argv a machine runs: entrypoint + (the machine's `cmd` if it gives one, else the
    /// image's), as `docker run IMAGE CMD...` does.
    pub fn command(&self, override_cmd: &[String]) -> Vec<String> {
        let mut argv = self.entrypoint.clone();
        if override_cmd.is_empty() {
            argv.extend(self.cmd.iter().cloned());
        } else {
            argv.extend(override_cmd.iter().cloned());
        }
        argv
    }

    /// The image's env as pairs (a later entry for the same key wins).
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn manifest(layer_mt: &str, size: u64) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":10}},
            "layers":[{{"mediaType":"{layer_mt}","digest":"{}","size":{size}}}]}}"#,
            d(1),
            d(2)
        )
    }

    #[test]
    fn manifests_are_checked() {
        let l = Limits::default();
        let m = parse_manifest(manifest(OCI_LAYER_GZIP, 5).as_bytes(), &l).unwrap();
        assert!(matches!(m, Manifest::Image { ref layers, .. } if layers.len() == 1));
        let check = |doc: String, code: &str| {
            let e = parse_manifest(doc.as_bytes(), &l).unwrap_err();
            assert_eq!(e.code(), code, "{doc}: {e}");
        };
        check(
            manifest("application/vnd.oci.image.layer.v1.tar+zstd", 5),
            "image_invalid",
        );
        check(manifest(OCI_LAYER_GZIP, 3 << 30), "image_too_big");
        check(
            manifest(OCI_LAYER_GZIP, 5).replace(&d(2), "sha256:xyz"),
            "image_invalid",
        );
        check(
            manifest(OCI_LAYER_GZIP, 5).replace("sha256:", "md5:"),
            "image_invalid",
        );
        check(r#"{"schemaVersion":1}"#.into(), "image_invalid");
        check("not json".into(), "image_invalid");
        check(r#"{"schemaVersion":2}"#.into(), "image_invalid");
    }

    #[test]
    fn platforms_are_chosen_or_refused() {
        let list = vec![Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: Digest::parse(&d(3)).unwrap(),
            size: 1,
            platform: Some(Platform {
                os: "linux".into(),
                architecture: "s390x".into(),
                variant: None,
            }),
        }];
        let e = select_platform(&list, &Platform::host()).unwrap_err();
        assert_eq!(e.code(), "image_platform");
        assert!(e.to_string().contains("linux/s390x"), "{e}");
        let mut ok = list.clone();
        ok[0].platform = Some(Platform::host());
        assert_eq!(select_platform(&ok, &Platform::host()).unwrap(), &ok[0]);
    }

    #[test]
    fn config_command_and_env() {
        let host = Platform::host();
        let cfg = format!(
            r#"{{"architecture":"{}","os":"linux","config":{{"Entrypoint":["/bin/sh","-c"],
            "Cmd":["echo hi"],"Env":["A=1","B=x=y"],"User":"1000:1000","WorkingDir":"/srv"}},
            "rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            host.architecture,
            d(4)
        );
        let c = parse_config(cfg.as_bytes(), 1, &host).unwrap();
        assert_eq!(c.command(&[]), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(c.command(&["exit 3".into()]), ["/bin/sh", "-c", "exit 3"]);
        assert_eq!(c.env_pairs()[1], ("B".into(), "x=y".into()));
        assert_eq!(c.user, "1000:1000");
        assert_eq!(
            parse_config(cfg.as_bytes(), 2, &host).unwrap_err().code(),
            "image_invalid"
        );
        let other = cfg.replacen(&host.architecture, "riscv64", 1);
        assert_eq!(
            parse_config(other.as_bytes(), 1, &host).unwrap_err().code(),
            "image_platform"
        );
    }
}

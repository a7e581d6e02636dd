//! The host's images: unpacked layers shared by every image and machine that uses them, and one
//! record per pulled image.
//!
//! ```text
//! <root>/layers/<blob hex>/      one unpacked layer (complete: it is renamed in when done)
//! <root>/images/<manifest hex>.json   an ImageRecord
//! <root>/tmp/                    downloads and half-unpacked layers (emptied at open)
//! ```
//! **Invariant:** a layer directory exists only once its blob and its uncompressed stream were
//! verified and every entry was written; a record exists only once all its layers do.

use crate::manifest::{Digest, ImageConfig};
use crate::{ImageError, Resolved, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// An image on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The manifest's digest (what a machine records and what migrates).
    pub digest: Digest,
    /// The references it was pulled as (`registry/repo:tag`), newest last.
    pub names: Vec<String>,
    /// Layer blob digests, bottom first (as the manifest lists them).
    pub layers: Vec<Digest>,
    /// Compressed size of all layers.
    pub size: u64,
    pub config: ImageConfig,
    pub pulled_at_ms: i64,
}

/// A content-addressed image store in one directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating) the store at `root`, clearing what an interrupted pull left in `tmp`.
    pub fn open(root: &Path) -> Result<Store> {
        let s = Store {
            root: root.to_path_buf(),
        };
        let _ = std::fs::remove_dir_all(s.tmp_dir());
        for d in [s.root.join("layers"), s.root.join("images"), s.tmp_dir()] {
            std::fs::create_dir_all(&d).map_err(|e| ImageError::io_at("creating", &d, e))?;
        }
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn layer_dir(&self, blob: &Digest) -> PathBuf {
        self.root.join("layers").join(blob.hex())
    }

    pub fn has_layer(&self, blob: &Digest) -> bool {
        self.layer_dir(blob).is_dir()
    }

    fn record_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", digest.hex()))
    }

    pub fn get(&self, digest: &Digest) -> Option<ImageRecord> {
        let raw = std::fs::read(self.record_path(digest)).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    /// The layer directories and config a machine runs from, if every layer is here.
    pub fn resolved(&self, digest: &Digest) -> Result<Resolved> {
        let rec = self
            .get(digest)
            .ok_or_else(|| ImageError::NotPulled(digest.to_string()))?;
        let mut dirs = Vec::with_capacity(rec.layers.len());
        for l in rec.layers.iter().rev() {
            if !self.has_layer(l) {
                return Err(ImageError::NotPulled(format!(
                    "{digest} (layer {l} is missing)"
                )));
            }
            dirs.push(self.layer_dir(l));
        }
        Ok(Resolved {
            digest: rec.digest,
            layer_dirs: dirs,
            config: rec.config,
        })
    }

    /// Writes a record (atomically), merging the names of an existing one.
    pub fn put(&self, mut rec: ImageRecord) -> Result<ImageRecord> {
        if let Some(old) = self.get(&rec.digest) {
            let mut names = old.names;
            for n in rec.names {
                names.retain(|x| x != &n);
                names.push(n);
            }
            rec.names = names;
        }
        let path = self.record_path(&rec.digest);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&rec).expect("serializable"))
            .map_err(|e| ImageError::io_at("writing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ImageError::io_at("publishing", &path, e))?;
        Ok(rec)
    }

    /// Every image on this host, newest pull first.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut out: Vec<ImageRecord> = std::fs::read_dir(self.root.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by_key(|r: &ImageRecord| std::cmp::Reverse(r.pulled_at_ms));
        out
    }

    /// The image that `reference` names here: a digest, a `name@digest`, or a name it was pulled
    /// as (`registry/repo:tag`).
    pub fn find(&self, reference: &str) -> Option<ImageRecord> {
        if let Some(d) = reference
            .rsplit_once('@')
            .map(|(_, d)| d)
            .or(Some(reference))
            .and_then(|d| Digest::parse(d).ok())
        {
            return self.get(&d);
        }
        self.list()
            .into_iter()
            .find(|r| r.names.iter().any(|n| n == reference))
    }

    /// Removes the image's record unless one of `in_use` (digests of images machines on this host
    /// run) is it, then every layer no remaining image uses. Returns the removed layers' digests.
    pub fn remove(&self, digest: &Digest, in_use: &BTreeSet<Digest>) -> Result<Vec<Digest>> {
        if in_use.contains(digest) {
            return Err(ImageError::InUse {
                image: digest.to_string(),
                machine: "on this host".into(),
            });
        }
        let path = self.record_path(digest);
        if !path.exists() {
            return Err(ImageError::NotPulled(digest.to_string()));
        }
        std::fs::remove_file(&path).map_err(|e| ImageError::io_at("removing", &path, e))?;
        self.gc()
    }

    /// Removes every layer that no image record names. A layer of a running machine is always
    /// named by its image's record (records of used images are never removed).
    pub fn gc(&self) -> Result<Vec<Digest>> {
        let keep: BTreeSet<Digest> = self.list().into_iter().flat_map(|r| r.layers).collect();
        let mut removed = Vec::new();
        let dir = self.root.join("layers");
        for e in std::fs::read_dir(&dir)
            .map_err(|e| ImageError::io_at("listing", &dir, e))?
            .flatten()
        {
            let Some(d) = e
                .file_name()
                .to_str()
                .and_then(|h| Digest::parse(&format!("sha256:{h}")).ok())
            else {
                continue;
            };
            if !keep.contains(&d) {
                // Renamed away first, so a half-removed layer is never mistaken for a whole one.
                let trash = self.tmp_dir().join(format!("gc-{}", d.hex()));
                std::fs::rename(e.path(), &trash)
                    .map_err(|err| ImageError::io_at("removing", &e.path(), err))?;
                std::fs::remove_dir_all(&trash)
                    .map_err(|err| ImageError::io_at("removing", &trash, err))?;
                removed.push(d);
            }
        }
        Ok(removed)
    }
}

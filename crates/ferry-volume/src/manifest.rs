//! What a volume holds: [`Manifest`] (entries, chunk hashes, the stat facts of the quick check),
//! its canonical [`Manifest::root`], path rules, and [`scan`] / [`verify_dir`].

use crate::error::{io, Result, VolumeError};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Files are split into chunks of this size (the last one may be shorter); each is hashed alone.
pub const CHUNK_SIZE: u64 = 256 * 1024;
/// Longest relative path accepted (bytes).
pub const MAX_PATH: usize = 4096;
/// Most entries a manifest may hold.
pub const MAX_ENTRIES: usize = 1 << 20;
/// Linux stamps files from a coarse clock (up to one jiffy, 10 ms, behind): a file whose mtime or
/// ctime is within this margin of a scan's start may have changed after that scan read it.
pub const RACY_MARGIN_NS: i64 = 50_000_000;

/// Hash jobs are at most this many chunks (8 MiB), so big files are hashed by several threads.
const JOB_CHUNKS: u64 = 32;

/// A BLAKE3 hash of one chunk; hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(bytes: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(bytes).as_bytes())
    }
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }
}

impl std::fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

// Hex in JSON (readable state and logs); raw 32 bytes in binary formats (the manifest frame and
// the receiver's state file), where hex would double the size and dominate a round's cost.
impl Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

struct ChunkHashVisitor;

impl<'de> serde::de::Visitor<'de> for ChunkHashVisitor {
    type Value = ChunkHash;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a BLAKE3 hash: 64 hex digits or 32 bytes")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ChunkHash, E> {
        blake3::Hash::from_hex(v.as_bytes())
            .map(|h| ChunkHash(*h.as_bytes()))
            .map_err(|_| E::custom("chunk hash: want 64 hex digits"))
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ChunkHash, E> {
        <[u8; 32]>::try_from(v)
            .map(ChunkHash)
            .map_err(|_| E::custom("chunk hash: want 32 bytes"))
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            d.deserialize_str(ChunkHashVisitor)
        } else {
            d.deserialize_bytes(ChunkHashVisitor)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A named pipe: recreated empty (its data only exists while two programs hold it open).
    Fifo,
    /// Another name of an earlier [`Kind::File`] entry (`target` is that entry's path): the
    /// receiver makes a hard link, so the two names stay one file.
    Hardlink,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Hardlink => 5,
        }
    }
}

/// Longest extended attribute name (Linux's `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME: usize = 255;
/// Largest extended attribute value accepted (Linux's `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE: usize = 64 * 1024;
/// Most extended attributes one entry may carry.
pub const MAX_XATTRS: usize = 64;
/// Name prefixes carried: user data, security labels and capabilities, POSIX ACLs, and the
/// privileged `trusted.` space. Others (e.g. `system.` beyond ACLs) are the kernel's.
pub const XATTR_PREFIXES: [&str; 5] = [
    "user.",
    "security.",
    "trusted.",
    "system.posix_acl_access",
    "system.posix_acl_default",
];

/// An extended attribute (ACLs are the `system.posix_acl_*` ones).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: String,
    pub value: Vec<u8>,
}

/// What a program may rely on besides the bytes: owner, group, modification time and extended
/// attributes. Part of the root: a copy with the wrong owner is not verified. IDs are stored
/// as on disk (a machine's volume is mapped into its user namespace by an idmapped mount, so
/// these are the IDs the machine sees, the same on every host).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    /// Sorted by name, names unique.
    pub xattrs: Vec<Xattr>,
}

/// The stat facts of the quick check. Not part of the root hash (they differ between hosts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    /// Link count: more than one name for a file makes [`Kind::Hardlink`] entries.
    #[serde(default)]
    pub nlink: u64,
}

impl Stat {
    pub fn of(md: &std::fs::Metadata) -> Stat {
        Stat {
            mtime_ns: md.mtime().saturating_mul(1_000_000_000) + md.mtime_nsec(),
            ctime_ns: md.ctime().saturating_mul(1_000_000_000) + md.ctime_nsec(),
            ino: md.ino(),
            nlink: md.nlink(),
        }
    }
}

/// One file, directory, symlink, fifo or hard link under the volume root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative, `/`-separated, UTF-8 (see [`validate_rel`]).
    pub path: String,
    pub kind: Kind,
    /// Permission bits including set-id and sticky (`0o7777` at most). 0 for symlinks and hard
    /// links (a hard link shares its file's).
    pub mode: u32,
    /// Bytes, for files; 0 for everything else.
    pub size: u64,
    /// For symlinks: where it points (copied verbatim, never followed). For hard links: the
    /// path of the file entry it is another name of.
    #[serde(default)] // no skip_serializing_if: postcard is not self-describing
    pub target: Option<String>,
    /// One hash per [`CHUNK_SIZE`] piece of a file, in order.
    #[serde(default)]
    pub chunks: Vec<ChunkHash>,
    /// Quick-check facts (source side only; ignored by the receiver and by the root).
    #[serde(default)]
    pub stat: Stat,
    /// Owner, group, mtime, xattrs (default for hard links: they share their file's).
    #[serde(default)]
    pub meta: Meta,
}

/// Everything under one root, sorted by path, plus when the scan that made it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Wall clock (ns since the epoch) when the scan started; the racy-clean rule compares file
    /// timestamps with it.
    pub scan_start_ns: i64,
    pub entries: Vec<Entry>,
    /// The volume's top directory itself: its mode bits and [`Meta`] (a machine may `chown`
    /// its mount point).
    #[serde(default)]
    pub root_mode: u32,
    #[serde(default)]
    pub root_meta: Meta,
}

/// Number of chunks of a file of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// Length of chunk `i` of a file of `size` bytes.
pub fn chunk_len(size: u64, i: u64) -> u64 {
    let off = i * CHUNK_SIZE;
    size.saturating_sub(off).min(CHUNK_SIZE)
}

/// The canonical encoding both sides hash; shared by [`Manifest::root`] and the receiver's state.
pub(crate) struct RootHasher(blake3::Hasher);

impl RootHasher {
    pub(crate) fn new(entries: usize) -> RootHasher {
        let mut h = blake3::Hasher::new();
        h.update(b"ferry-volume-root-v2\0");
        h.update(&(entries as u64).to_le_bytes());
        RootHasher(h)
    }
    pub(crate) fn entry<'a>(
        &mut self,
        path: &str,
        kind: Kind,
        mode: u32,
        size: u64,
        target: Option<&str>,
        chunks: impl ExactSizeIterator<Item = Option<&'a ChunkHash>>,
    ) {
        let h = &mut self.0;
        h.update(&(path.len() as u32).to_le_bytes());
        h.update(path.as_bytes());
        h.update(&[kind.code()]);
        h.update(&mode.to_le_bytes());
        h.update(&size.to_le_bytes());
        let t = target.unwrap_or("");
        h.update(&[target.is_some() as u8]);
        h.update(&(t.len() as u32).to_le_bytes());
        h.update(t.as_bytes());
        h.update(&(chunks.len() as u64).to_le_bytes());
        for c in chunks {
            h.update(&c.map(|c| c.0).unwrap_or([0; 32]));
        }
    }
    /// The top directory's mode and metadata (`None`: not applied yet).
    pub(crate) fn top(&mut self, mode: u32, meta: Option<&Meta>) {
        self.0.update(&mode.to_le_bytes());
        self.meta(meta);
    }
    /// An entry's metadata, right after its [`RootHasher::entry`].
    pub(crate) fn meta(&mut self, meta: Option<&Meta>) {
        let h = &mut self.0;
        // Metadata not (yet) applied hashes differently from any applied one.
        match meta {
            None => {
                h.update(&[0]);
            }
            Some(m) => {
                h.update(&[1]);
                h.update(&m.uid.to_le_bytes());
                h.update(&m.gid.to_le_bytes());
                h.update(&m.mtime_ns.to_le_bytes());
                h.update(&(m.xattrs.len() as u32).to_le_bytes());
                for x in &m.xattrs {
                    h.update(&(x.name.len() as u32).to_le_bytes());
                    h.update(x.name.as_bytes());
                    h.update(&(x.value.len() as u32).to_le_bytes());
                    h.update(&x.value);
                }
            }
        }
    }
    /// An entry the other side should have but does not.
    pub(crate) fn absent(&mut self, path: &str) {
        self.0.update(&(path.len() as u32).to_le_bytes());
        self.0.update(path.as_bytes());
        self.0.update(&[0xff]);
    }
    pub(crate) fn finish(self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

impl Manifest {
    /// The compact binary form (postcard) used on the wire and in state files.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a manifest always serializes")
    }

    /// Parses [`Manifest::encode`]'s output (not validated: see [`Manifest::validate`]).
    pub fn decode(b: &[u8]) -> Result<Manifest> {
        postcard::from_bytes(b).map_err(|e| VolumeError::Protocol(format!("manifest: {e}")))
    }

    /// BLAKE3 (hex) over the canonical encoding: for each entry in path order its path, kind,
    /// mode, size, link target, chunk hashes and [`Meta`]. Stat facts and the scan time are not
    /// included.
    pub fn root(&self) -> String {
        let mut h = RootHasher::new(self.entries.len());
        h.top(self.root_mode, Some(&self.root_meta));
        for e in &self.entries {
            h.entry(
                &e.path,
                e.kind,
                e.mode,
                e.size,
                e.target.as_deref(),
                e.chunks.iter().map(Some),
            );
            h.meta(Some(&e.meta));
        }
        h.finish()
    }

    /// Total bytes of all files.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Total chunks of all files.
    pub fn chunks(&self) -> u64 {
        self.entries.iter().map(|e| e.chunks.len() as u64).sum()
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Checks everything a receiver relies on: limits, path rules, strict path order, every
    /// entry's parent is a directory entry, per-kind fields, chunk count matches size.
    pub fn validate(&self) -> Result<()> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(VolumeError::TooLarge {
                what: "manifest entries",
                got: self.entries.len() as u64,
                limit: MAX_ENTRIES as u64,
            });
        }
        let bad = |p: &str, why: &str| VolumeError::BadManifest(format!("{p:?}: {why}"));
        if self.root_mode & !0o7777 != 0 {
            return Err(bad("", "mode has bits beyond 0o7777"));
        }
        validate_xattrs("", &self.root_meta.xattrs)?;
        let mut prev: Option<&str> = None;
        for e in &self.entries {
            validate_rel(&e.path)?;
            if let Some(p) = prev {
                if p >= e.path.as_str() {
                    return Err(bad(&e.path, "entries not in strict path order"));
                }
            }
            prev = Some(&e.path);
            if let Some((parent, _)) = e.path.rsplit_once('/') {
                match self.get(parent) {
                    Some(p) if p.kind == Kind::Dir => {}
                    _ => return Err(bad(&e.path, "parent is not a directory entry")),
                }
            }
            if e.mode & !0o7777 != 0 {
                return Err(bad(&e.path, "mode has bits beyond 0o7777"));
            }
            validate_xattrs(&e.path, &e.meta.xattrs)?;
            match e.kind {
                Kind::File => {
                    if e.target.is_some() {
                        return Err(bad(&e.path, "file with a link target"));
                    }
                    if e.chunks.len() as u64 != chunk_count(e.size) {
                        return Err(bad(&e.path, "chunk count does not match size"));
                    }
                }
                Kind::Dir => {
                    if e.size != 0 || e.target.is_some() || !e.chunks.is_empty() {
                        return Err(bad(&e.path, "directory with size, target or chunks"));
                    }
                }
                Kind::Symlink => {
                    let Some(t) = &e.target else {
                        return Err(bad(&e.path, "symlink without target"));
                    };
                    if t.is_empty() || t.len() > MAX_PATH || t.contains('\0') {
                        return Err(bad(&e.path, "symlink target empty, too long or has NUL"));
                    }
                    if e.size != 0 || e.mode != 0 || !e.chunks.is_empty() {
                        return Err(bad(&e.path, "symlink with size, mode or chunks"));
                    }
                }
                Kind::Fifo => {
                    if e.size != 0 || e.target.is_some() || !e.chunks.is_empty() {
                        return Err(bad(&e.path, "fifo with size, target or chunks"));
                    }
                }
                Kind::Hardlink => {
                    let Some(t) = &e.target else {
                        return Err(bad(&e.path, "hard link without target"));
                    };
                    validate_rel(t)?;
                    // The file comes first in path order, so a receiver has it when it links.
                    if t.as_str() >= e.path.as_str()
                        || self.get(t).is_none_or(|f| f.kind != Kind::File)
                    {
                        return Err(bad(&e.path, "hard link to something not an earlier file"));
                    }
                    if e.size != 0
                        || e.mode != 0
                        || !e.chunks.is_empty()
                        || e.meta != Meta::default()
                    {
                        return Err(bad(
                            &e.path,
                            "hard link with size, mode, chunks or metadata",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn validate_xattrs(path: &str, xs: &[Xattr]) -> Result<()> {
    let bad = |why: String| VolumeError::BadManifest(format!("{path:?}: {why}"));
    if xs.len() > MAX_XATTRS {
        return Err(bad(format!("more than {MAX_XATTRS} extended attributes")));
    }
    let mut prev: Option<&str> = None;
    for x in xs {
        if x.name.is_empty() || x.name.len() > MAX_XATTR_NAME || x.name.contains('\0') {
            return Err(bad(format!(
                "xattr name {:?} empty, too long or has NUL",
                x.name
            )));
        }
        if !XATTR_PREFIXES.iter().any(|p| x.name.starts_with(p)) {
            return Err(bad(format!(
                "xattr {:?} is not in a carried namespace",
                x.name
            )));
        }
        if x.value.len() > MAX_XATTR_VALUE {
            return Err(bad(format!(
                "xattr {:?} value over {MAX_XATTR_VALUE} bytes",
                x.name
            )));
        }
        if prev.is_some_and(|p| p >= x.name.as_str()) {
            return Err(bad("xattrs not sorted by unique name".into()));
        }
        prev = Some(&x.name);
    }
    Ok(())
}

/// A path a receiver may create below its destination: relative, `/`-separated, no empty, `.` or
/// `..` component, no NUL, at most [`MAX_PATH`] bytes.
pub fn validate_rel(p: &str) -> Result<()> {
    let bad = |why: &str| VolumeError::BadPath(format!("{p:?}: {why}"));
    if p.is_empty() {
        return Err(bad("empty"));
    }
    if p.len() > MAX_PATH {
        return Err(VolumeError::TooLarge {
            what: "path",
            got: p.len() as u64,
            limit: MAX_PATH as u64,
        });
    }
    if p.starts_with('/') {
        return Err(bad("absolute"));
    }
    if p.contains('\0') {
        return Err(bad("contains NUL"));
    }
    for c in p.split('/') {
        match c {
            "" => return Err(bad("empty component")),
            "." | ".." => return Err(bad("dot component")),
            _ => {}
        }
    }
    Ok(())
}

/// What a scan did.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanStats {
    /// Files whose chunks were (re)computed.
    pub files_rehashed: u64,
    pub bytes_hashed: u64,
    /// Files whose hashes came from the previous manifest (quick check passed).
    pub files_reused: u64,
}

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Scans `dir`. A file's chunk hashes are taken from `previous` only when its size, mtime, ctime
/// and inode are unchanged and both timestamps are older than `previous`'s scan start minus
/// [`RACY_MARGIN_NS`] (git's "racy clean" rule); every other file is read and hashed, in
/// parallel.
pub fn scan(dir: &Path, previous: Option<&Manifest>) -> Result<Manifest> {
    scan_with_stats(dir, previous).map(|(m, _)| m)
}

/// Rehashes everything under `dir` (no quick check).
pub fn verify_dir(dir: &Path) -> Result<Manifest> {
    scan(dir, None)
}

/// [`scan`], also saying how much it hashed.
pub fn scan_with_stats(dir: &Path, previous: Option<&Manifest>) -> Result<(Manifest, ScanStats)> {
    let scan_start_ns = now_ns();
    let mut entries = walk(dir)?;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    link_hardlinks(&mut entries);
    let mut stats = ScanStats::default();
    let cutoff = previous.map(|p| p.scan_start_ns.saturating_sub(RACY_MARGIN_NS));
    let mut todo = Vec::new();
    for (i, e) in entries.iter_mut().enumerate() {
        if e.kind != Kind::File {
            continue;
        }
        let n = chunk_count(e.size);
        if let (Some(prev), Some(cutoff)) = (previous, cutoff) {
            if let Some(p) = prev.get(&e.path) {
                if p.kind == Kind::File
                    && p.size == e.size
                    && p.stat == e.stat
                    && p.chunks.len() as u64 == n
                    && e.stat.mtime_ns < cutoff
                    && e.stat.ctime_ns < cutoff
                {
                    e.chunks = p.chunks.clone();
                    stats.files_reused += 1;
                    continue;
                }
            }
        }
        stats.files_rehashed += 1;
        stats.bytes_hashed += e.size;
        e.chunks = vec![ChunkHash([0; 32]); n as usize];
        let mut c = 0;
        while c < n {
            let k = JOB_CHUNKS.min(n - c);
            todo.push((i, c, k));
            c += k;
        }
    }
    hash_jobs(dir, &mut entries, &todo)?;
    let md = std::fs::metadata(dir).map_err(io(dir))?;
    Ok((
        Manifest {
            scan_start_ns,
            entries,
            root_mode: md.mode() & 0o7777,
            root_meta: Meta {
                uid: md.uid(),
                gid: md.gid(),
                mtime_ns: Stat::of(&md).mtime_ns,
                xattrs: read_xattrs(dir)?,
            },
        },
        stats,
    ))
}

fn walk(root: &Path) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let abs = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        for de in std::fs::read_dir(&abs).map_err(io(&abs))? {
            let de = de.map_err(io(&abs))?;
            let name = de.file_name();
            let Some(name) = name.to_str() else {
                return Err(VolumeError::NonUtf8 { path: de.path() });
            };
            let path = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            if path.len() > MAX_PATH {
                return Err(VolumeError::TooLarge {
                    what: "path",
                    got: path.len() as u64,
                    limit: MAX_PATH as u64,
                });
            }
            if out.len() >= MAX_ENTRIES {
                return Err(VolumeError::TooLarge {
                    what: "volume entries",
                    got: out.len() as u64 + 1,
                    limit: MAX_ENTRIES as u64,
                });
            }
            let full = de.path();
            let md = std::fs::symlink_metadata(&full).map_err(io(&full))?;
            let ft = md.file_type();
            let stat = Stat::of(&md);
            let mode = md.mode() & 0o7777;
            let (kind, mode, size, target) = if ft.is_file() {
                (Kind::File, mode, md.len(), None)
            } else if ft.is_dir() {
                stack.push(path.clone());
                (Kind::Dir, mode, 0, None)
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&full).map_err(io(&full))?;
                let Some(t) = t.to_str() else {
                    return Err(VolumeError::NonUtf8 { path: full });
                };
                (Kind::Symlink, 0, 0, Some(t.to_string()))
            } else if ft.is_fifo() {
                (Kind::Fifo, mode, 0, None)
            } else if ft.is_socket() {
                // A unix socket is an endpoint of a running program, which makes it again when it
                // starts (PostgreSQL's `.s.PGSQL.5432`): nothing to carry.
                continue;
            } else {
                return Err(VolumeError::UnsupportedFileType { path: full });
            };
            let meta = Meta {
                uid: md.uid(),
                gid: md.gid(),
                mtime_ns: stat.mtime_ns,
                xattrs: read_xattrs(&full)?,
            };
            out.push(Entry {
                path,
                kind,
                mode,
                size,
                target,
                chunks: Vec::new(),
                stat,
                meta,
            });
        }
    }
    Ok(out)
}

/// The entry's extended attributes, sorted by name (symlinks are not followed).
pub(crate) fn read_xattrs(p: &Path) -> Result<Vec<Xattr>> {
    let names = match xattr::list(p) {
        Ok(n) => n,
        // A file system without xattrs has none to carry.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(io(p)(e)),
    };
    let mut out = Vec::new();
    for n in names {
        let Some(name) = n.to_str() else {
            return Err(VolumeError::NonUtf8 { path: p.into() });
        };
        if !XATTR_PREFIXES.iter().any(|pre| name.starts_with(pre)) {
            continue;
        }
        // Gone between list and get (ENODATA): nothing to carry.
        if let Some(value) = xattr::get(p, &n).map_err(io(p))? {
            out.push(Xattr {
                name: name.to_owned(),
                value,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Files with several names: the first name in path order stays a [`Kind::File`], the others
/// become [`Kind::Hardlink`]s to it (they are one file: carried once, linked on the receiver).
fn link_hardlinks(entries: &mut [Entry]) {
    let mut first: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for i in 0..entries.len() {
        let e = &entries[i];
        if e.kind != Kind::File || e.stat.nlink < 2 {
            continue;
        }
        let key = e.stat.ino;
        match first.get(&key) {
            None => {
                first.insert(key, i);
            }
            Some(&p) => {
                let target = entries[p].path.clone();
                let e = &mut entries[i];
                e.kind = Kind::Hardlink;
                e.target = Some(target);
                e.mode = 0;
                e.size = 0;
                e.meta = Meta::default();
            }
        }
    }
}

/// Reads `len` bytes at `off` into `buf`; past the end of a file that shrank, zeros (the scan
/// and the sender agree on this, and the racy-clean rule rehashes such a file next round).
pub(crate) fn read_chunk(f: &File, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Hashes the (entry, first chunk, count) jobs on up to `available_parallelism` threads.
fn hash_jobs(root: &Path, entries: &mut [Entry], jobs: &[(usize, u64, u64)]) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, u64, Vec<ChunkHash>)>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<VolumeError>> = Mutex::new(None);
    let view: &[Entry] = entries;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; CHUNK_SIZE as usize];
                let mut open: Option<(usize, File)> = None;
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    if j >= jobs.len() || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let (i, first, k) = jobs[j];
                    let e = &view[i];
                    let path = root.join(&e.path);
                    let r = (|| -> Result<Vec<ChunkHash>> {
                        if open.as_ref().map(|(oi, _)| *oi) != Some(i) {
                            let f = File::open(&path).map_err(io(&path))?;
                            open = Some((i, f));
                        }
                        let f = &open.as_ref().expect("just opened").1;
                        let mut hs = Vec::with_capacity(k as usize);
                        for c in first..first + k {
                            let len = chunk_len(e.size, c) as usize;
                            read_chunk(f, c * CHUNK_SIZE, &mut buf[..len]).map_err(io(&path))?;
                            hs.push(ChunkHash::of(&buf[..len]));
                        }
                        Ok(hs)
                    })();
                    match r {
                        Ok(hs) => results.lock().expect("poisoned").push((i, first, hs)),
                        Err(e) => {
                            *failure.lock().expect("poisoned") = Some(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().expect("poisoned") {
        return Err(e);
    }
    for (i, first, hs) in results.into_inner().expect("poisoned") {
        let f = first as usize;
        entries[i].chunks[f..f + hs.len()].copy_from_slice(&hs);
    }
    Ok(())
}

//! What a volume holds: [`Manifest`] (entries, chunk hashes, the stat facts of the quick check),
//! its canonical [`Manifest::root`], path rules, and [`scan`] / [`verify_dir`].

use crate::error::{io, Result, VolumeError};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
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
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
        }
    }
}

/// The stat facts of the quick check. Not part of the root hash (they differ between hosts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

impl Stat {
    pub fn of(md: &std::fs::Metadata) -> Stat {
        Stat {
            mtime_ns: md.mtime().saturating_mul(1_000_000_000) + md.mtime_nsec(),
            ctime_ns: md.ctime().saturating_mul(1_000_000_000) + md.ctime_nsec(),
            ino: md.ino(),
        }
    }
}

/// One file, directory or symlink under the volume root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative, `/`-separated, UTF-8 (see [`validate_rel`]).
    pub path: String,
    pub kind: Kind,
    /// Permission bits (`0o777` at most: set-id and sticky bits are not carried). 0 for symlinks.
    pub mode: u32,
    /// Bytes, for files; 0 for directories and symlinks.
    pub size: u64,
    /// For symlinks: where it points (copied verbatim, never followed).
    #[serde(default)] // no skip_serializing_if: postcard is not self-describing
    pub target: Option<String>,
    /// One hash per [`CHUNK_SIZE`] piece of a file, in order.
    #[serde(default)]
    pub chunks: Vec<ChunkHash>,
    /// Quick-check facts (source side only; ignored by the receiver and by the root).
    #[serde(default)]
    pub stat: Stat,
}

/// Everything under one root, sorted by path, plus when the scan that made it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Wall clock (ns since the epoch) when the scan started; the racy-clean rule compares file
    /// timestamps with it.
    pub scan_start_ns: i64,
    pub entries: Vec<Entry>,
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
        h.update(b"ferry-volume-root-v1\0");
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
    /// BLAKE3 (hex) over the canonical encoding: for each entry in path order its path, kind,
    /// mode, size, link target and chunk hashes. Stat facts and the scan time are not included.
    /// The compact binary form (postcard) used on the wire and in state files.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a manifest always serializes")
    }

    /// Parses [`Manifest::encode`]'s output (not validated: see [`Manifest::validate`]).
    pub fn decode(b: &[u8]) -> Result<Manifest> {
        postcard::from_bytes(b).map_err(|e| VolumeError::Protocol(format!("manifest: {e}")))
    }

    pub fn root(&self) -> String {
        let mut h = RootHasher::new(self.entries.len());
        for e in &self.entries {
            h.entry(
                &e.path,
                e.kind,
                e.mode,
                e.size,
                e.target.as_deref(),
                e.chunks.iter().map(Some),
            );
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
            if e.mode & !0o777 != 0 {
                return Err(bad(&e.path, "mode has bits beyond 0o777"));
            }
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
            }
        }
        Ok(())
    }
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
    Ok((
        Manifest {
            scan_start_ns,
            entries,
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
            let (kind, mode, size, target) = if ft.is_file() {
                (Kind::File, md.mode() & 0o777, md.len(), None)
            } else if ft.is_dir() {
                stack.push(path.clone());
                (Kind::Dir, md.mode() & 0o777, 0, None)
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&full).map_err(io(&full))?;
                let Some(t) = t.to_str() else {
                    return Err(VolumeError::NonUtf8 { path: full });
                };
                (Kind::Symlink, 0, 0, Some(t.to_string()))
            } else {
                return Err(VolumeError::UnsupportedFileType { path: full });
            };
            out.push(Entry {
                path,
                kind,
                mode,
                size,
                target,
                chunks: Vec::new(),
                stat,
            });
        }
    }
    Ok(out)
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

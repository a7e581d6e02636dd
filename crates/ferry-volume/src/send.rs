//! The source side: scan, send the manifest, send what the receiver needs, repair until verified.

use crate::error::{io, ChunkRef, Result, VolumeError};
use crate::faults::Faults;
use crate::manifest::{
    chunk_len, read_chunk, scan_with_stats, ChunkHash, Kind, Manifest, CHUNK_SIZE,
};
use crate::wire::{self, Conn, Hello, Msg, Verdict};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Retry passes after the first pass of data.
pub const MAX_RETRY_PASSES: u32 = 3;
const PROGRESS_EVERY: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Scanning,
    Sending,
    Verifying,
}

/// Reported to [`SendOptions::progress`] at most every ~50 ms, and at the end of each phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub chunks_done: u64,
    pub chunks_total: u64,
    pub phase: Phase,
}

pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

#[derive(Clone, Default)]
pub struct SendOptions {
    pub faults: Faults,
    pub progress: Option<ProgressFn>,
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Entries in the manifest.
    pub entries: u64,
    /// Bytes of all files in the volume.
    pub bytes_total: u64,
    /// Chunks of all files in the volume.
    pub chunks_total: u64,
    /// Data frames sent, all passes.
    pub chunks_sent: u64,
    /// Chunk bytes sent, all passes.
    pub bytes_sent: u64,
    /// Data frames sent in retry passes.
    pub chunks_resent: u64,
    /// Files read and hashed by the scan (the others passed the quick check).
    pub files_rehashed: u64,
    /// Chunks that changed on the source after the scan (so they were not sent again); only
    /// possible while the machine runs. Such a round ends with `verified == false`.
    pub chunks_changed_during_round: u64,
    /// The manifest's root (hex).
    pub root: String,
    /// The receiver proved it holds exactly `root`.
    pub verified: bool,
    pub scan_ms: u64,
    pub transfer_ms: u64,
}

/// The source side of a volume fork. Keeps the last manifest so the next round's scan only
/// rehashes files that changed.
pub struct Sender {
    src: PathBuf,
    last: Option<Manifest>,
}

struct Reporter<'a> {
    f: Option<&'a ProgressFn>,
    last: Option<Instant>,
}

impl Reporter<'_> {
    fn tick(&mut self, p: Progress, force: bool) {
        let Some(f) = self.f else { return };
        let now = Instant::now();
        if force
            || self
                .last
                .is_none_or(|l| now.duration_since(l) >= PROGRESS_EVERY)
        {
            self.last = Some(now);
            f(p);
        }
    }
}

impl Sender {
    /// `last`: the manifest of a previous round (e.g. persisted as JSON by the coordinator), or
    /// `None` to hash everything.
    pub fn new(src: &Path, last: Option<Manifest>) -> Sender {
        Sender {
            src: src.to_path_buf(),
            last,
        }
    }

    pub fn last_manifest(&self) -> Option<&Manifest> {
        self.last.as_ref()
    }

    /// One round over `stream` (a fresh connection per round is fine). `Ok` with
    /// `verified == false` only when source files changed during the round (a pre-copy round
    /// of a running machine); a receiver that stays unverified for any other reason is
    /// [`VolumeError::Unverified`].
    pub fn round<S: Read + Write>(
        &mut self,
        stream: &mut S,
        hello: &Hello,
        opts: &SendOptions,
    ) -> Result<RoundReport> {
        let mut rep = Reporter {
            f: opts.progress.as_ref(),
            last: None,
        };
        let t0 = Instant::now();
        let prev_bytes = self.last.as_ref().map(|m| m.bytes()).unwrap_or(0);
        rep.tick(
            Progress {
                bytes_done: 0,
                bytes_total: prev_bytes,
                chunks_done: 0,
                chunks_total: 0,
                phase: Phase::Scanning,
            },
            true,
        );
        let (m, stats) = scan_with_stats(&self.src, self.last.as_ref())?;
        // The quick check only compares the source with itself, so the new manifest is the
        // right base for the next scan whatever happens to this round.
        self.last = Some(m);
        let m = self.last.as_ref().expect("just set");
        let root = m.root();
        let mut report = RoundReport {
            entries: m.entries.len() as u64,
            bytes_total: m.bytes(),
            chunks_total: m.chunks(),
            files_rehashed: stats.files_rehashed,
            root: root.clone(),
            scan_ms: t0.elapsed().as_millis() as u64,
            ..Default::default()
        };
        rep.tick(
            Progress {
                bytes_done: stats.bytes_hashed,
                bytes_total: stats.bytes_hashed,
                chunks_done: 0,
                chunks_total: 0,
                phase: Phase::Scanning,
            },
            true,
        );
        let t1 = Instant::now();
        let mut conn = Conn::new(stream);
        conn.send(wire::HELLO, hello)?;
        conn.flush()?;
        match conn.recv()? {
            Msg::Welcome => {}
            Msg::Error(e) if e == "unauthorized" => return Err(VolumeError::Unauthorized),
            Msg::Error(e) => return Err(VolumeError::Remote(e)),
            other => return Err(unexpected("welcome", &other)),
        }
        conn.send(wire::MANIFEST, m)?;
        conn.flush()?;
        let mut todo = match conn.recv()? {
            Msg::Need(n) => n.chunks,
            Msg::Error(e) => return Err(VolumeError::Remote(e)),
            other => return Err(unexpected("need", &other)),
        };
        check_refs(m, &todo)?;
        let mut faults = opts.faults;
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        let mut pass = 0;
        let mut changed: HashSet<ChunkRef> = HashSet::new();
        let verdict: Verdict = loop {
            let total_bytes: u64 = todo
                .iter()
                .map(|&(e, c)| chunk_len(m.entries[e as usize].size, c as u64))
                .sum();
            let mut p = Progress {
                bytes_done: 0,
                bytes_total: total_bytes,
                chunks_done: 0,
                chunks_total: todo.len() as u64,
                phase: Phase::Sending,
            };
            let mut open: Option<(u32, File)> = None;
            for &(e, c) in &todo {
                p.chunks_done += 1;
                if pass == 0 && faults.drop_chunks > 0 {
                    faults.drop_chunks -= 1;
                    continue;
                }
                let entry = &m.entries[e as usize];
                let path = self.src.join(&entry.path);
                if open.as_ref().map(|o| o.0) != Some(e) {
                    open = Some((e, File::open(&path).map_err(io(&path))?));
                }
                let f = &open.as_ref().expect("just opened").1;
                let len = chunk_len(entry.size, c as u64) as usize;
                let bytes = &mut buf[..len];
                read_chunk(f, c as u64 * CHUNK_SIZE, bytes).map_err(io(&path))?;
                if pass > 0 && ChunkHash::of(bytes) != entry.chunks[c as usize] {
                    // Changed since the scan: sending it again cannot help this round.
                    changed.insert((e, c));
                    continue;
                }
                if pass == 0 && faults.corrupt_chunks > 0 {
                    faults.corrupt_chunks -= 1;
                    bytes[len / 2] ^= 0x5a;
                }
                conn.send_data(e, c, bytes)?;
                report.chunks_sent += 1;
                report.bytes_sent += len as u64;
                if pass > 0 {
                    report.chunks_resent += 1;
                }
                p.bytes_done += len as u64;
                rep.tick(p, false);
            }
            rep.tick(p, true);
            conn.send_empty(wire::DONE)?;
            conn.flush()?;
            rep.tick(
                Progress {
                    phase: Phase::Verifying,
                    ..p
                },
                true,
            );
            let v = match conn.recv()? {
                Msg::Verdict(v) => v,
                Msg::Error(e) => return Err(VolumeError::Remote(e)),
                other => return Err(unexpected("verdict", &other)),
            };
            check_refs(m, &v.missing)?;
            if v.verified || pass == MAX_RETRY_PASSES {
                break v;
            }
            todo = v
                .missing
                .iter()
                .filter(|r| !changed.contains(r))
                .copied()
                .collect();
            if todo.is_empty() {
                break v;
            }
            pass += 1;
        };
        report.chunks_changed_during_round = changed.len() as u64;
        conn.send_empty(wire::BYE)?;
        conn.flush()?;
        report.transfer_ms = t1.elapsed().as_millis() as u64;
        report.verified = verdict.verified && verdict.root == root;
        if verdict.verified && verdict.root != root {
            return Err(VolumeError::Protocol(format!(
                "receiver claims verified with root {} but the manifest's root is {root}",
                verdict.root
            )));
        }
        let only_changed =
            !changed.is_empty() && verdict.missing.iter().all(|r| changed.contains(r));
        if !report.verified && !only_changed {
            return Err(VolumeError::Unverified {
                root_expected: root,
                root_got: verdict.root,
                missing: verdict.missing,
            });
        }
        Ok(report)
    }
}

fn unexpected(want: &str, got: &Msg) -> VolumeError {
    let name = match got {
        Msg::Hello(_) => "hello",
        Msg::Welcome => "welcome",
        Msg::Manifest(_) => "manifest",
        Msg::Need(_) => "need",
        Msg::Data { .. } => "data",
        Msg::Done => "done",
        Msg::Verdict(_) => "verdict",
        Msg::Bye => "bye",
        Msg::Error(_) => "error",
    };
    VolumeError::Protocol(format!("expected {want}, got {name}"))
}

pub(crate) fn unexpected_msg(want: &str, got: &Msg) -> VolumeError {
    unexpected(want, got)
}

/// Every (entry, chunk) the receiver names must be a chunk of a file in the manifest.
fn check_refs(m: &Manifest, refs: &[ChunkRef]) -> Result<()> {
    for &(e, c) in refs {
        match m.entries.get(e as usize) {
            Some(en) if en.kind == Kind::File && (c as usize) < en.chunks.len() => {}
            _ => {
                return Err(VolumeError::Protocol(format!(
                    "receiver asked for chunk ({e}, {c}) that does not exist"
                )))
            }
        }
    }
    Ok(())
}

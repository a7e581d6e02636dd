//! Walking: visits every file under the given paths (in parallel), reads each once, runs the
//! matcher, names the owners and, when asked, rewrites the file. What must not be read or
//! changed (binary, unreadable, special or huge files, symlink loops) is skipped with a note.
//!
//! Config sweeps must see everything, so unlike ripgrep nothing is hidden by `.gitignore`,
//! `.ignore` or dot-file rules; only `.git` directories (history, not config) and our own
//! backup and temporary files are left out. Symlinks are followed, because configs are often
//! symlinked (Kubernetes ConfigMap volumes, `/etc/alternatives`), and each file is scanned once
//! however many paths lead to it.

use crate::matcher::{Literal, Matcher};
use crate::owners::OwnerIndex;
use crate::report::{Change, Hit, Report, Skipped};
use crate::rewrite::{self, Backup};
use crate::SweepError;
use ignore::{WalkBuilder, WalkState};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// How much of a file is looked at to call it binary (as git and ripgrep do).
const BINARY_PROBE: usize = 8 * 1024;

/// Default for `--max-file-size`: larger files are not configs, and are read whole otherwise.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// What a sweep does besides finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteOptions {
    /// Compute and show the diff, change nothing.
    pub dry_run: bool,
    pub backup: Backup,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Files larger than this are skipped with a note.
    pub max_file_size: u64,
    /// Walker threads; 0 picks one per CPU.
    pub threads: usize,
    /// `Some` to rewrite literals whose owner is known.
    pub rewrite: Option<RewriteOptions>,
    /// Files never scanned or rewritten, with the reason noted (the owners list itself: it is
    /// this sweep's input, and rewriting its addresses to names would break the next sweep).
    pub exclude: Vec<(PathBuf, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            threads: 0,
            rewrite: None,
            exclude: Vec::new(),
        }
    }
}

struct Shared<'a> {
    matcher: Matcher,
    owners: &'a dyn OwnerIndex,
    opts: &'a Options,
    /// (device, inode) of every file scanned, so a file reached through several symlinks is
    /// scanned (and rewritten) once.
    seen: Mutex<HashSet<(u64, u64)>>,
    /// (device, inode) of `Options::exclude` files, with their reasons.
    excluded: HashMap<(u64, u64), String>,
    report: Mutex<Report>,
    files: AtomicU64,
    bytes: AtomicU64,
}

/// Sweeps `paths` (files or directories). Fails, before reading or writing anything, only on bad
/// input: no paths, a path that does not exist, a backup directory that is not a directory.
pub fn sweep(
    paths: &[PathBuf],
    opts: &Options,
    owners: &dyn OwnerIndex,
) -> Result<Report, SweepError> {
    let Some((first, rest)) = paths.split_first() else {
        return Err(SweepError::NoPaths);
    };
    for p in paths {
        if let Err(e) = fs::symlink_metadata(p) {
            return Err(if e.kind() == io::ErrorKind::NotFound {
                SweepError::NoSuchPath { path: p.clone() }
            } else {
                SweepError::Read {
                    path: p.clone(),
                    source: e,
                }
            });
        }
    }
    // The backup directory may live inside a swept tree; never sweep our own backups.
    let backup_dir = match opts.rewrite.as_ref().map(|r| &r.backup) {
        Some(Backup::Dir(d)) => Some(check_backup_dir(d)?),
        _ => None,
    };

    let excluded = opts
        .exclude
        .iter()
        .filter_map(|(p, why)| {
            fs::metadata(p)
                .ok()
                .map(|m| ((m.dev(), m.ino()), why.clone()))
        })
        .collect();

    let shared = Shared {
        matcher: Matcher::new(),
        owners,
        opts,
        seen: Mutex::new(HashSet::new()),
        excluded,
        report: Mutex::new(Report::default()),
        files: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    };

    let mut builder = WalkBuilder::new(first);
    for p in rest {
        builder.add(p);
    }
    builder
        .standard_filters(false)
        .follow_links(true)
        .threads(opts.threads);
    builder.filter_entry(move |e| {
        if e.file_name() == ".git" {
            return false;
        }
        match &backup_dir {
            Some(dir) if e.file_type().is_some_and(|t| t.is_dir()) => {
                fs::canonicalize(e.path()).map_or(true, |p| &p != dir)
            }
            _ => true,
        }
    });
    builder.build_parallel().run(|| {
        let shared = &shared;
        let mut buf = Vec::new();
        Box::new(move |entry| {
            shared.visit(entry, &mut buf);
            WalkState::Continue
        })
    });

    let mut report = shared
        .report
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let dry_run = opts.rewrite.as_ref().is_some_and(|r| r.dry_run);
    report.finish(
        shared.files.into_inner(),
        shared.bytes.into_inner(),
        dry_run,
    );
    Ok(report)
}

fn check_backup_dir(dir: &Path) -> Result<PathBuf, SweepError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => fs::canonicalize(dir).map_err(|source| SweepError::Read {
            path: dir.to_owned(),
            source,
        }),
        Ok(_) => Err(SweepError::BackupDir {
            path: dir.to_owned(),
            reason: "exists and is not a directory".into(),
        }),
        // Created on first use, so a sweep with nothing to rewrite leaves no trace.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Ok(std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned()))
        }
        Err(source) => Err(SweepError::Read {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// The path and a human reason for a walker error.
fn describe_walk_error(err: &ignore::Error) -> (Option<PathBuf>, String) {
    match err {
        ignore::Error::WithPath { path, err } => (Some(path.clone()), describe_walk_error(err).1),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            describe_walk_error(err)
        }
        ignore::Error::Loop { ancestor, child } => (
            Some(child.clone()),
            format!("symlink loop (leads back to {})", ancestor.display()),
        ),
        ignore::Error::Io(e) => (None, format!("unreadable: {e}")),
        ignore::Error::Partial(errs) if !errs.is_empty() => describe_walk_error(&errs[0]),
        other => (None, other.to_string()),
    }
}

enum ReadOutcome {
    Ok,
    TooLarge,
}

/// Reads the whole file into `buf[..returned len]`, stopping past `max` bytes. The buffer keeps
/// its high-water size between files, so it is zeroed only when it grows, and a file that fits
/// costs two `read` calls.
fn read_file(
    mut file: &File,
    expected: u64,
    max: u64,
    buf: &mut Vec<u8>,
) -> io::Result<(usize, ReadOutcome)> {
    let want = (expected.min(max) as usize).saturating_add(1);
    if buf.len() < want {
        buf.resize(want, 0);
    }
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if filled as u64 > max {
                return Ok((filled, ReadOutcome::TooLarge));
            }
            // The file grew while we read it: keep going, up to the limit.
            let grow = (buf.len() * 2).min(max as usize + 1).max(buf.len() + 1);
            buf.resize(grow, 0);
        }
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if filled as u64 > max {
        return Ok((filled, ReadOutcome::TooLarge));
    }
    Ok((filled, ReadOutcome::Ok))
}

impl Shared<'_> {
    fn skip(&self, path: &Path, reason: impl Into<String>) {
        let s = Skipped {
            path: path.to_owned(),
            reason: reason.into(),
        };
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .skipped
            .push(s);
    }

    fn visit(&self, entry: Result<ignore::DirEntry, ignore::Error>, buf: &mut Vec<u8>) {
        let entry = match entry {
            Ok(e) => e,
            Err(err) => {
                let (path, reason) = describe_walk_error(&err);
                self.skip(&path.unwrap_or_default(), reason);
                return;
            }
        };
        let Some(ft) = entry.file_type() else { return };
        if ft.is_dir() {
            return;
        }
        let path = entry.path();
        if !ft.is_file() {
            // FIFOs would block the reader forever; devices and sockets are not configs.
            self.skip(path, "not a regular file");
            return;
        }
        // Our own backups hold the literals we replaced; reporting them would keep CI red
        // forever, and listing each as skipped would drown the real notes. They are left out
        // silently (and documented).
        if entry.file_name().to_str().is_some_and(rewrite::is_own_file) {
            return;
        }
        self.scan_file(path, buf);
    }

    fn scan_file(&self, path: &Path, buf: &mut Vec<u8>) {
        let max = self.opts.max_file_size;
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => return self.skip(path, format!("unreadable: {e}")),
        };
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => return self.skip(path, format!("unreadable: {e}")),
        };
        if !meta.is_file() {
            return self.skip(path, "not a regular file");
        }
        if meta.len() > max {
            return self.skip(
                path,
                format!("larger than --max-file-size ({} > {max} bytes)", meta.len()),
            );
        }
        if let Some(why) = self.excluded.get(&(meta.dev(), meta.ino())) {
            return self.skip(path, why.clone());
        }
        if !self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((meta.dev(), meta.ino()))
        {
            return; // already scanned through another path
        }
        let len = match read_file(&file, meta.len(), max, buf) {
            Ok((len, ReadOutcome::Ok)) => len,
            Ok((_, ReadOutcome::TooLarge)) => {
                return self.skip(
                    path,
                    format!("larger than --max-file-size (grew past {max} bytes while read)"),
                )
            }
            Err(e) => return self.skip(path, format!("unreadable: {e}")),
        };
        let hay = &buf[..len];
        if memchr::memchr(0, &hay[..len.min(BINARY_PROBE)]).is_some() {
            return self.skip(path, "binary (NUL byte in the first 8 KiB)");
        }
        self.files.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);

        let literals = self.matcher.find_all(hay);
        if literals.is_empty() {
            return;
        }
        let mut hits = hits_for(path, hay, &literals, self.owners);
        let change = match &self.opts.rewrite {
            Some(rw) => self.rewrite(path, &meta, hay, &literals, &mut hits, rw),
            None => None,
        };
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        report.hits.extend(hits);
        report.changes.extend(change);
    }

    fn rewrite(
        &self,
        path: &Path,
        meta: &Metadata,
        hay: &[u8],
        literals: &[Literal],
        hits: &mut [Hit],
        rw: &RewriteOptions,
    ) -> Option<Change> {
        let names: Vec<Option<String>> = hits.iter().map(|h| h.owner.dns_name()).collect();
        if names.iter().all(Option::is_none) {
            return None;
        }
        let edits: Vec<(&Literal, Option<&str>)> = literals
            .iter()
            .zip(&names)
            .map(|(l, n)| (l, n.as_deref()))
            .collect();
        let new = rewrite::apply(hay, &edits);
        let diff = rewrite::unified_diff(path, hay, &new);
        let backup = if rw.dry_run {
            None
        } else {
            match rewrite::replace_file(path, meta, hay, &new, &rw.backup) {
                Ok(b) => Some(b.to_string_lossy().into_owned()),
                Err(e) => {
                    self.skip(path, format!("not rewritten: {e}"));
                    return None;
                }
            }
        };
        for (hit, name) in hits.iter_mut().zip(names) {
            hit.rewritten_to = name;
        }
        Some(Change {
            path: path.to_owned(),
            applied: backup.is_some(),
            backup,
            diff,
        })
    }
}

/// Hits with 1-based line and byte column, counting newlines only between literals.
fn hits_for(path: &Path, hay: &[u8], literals: &[Literal], owners: &dyn OwnerIndex) -> Vec<Hit> {
    let (mut line, mut line_start, mut at) = (1, 0, 0);
    literals
        .iter()
        .map(|lit| {
            let seg = &hay[at..lit.span.start];
            let n = memchr::memchr_iter(b'\n', seg).count();
            if n > 0 {
                line += n;
                line_start = at + memchr::memrchr(b'\n', seg).map_or(0, |i| i + 1);
            }
            at = lit.span.start;
            Hit {
                path: path.to_owned(),
                line,
                column: lit.span.start - line_start + 1,
                text: String::from_utf8_lossy(&hay[lit.span.clone()]).into_owned(),
                address: lit.ip,
                form: lit.form,
                owner: owners.owner(lit.ip),
                rewritten_to: None,
            }
        })
        .collect()
}

//! Rewriting: replaces literals with DNS names in a buffer, shows the change as a unified diff,
//! and writes a file atomically next to a backup of the original, so a crash or a full disk at
//! any moment leaves either the old file or the new one, never a mix.

use crate::matcher::Literal;
use std::fs::{self, File, Metadata};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where backups of rewritten files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backup {
    /// `FILE.ferry-bak` beside the file (`FILE.ferry-bak.1`, `.2`, ... if that exists already, so
    /// the backup of the pristine original is never overwritten by a later run).
    Beside,
    /// Under this directory, at the file's absolute path (`DIR/etc/app/db.env`).
    Dir(PathBuf),
}

/// Suffix of backup files; the walker skips files carrying it.
pub const BACKUP_SUFFIX: &str = ".ferry-bak";
/// Suffix of the temporary files an atomic write uses; the walker skips them too.
pub const TEMP_SUFFIX: &str = ".ferry-tmp";

/// True for a file name that one of our own writes produced (backup or temporary file).
pub fn is_own_file(name: &str) -> bool {
    if name.ends_with(TEMP_SUFFIX) {
        return true;
    }
    match name.rfind(BACKUP_SUFFIX) {
        Some(i) => {
            let rest = &name[i + BACKUP_SUFFIX.len()..];
            rest.is_empty()
                || (rest.starts_with('.')
                    && rest.len() > 1
                    && rest[1..].bytes().all(|b| b.is_ascii_digit()))
        }
        None => false,
    }
}

/// `hay` with each literal's `replace` range swapped for its name (`None`: left as it is).
/// Literals must be in order and non-overlapping, as the matcher returns them.
pub fn apply(hay: &[u8], edits: &[(&Literal, Option<&str>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut at = 0;
    for (lit, name) in edits {
        let Some(name) = name else { continue };
        out.extend_from_slice(&hay[at..lit.replace.start]);
        out.extend_from_slice(name.as_bytes());
        at = lit.replace.end;
    }
    out.extend_from_slice(&hay[at..]);
    out
}

/// A unified diff (3 lines of context) between two versions of `path`.
pub fn unified_diff(path: &Path, old: &[u8], new: &[u8]) -> String {
    let shown = path.display().to_string();
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&format!("a/{shown}"), &format!("b/{shown}"))
        .to_string()
}

/// Why an atomic write did not happen. The original file is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("could not write the backup {}: {source}", path.display())]
    Backup { path: PathBuf, source: io::Error },
    #[error("could not write the new version: {0}")]
    Write(#[source] io::Error),
    #[error("could not keep the file's owner {uid}:{gid}: {source}")]
    Owner {
        uid: u32,
        gid: u32,
        source: io::Error,
    },
    #[error("the file changed while it was being swept; not rewritten")]
    Changed,
    #[error("the file has {0} hard links; replacing it would split them, so it is not rewritten")]
    HardLinks(u64),
}

/// Replaces the file at `path` (whose contents were `old` when `meta` was taken) with `new`:
/// backup first, then a temporary file in the same directory with the original's mode and
/// owner, fsynced and renamed over the original. Symlinks are resolved so the link stays a link
/// and its target is what changes. Returns the backup's path.
pub fn replace_file(
    path: &Path,
    meta: &Metadata,
    old: &[u8],
    new: &[u8],
    backup: &Backup,
) -> Result<PathBuf, WriteError> {
    if meta.nlink() > 1 {
        return Err(WriteError::HardLinks(meta.nlink()));
    }
    let real = fs::canonicalize(path).map_err(WriteError::Write)?;
    let dir = real
        .parent()
        .ok_or_else(|| WriteError::Write(io::Error::other("file has no parent directory")))?;

    let backup_path = backup_path(&real, backup).map_err(|source| WriteError::Backup {
        path: real.clone(),
        source,
    })?;
    write_new(&backup_path, old, meta).map_err(|source| match source {
        WriteError::Write(source) => WriteError::Backup {
            path: backup_path.clone(),
            source,
        },
        other => other,
    })?;

    let file_name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(WriteError::Write)?;
    tmp.write_all(new).map_err(WriteError::Write)?;
    keep_mode_and_owner(tmp.as_file(), meta)?;
    tmp.as_file().sync_all().map_err(WriteError::Write)?;

    // Last check before the rename: if someone wrote the file since we read it, their change
    // wins and we leave the file alone (the temp file is removed when `tmp` drops).
    let now = fs::metadata(&real).map_err(WriteError::Write)?;
    if now.len() != meta.len()
        || now.mtime() != meta.mtime()
        || now.mtime_nsec() != meta.mtime_nsec()
        || now.ino() != meta.ino()
    {
        let _ = fs::remove_file(&backup_path); // it is a backup of a version that no longer exists
        return Err(WriteError::Changed);
    }
    tmp.persist(&real).map_err(|e| WriteError::Write(e.error))?;
    // Make the rename itself durable. Best effort: some filesystems refuse fsync on directories.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(backup_path)
}

fn keep_mode_and_owner(file: &File, meta: &Metadata) -> Result<(), WriteError> {
    file.set_permissions(meta.permissions())
        .map_err(WriteError::Write)?;
    let (uid, gid) = (meta.uid(), meta.gid());
    let current = file.metadata().map_err(WriteError::Write)?;
    if current.uid() != uid || current.gid() != gid {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))
            .map_err(|source| WriteError::Owner { uid, gid, source })?;
        // chown clears set-user/group-ID bits; put the mode back.
        file.set_permissions(meta.permissions())
            .map_err(WriteError::Write)?;
    }
    Ok(())
}

/// Writes `contents` to a new file at `path` atomically, with `meta`'s mode and owner.
fn write_new(path: &Path, contents: &[u8], meta: &Metadata) -> Result<(), WriteError> {
    let dir = path
        .parent()
        .ok_or_else(|| WriteError::Write(io::Error::other("backup has no parent directory")))?;
    fs::create_dir_all(dir).map_err(WriteError::Write)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".ferry-bak.")
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(WriteError::Write)?;
    tmp.write_all(contents).map_err(WriteError::Write)?;
    keep_mode_and_owner(tmp.as_file(), meta)?;
    tmp.as_file().sync_all().map_err(WriteError::Write)?;
    // `persist_noclobber` so that two runs racing for one backup name never overwrite each other.
    tmp.persist_noclobber(path)
        .map_err(|e| WriteError::Write(e.error))?;
    Ok(())
}

/// The first free backup name for the (canonical) file `real`.
fn backup_path(real: &Path, backup: &Backup) -> io::Result<PathBuf> {
    let base = match backup {
        Backup::Beside => {
            let mut s = real.as_os_str().to_owned();
            s.push(BACKUP_SUFFIX);
            PathBuf::from(s)
        }
        Backup::Dir(dir) => {
            let rel = real.strip_prefix("/").unwrap_or(real);
            let mut s = dir.join(rel).into_os_string();
            s.push(BACKUP_SUFFIX);
            PathBuf::from(s)
        }
    };
    let mut candidate = base.clone();
    for n in 1..10_000 {
        if fs::symlink_metadata(&candidate).is_err() {
            return Ok(candidate);
        }
        let mut s = base.clone().into_os_string();
        s.push(format!(".{n}"));
        candidate = PathBuf::from(s);
    }
    Err(io::Error::other("too many existing backups"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_files() {
        assert!(is_own_file("db.env.ferry-bak"));
        assert!(is_own_file("db.env.ferry-bak.12"));
        assert!(is_own_file(".db.env.x1y2.ferry-tmp"));
        assert!(!is_own_file("db.env"));
        assert!(!is_own_file("db.env.ferry-bak.old"));
        assert!(!is_own_file("db.env.ferry-bak."));
    }
}

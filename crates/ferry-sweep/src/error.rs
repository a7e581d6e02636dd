//! The errors that stop a sweep before it changes anything (bad input, a missing path, a
//! malformed owners file). Per-file trouble during a sweep is not an error: that file is skipped
//! with a note (see `report::Skipped`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SweepError {
    #[error("{}: no such file or directory", path.display())]
    NoSuchPath { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("owners: {reason}")]
    Owners { reason: String },
    #[error("owners file {}: {reason}", path.display())]
    OwnersFile { path: PathBuf, reason: String },
    #[error("backup directory {}: {reason}", path.display())]
    BackupDir { path: PathBuf, reason: String },
    #[error("nothing to sweep: give at least one path")]
    NoPaths,
}

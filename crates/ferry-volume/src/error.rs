//! The one error type of the crate: every failure names what failed (a path, a limit, the peer's
//! message), and every parse error of the wire protocol is one of these, never a panic.

use std::path::PathBuf;

/// A chunk named by (entry index in the manifest, chunk index in that file).
pub type ChunkRef = (u32, u32);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// A local file system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading from or writing to the connection failed.
    #[error("connection: {0}")]
    Net(#[source] std::io::Error),
    /// The peer sent something this side does not accept (bad frame, bad JSON, wrong order).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The peer answered with an error frame.
    #[error("peer reported: {0}")]
    Remote(String),
    /// The receiver's `authorize` refused the session (or, on the sender, the receiver said so).
    #[error("unauthorized")]
    Unauthorized,
    /// A length or count is above a hard limit (checked before allocating).
    #[error("{what} too large: {got} > limit {limit}")]
    TooLarge {
        what: &'static str,
        got: u64,
        limit: u64,
    },
    /// A device node in the volume: permanent (a retry meets the same file).
    #[error("{}: a device node cannot be copied (files, directories, symlinks, hard links and fifos are; sockets are skipped)", path.display())]
    UnsupportedFileType { path: PathBuf },
    /// A file name or link target that is not UTF-8.
    #[error("{}: name is not UTF-8", path.display())]
    NonUtf8 { path: PathBuf },
    /// A path (target or manifest entry) that is not a plain relative path, or one that would
    /// lead outside the destination.
    #[error("bad path: {0}")]
    BadPath(String),
    /// A manifest that is well-formed JSON but inconsistent (order, chunk count, kinds, modes).
    #[error("bad manifest: {0}")]
    BadManifest(String),
    /// The receiver could not be brought to the source's root within the retry passes.
    #[error("volume not verified: expected root {root_expected}, receiver holds {root_got}, {} chunk(s) missing", missing.len())]
    Unverified {
        root_expected: String,
        root_got: String,
        missing: Vec<ChunkRef>,
    },
    /// `FERRY_TEST_VOLUME_FAULT` (or a `Faults` string) is malformed.
    #[error("bad fault spec {0:?} (want e.g. \"corrupt=2,drop=1\")")]
    BadFaults(String),
}

impl VolumeError {
    /// Retrying the same copy cannot succeed: the volume holds something that is never copied,
    /// or the peer's manifest is malformed.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            VolumeError::UnsupportedFileType { .. }
                | VolumeError::NonUtf8 { .. }
                | VolumeError::TooLarge { .. }
                | VolumeError::BadManifest(_)
        )
    }
}

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.into();
    move |source| VolumeError::Io { path, source }
}

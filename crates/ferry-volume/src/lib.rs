//! `ferry-volume`: forks a machine's volume (a directory tree) from the source host to a
//! directory on the destination host over one TCP connection per round, moving only what
//! changed and proving with BLAKE3 that the destination holds exactly the source's bytes.
//!
//! # Rounds
//! Migration runs one or more **pre-copy** rounds while the machine runs, stops the machine, runs
//! a **final** round, and starts the machine on the destination only if that round's
//! [`RoundReport::verified`] is true. Each round:
//!
//! 1. the [`Sender`] scans the source into a [`Manifest`] (entries sorted by path; files cut in
//!    [`CHUNK_SIZE`] chunks, each hashed with BLAKE3) and sends [`Hello`], then the manifest;
//! 2. the receiver ([`serve_one`]) checks the hello with its `authorize` callback, compares the
//!    manifest with its durable state table (what it already holds *and verified*), copies chunks
//!    it already holds at another path (renames), and answers with the chunks it needs;
//! 3. the sender sends them; the receiver checks each one's hash against the manifest *before*
//!    writing it at its offset, creates directories and symlinks, sets sizes and modes, removes
//!    what the manifest does not name, makes what changed durable (an fsync per changed file and
//!    directory, or one `syncfs` when more than a few changed), persists its state, and answers with
//!    a verdict: the root computed from its own state table, and what is still missing;
//! 4. the sender re-sends missing or corrupt chunks, at most [`MAX_RETRY_PASSES`] times.
//!
//! Downtime depends on what changed, not on the volume's size: in the final round neither side
//! reads or hashes an unchanged file. The sender's **quick check** reuses a file's hashes from
//! the previous manifest when size, mtime, ctime and inode are unchanged — with git's
//! **racy-clean rule**: only if both timestamps are older than the previous scan's start minus
//! [`RACY_MARGIN_NS`] (50 ms), because Linux stamps files from a coarse clock (up to a jiffy
//! behind), so a file written in the same tick as the scan could look unchanged although the
//! scan read older bytes. The receiver trusts its state table after a `stat` per file.
//!
//! The receiver's state lives at [`state_path`]`(dest)` = `<dest>/../.<name>.ferry-sync` (postcard),
//! outside the volume, replaced atomically at the end of each pass and every
//! [`CHECKPOINT_BYTES`] (after syncing the files written since), so a receiver killed mid-round
//! is asked again only for chunks it had not recorded.
//!
//! # What it must never do
//! - write outside the destination: every path (the hello's `target`, every manifest entry) is
//!   relative with no `..`, empty or absolute component and no NUL; a parent that is a symlink
//!   in the destination is refused or replaced by a real directory; files are opened with
//!   `O_NOFOLLOW`; symlinks are created, never followed;
//! - write a byte whose chunk hash it has not checked, or claim `verified` from anything but its
//!   own record of checked bytes;
//! - panic on input from the peer: every frame length is checked against a hard limit before
//!   allocating ([`wire`]), every parse failure is a [`VolumeError`].
//!
//! # What a fork keeps
//! Everything a program relies on: bytes, owner and group (as stored on disk), all mode bits
//! (set-id and sticky too), mtimes, symlinks (never followed), hard links (one file, linked
//! again on the receiver), extended attributes (`user.`, `security.`, `trusted.`, POSIX ACLs),
//! empty directories, and sparseness: all-zero 4 KiB blocks are left as holes, and an all-zero
//! chunk does not even cross the network. Fifos are recreated (empty). Unix sockets are skipped:
//! the program that owns one makes it again. A device node is a permanent error
//! ([`VolumeError::UnsupportedFileType`]): retrying cannot help.
//!
//! # Example
//! ```
//! use ferry_volume::{serve_one, verify_dir, Hello, SendOptions, Sender};
//! use std::net::{TcpListener, TcpStream};
//!
//! let src = tempfile::tempdir().unwrap();
//! std::fs::write(src.path().join("data"), vec![7u8; 300_000]).unwrap();
//! let dst = tempfile::tempdir().unwrap();
//! let dest = dst.path().join("vol");
//!
//! let listener = TcpListener::bind("127.0.0.1:0").unwrap();
//! let addr = listener.local_addr().unwrap();
//! let d = dest.clone();
//! let agent = std::thread::spawn(move || {
//!     let (mut s, _) = listener.accept().unwrap();
//!     serve_one(&mut s, |h: &Hello| (h.token == "secret").then(|| d.clone())).unwrap()
//! });
//!
//! let mut sender = Sender::new(src.path(), None);
//! let hello = Hello { session: "mig-1".into(), token: "secret".into(), target: "vol".into() };
//! let mut conn = TcpStream::connect(addr).unwrap();
//! let report = sender.round(&mut conn, &hello, &SendOptions::default()).unwrap();
//! assert!(report.verified);
//! assert_eq!(report.chunks_sent, 2);
//! assert!(agent.join().unwrap().verified);
//! assert_eq!(verify_dir(&dest).unwrap().root(), report.root);
//! ```

mod error;
mod faults;
mod manifest;
mod recv;
mod send;
pub mod wire;

pub use error::{ChunkRef, Result, VolumeError};
pub use faults::{Faults, FAULT_ENV};
pub use manifest::{
    chunk_count, chunk_len, scan, scan_with_stats, validate_rel, verify_dir, ChunkHash, Entry,
    Kind, Manifest, Meta, ScanStats, Stat, Xattr, CHUNK_SIZE, MAX_ENTRIES, MAX_PATH, MAX_XATTRS,
    MAX_XATTR_NAME, MAX_XATTR_VALUE, RACY_MARGIN_NS, XATTR_PREFIXES,
};
pub use recv::{
    held_chunks, serve_one, serve_one_with, state_path, ReceiveOptions, ReceiveReport,
    CHECKPOINT_BYTES,
};
pub use send::{Phase, Progress, ProgressFn, RoundReport, SendOptions, Sender, MAX_RETRY_PASSES};
pub use wire::{Hello, Need, Verdict};

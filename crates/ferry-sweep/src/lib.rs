//! `ferry-sweep`: finds literal fleet addresses (`fdaa::/16`) in config files, says whose they are
//! (the current or an old address of a machine, or unknown) and rewrites the known ones to the
//! machine's stable DNS name `<id>.vm.<app>.internal` (docs/design.md#sweep; seed 000, phase 3: after a
//! migration changes a machine's address, the bridge keeps old literals working until this
//! sweep has replaced them).
//!
//! ```
//! use ferry_sweep::{Matcher, Context};
//! let hits = Matcher::new().find_all(b"DATABASE_URL=postgres://u@[fdaa:0:18:8000:7d:f066:b83b:2]:5432/db");
//! assert_eq!(hits.len(), 1);
//! assert_eq!(hits[0].ip.to_string(), "fdaa:0:18:8000:7d:f066:b83b:2");
//! assert_eq!(hits[0].context, Context::Bracketed { port: Some(5432) });
//! ```
//!
//! The pieces: [`matcher`] (find), [`owners`] (name), [`walk`] (visit files, skip the unsafe
//! ones), [`rewrite`] (replace, diff, atomic write with backup), [`report`] (JSON and human
//! output, exit status).

mod error;
pub mod matcher;
pub mod owners;
pub mod report;
pub mod rewrite;
pub mod walk;

pub use error::SweepError;
pub use matcher::{Context, Literal, Matcher};
pub use owners::{MachineIndex, MachineRecord, NoOwners, Owner, OwnerIndex};
pub use report::{Change, Hit, Report, Skipped, Summary};
pub use rewrite::Backup;
pub use walk::{sweep, Options, RewriteOptions, DEFAULT_MAX_FILE_SIZE};

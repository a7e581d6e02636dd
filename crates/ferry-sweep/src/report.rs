//! The result of a sweep: hits, skipped files, changes and a summary, as one JSON document for
//! tools and as lines for people. The exit status CI gates on is derived here too.

use crate::owners::Owner;
use ferry_addr::Form;
use serde::{Serialize, Serializer};
use std::fmt::Write as _;
use std::net::Ipv6Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

fn form_name(form: Form) -> &'static str {
    match form {
        Form::Guest => "guest",
        Form::Infra => "infra",
        Form::Service => "service",
        Form::Invalid => "invalid",
    }
}

fn ser_form<S: Serializer>(form: &Form, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(form_name(*form))
}

fn ser_path<S: Serializer>(p: &std::path::Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

/// One literal fleet address in one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hit {
    #[serde(serialize_with = "ser_path")]
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in bytes.
    pub column: usize,
    /// The address exactly as written.
    pub text: String,
    /// The address in canonical (RFC 5952) form.
    pub address: Ipv6Addr,
    #[serde(serialize_with = "ser_form")]
    pub form: Form,
    pub owner: Owner,
    /// The name that replaced it (or would, with `--dry-run`), if it was rewritten.
    pub rewritten_to: Option<String>,
}

/// A file that was not scanned, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    #[serde(serialize_with = "ser_path")]
    pub path: PathBuf,
    pub reason: String,
}

/// One file's rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    #[serde(serialize_with = "ser_path")]
    pub path: PathBuf,
    /// Where the original went; `None` with `--dry-run`.
    pub backup: Option<String>,
    /// True when the file was written (false with `--dry-run`).
    pub applied: bool,
    /// Unified diff, original to new.
    pub diff: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub files_scanned: u64,
    pub bytes_scanned: u64,
    pub hits: usize,
    pub current: usize,
    pub old: usize,
    pub unknown: usize,
    /// Literals replaced on disk.
    pub rewritten: usize,
    /// Literals still in the files after this run: what the exit status reports.
    pub remaining: usize,
    pub skipped: usize,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub hits: Vec<Hit>,
    pub skipped: Vec<Skipped>,
    pub changes: Vec<Change>,
    pub summary: Summary,
}

impl Report {
    /// Sorts everything by path and position (the walk is parallel, so arrival order is not
    /// stable) and fills in the summary counts.
    pub(crate) fn finish(&mut self, files_scanned: u64, bytes_scanned: u64, dry_run: bool) {
        // By the path's bytes, not `Path`'s component-wise order: the same grouping, and
        // component comparison showed up in profiles of large sweeps.
        let key = |p: &PathBuf| p.as_os_str().as_bytes().to_vec();
        self.hits.sort_unstable_by(|a, b| {
            (a.path.as_os_str().as_bytes(), a.line, a.column).cmp(&(
                b.path.as_os_str().as_bytes(),
                b.line,
                b.column,
            ))
        });
        self.skipped.sort_by_cached_key(|s| key(&s.path));
        self.changes.sort_by_cached_key(|c| key(&c.path));
        let count = |f: fn(&Owner) -> bool| self.hits.iter().filter(|h| f(&h.owner)).count();
        let rewritten = if dry_run {
            0
        } else {
            self.hits
                .iter()
                .filter(|h| h.rewritten_to.is_some())
                .count()
        };
        self.summary = Summary {
            files_scanned,
            bytes_scanned,
            hits: self.hits.len(),
            current: count(|o| matches!(o, Owner::Current { .. })),
            old: count(|o| matches!(o, Owner::Old { .. })),
            unknown: count(|o| matches!(o, Owner::Unknown)),
            rewritten,
            remaining: self.hits.len() - rewritten,
            skipped: self.skipped.len(),
            dry_run,
        };
    }

    /// 0 when no literal remains, 1 when some do. (2, for errors, is the caller's.)
    pub fn exit_code(&self) -> u8 {
        u8::from(self.summary.remaining > 0)
    }

    /// The JSON document `--json` prints.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report is plain data")
    }

    /// Human output for stdout: the diffs, then one line per hit.
    pub fn human_stdout(&self) -> String {
        let mut out = String::new();
        for c in &self.changes {
            out.push_str(&c.diff);
        }
        for h in &self.hits {
            let _ = write!(
                out,
                "{}:{}:{}: {}  -> ",
                h.path.display(),
                h.line,
                h.column,
                h.text
            );
            match &h.owner {
                Owner::Unknown => {
                    let _ = write!(
                        out,
                        "unknown owner ({} form, {})",
                        form_name(h.form),
                        h.address
                    );
                }
                owner => out.push_str(&owner.describe()),
            }
            if let Some(name) = &h.rewritten_to {
                let verb = if self.summary.dry_run {
                    "would rewrite to"
                } else {
                    "rewritten to"
                };
                let _ = write!(out, "; {verb} {name}");
            }
            out.push('\n');
        }
        out
    }

    /// Human output for stderr: skip notes and the summary line.
    pub fn human_stderr(&self) -> String {
        let mut out = String::new();
        for s in &self.skipped {
            let _ = writeln!(out, "note: skipped {}: {}", s.path.display(), s.reason);
        }
        let s = &self.summary;
        let _ = write!(
            out,
            "{} literal fleet address{} in {} file{} scanned ({} current, {} old, {} unknown owner)",
            s.hits,
            if s.hits == 1 { "" } else { "es" },
            s.files_scanned,
            if s.files_scanned == 1 { "" } else { "s" },
            s.current,
            s.old,
            s.unknown,
        );
        if s.dry_run {
            let would = self
                .hits
                .iter()
                .filter(|h| h.rewritten_to.is_some())
                .count();
            let _ = write!(out, "; dry run: would rewrite {would}");
        } else if s.rewritten > 0 {
            let _ = write!(out, "; rewrote {}", s.rewritten);
        }
        let _ = writeln!(
            out,
            "; {} remain{}; {} skipped",
            s.remaining,
            if s.remaining == 1 { "s" } else { "" },
            s.skipped
        );
        out
    }
}

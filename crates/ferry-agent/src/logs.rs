//! Machine output logs on this host: where each instance's log lives, how long logs of machines
//! that left the host are kept, and reading them for the server.
//!
//! The shim writes the log ([`ferry_runtime::logs`]); the agent only names the file, prunes and
//! reads. Logs live outside the run directory (`<state dir>/logs/<machine>/<instance>.log`), so
//! they outlive the instance: after a migration the old host still answers for the lines its
//! instance wrote, until pruning needs the space.

use crate::AgentError;
use ferry_core::proto::{LogQuery, LogRecord};
use ferry_runtime::logs::{self, Cursor, LogSpec};
use std::path::{Path, PathBuf};

/// How much output the agent keeps.
#[derive(Debug, Clone, Copy)]
pub struct LogPolicy {
    /// Size of one log file before it rotates.
    pub max_bytes: u64,
    /// Rotated files kept per instance besides the current one.
    pub keep: u32,
    /// Logs of machines no longer on this host are deleted, oldest first, above this total.
    pub departed_bytes: u64,
}

impl Default for LogPolicy {
    fn default() -> Self {
        LogPolicy {
            max_bytes: 2 << 20,
            keep: 1,
            departed_bytes: 256 << 20,
        }
    }
}

/// Instances of one machine whose logs are kept (a machine restarted with `update` many times
/// keeps only its latest ones).
pub const INSTANCES_KEPT: usize = 4;

/// Machine IDs and instance IDs become path components: only plain names are accepted.
fn plain(what: &str, s: &str) -> Result<(), AgentError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(())
        .ok_or_else(|| AgentError::Invalid(format!("{what} {s:?}: not a plain name")))
}

pub(crate) struct Logs {
    dir: PathBuf,
    policy: LogPolicy,
}

impl Logs {
    pub(crate) fn new(state_dir: &Path, policy: LogPolicy) -> Logs {
        Logs {
            dir: state_dir.join("logs"),
            policy,
        }
    }

    /// The log of one instance, for its init spec. Also drops the machine's oldest instance
    /// logs beyond [`INSTANCES_KEPT`].
    pub(crate) fn spec(&self, machine: &str, instance: &str) -> Result<LogSpec, AgentError> {
        plain("machine id", machine)?;
        plain("instance id", instance)?;
        let dir = self.dir.join(machine);
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::io("creating the log dir", e))?;
        self.keep_latest_instances(&dir, instance);
        Ok(LogSpec {
            path: dir.join(format!("{instance}.log")),
            max_bytes: self.policy.max_bytes,
            keep: self.policy.keep,
        })
    }

    fn keep_latest_instances(&self, dir: &Path, current: &str) {
        let mut instances: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let inst = name.strip_suffix(".log")?.to_owned();
                Some((e.metadata().ok()?.modified().ok()?, inst))
            })
            .filter(|(_, i)| i != current)
            .collect();
        instances.sort();
        let excess = (instances.len() + 1).saturating_sub(INSTANCES_KEPT);
        for (_, inst) in instances.into_iter().take(excess) {
            self.remove_instance(dir, &inst);
        }
    }

    fn remove_instance(&self, dir: &Path, instance: &str) {
        let path = dir.join(format!("{instance}.log"));
        for i in 1..=self.policy.keep.max(16) {
            let _ = std::fs::remove_file(logs::rotated(&path, i));
        }
        let _ = std::fs::remove_file(path);
    }

    /// Deletes the logs of machines not on this host (`present`), oldest first, until they
    /// take at most `departed_bytes`.
    pub(crate) fn prune_departed(&self, present: &dyn Fn(&str) -> bool) {
        let mut departed: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if present(&name) {
                continue;
            }
            let (mut newest, mut bytes) = (std::time::SystemTime::UNIX_EPOCH, 0);
            for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                if let Ok(m) = f.metadata() {
                    bytes += m.len();
                    newest = newest.max(m.modified().unwrap_or(newest));
                }
            }
            departed.push((newest, bytes, e.path()));
        }
        departed.sort();
        let mut total: u64 = departed.iter().map(|d| d.1).sum();
        for (_, bytes, path) in departed {
            if total <= self.policy.departed_bytes {
                break;
            }
            let _ = std::fs::remove_dir_all(&path);
            total -= bytes;
        }
    }

    /// The lines after the query's cursor (the last `tail` of them) of one instance's log, or
    /// of every instance log this host has of the machine, in time order.
    pub(crate) fn read(&self, machine: &str, q: &LogQuery) -> Result<Vec<LogRecord>, AgentError> {
        plain("machine id", machine)?;
        let dir = self.dir.join(machine);
        let instances = match &q.instance_id {
            Some(i) => {
                plain("instance id", i)?;
                vec![i.clone()]
            }
            None => std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().into_string().ok()?;
                    n.strip_suffix(".log").map(str::to_owned)
                })
                .collect(),
        };
        let from = Cursor {
            ts_us: q.after_us,
            seen: q.after_seen,
        };
        let mut out = Vec::new();
        for inst in instances {
            let path = dir.join(format!("{inst}.log"));
            out.extend(
                logs::read_log(&path, self.policy.keep, from)
                    .into_iter()
                    .map(|l| LogRecord {
                        instance_id: inst.clone(),
                        ts_us: l.ts_us,
                        stream: l.stream.as_str().to_owned(),
                        message: l.message,
                    }),
            );
        }
        // Stable: one instance's lines keep their order when stamps tie.
        out.sort_by_key(|l| l.ts_us);
        if let Some(t) = q.tail {
            let drop = out.len().saturating_sub(t as usize);
            out.drain(..drop);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_are_not_plain_names_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let l = Logs::new(d.path(), LogPolicy::default());
        for bad in ["", "..", "a/b", "../../etc", "x y"] {
            assert!(l.spec("m1", bad).is_err(), "{bad:?}");
            assert!(l.spec(bad, "i1").is_err(), "{bad:?}");
        }
        assert!(!d.path().join("logs").join("..").join("etc").exists());
    }

    #[test]
    fn a_machine_keeps_its_latest_instances_and_departed_logs_are_capped() {
        let d = tempfile::tempdir().unwrap();
        let policy = LogPolicy {
            departed_bytes: 10,
            ..Default::default()
        };
        let l = Logs::new(d.path(), policy);
        for i in 0..6 {
            let s = l.spec("m1", &format!("i{i}")).unwrap();
            std::fs::write(&s.path, "1 o hello\n").unwrap();
        }
        let kept = std::fs::read_dir(d.path().join("logs/m1")).unwrap().count();
        assert_eq!(kept, INSTANCES_KEPT);
        assert!(d.path().join("logs/m1/i5.log").exists());
        let s = l.spec("m2", "j").unwrap();
        std::fs::write(&s.path, "1 o hello\n").unwrap();
        // m1 left the host (10 bytes per file, 4 files): over the cap, so it goes; m2 stays.
        l.prune_departed(&|m| m == "m2");
        assert!(!d.path().join("logs/m1").exists());
        assert!(d.path().join("logs/m2/j.log").exists());
        let q = LogQuery {
            instance_id: Some("j".into()),
            ..Default::default()
        };
        assert_eq!(l.read("m2", &q).unwrap()[0].message, "hello");
        let bad = LogQuery {
            instance_id: Some("../m1/i5".into()),
            ..Default::default()
        };
        assert!(l.read("m2", &bad).is_err());
    }
}

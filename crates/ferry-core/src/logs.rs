//! A machine's output, gathered from the hosts that ran its instances.
//!
//! Each host's agent keeps the logs of the instances it ran (bounded, rotated, and kept a while
//! after the machine left: see the agent's `logs` module). A read asks the machine's current host
//! and every host a past instance ran on (the migration records name them), so lines written
//! before a migration stay readable as long as the old host keeps them. A host that does not
//! answer is reported in `unavailable`, not fatal: the other lines are still worth having.

use crate::hosts::parse_host;
use crate::machines::machine_of;
use crate::proto::{LogQuery, LogRecord};
use crate::{Core, Error, Result};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The most lines one read returns (`tail` is capped to it).
pub const MAX_LINES: u32 = 10_000;

/// One line of a machine's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    /// RFC 3339, microseconds, UTC.
    pub timestamp: String,
    /// Microseconds since the Unix epoch (the same instant as `timestamp`).
    pub ts_us: i64,
    pub instance_id: String,
    /// The host (hex ID) the instance ran on.
    pub host: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub message: String,
}

/// A host whose part of the log could not be read.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogGap {
    pub host: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogsView {
    pub machine_id: String,
    /// Oldest first.
    pub lines: Vec<LogLine>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<LogGap>,
}

/// What to read: lines after `since_us` (microseconds since the epoch), at most the last `tail`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogRequest {
    pub since_us: Option<i64>,
    pub tail: Option<u32>,
}

fn line(host: &str, r: LogRecord) -> LogLine {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(r.ts_us.max(0) as u64);
    LogLine {
        timestamp: humantime::format_rfc3339_micros(t).to_string(),
        ts_us: r.ts_us,
        instance_id: r.instance_id,
        host: host.to_owned(),
        stream: r.stream,
        message: r.message,
    }
}

/// The machine's output from every host that ran it, oldest first.
pub async fn read(core: &Core, app: &str, id: &str, req: LogRequest) -> Result<LogsView> {
    let m = machine_of(core, app, id)?;
    let tail = req.tail.unwrap_or(MAX_LINES).min(MAX_LINES);
    let mut hosts: Vec<String> = crate::migrate::instances(core, id)
        .into_iter()
        .map(|r| r.host)
        .collect();
    if let Some(h) = m.host {
        hosts.push(crate::hosts::host_hex(h));
    }
    let mut seen = std::collections::BTreeSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    let q = LogQuery {
        instance_id: None,
        after_us: req.since_us.unwrap_or(i64::MIN),
        after_seen: 0,
        tail: Some(tail),
    };
    let mut lines = Vec::new();
    let mut unavailable = Vec::new();
    for host in hosts {
        let got = match parse_host(&host).and_then(|h| crate::cache::host(core, h)) {
            Ok(h) => core.agents.logs(&h.endpoint, id, &q).await,
            Err(e) => Err(e),
        };
        match got {
            Ok(rs) => lines.extend(rs.into_iter().map(|r| line(&host, r))),
            Err(e) => unavailable.push(LogGap {
                host,
                error: e.message,
            }),
        }
    }
    lines.sort_by_key(|l| l.ts_us);
    let drop = lines.len().saturating_sub(tail as usize);
    lines.drain(..drop);
    Ok(LogsView {
        machine_id: id.to_owned(),
        lines,
        unavailable,
    })
}

/// Where a follower is: the instance it reads, on which host, and how far.
#[derive(Debug, Clone)]
pub struct Follow {
    instance_id: String,
    /// Hex ID; its endpoint is looked up at every step (a restarted agent listens anew).
    host: String,
    after_us: i64,
    after_seen: u32,
}

/// What one step of following gave.
#[derive(Debug)]
pub struct Step {
    pub lines: Vec<LogLine>,
    /// The machine is gone (destroyed) and its last lines were returned: stop following.
    pub done: bool,
}

impl Follow {
    /// Starts following the machine's current instance after `after` (the last line a reader
    /// already has, if any).
    pub fn start(core: &Core, app: &str, id: &str, after: Option<&LogLine>) -> Result<Follow> {
        let m = machine_of(core, app, id)?;
        let host = m
            .host
            .map(crate::hosts::host_hex)
            .ok_or_else(|| Error::conflict("not_placed", format!("machine {id} has no host")))?;
        let mut f = Follow {
            instance_id: m.instance_id.clone(),
            host,
            after_us: i64::MIN,
            after_seen: 0,
        };
        if let Some(l) = after.filter(|l| l.instance_id == m.instance_id) {
            f.after_us = l.ts_us;
            f.after_seen = 1;
        }
        Ok(f)
    }

    /// The lines written since the last step. When the machine has a new instance (it migrated
    /// or was updated), the old instance's last lines come first and the follower moves on to
    /// the new one.
    pub async fn step(&mut self, core: &Core, app: &str, id: &str) -> Result<Step> {
        // The machine first: lines read after it are then complete for an instance it shows
        // replaced.
        let m = machine_of(core, app, id)?;
        let q = LogQuery {
            instance_id: Some(self.instance_id.clone()),
            after_us: self.after_us,
            after_seen: self.after_seen,
            tail: Some(MAX_LINES),
        };
        let endpoint = crate::cache::host(core, parse_host(&self.host)?)?.endpoint;
        let recs = core.agents.logs(&endpoint, id, &q).await?;
        for r in &recs {
            if r.ts_us == self.after_us {
                self.after_seen += 1;
            } else {
                self.after_us = r.ts_us;
                self.after_seen = 1;
            }
        }
        let lines: Vec<LogLine> = recs.into_iter().map(|r| line(&self.host, r)).collect();
        if m.state.is_terminal() && m.instance_id == self.instance_id {
            return Ok(Step { lines, done: true });
        }
        if m.instance_id != self.instance_id {
            if let Some(h) = m.host {
                *self = Follow {
                    instance_id: m.instance_id.clone(),
                    host: crate::hosts::host_hex(h),
                    after_us: i64::MIN,
                    after_seen: 0,
                };
            }
        }
        Ok(Step { lines, done: false })
    }
}

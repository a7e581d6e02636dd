//! Owners: says whose address a literal is (the current or an old address of a machine, or
//! unknown), from a machine list.
//!
//! Today the list comes from a JSON file (`--owners FILE`) shaped like what the machines API
//! (`GET /v1/apps/{app}/machines`, issue 3) will return:
//!
//! ```json
//! {"machines":[{"id":"d8dd625fed5568","app":"pg","private_ip":"fdaa:0:18:8000:7d:f066:b83b:2",
//!               "old_ips":["fdaa:0:18:8000:12:f066:b83b:2"]}]}
//! ```
//!
//! `--fleet` (reading every machine's config and env, and the machine list, through that API)
//! comes with the machines issue; until then [`fleet_index`] returns a clear error.
//!
//! A machine owns its whole /112 (docs/design.md#address-plan), so any address in the /112 of a machine's current
//! address is that machine's current address space, and any address in the /112 of one of its
//! old addresses is an old address of it. Machine fields are never reused, so two machines can
//! never claim one /112; a list that says otherwise is rejected rather than guessed at.

use crate::SweepError;
use ferry_addr::{FleetAddr, Prefix};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::path::Path;

/// Whose address a literal is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Owner {
    /// In the /112 of the machine's current address.
    Current { machine_id: String, app: String },
    /// In the /112 of an address the machine had before a migration.
    Old { machine_id: String, app: String },
    /// No machine we know of.
    Unknown,
}

impl Owner {
    /// The stable DNS name that replaces the literal: `<id>.vm.<app>.internal`.
    pub fn dns_name(&self) -> Option<String> {
        match self {
            Owner::Current { machine_id, app } | Owner::Old { machine_id, app } => {
                Some(format!("{machine_id}.vm.{app}.internal"))
            }
            Owner::Unknown => None,
        }
    }

    /// One phrase for human output.
    pub fn describe(&self) -> String {
        match self {
            Owner::Current { machine_id, app } => {
                format!("current address of machine {machine_id} (app {app})")
            }
            Owner::Old { machine_id, app } => {
                format!("old address of machine {machine_id} (app {app})")
            }
            Owner::Unknown => "unknown owner".to_owned(),
        }
    }
}

/// Answers "whose address is this?". Shared by the scanning threads, hence `Sync`.
pub trait OwnerIndex: Send + Sync {
    fn owner(&self, ip: Ipv6Addr) -> Owner;
}

/// An index that knows no machine: every literal is [`Owner::Unknown`].
#[derive(Debug, Default, Clone, Copy)]
pub struct NoOwners;

impl OwnerIndex for NoOwners {
    fn owner(&self, _ip: Ipv6Addr) -> Owner {
        Owner::Unknown
    }
}

/// One machine as the owners file (and later the machines API) describes it. Unknown fields are
/// ignored, so a full API machine object can be fed in as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub id: String,
    pub app: String,
    pub private_ip: String,
    #[serde(default)]
    pub old_ips: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct OwnersFile {
    machines: Vec<MachineRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Current,
    Old,
}

/// An [`OwnerIndex`] over a list of machines, keyed by /112.
#[derive(Debug, Clone, Default)]
pub struct MachineIndex {
    machines: Vec<(String, String)>,
    by_prefix: HashMap<Ipv6Addr, (usize, Kind)>,
}

fn prefix112(ip: Ipv6Addr) -> Ipv6Addr {
    Prefix::new(ip, 112).addr()
}

/// A machine ID as docs/design.md#machines-and-ids defines it: 14 lowercase hex characters. Checked because it goes into
/// a DNS name that we write into other people's files.
fn valid_machine_id(id: &str) -> bool {
    id.len() == 14
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An app name usable as one DNS label: lowercase letters, digits and inner hyphens, 1-63 bytes.
fn valid_app(app: &str) -> bool {
    (1..=63).contains(&app.len())
        && app
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !app.starts_with('-')
        && !app.ends_with('-')
}

impl MachineIndex {
    /// Builds the index, rejecting bad IDs, app names, addresses, and any /112 claimed twice.
    pub fn from_machines(records: Vec<MachineRecord>) -> Result<Self, SweepError> {
        let bad = |reason: String| SweepError::Owners { reason };
        let mut index = MachineIndex::default();
        let mut ids = HashMap::new();
        for rec in records {
            if !valid_machine_id(&rec.id) {
                return Err(bad(format!(
                    "machine id {:?} is not 14 lowercase hex characters",
                    rec.id
                )));
            }
            if !valid_app(&rec.app) {
                return Err(bad(format!(
                    "machine {}: app name {:?} is not a DNS label",
                    rec.id, rec.app
                )));
            }
            if ids.insert(rec.id.clone(), ()).is_some() {
                return Err(bad(format!("machine {} is listed twice", rec.id)));
            }
            let slot = index.machines.len();
            let addrs = std::iter::once((&rec.private_ip, Kind::Current))
                .chain(rec.old_ips.iter().map(|a| (a, Kind::Old)));
            for (text, kind) in addrs {
                let addr: FleetAddr = text
                    .parse()
                    .map_err(|e| bad(format!("machine {}: address {text:?}: {e}", rec.id)))?;
                let key = prefix112(addr.ip());
                match index.by_prefix.get(&key) {
                    // The same machine twice in one /112 (an old address equal to the current
                    // one, say): the current claim wins.
                    Some(&(other, other_kind)) if other == slot => {
                        if kind == Kind::Current || other_kind == Kind::Current {
                            index.by_prefix.insert(key, (slot, Kind::Current));
                        }
                    }
                    Some(&(other, _)) => {
                        return Err(bad(format!(
                            "{key}/112 is claimed by both machine {} and machine {}",
                            index.machines[other].0, rec.id
                        )));
                    }
                    None => {
                        index.by_prefix.insert(key, (slot, kind));
                    }
                }
            }
            index.machines.push((rec.id, rec.app));
        }
        Ok(index)
    }

    /// Parses the owners JSON document (`{"machines": [...]}`).
    pub fn from_json(json: &[u8]) -> Result<Self, SweepError> {
        let file: OwnersFile = serde_json::from_slice(json).map_err(|e| SweepError::Owners {
            reason: format!("not a machine list: {e}"),
        })?;
        Self::from_machines(file.machines)
    }

    /// Reads and parses an owners file.
    pub fn load(path: &Path) -> Result<Self, SweepError> {
        let bytes = std::fs::read(path).map_err(|source| SweepError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&bytes).map_err(|e| match e {
            SweepError::Owners { reason } => SweepError::OwnersFile {
                path: path.to_owned(),
                reason,
            },
            other => other,
        })
    }

    /// How many machines the index knows.
    pub fn len(&self) -> usize {
        self.machines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.machines.is_empty()
    }
}

impl OwnerIndex for MachineIndex {
    fn owner(&self, ip: Ipv6Addr) -> Owner {
        match self.by_prefix.get(&prefix112(ip)) {
            Some(&(slot, kind)) => {
                let (machine_id, app) = self.machines[slot].clone();
                match kind {
                    Kind::Current => Owner::Current { machine_id, app },
                    Kind::Old => Owner::Old { machine_id, app },
                }
            }
            None => Owner::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, ip: &str, old: &[&str]) -> MachineRecord {
        MachineRecord {
            id: id.into(),
            app: "pg".into(),
            private_ip: ip.into(),
            old_ips: old.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn current_old_and_prefix_matches() {
        let idx = MachineIndex::from_machines(vec![rec(
            "d8dd625fed5568",
            "fdaa:0:18:8000:7d:f066:b83b:2",
            &["fdaa:0:18:8000:12:f066:b83b:2"],
        )])
        .unwrap();
        let cur = Owner::Current {
            machine_id: "d8dd625fed5568".into(),
            app: "pg".into(),
        };
        let old = Owner::Old {
            machine_id: "d8dd625fed5568".into(),
            app: "pg".into(),
        };
        assert_eq!(
            idx.owner("fdaa:0:18:8000:7d:f066:b83b:2".parse().unwrap()),
            cur
        );
        assert_eq!(
            idx.owner("fdaa:0:18:8000:7d:f066:b83b:99".parse().unwrap()),
            cur
        );
        assert_eq!(
            idx.owner("fdaa:0:18:8000:12:f066:b83b:2".parse().unwrap()),
            old
        );
        assert_eq!(
            idx.owner("fdaa:0:18:8000:12:f066:b83c:2".parse().unwrap()),
            Owner::Unknown
        );
        assert_eq!(cur.dns_name().unwrap(), "d8dd625fed5568.vm.pg.internal");
    }

    #[test]
    fn rejects_bad_lists() {
        let two = MachineIndex::from_machines(vec![
            rec("d8dd625fed5568", "fdaa:0:18:8000:7d:f066:b83b:2", &[]),
            rec("aaaaaaaaaaaaaa", "fdaa:0:18:8000:7d:f066:b83b:3", &[]),
        ]);
        assert!(matches!(two, Err(SweepError::Owners { .. })));
        assert!(MachineIndex::from_machines(vec![rec(
            "D8DD625FED5568",
            "fdaa:0:18:8000:7d:f066:b83b:2",
            &[]
        )])
        .is_err());
        assert!(MachineIndex::from_machines(vec![rec("d8dd625fed5568", "fd00::2", &[])]).is_err());
        assert!(MachineIndex::from_json(b"{\"machines\": 3}").is_err());
    }
}

//! What a drain or a migration would do, without doing it: the plan (each machine, where it
//! would go, in which order, the policy gates it would wait on, the volume bytes it would copy)
//! and its **impact**: for each machine that would move, the machines known to hold its
//! address literally (in their config or env, found with `ferry-sweep`'s matcher, or dialling
//! an old address of it through the bridge), so an operator fixes them before they break.
//! Nothing is written, no agent is asked to do anything.

use super::{load_policy, MigratePolicy};
use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::hosts::{host_hex, parse_host};
use crate::Core;
use ferry_addr::HostId;
use ferry_store::{Machine, MachineState as S};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The plan of a drain (or of one migration), and who it would break.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MovePlan {
    /// The host drained (for one migration: the machine's host).
    pub host: String,
    /// The machines that would move. Networks move in parallel; within a network one at a
    /// time, each after the previous one was healthy for its app's `min_healthy_time`.
    pub moves: Vec<PlannedMove>,
    /// Machines that would not move, with the reason.
    pub skipped: Vec<SkippedMove>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlannedMove {
    pub machine_id: String,
    pub app: String,
    pub org: String,
    pub network_id: u32,
    /// Its current address: what stops working for anyone holding it literally.
    pub address: String,
    pub state: String,
    pub from_host: String,
    /// Where placement would send it now (hosts' loads counting the moves before it).
    pub to_host: String,
    /// Its place among the moves of its network (1 = first).
    pub position_in_network: usize,
    /// What the move waits on, in order: notice, `max_unavailable`, checks, `min_healthy_time`.
    pub gates: Vec<String>,
    /// Volume bytes the fork copies at most (the volumes' sizes; only what changed after the
    /// first round is copied while the machine is stopped).
    pub volume_bytes: u64,
    /// Machines known to hold this machine's address.
    pub impact: Vec<Impact>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SkippedMove {
    pub machine_id: String,
    pub reason: String,
}

/// One machine that holds a moving machine's address.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Impact {
    pub machine_id: String,
    pub app: String,
    /// `config` (the literal is in its config: env, command, metadata, checks) or `bridge`
    /// (it dials an old address that the bridge maps to the moving machine).
    pub via: String,
    /// The literal as written, or the old address dialled, and where.
    pub detail: String,
}

fn movable(m: &Machine) -> std::result::Result<(), String> {
    super::movable(m).map_err(|e| e.message)
}

fn gates(m: &Machine, p: &MigratePolicy) -> Vec<String> {
    let mut g = Vec::new();
    let ms = |v: u64| humantime::format_duration(std::time::Duration::from_millis(v)).to_string();
    if p.notice_period_ms > 0 || p.webhook_url.is_some() {
        let hook = p
            .webhook_url
            .as_deref()
            .map(|u| format!(", webhook {u}"))
            .unwrap_or_default();
        g.push(format!("notice {}{hook}", ms(p.notice_period_ms)));
    }
    g.push(format!(
        "max_unavailable {} (of app {})",
        p.max_unavailable, m.app
    ));
    let config: Option<MachineConfig> = serde_json::from_value(m.config.clone()).ok();
    if let Some(c) = &config {
        if let Some(i) = &c.image {
            g.push(format!("image {i} pulled on the destination first"));
        }
        if !c.checks.is_empty() {
            let names: Vec<&str> = c.checks.keys().map(String::as_str).collect();
            g.push(format!("checks passing: {}", names.join(", ")));
        }
    }
    if m.state == S::Started {
        g.push(format!(
            "healthy for {} (within {})",
            ms(p.min_healthy_time_ms),
            ms(p.healthy_deadline_ms)
        ));
    }
    g
}

/// Plans moving `machines` off `from` (none of them moved yet).
async fn plan(
    core: &Core,
    from: HostId,
    machines: Vec<Machine>,
    to: Option<HostId>,
) -> Result<MovePlan> {
    let hosts = core.store.list_hosts()?;
    let mut loads = core.store.machines_per_host()?;
    let mut out = MovePlan {
        host: host_hex(from),
        moves: Vec::new(),
        skipped: Vec::new(),
    };
    // Who holds what: every machine's config scanned once; owners are the moving machines'
    // current addresses and, as old ones, what the bridge maps to them.
    let mappings = crate::bridge::mappings(core)?;
    let moving: Vec<&Machine> = machines.iter().filter(|m| movable(m).is_ok()).collect();
    let records: Vec<ferry_sweep::MachineRecord> = moving
        .iter()
        .filter_map(|m| {
            let ip = m.private_ip.clone()?;
            let old_ips = mappings
                .iter()
                .filter(|b| b.new == ip && !b.retired)
                .map(|b| b.old.clone())
                .collect();
            Some(ferry_sweep::MachineRecord {
                id: m.id.clone(),
                app: m.app.clone(),
                private_ip: ip,
                old_ips,
            })
        })
        .collect();
    let index = ferry_sweep::MachineIndex::from_machines(records)
        .map_err(|e| Error::internal(format!("indexing the moving machines: {e}")))?;
    let matcher = ferry_sweep::Matcher::new();
    let mut impact: BTreeMap<String, Vec<Impact>> = BTreeMap::new();
    for other in core.store.list_machines(None)? {
        let text = other.config.to_string();
        for lit in matcher.find_all(text.as_bytes()) {
            use ferry_sweep::OwnerIndex;
            let owner = match index.owner(lit.ip) {
                ferry_sweep::Owner::Current { machine_id, .. }
                | ferry_sweep::Owner::Old { machine_id, .. } => machine_id,
                ferry_sweep::Owner::Unknown => continue,
            };
            // Its own address moves with it; another network's machine cannot reach it anyway
            // (and one org never learns of another's machines).
            let same_network = moving
                .iter()
                .any(|m| m.id == owner && m.network_id == other.network_id);
            if owner == other.id || !same_network {
                continue;
            }
            impact.entry(owner).or_default().push(Impact {
                machine_id: other.id.clone(),
                app: other.app.clone(),
                via: "config".into(),
                detail: format!("{} in its config", &text[lit.span.clone()]),
            });
        }
    }
    for hit in crate::bridge::all_hits(core).await? {
        let Some(map) = mappings
            .iter()
            .find(|b| b.network_id == hit.network_id && b.old == hit.old && !b.retired)
        else {
            continue;
        };
        if let Some(m) = moving
            .iter()
            .find(|m| m.private_ip.as_deref() == Some(&map.new))
        {
            let app = core
                .store
                .get_machine(&hit.machine_id)
                .map(|c| c.app)
                .unwrap_or_default();
            impact.entry(m.id.clone()).or_default().push(Impact {
                machine_id: hit.machine_id.clone(),
                app,
                via: "bridge".into(),
                detail: format!("dials {} ({} times) through the bridge", hit.old, hit.count),
            });
        }
    }
    let mut per_network: BTreeMap<u32, usize> = BTreeMap::new();
    for m in machines {
        if let Err(reason) = movable(&m) {
            out.skipped.push(SkippedMove {
                machine_id: m.id.clone(),
                reason,
            });
            continue;
        }
        let dest = match to {
            Some(t) => Some(t),
            None => hosts
                .iter()
                .filter(|h| h.id != from && !h.cordoned && !h.endpoint.is_empty())
                .min_by_key(|h| (loads.get(&h.id).copied().unwrap_or(0), h.id))
                .map(|h| h.id),
        };
        let Some(dest) = dest else {
            out.skipped.push(SkippedMove {
                machine_id: m.id.clone(),
                reason: "no other uncordoned host to move it to".into(),
            });
            continue;
        };
        *loads.entry(dest).or_insert(0) += 1;
        let pos = per_network.entry(m.network_id.get()).or_insert(0);
        *pos += 1;
        let policy = load_policy(core, &m.app)?;
        let config: Option<MachineConfig> = serde_json::from_value(m.config.clone()).ok();
        let mut volume_bytes = 0u64;
        for mount in config.iter().flat_map(|c| c.mounts.iter()) {
            if let Ok(v) = crate::volumes::volume(core, &mount.volume) {
                volume_bytes += v.size_mb.unwrap_or(0) << 20;
            }
        }
        out.moves.push(PlannedMove {
            machine_id: m.id.clone(),
            app: m.app.clone(),
            org: m.org.clone(),
            network_id: m.network_id.get(),
            address: m.private_ip.clone().unwrap_or_default(),
            state: m.state.as_str().into(),
            from_host: host_hex(from),
            to_host: host_hex(dest),
            position_in_network: *pos,
            gates: gates(&m, &policy),
            volume_bytes,
            impact: impact.remove(&m.id).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// What `POST /v1/hosts/{id}/drain` would do now.
pub async fn drain_plan(core: &Core, host: &str) -> Result<MovePlan> {
    let id = parse_host(host)?;
    core.store.get_host(id)?;
    let machines = core.store.list_machines_on_host(id)?;
    plan(core, id, machines, None).await
}

/// What migrating one machine would do now (`to`: a destination, or placement's choice).
pub async fn migrate_plan(core: &Core, app: &str, id: &str, to: Option<&str>) -> Result<MovePlan> {
    let m = crate::machines::machine_of(core, app, id)?;
    let to = to.map(parse_host).transpose()?;
    let from = super::move_from(core, &m, to)?;
    plan(core, from, vec![m], to).await
}

//! The bridge's control plane (docs/design.md#bridge): mappings per network, the feature gate per org and app,
//! hits gathered from every host, retirement. The state lives in the store; every change is
//! pushed whole to every agent, which makes its host's BPF maps equal to it.

use crate::auth::{sees_network, Caller};
use crate::error::{Error, Result};
use crate::proto::{BridgeHit, BridgeMapping, BridgeSync};
use crate::Core;
use ferry_addr::FleetAddr;
use ferry_store::Machine;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use utoipa::ToSchema;

/// Orgs and apps whose machines do not get the bridge (it is on by default).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Gates {
    pub orgs_off: BTreeSet<String>,
    pub apps_off: BTreeSet<String>,
}

fn from_store(m: ferry_store::BridgeMapping) -> BridgeMapping {
    BridgeMapping {
        network_id: m.network_id,
        old: m.old,
        new: m.new,
        retired: m.retired,
        created_at: m.created_at_ms,
    }
}

fn to_store(m: &BridgeMapping) -> ferry_store::BridgeMapping {
    ferry_store::BridgeMapping {
        network_id: m.network_id,
        old: m.old.clone(),
        new: m.new.clone(),
        retired: m.retired,
        created_at_ms: m.created_at,
    }
}

/// Every mapping of every network.
pub fn mappings(core: &Core) -> Result<Vec<BridgeMapping>> {
    Ok(core
        .store
        .list_bridge_mappings(None)?
        .into_iter()
        .map(from_store)
        .collect())
}

/// [`mappings`] as fresh as the change feed and this server's own writes
/// ([`ferry_store::Store::followed_bridge_mappings`]): what the readers that run on every change
/// and the pushes after this server's own changes read.
fn followed_mappings(core: &Core) -> Result<Vec<BridgeMapping>> {
    Ok(core
        .store
        .followed_bridge_mappings()?
        .into_iter()
        .map(from_store)
        .collect())
}

/// How many times a change of one network's mappings is planned again when another change of
/// the same network landed first (other networks never conflict with it).
const NETWORK_RETRIES: usize = 50;

/// Changes one network's mappings: `plan` sees them as they are and answers what to put and
/// which old addresses to remove (or an error, or `None` for "nothing to do"); the change lands
/// only if the network did not change since it was read, else it is planned again. Mappings of
/// other networks are never read or written.
fn change_network<T>(
    core: &Core,
    network_id: u32,
    mut plan: impl FnMut(&[BridgeMapping]) -> Result<Option<(Vec<BridgeMapping>, Vec<String>, T)>>,
) -> Result<Option<T>> {
    for _ in 0..NETWORK_RETRIES {
        let net = core.store.bridge_network(network_id)?;
        let now: Vec<BridgeMapping> = net.mappings.into_iter().map(from_store).collect();
        let Some((puts, removes, out)) = plan(&now)? else {
            return Ok(None);
        };
        if puts.is_empty() && removes.is_empty() {
            return Ok(Some(out)); // nothing to write
        }
        let puts: Vec<_> = puts.iter().map(to_store).collect();
        match core
            .store
            .update_bridge_network(network_id, net.revision, &puts, &removes)
        {
            Ok(_) => return Ok(Some(out)),
            Err(ferry_store::StoreError::StaleRevision { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::conflict(
        "conflict",
        format!("network {network_id}'s bridge kept changing; try again"),
    ))
}

pub fn gates(core: &Core) -> Result<Gates> {
    let mut g = Gates::default();
    for (scope, name) in core.store.bridge_gates_off()? {
        match scope {
            ferry_store::GateScope::Org => g.orgs_off.insert(name),
            ferry_store::GateScope::App => g.apps_off.insert(name),
        };
    }
    Ok(g)
}

/// What `host`'s agent should hold: every mapping, and the gate of each of its machines (what
/// a push sends, and what the agents' watch streams).
pub fn host_state(core: &Core, host: ferry_addr::HostId) -> Result<BridgeSync> {
    let generation = core.bridge_generation();
    let mut sync = BridgeSync {
        mappings: followed_mappings(core)?,
        gates: Default::default(),
        origin: core.server_id.clone(),
        generation,
    };
    // The gates read once, not per machine, and from the cache the change feed keeps: this runs
    // on every change, for every stream. For the same reason only the machines' summaries are
    // read (no configs to parse).
    let off = crate::cache::gates(core)?;
    for m in core.store.followed_machine_summaries(Some(host))? {
        let on = !off.orgs_off.contains(&m.org) && !off.apps_off.contains(&m.app);
        sync.gates.insert(m.id, on);
    }
    Ok(sync)
}

/// Whether a machine gets the bridge: on unless its org or app switched it off.
pub fn gate(core: &Core, m: &Machine) -> Result<bool> {
    let g = crate::cache::gates(core)?;
    Ok(!g.orgs_off.contains(&m.org) && !g.apps_off.contains(&m.app))
}

/// Pushes the whole bridge state to every registered agent. Failures are reported, not fatal:
/// an agent that missed a push gets the state again when it registers ([`sync_host`]).
pub async fn sync_all(core: &Core) -> Vec<String> {
    let generation = core.bridge_generation();
    let (mappings, hosts) = match (followed_mappings(core), crate::cache::hosts(core)) {
        (Ok(m), Ok(h)) => (m, h),
        _ => return vec!["reading the bridge state".into()],
    };
    // The gates of every host's machines from one read, not one per host.
    let mut summaries: HashMap<ferry_addr::HostId, Vec<ferry_store::MachineSummary>> =
        HashMap::new();
    for m in core
        .store
        .followed_machine_summaries(None)
        .unwrap_or_default()
    {
        if let Some(h) = m.host {
            summaries.entry(h).or_default().push(m);
        }
    }
    // Every host at once, not one after the other: a migration waits for this push between its
    // switch and its start, so it is downtime, and it would grow with the number of hosts.
    let pushes = hosts.iter().filter(|h| !h.endpoint.is_empty()).map(|h| {
        let machines = summaries.remove(&h.id).unwrap_or_default();
        push(core, h, &mappings, machines, generation)
    });
    futures::future::join_all(pushes)
        .await
        .into_iter()
        .filter_map(|r| r.err())
        .collect()
}

/// Pushes the whole bridge state to one host's agent: what a host that (re)registers needs, so a
/// new host knows every mapping before its first machine dials an old address.
pub async fn sync_host(core: &Core, host: &ferry_store::Host) -> std::result::Result<(), String> {
    let generation = core.bridge_generation();
    let mappings = followed_mappings(core).map_err(|e| e.to_string())?;
    let machines = core
        .store
        .followed_machine_summaries(Some(host.id))
        .map_err(|e| e.to_string())?;
    push(core, host, &mappings, machines, generation).await
}

/// Sends `h`'s agent the mappings and the gates of `machines` (the host's).
async fn push(
    core: &Core,
    h: &ferry_store::Host,
    mappings: &[BridgeMapping],
    machines: Vec<ferry_store::MachineSummary>,
    generation: u64,
) -> std::result::Result<(), String> {
    let mut sync = BridgeSync {
        mappings: mappings.to_vec(),
        gates: Default::default(),
        origin: core.server_id.clone(),
        generation,
    };
    let off = crate::cache::gates(core).unwrap_or_default();
    for m in machines {
        let on = !off.orgs_off.contains(&m.org) && !off.apps_off.contains(&m.app);
        sync.gates.insert(m.id, on);
    }
    core.agents
        .bridge_sync(&h.endpoint, &sync)
        .await
        .map_err(|e| format!("host {:x}: {e}", h.id.get()))
}

pub(crate) async fn all_hits(core: &Core) -> Result<Vec<BridgeHit>> {
    let mut out = Vec::new();
    for h in core
        .store
        .list_hosts()?
        .into_iter()
        .filter(|h| !h.endpoint.is_empty())
    {
        let hits: Vec<BridgeHit> = match core.agents.bridge_hits(&h.endpoint).await {
            Ok(hits) => hits,
            Err(_) => continue, // a host that does not answer has no hits to show now
        };
        out.extend(hits);
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MapRequest {
    pub old: String,
    pub new: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MappingView {
    pub network_id: u32,
    pub old: String,
    pub new: String,
    pub retired: bool,
    pub created_at: i64,
    /// Uses through this mapping, all callers.
    pub hits: u64,
    /// Last use (ms since the epoch), if any.
    pub last_use: Option<i64>,
    /// Machine IDs that dialled the old address.
    pub callers: Vec<String>,
}

fn parse_guest(what: &str, s: &str) -> Result<FleetAddr> {
    s.parse::<FleetAddr>()
        .map_err(|e| Error::invalid(format!("{what}: {e}")))
}

fn no_org_has(n: ferry_addr::NetworkId) -> Error {
    Error::not_found(format!("network {n} (no org has it)"))
}

/// Maps OLD to NEW (both in one org's network).
pub async fn map(core: &Core, caller: &Caller, req: MapRequest) -> Result<MappingView> {
    let confined = crate::auth::network(core, caller)?;
    let (old, new) = (parse_guest("old", &req.old)?, parse_guest("new", &req.new)?);
    if !sees_network(confined, old.network().get()) {
        // Another org's network is one that no org has, as far as this caller can tell.
        return Err(no_org_has(old.network()));
    }
    if old.network() != new.network() {
        return Err(Error::invalid(format!(
            "{old} is in network {} and {new} in network {}: a mapping never crosses orgs",
            old.network(),
            new.network()
        )));
    }
    if old.machine_prefix() == new.machine_prefix() {
        return Err(Error::invalid(format!(
            "{old} and {new} are the same machine's addresses"
        )));
    }
    let rec = install(core, old, new).await?;
    Ok(view(&rec, &[]))
}

/// Maps OLD to NEW (validated by the caller: one network, different machines) and pushes the
/// whole state to every agent. Idempotent: mapping the same pair again changes nothing.
pub async fn install(core: &Core, old: FleetAddr, new: FleetAddr) -> Result<BridgeMapping> {
    if !core
        .store
        .list_orgs()?
        .iter()
        .any(|o| o.network_id == old.network())
    {
        return Err(no_org_has(old.network()));
    }
    install_in_org(core, old, new).await
}

/// [`install`] for a network known to be an org's (a migration's: the machine's org).
pub(crate) async fn install_in_org(
    core: &Core,
    old: FleetAddr,
    new: FleetAddr,
) -> Result<BridgeMapping> {
    let (o, n) = (old.to_string(), new.to_string());
    let now = core.store.now_ms();
    let changed = change_network(core, old.network().get(), |all| {
        if let Some(same) = all.iter().find(|m| m.old == o && m.new == n && !m.retired) {
            return Ok(Some((Vec::new(), Vec::new(), same.clone())));
        }
        if all.iter().any(|m| m.old == n) {
            return Err(Error::conflict(
                "bridge_loop",
                format!("{n} is itself mapped: map {o} to its target instead"),
            ));
        }
        // Chains stay one step deep: whatever pointed at OLD now points at NEW.
        let mut puts: Vec<BridgeMapping> = all
            .iter()
            .filter(|m| m.new == o)
            .map(|m| BridgeMapping {
                new: n.clone(),
                ..m.clone()
            })
            .collect();
        let rec = BridgeMapping {
            network_id: old.network().get(),
            old: o.clone(),
            new: n.clone(),
            retired: false,
            created_at: now,
        };
        puts.push(rec.clone()); // replaces an earlier mapping of OLD, if any
        Ok(Some((puts, Vec::new(), rec)))
    })?;
    let rec = changed.expect("install always plans a change");
    let errors = sync_all(core).await; // also when nothing changed: an agent may have missed it
    if !errors.is_empty() {
        tracing::warn!("bridge sync: {errors:?}");
    }
    Ok(rec)
}

/// Removes the mapping OLD -> NEW if it exists (a rolled-back migration: OLD is current again).
pub async fn uninstall(core: &Core, old: &str, new: &str) -> Result<()> {
    let Ok(network) = old.parse::<FleetAddr>().map(|a| a.network().get()) else {
        return Ok(()); // never a mapping's old address
    };
    let changed = change_network(core, network, |all| {
        let removes: Vec<String> = all
            .iter()
            .filter(|m| m.old == old && m.new == new)
            .map(|m| m.old.clone())
            .collect();
        // Undo what `install` did to chains too: older addresses it re-pointed at NEW go back
        // to OLD.
        let puts: Vec<BridgeMapping> = all
            .iter()
            .filter(|m| m.new == new && m.old != old)
            .map(|m| BridgeMapping {
                new: old.to_owned(),
                ..m.clone()
            })
            .collect();
        Ok((!removes.is_empty() || !puts.is_empty()).then_some((puts, removes, ())))
    })?;
    if changed.is_some() {
        let errors = sync_all(core).await;
        if !errors.is_empty() {
            tracing::warn!("bridge sync: {errors:?}");
        }
    }
    Ok(())
}

fn view(m: &BridgeMapping, hits: &[BridgeHit]) -> MappingView {
    let mine: Vec<&BridgeHit> = hits
        .iter()
        .filter(|h| h.network_id == m.network_id && h.old == m.old)
        .collect();
    let mut callers: Vec<String> = mine.iter().map(|h| h.machine_id.clone()).collect();
    callers.sort();
    callers.dedup();
    MappingView {
        network_id: m.network_id,
        old: m.old.clone(),
        new: m.new.clone(),
        retired: m.retired,
        created_at: m.created_at,
        hits: mine.iter().map(|h| h.count).sum(),
        last_use: mine.iter().map(|h| h.last_use).max(),
        callers,
    }
}

/// Every mapping with its hits (an org token: its own network's).
pub async fn list(core: &Core, caller: &Caller) -> Result<Vec<MappingView>> {
    let confined = crate::auth::network(core, caller)?;
    let mut all = mappings(core)?;
    all.retain(|m| sees_network(confined, m.network_id));
    let hits = all_hits(core).await?;
    Ok(all.iter().map(|m| view(m, &hits)).collect())
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReportLine {
    pub machine_id: String,
    pub app: String,
    /// The old addresses this machine still dials, with counts: the configs to fix.
    pub dials: Vec<BridgeHit>,
}

/// Per machine, the old addresses it still dials.
pub async fn report(core: &Core, caller: &Caller) -> Result<Vec<ReportLine>> {
    let confined = crate::auth::network(core, caller)?;
    let mut hits = all_hits(core).await?;
    // A hit is counted under the caller's own network: filtering by it keeps only this org's
    // machines.
    hits.retain(|h| sees_network(confined, h.network_id));
    let mut ids: Vec<String> = hits.iter().map(|h| h.machine_id.clone()).collect();
    ids.sort();
    ids.dedup();
    let mut out = Vec::new();
    for id in ids {
        let app = core
            .store
            .get_machine(&id)
            .map(|m| m.app)
            .unwrap_or_default();
        out.push(ReportLine {
            machine_id: id.clone(),
            app,
            dials: hits
                .iter()
                .filter(|h| h.machine_id == id)
                .cloned()
                .collect(),
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    /// Retire this old address...
    #[serde(default)]
    pub old: Option<String>,
    /// ...or every mapping unused for this long (e.g. "7d", "1h"); never-used ones count from
    /// their creation.
    #[serde(default)]
    pub unused_for: Option<String>,
}

/// Retires mappings: the old address fails fast from now on and never reaches anyone.
pub async fn retire(core: &Core, caller: &Caller, req: RetireRequest) -> Result<Vec<MappingView>> {
    let confined = crate::auth::network(core, caller)?;
    let hits = all_hits(core).await?;
    let now = core.store.now_ms();
    let mut retired = Vec::new();
    match (&req.old, &req.unused_for) {
        (Some(old), None) => {
            let addr = parse_guest("old", old)?;
            let old = addr.to_string();
            if !sees_network(confined, addr.network().get()) {
                // Exactly the answer for an address with no mapping.
                return Err(Error::not_found(format!("mapping of {old}")));
            }
            let r = change_network(core, addr.network().get(), |all| {
                let m = all
                    .iter()
                    .find(|m| m.old == old)
                    .ok_or_else(|| Error::not_found(format!("mapping of {old}")))?;
                let m = BridgeMapping {
                    retired: true,
                    ..m.clone()
                };
                Ok(Some((vec![m.clone()], Vec::new(), m)))
            })?;
            retired.extend(r);
        }
        (None, Some(d)) => {
            let d = humantime::parse_duration(d).map_err(|_| {
                Error::invalid(format!("unused_for {d:?} is not a duration like 7d"))
            })?;
            let networks: BTreeSet<u32> = mappings(core)?
                .iter()
                .map(|m| m.network_id)
                .filter(|n| sees_network(confined, *n))
                .collect();
            for n in networks {
                let r = change_network(core, n, |all| {
                    let puts: Vec<BridgeMapping> = all
                        .iter()
                        .filter(|m| !m.retired)
                        .filter(|m| {
                            let last = view(m, &hits).last_use.unwrap_or(m.created_at);
                            now - last >= d.as_millis() as i64
                        })
                        .map(|m| BridgeMapping {
                            retired: true,
                            ..m.clone()
                        })
                        .collect();
                    Ok((!puts.is_empty()).then(|| (puts.clone(), Vec::new(), puts)))
                })?;
                retired.extend(r.into_iter().flatten());
            }
        }
        _ => return Err(Error::invalid("give exactly one of old or unused_for")),
    }
    sync_all(core).await;
    Ok(retired.iter().map(|m| view(m, &hits)).collect())
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GateRequest {
    #[serde(default)]
    pub org: Option<String>,
    #[serde(default)]
    pub app: Option<String>,
    pub enabled: bool,
}

/// Switches the bridge on or off for an org or an app.
pub async fn set_gate(core: &Core, caller: &Caller, req: GateRequest) -> Result<Gates> {
    caller.require_user()?;
    // One gate is one record: switching it never rewrites another's.
    match (&req.org, &req.app) {
        (Some(o), None) => {
            if !caller.may_see_org(o) {
                // Another org is one that does not exist: the store's own words for that.
                return Err(ferry_store::StoreError::OrgNotFound { name: o.clone() }.into());
            }
            core.store.get_org(o)?;
            core.store
                .set_bridge_gate(ferry_store::GateScope::Org, o, !req.enabled)?;
        }
        (None, Some(a)) => {
            crate::auth::app(core, caller, a)?;
            core.store
                .set_bridge_gate(ferry_store::GateScope::App, a, !req.enabled)?;
        }
        _ => return Err(Error::invalid("give exactly one of org or app")),
    }
    core.cache.gates_changed();
    sync_all(core).await;
    let mut g = gates(core)?;
    if let Some(own) = caller.org_name() {
        // The caller's own gates only: other orgs' names are not theirs to see.
        let apps: BTreeSet<String> = core
            .store
            .list_apps(Some(own))?
            .into_iter()
            .map(|a| a.name)
            .collect();
        g.orgs_off.retain(|o| o == own);
        g.apps_off.retain(|a| apps.contains(a));
    }
    Ok(g)
}

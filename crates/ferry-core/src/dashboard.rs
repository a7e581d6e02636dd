//! What the web dashboard shows, in one read: hosts, apps, machines, migrations and the bridge,
//! scoped to one org or (for an operator) the whole fleet.
//!
//! The dashboard page renders this and reads it again whenever the fleet changes (the HTTP
//! layer streams a notice per change of [`Core::changes`]), so one snapshot is all it needs.

use crate::auth::Caller;
use crate::bridge::MappingView;
use crate::hosts::host_hex;
use crate::migrate::Migration;
use crate::views::{AppView, MachineView};
use crate::{Core, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use utoipa::ToSchema;

/// Migrations shown: the newest ones (a fleet that drained often has thousands).
pub const RECENT_MIGRATIONS: usize = 200;

/// A mapping unused for this long (counted from its creation if never used) is a candidate for
/// retirement: what `ferry bridge retire --unused-for 10m` would retire.
pub const IDLE_FOR_RETIREMENT_MS: i64 = 10 * 60 * 1000;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DashboardHost {
    pub id: String,
    pub region: String,
    pub cordoned: bool,
    /// The host's infra /48: the one route to it on every other host.
    pub infra_prefix: String,
    /// Machines on it (of the viewer's org, when scoped).
    pub machines: usize,
    /// The routes this host holds: one per other host, `prefix via host` (shown to admins).
    pub routes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DashboardMapping {
    #[serde(flatten)]
    pub mapping: MappingView,
    /// Not retired and unused for [`IDLE_FOR_RETIREMENT_MS`]: safe to retire, as far as the
    /// bridge can tell.
    pub retire_candidate: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Dashboard {
    /// The org this view is limited to; none: the whole fleet.
    pub org: Option<String>,
    /// When it was read (RFC 3339).
    pub generated_at: String,
    pub hosts: Vec<DashboardHost>,
    pub apps: Vec<AppView>,
    /// Live machines (not destroyed, not migrated away), oldest first, without their configs
    /// (`config` is `{}`; a machine's own page reads it).
    pub machines: Vec<MachineView>,
    /// Newest first, at most [`RECENT_MIGRATIONS`].
    pub migrations: Vec<Migration>,
    pub bridge: Vec<DashboardMapping>,
}

/// One server-sent event of `GET /v1/dashboard/events` (on the wire: `event: change` and
/// `data: <counter>` lines, then a blank line): the fleet changed, read the snapshot again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DashboardEvent {
    /// Always `change`.
    pub event: String,
    /// Counts the events of this stream, from 1 (the first comes at once).
    pub data: u64,
}

/// The dashboard's view of the fleet as `caller` may see it: an org token sees its own org
/// only (hosts: those that run its machines, counting only those, without the fleet's routes);
/// an admin sees everything, or one org's apps, machines, migrations and mappings when it asks.
pub async fn snapshot(core: &Core, caller: &Caller, org: Option<&str>) -> Result<Dashboard> {
    caller.require_user()?;
    let org = match caller.org_name() {
        Some(own) => Some(own),
        None => org,
    };
    let apps = crate::machines::list_apps(core, caller, org)?;
    let app_names: BTreeSet<&str> = apps.iter().map(|a| a.name.as_str()).collect();
    let networks: BTreeSet<u32> = apps.iter().map(|a| a.network_id).collect();
    let machines: Vec<MachineView> = core
        .store
        .list_machines(None)?
        .iter()
        .filter(|m| app_names.contains(m.app.as_str()))
        .map(|m| MachineView {
            // Not shown, and most of each machine's bytes: a 1,000-machine snapshot is read
            // again on every change, so it carries only what the pages show.
            config: serde_json::json!({}),
            ..MachineView::new(m, None)
        })
        .collect();
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for m in &machines {
        if let Some(h) = &m.host {
            *per_host.entry(h.clone()).or_default() += 1;
        }
    }
    let all_hosts = core.store.list_hosts()?;
    let admin = caller.is_admin();
    let hosts = all_hosts
        .iter()
        .filter(|h| admin || per_host.contains_key(&host_hex(h.id)))
        .map(|h| {
            let id = host_hex(h.id);
            DashboardHost {
                machines: per_host.get(&id).copied().unwrap_or(0),
                region: h.region.clone(),
                cordoned: h.cordoned,
                infra_prefix: ferry_addr::host_infra_prefix(h.id).to_string(),
                routes: all_hosts
                    .iter()
                    .filter(|o| admin && o.id != h.id)
                    .map(|o| {
                        format!(
                            "{} via {}",
                            ferry_addr::host_infra_prefix(o.id),
                            host_hex(o.id)
                        )
                    })
                    .collect(),
                id,
            }
        })
        .collect();
    let mut migrations: Vec<Migration> = crate::migrate::list(core, caller, None, None)?
        .into_iter()
        .filter(|m| app_names.contains(m.app.as_str()))
        .collect();
    migrations.sort_by_key(|m| std::cmp::Reverse(m.created_at_ms));
    migrations.truncate(RECENT_MIGRATIONS);
    let now = core.store.now_ms();
    let bridge = crate::bridge::list(core, caller)
        .await?
        .into_iter()
        .filter(|m| networks.contains(&m.network_id))
        .map(|m| DashboardMapping {
            // The rule of `ferry bridge retire --unused-for`: a never-used mapping counts from
            // its creation.
            retire_candidate: !m.retired
                && now - m.last_use.unwrap_or(m.created_at) >= IDLE_FOR_RETIREMENT_MS,
            mapping: m,
        })
        .collect();
    Ok(Dashboard {
        org: org.map(str::to_owned),
        generated_at: crate::views::rfc3339(now),
        hosts,
        apps,
        machines,
        migrations,
        bridge,
    })
}

//! Hosts: placement, the hosts' list, cordons, and what an agent says when it registers.

use crate::error::{Error, Result};
use crate::proto::RegisterHost;
use crate::views::{CordonView, HostView};
use crate::Core;
use ferry_addr::HostId;
use ferry_store::{Machine, MachineState};
use std::sync::Arc;

use MachineState as S;

/// A host ID as the API and CLI write it (hex).
pub fn parse_host(s: &str) -> Result<HostId> {
    u32::from_str_radix(s, 16)
        .ok()
        .and_then(|v| HostId::new(v).ok())
        .ok_or_else(|| {
            Error::invalid(format!(
                "host {s:?} is not a host ID (hex, as `ferry host list` shows)"
            ))
        })
}

/// A host ID as the API writes it.
pub fn host_hex(h: HostId) -> String {
    format!("{:x}", h.get())
}

/// The host for a new machine: the one asked for, or the least-loaded uncordoned one.
pub fn place(core: &Core, want: Option<&str>) -> Result<ferry_store::Host> {
    let hosts = crate::cache::hosts(core)?;
    if let Some(w) = want {
        let id = parse_host(w)?;
        let h = hosts
            .into_iter()
            .find(|h| h.id == id)
            .ok_or_else(|| Error::not_found(format!("host {w}")))?;
        if h.cordoned {
            return Err(Error::conflict(
                "host_cordoned",
                format!("host {w} is cordoned (draining)"),
            ));
        }
        return Ok(h);
    }
    let loads = core.store.machines_per_host()?;
    let mut best: Option<(usize, ferry_store::Host)> = None;
    // A host that joined but whose agent has not registered yet has no endpoint: nothing could
    // reach it.
    for h in hosts
        .into_iter()
        .filter(|h| !h.cordoned && !h.endpoint.is_empty())
    {
        let load = loads.get(&h.id).copied().unwrap_or(0);
        if best.as_ref().is_none_or(|(l, _)| load < *l) {
            best = Some((load, h));
        }
    }
    best.map(|(_, h)| h).ok_or_else(|| {
        Error::unavailable("no host is available (none registered, or all cordoned)")
    })
}

/// The endpoint of the agent of the machine's host.
pub fn machine_endpoint(core: &Core, m: &Machine) -> Result<String> {
    let host = m
        .host
        .ok_or_else(|| Error::conflict("not_placed", format!("machine {} has no host", m.id)))?;
    Ok(crate::cache::host(core, host)?.endpoint)
}

/// Hosts by ID, with their machine counts.
pub fn list_hosts(core: &Core) -> Result<Vec<HostView>> {
    let loads = core.store.machines_per_host()?;
    let mut out = Vec::new();
    for h in core.store.list_hosts()? {
        let n = loads.get(&h.id).copied().unwrap_or(0);
        out.push(view(h, n));
    }
    Ok(out)
}

/// Cordons (or uncordons) a host: a cordoned host takes no new machines.
pub fn set_cordoned(core: &Core, host: &str, cordoned: bool) -> Result<CordonView> {
    let h = core.store.set_cordoned(parse_host(host)?, cordoned)?;
    core.cache.hosts_changed();
    Ok(CordonView {
        host: host_hex(h.id),
        cordoned: h.cordoned,
    })
}

/// A host joins the fleet: a host ID never used before (the store's allocator), recorded with
/// no endpoint until its agent registers ([`place`] skips it until then).
pub fn join_host(core: &Core, region: &str) -> Result<ferry_store::Host> {
    let h = core.store.register_host(region, "")?;
    core.cache.hosts_changed();
    core.changed();
    Ok(h)
}

/// An agent (re)registers: its host is recorded with its endpoint, machines the store believes
/// run there but the agent did not find are recorded stopped, and the bridge state is pushed to
/// it right after.
pub fn register_host(core: &Arc<Core>, req: RegisterHost) -> Result<serde_json::Value> {
    let id = HostId::new(req.host_id).map_err(|e| Error::invalid(e.to_string()))?;
    check_underlay(&req.underlay)?;
    // The same registration sent again (the agent's first try reached a server that died before
    // answering): its effects are in the store already, so it adds no event a second time.
    let mut again = false;
    let host = match core.store.get_host(id) {
        Ok(mut h) => {
            again = h.endpoint == req.endpoint && h.underlay == req.underlay;
            h.endpoint = req.endpoint.clone();
            h.region = req.region.clone();
            h.underlay = req.underlay.clone();
            core.store.put_host(&h)?
        }
        Err(_) => core.store.put_host(&ferry_store::Host {
            id,
            region: req.region.clone(),
            endpoint: req.endpoint.clone(),
            cordoned: false,
            created_at_ms: core.store.now_ms(),
            underlay: req.underlay.clone(),
        })?,
    };
    core.cache.hosts_changed();
    // What the store believes runs there but the agent did not find: it died while no agent
    // watched it.
    for m in core.store.list_machines_on_host(id)? {
        if m.state == S::Started && !req.running.contains(&m.id) {
            let ev = ferry_store::NewEvent::new(
                "exit",
                "stopped",
                "flyd",
                serde_json::json!({"reason": "not running when its agent restarted"}),
            );
            core.store
                .transition_recorded(&m.id, &[S::Started], S::Stopped, &ev)?;
        } else if m.state == S::Started && !again {
            core.store.add_event(
                &m.id,
                "reattach",
                "started",
                "flyd",
                serde_json::json!({"host": format!("{:x}", id.get())}),
            )?;
        }
    }
    core.changed();
    // The bridge state, after the reply: the agent may wait for this answer before it serves.
    let (c, h) = (core.clone(), host.clone());
    tokio::spawn(async move {
        if let Err(e) = crate::bridge::sync_host(&c, &h).await {
            tracing::warn!("pushing the bridge state to a host that registered: {e}");
        }
    });
    Ok(serde_json::json!({"host": host_hex(host.id)}))
}

/// An underlay address an agent may register: empty (a dev-fleet host), or one unicast IPv6 or
/// IPv4 address outside the fleet's own `fdaa::/16` (an overlay address cannot carry the
/// overlay) and not loopback, unspecified or multicast (no other host could reach it).
fn check_underlay(s: &str) -> Result<()> {
    if s.is_empty() {
        return Ok(());
    }
    let bad = |why: &str| Err(Error::invalid(format!("underlay {s:?}: {why}")));
    let Ok(ip) = s.parse::<std::net::IpAddr>() else {
        return bad("not an IPv6 or IPv4 address");
    };
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return bad("not an address another host can reach");
    }
    if let std::net::IpAddr::V6(v6) = ip {
        if v6.segments()[0] == ferry_addr::FLEET_PREFIX {
            return bad("inside the fleet's own fdaa::/16");
        }
    }
    Ok(())
}

/// The hosts every agent routes to: those that registered an underlay address (a dev fleet's
/// hosts have none; `ferry dev` wires their fabric), by ID.
pub fn peers(core: &Core) -> Result<Vec<crate::proto::PeerHost>> {
    Ok(crate::cache::hosts(core)?
        .into_iter()
        .filter(|h| !h.underlay.is_empty())
        .map(|h| crate::proto::PeerHost {
            id: h.id.get(),
            underlay: h.underlay,
        })
        .collect())
}

/// A host leaves the fleet (`DELETE /v1/hosts/{id}`): refused while any machine is placed on it
/// (drain it first). Every other host drops its route to it, through the watch. Stop its agent
/// first: an agent that registers again brings the host back.
pub fn remove_host(core: &Core, host: &str) -> Result<HostView> {
    let id = parse_host(host)?;
    let h = core.store.get_host(id)?;
    core.store.remove_host(id)?;
    core.cache.hosts_changed();
    core.changed();
    Ok(view(h, 0))
}

fn view(h: ferry_store::Host, machines: usize) -> HostView {
    HostView {
        id: host_hex(h.id),
        infra_prefix: ferry_addr::host_infra_prefix(h.id).to_string(),
        region: h.region,
        endpoint: h.endpoint,
        cordoned: h.cordoned,
        underlay: h.underlay,
        machines,
    }
}

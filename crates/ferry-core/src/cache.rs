//! What the create path reads on every call but what changes rarely, served from memory while
//! the store's change feed ([`Core::store_changes`]) says it did not change: apps (whose org
//! and network never change), the hosts, the bridge's gates.
//!
//! Why: on etcd every read is a round trip to the cluster (a linearizable read costs about as
//! much as the machine's whole agent-side setup at fleet sizes of a few hosts), and a create
//! made five of them for this. Why it is safe: each entry is tagged with the feed's counter read
//! *before* the store was, so a change that lands meanwhile makes the next lookup read again;
//! this server's own changes to hosts drop the entry at once (the feed of an etcd store comes
//! back a few milliseconds later); and what a create relies on is checked again by the store in
//! the create's own transaction (the app exists, the host exists), so a stale entry can at
//! worst cost a refusal, never a wrong record. Without a change feed nothing is cached.

use crate::bridge::Gates;
use crate::error::Result;
use crate::Core;
use ferry_store::{App, Host};
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

#[derive(Default)]
pub(crate) struct ReadCache {
    /// Positive only: an app is never changed, only deleted (which the store's create then
    /// refuses).
    apps: RwLock<HashMap<String, App>>,
    hosts: Mutex<Option<(u64, Vec<Host>)>>,
    gates: Mutex<Option<(u64, Gates)>>,
}

impl ReadCache {
    /// Forgets the hosts (this server changed one).
    pub(crate) fn hosts_changed(&self) {
        *self.hosts.lock().unwrap() = None;
    }

    /// Forgets the gates (this server changed one).
    pub(crate) fn gates_changed(&self) {
        *self.gates.lock().unwrap() = None;
    }
}

/// The feed's counters now, or `None` without a feed.
fn versions(core: &Core) -> Option<ferry_store::Changes> {
    core.store_changes().map(|s| *s.borrow())
}

/// The app (from memory once read).
pub(crate) fn app(core: &Core, name: &str) -> Result<App> {
    if versions(core).is_none() {
        return Ok(core.store.get_app(name)?);
    }
    if let Some(a) = core.cache.apps.read().unwrap().get(name) {
        return Ok(a.clone());
    }
    let a = core.store.get_app(name)?;
    core.cache
        .apps
        .write()
        .unwrap()
        .insert(name.to_owned(), a.clone());
    Ok(a)
}

/// Every host, as of the last change the feed announced.
pub(crate) fn hosts(core: &Core) -> Result<Vec<Host>> {
    let Some(v) = versions(core) else {
        return Ok(core.store.list_hosts()?);
    };
    if let Some((seen, hs)) = core.cache.hosts.lock().unwrap().as_ref() {
        if *seen == v.hosts {
            return Ok(hs.clone());
        }
    }
    let hs = core.store.list_hosts()?;
    *core.cache.hosts.lock().unwrap() = Some((v.hosts, hs.clone()));
    Ok(hs)
}

/// One host (from [`hosts`]; read from the store if it is not there yet).
pub(crate) fn host(core: &Core, id: ferry_addr::HostId) -> Result<Host> {
    match hosts(core)?.into_iter().find(|h| h.id == id) {
        Some(h) => Ok(h),
        None => Ok(core.store.get_host(id)?),
    }
}

/// The bridge's gates, as of the last change the feed announced.
pub(crate) fn gates(core: &Core) -> Result<Gates> {
    let Some(v) = versions(core) else {
        return crate::bridge::gates(core);
    };
    if let Some((seen, g)) = core.cache.gates.lock().unwrap().as_ref() {
        if *seen == v.bridge {
            return Ok(g.clone());
        }
    }
    let g = crate::bridge::gates(core)?;
    *core.cache.gates.lock().unwrap() = Some((v.bridge, g.clone()));
    Ok(g)
}

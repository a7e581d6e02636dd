//! Records written before the store had typed records: volumes, migrations, migration policies,
//! instance histories and the bridge lived as JSON in the key-value space. A server started on
//! such a store copies them into the typed records once (and marks the store so it never does
//! again), so an upgraded fleet keeps its volumes, histories and mappings.

use crate::error::Error;
use crate::migrate::{InstanceRecord, Migration};
use crate::proto::BridgeMapping;
use crate::views::VolumeView;
use crate::Core;
use std::collections::BTreeSet;

const DONE: &str = "legacy/imported";

/// What an import copied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub volumes: usize,
    pub migrations: usize,
    pub policies: usize,
    pub instances: usize,
    pub mappings: usize,
    pub gates: usize,
}

fn json<T: serde::de::DeserializeOwned>(core: &Core, key: &str) -> Result<Option<T>, Error> {
    match core.store.kv_get(key)? {
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::internal(format!("legacy record {key}: {e}"))),
        None => Ok(None),
    }
}

/// Copies the legacy records into the typed ones; a record that already exists is left as it is
/// (an import interrupted half way runs again safely). Nothing is deleted.
pub fn import(core: &Core) -> Result<Imported, Error> {
    let mut n = Imported::default();
    if core.store.kv_get(DONE)?.is_some() {
        return Ok(n);
    }
    let exists = |e: &ferry_store::StoreError| {
        matches!(
            e,
            ferry_store::StoreError::Exists { .. }
                | ferry_store::StoreError::MigrationActive { .. }
        )
    };
    for id in json::<Vec<String>>(core, "volumes")?.unwrap_or_default() {
        if let Some(mut v) = json::<VolumeView>(core, &format!("volume/{id}"))? {
            v.revision = 0;
            if core.store.get_volume(&id).is_err() {
                crate::volumes::put_volume(core, &v)?;
                n.volumes += 1;
            }
        }
    }
    for id in json::<Vec<String>>(core, "migrations")?.unwrap_or_default() {
        if let Some(m) = json::<Migration>(core, &format!("migration/{id}"))? {
            match core.store.create_migration(&crate::migrate::record(&m)?) {
                Ok(_) => n.migrations += 1,
                Err(e) if exists(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    for app in core.store.list_apps(None)? {
        if let Some(detail) = json::<serde_json::Value>(core, &format!("policy/{}", app.name))? {
            if core.store.get_policy(&app.name)?.is_none() {
                core.store.put_policy(&ferry_store::PolicyRecord {
                    app: app.name.clone(),
                    detail,
                    revision: 0,
                })?;
                n.policies += 1;
            }
        }
        for m in core.store.list_machines_all(Some(&app.name))? {
            for r in json::<Vec<InstanceRecord>>(core, &format!("instances/{}", m.id))?
                .unwrap_or_default()
            {
                let added = core.store.append_instance(&ferry_store::InstanceRecord {
                    machine_id: m.id.clone(),
                    instance_id: r.instance_id,
                    host: r.host,
                    private_ip: r.private_ip,
                    state: r.state,
                    ended_at: r.ended_at,
                    migration: r.migration,
                })?;
                n.instances += usize::from(added);
            }
        }
    }
    let have: BTreeSet<(u32, String)> = core
        .store
        .list_bridge_mappings(None)?
        .into_iter()
        .map(|m| (m.network_id, m.old))
        .collect();
    for m in json::<Vec<BridgeMapping>>(core, "bridge/mappings")?.unwrap_or_default() {
        if !have.contains(&(m.network_id, m.old.clone())) {
            core.store.put_bridge_mapping(&ferry_store::BridgeMapping {
                network_id: m.network_id,
                old: m.old,
                new: m.new,
                retired: m.retired,
                created_at_ms: m.created_at,
            })?;
            n.mappings += 1;
        }
    }
    if let Some(g) = json::<crate::bridge::Gates>(core, "bridge/gates")? {
        for o in g.orgs_off {
            core.store
                .set_bridge_gate(ferry_store::GateScope::Org, &o, true)?;
            n.gates += 1;
        }
        for a in g.apps_off {
            core.store
                .set_bridge_gate(ferry_store::GateScope::App, &a, true)?;
            n.gates += 1;
        }
    }
    core.store.kv_put(DONE, "1")?;
    Ok(n)
}

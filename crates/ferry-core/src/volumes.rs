//! Volumes: size-limited ones (kept by the agent of the host of their first machine) and
//! operators' directory volumes (below the directories the server allows). The core never
//! creates, reads or deletes volume data.

use crate::auth::Caller;
use crate::config::{validate_volume_id, MachineConfig};
use crate::error::{Error, Result};
use crate::views::{rfc3339, CreateVolume, VolumeView};
use crate::Core;
use std::path::PathBuf;

/// `vol_` and sixteen random lowercase hex characters.
pub fn new_volume_id() -> String {
    format!("vol_{}", crate::random_hex(8))
}

pub fn resolve_volumes(core: &Core, c: &MachineConfig) -> Result<Vec<String>> {
    c.mounts
        .iter()
        .map(|m| {
            let v = volume(core, &m.volume)?;
            Ok(v.host_dir)
        })
        .collect()
}

pub fn volume(core: &Core, id: &str) -> Result<VolumeView> {
    validate_volume_id(id)?;
    volume_view(core.store.get_volume(id)?)
}

fn volume_view(r: ferry_store::VolumeRecord) -> Result<VolumeView> {
    let mut v: VolumeView = serde_json::from_value(r.detail).map_err(Error::internal)?;
    v.revision = r.revision;
    Ok(v)
}

/// Creates a volume: `size_mb` (made on its first machine's host) or `host_dir` (an allowed
/// directory).
pub fn create_volume(core: &Core, caller: &Caller, req: CreateVolume) -> Result<VolumeView> {
    if let Some(o) = &req.org_slug {
        crate::config::validate_name("org", o)?;
    }
    let org = match caller.org_name() {
        Some(_) => Some(crate::auth::org_for_new(caller, req.org_slug.as_deref())?),
        None => {
            caller.require_user()?;
            req.org_slug.clone()
        }
    };
    let id = new_volume_id();
    let (dir, size) = match (req.size_mb, req.host_dir) {
        (Some(s), None) => {
            if !(MIN_VOLUME_MB..=1_048_576).contains(&s) {
                return Err(Error::invalid(format!(
                    "size_mb {s} is outside {MIN_VOLUME_MB}..=1048576 (1 TiB)"
                )));
            }
            // Made by the agent of the first machine that mounts it: the server keeps no
            // volume data.
            (PathBuf::new(), Some(s))
        }
        (None, Some(d)) => (core.allowed_host_dir(&d)?, None),
        _ => return Err(Error::invalid("give exactly one of size_mb or host_dir")),
    };
    let v = VolumeView {
        id: id.clone(),
        org,
        host_dir: dir.display().to_string(),
        size_mb: size,
        kept_by_agent: size.is_some(),
        created_at: rfc3339(core.store.now_ms()),
        host: None,
        state: "active".into(),
        forked_from: None,
        destroy_after: None,
        destroy_after_ms: None,
        revision: 0,
    };
    put_volume(core, &v)?;
    Ok(v)
}

/// Smallest size-limited volume (an ext4 file system with a journal needs a few MiB).
pub const MIN_VOLUME_MB: u64 = 8;

/// Records a volume. One read before (`v.revision` from [`volume`]): a compare-and-swap, so a
/// concurrent change is a conflict instead of a lost update. A new one (revision 0): created,
/// or, when its creator repeats the step after a crash, replaced.
pub fn put_volume(core: &Core, v: &VolumeView) -> Result<()> {
    let mut rec = ferry_store::VolumeRecord {
        id: v.id.clone(),
        state: v.state.clone(),
        host: v.host.clone(),
        destroy_after_ms: v.destroy_after_ms,
        detail: serde_json::to_value(v).map_err(Error::internal)?,
        revision: v.revision,
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    if v.revision != 0 {
        core.store.update_volume(&rec)?;
        return Ok(());
    }
    match core.store.create_volume(&rec) {
        Ok(_) => Ok(()),
        Err(ferry_store::StoreError::Exists { .. }) => {
            rec.revision = core.store.get_volume(&v.id)?.revision;
            core.store.update_volume(&rec)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Every volume, oldest first.
pub fn volumes(core: &Core, state: Option<&str>) -> Result<Vec<VolumeView>> {
    core.store
        .list_volumes(state)?
        .into_iter()
        .map(volume_view)
        .collect()
}

/// Every volume the caller may see (an org token: its org's), oldest first (expired ones
/// destroyed first).
pub async fn list_volumes(core: &Core, caller: &Caller) -> Result<Vec<VolumeView>> {
    caller.require_user()?;
    crate::migrate::expire_volumes(core).await;
    let mut all = volumes(core, None)?;
    if let Some(own) = caller.org_name() {
        all.retain(|v| v.org.as_deref() == Some(own));
    }
    Ok(all)
}

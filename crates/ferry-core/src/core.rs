//! [`Core`]: what every operation of the control plane shares.

use crate::agents::{Agents, Webhooks};
use crate::error::{Error, Result};
use ferry_store::Store;
use std::path::PathBuf;
use std::sync::Arc;

/// The control plane of one server process: the store, the side effects, and what this process
/// alone knows (the migrations it drives, its waiters).
pub struct Core {
    pub store: Arc<dyn Store>,
    /// Every call to a host's agent goes through this.
    pub agents: Arc<dyn Agents>,
    /// Migration notices go out through this.
    pub webhooks: Arc<dyn Webhooks>,
    /// The migrations this process drives.
    pub migrations: crate::migrate::InFlight,
    /// This process's metrics (`GET /metrics`).
    pub metrics: crate::metrics::Metrics,
    /// Rarely changing reads of the create path, kept while the store's feed says they hold.
    pub(crate) cache: crate::cache::ReadCache,
    /// This server process among the fleet's servers (its claims on migrations carry it).
    pub server_id: String,
    /// Where operators' directory volumes (`host_dir`) may be: below one of these only.
    host_dir_roots: std::sync::RwLock<Vec<PathBuf>>,
    /// This server's subscription to the store's changes, taken at first use and shared by
    /// everything that follows them (the agents' watch streams).
    store_changes: std::sync::OnceLock<Option<ferry_store::Subscription>>,
    /// Bumped on every machine state change: `wait` listens to it, and so does whatever
    /// publishes state elsewhere (DNS), off the request's path.
    pub changes: tokio::sync::watch::Sender<u64>,
    /// The latest `.internal` DNS snapshot (JSON, as the agents' watch sends it), published by
    /// the control plane after each change; every host's agent serves it at `fdaa::3`.
    pub dns_state: tokio::sync::watch::Sender<Option<Arc<str>>>,
    /// Where new volumes are created.
    pub volumes_dir: PathBuf,
    /// Counts the bridge states this server read, in order ([`crate::proto::BridgeSync`]).
    bridge_generation: std::sync::atomic::AtomicU64,
}

impl Core {
    /// A core whose side effects go to `agents` and `webhooks` (HTTP in production, recording
    /// doubles in unit tests).
    pub fn new(
        store: Arc<dyn Store>,
        volumes_dir: PathBuf,
        agents: Arc<dyn Agents>,
        webhooks: Arc<dyn Webhooks>,
    ) -> Arc<Self> {
        Arc::new(Core {
            store,
            agents,
            webhooks,
            migrations: Default::default(),
            metrics: Default::default(),
            cache: Default::default(),
            server_id: format!("server-{}", crate::random_hex(6)),
            host_dir_roots: Default::default(),
            store_changes: Default::default(),
            changes: tokio::sync::watch::channel(0).0,
            dns_state: tokio::sync::watch::channel(None).0,
            volumes_dir,
            bridge_generation: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// The next bridge generation: taken *before* the state is read, so a sync whose read began
    /// after a change completed always counts higher than one read before it.
    pub fn bridge_generation(&self) -> u64 {
        self.bridge_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// Allows directory volumes (`host_dir`) below these directories. None by default: a
    /// directory volume is a host directory mounted read-write into a machine (as the
    /// machine's root), so only directories the operator set aside for it may be one.
    pub fn allow_host_dirs(&self, roots: Vec<PathBuf>) -> std::io::Result<()> {
        let roots = roots
            .iter()
            .map(|r| r.canonicalize())
            .collect::<std::io::Result<Vec<_>>>()?;
        *self.host_dir_roots.write().unwrap() = roots;
        Ok(())
    }

    /// `d` as a directory volume may have it: an existing directory that is, with every
    /// symlink and `..` resolved, below an allowed root.
    pub(crate) fn allowed_host_dir(&self, d: &str) -> Result<PathBuf> {
        let roots = self.host_dir_roots.read().unwrap().clone();
        if roots.is_empty() {
            return Err(Error::invalid(
                "directory volumes are off on this server (its operator allows them below \
                 chosen directories with --host-dir-root); use size_mb",
            ));
        }
        let p = PathBuf::from(d);
        let real = p
            .is_absolute()
            .then(|| p.canonicalize().ok())
            .flatten()
            .filter(|r| r.is_dir())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "host_dir {d:?} is not an existing absolute directory"
                ))
            })?;
        if !roots.iter().any(|r| real.starts_with(r) && real != *r) {
            return Err(Error::invalid(format!(
                "host_dir {d:?} is not below a directory this server allows for volumes ({})",
                roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(real)
    }

    /// The store's change feed (an etcd watch on etcd; in-process notices on SQLite), or
    /// `None` if the store cannot give one (followers then re-read on a timer).
    pub fn store_changes(&self) -> Option<ferry_store::Subscription> {
        self.store_changes
            .get_or_init(|| match self.store.subscribe() {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("subscribing to store changes: {e}");
                    None
                }
            })
            .clone()
    }

    /// Announces a machine change (to waiters and the DNS publisher).
    pub fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }
}

//! The durable state of the fleet (docs/design.md#control-plane): orgs and their network IDs,
//! apps, hosts, machines, their event logs, leases, named locks, the control plane's typed records
//! (volumes, migrations, migration policies, instance histories, bridge mappings and gates) and a
//! few settings.
//!
//! Its job: remember, atomically and durably, and never hand out an ID twice. Everything goes
//! through the [`Store`] trait, with two backends that pass one conformance suite: the embedded
//! [`SqliteStore`] (the default) and [`EtcdStore`] (several servers on one etcd cluster; its
//! module doc says how its transactions, allocators and leases work). [`open`] picks one from a
//! connect string (`sqlite://PATH`, `sqlite::memory:`, `etcd://HOST:PORT[,HOST:PORT...]`).
//!
//! Records that callers change by read-modify-write carry a `revision`: an update names the
//! revision it read and fails with [`StoreError::StaleRevision`] if the record changed meanwhile,
//! so concurrent servers never lose each other's updates; indexes (a machine's active migration,
//! volumes by state, mappings by network) change in the same transaction as their records.
//!
//! What it must never do: **no other crate opens SQLite** (they all come through here); it never
//! talks to hosts, the network or the kernel; it never reuses a network ID, host ID or machine
//! field (docs/design.md#allocation: a reused address would hand one machine's clients to another); and a failed
//! operation never leaves a partial change behind.
//!
//! ```
//! use ferry_store::{MachineState, SqliteStore, Store};
//! let store = SqliteStore::in_memory().unwrap();
//! let app = store.create_app("web", "personal").unwrap();
//! let host = store.register_host("ord", "/run/ferry/h1.sock").unwrap();
//! let field = store.allocate_machine_field(host.id).unwrap();
//! let m = store
//!     .create_machine(&ferry_store::Machine {
//!         id: ferry_store::new_machine_id(),
//!         name: "web-1".into(),
//!         app: app.name.clone(),
//!         org: app.org.clone(),
//!         network_id: app.network_id,
//!         host: Some(host.id),
//!         region: host.region.clone(),
//!         machine_field: Some(field),
//!         private_ip: None,
//!         instance_id: ferry_store::new_instance_id(),
//!         state: MachineState::Created,
//!         config: serde_json::json!({"init": {"cmd": ["sleep", "inf"]}}),
//!         created_at_ms: 0,
//!         updated_at_ms: 0,
//!     })
//!     .unwrap();
//! let m = store
//!     .transition(&m.id, &[MachineState::Created], MachineState::Starting)
//!     .unwrap();
//! assert_eq!(m.state, MachineState::Starting);
//! ```

mod clock;
mod error;
mod etcd;
mod model;
mod open;
mod records;
mod schema;
mod sqlite;
mod sqlite_records;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod watch;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Result, StoreError};
pub use etcd::EtcdStore;
pub use model::{
    is_machine_id, new_instance_id, new_machine_id, App, Event, Host, Lease, Lock, Machine,
    MachineState, MachineSummary, NewEvent, Org, ParseStateError,
};
pub use open::{open, open_with_clock, DEFAULT_ETCD_PREFIX};
pub use records::{
    BridgeMapping, BridgeNetwork, GateScope, InstanceRecord, MigrationFilter, MigrationRecord,
    PolicyRecord, TokenKind, TokenRecord, VolumeRecord,
};
pub use sqlite::SqliteStore;
pub use watch::{Changes, Subscription, Topic};

use ferry_addr::{HostId, MachineField};

/// The fleet's durable state. Every method is one atomic step: it either happens completely or
/// (on `Err`) changes nothing.
///
/// Times are milliseconds since the Unix epoch, from the store's [`Clock`].
pub trait Store: Send + Sync {
    /// The store's notion of "now" (the same clock that expires leases).
    fn now_ms(&self) -> i64;

    // ---- orgs -------------------------------------------------------------------------------

    /// The org, created with a never-used network ID if it does not exist yet.
    fn ensure_org(&self, name: &str) -> Result<Org>;
    fn get_org(&self, name: &str) -> Result<Org>;
    fn list_orgs(&self) -> Result<Vec<Org>>;

    // ---- apps -------------------------------------------------------------------------------

    /// Creates an app in `org` (creating the org too if needed). App names are unique across the
    /// fleet: [`StoreError::AppExists`] otherwise.
    fn create_app(&self, name: &str, org: &str) -> Result<App>;
    fn get_app(&self, name: &str) -> Result<App>;
    /// All apps, or those of one org, by name.
    fn list_apps(&self, org: Option<&str>) -> Result<Vec<App>>;
    /// Deletes the app and the records of its terminal (destroyed/migrated) machines. Refused
    /// with [`StoreError::AppHasMachines`] while any of its machines is not terminal.
    fn delete_app(&self, name: &str) -> Result<()>;

    // ---- hosts ------------------------------------------------------------------------------

    /// Registers a new host with a never-used host ID.
    fn register_host(&self, region: &str, endpoint: &str) -> Result<Host>;
    /// Inserts or updates a host with a known ID (re-registration after a restart). Updates keep
    /// the original `created_at_ms`. The host allocator moves past `host.id` so it is never
    /// handed out to another host.
    fn put_host(&self, host: &Host) -> Result<Host>;
    fn get_host(&self, id: HostId) -> Result<Host>;
    /// All hosts, by ID.
    fn list_hosts(&self) -> Result<Vec<Host>>;
    fn set_cordoned(&self, id: HostId, cordoned: bool) -> Result<Host>;
    /// Removes a host that left the fleet. Refused with [`StoreError::Conflict`] while any
    /// non-terminal machine is placed on it (drain it first). Its ID stays burned: it is never
    /// handed out again, so an address that named it never names another host.
    fn remove_host(&self, id: HostId) -> Result<()>;
    /// A machine field never used on `host` before (not even by a destroyed machine).
    fn allocate_machine_field(&self, host: HostId) -> Result<MachineField>;

    // ---- machines ---------------------------------------------------------------------------

    /// Records a new machine. Its app must exist; `org` and `network_id` must match the app's
    /// (else [`StoreError::Invalid`]); `id` must be a 14-hex-char ID not used before; timestamps
    /// are set from the clock. Returns the stored machine.
    fn create_machine(&self, m: &Machine) -> Result<Machine>;
    /// [`Store::create_machine`] for a new machine on `m.host`, in one transaction with what
    /// goes with it: a machine field never used on that host (as
    /// [`Store::allocate_machine_field`]), the machine's primary address from it
    /// (`m.machine_field` and `m.private_ip` are set here), and `event` as its first event.
    fn create_machine_placed(&self, m: &Machine, event: &NewEvent) -> Result<Machine>;
    fn get_machine(&self, id: &str) -> Result<Machine>;
    /// Machines that are not terminal (destroyed/migrated), of one app or all, oldest first.
    fn list_machines(&self, app: Option<&str>) -> Result<Vec<Machine>>;
    /// Like [`Store::list_machines`], terminal machines included.
    fn list_machines_all(&self, app: Option<&str>) -> Result<Vec<Machine>>;
    /// The non-terminal machines placed on `host` (what its agent should be running).
    fn list_machines_on_host(&self, host: HostId) -> Result<Vec<Machine>>;
    /// [`MachineSummary`] of the non-terminal machines, of one host or all, oldest first (the
    /// order of [`Store::list_machines`]): what the DNS snapshot and the agents' bridge gates
    /// read on every change, without reading or parsing whole configs.
    fn list_machine_summaries(&self, host: Option<HostId>) -> Result<Vec<MachineSummary>>;
    /// [`Store::list_machine_summaries`] for readers that run when the change feed
    /// ([`Store::subscribe`]) moves: every change the feed has announced and every change this
    /// store committed is in it, but a change another server committed a moment ago may not be
    /// yet (its notification is then still to come). An etcd store answers from what its watch
    /// keeps in memory instead of ranging over every machine; SQLite is always current.
    fn followed_machine_summaries(&self, host: Option<HostId>) -> Result<Vec<MachineSummary>> {
        self.list_machine_summaries(host)
    }
    /// How many non-terminal machines each host has (hosts with none are absent): placement's
    /// input, answered without reading a single machine record, so it costs the same at 10 or
    /// 10,000 machines a host.
    fn machines_per_host(&self) -> Result<std::collections::BTreeMap<HostId, usize>>;
    /// Overwrites the machine's mutable fields (name, host, region, machine field, private IP,
    /// instance ID, state, config) and bumps `updated_at_ms`; `id`, `app`, `org`, `network_id`
    /// and `created_at_ms` never change. This is last-writer-wins: when others may change the
    /// machine concurrently, use [`Store::update_machine_if`] or [`Store::transition`].
    fn update_machine(&self, m: &Machine) -> Result<Machine>;
    /// [`Store::update_machine`] as a compare-and-set: only if the stored state is one of
    /// `allowed_from`, else [`StoreError::IllegalTransition`] and nothing changes. For moves that
    /// change placement and state together (start on a new host, migration).
    fn update_machine_if(&self, m: &Machine, allowed_from: &[MachineState]) -> Result<Machine>;
    /// Atomic compare-and-set of the state: succeeds only if the current state is in
    /// `allowed_from`; otherwise [`StoreError::IllegalTransition`] naming the current state.
    fn transition(
        &self,
        id: &str,
        allowed_from: &[MachineState],
        to: MachineState,
    ) -> Result<Machine>;
    /// [`Store::transition`] and `event` appended to the machine's log, in one transaction:
    /// both or neither.
    fn transition_recorded(
        &self,
        id: &str,
        allowed_from: &[MachineState],
        to: MachineState,
        event: &NewEvent,
    ) -> Result<Machine>;

    // ---- events -----------------------------------------------------------------------------

    /// Appends to the machine's event log, stamped with the clock.
    fn add_event(
        &self,
        machine_id: &str,
        r#type: &str,
        status: &str,
        source: &str,
        request: serde_json::Value,
    ) -> Result<Event>;
    /// The machine's events, oldest first.
    fn events(&self, machine_id: &str) -> Result<Vec<Event>>;

    // ---- leases (per machine) ---------------------------------------------------------------

    /// Takes the machine's lease for `ttl_ms` with a fresh random nonce. [`StoreError::LeaseHeld`]
    /// if an unexpired lease exists; an expired one is replaced.
    fn acquire_lease(
        &self,
        machine_id: &str,
        ttl_ms: u64,
        owner: &str,
        description: &str,
    ) -> Result<Lease>;
    /// Extends the current lease to now + `ttl_ms`. [`StoreError::LeaseMismatch`] if `nonce` does
    /// not name an unexpired lease (an expired lease may already belong to someone else).
    fn refresh_lease(&self, machine_id: &str, nonce: &str, ttl_ms: u64) -> Result<Lease>;
    /// Ends the lease. [`StoreError::LeaseMismatch`] if an unexpired lease has another nonce;
    /// releasing a lease that is gone or expired succeeds (idempotent).
    fn release_lease(&self, machine_id: &str, nonce: &str) -> Result<()>;
    /// The unexpired lease, if any.
    fn current_lease(&self, machine_id: &str) -> Result<Option<Lease>>;
    /// Ok if there is no unexpired lease or `nonce` is its nonce, else [`StoreError::LeaseHeld`].
    fn check_lease(&self, machine_id: &str, nonce: Option<&str>) -> Result<()>;

    // ---- named locks ------------------------------------------------------------------------

    /// Takes the named lock for `ttl_ms`; [`StoreError::LockHeld`] if someone holds it unexpired.
    fn acquire_lock(&self, name: &str, ttl_ms: u64, owner: &str) -> Result<Lock>;
    /// Extends a held lock; [`StoreError::LockMismatch`] if `nonce` does not hold it now.
    fn refresh_lock(&self, name: &str, nonce: &str, ttl_ms: u64) -> Result<Lock>;
    /// [`Store::refresh_lock`] of several locks, `(name, nonce, ttl_ms)`, as one write (on etcd
    /// one per 50 locks): a server's heartbeat for every migration it drives, instead of a write
    /// per migration. Per lock, in order: the lock as extended, or `None` where `nonce` does not
    /// hold it now (that lock is left as it is). [`StoreError::Invalid`] for a TTL of zero,
    /// before anything is written.
    fn refresh_locks(&self, locks: &[(&str, &str, u64)]) -> Result<Vec<Option<Lock>>>;
    /// Releases the lock; [`StoreError::LockMismatch`] if someone else holds it unexpired.
    fn release_lock(&self, name: &str, nonce: &str) -> Result<()>;
    /// The unexpired holder, if any.
    fn current_lock(&self, name: &str) -> Result<Option<Lock>>;

    // ---- volumes ----------------------------------------------------------------------------

    /// Records a new volume at revision 1 (timestamps from the clock); [`StoreError::Exists`]
    /// if the ID is taken.
    fn create_volume(&self, v: &VolumeRecord) -> Result<VolumeRecord>;
    /// [`StoreError::NotFound`] if there is none.
    fn get_volume(&self, id: &str) -> Result<VolumeRecord>;
    /// All volumes, or those in one `state`, oldest first.
    fn list_volumes(&self, state: Option<&str>) -> Result<Vec<VolumeRecord>>;
    /// Compare-and-swap: writes `v` (every field but `id` and `created_at_ms`) only if the stored
    /// revision is `v.revision`, else [`StoreError::StaleRevision`]. Returns it at the next revision.
    fn update_volume(&self, v: &VolumeRecord) -> Result<VolumeRecord>;
    /// Deletes the volume if it is at `revision` ([`StoreError::StaleRevision`] otherwise).
    fn delete_volume(&self, id: &str, revision: u64) -> Result<()>;

    // ---- migrations -------------------------------------------------------------------------

    /// Records a new migration at revision 1, and, unless it is created `finished`, makes it its
    /// machine's active migration in the same step: [`StoreError::MigrationActive`] (and nothing
    /// recorded) if the machine already has an unfinished one; [`StoreError::Exists`] if the ID
    /// is taken.
    fn create_migration(&self, m: &MigrationRecord) -> Result<MigrationRecord>;
    fn get_migration(&self, id: &str) -> Result<MigrationRecord>;
    /// Oldest first (creation time, then ID).
    fn list_migrations(&self, filter: MigrationFilter<'_>) -> Result<Vec<MigrationRecord>>;
    /// The machine's unfinished migration, if any.
    fn active_migration(&self, machine_id: &str) -> Result<Option<MigrationRecord>>;
    /// Compare-and-swap by revision, like [`Store::update_volume`]. `machine_id`, `app`,
    /// `network_id` and `created_at_ms` never change ([`StoreError::Invalid`]); `finished` may go
    /// from false to true, never back; when it does, the machine's active index is cleared in the
    /// same step.
    fn update_migration(&self, m: &MigrationRecord) -> Result<MigrationRecord> {
        self.update_migration_recorded(m, None)
    }
    /// [`Store::update_migration`] and `event` appended to the migrated machine's log, in one
    /// transaction: both or neither (a stale revision records no event). A migration's step
    /// records what it did with the phase it reached in one write instead of two, and a
    /// resumed step can never record it twice. One event: on etcd an event's ID is the
    /// revision that wrote it.
    fn update_migration_recorded(
        &self,
        m: &MigrationRecord,
        event: Option<&NewEvent>,
    ) -> Result<MigrationRecord>;

    // ---- migration policies -----------------------------------------------------------------

    /// The app's stored policy, if it has one.
    fn get_policy(&self, app: &str) -> Result<Option<PolicyRecord>>;
    /// Creates (`p.revision == 0`: [`StoreError::Exists`] if one exists) or compare-and-swaps
    /// (`p.revision` = the revision read) the app's policy; returns it at its new revision.
    fn put_policy(&self, p: &PolicyRecord) -> Result<PolicyRecord>;

    // ---- instance histories -----------------------------------------------------------------

    /// Appends to the machine's instance history. Idempotent: an instance already in the history
    /// is not appended again (`Ok(false)`); a migration resumed after a crash repeats this.
    fn append_instance(&self, rec: &InstanceRecord) -> Result<bool>;
    /// The machine's past instances, in the order they were appended.
    fn list_instances(&self, machine_id: &str) -> Result<Vec<InstanceRecord>>;

    // ---- bridge -----------------------------------------------------------------------------

    /// All mappings of one network (or of all), by network then old address.
    fn list_bridge_mappings(&self, network_id: Option<u32>) -> Result<Vec<BridgeMapping>>;
    /// Every network's mappings, as fresh as [`Store::followed_machine_summaries`].
    fn followed_bridge_mappings(&self) -> Result<Vec<BridgeMapping>> {
        self.list_bridge_mappings(None)
    }
    /// One network's mappings with its revision, to plan a batch on.
    fn bridge_network(&self, network_id: u32) -> Result<BridgeNetwork>;
    /// Inserts or replaces the mapping of (`m.network_id`, `m.old`), touching no other mapping.
    fn put_bridge_mapping(&self, m: &BridgeMapping) -> Result<BridgeNetwork>;
    /// Removes the mapping of `old` in the network, if any; other mappings stay as they are.
    fn remove_bridge_mapping(&self, network_id: u32, old: &str) -> Result<BridgeNetwork>;
    /// Applies `puts` and `removes` (old addresses) to one network in one step, only if the
    /// network is still at `expected_revision` ([`StoreError::StaleRevision`] otherwise): for
    /// changes that depend on the other mappings (chains re-pointed, loops refused, retirement).
    /// Every mapping in `puts` must be of `network_id` ([`StoreError::Invalid`]).
    fn update_bridge_network(
        &self,
        network_id: u32,
        expected_revision: u64,
        puts: &[BridgeMapping],
        removes: &[String],
    ) -> Result<BridgeNetwork>;
    /// Switches the bridge off (`off = true`) or back on for an org's or an app's machines.
    fn set_bridge_gate(&self, scope: GateScope, name: &str, off: bool) -> Result<()>;
    /// Everything switched off, by scope then name.
    fn bridge_gates_off(&self) -> Result<Vec<(GateScope, String)>>;

    // ---- API tokens -------------------------------------------------------------------------

    /// Records a new token (`created_at_ms` from the clock, `revoked` false);
    /// [`StoreError::Exists`] if the ID is taken. An org token must name its org and the others
    /// must not ([`StoreError::Invalid`]).
    fn create_token(&self, t: &TokenRecord) -> Result<TokenRecord>;
    /// [`StoreError::NotFound`] if there is none (revoked tokens are still found).
    fn get_token(&self, id: &str) -> Result<TokenRecord>;
    /// Every token, revoked ones included, oldest first.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Marks the token revoked (idempotent) and returns it; [`StoreError::NotFound`] if none.
    fn revoke_token(&self, id: &str) -> Result<TokenRecord>;

    // ---- settings ---------------------------------------------------------------------------

    /// A free-form setting (fleet name, feature flags). Not for records that are listed,
    /// indexed or changed by read-modify-write: those have typed methods above, because
    /// `kv_get` then `kv_put` loses concurrent updates.
    fn kv_get(&self, key: &str) -> Result<Option<String>>;
    /// Sets a setting (last writer wins).
    fn kv_put(&self, key: &str, value: &str) -> Result<()>;

    // ---- change notification ----------------------------------------------------------------

    /// Follows changes of machines, hosts and the bridge, whoever makes them (on etcd: any
    /// server). Says only *that* a part changed (see [`Changes`]); the subscriber reads it
    /// again. Must be called inside no particular runtime; the subscription works in any.
    fn subscribe(&self) -> Result<Subscription>;
}

#[cfg(test)]
mod tests;

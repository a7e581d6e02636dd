//! [`SqliteStore`]: the embedded, single-server implementation of [`Store`].
//!
//! Its job: keep the fleet's state in one SQLite file, every operation one transaction, and
//! persist the ID allocators in the same transaction as the rows that use their values. It must
//! never hold the connection across a call (no caller-visible transactions: that would not carry
//! over to an etcd backend) and never commit half an operation: every error path returns before
//! `commit`, and dropping a `Transaction` rolls it back.

use crate::clock::{Clock, SystemClock};
use crate::error::{Result, StoreError};
use crate::model::{
    is_machine_id, new_nonce, App, Event, Host, Lease, Lock, Machine, MachineState, MachineSummary,
    NewEvent, Org,
};
use crate::records::{
    BridgeMapping, BridgeNetwork, GateScope, InstanceRecord, MigrationFilter, MigrationRecord,
    PolicyRecord, TokenRecord, VolumeRecord,
};
use crate::schema;
use crate::sqlite_records as rec;
use crate::Store;
use ferry_addr::{
    AllocatorState, FleetAddr, HostAllocator, HostId, MachineAllocator, MachineField,
    NetworkAllocator, NetworkId,
};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long a write waits for another process's write to finish before failing with `busy`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The embedded store: one SQLite database file (or memory, for tests).
///
/// One connection behind a mutex: SQLite serializes writers anyway, and one connection makes
/// every operation trivially atomic with respect to the others in this process. Other processes
/// opening the same file are still safe, because every write transaction is `BEGIN IMMEDIATE`
/// (it takes the write lock before reading, so a read-then-write can never be overtaken).
pub struct SqliteStore {
    conn: Mutex<Connection>,
    clock: Arc<dyn Clock>,
    path: Option<PathBuf>,
    /// Subscribers of this process (the only writer a single-server store has).
    changes: crate::watch::Notifier,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed, with its parent directory) the database at `path` and brings
    /// its schema up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_clock(path, Arc::new(SystemClock))
    }

    /// [`SqliteStore::open`] with an injected clock (tests of lease expiry).
    pub fn open_with_clock(path: impl AsRef<Path>, clock: Arc<dyn Clock>) -> Result<Self> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        // WAL: readers never block the writer and a commit is one sequential append.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt {
                what: format!("{} refused WAL journal mode (got {mode})", path.display()),
            });
        }
        // FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power loss. Losing
        // an allocator step after its value was handed out would hand that network ID, host ID
        // or machine field out again (docs/design.md#allocation forbids reuse), and losing a transition could
        // resurrect a migrated machine as a second running copy (docs/design.md#migration-invariants). One fsync per write
        // is the price; writes are per lifecycle step, not per packet.
        conn.pragma_update(None, "synchronous", "FULL")?;
        Self::setup(conn, clock, Some(path.to_owned()))
    }

    /// A private in-memory database, gone when dropped.
    pub fn in_memory() -> Result<Self> {
        Self::in_memory_with_clock(Arc::new(SystemClock))
    }

    pub fn in_memory_with_clock(clock: Arc<dyn Clock>) -> Result<Self> {
        Self::setup(Connection::open_in_memory()?, clock, None)
    }

    fn setup(mut conn: Connection, clock: Arc<dyn Clock>, path: Option<PathBuf>) -> Result<Self> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Off by default in SQLite, per connection: the schema's REFERENCES mean nothing without.
        conn.pragma_update(None, "foreign_keys", "ON")?;
        schema::migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            clock,
            path,
            changes: Default::default(),
        })
    }

    /// The database file, `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic inside an operation dropped its Transaction, which rolled back: the connection
        // itself is consistent, so a poisoned lock is safe to take over.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in one write transaction; commits only if it returns `Ok`.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>, i64) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Read the clock under the lock, so commit order and time order agree in this process.
        let now = self.clock.now_ms();
        let out = f(&tx, now)?;
        tx.commit()?;
        Ok(out)
    }

    /// [`SqliteStore::write`], then, if it committed, tells subscribers that `topic` changed.
    fn write_on<T>(
        &self,
        topic: crate::Topic,
        f: impl FnOnce(&Transaction<'_>, i64) -> Result<T>,
    ) -> Result<T> {
        let out = self.write(f)?;
        self.changes.bump(topic);
        Ok(out)
    }

    /// Runs `f` in one read transaction: a consistent snapshot across its queries.
    fn read<T>(&self, f: impl FnOnce(&Transaction<'_>, i64) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = self.clock.now_ms();
        f(&tx, now)
    }

    /// Every row of every table as text, for tests that prove a failed call changed nothing.
    #[cfg(test)]
    pub(crate) fn dump(&self) -> Vec<String> {
        let conn = self.conn();
        let tables = [
            "allocators",
            "orgs",
            "apps",
            "hosts",
            "machines",
            "events",
            "leases",
            "locks",
            "kv",
            "volumes",
            "migrations",
            "policies",
            "instances",
            "bridge_networks",
            "bridge_mappings",
            "bridge_gates",
            "tokens",
        ];
        let mut out = Vec::new();
        for t in tables {
            let mut stmt = conn
                .prepare(&format!("SELECT * FROM {t} ORDER BY 1"))
                .unwrap();
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    let cols: Vec<String> = (0..n)
                        .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                        .collect();
                    Ok(format!("{t}: {}", cols.join(" | ")))
                })
                .unwrap();
            out.extend(rows.map(|r| r.unwrap()));
        }
        out
    }
}

// ---- helpers: allocators -------------------------------------------------------------------

fn load_alloc(tx: &Transaction<'_>, key: &str) -> Result<Option<AllocatorState>> {
    let next: Option<i64> = tx
        .query_row("SELECT next FROM allocators WHERE name = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?;
    next.map(|n| {
        u64::try_from(n)
            .map(|next| AllocatorState { next })
            .map_err(|_| StoreError::Corrupt {
                what: format!("allocator {key} at {n}"),
            })
    })
    .transpose()
}

fn save_alloc(tx: &Transaction<'_>, key: &str, state: AllocatorState) -> Result<()> {
    let next = i64::try_from(state.next).map_err(|_| StoreError::Corrupt {
        what: format!("allocator {key} at {}", state.next),
    })?;
    tx.execute(
        "INSERT INTO allocators (name, next) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET next = excluded.next",
        params![key, next],
    )?;
    Ok(())
}

/// Moves an allocator past `used` (a value that got into the store without it, e.g. a host
/// re-registering with a known ID), so it is never handed out again. Never moves backwards.
fn burn(tx: &Transaction<'_>, key: &str, used: u32) -> Result<()> {
    tx.execute(
        "INSERT INTO allocators (name, next) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET next = max(next, excluded.next)",
        params![key, i64::from(used) + 1],
    )?;
    Ok(())
}

const NETWORK_ALLOC: &str = "network";
const HOST_ALLOC: &str = "host";
fn machine_alloc_key(host: HostId) -> String {
    format!("machine/{}", host.get())
}

fn allocate_network(tx: &Transaction<'_>) -> Result<NetworkId> {
    let mut a = load_alloc(tx, NETWORK_ALLOC)?
        .map(NetworkAllocator::restore)
        .unwrap_or_default();
    let id = a.allocate()?;
    save_alloc(tx, NETWORK_ALLOC, a.state())?;
    Ok(id)
}

fn allocate_host(tx: &Transaction<'_>) -> Result<HostId> {
    let mut a = load_alloc(tx, HOST_ALLOC)?
        .map(HostAllocator::restore)
        .unwrap_or_default();
    let id = a.allocate()?;
    save_alloc(tx, HOST_ALLOC, a.state())?;
    Ok(id)
}

// ---- helpers: decoding ---------------------------------------------------------------------

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what: what.into() }
}

fn network_id(v: i64) -> Result<NetworkId> {
    u32::try_from(v)
        .ok()
        .and_then(|v| NetworkId::new(v).ok())
        .ok_or_else(|| corrupt(format!("network ID {v}")))
}

fn host_id(v: i64) -> Result<HostId> {
    u32::try_from(v)
        .ok()
        .and_then(|v| HostId::new(v).ok())
        .ok_or_else(|| corrupt(format!("host ID {v}")))
}

fn machine_field(v: i64) -> Result<MachineField> {
    u32::try_from(v)
        .map(MachineField)
        .map_err(|_| corrupt(format!("machine field {v}")))
}

pub(crate) fn ttl(ttl_ms: u64) -> Result<i64> {
    if ttl_ms == 0 {
        return Err(StoreError::Invalid {
            reason: "a TTL must be at least 1 ms".into(),
        });
    }
    Ok(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
}

/// [`ttl`] of each lock of a [`Store::refresh_locks`] call, in order.
pub(crate) fn lock_ttls(locks: &[(&str, &str, u64)]) -> Result<Vec<i64>> {
    locks.iter().map(|(_, _, t)| ttl(*t)).collect()
}

const ORG_COLS: &str = "name, network_id";

fn org_from_row(r: &Row<'_>) -> rusqlite::Result<(String, i64)> {
    Ok((r.get(0)?, r.get(1)?))
}

fn org_decode((name, net): (String, i64)) -> Result<Org> {
    Ok(Org {
        name,
        network_id: network_id(net)?,
    })
}

const APP_SELECT: &str =
    "SELECT a.name, a.org, o.network_id, a.created_at_ms FROM apps a JOIN orgs o ON o.name = a.org";

type AppRow = (String, String, i64, i64);

fn app_from_row(r: &Row<'_>) -> rusqlite::Result<AppRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn app_decode((name, org, net, created_at_ms): AppRow) -> Result<App> {
    Ok(App {
        name,
        org,
        network_id: network_id(net)?,
        created_at_ms,
    })
}

const HOST_COLS: &str = "id, region, endpoint, cordoned, created_at_ms, underlay";

type HostRow = (i64, String, String, bool, i64, String);

fn host_from_row(r: &Row<'_>) -> rusqlite::Result<HostRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn host_decode((id, region, endpoint, cordoned, created_at_ms, underlay): HostRow) -> Result<Host> {
    Ok(Host {
        id: host_id(id)?,
        region,
        endpoint,
        cordoned,
        created_at_ms,
        underlay,
    })
}

/// Machines joined with their app and org: `org` and `network_id` always come from there.
const MACHINE_SELECT: &str = "SELECT m.id, m.name, m.app, a.org, o.network_id, m.host, m.region,
        m.machine_field, m.private_ip, m.instance_id, m.state, m.config, m.created_at_ms,
        m.updated_at_ms
    FROM machines m JOIN apps a ON a.name = m.app JOIN orgs o ON o.name = a.org";

/// A machine row before its typed fields are checked.
struct MachineRow {
    id: String,
    name: String,
    app: String,
    org: String,
    network_id: i64,
    host: Option<i64>,
    region: String,
    machine_field: Option<i64>,
    private_ip: Option<String>,
    instance_id: String,
    state: String,
    config: String,
    created_at_ms: i64,
    updated_at_ms: i64,
}

fn machine_from_row(r: &Row<'_>) -> rusqlite::Result<MachineRow> {
    Ok(MachineRow {
        id: r.get(0)?,
        name: r.get(1)?,
        app: r.get(2)?,
        org: r.get(3)?,
        network_id: r.get(4)?,
        host: r.get(5)?,
        region: r.get(6)?,
        machine_field: r.get(7)?,
        private_ip: r.get(8)?,
        instance_id: r.get(9)?,
        state: r.get(10)?,
        config: r.get(11)?,
        created_at_ms: r.get(12)?,
        updated_at_ms: r.get(13)?,
    })
}

fn machine_decode(m: MachineRow) -> Result<Machine> {
    Ok(Machine {
        network_id: network_id(m.network_id)?,
        host: m.host.map(host_id).transpose()?,
        machine_field: m.machine_field.map(machine_field).transpose()?,
        state: m
            .state
            .parse()
            .map_err(|e: crate::ParseStateError| corrupt(e.to_string()))?,
        config: serde_json::from_str(&m.config)?,
        id: m.id,
        name: m.name,
        app: m.app,
        org: m.org,
        region: m.region,
        private_ip: m.private_ip,
        instance_id: m.instance_id,
        created_at_ms: m.created_at_ms,
        updated_at_ms: m.updated_at_ms,
    })
}

fn query_machines(
    tx: &Transaction<'_>,
    filter: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Machine>> {
    let sql = format!("{MACHINE_SELECT} {filter} ORDER BY m.created_at_ms, m.rowid");
    let mut stmt = tx.prepare(&sql)?;
    let rows = stmt.query_map(params, machine_from_row)?;
    rows.map(|r| machine_decode(r?)).collect()
}

fn load_machine(tx: &Transaction<'_>, id: &str) -> Result<Machine> {
    query_machines(tx, "WHERE m.id = ?1", [id])?
        .pop()
        .ok_or_else(|| StoreError::MachineNotFound { id: id.to_owned() })
}

/// SQL for "not terminal", built from [`MachineState::is_terminal`] so the two never disagree.
fn live_filter() -> String {
    let terminal: Vec<String> = MachineState::ALL
        .into_iter()
        .filter(|s| s.is_terminal())
        .map(|s| format!("'{s}'"))
        .collect();
    format!("m.state NOT IN ({})", terminal.join(", "))
}

fn load_app(tx: &Transaction<'_>, name: &str) -> Result<App> {
    let row = tx
        .query_row(
            &format!("{APP_SELECT} WHERE a.name = ?1"),
            [name],
            app_from_row,
        )
        .optional()?;
    match row {
        Some(row) => app_decode(row),
        None => Err(StoreError::AppNotFound {
            name: name.to_owned(),
        }),
    }
}

fn load_host(tx: &Transaction<'_>, id: HostId) -> Result<Host> {
    let row = tx
        .query_row(
            &format!("SELECT {HOST_COLS} FROM hosts WHERE id = ?1"),
            [i64::from(id.get())],
            host_from_row,
        )
        .optional()?;
    match row {
        Some(row) => host_decode(row),
        None => Err(StoreError::HostNotFound { id }),
    }
}

fn ensure_org_tx(tx: &Transaction<'_>, name: &str, now: i64) -> Result<Org> {
    if name.is_empty() {
        return Err(StoreError::Invalid {
            reason: "an org name must not be empty".into(),
        });
    }
    let row = tx
        .query_row(
            &format!("SELECT {ORG_COLS} FROM orgs WHERE name = ?1"),
            [name],
            org_from_row,
        )
        .optional()?;
    if let Some(row) = row {
        return org_decode(row);
    }
    let network_id = allocate_network(tx)?;
    tx.execute(
        "INSERT INTO orgs (name, network_id, created_at_ms) VALUES (?1, ?2, ?3)",
        params![name, i64::from(network_id.get()), now],
    )?;
    Ok(Org {
        name: name.to_owned(),
        network_id,
    })
}

pub(crate) fn invalid(reason: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        reason: reason.into(),
    }
}

/// The checks shared by create and update: the machine's record must be self-consistent and
/// agree with its app, so nothing downstream (DNS, bridge, data plane) ever sees an address that
/// belongs to another network, host or machine.
fn validate_machine(tx: &Transaction<'_>, m: &Machine) -> Result<()> {
    check_machine(
        m,
        &mut &*tx,
        |tx, name| load_app(tx, name),
        |tx, host| load_host(tx, host).map(drop),
    )
}

/// The machine record rules, shared by both backends: `app` looks the app up and `host` checks
/// that the host exists, both in the caller's transaction `cx`.
pub(crate) fn check_machine<C: ?Sized>(
    m: &Machine,
    cx: &mut C,
    app: impl FnOnce(&mut C, &str) -> Result<App>,
    host: impl FnOnce(&mut C, HostId) -> Result<()>,
) -> Result<()> {
    if !is_machine_id(&m.id) {
        return Err(invalid(format!(
            "machine ID {:?} is not 14 lowercase hex characters",
            m.id
        )));
    }
    if ulid::Ulid::from_string(&m.instance_id).is_err() {
        return Err(invalid(format!(
            "instance ID {:?} is not a ULID",
            m.instance_id
        )));
    }
    let app = app(cx, &m.app)?;
    if m.org != app.org || m.network_id != app.network_id {
        return Err(invalid(format!(
            "machine {} says org {:?} network {}, but app {:?} is in org {:?} network {}",
            m.id, m.org, m.network_id, app.name, app.org, app.network_id
        )));
    }
    if let Some(h) = m.host {
        host(cx, h)?;
    }
    match (m.host, m.machine_field, m.private_ip.as_deref()) {
        (None, Some(_), _) => return Err(invalid("a machine field needs a host")),
        (_, None, Some(_)) => return Err(invalid("a private IP needs a host and machine field")),
        (Some(host), Some(field), Some(ip)) => {
            let addr: FleetAddr = ip
                .parse()
                .map_err(|e| invalid(format!("private IP {ip:?}: {e}")))?;
            if addr.network() != app.network_id || addr.host() != host || addr.machine() != field {
                return Err(invalid(format!(
                    "private IP {ip} is not in network {} host {host} machine {field}",
                    app.network_id
                )));
            }
        }
        _ => {}
    }
    Ok(())
}

/// A unique-index violation as a [`StoreError::Conflict`] rather than an opaque SQLite error.
fn conflict_on_unique(e: rusqlite::Error, what: impl FnOnce() -> String) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => StoreError::Conflict { what: what() },
        _ => StoreError::Sqlite(e),
    }
}

/// Writes every mutable field of `m` over the stored row.
fn write_machine(tx: &Transaction<'_>, m: &Machine, updated_at_ms: i64) -> Result<()> {
    tx.execute(
        "UPDATE machines SET name = ?2, host = ?3, region = ?4, machine_field = ?5,
            private_ip = ?6, instance_id = ?7, state = ?8, config = ?9, updated_at_ms = ?10
         WHERE id = ?1",
        params![
            m.id,
            m.name,
            m.host.map(|h| i64::from(h.get())),
            m.region,
            m.machine_field.map(|f| i64::from(f.0)),
            m.private_ip,
            m.instance_id,
            m.state.as_str(),
            serde_json::to_string(&m.config)?,
            updated_at_ms,
        ],
    )
    .map_err(|e| conflict_on_unique(e, || field_conflict(m)))?;
    if let (Some(host), Some(field)) = (m.host, m.machine_field) {
        burn(tx, &machine_alloc_key(host), field.0)?;
    }
    Ok(())
}

pub(crate) fn field_conflict(m: &Machine) -> String {
    format!(
        "machine field {:?} on host {:?} already belongs to another machine",
        m.machine_field, m.host
    )
}

fn update_machine_tx(
    tx: &Transaction<'_>,
    m: &Machine,
    allowed_from: Option<&[MachineState]>,
    now: i64,
) -> Result<Machine> {
    let cur = load_machine(tx, &m.id)?;
    if m.app != cur.app {
        return Err(invalid(format!(
            "machine {} belongs to app {:?}; it cannot move to {:?}",
            m.id, cur.app, m.app
        )));
    }
    if let Some(allowed) = allowed_from {
        if !allowed.contains(&cur.state) {
            return Err(StoreError::IllegalTransition {
                id: m.id.clone(),
                from: cur.state,
                to: m.state,
            });
        }
    }
    validate_machine(tx, m)?;
    // Never let updated_at go backwards, even if the wall clock does.
    write_machine(tx, m, now.max(cur.updated_at_ms))?;
    load_machine(tx, &m.id)
}

type LeaseRow = (String, String, String, i64);

fn load_lease(tx: &Transaction<'_>, machine_id: &str) -> Result<Option<Lease>> {
    let row: Option<LeaseRow> = tx
        .query_row(
            "SELECT nonce, owner, description, expires_at_ms FROM leases WHERE machine_id = ?1",
            [machine_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    Ok(row.map(|(nonce, owner, description, expires_at_ms)| Lease {
        machine_id: machine_id.to_owned(),
        nonce,
        owner,
        description,
        expires_at_ms,
    }))
}

/// The lease if it is still in force at `now` (a lease is in force while `now < expires_at`).
fn live_lease(tx: &Transaction<'_>, machine_id: &str, now: i64) -> Result<Option<Lease>> {
    Ok(load_lease(tx, machine_id)?.filter(|l| now < l.expires_at_ms))
}

/// Extends `name` by `ttl` ms from `now` if `nonce` holds it; `None` (nothing written) if not.
fn refresh_lock_tx(
    tx: &Transaction<'_>,
    name: &str,
    nonce: &str,
    ttl: i64,
    now: i64,
) -> Result<Option<Lock>> {
    let Some(mut lock) = live_lock(tx, name, now)?.filter(|l| l.nonce == nonce) else {
        return Ok(None);
    };
    lock.expires_at_ms = now.saturating_add(ttl);
    tx.execute(
        "UPDATE locks SET expires_at_ms = ?2 WHERE name = ?1",
        params![name, lock.expires_at_ms],
    )?;
    Ok(Some(lock))
}

fn live_lock(tx: &Transaction<'_>, name: &str, now: i64) -> Result<Option<Lock>> {
    let row: Option<(String, String, i64)> = tx
        .query_row(
            "SELECT nonce, owner, expires_at_ms FROM locks WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    Ok(row
        .map(|(nonce, owner, expires_at_ms)| Lock {
            name: name.to_owned(),
            nonce,
            owner,
            expires_at_ms,
        })
        .filter(|l| now < l.expires_at_ms))
}

/// A machine field never used on `host` (see [`Store::allocate_machine_field`]).
fn allocate_field_tx(tx: &Transaction<'_>, host: HostId) -> Result<MachineField> {
    load_host(tx, host)?;
    let key = machine_alloc_key(host);
    let mut a = load_alloc(tx, &key)?
        .map(MachineAllocator::restore)
        .unwrap_or_default();
    let field = a.allocate()?;
    save_alloc(tx, &key, a.state())?;
    Ok(field)
}

fn create_machine_tx(tx: &Transaction<'_>, m: &Machine, now: i64) -> Result<Machine> {
    match load_machine(tx, &m.id) {
        Ok(_) => return Err(StoreError::MachineExists { id: m.id.clone() }),
        Err(StoreError::MachineNotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    validate_machine(tx, m)?;
    tx.execute(
        "INSERT INTO machines (id, name, app, region, instance_id, state, config,
            created_at_ms, updated_at_ms)
         VALUES (?1, '', ?2, '', '', 'created', 'null', ?3, ?3)",
        params![m.id, m.app, now],
    )?;
    write_machine(tx, m, now)?;
    load_machine(tx, &m.id)
}

fn transition_tx(
    tx: &Transaction<'_>,
    id: &str,
    allowed_from: &[MachineState],
    to: MachineState,
    now: i64,
) -> Result<Machine> {
    let cur = load_machine(tx, id)?;
    if !allowed_from.contains(&cur.state) {
        return Err(StoreError::IllegalTransition {
            id: id.to_owned(),
            from: cur.state,
            to,
        });
    }
    let updated_at_ms = now.max(cur.updated_at_ms);
    tx.execute(
        "UPDATE machines SET state = ?2, updated_at_ms = ?3 WHERE id = ?1",
        params![id, to.as_str(), updated_at_ms],
    )?;
    Ok(Machine {
        state: to,
        updated_at_ms,
        ..cur
    })
}

/// Appends `ev` to an existing machine's log.
fn insert_event_tx(
    tx: &Transaction<'_>,
    machine_id: &str,
    ev: &NewEvent,
    now: i64,
) -> Result<Event> {
    tx.execute(
        "INSERT INTO events (machine_id, type, status, source, timestamp_ms, request)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            machine_id,
            ev.r#type,
            ev.status,
            ev.source,
            now,
            serde_json::to_string(&ev.request)?
        ],
    )?;
    Ok(Event {
        id: tx.last_insert_rowid(),
        machine_id: machine_id.to_owned(),
        r#type: ev.r#type.clone(),
        status: ev.status.clone(),
        source: ev.source.clone(),
        timestamp_ms: now,
        request: ev.request.clone(),
    })
}

fn machine_exists(tx: &Transaction<'_>, id: &str) -> Result<()> {
    let found: Option<i64> = tx
        .query_row("SELECT 1 FROM machines WHERE id = ?1", [id], |r| r.get(0))
        .optional()?;
    found
        .map(|_| ())
        .ok_or_else(|| StoreError::MachineNotFound { id: id.to_owned() })
}

impl Store for SqliteStore {
    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    // ---- orgs -----------------------------------------------------------------------------

    fn ensure_org(&self, name: &str) -> Result<Org> {
        self.write(|tx, now| ensure_org_tx(tx, name, now))
    }

    fn get_org(&self, name: &str) -> Result<Org> {
        self.read(|tx, _| {
            let row = tx
                .query_row(
                    &format!("SELECT {ORG_COLS} FROM orgs WHERE name = ?1"),
                    [name],
                    org_from_row,
                )
                .optional()?;
            match row {
                Some(row) => org_decode(row),
                None => Err(StoreError::OrgNotFound {
                    name: name.to_owned(),
                }),
            }
        })
    }

    fn list_orgs(&self) -> Result<Vec<Org>> {
        self.read(|tx, _| {
            let mut stmt = tx.prepare(&format!("SELECT {ORG_COLS} FROM orgs ORDER BY name"))?;
            let rows = stmt.query_map([], org_from_row)?;
            rows.map(|r| org_decode(r?)).collect()
        })
    }

    // ---- apps -----------------------------------------------------------------------------

    fn create_app(&self, name: &str, org: &str) -> Result<App> {
        self.write(|tx, now| {
            if name.is_empty() {
                return Err(invalid("an app name must not be empty"));
            }
            // Checked before the org is ensured, and all in one transaction anyway: a refused
            // app must not leave a new org (and a burned network ID) behind.
            match load_app(tx, name) {
                Ok(_) => {
                    return Err(StoreError::AppExists {
                        name: name.to_owned(),
                    })
                }
                Err(StoreError::AppNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            let org = ensure_org_tx(tx, org, now)?;
            tx.execute(
                "INSERT INTO apps (name, org, created_at_ms) VALUES (?1, ?2, ?3)",
                params![name, org.name, now],
            )?;
            Ok(App {
                name: name.to_owned(),
                org: org.name,
                network_id: org.network_id,
                created_at_ms: now,
            })
        })
    }

    fn get_app(&self, name: &str) -> Result<App> {
        self.read(|tx, _| load_app(tx, name))
    }

    fn list_apps(&self, org: Option<&str>) -> Result<Vec<App>> {
        self.read(|tx, _| {
            let mut stmt = tx.prepare(&format!(
                "{APP_SELECT} WHERE ?1 IS NULL OR a.org = ?1 ORDER BY a.name"
            ))?;
            let rows = stmt.query_map([org], app_from_row)?;
            rows.map(|r| app_decode(r?)).collect()
        })
    }

    fn delete_app(&self, name: &str) -> Result<()> {
        self.write_on(crate::Topic::Machines, |tx, _| {
            load_app(tx, name)?;
            let live: i64 = tx.query_row(
                &format!(
                    "SELECT count(*) FROM machines m WHERE m.app = ?1 AND {}",
                    live_filter()
                ),
                [name],
                |r| r.get(0),
            )?;
            if live > 0 {
                return Err(StoreError::AppHasMachines {
                    name: name.to_owned(),
                    count: live as u64,
                });
            }
            // Events and leases go with their machines (ON DELETE CASCADE). Machine fields stay
            // burned in the per-host allocators, so the old addresses are never handed out again.
            tx.execute("DELETE FROM machines WHERE app = ?1", [name])?;
            tx.execute("DELETE FROM apps WHERE name = ?1", [name])?;
            Ok(())
        })
    }

    // ---- hosts ----------------------------------------------------------------------------

    fn register_host(&self, region: &str, endpoint: &str) -> Result<Host> {
        self.write_on(crate::Topic::Hosts, |tx, now| {
            let id = allocate_host(tx)?;
            tx.execute(
                "INSERT INTO hosts (id, region, endpoint, cordoned, created_at_ms)
                 VALUES (?1, ?2, ?3, 0, ?4)",
                params![i64::from(id.get()), region, endpoint, now],
            )?;
            Ok(Host {
                id,
                region: region.to_owned(),
                endpoint: endpoint.to_owned(),
                cordoned: false,
                created_at_ms: now,
                underlay: String::new(),
            })
        })
    }

    fn put_host(&self, host: &Host) -> Result<Host> {
        self.write_on(crate::Topic::Hosts, |tx, now| {
            tx.execute(
                "INSERT INTO hosts (id, region, endpoint, cordoned, created_at_ms, underlay)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET region = excluded.region,
                    endpoint = excluded.endpoint, cordoned = excluded.cordoned,
                    underlay = excluded.underlay",
                params![
                    i64::from(host.id.get()),
                    host.region,
                    host.endpoint,
                    host.cordoned,
                    now,
                    host.underlay
                ],
            )?;
            burn(tx, HOST_ALLOC, host.id.get())?;
            load_host(tx, host.id)
        })
    }

    fn get_host(&self, id: HostId) -> Result<Host> {
        self.read(|tx, _| load_host(tx, id))
    }

    fn list_hosts(&self) -> Result<Vec<Host>> {
        self.read(|tx, _| {
            let mut stmt = tx.prepare(&format!("SELECT {HOST_COLS} FROM hosts ORDER BY id"))?;
            let rows = stmt.query_map([], host_from_row)?;
            rows.map(|r| host_decode(r?)).collect()
        })
    }

    fn set_cordoned(&self, id: HostId, cordoned: bool) -> Result<Host> {
        self.write_on(crate::Topic::Hosts, |tx, _| {
            load_host(tx, id)?;
            tx.execute(
                "UPDATE hosts SET cordoned = ?2 WHERE id = ?1",
                params![i64::from(id.get()), cordoned],
            )?;
            load_host(tx, id)
        })
    }

    fn remove_host(&self, id: HostId) -> Result<()> {
        self.write_on(crate::Topic::Hosts, |tx, _| {
            load_host(tx, id)?;
            let live: i64 = tx.query_row(
                &format!(
                    "SELECT COUNT(*) FROM machines m WHERE m.host = ?1 AND {}",
                    live_filter()
                ),
                [i64::from(id.get())],
                |r| r.get(0),
            )?;
            if live > 0 {
                return Err(StoreError::Conflict {
                    what: format!(
                        "host {:x} still has {live} machine(s): drain it first",
                        id.get()
                    ),
                });
            }
            // Terminal machines keep their records (history) but no longer name the host.
            tx.execute(
                "UPDATE machines SET host = NULL WHERE host = ?1",
                [i64::from(id.get())],
            )?;
            tx.execute("DELETE FROM hosts WHERE id = ?1", [i64::from(id.get())])?;
            Ok(())
        })
    }

    fn allocate_machine_field(&self, host: HostId) -> Result<MachineField> {
        self.write(|tx, _| allocate_field_tx(tx, host))
    }

    // ---- machines -------------------------------------------------------------------------

    fn create_machine(&self, m: &Machine) -> Result<Machine> {
        self.write_on(crate::Topic::Machines, |tx, now| {
            create_machine_tx(tx, m, now)
        })
    }

    fn create_machine_placed(&self, m: &Machine, event: &NewEvent) -> Result<Machine> {
        self.write_on(crate::Topic::Machines, |tx, now| {
            let host = m
                .host
                .ok_or_else(|| invalid(format!("machine {} has no host to be placed on", m.id)))?;
            let app = load_app(tx, &m.app)?;
            let field = allocate_field_tx(tx, host)?;
            let placed = Machine {
                machine_field: Some(field),
                private_ip: Some(FleetAddr::primary(app.network_id, host, field).to_string()),
                ..m.clone()
            };
            let stored = create_machine_tx(tx, &placed, now)?;
            insert_event_tx(tx, &m.id, event, now)?;
            Ok(stored)
        })
    }

    fn get_machine(&self, id: &str) -> Result<Machine> {
        self.read(|tx, _| load_machine(tx, id))
    }

    fn list_machines(&self, app: Option<&str>) -> Result<Vec<Machine>> {
        self.read(|tx, _| {
            query_machines(
                tx,
                &format!("WHERE (?1 IS NULL OR m.app = ?1) AND {}", live_filter()),
                [app],
            )
        })
    }

    fn list_machines_all(&self, app: Option<&str>) -> Result<Vec<Machine>> {
        self.read(|tx, _| query_machines(tx, "WHERE ?1 IS NULL OR m.app = ?1", [app]))
    }

    fn list_machines_on_host(&self, host: HostId) -> Result<Vec<Machine>> {
        self.read(|tx, _| {
            query_machines(
                tx,
                &format!("WHERE m.host = ?1 AND {}", live_filter()),
                [i64::from(host.get())],
            )
        })
    }

    fn list_machine_summaries(&self, host: Option<HostId>) -> Result<Vec<MachineSummary>> {
        self.read(|tx, _| {
            // The config stays in SQLite: only its one field DNS needs comes out (SQLite's JSON
            // extraction, no serde_json tree per machine).
            let mut q = tx.prepare_cached(&format!(
                "SELECT m.id, m.app, a.org, o.network_id, m.host, m.region, m.private_ip, m.state,
                        m.config -> '$.metadata.process_group'
                 FROM machines m JOIN apps a ON a.name = m.app JOIN orgs o ON o.name = a.org
                 WHERE (?1 IS NULL OR m.host = ?1) AND {}
                 ORDER BY m.created_at_ms, m.rowid",
                live_filter()
            ))?;
            let rows = q.query_map([host.map(|h| i64::from(h.get()))], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, String>(7)?,
                    // `->` answers the field as JSON text: only a JSON string is a process
                    // group (as `config.metadata.process_group.as_str()` reads it); a number or
                    // an object there is none.
                    r.get::<_, Option<String>>(8)?
                        .and_then(|j| serde_json::from_str::<String>(&j).ok()),
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, app, org, net, h, region, private_ip, state, process_group) = row?;
                out.push(MachineSummary {
                    id,
                    app,
                    org,
                    network_id: network_id(net)?,
                    host: h.map(host_id).transpose()?,
                    region,
                    private_ip,
                    state: state
                        .parse()
                        .map_err(|e: crate::ParseStateError| corrupt(e.to_string()))?,
                    process_group,
                });
            }
            Ok(out)
        })
    }

    fn machines_per_host(&self) -> Result<std::collections::BTreeMap<HostId, usize>> {
        self.read(|tx, _| {
            let mut q = tx.prepare_cached(&format!(
                "SELECT m.host, COUNT(*) FROM machines m
                 WHERE m.host IS NOT NULL AND {} GROUP BY m.host",
                live_filter()
            ))?;
            let rows = q.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = std::collections::BTreeMap::new();
            for row in rows {
                let (h, n) = row?;
                let id = u32::try_from(h)
                    .ok()
                    .and_then(|h| HostId::new(h).ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        what: format!("machines.host {h} is not a host ID"),
                    })?;
                out.insert(id, n as usize);
            }
            Ok(out)
        })
    }

    fn update_machine(&self, m: &Machine) -> Result<Machine> {
        self.write_on(crate::Topic::Machines, |tx, now| {
            update_machine_tx(tx, m, None, now)
        })
    }

    fn update_machine_if(&self, m: &Machine, allowed_from: &[MachineState]) -> Result<Machine> {
        self.write_on(crate::Topic::Machines, |tx, now| {
            update_machine_tx(tx, m, Some(allowed_from), now)
        })
    }

    fn transition(
        &self,
        id: &str,
        allowed_from: &[MachineState],
        to: MachineState,
    ) -> Result<Machine> {
        self.write_on(crate::Topic::Machines, |tx, now| {
            transition_tx(tx, id, allowed_from, to, now)
        })
    }

    fn transition_recorded(
        &self,
        id: &str,
        allowed_from: &[MachineState],
        to: MachineState,
        event: &NewEvent,
    ) -> Result<Machine> {
        self.write_on(crate::Topic::Machines, |tx, now| {
            let m = transition_tx(tx, id, allowed_from, to, now)?;
            insert_event_tx(tx, id, event, now)?;
            Ok(m)
        })
    }

    // ---- events ---------------------------------------------------------------------------

    fn add_event(
        &self,
        machine_id: &str,
        r#type: &str,
        status: &str,
        source: &str,
        request: serde_json::Value,
    ) -> Result<Event> {
        let ev = NewEvent::new(r#type, status, source, request);
        self.write(|tx, now| {
            machine_exists(tx, machine_id)?;
            insert_event_tx(tx, machine_id, &ev, now)
        })
    }

    fn events(&self, machine_id: &str) -> Result<Vec<Event>> {
        self.read(|tx, _| {
            machine_exists(tx, machine_id)?;
            let mut stmt = tx.prepare(
                "SELECT id, type, status, source, timestamp_ms, request FROM events
                 WHERE machine_id = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map([machine_id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?;
            rows.map(|r| {
                let (id, r#type, status, source, timestamp_ms, request) = r?;
                Ok(Event {
                    id,
                    machine_id: machine_id.to_owned(),
                    r#type,
                    status,
                    source,
                    timestamp_ms,
                    request: serde_json::from_str(&request)?,
                })
            })
            .collect()
        })
    }

    // ---- leases ---------------------------------------------------------------------------

    fn acquire_lease(
        &self,
        machine_id: &str,
        ttl_ms: u64,
        owner: &str,
        description: &str,
    ) -> Result<Lease> {
        let ttl = ttl(ttl_ms)?;
        self.write(|tx, now| {
            machine_exists(tx, machine_id)?;
            if let Some(held) = live_lease(tx, machine_id, now)? {
                return Err(StoreError::LeaseHeld {
                    machine_id: machine_id.to_owned(),
                    expires_at_ms: held.expires_at_ms,
                });
            }
            let lease = Lease {
                machine_id: machine_id.to_owned(),
                nonce: new_nonce(),
                owner: owner.to_owned(),
                description: description.to_owned(),
                expires_at_ms: now.saturating_add(ttl),
            };
            // REPLACE: an expired lease is simply overwritten.
            tx.execute(
                "INSERT OR REPLACE INTO leases (machine_id, nonce, owner, description,
                    expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    lease.machine_id,
                    lease.nonce,
                    lease.owner,
                    lease.description,
                    lease.expires_at_ms
                ],
            )?;
            Ok(lease)
        })
    }

    fn refresh_lease(&self, machine_id: &str, nonce: &str, ttl_ms: u64) -> Result<Lease> {
        let ttl = ttl(ttl_ms)?;
        self.write(|tx, now| {
            machine_exists(tx, machine_id)?;
            let mut lease = live_lease(tx, machine_id, now)?
                .filter(|l| l.nonce == nonce)
                .ok_or_else(|| StoreError::LeaseMismatch {
                    machine_id: machine_id.to_owned(),
                })?;
            lease.expires_at_ms = now.saturating_add(ttl);
            tx.execute(
                "UPDATE leases SET expires_at_ms = ?2 WHERE machine_id = ?1",
                params![machine_id, lease.expires_at_ms],
            )?;
            Ok(lease)
        })
    }

    fn release_lease(&self, machine_id: &str, nonce: &str) -> Result<()> {
        self.write(|tx, now| {
            if let Some(held) = live_lease(tx, machine_id, now)? {
                if held.nonce != nonce {
                    return Err(StoreError::LeaseMismatch {
                        machine_id: machine_id.to_owned(),
                    });
                }
            }
            // Gone, expired, or ours: in every case no lease remains.
            tx.execute("DELETE FROM leases WHERE machine_id = ?1", [machine_id])?;
            Ok(())
        })
    }

    fn current_lease(&self, machine_id: &str) -> Result<Option<Lease>> {
        self.read(|tx, now| live_lease(tx, machine_id, now))
    }

    fn check_lease(&self, machine_id: &str, nonce: Option<&str>) -> Result<()> {
        self.read(|tx, now| match live_lease(tx, machine_id, now)? {
            Some(held) if Some(held.nonce.as_str()) != nonce => Err(StoreError::LeaseHeld {
                machine_id: machine_id.to_owned(),
                expires_at_ms: held.expires_at_ms,
            }),
            _ => Ok(()),
        })
    }

    // ---- locks ----------------------------------------------------------------------------

    fn acquire_lock(&self, name: &str, ttl_ms: u64, owner: &str) -> Result<Lock> {
        let ttl = ttl(ttl_ms)?;
        self.write(|tx, now| {
            if let Some(held) = live_lock(tx, name, now)? {
                return Err(StoreError::LockHeld {
                    name: name.to_owned(),
                    expires_at_ms: held.expires_at_ms,
                    owner: held.owner,
                });
            }
            let lock = Lock {
                name: name.to_owned(),
                nonce: new_nonce(),
                owner: owner.to_owned(),
                expires_at_ms: now.saturating_add(ttl),
            };
            tx.execute(
                "INSERT OR REPLACE INTO locks (name, nonce, owner, expires_at_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![lock.name, lock.nonce, lock.owner, lock.expires_at_ms],
            )?;
            Ok(lock)
        })
    }

    fn refresh_lock(&self, name: &str, nonce: &str, ttl_ms: u64) -> Result<Lock> {
        let ttl = ttl(ttl_ms)?;
        self.write(|tx, now| {
            refresh_lock_tx(tx, name, nonce, ttl, now)?.ok_or_else(|| StoreError::LockMismatch {
                name: name.to_owned(),
            })
        })
    }

    fn refresh_locks(&self, locks: &[(&str, &str, u64)]) -> Result<Vec<Option<Lock>>> {
        let ttls = lock_ttls(locks)?;
        self.write(|tx, now| {
            locks
                .iter()
                .zip(&ttls)
                .map(|((name, nonce, _), ttl)| refresh_lock_tx(tx, name, nonce, *ttl, now))
                .collect()
        })
    }

    fn release_lock(&self, name: &str, nonce: &str) -> Result<()> {
        self.write(|tx, now| {
            if let Some(held) = live_lock(tx, name, now)? {
                if held.nonce != nonce {
                    return Err(StoreError::LockMismatch {
                        name: name.to_owned(),
                    });
                }
            }
            tx.execute("DELETE FROM locks WHERE name = ?1", [name])?;
            Ok(())
        })
    }

    fn current_lock(&self, name: &str) -> Result<Option<Lock>> {
        self.read(|tx, now| live_lock(tx, name, now))
    }

    // ---- typed records (sqlite_records.rs) -------------------------------------------------

    fn create_volume(&self, v: &VolumeRecord) -> Result<VolumeRecord> {
        self.write(|tx, now| rec::create_volume(tx, v, now))
    }

    fn get_volume(&self, id: &str) -> Result<VolumeRecord> {
        self.read(|tx, _| rec::get_volume(tx, id))
    }

    fn list_volumes(&self, state: Option<&str>) -> Result<Vec<VolumeRecord>> {
        self.read(|tx, _| rec::list_volumes(tx, state))
    }

    fn update_volume(&self, v: &VolumeRecord) -> Result<VolumeRecord> {
        self.write(|tx, now| rec::update_volume(tx, v, now))
    }

    fn delete_volume(&self, id: &str, revision: u64) -> Result<()> {
        self.write(|tx, _| rec::delete_volume(tx, id, revision))
    }

    fn create_migration(&self, m: &MigrationRecord) -> Result<MigrationRecord> {
        self.write(|tx, now| rec::create_migration(tx, m, now))
    }

    fn get_migration(&self, id: &str) -> Result<MigrationRecord> {
        self.read(|tx, _| rec::get_migration(tx, id))
    }

    fn list_migrations(&self, filter: MigrationFilter<'_>) -> Result<Vec<MigrationRecord>> {
        self.read(|tx, _| rec::list_migrations(tx, filter))
    }

    fn active_migration(&self, machine_id: &str) -> Result<Option<MigrationRecord>> {
        self.read(|tx, _| rec::active_migration(tx, machine_id))
    }

    fn update_migration_recorded(
        &self,
        m: &MigrationRecord,
        event: Option<&NewEvent>,
    ) -> Result<MigrationRecord> {
        self.write(|tx, now| {
            let rec = rec::update_migration(tx, m, now)?;
            if let Some(ev) = event {
                machine_exists(tx, &m.machine_id)?;
                insert_event_tx(tx, &m.machine_id, ev, now)?;
            }
            Ok(rec)
        })
    }

    fn create_token(&self, t: &TokenRecord) -> Result<TokenRecord> {
        self.write(|tx, now| rec::create_token(tx, t, now))
    }

    fn get_token(&self, id: &str) -> Result<TokenRecord> {
        self.read(|tx, _| rec::get_token(tx, id))
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read(|tx, _| rec::list_tokens(tx))
    }

    fn revoke_token(&self, id: &str) -> Result<TokenRecord> {
        self.write(|tx, _| rec::revoke_token(tx, id))
    }

    fn get_policy(&self, app: &str) -> Result<Option<PolicyRecord>> {
        self.read(|tx, _| rec::get_policy(tx, app))
    }

    fn put_policy(&self, p: &PolicyRecord) -> Result<PolicyRecord> {
        self.write(|tx, _| rec::put_policy(tx, p))
    }

    fn append_instance(&self, r: &InstanceRecord) -> Result<bool> {
        self.write(|tx, _| rec::append_instance(tx, r))
    }

    fn list_instances(&self, machine_id: &str) -> Result<Vec<InstanceRecord>> {
        self.read(|tx, _| rec::list_instances(tx, machine_id))
    }

    fn list_bridge_mappings(&self, network_id: Option<u32>) -> Result<Vec<BridgeMapping>> {
        self.read(|tx, _| rec::list_bridge_mappings(tx, network_id))
    }

    fn bridge_network(&self, network_id: u32) -> Result<BridgeNetwork> {
        self.read(|tx, _| rec::bridge_network(tx, network_id))
    }

    fn put_bridge_mapping(&self, m: &BridgeMapping) -> Result<BridgeNetwork> {
        self.write_on(crate::Topic::Bridge, |tx, _| {
            rec::apply_bridge(tx, m.network_id, None, std::slice::from_ref(m), &[])
        })
    }

    fn remove_bridge_mapping(&self, network_id: u32, old: &str) -> Result<BridgeNetwork> {
        self.write_on(crate::Topic::Bridge, |tx, _| {
            rec::apply_bridge(tx, network_id, None, &[], &[old.to_owned()])
        })
    }

    fn update_bridge_network(
        &self,
        network_id: u32,
        expected_revision: u64,
        puts: &[BridgeMapping],
        removes: &[String],
    ) -> Result<BridgeNetwork> {
        self.write_on(crate::Topic::Bridge, |tx, _| {
            rec::apply_bridge(tx, network_id, Some(expected_revision), puts, removes)
        })
    }

    fn set_bridge_gate(&self, scope: GateScope, name: &str, off: bool) -> Result<()> {
        self.write_on(crate::Topic::Bridge, |tx, _| {
            rec::set_bridge_gate(tx, scope, name, off)
        })
    }

    fn bridge_gates_off(&self) -> Result<Vec<(GateScope, String)>> {
        self.read(|tx, _| rec::bridge_gates_off(tx))
    }

    // ---- settings -------------------------------------------------------------------------

    fn kv_get(&self, key: &str) -> Result<Option<String>> {
        self.read(|tx, _| {
            Ok(tx
                .query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0))
                .optional()?)
        })
    }

    fn kv_put(&self, key: &str, value: &str) -> Result<()> {
        self.write(|tx, _| {
            tx.execute(
                "INSERT INTO kv (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            Ok(())
        })
    }

    fn subscribe(&self) -> Result<crate::Subscription> {
        Ok(self.changes.subscribe())
    }
}

//! The SQLite schema and its migrations, versioned with `PRAGMA user_version`.
//!
//! Its job: bring any database this crate ever wrote up to the current schema, each step in its
//! own transaction together with the version bump, so a crash mid-migration leaves the old
//! version intact. It must never edit a migration that has shipped (databases in the field have
//! already run it): changes are new entries at the end of [`MIGRATIONS`]. It must never open a
//! database newer than it understands.

use crate::error::{Result, StoreError};
use rusqlite::{Connection, TransactionBehavior};

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // v1: the initial schema.
    r#"
    -- Allocator high-water marks (ferry_addr::AllocatorState.next): "network", "host",
    -- "machine/<host id>". Persisted in the same transaction as the row that uses the value,
    -- so a value is never handed out twice.
    CREATE TABLE allocators (
        name TEXT PRIMARY KEY,
        next INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE orgs (
        name          TEXT PRIMARY KEY,
        network_id    INTEGER NOT NULL UNIQUE,
        created_at_ms INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE apps (
        name          TEXT PRIMARY KEY,
        org           TEXT NOT NULL REFERENCES orgs(name),
        created_at_ms INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX apps_org ON apps(org);

    CREATE TABLE hosts (
        id            INTEGER PRIMARY KEY,
        region        TEXT NOT NULL,
        endpoint      TEXT NOT NULL,
        cordoned      INTEGER NOT NULL DEFAULT 0 CHECK (cordoned IN (0, 1)),
        created_at_ms INTEGER NOT NULL
    ) STRICT;

    -- org and network_id are not stored: they follow from the app, which cannot change org.
    CREATE TABLE machines (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        app           TEXT NOT NULL REFERENCES apps(name),
        host          INTEGER REFERENCES hosts(id),
        region        TEXT NOT NULL,
        machine_field INTEGER,
        private_ip    TEXT,
        instance_id   TEXT NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('created', 'starting', 'started',
                        'stopping', 'stopped', 'destroying', 'destroyed', 'failed', 'migrated')),
        config        TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX machines_app ON machines(app);
    CREATE INDEX machines_host ON machines(host);
    -- A machine field names one machine on its host, ever (NULLs are distinct in SQLite).
    CREATE UNIQUE INDEX machines_host_field ON machines(host, machine_field);

    -- AUTOINCREMENT: ids never go backwards, even after deletes, so id order is log order.
    CREATE TABLE events (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_id   TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
        type         TEXT NOT NULL,
        status       TEXT NOT NULL,
        source       TEXT NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        request      TEXT NOT NULL
    ) STRICT;
    CREATE INDEX events_machine ON events(machine_id, id);

    CREATE TABLE leases (
        machine_id    TEXT PRIMARY KEY REFERENCES machines(id) ON DELETE CASCADE,
        nonce         TEXT NOT NULL,
        owner         TEXT NOT NULL,
        description   TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE locks (
        name          TEXT PRIMARY KEY,
        nonce         TEXT NOT NULL,
        owner         TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE kv (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;
    "#,
    // v2: typed records for what the API kept as JSON in `kv` with hand-kept index lists.
    // Indexed columns are what the store queries; `detail` is the API's body, never queried.
    // `revision` is the compare-and-swap counter (1 on insert, +1 per update).
    r#"
    CREATE TABLE volumes (
        id               TEXT PRIMARY KEY,
        state            TEXT NOT NULL,
        host             TEXT,
        destroy_after_ms INTEGER,
        detail           TEXT NOT NULL,
        revision         INTEGER NOT NULL CHECK (revision >= 1),
        created_at_ms    INTEGER NOT NULL,
        updated_at_ms    INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX volumes_state ON volumes(state, created_at_ms);
    CREATE INDEX volumes_host ON volumes(host);

    CREATE TABLE migrations (
        id            TEXT PRIMARY KEY,
        machine_id    TEXT NOT NULL,
        app           TEXT NOT NULL,
        network_id    INTEGER NOT NULL,
        phase         TEXT NOT NULL,
        finished      INTEGER NOT NULL CHECK (finished IN (0, 1)),
        drain         TEXT,
        detail        TEXT NOT NULL,
        revision      INTEGER NOT NULL CHECK (revision >= 1),
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX migrations_machine ON migrations(machine_id, created_at_ms);
    CREATE INDEX migrations_app ON migrations(app, created_at_ms);
    CREATE INDEX migrations_network ON migrations(network_id, created_at_ms);
    CREATE INDEX migrations_drain ON migrations(drain, created_at_ms);
    CREATE INDEX migrations_finished ON migrations(finished, created_at_ms);
    -- The active-migration index: at most one unfinished migration per machine, enforced by
    -- the database in the very statement that inserts or finishes one.
    CREATE UNIQUE INDEX migrations_active ON migrations(machine_id) WHERE finished = 0;

    CREATE TABLE policies (
        app      TEXT PRIMARY KEY,
        detail   TEXT NOT NULL,
        revision INTEGER NOT NULL CHECK (revision >= 1)
    ) STRICT;

    -- AUTOINCREMENT: seq is the append order and never goes backwards.
    CREATE TABLE instances (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_id  TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        host        TEXT NOT NULL,
        private_ip  TEXT NOT NULL,
        state       TEXT NOT NULL,
        ended_at    TEXT NOT NULL,
        migration   TEXT NOT NULL,
        UNIQUE (machine_id, instance_id)
    ) STRICT;

    -- One row per network that ever had a mapping: its revision, bumped by every change.
    CREATE TABLE bridge_networks (
        network_id INTEGER PRIMARY KEY,
        revision   INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE bridge_mappings (
        network_id    INTEGER NOT NULL,
        old           TEXT NOT NULL,
        new           TEXT NOT NULL,
        retired       INTEGER NOT NULL CHECK (retired IN (0, 1)),
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (network_id, old)
    ) STRICT;
    CREATE INDEX bridge_mappings_new ON bridge_mappings(network_id, new);

    CREATE TABLE bridge_gates (
        scope TEXT NOT NULL CHECK (scope IN ('org', 'app')),
        name  TEXT NOT NULL,
        PRIMARY KEY (scope, name)
    ) STRICT;
    "#,
    // v3: API tokens. Only a hash of each secret is kept.
    r#"
    CREATE TABLE tokens (
        id            TEXT PRIMARY KEY,
        kind          TEXT NOT NULL CHECK (kind IN ('admin', 'org', 'join')),
        org           TEXT,
        secret_hash   TEXT NOT NULL,
        description   TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER,
        revoked       INTEGER NOT NULL CHECK (revoked IN (0, 1)),
        CHECK ((kind = 'org') = (org IS NOT NULL))
    ) STRICT;
    "#,
    // v(next): a host's underlay address (real hosts; empty for dev-fleet hosts).
    r#"
    ALTER TABLE hosts ADD COLUMN underlay TEXT NOT NULL DEFAULT '';
    "#,
];

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Runs every migration the database has not seen yet.
pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    loop {
        // IMMEDIATE: two processes opening the same new database at once must not both run v1.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        tx.execute_batch(MIGRATIONS[version as usize])?;
        // PRAGMA takes no bound parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", version + 1))?;
        tx.commit()?;
    }
}

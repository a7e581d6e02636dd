//! [`crate::SqliteStore`]'s half of the typed records (volumes, migrations, policies, instances,
//! bridge mappings and gates): one function per operation, each run inside the caller's write or
//! read transaction.
//!
//! Its job: the compare-and-swap rules and the index upkeep in SQL, so that a stale revision or a
//! second active migration is refused inside the same transaction that would have written. It
//! must never commit (its caller does) and never read outside the transaction it is given.

use crate::error::{Result, StoreError};
use crate::records::{
    BridgeMapping, BridgeNetwork, GateScope, InstanceRecord, MigrationFilter, MigrationRecord,
    PolicyRecord, TokenKind, TokenRecord, VolumeRecord,
};
use rusqlite::{params, OptionalExtension, Row, Transaction};

fn json(v: &serde_json::Value) -> Result<String> {
    Ok(serde_json::to_string(v)?)
}

fn from_json(s: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(s)?)
}

fn rev(v: i64) -> u64 {
    // The schema's CHECK keeps revisions >= 1.
    u64::try_from(v).unwrap_or(0)
}

fn rev_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn stale(kind: &'static str, id: &str, expected: u64, found: u64) -> StoreError {
    StoreError::StaleRevision {
        kind,
        id: id.to_owned(),
        expected,
        found,
    }
}

// ---- volumes -------------------------------------------------------------------------------

const VOLUME_COLS: &str =
    "id, state, host, destroy_after_ms, detail, revision, created_at_ms, updated_at_ms";

type VolumeRow = (
    String,
    String,
    Option<String>,
    Option<i64>,
    String,
    i64,
    i64,
    i64,
);

fn volume_row(r: &Row<'_>) -> rusqlite::Result<VolumeRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn volume_decode(row: VolumeRow) -> Result<VolumeRecord> {
    let (id, state, host, destroy_after_ms, detail, revision, created_at_ms, updated_at_ms) = row;
    Ok(VolumeRecord {
        id,
        state,
        host,
        destroy_after_ms,
        detail: from_json(&detail)?,
        revision: rev(revision),
        created_at_ms,
        updated_at_ms,
    })
}

fn load_volume(tx: &Transaction<'_>, id: &str) -> Result<Option<VolumeRecord>> {
    tx.query_row(
        &format!("SELECT {VOLUME_COLS} FROM volumes WHERE id = ?1"),
        [id],
        volume_row,
    )
    .optional()?
    .map(volume_decode)
    .transpose()
}

pub(crate) fn get_volume(tx: &Transaction<'_>, id: &str) -> Result<VolumeRecord> {
    load_volume(tx, id)?.ok_or_else(|| StoreError::NotFound {
        kind: "volume",
        id: id.to_owned(),
    })
}

pub(crate) fn create_volume(
    tx: &Transaction<'_>,
    v: &VolumeRecord,
    now: i64,
) -> Result<VolumeRecord> {
    if v.id.is_empty() {
        return Err(StoreError::Invalid {
            reason: "a volume ID must not be empty".into(),
        });
    }
    if load_volume(tx, &v.id)?.is_some() {
        return Err(StoreError::Exists {
            kind: "volume",
            id: v.id.clone(),
        });
    }
    tx.execute(
        &format!("INSERT INTO volumes ({VOLUME_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6)"),
        params![
            v.id,
            v.state,
            v.host,
            v.destroy_after_ms,
            json(&v.detail)?,
            now
        ],
    )?;
    get_volume(tx, &v.id)
}

pub(crate) fn list_volumes(tx: &Transaction<'_>, state: Option<&str>) -> Result<Vec<VolumeRecord>> {
    let mut stmt = tx.prepare(&format!(
        "SELECT {VOLUME_COLS} FROM volumes WHERE ?1 IS NULL OR state = ?1
         ORDER BY created_at_ms, id"
    ))?;
    let rows = stmt.query_map([state], volume_row)?;
    rows.map(|r| volume_decode(r?)).collect()
}

pub(crate) fn update_volume(
    tx: &Transaction<'_>,
    v: &VolumeRecord,
    now: i64,
) -> Result<VolumeRecord> {
    let cur = get_volume(tx, &v.id)?;
    if cur.revision != v.revision {
        return Err(stale("volume", &v.id, v.revision, cur.revision));
    }
    tx.execute(
        "UPDATE volumes SET state = ?2, host = ?3, destroy_after_ms = ?4, detail = ?5,
            revision = revision + 1, updated_at_ms = ?6 WHERE id = ?1",
        params![
            v.id,
            v.state,
            v.host,
            v.destroy_after_ms,
            json(&v.detail)?,
            now.max(cur.updated_at_ms)
        ],
    )?;
    get_volume(tx, &v.id)
}

pub(crate) fn delete_volume(tx: &Transaction<'_>, id: &str, revision: u64) -> Result<()> {
    let cur = get_volume(tx, id)?;
    if cur.revision != revision {
        return Err(stale("volume", id, revision, cur.revision));
    }
    tx.execute("DELETE FROM volumes WHERE id = ?1", [id])?;
    Ok(())
}

// ---- migrations ----------------------------------------------------------------------------

const MIGRATION_COLS: &str = "id, machine_id, app, network_id, phase, finished, drain, detail, \
                              revision, created_at_ms, updated_at_ms";

fn migration_row(r: &Row<'_>) -> rusqlite::Result<(MigrationRecord, String)> {
    Ok((
        MigrationRecord {
            id: r.get(0)?,
            machine_id: r.get(1)?,
            app: r.get(2)?,
            network_id: r.get(3)?,
            phase: r.get(4)?,
            finished: r.get(5)?,
            drain: r.get(6)?,
            detail: serde_json::Value::Null,
            revision: rev(r.get(8)?),
            created_at_ms: r.get(9)?,
            updated_at_ms: r.get(10)?,
        },
        r.get(7)?,
    ))
}

fn migration_decode((mut m, detail): (MigrationRecord, String)) -> Result<MigrationRecord> {
    m.detail = from_json(&detail)?;
    Ok(m)
}

fn load_migration(tx: &Transaction<'_>, id: &str) -> Result<Option<MigrationRecord>> {
    tx.query_row(
        &format!("SELECT {MIGRATION_COLS} FROM migrations WHERE id = ?1"),
        [id],
        migration_row,
    )
    .optional()?
    .map(migration_decode)
    .transpose()
}

pub(crate) fn get_migration(tx: &Transaction<'_>, id: &str) -> Result<MigrationRecord> {
    load_migration(tx, id)?.ok_or_else(|| StoreError::NotFound {
        kind: "migration",
        id: id.to_owned(),
    })
}

pub(crate) fn active_migration(
    tx: &Transaction<'_>,
    machine_id: &str,
) -> Result<Option<MigrationRecord>> {
    // Served by the partial unique index migrations_active.
    tx.query_row(
        &format!("SELECT {MIGRATION_COLS} FROM migrations WHERE machine_id = ?1 AND finished = 0"),
        [machine_id],
        migration_row,
    )
    .optional()?
    .map(migration_decode)
    .transpose()
}

pub(crate) fn create_migration(
    tx: &Transaction<'_>,
    m: &MigrationRecord,
    now: i64,
) -> Result<MigrationRecord> {
    if m.id.is_empty() || m.machine_id.is_empty() {
        return Err(StoreError::Invalid {
            reason: "a migration needs an ID and a machine".into(),
        });
    }
    if load_migration(tx, &m.id)?.is_some() {
        return Err(StoreError::Exists {
            kind: "migration",
            id: m.id.clone(),
        });
    }
    if !m.finished {
        if let Some(active) = active_migration(tx, &m.machine_id)? {
            return Err(StoreError::MigrationActive {
                machine_id: m.machine_id.clone(),
                migration_id: active.id,
            });
        }
    }
    // The unique partial index would refuse a second active one anyway (two processes on one
    // file); the check above only gives that refusal its typed error.
    tx.execute(
        &format!(
            "INSERT INTO migrations ({MIGRATION_COLS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1, ?9, ?9)"
        ),
        params![
            m.id,
            m.machine_id,
            m.app,
            m.network_id,
            m.phase,
            m.finished,
            m.drain,
            json(&m.detail)?,
            now
        ],
    )?;
    get_migration(tx, &m.id)
}

pub(crate) fn list_migrations(
    tx: &Transaction<'_>,
    filter: MigrationFilter<'_>,
) -> Result<Vec<MigrationRecord>> {
    let (cond, arg): (&str, rusqlite::types::Value) = match filter {
        MigrationFilter::All => ("1 = 1 OR ?1", rusqlite::types::Value::Null),
        MigrationFilter::Machine(id) => ("machine_id = ?1", id.to_owned().into()),
        MigrationFilter::App(app) => ("app = ?1", app.to_owned().into()),
        MigrationFilter::Network(n) => ("network_id = ?1", i64::from(n).into()),
        MigrationFilter::Drain(h) => ("drain = ?1", h.to_owned().into()),
        MigrationFilter::Unfinished => ("finished = ?1", 0i64.into()),
    };
    let mut stmt = tx.prepare(&format!(
        "SELECT {MIGRATION_COLS} FROM migrations WHERE {cond} ORDER BY created_at_ms, id"
    ))?;
    let rows = stmt.query_map([arg], migration_row)?;
    rows.map(|r| migration_decode(r?)).collect()
}

pub(crate) fn update_migration(
    tx: &Transaction<'_>,
    m: &MigrationRecord,
    now: i64,
) -> Result<MigrationRecord> {
    let cur = get_migration(tx, &m.id)?;
    if cur.revision != m.revision {
        return Err(stale("migration", &m.id, m.revision, cur.revision));
    }
    check_migration_update(&cur, m)?;
    // Setting finished = 1 takes the row out of the partial index migrations_active: the
    // machine's active slot is freed by this very statement.
    tx.execute(
        "UPDATE migrations SET phase = ?2, finished = ?3, drain = ?4, detail = ?5,
            revision = revision + 1, updated_at_ms = ?6 WHERE id = ?1",
        params![
            m.id,
            m.phase,
            m.finished,
            m.drain,
            json(&m.detail)?,
            now.max(cur.updated_at_ms)
        ],
    )?;
    get_migration(tx, &m.id)
}

/// The rules of [`crate::Store::update_migration`] that do not depend on the backend.
pub(crate) fn check_migration_update(cur: &MigrationRecord, m: &MigrationRecord) -> Result<()> {
    if (&cur.machine_id, &cur.app, cur.network_id) != (&m.machine_id, &m.app, m.network_id) {
        return Err(StoreError::Invalid {
            reason: format!(
                "migration {}: machine, app and network never change (stored {} {} {})",
                m.id, cur.machine_id, cur.app, cur.network_id
            ),
        });
    }
    if cur.finished && !m.finished {
        // Reopening would need the active slot back, which another migration may hold by now.
        return Err(StoreError::Invalid {
            reason: format!("migration {} is finished; it cannot be reopened", m.id),
        });
    }
    Ok(())
}

// ---- policies ------------------------------------------------------------------------------

pub(crate) fn get_policy(tx: &Transaction<'_>, app: &str) -> Result<Option<PolicyRecord>> {
    tx.query_row(
        "SELECT detail, revision FROM policies WHERE app = ?1",
        [app],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
    )
    .optional()?
    .map(|(detail, revision)| {
        Ok(PolicyRecord {
            app: app.to_owned(),
            detail: from_json(&detail)?,
            revision: rev(revision),
        })
    })
    .transpose()
}

pub(crate) fn put_policy(tx: &Transaction<'_>, p: &PolicyRecord) -> Result<PolicyRecord> {
    let found = get_policy(tx, &p.app)?.map_or(0, |c| c.revision);
    if found != p.revision {
        return Err(if p.revision == 0 {
            StoreError::Exists {
                kind: "policy",
                id: p.app.clone(),
            }
        } else {
            stale("policy", &p.app, p.revision, found)
        });
    }
    tx.execute(
        "INSERT INTO policies (app, detail, revision) VALUES (?1, ?2, ?3)
         ON CONFLICT(app) DO UPDATE SET detail = excluded.detail, revision = excluded.revision",
        params![p.app, json(&p.detail)?, rev_sql(found + 1)],
    )?;
    Ok(PolicyRecord {
        revision: found + 1,
        ..p.clone()
    })
}

// ---- instances -----------------------------------------------------------------------------

pub(crate) fn append_instance(tx: &Transaction<'_>, r: &InstanceRecord) -> Result<bool> {
    // OR IGNORE on UNIQUE(machine_id, instance_id): a repeat appends nothing.
    let n = tx.execute(
        "INSERT OR IGNORE INTO instances (machine_id, instance_id, host, private_ip, state,
            ended_at, migration) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            r.machine_id,
            r.instance_id,
            r.host,
            r.private_ip,
            r.state,
            r.ended_at,
            r.migration
        ],
    )?;
    Ok(n == 1)
}

pub(crate) fn list_instances(
    tx: &Transaction<'_>,
    machine_id: &str,
) -> Result<Vec<InstanceRecord>> {
    let mut stmt = tx.prepare(
        "SELECT instance_id, host, private_ip, state, ended_at, migration FROM instances
         WHERE machine_id = ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map([machine_id], |r| {
        Ok(InstanceRecord {
            machine_id: machine_id.to_owned(),
            instance_id: r.get(0)?,
            host: r.get(1)?,
            private_ip: r.get(2)?,
            state: r.get(3)?,
            ended_at: r.get(4)?,
            migration: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---- bridge --------------------------------------------------------------------------------

fn mapping_row(r: &Row<'_>) -> rusqlite::Result<BridgeMapping> {
    Ok(BridgeMapping {
        network_id: r.get(0)?,
        old: r.get(1)?,
        new: r.get(2)?,
        retired: r.get(3)?,
        created_at_ms: r.get(4)?,
    })
}

pub(crate) fn list_bridge_mappings(
    tx: &Transaction<'_>,
    network_id: Option<u32>,
) -> Result<Vec<BridgeMapping>> {
    let mut stmt = tx.prepare(
        "SELECT network_id, old, new, retired, created_at_ms FROM bridge_mappings
         WHERE ?1 IS NULL OR network_id = ?1 ORDER BY network_id, old",
    )?;
    let rows = stmt.query_map([network_id], mapping_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub(crate) fn bridge_network(tx: &Transaction<'_>, network_id: u32) -> Result<BridgeNetwork> {
    let revision: Option<i64> = tx
        .query_row(
            "SELECT revision FROM bridge_networks WHERE network_id = ?1",
            [network_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(BridgeNetwork {
        network_id,
        revision: revision.map_or(0, rev),
        mappings: list_bridge_mappings(tx, Some(network_id))?,
    })
}

/// The one write path of the bridge: checks the revision (if given), applies the batch, bumps the
/// network's revision, all in the caller's transaction.
pub(crate) fn apply_bridge(
    tx: &Transaction<'_>,
    network_id: u32,
    expected_revision: Option<u64>,
    puts: &[BridgeMapping],
    removes: &[String],
) -> Result<BridgeNetwork> {
    check_bridge_batch(network_id, puts)?;
    let cur = bridge_network(tx, network_id)?;
    if let Some(expected) = expected_revision {
        if expected != cur.revision {
            return Err(stale(
                "bridge network",
                &network_id.to_string(),
                expected,
                cur.revision,
            ));
        }
    }
    for old in removes {
        tx.execute(
            "DELETE FROM bridge_mappings WHERE network_id = ?1 AND old = ?2",
            params![network_id, old],
        )?;
    }
    for m in puts {
        tx.execute(
            "INSERT INTO bridge_mappings (network_id, old, new, retired, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(network_id, old) DO UPDATE SET new = excluded.new,
                retired = excluded.retired, created_at_ms = excluded.created_at_ms",
            params![m.network_id, m.old, m.new, m.retired, m.created_at_ms],
        )?;
    }
    tx.execute(
        "INSERT INTO bridge_networks (network_id, revision) VALUES (?1, ?2)
         ON CONFLICT(network_id) DO UPDATE SET revision = excluded.revision",
        params![network_id, rev_sql(cur.revision + 1)],
    )?;
    bridge_network(tx, network_id)
}

/// The rules of a bridge batch that do not depend on the backend.
pub(crate) fn check_bridge_batch(network_id: u32, puts: &[BridgeMapping]) -> Result<()> {
    for m in puts {
        if m.network_id != network_id {
            return Err(StoreError::Invalid {
                reason: format!(
                    "mapping of {} is in network {}, not {network_id}",
                    m.old, m.network_id
                ),
            });
        }
        if m.old.is_empty() || m.new.is_empty() || m.old == m.new {
            return Err(StoreError::Invalid {
                reason: format!("mapping {:?} -> {:?} maps nothing", m.old, m.new),
            });
        }
    }
    Ok(())
}

pub(crate) fn set_bridge_gate(
    tx: &Transaction<'_>,
    scope: GateScope,
    name: &str,
    off: bool,
) -> Result<()> {
    if name.is_empty() {
        return Err(StoreError::Invalid {
            reason: "a gate needs an org or app name".into(),
        });
    }
    if off {
        tx.execute(
            "INSERT OR IGNORE INTO bridge_gates (scope, name) VALUES (?1, ?2)",
            params![scope.as_str(), name],
        )?;
    } else {
        tx.execute(
            "DELETE FROM bridge_gates WHERE scope = ?1 AND name = ?2",
            params![scope.as_str(), name],
        )?;
    }
    Ok(())
}

pub(crate) fn bridge_gates_off(tx: &Transaction<'_>) -> Result<Vec<(GateScope, String)>> {
    let mut stmt = tx.prepare("SELECT scope, name FROM bridge_gates ORDER BY scope, name")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    rows.map(|r| {
        let (scope, name) = r?;
        let scope = GateScope::parse(&scope).ok_or_else(|| StoreError::Corrupt {
            what: format!("bridge gate scope {scope:?}"),
        })?;
        Ok((scope, name))
    })
    .collect()
}

// ---- tokens --------------------------------------------------------------------------------

const TOKEN_COLS: &str =
    "id, kind, org, secret_hash, description, created_at_ms, expires_at_ms, revoked";

fn token_row(r: &Row<'_>) -> rusqlite::Result<(TokenRecord, String)> {
    let kind: String = r.get(1)?;
    Ok((
        TokenRecord {
            id: r.get(0)?,
            kind: TokenKind::Admin,
            org: r.get(2)?,
            secret_hash: r.get(3)?,
            description: r.get(4)?,
            created_at_ms: r.get(5)?,
            expires_at_ms: r.get(6)?,
            revoked: r.get::<_, i64>(7)? != 0,
        },
        kind,
    ))
}

fn token_decode((mut t, kind): (TokenRecord, String)) -> Result<TokenRecord> {
    t.kind = TokenKind::parse(&kind).ok_or_else(|| StoreError::Corrupt {
        what: format!("token {} has kind {kind:?}", t.id),
    })?;
    Ok(t)
}

fn load_token(tx: &Transaction<'_>, id: &str) -> Result<Option<TokenRecord>> {
    tx.query_row(
        &format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = ?1"),
        [id],
        token_row,
    )
    .optional()?
    .map(token_decode)
    .transpose()
}

pub(crate) fn get_token(tx: &Transaction<'_>, id: &str) -> Result<TokenRecord> {
    load_token(tx, id)?.ok_or_else(|| StoreError::NotFound {
        kind: "token",
        id: id.to_owned(),
    })
}

pub(crate) fn create_token(tx: &Transaction<'_>, t: &TokenRecord, now: i64) -> Result<TokenRecord> {
    crate::records::check_token(t)?;
    if load_token(tx, &t.id)?.is_some() {
        return Err(StoreError::Exists {
            kind: "token",
            id: t.id.clone(),
        });
    }
    tx.execute(
        &format!("INSERT INTO tokens ({TOKEN_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)"),
        params![
            t.id,
            t.kind.as_str(),
            t.org,
            t.secret_hash,
            t.description,
            now,
            t.expires_at_ms
        ],
    )?;
    get_token(tx, &t.id)
}

pub(crate) fn list_tokens(tx: &Transaction<'_>) -> Result<Vec<TokenRecord>> {
    let mut stmt = tx.prepare(&format!(
        "SELECT {TOKEN_COLS} FROM tokens ORDER BY created_at_ms, id"
    ))?;
    let rows = stmt.query_map([], token_row)?;
    rows.map(|r| token_decode(r?)).collect()
}

pub(crate) fn revoke_token(tx: &Transaction<'_>, id: &str) -> Result<TokenRecord> {
    get_token(tx, id)?;
    tx.execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [id])?;
    get_token(tx, id)
}

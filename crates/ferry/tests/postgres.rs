//! The seeds' own story on a real `ferry dev` fleet: a PostgreSQL primary with its data
//! directory on a volume (owned by `postgres`, mode 0700, its unix socket inside it) and a
//! streaming replica set up with the primary's *literal* address (`pg_basebackup -R`). The
//! primary is migrated: its forked data directory keeps its owners, Postgres serves on the new
//! host, and the replica keeps streaming through the bridge without touching its config.
//! PostgreSQL comes from Debian (`scripts/setup.sh`).

mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::*;

const PG: &str = "/usr/lib/postgresql/15/bin";

/// Runs as the machine's command: makes the cluster on first boot (as `postgres`), then execs
/// the server as `postgres` (setpriv execs, so stop signals reach Postgres itself).
fn primary_script() -> String {
    format!(
        "set -e; D=/data/pg; \
         if [ ! -e $D/PG_VERSION ]; then \
           mkdir -p $D; chown postgres:postgres $D; chmod 700 $D; \
           setpriv --reuid=postgres --regid=postgres --init-groups {PG}/initdb -D $D -A trust -U postgres >/dev/null; \
           printf \"listen_addresses='*'\\nunix_socket_directories='$D'\\ndynamic_shared_memory_type=mmap\\nshared_buffers=16MB\\nwal_keep_size=64MB\\n\" >> $D/postgresql.conf; \
           printf 'host all all ::/0 trust\\nhost replication all ::/0 trust\\n' >> $D/pg_hba.conf; \
         fi; \
         exec setpriv --reuid=postgres --regid=postgres --init-groups {PG}/postgres -D $D"
    )
}

/// The replica: a base backup from the primary's literal address (written into its config by
/// `-R`), then a standby server.
fn replica_script(primary_ip: &str) -> String {
    format!(
        "set -e; D=/data/pg; \
         if [ ! -e $D/PG_VERSION ]; then \
           mkdir -p $D; chown postgres:postgres $D; chmod 700 $D; \
           setpriv --reuid=postgres --regid=postgres --init-groups {PG}/pg_basebackup -h {primary_ip} -U postgres -D $D -R -X stream; \
         fi; \
         exec setpriv --reuid=postgres --regid=postgres --init-groups {PG}/postgres -D $D"
    )
}

fn pg_config(vol: &str, script: String) -> Value {
    json!({"init": {"cmd": ["sh", "-c", script]},
           "guest": {"memory_mb": 512},
           "mounts": [{"volume": vol, "path": "/data"}],
           "checks": {"pg": {"type": "tcp", "port": 5432, "kind": "readiness", "interval": "250ms", "timeout": "1s"}}})
}

/// `psql` inside the machine over its unix socket; the output without decorations.
fn sql(dev: &Dev, m: &Value, q: &str) -> Option<String> {
    let r = dev.exec(
        m,
        &[
            "setpriv",
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "psql",
            "-h",
            "/data/pg",
            "-U",
            "postgres",
            "-tAc",
            q,
        ],
    );
    (r["exit_code"] == 0).then(|| r["stdout"].as_str().unwrap_or("").trim().to_owned())
}

/// Whether query `q` answers `want` within `timeout` (asked again until it does).
fn sql_becomes(dev: &Dev, m: &Value, q: &str, want: &str, timeout: Duration) -> bool {
    eventually(timeout, || sql(dev, m, q).as_deref() == Some(want))
}

#[test]
fn a_postgres_primary_moves_and_its_replica_keeps_streaming_through_the_bridge() {
    let dev = Dev::start("pgmove", 3);
    let hosts = dev.hosts();
    let primary = dev.machine(
        "pg",
        &hosts[0],
        pg_config(&new_volume(&dev, 256), primary_script()),
    );
    assert!(
        sql_becomes(&dev, &primary, "select 1", "1", Duration::from_secs(60)),
        "the primary never answered"
    );
    sql(
        &dev,
        &primary,
        "create table t(x int); insert into t values (1)",
    )
    .expect("insert");
    let old_ip = primary["private_ip"].as_str().unwrap().to_owned();
    let replica = dev.machine(
        "pgreplica",
        &hosts[1],
        pg_config(&new_volume(&dev, 256), replica_script(&old_ip)),
    );
    assert!(
        sql_becomes(
            &dev,
            &replica,
            "select count(*) from t",
            "1",
            Duration::from_secs(60)
        ),
        "the replica never caught up"
    );
    let conninfo = sql(&dev, &replica, "show primary_conninfo").unwrap();
    assert!(conninfo.contains(&old_ip), "a literal address: {conninfo}");

    // Move the primary (ready for 2 s is enough here).
    dev.ok(
        "POST",
        "/v1/apps/pg/policy",
        json!({"min_healthy_time": "2s"}),
    );
    let mig = migrate(&dev, &primary, json!({"to": hosts[2]}));
    let v = wait_migration(&dev, &mig, Duration::from_secs(120));
    assert_eq!(v["phase"], "done", "{v}");
    let moved = dev.get_machine(&primary);
    assert_eq!(moved["host"].as_str(), Some(hosts[2].as_str()));
    assert_ne!(moved["private_ip"].as_str(), Some(old_ip.as_str()));
    // The forked data directory kept its owner and mode: Postgres runs and serves.
    let r = dev.exec(
        &moved,
        &[
            "stat",
            "-c",
            "%U %a",
            "/data/pg",
            "/data/pg/postgresql.conf",
        ],
    );
    assert_eq!(r["stdout"], "postgres 700\npostgres 600\n", "{r}");
    assert!(
        sql_becomes(
            &dev,
            &moved,
            "select count(*) from t",
            "1",
            Duration::from_secs(30)
        ),
        "the moved primary does not serve"
    );
    sql(&dev, &moved, "insert into t values (2)").expect("insert after the move");
    // The replica, still configured with the old literal address, streams from the new host.
    assert!(
        sql_becomes(
            &dev,
            &replica,
            "select count(*) from t",
            "2",
            Duration::from_secs(60)
        ),
        "the replica stopped streaming: {:?}",
        sql(
            &dev,
            &replica,
            "select status, sender_host from pg_stat_wal_receiver"
        )
    );
    let status = sql(&dev, &replica, "select status from pg_stat_wal_receiver");
    assert_eq!(status.as_deref(), Some("streaming"));
    assert_eq!(
        sql(&dev, &replica, "show primary_conninfo").unwrap(),
        conninfo,
        "nobody touched the replica's config"
    );
}

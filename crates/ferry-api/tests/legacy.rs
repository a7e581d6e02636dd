//! A store written before the typed records (JSON in the key-value space, as the previous
//! release kept volumes, migrations, policies, instance histories and the bridge) keeps all of
//! it: a server started on it copies everything into the typed records, once.

use ferry_store::{SqliteStore, Store};
use serde_json::json;
use std::sync::Arc;

#[test]
fn legacy_records_are_copied_once_and_nothing_is_lost() {
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    let app = store.create_app("db", "acme").unwrap();
    let net = app.network_id.get();
    let kv = |k: &str, v: serde_json::Value| store.kv_put(k, &v.to_string()).unwrap();
    kv("volumes", json!(["vol_0123456789abcdef"]));
    kv(
        "volume/vol_0123456789abcdef",
        json!({"id": "vol_0123456789abcdef", "host_dir": "/var/lib/ferry/v", "size_mb": 16,
               "kept_by_agent": true, "created_at": "2026-12-01T00:00:00Z", "host": "80000000",
               "state": "active"}),
    );
    kv("migrations", json!(["mig_00112233445566aa"]));
    kv(
        "migration/mig_00112233445566aa",
        json!({"id": "mig_00112233445566aa", "machine_id": "0123456789abcd", "app": "db",
               "network_id": net, "phase": "done", "from_host": "80000000", "to_host": "80000001",
               "old_instance_id": "a", "old_ip": "fdaa::1", "old_field": 1, "new_instance_id": "b",
               "new_ip": "fdaa::2", "new_field": 2, "was_running": true, "volumes": [],
               "error": null, "rollback_from": null, "drain": null,
               "stats": {"precopy_ms": 0, "precopy_bytes": 0, "final_sync_ms": 0, "final_bytes": 0,
                         "final_chunks": 0, "stopped_at_ms": null, "started_at_ms": null,
                         "downtime_ms": 42},
               "created_at_ms": 1, "updated_at_ms": 2, "finished_at_ms": 3}),
    );
    kv(
        "policy/db",
        json!({"max_unavailable": 2, "min_healthy_time_ms": 1000, "healthy_deadline_ms": 60000,
               "notice_period_ms": 0, "webhook_url": null, "webhook_secret": "s3cret-s3cret-s3cret",
               "webhook_secret_set": true, "volume_retention_ms": 1000}),
    );
    let old = format!("fdaa:{:x}:{:x}:8000:0:0:1:2", net >> 16, net & 0xffff);
    let new = format!("fdaa:{:x}:{:x}:8000:1:0:1:2", net >> 16, net & 0xffff);
    kv(
        "bridge/mappings",
        json!([{"network_id": net, "old": old, "new": new, "retired": false, "created_at": 5}]),
    );
    kv("bridge/gates", json!({"orgs_off": [], "apps_off": ["db"]}));

    let dir = tempfile::tempdir().unwrap();
    let ctx = ferry_api::http_core(store.clone(), dir.path().into());
    let n = ferry_core::legacy::import(&ctx).unwrap();
    assert_eq!(
        (n.volumes, n.migrations, n.policies, n.mappings, n.gates),
        (1, 1, 1, 1, 1)
    );
    let v = store.get_volume("vol_0123456789abcdef").unwrap();
    assert_eq!(
        (v.state.as_str(), v.host.as_deref()),
        ("active", Some("80000000"))
    );
    let m = store.get_migration("mig_00112233445566aa").unwrap();
    assert_eq!((m.phase.as_str(), m.finished), ("done", true));
    assert_eq!(m.detail["stats"]["downtime_ms"], 42);
    let p = store.get_policy("db").unwrap().unwrap();
    assert_eq!(p.detail["max_unavailable"], 2);
    assert_eq!(
        p.detail["webhook_secret"], "s3cret-s3cret-s3cret",
        "the secret is kept"
    );
    let maps = store.list_bridge_mappings(Some(net)).unwrap();
    assert_eq!(
        (maps[0].old.as_str(), maps[0].new.as_str()),
        (old.as_str(), new.as_str())
    );
    assert_eq!(store.bridge_gates_off().unwrap().len(), 1);

    // Once: a second start copies nothing (and a record changed since is not overwritten).
    let again = ferry_core::legacy::import(&ctx).unwrap();
    assert_eq!(again, Default::default());
}

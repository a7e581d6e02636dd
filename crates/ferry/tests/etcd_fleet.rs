//! A dev fleet on etcd (`ferry dev --store etcd://...`) does what one on SQLite does: machines
//! with a sized volume start, talk by name, and migrate with their data; DNS follows.

mod support;

use serde_json::json;
use std::time::Duration;
use support::*;

#[test]
fn a_dev_fleet_on_etcd_runs_and_moves_machines() {
    let etcd = ferry_store::testing::EtcdCluster::start(1).unwrap();
    let url = etcd.url("ferry-dev-test");
    let dev = Dev::start_with("etcd", 2, &["--store", &url]);
    let hosts = dev.hosts();
    dev.ok("POST", "/v1/apps", json!({"app_name": "db"}));
    dev.ok(
        "POST",
        "/v1/apps/db/policy",
        json!({"min_healthy_time": "1s", "healthy_deadline": "1m"}),
    );
    let vol = new_volume(&dev, 16);
    let m = dev.machine(
        "db",
        &hosts[0],
        json!({
            "init": {"cmd": ["sh", "-c", "echo kept > /data/f; exec sleep infinity"]},
            "mounts": [{"volume": vol, "path": "/data"}],
        }),
    );
    assert_eq!(m["state"], "started", "{m}");
    let id = m["id"].as_str().unwrap();
    let name = format!("{id}.vm.db.internal");
    assert!(
        eventually(Duration::from_secs(10), || dev
            .aaaa(&name)
            .iter()
            .any(|a| a.to_string() == m["private_ip"].as_str().unwrap())),
        "DNS names the machine"
    );

    let mig = migrate(&dev, &m, json!({"to": hosts[1]}));
    let done = wait_migration(&dev, &mig, Duration::from_secs(120));
    assert_eq!(done["phase"], "done", "{done}");
    let now = dev.get_machine(&m);
    assert_eq!(now["host"], hosts[1].as_str());
    assert_ne!(now["private_ip"], m["private_ip"]);
    let out = dev.exec(&now, &["cat", "/data/f"]);
    assert_eq!(out["stdout"], "kept\n", "{out}");
    let new_ip = now["private_ip"].as_str().unwrap().to_owned();
    assert!(
        eventually(Duration::from_secs(10), || dev
            .aaaa(&name)
            .iter()
            .any(|a| a.to_string() == new_ip)),
        "DNS follows the move"
    );
}

//! Size-limited volumes on a real `ferry dev` fleet: the size holds inside the machine (ENOSPC)
//! and on the host (the image is sparse and never grows past it), volumes live on the agents'
//! hosts (the server keeps none), and a fork by migration has the same size and bytes.

mod support;

use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;
use support::*;

fn volume_view(dev: &Dev, id: &str) -> Value {
    let vols = dev.call("GET", "/v1/volumes", None).1;
    vols.as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("volume {id} not listed: {vols}"))
}

/// Total bytes of the file system at /data as the machine sees it.
fn fs_bytes(dev: &Dev, m: &Value) -> u64 {
    let r = dev.exec(m, &["stat", "-f", "-c", "%b %S", "/data"]);
    assert_eq!(r["exit_code"], 0, "{r}");
    let out = r["stdout"].as_str().unwrap();
    let mut it = out.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    it.next().unwrap() * it.next().unwrap()
}

#[test]
fn a_volume_holds_its_size_inside_the_machine_and_on_the_host_and_its_fork_too() {
    let dev = Dev::start("vols", 2);
    let hosts = dev.hosts();
    let vol = new_volume(&dev, 64);
    // Not placed yet: nothing exists anywhere, and the server keeps no volume data.
    assert_eq!(volume_view(&dev, &vol)["host_dir"], "");
    let m = dev.machine(
        "vols",
        &hosts[0],
        json!({"init": {"cmd": ["sleep", "inf"]}, "mounts": [{"volume": vol, "path": "/data"}]}),
    );
    let v = volume_view(&dev, &vol);
    assert_eq!(v["host"].as_str(), Some(hosts[0].as_str()), "{v}");
    let dir = v["host_dir"].as_str().unwrap().to_owned();
    assert!(
        dir.contains(&format!("/hosts/{}/", hosts[0])),
        "kept by its host's agent: {v}"
    );
    // A fresh volume is empty (no lost+found).
    let r = dev.exec(&m, &["ls", "-A", "/data"]);
    assert_eq!(r["stdout"], "", "{r}");
    let total = fs_bytes(&dev, &m);
    assert!(
        (48 << 20..=64 << 20).contains(&total),
        "the file system is about 64 MiB: {total}"
    );

    // 100 MiB into 64: the write fails inside the machine.
    let r = dev.exec(
        &m,
        &[
            "sh",
            "-c",
            "dd if=/dev/urandom of=/data/big bs=1M count=100 2>&1; echo rc=$?",
        ],
    );
    let out = r["stdout"].as_str().unwrap();
    assert!(out.contains("No space left on device"), "{r}");
    assert!(!out.contains("rc=0"), "{r}");
    // The host paid at most the volume's size: a sparse image that cannot grow past it.
    let img = std::fs::metadata(format!("{dir}.img")).unwrap();
    assert_eq!(img.len(), 64 << 20);
    assert!(
        img.blocks() * 512 <= 64 << 20,
        "{} bytes allocated",
        img.blocks() * 512
    );
    let r = dev.exec(
        &m,
        &["sh", "-c", "rm /data/big; echo kept > /data/note; sync"],
    );
    assert_eq!(r["exit_code"], 0, "{r}");

    // The fork has the same size, on the destination's agent, with the bytes.
    dev.ok(
        "POST",
        "/v1/apps/vols/policy",
        json!({"min_healthy_time": "1s"}),
    );
    let mig = migrate(&dev, &m, json!({}));
    let done = wait_migration(&dev, &mig, Duration::from_secs(120));
    assert_eq!(done["phase"], "done", "{done}");
    let moved = dev.get_machine(&m);
    let new_vol = moved["config"]["mounts"][0]["volume"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_vol, vol);
    let nv = volume_view(&dev, &new_vol);
    assert_eq!(nv["size_mb"], 64, "{nv}");
    assert_eq!(nv["host"], moved["host"], "{nv}");
    let r = dev.exec(&moved, &["cat", "/data/note"]);
    assert_eq!(r["stdout"], "kept\n", "{r}");
    assert_eq!(fs_bytes(&dev, &moved), total);
    let r = dev.exec(
        &moved,
        &[
            "sh",
            "-c",
            "dd if=/dev/urandom of=/data/big bs=1M count=100 2>&1; echo rc=$?",
        ],
    );
    assert!(
        r["stdout"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{r}"
    );
}

#[test]
fn a_volume_of_another_host_takes_its_machine_there_and_bad_sizes_are_refused() {
    let dev = Dev::start("volplace", 2);
    let hosts = dev.hosts();
    for bad in [
        json!({"size_mb": 0}),
        json!({"size_mb": 4}),
        json!({"size_mb": 2_000_000}),
    ] {
        let (s, v) = dev.call("POST", "/v1/volumes", Some(&bad.to_string()));
        assert_eq!(s, 400, "{bad}: {v}");
        assert_eq!(v["code"], "invalid_argument");
    }
    let vol = new_volume(&dev, 16);
    let cfg =
        json!({"init": {"cmd": ["sleep", "inf"]}, "mounts": [{"volume": vol, "path": "/data"}]});
    let a = dev.machine("volplace", &hosts[1], cfg.clone());
    dev.ok(
        "POST",
        &format!(
            "/v1/apps/volplace/machines/{}/stop",
            a["id"].as_str().unwrap()
        ),
        json!({}),
    );
    // Asked for the other host: refused, nothing created.
    let before = dev.call("GET", "/v1/apps/volplace/machines", None).1;
    let (s, v) = dev.call(
        "POST",
        "/v1/apps/volplace/machines",
        Some(&json!({"host": hosts[0], "config": cfg}).to_string()),
    );
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["code"], "volume_elsewhere");
    assert_eq!(
        dev.call("GET", "/v1/apps/volplace/machines", None).1,
        before
    );
    // Not asked: placed with its volume.
    let b = dev.ok("POST", "/v1/apps/volplace/machines", json!({"config": cfg}));
    assert_eq!(b["host"].as_str(), Some(hosts[1].as_str()));
}

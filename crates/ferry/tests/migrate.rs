//! Migration end to end on a real `ferry dev` fleet: the machine moves with its volume (bytes
//! checked by hash inside the machine), DNS and the bridge follow, the notice and its signed
//! webhook go out, policies hold, a machine that is not healthy in time comes back, a drain
//! empties a host, and a crash of the server or an agent at every step ends in a completed or
//! rolled-back migration with one running copy and every byte in place.

mod support;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;
use support::*;

fn id(m: &Value) -> &str {
    m["id"].as_str().unwrap()
}

/// A web server whose volume is written only by the test (through exec), so its bytes before
/// and after a migration must match exactly.
fn web_config(vol: &str) -> Value {
    json!({"init": {"cmd": ["python3", "-c", WEB_PY]},
           "mounts": [{"volume": vol, "path": "/data"}],
           "checks": {"web": {"type": "tcp", "port": 8080, "kind": "readiness", "interval": "200ms", "timeout": "1s"}}})
}

/// Writes `mb` MiB of random bytes and a few small files; returns the tree's digest as the
/// machine sees it.
fn fill(dev: &Dev, m: &Value, mb: u64) -> String {
    let py = format!(
        "import os\nos.makedirs('/data/sub', exist_ok=True)\n\
         open('/data/blob','wb').write(os.urandom({mb} << 20))\n\
         open('/data/sub/small','w').write('x' * 1000)\n\
         open('/data/empty','w').close()\nos.chmod('/data/sub/small', 0o600)"
    );
    let r = dev.exec(m, &["python3", "-c", &py]);
    assert_eq!(r["exit_code"], 0, "{r}");
    digest(dev, m)
}

fn digest(dev: &Dev, m: &Value) -> String {
    let r = dev.exec(
        m,
        &[
            "sh",
            "-c",
            "cd /data && find . -type f | sort | xargs sha256sum && find . | sort | xargs stat -c '%n %a %s'",
        ],
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    r["stdout"].as_str().unwrap().to_owned()
}

/// How many agents run this machine right now (asked directly, not the store).
fn running_copies(dev: &Dev, machine: &str) -> usize {
    let hosts = dev.call("GET", "/v1/hosts", None).1;
    let http = dev.agent_http();
    hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let ep = h["endpoint"].as_str().unwrap();
            let list: Value = http
                .get(format!("{ep}/v1/machines"))
                .send()
                .unwrap()
                .json()
                .unwrap();
            list.as_array()
                .unwrap()
                .iter()
                .filter(|l| l["id"] == machine && l["running"] == true)
                .count()
        })
        .sum()
}

/// Processes of the machine's `ferry init` on this box, whatever any agent knows: a running
/// machine has two (the shim and init, a fork of it); a copy set up and held (staged) that
/// nobody released would add two more.
fn init_processes(machine: &str) -> usize {
    let want = format!("/{machine}/spec.json");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let c = String::from_utf8_lossy(c);
            c.split('\0').any(|a| a == "init") && c.contains(&want)
        })
        .count()
}

fn events(dev: &Dev, m: &Value) -> Vec<Value> {
    let full = dev.get_machine(m);
    let mut e = full["events"].as_array().unwrap().clone();
    e.reverse(); // oldest first
    e
}

fn event_time(ev: &[Value], kind: &str, status: &str) -> Option<i64> {
    ev.iter()
        .find(|e| e["type"] == kind && e["status"] == status)
        .and_then(|e| e["timestamp"].as_i64())
}

/// A one-shot HTTP receiver for the webhook: returns (headers, body) of the first request.
fn webhook_receiver() -> (String, std::thread::JoinHandle<(String, String)>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut headers = String::new();
        let mut len = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            headers.push_str(&line);
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let mut s = s;
        s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
        (headers, String::from_utf8(body).unwrap())
    });
    (url, h)
}

#[test]
fn migrate_moves_machine_volume_dns_and_bridge_with_signed_notice() {
    let dev = Dev::start("mig", 3);
    let hosts = dev.hosts();
    let vol = new_volume(&dev, 64);
    let m = dev.machine("db", &hosts[0], web_config(&vol));
    let client = dev.machine(
        "dbclient",
        &hosts[2],
        json!({"init": {"cmd": ["sleep", "inf"]}}),
    );
    let before = fill(&dev, &m, 24);
    let old_ip = m["private_ip"].as_str().unwrap().to_owned();

    let secret = "a-webhook-secret-of-some-length";
    let (url, hook) = webhook_receiver();
    dev.ok(
        "POST",
        "/v1/apps/db/policy",
        json!({"notice_period": "1s", "webhook_url": url, "webhook_secret": secret}),
    );

    // The CLI: progress on stderr, the summary, exit 0.
    let out = dev.cli(&["machine", "migrate", id(&m), "--to", &hosts[1]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("phase      done"), "{text}");

    let after = dev.get_machine(&m);
    assert_eq!(after["id"], m["id"]);
    assert_eq!(after["state"], "started");
    assert_eq!(after["host"].as_str(), Some(hosts[1].as_str()));
    assert_ne!(after["instance_id"], m["instance_id"]);
    let new_ip = after["private_ip"].as_str().unwrap().to_owned();
    assert_ne!(new_ip, old_ip);
    let prev = &after["previous_instances"][0];
    assert_eq!(prev["state"], "migrated");
    assert_eq!(prev["instance_id"], m["instance_id"]);
    assert_eq!(prev["private_ip"].as_str(), Some(old_ip.as_str()));
    let ev = events(&dev, &m);
    assert!(
        ev.iter()
            .any(|e| e["type"] == "launch" && e["request"]["migrated"] == true),
        "{ev:?}"
    );

    // Every byte, mode and size, as the moved machine sees its volume.
    assert_eq!(digest(&dev, &m), before);
    assert_eq!(running_copies(&dev, id(&m)), 1);
    // Its start on the destination released what the destination had set up and held while
    // the volume copied (the agents' start phases, as the server's metrics count them), and
    // it saw the final round's bytes (the digest above).
    let counts = dev.start_phase_counts();
    assert!(
        counts
            .iter()
            .any(|l| l.starts_with("ferry_machine_start_phase_seconds_count{phase=\"release\"} 1")),
        "no start released a staged machine: {counts:?}"
    );

    // DNS answers the new address; the old one still works through the bridge.
    assert_eq!(dev.dig("db.internal", "AAAA"), new_ip);
    let r = dev.exec(&client, &["python3", "-c", &fetch_py(&old_ip)]);
    assert_eq!(r["exit_code"], 0, "{r}");
    assert!(r["stdout"].as_str().unwrap().contains(id(&m)));
    let maps = dev.call("GET", "/v1/bridge", None).1;
    assert!(
        maps.as_array()
            .unwrap()
            .iter()
            .any(|x| x["old"] == old_ip.as_str() && x["new"] == new_ip.as_str()),
        "{maps}"
    );

    // The source volume is kept, pending destruction; the copy is active on the destination.
    let vols = dev.call("GET", "/v1/volumes", None).1;
    let src = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == vol.as_str())
        .unwrap();
    assert_eq!(src["state"], "pending_destroy");
    assert!(src["destroy_after"].is_string());
    let dst = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["forked_from"] == vol.as_str())
        .unwrap();
    assert_eq!(dst["state"], "active");
    assert_eq!(dst["host"].as_str(), Some(hosts[1].as_str()));
    let list = dev.cli(&["volume", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("pending_destroy"));

    // The notice: an event, then the stop no sooner than the notice period; the webhook body is
    // signed with the app's secret.
    let notice = event_time(&ev, "migrate", "notice").expect("notice event");
    let stopping = event_time(&ev, "migrate", "stopping").expect("stopping event");
    assert!(
        stopping - notice >= 1000,
        "stop {stopping} came < 1 s after notice {notice}"
    );
    let (headers, body) = hook.join().unwrap();
    let payload: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(payload["event"], "machine.migrate.notice");
    assert_eq!(payload["machine_id"], m["id"]);
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let want = format!(
        "x-ferry-signature: sha256={}",
        hex::encode(mac.finalize().into_bytes())
    );
    assert!(
        headers.to_ascii_lowercase().contains(&want),
        "headers {headers} lack {want}"
    );

    // The old address is never handed out again: new machines on the source host get others.
    for _ in 0..3 {
        let n = dev.machine(
            "filler",
            &hosts[0],
            json!({"init": {"cmd": ["sleep", "inf"]}}),
        );
        assert_ne!(n["private_ip"].as_str(), Some(old_ip.as_str()));
    }
}

#[test]
fn migrations_refuse_bad_input_and_change_nothing() {
    let dev = Dev::start("migbad", 2);
    let hosts = dev.hosts();
    let m = dev.machine("bad", &hosts[0], json!({"init": {"cmd": ["sleep", "inf"]}}));
    let path = format!("/v1/apps/bad/machines/{}/migrate", id(&m));
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "same host",
            path.clone(),
            Some(json!({"to": hosts[0]}).to_string()),
            409,
            "same_host",
        ),
        (
            "unknown host",
            path.clone(),
            Some(json!({"to": "8000ffff"}).to_string()),
            404,
            "not_found",
        ),
        (
            "not a host",
            path.clone(),
            Some(json!({"to": "zz"}).to_string()),
            400,
            "invalid_argument",
        ),
        (
            "unknown field",
            path.clone(),
            Some(json!({"too": "x"}).to_string()),
            400,
            "invalid_argument",
        ),
        (
            "garbage",
            path.clone(),
            Some("{".into()),
            400,
            "invalid_argument",
        ),
        (
            "other app",
            format!("/v1/apps/nope/machines/{}/migrate", id(&m)),
            None,
            404,
            "not_found",
        ),
        (
            "bad id",
            "/v1/apps/bad/machines/xyz/migrate".into(),
            None,
            404,
            "not_found",
        ),
        (
            "bad migration id",
            "/v1/migrations/mig_zz".into(),
            None,
            400,
            "invalid_argument",
        ),
        (
            "policy duration",
            "/v1/apps/bad/policy".into(),
            Some(json!({"min_healthy_time": "soon"}).to_string()),
            400,
            "invalid_argument",
        ),
        (
            "policy url",
            "/v1/apps/bad/policy".into(),
            Some(json!({"webhook_url": "ftp://x"}).to_string()),
            400,
            "invalid_argument",
        ),
        (
            "policy secret",
            "/v1/apps/bad/policy".into(),
            Some(json!({"webhook_secret": "short"}).to_string()),
            400,
            "invalid_argument",
        ),
        (
            "policy zero",
            "/v1/apps/bad/policy".into(),
            Some(json!({"max_unavailable": 0}).to_string()),
            400,
            "invalid_argument",
        ),
        (
            "policy order",
            "/v1/apps/bad/policy".into(),
            Some(json!({"min_healthy_time": "2m", "healthy_deadline": "1m"}).to_string()),
            400,
            "invalid_argument",
        ),
        (
            "drain unknown",
            "/v1/hosts/8000ffff/drain".into(),
            None,
            404,
            "not_found",
        ),
    ];
    let policy_before = dev.call("GET", "/v1/apps/bad/policy", None).1;
    for (what, p, body, status, code) in cases {
        let method = if p.starts_with("/v1/migrations") {
            "GET"
        } else {
            "POST"
        };
        let (s, v) = dev.call(method, &p, body.as_deref());
        assert_eq!(s, status, "{what}: {v}");
        assert_eq!(v["code"], code, "{what}: {v}");
    }
    // A lease held by someone else: refused (a 1 s lease, so it is gone for the CLI case).
    dev.ok(
        "POST",
        &format!("/v1/apps/bad/machines/{}/lease", id(&m)),
        json!({"ttl": 1}),
    );
    let (s, v) = dev.call("POST", &path, None);
    assert_eq!((s, v["code"].as_str()), (409, Some("lease_held")), "{v}");
    std::thread::sleep(Duration::from_millis(1200));
    // Nothing moved, nothing recorded.
    let after = dev.get_machine(&m);
    assert_eq!(after["host"], m["host"]);
    assert_eq!(after["instance_id"], m["instance_id"]);
    assert_eq!(after["state"], "started");
    assert_eq!(dev.call("GET", "/v1/migrations", None).1, json!([]));
    assert_eq!(
        dev.call("GET", "/v1/apps/bad/policy", None).1,
        policy_before
    );
    // The CLI says so in one line and exits non-zero.
    let out = dev.cli(&["machine", "migrate", id(&m), "--to", &hosts[0]]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("same_host"));
}

#[test]
fn one_migration_per_network_at_a_time_other_networks_in_parallel() {
    let dev = Dev::start("miglock", 2);
    let hosts = dev.hosts();
    let sleeper = json!({"init": {"cmd": ["sleep", "inf"]}});
    let a1 = dev.machine("la", &hosts[0], sleeper.clone());
    let a2 = dev.machine("lb", &hosts[0], sleeper.clone()); // same org (personal)
    dev.ok(
        "POST",
        "/v1/apps",
        json!({"app_name": "lc", "org_slug": "otherorg"}),
    );
    let c = dev.ok(
        "POST",
        "/v1/apps/lc/machines",
        json!({"host": hosts[0], "config": sleeper}),
    );
    // A long notice keeps the first migration of the network busy for 2 s.
    dev.ok("POST", "/v1/apps/la/policy", json!({"notice_period": "2s"}));
    dev.ok("POST", "/v1/apps/lc/policy", json!({"notice_period": "2s"}));
    let m1 = migrate(&dev, &a1, json!({}));
    std::thread::sleep(Duration::from_millis(200));
    let m2 = migrate(&dev, &a2, json!({}));
    let m3 = migrate(&dev, &c, json!({}));
    for m in [&m1, &m2, &m3] {
        assert_eq!(
            wait_migration(&dev, m, Duration::from_secs(60))["phase"],
            "done"
        );
    }
    let (e1, e2, e3) = (events(&dev, &a1), events(&dev, &a2), events(&dev, &c));
    let done1 = event_time(&e1, "migrate", "done").unwrap();
    // Same network: the second did not even send its notice before the first was done.
    assert!(event_time(&e2, "migrate", "notice").unwrap() >= done1);
    // Another network: it ran meanwhile.
    assert!(event_time(&e3, "migrate", "notice").unwrap() < done1);
}

#[test]
fn not_healthy_by_the_deadline_rolls_back_without_losing_a_byte() {
    let dev = Dev::start("migrb", 2);
    let hosts = dev.hosts();
    let vol = new_volume(&dev, 16);
    // Appends its address to /data/ips at every start; ready only while the last line equals
    // /data/expect (which the test sets to the first address): so it is never ready elsewhere.
    let cfg = json!({"init": {"cmd": ["sh", "-c", "echo $FERRY_PRIVATE_IP >> /data/ips; exec python3 -c \"$WEB\""]},
        "env": {"WEB": WEB_PY},
        "mounts": [{"volume": vol, "path": "/data"}],
        "checks": {"home": {"type": "exec", "command": ["sh", "-c", "test \"$(tail -n1 /data/ips)\" = \"$(cat /data/expect)\""],
                             "kind": "readiness", "interval": "200ms", "timeout": "1s"}}});
    let m = dev.machine("rb", &hosts[0], cfg);
    let old_ip = m["private_ip"].as_str().unwrap().to_owned();
    let r = dev.exec(&m, &["sh", "-c", &format!("echo {old_ip} > /data/expect")]);
    assert_eq!(r["exit_code"], 0);
    // min_healthy_time: a check that passes once by luck (before the start script appended the
    // new address) must not count.
    dev.ok(
        "POST",
        "/v1/apps/rb/policy",
        json!({"healthy_deadline": "4s", "min_healthy_time": "1s"}),
    );
    let mig = migrate(&dev, &m, json!({}));
    let v = wait_migration(&dev, &mig, Duration::from_secs(90));
    assert_eq!(v["phase"], "rolled_back", "{v}");
    assert!(v["error"].as_str().unwrap().contains("healthy"), "{v}");
    let new_ip = v["new_ip"].as_str().unwrap().to_owned();

    let after = dev.get_machine(&m);
    assert_eq!(after["host"], m["host"]);
    assert_eq!(after["private_ip"].as_str(), Some(old_ip.as_str()));
    assert_eq!(after["state"], "started");
    assert_eq!(running_copies(&dev, id(&m)), 1);
    // What the destination instance wrote came back with it: old, new, old.
    let ips = dev.exec(&m, &["cat", "/data/ips"]);
    let lines: Vec<&str> = ips["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(
        lines,
        vec![old_ip.as_str(), new_ip.as_str(), old_ip.as_str()]
    );
    // The bridge no longer maps the (current again) old address; DNS names the old one.
    let maps = dev.call("GET", "/v1/bridge", None).1;
    assert!(
        !maps
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["old"] == old_ip.as_str()),
        "{maps}"
    );
    assert_eq!(dev.dig("rb.internal", "AAAA"), old_ip);
    assert_eq!(after["previous_instances"][1]["state"], "rolled_back");
    let vols = dev.call("GET", "/v1/volumes", None).1;
    let src = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == vol.as_str())
        .unwrap();
    assert_eq!(src["state"], "active");
}

#[test]
fn a_machine_stopped_on_purpose_does_not_block_its_apps_moves() {
    let dev = Dev::start("migstp", 2);
    let hosts = dev.hosts();
    let sleeper = json!({"init": {"cmd": ["sleep", "inf"]}});
    let up = dev.machine("stp", &hosts[0], sleeper.clone());
    let idle = dev.machine("stp", &hosts[0], sleeper);
    dev.ok(
        "POST",
        &format!("/v1/apps/stp/machines/{}/stop", id(&idle)),
        json!({}),
    );
    dev.ok(
        "POST",
        "/v1/apps/stp/policy",
        json!({"max_unavailable": 1, "healthy_deadline": "5s", "min_healthy_time": "1s"}),
    );
    // The idle machine is not an outage: the running one moves.
    let mig = migrate(&dev, &up, json!({}));
    let v = wait_migration(&dev, &mig, Duration::from_secs(60));
    assert_eq!(v["phase"], "done", "{v}");
    let now = dev.get_machine(&up);
    assert_eq!(now["state"], "started");
    assert_ne!(now["host"], up["host"]);
    // And so does the idle one, which stays stopped and reports no downtime it never had.
    let mig = migrate(&dev, &idle, json!({}));
    let v = wait_migration(&dev, &mig, Duration::from_secs(60));
    assert_eq!(v["phase"], "done", "{v}");
    assert!(v["stats"]["downtime_ms"].is_null(), "{v}");
    assert!(v["stats"]["stopped_at_ms"].is_null(), "{v}");
    let now = dev.get_machine(&idle);
    assert_eq!(now["state"], "stopped");
    assert_ne!(now["host"], idle["host"]);
    assert_ne!(now["private_ip"], idle["private_ip"]);
}

#[test]
fn a_crashed_machine_still_counts_against_max_unavailable() {
    let dev = Dev::start("migmu", 2);
    let hosts = dev.hosts();
    let sleeper = json!({"init": {"cmd": ["sleep", "inf"]}, "restart": {"policy": "no"}});
    let up = dev.machine("mu", &hosts[0], sleeper.clone());
    let crashed = dev.machine("mu", &hosts[0], sleeper);
    // It dies on its own (SIGTERM from inside, not a stop call): it should be running.
    // (The exec's own shell dies with the machine's pid namespace: its exit code says nothing.)
    dev.exec(&crashed, &["sh", "-c", "kill -TERM 1"]);
    assert!(
        eventually(Duration::from_secs(20), || dev.get_machine(&crashed)
            ["state"]
            == "stopped"),
        "the machine did not exit"
    );
    dev.ok(
        "POST",
        "/v1/apps/mu/policy",
        json!({"max_unavailable": 1, "healthy_deadline": "2s", "min_healthy_time": "1s"}),
    );
    let mig = migrate(&dev, &up, json!({}));
    let v = wait_migration(&dev, &mig, Duration::from_secs(60));
    assert_eq!(v["phase"], "rolled_back", "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("max_unavailable"), "{v}");
    assert!(
        err.contains(id(&crashed)),
        "the note names the machine: {v}"
    );
    let now = dev.get_machine(&up);
    assert_eq!(
        (now["state"].as_str(), now["host"].as_str()),
        (Some("started"), up["host"].as_str())
    );
    assert_eq!(
        now["instance_id"], up["instance_id"],
        "it was never stopped"
    );
    // Two may be down at once: it moves.
    dev.ok("POST", "/v1/apps/mu/policy", json!({"max_unavailable": 2}));
    let mig = migrate(&dev, &up, json!({}));
    assert_eq!(
        wait_migration(&dev, &mig, Duration::from_secs(60))["phase"],
        "done"
    );
}

#[test]
fn drain_moves_running_and_stopped_machines_and_the_stopped_stay_stopped() {
    let dev = Dev::start("migdrs", 2);
    let hosts = dev.hosts();
    let sleeper = json!({"init": {"cmd": ["sleep", "inf"]}});
    let up = dev.machine("drs", &hosts[0], sleeper.clone());
    let idle = dev.machine("drs", &hosts[0], sleeper);
    dev.ok(
        "POST",
        &format!("/v1/apps/drs/machines/{}/stop", id(&idle)),
        json!({}),
    );
    dev.ok(
        "POST",
        "/v1/apps/drs/policy",
        json!({"max_unavailable": 1, "healthy_deadline": "5s", "min_healthy_time": "1s"}),
    );
    let out = dev.cli(&["host", "drain", &hosts[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let migs = dev.call("GET", "/v1/migrations", None).1;
    let migs = migs.as_array().unwrap();
    assert_eq!(migs.len(), 2, "{migs:?}");
    assert!(migs.iter().all(|m| m["phase"] == "done"), "{migs:?}");
    for (m, state) in [(&up, "started"), (&idle, "stopped")] {
        let now = dev.get_machine(m);
        assert_eq!(now["state"], state, "{now}");
        assert_eq!(now["host"].as_str(), Some(hosts[1].as_str()), "{now}");
    }
}

#[test]
fn drain_moves_every_machine_off_and_keeps_the_app_healthy() {
    let dev = Dev::start("migdrain", 3);
    let hosts = dev.hosts();
    let vol = new_volume(&dev, 16);
    let a = dev.machine("dr", &hosts[0], web_config(&vol));
    let b = dev.machine(
        "dr",
        &hosts[0],
        json!({"init": {"cmd": ["python3", "-c", WEB_PY]},
               "checks": {"web": {"type": "tcp", "port": 8080, "kind": "readiness", "interval": "200ms"}}}),
    );
    let digest_a = fill(&dev, &a, 4);
    dev.ok(
        "POST",
        "/v1/apps/dr/policy",
        json!({"min_healthy_time": "1s", "volume_retention": "1s"}),
    );
    let src_dir = dev.call("GET", "/v1/volumes", None).1[0]["host_dir"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(std::path::Path::new(&src_dir).join("blob").exists());
    let out = dev.cli(&["host", "drain", &hosts[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hs = dev.call("GET", "/v1/hosts", None).1;
    let h0 = hs
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == hosts[0].as_str())
        .unwrap();
    assert_eq!(h0["cordoned"], true);
    assert_eq!(h0["machines"], 0);
    for m in [&a, &b] {
        let now = dev.get_machine(m);
        assert_eq!(now["state"], "started");
        assert_ne!(now["host"].as_str(), Some(hosts[0].as_str()));
    }
    assert_eq!(digest(&dev, &a), digest_a);
    // One at a time: the second stopped only after the first had been healthy for 1 s and was done.
    let (ea, eb) = (events(&dev, &a), events(&dev, &b));
    let (da, db) = (
        event_time(&ea, "migrate", "done").unwrap(),
        event_time(&eb, "migrate", "done").unwrap(),
    );
    let (first_done, second) = if da < db { (da, &eb) } else { (db, &ea) };
    assert!(event_time(second, "migrate", "stopping").unwrap() >= first_done);
    // The source volume outlived the move by its retention (1 s here), then went.
    assert!(
        eventually(Duration::from_secs(10), || {
            let vols = dev.call("GET", "/v1/volumes", None).1;
            vols.as_array()
                .unwrap()
                .iter()
                .any(|v| v["id"] == vol.as_str() && v["state"] == "destroyed")
        }),
        "the source volume was not destroyed after its retention"
    );
    assert!(!std::path::Path::new(&src_dir).exists());
    // A cordoned host gets no new machines.
    let n = dev.ok(
        "POST",
        "/v1/apps/dr/machines",
        json!({"config": {"init": {"cmd": ["sleep", "inf"]}}}),
    );
    assert_ne!(n["host"].as_str(), Some(hosts[0].as_str()));
}

#[test]
fn corrupted_and_missing_chunks_are_detected_and_sent_again() {
    let dev = Dev::start_env(
        "migflt",
        2,
        &[],
        &[("FERRY_TEST_VOLUME_FAULT", "corrupt=3,drop=2")],
    );
    let hosts = dev.hosts();
    let vol = new_volume(&dev, 32);
    let m = dev.machine("flt", &hosts[0], web_config(&vol));
    let before = fill(&dev, &m, 8);
    let mig = migrate(&dev, &m, json!({}));
    let v = wait_migration(&dev, &mig, Duration::from_secs(90));
    assert_eq!(v["phase"], "done", "{v}");
    assert!(v["stats"]["chunks_resent"].as_u64().unwrap() >= 5, "{v}");
    assert_eq!(digest(&dev, &m), before);
}

/// Kills the server (the `ferry dev` process) or an agent with SIGKILL at `step`, brings it
/// back, and checks the migration ends (done or rolled back) with one running copy, the
/// machine reachable under its name, and the volume's bytes intact.
/// Crashes the server or an agent at `step` of a migration and checks the invariants after it;
/// returns the migration's last phase (`done` or `rolled_back`).
fn crash_at(step: &str, server: bool) -> String {
    let marker = std::env::temp_dir().join(format!(
        "ferry-crash-{}-{step}-{}",
        std::process::id(),
        rand_suffix()
    ));
    // Disarmed while the fleet and the machine are set up; armed just before the migration.
    std::fs::write(&marker, "").unwrap();
    let mut dev = Dev::start_env(
        "crash",
        2,
        &[],
        &[
            ("FERRY_CRASH_AT", step),
            ("FERRY_CRASH_MARKER", marker.to_str().unwrap()),
        ],
    );
    let hosts = dev.hosts();
    let vol = new_volume(&dev, 64);
    let m = dev.machine("cr", &hosts[0], web_config(&vol));
    let before = fill(&dev, &m, 24);
    std::fs::remove_file(&marker).unwrap();
    let mig = migrate(&dev, &m, json!({"to": hosts[1]}));
    if server {
        assert!(
            dev.wait_exit(Duration::from_secs(60)),
            "the server did not crash at {step}"
        );
        assert!(marker.exists());
        dev.boot(); // the same state directory: it takes the fleet over and resumes
    }
    let v = wait_migration(&dev, &mig, Duration::from_secs(120));
    // The hook fired (in the server or in an agent, which `ferry dev` restarted).
    let fired = marker.exists();
    let _ = std::fs::remove_file(&marker);
    assert!(fired, "{step}: the crash hook never fired");
    assert!(
        v["phase"] == "done" || v["phase"] == "rolled_back",
        "{step}: {v}"
    );
    let now = dev.get_machine(&m);
    assert_eq!(now["state"], "started", "{step}: {now}");
    assert!(
        eventually(Duration::from_secs(10), || running_copies(&dev, id(&m))
            == 1),
        "{step}: not exactly one running copy"
    );
    assert!(
        eventually(Duration::from_secs(10), || init_processes(id(&m)) == 2),
        "{step}: {} ferry init processes for the machine, not 2",
        init_processes(id(&m))
    );
    assert_eq!(digest(&dev, &m), before, "{step}: volume bytes differ");
    // Whatever the outcome, one namespace is left for the machine: the one it runs in (the
    // destination's, prepared during the copy, goes with a rollback; the source's with a move).
    let prefix = format!("ferry-{}-m", dev.name);
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_dir("/run/netns")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .count()
            == 1),
        "{step}: not exactly one machine namespace"
    );
    let ip = now["private_ip"].as_str().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || dev.dig("cr.internal", "AAAA")
            == ip),
        "{step}: DNS does not name the current address"
    );
    v["phase"].as_str().unwrap_or_default().to_owned()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[test]
fn crash_server_after_lock() {
    crash_at("locked", true);
}
#[test]
fn crash_server_after_notice() {
    crash_at("noticed", true);
}
#[test]
fn crash_server_during_precopy() {
    crash_at("precopy-round", true);
}
#[test]
fn crash_server_after_precopy() {
    crash_at("precopied", true);
}
#[test]
fn crash_server_after_stop() {
    crash_at("stopped", true);
}
#[test]
fn crash_server_after_final_sync() {
    crash_at("synced", true);
}
#[test]
fn crash_server_after_switch() {
    crash_at("switched", true);
}
#[test]
fn crash_server_after_start() {
    crash_at("started", true);
}
#[test]
fn crash_server_after_mapping() {
    crash_at("mapped", true);
}
#[test]
fn crash_source_agent_while_sending() {
    crash_at("agent-send", false);
}
#[test]
fn crash_destination_agent_after_staging() {
    // The restarted agent finds a machine set up and held that it has no record of starting:
    // it removes it, and the start after the switch sets the machine up again (an agent that
    // took the held copy for a running machine would never start it: a rollback).
    assert_eq!(crash_at("agent-staged", false), "done");
}
#[test]
fn crash_destination_agent_while_receiving() {
    crash_at("agent-receive", false);
}
#[test]
fn crash_source_agent_when_asked_to_stop() {
    crash_at("agent-stop", false);
}
#[test]
fn crash_source_agent_after_forgetting_the_machine() {
    crash_at("agent-destroy", false);
}
#[test]
fn crash_destination_agent_after_starting_the_machine() {
    crash_at("agent-start", false);
}

#[test]
fn a_machine_that_exits_right_after_its_move_is_moved_back_with_its_data() {
    let dev = Dev::start("migcrash", 2);
    let hosts = dev.hosts();
    let vol = new_volume(&dev, 16);
    // Remembers its first address on its volume and exits 3 anywhere else: it runs on its
    // first host only.
    let sh = "f=/data/home; [ -e $f ] || echo $FERRY_PRIVATE_IP > $f; \
              [ \"$(cat $f)\" = \"$FERRY_PRIVATE_IP\" ] || exit 3; exec sleep inf";
    let m = dev.machine(
        "crash",
        &hosts[0],
        json!({"init": {"cmd": ["sh", "-c", sh]}, "restart": {"policy": "no"},
               "mounts": [{"volume": vol, "path": "/data"}]}),
    );
    assert!(
        eventually(Duration::from_secs(20), || dev
            .exec(&m, &["cat", "/data/home"])["exit_code"]
            == 0),
        "the machine never wrote its first address"
    );
    let r = dev.exec(&m, &["sh", "-c", "echo kept > /data/written-before"]);
    assert_eq!(r["exit_code"], 0, "{r}");
    // The default min_healthy_time (10 s) is what catches it: no checks, no policy set.
    let mig = migrate(&dev, &m, json!({}));
    let v = wait_migration(&dev, &mig, Duration::from_secs(120));
    assert_eq!(v["phase"], "rolled_back", "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("exited") && err.contains("exit code 3"), "{v}");
    let now = dev.get_machine(&m);
    assert_eq!(now["state"], "started", "{now}");
    assert_eq!(now["host"], m["host"]);
    assert_eq!(now["private_ip"], m["private_ip"]);
    let r = dev.exec(&m, &["cat", "/data/written-before"]);
    assert_eq!(r["stdout"], "kept\n", "{r}");
    let ev = events(&dev, &m);
    assert!(
        ev.iter().any(|e| e["type"] == "migrate"
            && e["status"] == "rolled_back"
            && e["request"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("exit code 3"))),
        "the event log says why: {ev:?}"
    );
}

#[test]
fn a_volume_that_cannot_be_forked_fails_at_once_and_the_machine_runs_on() {
    let dev = Dev::start("migdevnode", 2);
    let hosts = dev.hosts();
    let vol = new_volume(&dev, 16);
    let m = dev.machine("devnode", &hosts[0], web_config(&vol));
    let vols = dev.call("GET", "/v1/volumes", None).1;
    let dir = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == vol.as_str())
        .unwrap()["host_dir"]
        .as_str()
        .unwrap()
        .to_owned();
    // A device node on the volume (put there from the host: a machine may not make one).
    let st = std::process::Command::new("mknod")
        .args([&format!("{dir}/null"), "c", "1", "3"])
        .status()
        .unwrap();
    assert!(st.success());
    let mig = migrate(&dev, &m, json!({}));
    let v = wait_migration(&dev, &mig, Duration::from_secs(60));
    assert_eq!(v["phase"], "rolled_back", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("device node"),
        "a clear error: {v}"
    );
    assert_eq!(v["retries"], 0, "a permanent error is not retried: {v}");
    let now = dev.get_machine(&m);
    assert_eq!(now["state"], "started");
    assert_eq!(now["host"], m["host"]);
    assert_eq!(now["instance_id"], m["instance_id"], "it was never stopped");
}

/// A migration's switch fences the source's instance: whoever asks that host to start it again
/// (here the server, as a confused one would) is refused, and the machine is `failed` with the
/// agent's reason; nothing runs.
#[test]
fn a_fenced_instance_never_starts_again_on_its_host() {
    let dev = Dev::start("fence", 1);
    let hosts = dev.hosts();
    let m = dev.machine(
        "fe",
        &hosts[0],
        json!({"init": {"cmd": ["sleep", "infinity"]}}),
    );
    dev.ok(
        "POST",
        &format!("/v1/apps/fe/machines/{}/stop", id(&m)),
        json!({}),
    );
    let ep = dev.call("GET", "/v1/hosts", None).1[0]["endpoint"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = dev
        .agent_http()
        .post(format!("{ep}/v1/machines/{}/fence", id(&m)))
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, body) = dev.call(
        "POST",
        &format!("/v1/apps/fe/machines/{}/start", id(&m)),
        Some("{}"),
    );
    assert!(status >= 400, "{status} {body}");
    assert!(body.to_string().contains("never runs here again"), "{body}");
    assert_eq!(dev.get_machine(&m)["state"], "failed");
    assert_eq!(running_copies(&dev, id(&m)), 0);
}

//! Machines end to end: a real `ferry dev` (server, agents, namespaces, eBPF, cgroups, `ferry
//! init`) driven through its HTTP API and CLI.

mod support;

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::*;

fn id(m: &Value) -> &str {
    m["id"].as_str().unwrap()
}

fn events(dev: &Dev, m: &Value) -> Vec<Value> {
    dev.get_machine(m)["events"].as_array().unwrap().clone()
}

#[test]
fn machines_run_talk_stop_restart_and_refuse_bad_input() {
    let dev = Dev::start("m", 2);
    let hosts = dev.hosts();

    // An HTTP server on one host reached from a machine on another over its private address.
    let web = dev.machine(
        "web",
        &hosts[0],
        json!({"init": {"cmd": ["python3", "-c", WEB_PY]}}),
    );
    let client = dev.machine(
        "client",
        &hosts[1],
        json!({"init": {"cmd": ["sleep", "infinity"]}}),
    );
    assert_eq!(web["state"], "started");
    assert_ne!(web["host"], client["host"]);
    let ip = web["private_ip"].as_str().unwrap();
    let r = dev.exec(&client, &["python3", "-c", &fetch_py(ip)]);
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(
        r["stdout"].as_str().unwrap().trim(),
        format!("hello from {}", id(&web))
    );

    // Inside: PID 1 is ferry init, the SPEC env, resolv.conf and hosts.
    let r = dev.exec(&client, &["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo; echo $FERRY_MACHINE_ID $FERRY_APP_NAME $FERRY_PRIVATE_IP $FERRY_REGION; cat /etc/resolv.conf; grep ferry-local-6pn /etc/hosts"]);
    let out = r["stdout"].as_str().unwrap();
    assert!(out.lines().next().unwrap().contains("ferry init"), "{out}");
    assert!(
        out.contains(&format!(
            "{} client {} dev",
            id(&client),
            client["private_ip"].as_str().unwrap()
        )),
        "{out}"
    );
    assert!(
        out.contains("nameserver fdaa::3") && out.contains("ferry-local-6pn"),
        "{out}"
    );
    assert_eq!(dev.exec(&client, &["sh", "-c", "exit 7"])["exit_code"], 7);

    // A program that ignores SIGINT is killed after the stop timeout, and the events say so.
    let stubborn = dev.machine(
        "web",
        &hosts[0],
        json!({"init": {"cmd": ["sh", "-c", "trap '' INT; while true; do sleep 0.1; done"]}, "stop_config": {"timeout": "1s"}}),
    );
    // Wait until the shell has installed its trap (PID 2 of the machine ignores SIGINT): a stop
    // that arrives earlier is, correctly, obeyed at once.
    assert!(eventually(Duration::from_secs(10), || {
        let r = dev.exec(
            &stubborn,
            &["sh", "-c", "awk '/SigIgn/ {print $2}' /proc/2/status"],
        );
        u64::from_str_radix(r["stdout"].as_str().unwrap_or("").trim(), 16).is_ok_and(|m| m & 2 != 0)
    }));
    let t = Instant::now();
    let stopped = dev.ok(
        "POST",
        &format!("/v1/apps/web/machines/{}/stop", id(&stubborn)),
        json!({}),
    );
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "waited the timeout: {:?}",
        t.elapsed()
    );
    assert_eq!(stopped["state"], "stopped");
    let exit = events(&dev, &stubborn)
        .into_iter()
        .find(|e| e["type"] == "exit")
        .expect("an exit event");
    assert_eq!(
        exit["request"]["exit_event"]["escalated_to_sigkill"], true,
        "{exit}"
    );
    assert_eq!(exit["request"]["exit_event"]["signal"], 9);

    // One that honours SIGINT ends by it.
    let polite = dev.machine("web", &hosts[1], json!({"init": {"cmd": ["sleep", "600"]}}));
    dev.ok(
        "POST",
        &format!("/v1/apps/web/machines/{}/stop", id(&polite)),
        json!({"timeout": "10s"}),
    );
    let exit = events(&dev, &polite)
        .into_iter()
        .find(|e| e["type"] == "exit")
        .unwrap();
    assert_eq!(
        exit["request"]["exit_event"]["escalated_to_sigkill"], false,
        "{exit}"
    );
    assert_eq!(exit["request"]["exit_event"]["signal"], 2);
    // ... and starts again with the same ID and address.
    let again = dev.ok(
        "POST",
        &format!("/v1/apps/web/machines/{}/start", id(&polite)),
        json!({}),
    );
    assert_eq!(
        (again["state"].clone(), again["private_ip"].clone()),
        (json!("started"), polite["private_ip"].clone())
    );

    // Restart policy: on-failure gives up after max_retries.
    let crashy = dev.machine("web", &hosts[0], json!({"init": {"cmd": ["sh", "-c", "sleep 0.2; exit 3"]}, "restart": {"policy": "on-failure", "max_retries": 2}}));
    let path = format!(
        "/v1/apps/web/machines/{}/wait?state=stopped&timeout=30",
        id(&crashy)
    );
    assert_eq!(dev.call("GET", &path, None).0, 200);
    let evs = events(&dev, &crashy);
    assert_eq!(
        evs.iter().filter(|e| e["type"] == "restart").count(),
        2,
        "{evs:?}"
    );
    assert_eq!(evs[0]["request"]["exit_event"]["exit_code"], 3);

    // Leases: a mutation without the nonce is refused while someone holds the lease.
    let lease = dev.ok(
        "POST",
        &format!("/v1/apps/web/machines/{}/lease", id(&again)),
        json!({"ttl": 60}),
    );
    let (s, v) = dev.call(
        "POST",
        &format!("/v1/apps/web/machines/{}/stop", id(&again)),
        Some("{}"),
    );
    assert_eq!((s, v["code"].as_str().unwrap()), (409, "lease_held"));
    assert_eq!(dev.get_machine(&again)["state"], "started");
    let nonce = lease["nonce"].as_str().unwrap();
    let r = dev
        .http()
        .post(format!(
            "{}/v1/apps/web/machines/{}/stop",
            dev.api,
            id(&again)
        ))
        .header("fly-machine-lease-nonce", nonce)
        .body("{}")
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text());

    // Bad input: a clear 4xx with a stable code, and nothing changes anywhere.
    let snapshot = || {
        let apps = dev.call("GET", "/v1/apps", None).1;
        let mut ms = Vec::new();
        for a in apps.as_array().unwrap() {
            let name = a["name"].as_str().unwrap();
            ms.push(
                dev.call(
                    "GET",
                    &format!("/v1/apps/{name}/machines?include_deleted=true"),
                    None,
                )
                .1,
            );
        }
        (apps, ms, std::fs::read_dir("/run/netns").unwrap().count())
    };
    let before = snapshot();
    let cfg = |extra: Value| {
        let mut c = json!({"init": {"cmd": ["sleep", "1"]}});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        json!({"config": c}).to_string()
    };
    let web_m = format!("/v1/apps/web/machines/{}", id(&web));
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "POST",
            "/v1/apps".into(),
            Some(r#"{"app_name": "Bad_Name"}"#.into()),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/apps".into(),
            Some(r#"{"app_name": "web"}"#.into()),
            409,
            "app_exists",
        ),
        (
            "POST",
            "/v1/apps".into(),
            Some("{not json".into()),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/apps/web/machines".into(),
            Some("[]".into()),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/apps/web/machines".into(),
            Some(cfg(json!({"guest": {"memory_mb": 10_000_000}}))),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/apps/web/machines".into(),
            Some(cfg(json!({"guest": {"cpus": 1000}}))),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/apps/web/machines".into(),
            Some(cfg(json!({"stop_config": {"signal": "SIGHUP"}}))),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/apps/web/machines".into(),
            Some(cfg(json!({"stop_config": {"timeout": "301s"}}))),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/apps/web/machines".into(),
            Some(cfg(json!({"surprise": true}))),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/apps/web/machines".into(),
            Some(cfg(json!({"env": {"FERRY_MACHINE_ID": "x"}}))),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/apps/web/machines".into(),
            Some(cfg(
                json!({"mounts": [{"volume": "vol_0000000000000000", "path": "/data"}]}),
            )),
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/apps/nope/machines".into(),
            Some(cfg(json!({}))),
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/apps/web/machines".into(),
            Some(json!({"host": "1234", "config": {"init": {"cmd": ["x"]}}}).to_string()),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/apps/web/machines".into(),
            Some(json!({"host": "8fffffff", "config": {"init": {"cmd": ["x"]}}}).to_string()),
            404,
            "not_found",
        ),
        (
            "GET",
            "/v1/apps/web/machines/0123456789abcd".into(),
            None,
            404,
            "not_found",
        ),
        (
            "GET",
            "/v1/apps/web/machines/xyz".into(),
            None,
            404,
            "not_found",
        ),
        (
            "GET",
            format!("/v1/apps/client/machines/{}", id(&web)),
            None,
            404,
            "not_found",
        ),
        (
            "POST",
            format!("{web_m}/stop"),
            Some(r#"{"signal": "SIGSEGV"}"#.into()),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            format!("{web_m}/stop"),
            Some(r#"{"timeout": "1h"}"#.into()),
            400,
            "invalid_argument",
        ),
        (
            "POST",
            format!("{web_m}/start"),
            None,
            409,
            "illegal_transition",
        ),
        ("DELETE", web_m.clone(), None, 409, "machine_running"),
        (
            "POST",
            format!("{web_m}/exec"),
            Some(r#"{"cmd": []}"#.into()),
            400,
            "invalid_argument",
        ),
        (
            "GET",
            format!("{web_m}/wait?state=sleeping"),
            None,
            400,
            "invalid_argument",
        ),
        (
            "POST",
            "/v1/volumes".into(),
            Some(r#"{"size_mb": 99999999999}"#.into()),
            400,
            "invalid_argument",
        ),
        (
            "DELETE",
            "/v1/apps/web".into(),
            None,
            409,
            "app_has_machines",
        ),
        ("GET", "/v2/nothing".into(), None, 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let (s, v) = dev.call(method, &path, body.as_deref());
        assert_eq!(
            (s, v["code"].as_str().unwrap_or("")),
            (status, code),
            "{method} {path} {body:?}: {v}"
        );
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path}: a message"
        );
    }
    assert_eq!(snapshot(), before, "bad input changed something");

    // The CLI: tables by default, JSON on request, one error line and non-zero exit on failure.
    let out = dev.cli(&["machine", "status", id(&stubborn)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("Event Logs")
            && text.contains("SIGKILL after timeout"),
        "{text}"
    );
    let out = dev.cli(&["machine", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == web["id"]));
    let out = dev.cli(&[
        "machine",
        "exec",
        id(&client),
        "--",
        "sh",
        "-c",
        "echo hi; exit 4",
    ]);
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        (Some(4), "hi")
    );
    let out = dev.cli(&[
        "machine",
        "run",
        "--app",
        "web",
        "--stop-signal",
        "SIGHUP",
        "--",
        "true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not one of") && err.lines().count() == 1,
        "{err}"
    );
    let out = dev.cli(&[
        "machine",
        "run",
        "--app",
        "newapp",
        "--volume",
        "1gb:/data",
        "--",
        "sh",
        "-c",
        "echo kept > /data/f; sleep 600",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let vm = json!({"id": vid, "app": "newapp"});
    assert!(eventually(Duration::from_secs(10), || dev
        .exec(&vm, &["cat", "/data/f"])["stdout"]
        == "kept\n"));

    let vols: Value =
        serde_json::from_slice(&dev.cli(&["volume", "list", "--json"]).stdout).unwrap();
    assert!(
        vols.as_array()
            .unwrap()
            .iter()
            .any(|v| v["size_mb"] == 1024),
        "{vols}"
    );

    // The API document is served and describes the machine routes.
    let doc = dev.call("GET", "/openapi.json", None).1;
    assert!(
        doc["paths"]["/v1/apps/{app}/machines/{id}/stop"]["post"].is_object(),
        "{}",
        doc["paths"]
    );

    // Destroy takes the machine's namespace with it.
    let ns_before = std::fs::read_dir("/run/netns").unwrap().count();
    dev.ok("DELETE", &format!("{web_m}?force=true"), json!({}));
    assert_eq!(dev.get_machine(&web)["state"], "destroyed");
    assert_eq!(
        std::fs::read_dir("/run/netns").unwrap().count(),
        ns_before - 1
    );
}

#[test]
fn killing_an_agent_leaves_its_machines_serving_and_the_new_one_reattaches() {
    let dev = Dev::start("k", 2);
    let hosts = dev.hosts();
    let web = dev.machine(
        "web",
        &hosts[0],
        json!({"init": {"cmd": ["python3", "-c", WEB_PY]}}),
    );
    let client = dev.machine(
        "client",
        &hosts[1],
        json!({"init": {"cmd": ["sleep", "infinity"]}}),
    );
    let fetch = fetch_py(web["private_ip"].as_str().unwrap());

    let old = agent_pid(&dev, &hosts[0]).expect("the agent of host 0");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // While no agent watches host 0, its machine keeps serving.
    let r = dev.exec(&client, &["python3", "-c", &fetch]);
    assert_eq!(r["exit_code"], 0, "served while its agent was dead: {r}");

    // `ferry dev` restarts the agent; it finds the machine and says so.
    assert!(eventually(Duration::from_secs(20), || agent_pid(
        &dev, &hosts[0]
    )
    .is_some_and(|p| p != old)));
    assert!(eventually(Duration::from_secs(20), || events(&dev, &web)
        .iter()
        .any(|e| e["type"] == "reattach")));
    let m = dev.get_machine(&web);
    assert_eq!(
        (m["state"].as_str(), m["instance_id"].clone()),
        (Some("started"), web["instance_id"].clone())
    );
    let r = dev.exec(&client, &["python3", "-c", &fetch]);
    assert_eq!(
        r["stdout"].as_str().unwrap().trim(),
        format!("hello from {}", id(&web))
    );
    // The new agent controls it: exec through it, stop through it.
    assert_eq!(dev.exec(&web, &["true"])["exit_code"], 0);
    let stopped = dev.ok(
        "POST",
        &format!("/v1/apps/web/machines/{}/stop", id(&web)),
        json!({}),
    );
    assert_eq!(stopped["state"], "stopped");
    let exit = events(&dev, &web)
        .into_iter()
        .find(|e| e["type"] == "exit")
        .unwrap();
    assert_eq!(
        exit["request"]["exit_event"]["signal"], 2,
        "stopped by its SIGINT: {exit}"
    );
}

#[test]
fn restarting_dev_brings_started_machines_back_with_their_ids_addresses_and_volumes() {
    let mut dev = Dev::start("r", 1);
    let hosts = dev.hosts();
    let vol = dev.ok("POST", "/v1/volumes", json!({"size_mb": 64}));
    let cfg = json!({"init": {"cmd": ["sh", "-c", "date +%s%N >> /data/boots; sleep 600"]},
                     "mounts": [{"volume": vol["id"], "path": "/data"}]});
    let m = dev.machine("keep", &hosts[0], cfg);
    let idle = dev.machine(
        "keep",
        &hosts[0],
        json!({"init": {"cmd": ["sleep", "600"]}}),
    );
    dev.ok(
        "POST",
        &format!("/v1/apps/keep/machines/{}/stop", id(&idle)),
        json!({}),
    );

    // The first boot has written its line before the fleet goes down.
    assert!(eventually(Duration::from_secs(10), || dev
        .exec(&m, &["cat", "/data/boots"])["stdout"]
        .as_str()
        .is_some_and(|o| o.lines().count() == 1)));
    dev.stop();
    assert!(
        std::fs::read_dir("/run/netns")
            .unwrap()
            .flatten()
            .all(|e| !e
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("ferry-{}-", dev.name))),
        "namespaces left after Ctrl-C"
    );
    dev.boot();
    // The fleet resumes its machines right after the agents register.
    let wait = format!(
        "/v1/apps/keep/machines/{}/wait?state=started&timeout=60",
        id(&m)
    );
    assert_eq!(dev.call("GET", &wait, None).0, 200);

    let back = dev.get_machine(&m);
    assert_eq!(back["state"], "started");
    assert_eq!(
        (
            back["id"].clone(),
            back["private_ip"].clone(),
            back["host"].clone()
        ),
        (m["id"].clone(), m["private_ip"].clone(), m["host"].clone())
    );
    assert_eq!(
        dev.get_machine(&idle)["state"],
        "stopped",
        "a machine stopped by its user stays stopped"
    );
    let boots = dev.exec(&back, &["cat", "/data/boots"]);
    assert_eq!(
        boots["stdout"].as_str().unwrap().lines().count(),
        2,
        "the volume kept the first boot: {boots}"
    );
    assert!(
        events(&dev, &m)
            .iter()
            .filter(|e| e["type"] == "start")
            .count()
            >= 2
    );
}

#[test]
fn dns_names_machines_per_org_and_follows_state_within_100ms() {
    let dev = Dev::start("d", 2);
    let hosts = dev.hosts();
    let sleeper = json!({"init": {"cmd": ["sleep", "infinity"]}});
    let a = dev.machine("api", &hosts[0], sleeper.clone());
    let b = dev.machine("api", &hosts[1], sleeper.clone());
    let _ = dev.call(
        "POST",
        "/v1/apps",
        Some(&json!({"app_name": "other", "org_slug": "acme"}).to_string()),
    );
    let o = dev.ok(
        "POST",
        "/v1/apps/other/machines",
        json!({"host": hosts[0], "config": sleeper}),
    );
    let (ip_a, ip_b) = (
        a["private_ip"].as_str().unwrap(),
        b["private_ip"].as_str().unwrap(),
    );

    // Operators see every org; names follow docs/design.md#dns. (How soon after the API's
    // answer is measured below, for one change at a time.)
    let mut want = vec![ip_a.to_owned(), ip_b.to_owned()];
    want.sort();
    let all = || {
        let mut all: Vec<String> = dev
            .dig("api.internal", "AAAA")
            .lines()
            .map(String::from)
            .collect();
        all.sort();
        all
    };
    eventually(Duration::from_secs(5), || all() == want);
    assert_eq!(all(), want);
    assert_eq!(
        dev.dig(&format!("{}.vm.api.internal", id(&a)), "AAAA"),
        ip_a
    );
    assert!(dev.dig("_apps.internal", "TXT").contains("other"));

    // Inside machines: ordinary resolvers, through fdaa::3 on their own host, per-org views.
    let r = dev.exec(
        &b,
        &["getent", "ahostsv6", &format!("{}.vm.api.internal", id(&a))],
    );
    assert!(r["stdout"].as_str().unwrap().starts_with(ip_a), "{r}");
    let r = dev.exec(&b, &["python3", "-c", "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('api.internal', 80, socket.AF_INET6)}))"]);
    assert!(
        r["stdout"].as_str().unwrap().contains(ip_a)
            && r["stdout"].as_str().unwrap().contains(ip_b),
        "{r}"
    );
    let r = dev.exec(&o, &["dig", "+time=1", "+tries=1", "AAAA", "api.internal"]);
    assert!(
        r["stdout"].as_str().unwrap().contains("NXDOMAIN"),
        "another org's app does not exist: {r}"
    );
    let r = dev.exec(
        &o,
        &["dig", "+time=1", "+tries=1", "AAAA", "nosuchapp.internal"],
    );
    assert!(r["stdout"].as_str().unwrap().contains("NXDOMAIN"), "{r}");

    // A stop disappears from answers, a start reappears, within 100 ms of the API's answer.
    let name = format!("{}.vm.api.internal", id(&a));
    let measure = |want_present: bool| {
        let t = Instant::now();
        let want: std::net::Ipv6Addr = ip_a.parse().unwrap();
        let ok = eventually(Duration::from_secs(5), || {
            dev.aaaa(&name).contains(&want) == want_present
        });
        assert!(ok, "DNS never showed the change");
        t.elapsed()
    };
    dev.ok(
        "POST",
        &format!("/v1/apps/api/machines/{}/stop", id(&a)),
        json!({}),
    );
    let gone = measure(false);
    dev.ok(
        "POST",
        &format!("/v1/apps/api/machines/{}/start", id(&a)),
        json!({}),
    );
    let back = measure(true);
    eprintln!("DNS freshness after the API answered: stop {gone:?}, start {back:?}");
    assert!(
        gone < Duration::from_millis(100) && back < Duration::from_millis(100),
        "stop {gone:?} start {back:?}"
    );
}

/// The Machines API's other verbs on a real fleet, through the CLI: a signal reaches the
/// command, an update runs the new config as a new instance, a restart keeps the instance,
/// metadata moves the machine between DNS process groups without a restart; bad input is
/// refused with a 4xx and changes nothing.
#[test]
fn update_restart_signal_and_metadata_act_on_real_machines() {
    let dev = Dev::start("v", 1);
    let hosts = dev.hosts();
    // The command notes each SIGUSR1 in a file, and says its env.
    let script = "trap 'echo usr1 >> /tmp/signals' USR1; echo \"$GREETING\" > /tmp/env; \
                  while true; do sleep 0.1; done";
    let m = dev.machine(
        "verbs",
        &hosts[0],
        json!({"init": {"cmd": ["sh", "-c", script]}, "env": {"GREETING": "hello"}}),
    );
    let id = id(&m).to_owned();
    let read = |m: &Value, f: &str| {
        dev.exec(m, &["cat", f])["stdout"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(eventually(Duration::from_secs(10), || read(&m, "/tmp/env")
        == "hello\n"));

    // signal
    let out = dev.cli(&["machine", "signal", &id, "usr1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(Duration::from_secs(10), || read(&m, "/tmp/signals")
            == "usr1\n"),
        "the command got SIGUSR1"
    );
    let out = dev.cli(&["machine", "signal", &id, "SIGHUPX"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_argument"));

    // update: new env, new instance, running again with it.
    let out = dev.cli(&[
        "machine",
        "--json",
        "update",
        &id,
        "--env",
        "GREETING=bonjour",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let u: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u["state"], "started", "{u}");
    assert_ne!(u["instance_id"], m["instance_id"]);
    assert!(eventually(Duration::from_secs(10), || read(&u, "/tmp/env")
        == "bonjour\n"));
    assert!(events(&dev, &m)
        .iter()
        .any(|e| e["type"] == "update" && e["status"] == "updated"));
    // An update the config rules refuse changes nothing.
    let (s, e) = dev.call(
        "POST",
        &format!("/v1/apps/verbs/machines/{id}"),
        Some(&json!({"config": {"init": {"cmd": []}}}).to_string()),
    );
    assert_eq!(
        (s, e["code"].as_str()),
        (400, Some("invalid_argument")),
        "{e}"
    );
    assert_eq!(dev.get_machine(&m)["instance_id"], u["instance_id"]);

    // restart: same instance, the command ran again (its file was written anew).
    dev.exec(&u, &["rm", "/tmp/env"]);
    let out = dev.cli(&["machine", "--json", "restart", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["state"].as_str(), &r["instance_id"]),
        (Some("started"), &u["instance_id"])
    );
    assert!(eventually(Duration::from_secs(10), || read(&r, "/tmp/env")
        == "bonjour\n"));

    // metadata: the DNS process group follows it, no restart.
    let out = dev.cli(&["machine", "metadata", "set", &id, "process_group", "worker"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ip = m["private_ip"].as_str().unwrap().to_owned();
    assert!(
        eventually(Duration::from_secs(5), || dev
            .aaaa("worker.process.verbs.internal")
            .iter()
            .any(|a| a.to_string() == ip)),
        "DNS names the new process group"
    );
    let out = dev.cli(&["machine", "--json", "metadata", "list", &id]);
    let md: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(md["metadata"]["process_group"], "worker", "{md}");
    let (s, _) = dev.call(
        "POST",
        &format!("/v1/apps/verbs/machines/{id}/metadata/bad%20key"),
        Some(r#"{"value": "x"}"#),
    );
    assert_eq!(s, 400);
    let (s, _) = dev.call(
        "DELETE",
        &format!("/v1/apps/verbs/machines/{id}/metadata/absent"),
        None,
    );
    assert_eq!(s, 404);
    assert_eq!(
        dev.get_machine(&m)["instance_id"],
        u["instance_id"],
        "no new instance"
    );
}

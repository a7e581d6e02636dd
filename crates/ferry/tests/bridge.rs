//! The address-mapping bridge end to end: machines dial an old address and reach the machine's
//! current one, see the old address as their peer, are counted; other orgs never benefit;
//! retirement fails fast; the mappings survive an agent restart.

mod support;

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::*;

/// TCP (HTTP on 8080) and UDP echo (9000) on the machine's own address only.
const SERVER_PY: &str = r#"import http.server, os, socket, threading
ip = os.environ["FERRY_PRIVATE_IP"]
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind((ip, 9000))
    while True:
        d, a = s.recvfrom(2048); s.sendto(b"echo:" + d, a)
threading.Thread(target=udp, daemon=True).start()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(s):
        b = ("hello from %s\n" % os.environ["FERRY_MACHINE_ID"]).encode()
        s.send_response(200); s.end_headers(); s.wfile.write(b)
    def log_message(s, *a):
        pass
class S(http.server.HTTPServer):
    address_family = socket.AF_INET6
S((ip, 8080), H).serve_forever()
"#;

/// Dials `target` over TCP and UDP; prints what came back and who the peer seemed to be.
fn client_py(target: &str, timeout: f64) -> String {
    format!(
        r#"import socket, time, errno
out = []
t = time.time()
try:
    c = socket.create_connection(("{target}", 8080), timeout={timeout})
    out.append("tcp_peer=" + c.getpeername()[0])
    c.sendall(b"GET / HTTP/1.0\r\n\r\n"); body = c.makefile("rb").read().decode()
    out.append("tcp_body=" + body.strip().splitlines()[-1])
except OSError as e:
    out.append("tcp_error=%s" % (errno.errorcode.get(e.errno, type(e).__name__)))
out.append("tcp_ms=%d" % ((time.time() - t) * 1000))
try:
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.settimeout({timeout})
    u.sendto(b"ping", ("{target}", 9000)); d, a = u.recvfrom(2048)
    out.append("udp_from=" + a[0]); out.append("udp_data=" + d.decode())
except OSError as e:
    out.append("udp_error=%s" % (errno.errorcode.get(e.errno, type(e).__name__)))
print(" ".join(out))
"#
    )
}

fn dial(dev: &Dev, from: &Value, target: &str, timeout: f64) -> String {
    let r = dev.exec(from, &["python3", "-c", &client_py(target, timeout)]);
    r["stdout"].as_str().unwrap().trim().to_owned()
}

#[test]
fn ebpf_bridge_old_addresses_reach_the_current_one_per_org_counted_retired_and_across_agent_restarts(
) {
    bridge_scenario("ebpf");
}

#[test]
fn nft_dnat_mode_does_the_same_job() {
    bridge_scenario("nft");
}

fn bridge_scenario(mode: &str) {
    let dev = Dev::start_with(
        if mode == "nft" { "n" } else { "b" },
        2,
        &["--bridge-mode", mode],
    );
    let hosts = dev.hosts();
    let server = dev.machine(
        "pg",
        &hosts[0],
        json!({"init": {"cmd": ["python3", "-c", SERVER_PY]}}),
    );
    let client = dev.machine(
        "app",
        &hosts[1],
        json!({"init": {"cmd": ["sleep", "infinity"]}}),
    );
    let _ = dev.call(
        "POST",
        "/v1/apps",
        Some(&json!({"app_name": "evil", "org_slug": "other"}).to_string()),
    );
    let outsider = dev.ok(
        "POST",
        "/v1/apps/evil/machines",
        json!({"host": hosts[1], "config": {"init": {"cmd": ["sleep", "infinity"]}}}),
    );
    let new: ferry_addr::FleetAddr = server["private_ip"].as_str().unwrap().parse().unwrap();
    // Where the server used to live: same org's network, another host, a field never handed out.
    let host1 = ferry_addr::HostId::new(u32::from_str_radix(&hosts[1], 16).unwrap()).unwrap();
    let old =
        ferry_addr::FleetAddr::primary(new.network(), host1, ferry_addr::MachineField(0xfff0_0001))
            .to_string();
    let srv_id = server["id"].as_str().unwrap();
    assert!(eventually(Duration::from_secs(10), || dial(
        &dev,
        &client,
        &new.to_string(),
        2.0
    )
    .contains("tcp_body=hello")));

    // Without a mapping the old address goes nowhere.
    assert!(dial(&dev, &client, &old, 0.5).contains("tcp_error"));

    // Bad mappings are refused with a clear error and change nothing.
    let other_net = outsider["private_ip"].as_str().unwrap();
    let (s, v) = dev.call(
        "POST",
        "/v1/bridge",
        Some(&json!({"old": old, "new": other_net}).to_string()),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_argument")),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("never crosses orgs"));
    let (s, _) = dev.call(
        "POST",
        "/v1/bridge",
        Some(&json!({"old": "fdaa::3", "new": new.to_string()}).to_string()),
    );
    assert_eq!(s, 400);
    assert_eq!(dev.call("GET", "/v1/bridge", None).1, json!([]));

    dev.ok(
        "POST",
        "/v1/bridge",
        json!({"old": old, "new": new.to_string()}),
    );
    let out = dial(&dev, &client, &old, 3.0);
    assert!(
        out.contains(&format!("tcp_peer={old}")),
        "the app sees the old address as its peer: {out}"
    );
    assert!(
        out.contains(&format!("tcp_body=hello from {srv_id}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("udp_from={old}")) && out.contains("udp_data=echo:ping"),
        "{out}"
    );

    // Another org's machine cannot use this org's mapping.
    let out = dial(&dev, &outsider, &old, 0.5);
    assert!(
        out.contains("tcp_error") && out.contains("udp_error"),
        "{out}"
    );

    // Hits name the caller, and the report lists the config to fix.
    let list = dev.call("GET", "/v1/bridge", None).1;
    let m = &list[0];
    assert!(m["hits"].as_u64().unwrap() >= 2, "{list}");
    assert_eq!(m["callers"], json!([client["id"]]), "{list}");
    let report = dev.call("GET", "/v1/bridge/report", None).1;
    assert_eq!(report[0]["machine_id"], client["id"]);
    assert_eq!(report[0]["dials"][0]["old"], json!(old));
    let text = String::from_utf8_lossy(&dev.cli(&["bridge", "list"]).stdout).into_owned();
    assert!(text.contains(&old) && text.contains("active"), "{text}");

    // Sweep: a machine whose env still holds the old address and the current one is found
    // through the API, owners named from the machines and the bridge's mappings.
    let cfg_m = dev.machine("app", &hosts[1], json!({"init": {"cmd": ["sleep", "infinity"]},
        "env": {"PG_PEER": format!("postgres://[{old}]:5432/db"), "PG_NEW": new.to_string().to_uppercase()}}));
    let out = dev.cli(&["sweep", "--fleet", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "literals remain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let hits = doc["fleet"]["hits"].as_array().unwrap();
    let hit = |addr: &str| {
        hits.iter()
            .find(|h| {
                h["address"] == json!(addr)
                    && h["path"]
                        .as_str()
                        .unwrap()
                        .ends_with(cfg_m["id"].as_str().unwrap())
            })
            .cloned()
    };
    let old_hit = hit(&old).expect("the old address in the env");
    assert_eq!(
        (
            old_hit["owner"]["kind"].as_str(),
            old_hit["owner"]["machine_id"].as_str()
        ),
        (Some("old"), Some(srv_id)),
        "{old_hit}"
    );
    assert_eq!(
        hit(&new.to_string()).expect("the current one, upper case")["owner"]["kind"],
        "current"
    );
    assert!(old_hit["path"]
        .as_str()
        .unwrap()
        .starts_with("fleet://app/"));
    assert_eq!(doc["owners"]["source"], "api", "{doc}");
    assert_eq!(doc["files"], Value::Null);
    // The preview of moving the server names who would break: the client dials an old
    // address of it through the bridge, and cfg_m holds it in its env.
    let out = dev.cli(&["machine", "--json", "migrate", srv_id, "--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let impact = plan["moves"][0]["impact"].as_array().unwrap();
    let via = |id: &Value, how: &str| {
        impact
            .iter()
            .any(|i| &i["machine_id"] == id && i["via"] == how)
    };
    assert!(via(&client["id"], "bridge"), "{plan}");
    assert!(via(&cfg_m["id"], "config"), "{plan}");
    assert_eq!(
        dev.call("GET", &format!("/v1/migrations?machine={srv_id}"), None)
            .1,
        json!([]),
        "a dry run starts nothing"
    );
    // Files, without --fleet and without --owners: the owners still come from the API.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pg.env"), format!("PEER=[{old}]:5432\n")).unwrap();
    let out = dev.cli(&["sweep", "--json", dir.path().to_str().unwrap()]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["owners"]["source"], "api", "{doc}");
    assert_eq!(doc["fleet"], Value::Null, "configs only with --fleet");
    assert_eq!(
        doc["files"]["hits"][0]["owner"]["machine_id"].as_str(),
        Some(srv_id),
        "{doc}"
    );

    // The feature gate: off for the client's app, on again.
    dev.ok(
        "POST",
        "/v1/bridge/gate",
        json!({"app": "app", "enabled": false}),
    );
    assert!(
        dial(&dev, &client, &old, 0.5).contains("tcp_error"),
        "gate off: no rewrite"
    );
    dev.ok(
        "POST",
        "/v1/bridge/gate",
        json!({"app": "app", "enabled": true}),
    );
    assert!(dial(&dev, &client, &old, 3.0).contains("tcp_body=hello"));

    // kill -9 the client's agent: mappings live in pinned maps, the restarted agent keeps them.
    let endpoint = |dev: &Dev| {
        let hs = dev.call("GET", "/v1/hosts", None).1;
        hs.as_array()
            .unwrap()
            .iter()
            .find(|h| h["id"] == json!(hosts[1]))
            .unwrap()["endpoint"]
            .clone()
    };
    let before = endpoint(&dev);
    let pid = agent_pid(&dev, &hosts[1]).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(20), || agent_pid(
        &dev, &hosts[1]
    )
    .is_some_and(|p| p != pid)));
    assert!(
        eventually(Duration::from_secs(20), || endpoint(&dev) != before),
        "the new agent registered"
    );
    let out = dial(&dev, &client, &old, 3.0);
    assert!(
        out.contains("tcp_body=hello"),
        "after the agent restart: {out}"
    );

    // Retired: fails fast, reaches nobody.
    dev.ok("POST", "/v1/bridge/retire", json!({"old": old}));
    let t = Instant::now();
    let out = dial(&dev, &client, &old, 3.0);
    // eBPF refuses in connect() (EPERM); nft answers with a TCP reset (ECONNREFUSED) and an
    // ICMPv6 admin-prohibited (EPERM for UDP). Both fail fast.
    let tcp_refusal = if mode == "nft" {
        "tcp_error=ECONNREFUSED"
    } else {
        "tcp_error=EPERM"
    };
    assert!(
        out.contains(tcp_refusal) && out.contains("udp_error=EPERM"),
        "{out}"
    );
    // Retirement by disuse: a mapping used or created within the hour stays; with a zero
    // threshold every remaining one goes.
    let old2 =
        ferry_addr::FleetAddr::primary(new.network(), host1, ferry_addr::MachineField(0xfff0_0002))
            .to_string();
    dev.ok(
        "POST",
        "/v1/bridge",
        json!({"old": old2, "new": new.to_string()}),
    );
    assert_eq!(
        dev.ok("POST", "/v1/bridge/retire", json!({"unused_for": "1h"})),
        json!([])
    );
    let gone = dev.ok("POST", "/v1/bridge/retire", json!({"unused_for": "0s"}));
    assert_eq!(
        gone.as_array().unwrap().len(),
        1,
        "only the active one was left: {gone}"
    );
    assert_eq!(gone[0]["old"], json!(old2));
    let tcp_ms: u64 = out
        .split("tcp_ms=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        tcp_ms < 500,
        "fails fast: {tcp_ms} ms (whole exec {:?})",
        t.elapsed()
    );
}

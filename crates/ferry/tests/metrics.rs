//! `GET /metrics` on a real dev fleet, parsed by the Prometheus project's own OpenMetrics parser
//! (`prometheus_client.openmetrics.parser`, pinned by scripts/setup.sh): the counters move when
//! the fleet acts (a start, a stop, a migration with a volume, API requests) and the gauges say
//! what the API says.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const PYTHON: &str = "/opt/ferry/pytools/bin/python";

/// The parser reads the text and prints every sample as `[name, labels, value]`; a text it
/// rejects fails the test with its error.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;

/// Samples by name, then by their labels (as sorted `k=v` pairs joined with `,`).
type Samples = BTreeMap<String, BTreeMap<String, f64>>;

fn scrape(dev: &Dev) -> Samples {
    // The server's metrics are every org's: they need an admin token.
    scrape_with(dev.http(), &format!("{}/metrics", dev.api))
}

fn scrape_with(http: &reqwest::blocking::Client, url: &str) -> Samples {
    let resp = http.get(url).send().unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.text().unwrap();
    let mut py = Command::new(PYTHON)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the pinned Python tools (scripts/setup.sh)");
    py.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    let mut samples = Samples::new();
    for (name, labels, value) in rows {
        let key = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        samples.entry(name).or_default().insert(key, value);
    }
    samples
}

fn get(s: &Samples, name: &str, labels: &str) -> f64 {
    s.get(name)
        .and_then(|m| m.get(labels))
        .copied()
        .unwrap_or(0.0)
}

/// The sum of a family's samples whose labels contain every one of `want`.
fn sum(s: &Samples, name: &str, want: &[&str]) -> f64 {
    s.get(name).map_or(0.0, |m| {
        m.iter()
            .filter(|(k, _)| want.iter().all(|w| k.split(',').any(|kv| kv == *w)))
            .map(|(_, v)| v)
            .sum()
    })
}

fn moved_dns(before: &Samples, after: &Samples, rcode: &str) -> f64 {
    let l = format!("rcode={rcode}");
    get(after, "ferry_dns_responses_total", &l) - get(before, "ferry_dns_responses_total", &l)
}

#[test]
fn metrics_parse_and_move_when_the_fleet_acts() {
    let dev = Dev::start("prom", 2);
    let hosts = dev.hosts();
    dev.ok("POST", "/v1/apps", json!({"app_name": "mx"}));
    dev.ok(
        "POST",
        "/v1/apps/mx/policy",
        json!({"min_healthy_time": "1s", "healthy_deadline": "1m"}),
    );
    let before = scrape(&dev);

    let vol = new_volume(&dev, 16);
    let m = dev.machine(
        "mx",
        &hosts[0],
        json!({"init": {"cmd": ["sh", "-c", "head -c 1048576 /dev/urandom > /data/blob; exec sleep infinity"]},
               "mounts": [{"volume": vol, "path": "/data"}]}),
    );
    let other = dev.machine(
        "mx",
        &hosts[1],
        json!({"init": {"cmd": ["sleep", "infinity"]}}),
    );
    assert!(eventually(Duration::from_secs(10), || dev
        .exec(&m, &["stat", "-c", "%s", "/data/blob"])["stdout"]
        == "1048576\n"));
    dev.ok(
        "POST",
        &format!(
            "/v1/apps/mx/machines/{}/stop",
            other["id"].as_str().unwrap()
        ),
        json!({}),
    );
    let mig = migrate(&dev, &m, json!({}));
    let done = wait_migration(&dev, &mig, Duration::from_secs(120));
    assert_eq!(done["phase"], "done", "{done}");

    // DNS: a name that exists and one that does not, counted by RCODE.
    let name = format!("{}.vm.mx.internal", m["id"].as_str().unwrap());
    assert!(eventually(Duration::from_secs(5), || !dev
        .aaaa(&name)
        .is_empty()));
    assert!(dev.aaaa("nope.mx.internal").is_empty());

    let after = scrape(&dev);
    assert!(
        moved_dns(&before, &after, "NOERROR") >= 1.0,
        "{:?}",
        after.get("ferry_dns_responses_total")
    );
    assert!(
        moved_dns(&before, &after, "NXDOMAIN") >= 1.0,
        "{:?}",
        after.get("ferry_dns_responses_total")
    );
    let moved = |name: &str, labels: &str| get(&after, name, labels) - get(&before, name, labels);
    assert_eq!(
        moved("ferry_machine_events_total", "event=start"),
        3.0,
        "2 creates + the move"
    );
    assert_eq!(
        moved("ferry_machine_events_total", "event=stop"),
        2.0,
        "a stop + the move's"
    );
    assert_eq!(
        moved("ferry_migrations_finished_total", "outcome=done"),
        1.0
    );
    assert_eq!(moved("ferry_migration_downtime_seconds_count", ""), 1.0);
    // Where starts spend their time: each of the 3 starts counted once in every phase of the
    // control plane's and the agent's; two creates (the move starts a stopped machine). The
    // creates spawn their machine; the move's start releases the one its destination staged.
    for (phase, starts) in [
        ("starting", 3.0),
        ("agent", 3.0),
        ("started", 3.0),
        ("netns", 3.0),
        ("cgroup", 3.0),
        ("bridge", 3.0),
        ("files", 3.0),
        ("spawn", 2.0),
        ("release", 1.0),
        ("init", 3.0),
    ] {
        let l = format!("phase={phase}");
        assert_eq!(
            moved("ferry_machine_start_phase_seconds_count", &l),
            starts,
            "{phase}"
        );
        assert!(
            moved("ferry_machine_start_phase_seconds_sum", &l) > 0.0,
            "{phase}"
        );
    }
    assert_eq!(
        moved("ferry_machine_start_phase_seconds_count", "phase=create"),
        2.0
    );
    assert!(
        moved("ferry_volume_copied_bytes_total", "") >= 1_048_576.0,
        "the blob crossed: {}",
        moved("ferry_volume_copied_bytes_total", "")
    );
    // Gauges: what the API says.
    let machines: Value = dev.call("GET", "/v1/apps/mx/machines", None).1;
    let started = machines
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["state"] == "started")
        .count();
    assert_eq!(
        get(&after, "ferry_machines", "state=started"),
        started as f64
    );
    assert_eq!(get(&after, "ferry_machines", "state=stopped"), 1.0);
    assert_eq!(get(&after, "ferry_migrations", "phase=done"), 1.0);
    // The bridge maps the moved machine's old address: one mapping, counted.
    assert_eq!(
        after["ferry_bridge_hits"].len(),
        1,
        "{:?}",
        after["ferry_bridge_hits"]
    );
    // API latency by route template (never by raw path), with its status.
    let creates = sum(
        &after,
        "ferry_api_request_duration_seconds_count",
        &["method=POST", "route=/v1/apps/{app}/machines", "status=200"],
    );
    assert_eq!(creates, 2.0);
    assert!(!after["ferry_api_request_duration_seconds_count"]
        .keys()
        .any(|k| k.contains(m["id"].as_str().unwrap())));
    // Every agent serves its own: its machines, and the data plane's counters by reason.
    let hs: Value = dev.call("GET", "/v1/hosts", None).1;
    for h in hs.as_array().unwrap() {
        // Agents answer the fleet's servers only (mutual TLS): scraped as a server.
        let a = scrape_with(
            &dev.agent_http(),
            &format!("{}/metrics", h["endpoint"].as_str().unwrap()),
        );
        let here = machines
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["host"] == h["id"] && x["state"] == "started")
            .count();
        assert_eq!(
            get(&a, "ferry_agent_machines", "state=running"),
            here as f64,
            "host {}: {a:?}",
            h["id"]
        );
        for reason in ["spoofed_source", "other_network", "not_fleet"] {
            assert!(
                a["ferry_agent_dataplane_drops_total"].contains_key(&format!("reason={reason}")),
                "{a:?}"
            );
        }
    }
    let not_found = dev.call("GET", "/v1/no-such-route", None).0;
    assert_eq!(not_found, 404);
    let last = scrape(&dev);
    assert_eq!(
        sum(
            &last,
            "ferry_api_request_duration_seconds_count",
            &["route=unmatched", "status=404"]
        ),
        1.0
    );
}

//! Machine logs end to end on a real dev fleet: what a machine writes to stdout and stderr is
//! kept by its shim, read through the API and the CLI, survives a kill -9 of the host's agent
//! without a gap, is followed live across a migration, and stays readable for the instance that
//! ran before it.

mod support;

use serde_json::{json, Value};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::*;

const TICKER: &str = r#"import sys, time
i = 0
while True:
    i += 1
    print("tick", i, flush=True)
    print("warn", i, file=sys.stderr, flush=True)
    time.sleep(0.05)
"#;

fn logs(dev: &Dev, m: &Value, query: &str) -> Value {
    let (s, v) = dev.call(
        "GET",
        &format!(
            "/v1/apps/{}/machines/{}/logs{query}",
            m["app"].as_str().unwrap(),
            m["id"].as_str().unwrap()
        ),
        None,
    );
    assert_eq!(s, 200, "{v}");
    v
}

/// The numbers of `word` lines of one instance, in order.
fn numbers(v: &Value, word: &str, instance: &str) -> Vec<u64> {
    v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["instance_id"] == instance)
        .filter_map(|l| {
            l["message"]
                .as_str()?
                .strip_prefix(word)?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// Waits until instance `instance` of `m` logged 3 ticks.
fn wait_ticks(dev: &Dev, m: &Value, instance: &str) {
    let mut last = Value::Null;
    let ok = eventually(Duration::from_secs(20), || {
        last = logs(dev, m, "");
        numbers(&last, "tick", instance).len() >= 3
    });
    assert!(ok, "instance {instance} logged no ticks: {last}");
}

fn assert_consecutive(ns: &[u64], what: &str) {
    assert!(
        ns.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: a gap or a repeat in {ns:?}"
    );
}

#[test]
fn logs_keep_streams_survive_an_agent_kill_and_follow_a_migration() {
    let dev = Dev::start("l", 2);
    let hosts = dev.hosts();
    let m = dev.machine(
        "ticker",
        &hosts[0],
        json!({"init": {"cmd": ["python3", "-c", TICKER]}}),
    );
    let id = m["id"].as_str().unwrap().to_owned();
    let first = m["instance_id"].as_str().unwrap().to_owned();
    wait_ticks(&dev, &m, &first);

    // Streams are kept apart, each line once, tagged with its instance and host.
    let v = logs(&dev, &m, "");
    for l in v["lines"].as_array().unwrap() {
        let msg = l["message"].as_str().unwrap();
        let want = if msg.starts_with("tick") {
            "stdout"
        } else {
            "stderr"
        };
        assert_eq!(l["stream"], want, "{l}");
        assert_eq!(l["host"], hosts[0].as_str());
        assert!(l["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    assert_consecutive(&numbers(&v, "tick", &first), "stdout");
    assert_consecutive(&numbers(&v, "warn", &first), "stderr");
    assert_eq!(
        logs(&dev, &m, "?tail=4")["lines"].as_array().unwrap().len(),
        4
    );

    // The CLI: newest lines, in text and as JSON lines.
    let out = dev.cli(&["machine", "logs", &id, "-n", "3"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    let out = dev.cli(&["machine", "--json", "logs", &id, "--since", "1h", "-n", "2"]);
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["instance_id"] == first.as_str()));

    // A follower, from now on, through the typed client (as `ferry machine logs -f`).
    let (tx, rx) = mpsc::channel::<Value>();
    let follower = {
        let (api, token) = (dev.api.clone(), dev.token.clone());
        let id = id.clone();
        std::thread::spawn(move || {
            let c = ferry_client::Client::new(&api, Duration::from_secs(60))
                .unwrap()
                .with_token(Some(&token));
            c.follow_logs("ticker", &id, None, Some(1), |l| {
                let _ = tx.send(serde_json::to_value(&l).unwrap());
                Ok(())
            })
        })
    };
    let next = |what: &str, f: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if f(&l) => return l,
                Ok(_) => {}
                Err(e) => panic!("the follower never got {what}: {e}"),
            }
        }
    };
    next("a line of the first instance", &|l| {
        l["instance_id"] == first.as_str()
    });

    // kill -9 the agent: the shim keeps writing; the new agent serves the whole, gapless log.
    let old = agent_pid(&dev, &hosts[0]).expect("the agent of host 0");
    let before = *numbers(&logs(&dev, &m, ""), "tick", &first).last().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut last = Value::Null;
    let back = eventually(Duration::from_secs(30), || {
        agent_pid(&dev, &hosts[0]).is_some_and(|p| p != old) && {
            last = logs(&dev, &m, "?tail=1");
            last.get("unavailable").is_none()
        }
    });
    assert!(back, "the host's new agent never served the log: {last}");
    let ticks = numbers(&logs(&dev, &m, ""), "tick", &first);
    assert!(ticks.contains(&before), "{before} not in {ticks:?}");
    assert_consecutive(&ticks, "across the agent's kill -9");
    // The follower lived through it.
    let seen = next("a line after the agent came back", &|l| {
        l["message"]
            .as_str()
            .and_then(|m| m.strip_prefix("tick "))
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > before + 5)
    });
    assert_eq!(seen["instance_id"], first.as_str());

    // Migrate: the follower moves to the new instance; the old one's lines stay readable.
    let mig = migrate(&dev, &m, json!({"to": hosts[1]}));
    let done = wait_migration(&dev, &mig, Duration::from_secs(120));
    assert_eq!(done["phase"], "done", "{done}");
    let moved = dev.get_machine(&m);
    let second = moved["instance_id"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    let l = next("a line of the new instance", &|l| {
        l["instance_id"] == second.as_str()
    });
    assert_eq!(l["host"], hosts[1].as_str());
    wait_ticks(&dev, &m, &second);
    let v = logs(&dev, &m, "");
    let old_ticks = numbers(&v, "tick", &first);
    assert!(
        old_ticks.contains(&before),
        "the first instance's lines are still there"
    );
    assert_consecutive(&old_ticks, "the first instance");
    assert!(v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["instance_id"] == first.as_str())
        .all(|l| l["host"] == hosts[0].as_str()));
    let stamps: Vec<i64> = v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ts_us"].as_i64().unwrap())
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "oldest first");

    // Destroy: the follower's answer ends by itself.
    let (s, v) = dev.call(
        "DELETE",
        &format!("/v1/apps/ticker/machines/{id}?force=true"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !follower.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the follower did not end with its machine"
        );
        let _ = rx.recv_timeout(Duration::from_millis(100));
    }
    follower.join().unwrap().expect("the follow ended cleanly");
}

#[test]
fn bad_log_queries_are_refused_and_other_apps_machines_are_not_found() {
    let dev = Dev::start("lq", 1);
    let hosts = dev.hosts();
    let m = dev.machine(
        "quiet",
        &hosts[0],
        json!({"init": {"cmd": ["sleep", "infinity"]}}),
    );
    let id = m["id"].as_str().unwrap();
    let _ = dev.call(
        "POST",
        "/v1/apps",
        Some(&json!({"app_name": "other"}).to_string()),
    );
    for (q, status, code) in [
        ("?tail=0", 400, "invalid_argument"),
        ("?tail=10001", 400, "invalid_argument"),
        ("?since=yesterday-ish", 400, "invalid_argument"),
        ("?follow=maybe", 400, "invalid_argument"),
    ] {
        let (s, v) = dev.call(
            "GET",
            &format!("/v1/apps/quiet/machines/{id}/logs{q}"),
            None,
        );
        assert_eq!((s, v["code"].as_str()), (status, Some(code)), "{q}: {v}");
    }
    let (s, v) = dev.call("GET", &format!("/v1/apps/other/machines/{id}/logs"), None);
    assert_eq!(s, 404, "{v}");
    let (s, v) = dev.call("GET", "/v1/apps/quiet/machines/00000000000000/logs", None);
    assert_eq!(s, 404, "{v}");
    // A machine that wrote nothing has an empty log, not an error.
    let v = logs(&dev, &m, "?since=2026-01-01T00:00:00Z");
    assert_eq!(v["lines"], json!([]));
    assert!(v.get("unavailable").is_none(), "{v}");
}

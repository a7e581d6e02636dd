//! The control plane on SQLite and on a 3-member etcd cluster, in the same run: machine create
//! (create -> started, through the API, with real agents) p50/p99, and a drain of 100 machines
//! in 20 orgs against the time of its largest org's share drained alone (orgs drain in
//! parallel; within an org's network, one migration at a time).
//!
//!   N=100 bench/control.sh

use anyhow::{ensure, Result};
use ferry_bench::{median, pct, BenchFleet};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Create -> started latencies (ms) of `n` machines of one app.
fn creates(dev: &BenchFleet, n: usize) -> Result<Vec<f64>> {
    dev.call(
        reqwest::Method::POST,
        "/v1/apps",
        json!({"app_name": "bench"}),
    )?;
    let mut lat = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let m = dev.call(
            reqwest::Method::POST,
            "/v1/apps/bench/machines",
            json!({"config": {"init": {"cmd": ["sleep", "infinity"]}}}),
        )?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(m["state"] == "started", "{m}");
    }
    Ok(lat)
}

/// Where a drain's time went, per migration (medians, ms): from the previous migration of its
/// network finishing (or the drain's start) to the source's stop, the stop to the start on the
/// destination (downtime), and the start to done (the policy's min_healthy_time and the polls).
struct Phases {
    to_stop: f64,
    downtime: f64,
    to_done: f64,
}

impl Phases {
    fn of(migrations: &[Value], drain_start_ms: i64) -> Phases {
        let ms = |m: &Value, k: &str| m[k].as_i64().or_else(|| m["stats"][k].as_i64());
        let mut by_app: std::collections::BTreeMap<&str, Vec<&Value>> = Default::default();
        for m in migrations {
            by_app
                .entry(m["app"].as_str().unwrap_or(""))
                .or_default()
                .push(m);
        }
        let (mut to_stop, mut downtime, mut to_done) = (vec![], vec![], vec![]);
        for chain in by_app.values_mut() {
            chain.sort_by_key(|m| ms(m, "finished_at_ms"));
            let mut prev = drain_start_ms;
            for m in chain.iter() {
                let (Some(stop), Some(start), Some(done)) = (
                    ms(m, "stopped_at_ms"),
                    ms(m, "started_at_ms"),
                    ms(m, "finished_at_ms"),
                ) else {
                    continue;
                };
                to_stop.push((stop - prev) as f64);
                downtime.push((start - stop) as f64);
                to_done.push((done - start) as f64);
                prev = done;
            }
        }
        Phases {
            to_stop: median(&to_stop),
            downtime: median(&downtime),
            to_done: median(&to_done),
        }
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "to stop {:.0} / down {:.0} / to done {:.0} ms",
            self.to_stop, self.downtime, self.to_done
        )
    }
}

/// `orgs` orgs with `per_org` machines each on the first host; seconds to drain that host, and
/// where the time went.
fn drain(dev: &BenchFleet, orgs: usize, per_org: usize) -> Result<(f64, Phases)> {
    let hosts = dev.get("/v1/hosts")?;
    let (h0, h1) = (
        hosts[0]["id"].as_str().unwrap().to_owned(),
        hosts[1]["id"].as_str().unwrap().to_owned(),
    );
    dev.call(
        reqwest::Method::POST,
        &format!("/v1/hosts/{h1}/cordon"),
        json!({}),
    )?;
    for o in 0..orgs {
        let app = format!("d{o}");
        dev.call(
            reqwest::Method::POST,
            "/v1/apps",
            json!({"app_name": app, "org_slug": format!("org{o}")}),
        )?;
        dev.call(
            reqwest::Method::POST,
            &format!("/v1/apps/{app}/policy"),
            json!({"min_healthy_time": "1s", "healthy_deadline": "2m", "max_unavailable": per_org}),
        )?;
        for _ in 0..per_org {
            let m = dev.call(
                reqwest::Method::POST,
                &format!("/v1/apps/{app}/machines"),
                json!({"host": h0, "config": {"init": {"cmd": ["sleep", "infinity"]}}}),
            )?;
            ensure!(m["state"] == "started", "{m}");
        }
    }
    dev.call(
        reqwest::Method::POST,
        &format!("/v1/hosts/{h1}/uncordon"),
        json!({}),
    )?;
    let t = Instant::now();
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let d = dev.call(
        reqwest::Method::POST,
        &format!("/v1/hosts/{h0}/drain"),
        json!({}),
    )?;
    let ids: Vec<String> = d["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    ensure!(ids.len() == orgs * per_org, "{d}");
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let all: Value = dev.get(&format!("/v1/migrations?drain={h0}"))?;
        let phases: Vec<&str> = all
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["phase"].as_str().unwrap_or(""))
            .collect();
        if phases.len() == ids.len() && phases.iter().all(|p| *p == "done" || *p == "rolled_back") {
            ensure!(phases.iter().all(|p| *p == "done"), "{phases:?}");
            let took = t.elapsed().as_secs_f64();
            return Ok((took, Phases::of(all.as_array().unwrap(), start_ms)));
        }
        ensure!(
            Instant::now() < deadline,
            "the drain did not finish: {phases:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() -> Result<()> {
    let ferry = std::env::var("FERRY_BIN").unwrap_or_else(|_| "target/release/ferry".into());
    let n = ferry_bench::env_or("N", 100);
    let tag = std::process::id() & 0xffff;
    let etcd = ferry_store::testing::EtcdCluster::start(3)?;
    let mut rows = Vec::new();
    for (i, name) in ["sqlite", "etcd x3"].into_iter().enumerate() {
        // Each fleet its own state: a fresh state directory, or its own key prefix in etcd.
        let store = |phase: &str| (i == 1).then(|| etcd.url(&format!("bench{tag:x}{phase}")));
        let fleet = |phase: &str, hosts: u32| -> Result<BenchFleet> {
            let url = store(phase);
            let extra: Vec<&str> = match &url {
                Some(u) => vec!["--store", u.as_str()],
                None => vec![],
            };
            BenchFleet::start(&ferry, &format!("b{phase}{tag:x}{i}"), hosts, &extra)
        };
        let dev = fleet("c", 2)?;
        let lat = creates(&dev, n)?;
        drop(dev);
        // A fresh fleet per drain: 100 machines in 20 orgs, then one org's 5 alone.
        let dev = fleet("d", 2)?;
        let (all, all_phases) = drain(&dev, 20, 5)?;
        drop(dev);
        let dev = fleet("o", 2)?;
        let (one, one_phases) = drain(&dev, 1, 5)?;
        drop(dev);
        println!(
            "{name:8} create p50 {:.1} ms p99 {:.1} ms | drain 100 machines / 20 orgs {all:.1} s, one org's 5 alone {one:.1} s, ratio {:.2}",
            median(&lat),
            pct(&lat, 0.99),
            all / one
        );
        println!(
            "{:8} drain per migration: 20 orgs {all_phases}; one org {one_phases}",
            ""
        );
        rows.push((median(&lat), all / one));
    }
    println!(
        "etcd/sqlite create p50 ratio {:.2} (goal <= 1.5)",
        rows[1].0 / rows[0].0
    );
    Ok(())
}

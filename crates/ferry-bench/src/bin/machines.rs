//! Machine lifecycle speed: create->started latency over many machines (each one a network
//! namespace, veth, eBPF attach, cgroups and a `ferry init` process tree), and a thousand
//! machines on one host (time, memory per machine). Baseline in the same run: the bare kernel
//! work of a similar sandbox, `unshare --net --pid --mount --uts --fork true`, per start.

use anyhow::{ensure, Result};
use ferry_bench::{median, pct, BenchFleet};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

fn mem_available_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let ferry = std::env::var("FERRY_BIN").unwrap_or_else(|_| "target/release/ferry".into());
    let n = ferry_bench::env_or("N", 200);
    let many = ferry_bench::env_or("MANY", 1000);
    let tag = std::process::id() & 0xffff;

    // Baseline: the kernel work of a comparable sandbox, no networking set up, no supervision.
    let mut base = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let st = Command::new("unshare")
            .args(["--net", "--pid", "--mount", "--uts", "--fork", "true"])
            .status()?;
        ensure!(st.success(), "unshare failed");
        base.push(t.elapsed().as_secs_f64() * 1e3);
    }

    let dev = BenchFleet::start(&ferry, &format!("bl{tag:x}"), 2, &[])?;
    dev.call(
        reqwest::Method::POST,
        "/v1/apps",
        json!({"app_name": "bench"}),
    )?;
    let cfg = json!({"init": {"cmd": ["sleep", "infinity"]}});
    let mut lat = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let m = dev.call(
            reqwest::Method::POST,
            "/v1/apps/bench/machines",
            json!({"config": cfg}),
        )?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(m["state"] == "started", "{m}");
        ids.push(m["id"].as_str().unwrap().to_owned());
    }
    println!("create->started over {n} machines (2 hosts, least-loaded placement):");
    println!(
        "  ferry    p50 {:.1} ms  p99 {:.1} ms",
        median(&lat),
        pct(&lat, 0.99)
    );
    println!("  unshare  p50 {:.1} ms  p99 {:.1} ms  (bare namespaces + fork/exec, no network, no store)", median(&base), pct(&base, 0.99));
    println!(
        "  ratio ferry/unshare p50 {:.2}",
        median(&lat) / median(&base)
    );
    let t = Instant::now();
    for id in &ids {
        dev.call(
            reqwest::Method::DELETE,
            &format!("/v1/apps/bench/machines/{id}?force=true"),
            json!({}),
        )?;
    }
    println!(
        "  destroy (stop+destroy) mean {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );
    drop(dev);

    if many > 0 {
        let dev = BenchFleet::start(&ferry, &format!("bm{tag:x}"), 1, &[])?;
        dev.call(
            reqwest::Method::POST,
            "/v1/apps",
            json!({"app_name": "many"}),
        )?;
        std::thread::sleep(Duration::from_secs(1));
        let before = mem_available_kib();
        let t = Instant::now();
        let mut lat = Vec::new();
        // The server's start phases at each block of 100 creates: where the time that grows
        // with density goes.
        let mut phase_marks = vec![dev.start_phases()?];
        for i in 0..many {
            if i > 0 && i % 100 == 0 {
                phase_marks.push(dev.start_phases()?);
            }
            let t = Instant::now();
            dev.call(
                reqwest::Method::POST,
                "/v1/apps/many/machines",
                json!({"config": cfg}),
            )?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let took = t.elapsed();
        phase_marks.push(dev.start_phases()?);
        std::thread::sleep(Duration::from_secs(1));
        let after = mem_available_kib();
        let hosts = dev.get("/v1/hosts")?;
        println!("{many} machines on one host: {:.1} s total, p50 {:.1} ms p99 {:.1} ms, {:.0} KiB of host memory per machine (MemAvailable delta), host reports {} machines",
            took.as_secs_f64(), median(&lat), pct(&lat, 0.99), (before.saturating_sub(after)) as f64 / many as f64, hosts[0]["machines"]);
        // Issue 17 item 4: does a create get slower as the host fills up? The first 100 creates
        // (0-99 machines already on the host) are the baseline of the same run; each later block
        // of 100 is compared with it.
        if many >= 200 {
            let first = median(&lat[..100]);
            let blocks: Vec<String> = lat
                .chunks(100)
                .map(|c| format!("{:.1}", median(c)))
                .collect();
            let last = median(&lat[lat.len() - 100..]);
            println!("  p50 per block of 100 creates: {} ms", blocks.join(" "));
            println!("  mean ms per phase, per block of 100 creates:");
            for phase in phase_marks.last().unwrap().keys() {
                let means: Vec<String> = phase_marks
                    .windows(2)
                    .map(|w| {
                        let (s1, c1) = w[1].get(phase).copied().unwrap_or_default();
                        let (s0, c0) = w[0].get(phase).copied().unwrap_or_default();
                        format!("{:.1}", (s1 - s0) * 1e3 / (c1 - c0).max(1) as f64)
                    })
                    .collect();
                println!("    {phase:>9}: {}", means.join(" "));
            }
            println!(
                "  density: p50 of the last 100 creates {last:.1} ms / first 100 {first:.1} ms = {:.2} (goal <= 1.2)",
                last / first
            );
        }
        let t = Instant::now();
        drop(dev);
        println!("  ferry dev shutdown with {many} machines (stop each with SIGINT, remove namespaces): {:.1} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}

//! Machine lifecycle speed: create->started latency over many machines (each one a network
//! namespace, veth, eBPF attach, cgroups and a `ferry init` process tree), and a thousand
//! machines on one host (time, memory per machine). Baseline in the same run: the bare kernel
//! work of a similar sandbox, `unshare --net --pid --mount --uts --fork true`, per start.

use anyhow::{bail, ensure, Context, Result};
use ferry_bench::median;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Dev {
    child: Child,
    api: String,
    http: reqwest::blocking::Client,
    state: std::path::PathBuf,
}

impl Dev {
    fn start(ferry: &str, name: &str, hosts: u32) -> Result<Dev> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let state = std::env::temp_dir().join(format!("ferry-bench-{name}"));
        let _ = std::fs::remove_dir_all(&state);
        let child = Command::new(ferry)
            .args([
                "dev",
                "--no-demo",
                "--name",
                name,
                "--hosts",
                &hosts.to_string(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--state-dir")
            .arg(&state)
            .stdout(Stdio::null())
            .spawn()
            .context("starting ferry dev")?;
        let dev = Dev {
            child,
            api: format!("http://127.0.0.1:{port}"),
            http: reqwest::blocking::Client::new(),
            state,
        };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if let Ok(v) = dev.get("/v1/hosts") {
                if v.as_array().is_some_and(|a| {
                    a.len() == hosts as usize && a.iter().all(|h| h["endpoint"] != "")
                }) {
                    return Ok(dev);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("ferry dev did not come up")
    }
    fn get(&self, p: &str) -> Result<Value> {
        Ok(self.http.get(format!("{}{p}", self.api)).send()?.json()?)
    }
    fn call(&self, method: reqwest::Method, p: &str, body: Value) -> Result<Value> {
        let r = self
            .http
            .request(method, format!("{}{p}", self.api))
            .json(&body)
            .send()?;
        let s = r.status();
        let v: Value = r.json()?;
        ensure!(s.is_success(), "{p}: {v}");
        Ok(v)
    }
    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn mem_available_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<()> {
    let ferry = std::env::var("FERRY_BIN").unwrap_or_else(|_| "target/release/ferry".into());
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let many: usize = std::env::var("MANY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
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

    let dev = Dev::start(&ferry, &format!("bl{tag:x}"), 2)?;
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
    dev.stop();

    if many > 0 {
        let dev = Dev::start(&ferry, &format!("bm{tag:x}"), 1)?;
        dev.call(
            reqwest::Method::POST,
            "/v1/apps",
            json!({"app_name": "many"}),
        )?;
        std::thread::sleep(Duration::from_secs(1));
        let before = mem_available_kib();
        let t = Instant::now();
        let mut lat = Vec::new();
        for _ in 0..many {
            let t = Instant::now();
            dev.call(
                reqwest::Method::POST,
                "/v1/apps/many/machines",
                json!({"config": cfg}),
            )?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let took = t.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        let after = mem_available_kib();
        let hosts = dev.get("/v1/hosts")?;
        println!("{many} machines on one host: {:.1} s total, p50 {:.1} ms p99 {:.1} ms, {:.0} KiB of host memory per machine (MemAvailable delta), host reports {} machines",
            took.as_secs_f64(), median(&lat), pct(&lat, 0.99), (before.saturating_sub(after)) as f64 / many as f64, hosts[0]["machines"]);
        let t = Instant::now();
        dev.stop();
        println!("  ferry dev shutdown with {many} machines (stop each with SIGINT, remove namespaces): {:.1} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}

//! Migration takeover: two `ferry server`s on a 3-member etcd cluster, real agents on 2 hosts
//! (`ferry dev --control-plane`); the server driving a migration is killed (SIGKILL, by the
//! crash hook right after it recorded `locked`), and the time until the other server (1) holds
//! the migration's claim and (2) records the next step is measured, R times, against the
//! claim's TTL. Goal: takeover <= TTL + 1 s.
//!
//!   R=7 bench/takeover.sh

use anyhow::{bail, ensure, Context, Result};
use ferry_bench::{env_or, median, pct};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TTL_MS: u64 = 5_000; // ferry_core::migrate::CLAIM_TTL_MS

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Procs {
    servers: Vec<Option<Child>>,
    hosts: Option<Child>,
    dir: PathBuf,
    name: String,
}

impl Drop for Procs {
    fn drop(&mut self) {
        if let Some(mut c) = self.hosts.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = c.wait();
        }
        for c in self.servers.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for e in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("ferry-{}-", self.name)) {
                let _ = Command::new("ip").args(["netns", "del", &n]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn main() -> Result<()> {
    let ferry = std::env::var("FERRY_BIN").unwrap_or_else(|_| "target/release/ferry".into());
    let runs: usize = env_or("R", 7);
    let name = format!("tk{:x}", std::process::id() & 0xffff);
    let etcd = ferry_store::testing::EtcdCluster::start(3)?;
    let url = etcd.url(&name);
    let store = ferry_store::open(&url)?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ports = [free_port()?, free_port()?];
    // The agent listeners: fixed ports, so agents find them again after a restart.
    let agent_ports = [free_port()?, free_port()?];
    let apis: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut p = Procs {
        servers: vec![None, None],
        hosts: None,
        dir: dir.clone(),
        name: name.clone(),
    };
    let plain = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    // The API document is the one route that needs no token.
    let up = |api: &str| {
        plain
            .get(format!("{api}/openapi.json"))
            .send()
            .is_ok_and(|r| r.status().is_success())
    };
    let start_servers = |p: &mut Procs, env: &[(&str, String)]| -> Result<()> {
        for (i, port) in ports.iter().enumerate() {
            if let Some(mut c) = p.servers[i].take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let state = dir.join(format!("s{i}"));
            // One fleet, one CA: server 0 makes it, the other gets a copy of its `tls/`.
            if i > 0 && !state.join("tls").exists() {
                let ca = dir.join("s0").join("tls").join("ca.pem");
                ensure!(
                    wait_until(Duration::from_secs(30), || ca.exists()),
                    "server 0 made no fleet CA"
                );
                std::fs::create_dir_all(&state)?;
                let ok = Command::new("cp")
                    .arg("-a")
                    .arg(dir.join("s0").join("tls"))
                    .arg(state.join("tls"))
                    .status()?
                    .success();
                ensure!(ok, "copying the fleet CA");
            }
            p.servers[i] = Some(
                Command::new(&ferry)
                    .arg("server")
                    .arg(format!("--store={url}"))
                    .arg("--state-dir")
                    .arg(&state)
                    .args(["--listen", &format!("127.0.0.1:{port}")])
                    .args(["--agent-listen", &format!("127.0.0.1:{}", agent_ports[i])])
                    .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting ferry server")?,
            );
        }
        ensure!(
            wait_until(Duration::from_secs(30), || apis.iter().all(|a| up(a))),
            "the servers did not come up"
        );
        Ok(())
    };
    start_servers(&mut p, &[])?;
    // Both servers share the store: the tokens server 0 wrote work on both.
    let token = |f: &str| -> Result<String> {
        Ok(std::fs::read_to_string(dir.join("s0").join(f))?
            .trim()
            .to_owned())
    };
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", token("admin.token")?).parse()?,
    );
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(auth)
        .build()?;
    p.hosts = Some(
        Command::new(&ferry)
            .args(["dev", "--name", &name, "--hosts", "2"])
            .arg("--state-dir")
            .arg(dir.join("hosts"))
            .args([
                "--control-plane",
                &agent_ports
                    .iter()
                    .map(|p| format!("https://127.0.0.1:{p}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ])
            .env("FERRY_JOIN_TOKEN", token("join.token")?)
            .env("FERRY_SERVER_CA", dir.join("s0").join("tls").join("ca.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let get = |api: &str, path: &str| -> Option<Value> {
        http.get(format!("{api}{path}")).send().ok()?.json().ok()
    };
    let post = |api: &str, path: &str, body: Value| -> Result<Value> {
        let r = http.post(format!("{api}{path}")).json(&body).send()?;
        let s = r.status();
        let v: Value = r.json()?;
        ensure!(s.is_success(), "{path}: {v}");
        Ok(v)
    };
    ensure!(
        wait_until(Duration::from_secs(60), || {
            get(&apis[0], "/v1/hosts").is_some_and(|v| {
                v.as_array()
                    .is_some_and(|a| a.len() == 2 && a.iter().all(|h| h["endpoint"] != ""))
            })
        }),
        "the hosts did not register"
    );
    let hosts: Vec<String> = get(&apis[0], "/v1/hosts")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_owned())
        .collect();
    post(&apis[0], "/v1/apps", json!({"app_name": "tk"}))?;
    post(
        &apis[0],
        "/v1/apps/tk/policy",
        json!({"min_healthy_time": "1s", "healthy_deadline": "1m"}),
    )?;
    let m = post(
        &apis[0],
        "/v1/apps/tk/machines",
        json!({"host": hosts[0], "config": {"init": {"cmd": ["sleep", "infinity"]}}}),
    )?;
    let id = m["id"].as_str().unwrap().to_owned();
    let (mut claims, mut progress) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let marker = dir.join(format!("crash{r}"));
        start_servers(
            &mut p,
            &[
                ("FERRY_CRASH_AT", "locked".into()),
                ("FERRY_CRASH_MARKER", marker.to_string_lossy().into_owned()),
            ],
        )?;
        let to = &hosts[(r + 1) % 2];
        let mig = post(
            &apis[0],
            &format!("/v1/apps/tk/machines/{id}/migrate"),
            json!({"to": to}),
        )?;
        let mig_id = mig["id"].as_str().unwrap().to_owned();
        // The hook creates the marker, then SIGKILLs its process: the kill is within the 2 ms
        // poll of this moment.
        ensure!(
            wait_until(Duration::from_secs(60), || marker.exists()),
            "no server reached `locked`"
        );
        let t0 = Instant::now();
        let claim = format!("migration-driver/{mig_id}");
        let dead_owner = store.current_lock(&claim)?.map(|l| l.owner);
        let (mut t_claim, mut t_step) = (None, None);
        while t_claim.is_none() || t_step.is_none() {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("no takeover within 60 s");
            }
            if t_claim.is_none() {
                if let Ok(Some(l)) = store.current_lock(&claim) {
                    if Some(&l.owner) != dead_owner.as_ref() {
                        t_claim = Some(t0.elapsed());
                    }
                }
            }
            if t_step.is_none() {
                if let Ok(v) = store.get_migration(&mig_id) {
                    if v.phase != "locked" {
                        t_step = Some(t0.elapsed());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let (c, s) = (t_claim.unwrap(), t_step.unwrap());
        eprintln!("run {r}: claim taken over after {c:?}, next step recorded after {s:?}");
        claims.push(c.as_secs_f64());
        progress.push(s.as_secs_f64());
        // Let the survivor finish before the next run.
        ensure!(
            wait_until(Duration::from_secs(90), || store
                .get_migration(&mig_id)
                .is_ok_and(|v| v.finished)),
            "migration {mig_id} did not finish"
        );
    }
    println!(
        "takeover over {runs} runs, claim TTL {:.1} s: claim p50 {:.2} s (max {:.2} s), next step recorded p50 {:.2} s (max {:.2} s); goal <= {:.1} s",
        TTL_MS as f64 / 1e3,
        median(&claims),
        pct(&claims, 1.0),
        median(&progress),
        pct(&progress, 1.0),
        TTL_MS as f64 / 1e3 + 1.0
    );
    Ok(())
}

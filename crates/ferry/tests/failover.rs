//! The control plane's failures with real processes (issue 14): a 3-member etcd cluster on
//! loopback, two `ferry server`s on it, and real agents in real host namespaces
//! (`ferry dev --control-plane`), all started here and stopped in `Drop`, also on panic.
//!
//! - A server dies while it drives a migration, at every phase: the other takes it over (after
//!   the claim's TTL) and finishes or rolls it back; there is never more than one running copy,
//!   the volume's bytes are the machine's own, DNS names the machine where it runs.
//! - Agents fail over: a change no server pushed, or made through the server an agent does not
//!   watch, reaches it through its watch; reports and registration reach the surviving server.
//! - etcd: one member down, everything goes on; all down, the API answers 503 and changes
//!   nothing while machines run and DNS answers; etcd back, service resumes by itself.
//!
//! The two tests run one after the other (a lock): each starts 3 etcd members, 2 servers, 3
//! agents and their machines, which is a lot for a small box at once.

mod support;

use ferry_store::testing::EtcdCluster;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::{aaaa_at, agent_client, eventually, free_port, remove_fleet_namespaces, FERRY};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The phases a server may die after (it records the phase, then dies: `FERRY_CRASH_AT`),
/// `pending` right after it claimed the migration, `precopy-round` between the two copy rounds.
const PHASES: [&str; 10] = [
    "pending",
    "locked",
    "noticed",
    "precopy-round",
    "precopied",
    "stopped",
    "synced",
    "switched",
    "mapped",
    "started",
];

/// The migration claim's TTL (`ferry_core::migrate::CLAIM_TTL_MS`).
const CLAIM_TTL: Duration = Duration::from_millis(ferry_core::migrate::CLAIM_TTL_MS);

struct Server {
    child: Option<Child>,
    port: u16,
    /// The agent listener's port (fixed, so agents find it again after a restart).
    agent_port: u16,
    dns: u16,
    state: PathBuf,
    /// It answered once (its agents know its ports from then on).
    started: bool,
}

impl Server {
    fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The agent listener (what agents join, register with, report to and watch).
    fn agent_api(&self) -> String {
        format!("https://127.0.0.1:{}", self.agent_port)
    }

    fn dns(&self) -> String {
        format!("127.0.0.1:{}", self.dns)
    }

    fn start(&mut self, store: &str, env: &[(&str, &str)], n: usize) {
        // Its ports were free when picked, but another process may have taken one since (the
        // box runs many tests): a server that could not bind exits at once. Before agents know
        // its ports (its first start) it gets new ones; later its agents need these.
        for attempt in 0..3 {
            match self.try_start(store, env) {
                Ok(()) => return,
                Err(log) if !self.started && attempt < 2 && log.contains("in use") => {
                    eprintln!("ferry server {n}: a port was taken ({log}); new ports");
                    (self.port, self.agent_port, self.dns) =
                        (free_port(), free_port(), free_port());
                }
                Err(log) => panic!("ferry server {n} did not answer; its log ends:\n{log}"),
            }
        }
    }

    /// Starts the server and waits for its API; `Err` with the end of its log if it does not
    /// answer within 30 s (or exits first).
    fn try_start(&mut self, store: &str, env: &[(&str, &str)]) -> Result<(), String> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join("log"))
            .unwrap();
        let child = Command::new(FERRY)
            .arg("server")
            .arg(format!("--store={store}"))
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--agent-listen", &format!("127.0.0.1:{}", self.agent_port)])
            .args(["--dns-listen", &self.dns()])
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let http = reqwest::blocking::Client::new();
        // The API document is the one route that needs no token.
        let mut answered = false;
        eventually(Duration::from_secs(30), || {
            answered = http
                .get(format!("{}/openapi.json", self.api()))
                .send()
                .is_ok_and(|r| r.status().is_success());
            // A server that exited will not answer: no need to wait out the 30 s.
            answered || !self.alive()
        });
        if answered {
            self.started = true;
            return Ok(());
        }
        let log = std::fs::read_to_string(self.state.join("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        Err(tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process still runs (a crash hook ends it by itself).
    fn alive(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }
}

/// etcd, two servers, and `ferry dev --control-plane` (hosts and agents) on both.
struct Fleet {
    name: String,
    dir: PathBuf,
    hosts_proc: Option<Child>,
    servers: Vec<Server>,
    store_url: String,
    http: reqwest::blocking::Client,
    /// For the agents' own API: mutual TLS with a server's role certificate from the fleet CA
    /// (agents answer nobody else).
    agent_http: reqwest::blocking::Client,
    // Last: dropped (its members killed) after everything above is stopped.
    etcd: EtcdCluster,
}

impl Fleet {
    fn start(tag: &str) -> Fleet {
        let name = format!("fo{tag}{:x}", std::process::id() & 0xffff);
        let dir = std::env::temp_dir().join(format!("ferry-test-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let etcd = EtcdCluster::start(3).unwrap();
        let store_url = etcd.url(&name);
        let servers = (0..2)
            .map(|i| {
                let state = dir.join(format!("server{i}"));
                std::fs::create_dir_all(&state).unwrap();
                Server {
                    child: None,
                    port: free_port(),
                    agent_port: free_port(),
                    dns: free_port(),
                    started: false,
                    state,
                }
            })
            .collect();
        let mut f = Fleet {
            name,
            dir,
            hosts_proc: None,
            servers,
            store_url,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            agent_http: reqwest::blocking::Client::new(),
            etcd,
        };
        f.restart_servers(&[]);
        // Both servers share the store: the tokens server 0 wrote work on both.
        let token = |name: &str| {
            std::fs::read_to_string(f.servers[0].state.join(name))
                .unwrap()
                .trim()
                .to_owned()
        };
        let (admin, join) = (token("admin.token"), token("join.token"));
        let mut auth = reqwest::header::HeaderMap::new();
        auth.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {admin}").parse().unwrap(),
        );
        f.http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .default_headers(auth)
            .build()
            .unwrap();
        let tls = f.servers[0].state.join("tls");
        f.agent_http = agent_client(&tls, Duration::from_secs(2));
        // Agents join and talk to the agent listeners, trusting the fleet CA both servers share.
        let urls = format!("{},{}", f.servers[0].agent_api(), f.servers[1].agent_api());
        let log = std::fs::File::create(f.dir.join("hosts.log")).unwrap();
        let child = Command::new(FERRY)
            .args(["dev", "--name", &f.name, "--hosts", "3"])
            .arg("--state-dir")
            .arg(f.dir.join("hosts"))
            .args(["--control-plane", &urls])
            .env("FERRY_JOIN_TOKEN", &join)
            .env("FERRY_SERVER_CA", tls.join("ca.pem"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        f.hosts_proc = Some(child);
        let up = eventually(Duration::from_secs(60), || {
            f.get(&f.servers[0].api(), "/v1/hosts").is_some_and(|v| {
                v.as_array()
                    .is_some_and(|a| a.len() == 3 && a.iter().all(|h| h["endpoint"] != ""))
            })
        });
        assert!(up, "the hosts did not register");
        f
    }

    /// (Re)starts both servers with `env` (e.g. a crash hook).
    fn restart_servers(&mut self, env: &[(&str, &str)]) {
        let url = self.store_url.clone();
        let ca = self.servers[0].state.join("tls");
        for (i, s) in self.servers.iter_mut().enumerate() {
            // One fleet, one CA: server 0 makes it at its first start, the others get a copy
            // of its `tls/` before theirs (as an operator copies it to every server).
            if i > 0 && !s.state.join("tls").exists() {
                let status = Command::new("cp")
                    .arg("-a")
                    .arg(&ca)
                    .arg(s.state.join("tls"))
                    .status()
                    .unwrap();
                assert!(status.success());
            }
            s.start(&url, env, i);
        }
    }

    fn hosts(&self) -> Vec<String> {
        let v = self.get(&self.servers[0].api(), "/v1/hosts").unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|h| h["id"].as_str().unwrap().to_owned())
            .collect()
    }

    fn get(&self, api: &str, path: &str) -> Option<Value> {
        let r = self.http.get(format!("{api}{path}")).send().ok()?;
        r.status().is_success().then(|| r.json().ok()).flatten()
    }

    /// Any call: (status, body); `Err` if the server did not answer.
    fn call(
        &self,
        api: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let url = format!("{api}{path}");
        let mut req = match method {
            "GET" => self.http.get(&url),
            "POST" => self.http.post(&url),
            m => panic!("method {m}"),
        };
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let text = r.text().map_err(|e| e.to_string())?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    fn ok(&self, api: &str, method: &str, path: &str, body: Value) -> Value {
        let (s, v) = self.call(api, method, path, Some(body)).unwrap();
        assert!((200..300).contains(&s), "{method} {path} -> {s}: {v}");
        v
    }

    fn machine(&self, api: &str, m: &Value) -> Value {
        self.get(
            api,
            &format!(
                "/v1/apps/{}/machines/{}",
                m["app"].as_str().unwrap(),
                m["id"].as_str().unwrap()
            ),
        )
        .unwrap()
    }

    fn exec(&self, api: &str, m: &Value, cmd: &[&str]) -> Value {
        self.ok(
            api,
            "POST",
            &format!(
                "/v1/apps/{}/machines/{}/exec",
                m["app"].as_str().unwrap(),
                m["id"].as_str().unwrap()
            ),
            json!({"cmd": cmd, "timeout": 30}),
        )
    }

    /// The agent of `host` (its address as it wrote it; it changes when the agent restarts).
    fn agent(&self, host: &str) -> Option<String> {
        std::fs::read_to_string(
            self.dir
                .join("hosts")
                .join("hosts")
                .join(host)
                .join("agent.addr"),
        )
        .ok()
    }

    /// `GET` on the agent of `host`.
    fn agent_get(&self, host: &str, path: &str) -> Option<Value> {
        let ep = self.agent(host)?;
        let r = self.agent_http.get(format!("{ep}{path}")).send().ok()?;
        r.json().ok()
    }

    /// The hosts whose agent runs machine `id` now.
    fn running_on(&self, hosts: &[String], id: &str) -> Vec<String> {
        hosts
            .iter()
            .filter(|h| {
                self.agent_get(h, "/v1/machines").is_some_and(|l| {
                    l.as_array()
                        .unwrap()
                        .iter()
                        .any(|m| m["id"] == id && m["running"] == true)
                })
            })
            .cloned()
            .collect()
    }

    /// The old addresses in `host`'s bridge state, as its agent holds it.
    fn bridge_olds(&self, host: &str) -> Vec<String> {
        self.agent_get(host, "/v1/state")
            .map(|s| {
                s["bridge"]["mappings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["old"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for f in ["server0/log", "server1/log", "hosts.log"] {
                let t = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(40).collect();
                eprintln!("--- {f} (last lines):");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        // Hosts first: `ferry dev` stops its agents, kills its machines, removes its hosts.
        if let Some(mut c) = self.hosts_proc.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && !matches!(c.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in &mut self.servers {
            s.kill();
        }
        // Whatever a killed `ferry dev` left: this fleet's namespaces, pins and mounts only.
        remove_fleet_namespaces(&self.name);
        let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf/ferry").join(&self.name));
        ferry_agent::disk::unmount_volumes_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A machine with a 8 MiB volume holding 2 MiB of random bytes it wrote once; (machine, their
/// SHA-256 as `sha256sum` prints it).
fn machine_with_data(f: &Fleet, api: &str, app: &str, host: &str) -> (Value, String) {
    f.ok(api, "POST", "/v1/apps", json!({"app_name": app}));
    f.ok(
        api,
        "POST",
        &format!("/v1/apps/{app}/policy"),
        json!({"min_healthy_time": "1s", "healthy_deadline": "1m"}),
    );
    let vol = f.ok(api, "POST", "/v1/volumes", json!({"size_mb": 8}));
    let m = f.ok(
        api,
        "POST",
        &format!("/v1/apps/{app}/machines"),
        json!({"host": host, "config": {
            "init": {"cmd": ["sh", "-c",
                "[ -f /data/blob ] || { head -c 2097152 /dev/urandom > /data/b.tmp && mv /data/b.tmp /data/blob; }; exec sleep infinity"]},
            "mounts": [{"volume": vol["id"], "path": "/data"}],
        }}),
    );
    assert_eq!(m["state"], "started", "{m}");
    // `started` is when the command starts: the blob appears (whole, by its rename) a little
    // later. Hashing it before then read a half-written file (a CI run saw the hashes differ).
    let mut out = json!(null);
    assert!(
        eventually(Duration::from_secs(10), || {
            out = f.exec(api, &m, &["sha256sum", "/data/blob"]);
            out["exit_code"] == 0
        }),
        "the machine never wrote its blob: {out}"
    );
    let sum = out["stdout"].as_str().unwrap().to_owned();
    assert!(sum.contains("/data/blob"), "{out}");
    (m, sum)
}

/// Today's invariants after a migration of `m` ended, asked of server `api` (DNS at `dns`):
/// started, on one host only (the one the record names), its volume's bytes its own, its name
/// resolving to its address.
fn check_invariants(f: &Fleet, api: &str, dns: &str, m: &Value, sum: &str, hosts: &[String]) {
    let now = f.machine(api, m);
    assert_eq!(now["state"], "started", "{now}");
    let id = m["id"].as_str().unwrap();
    assert_eq!(
        f.running_on(hosts, id),
        [now["host"].as_str().unwrap()],
        "one running copy, where the record says"
    );
    let out = f.exec(api, &now, &["sha256sum", "/data/blob"]);
    assert_eq!(
        out["stdout"].as_str(),
        Some(sum),
        "the volume's bytes: {out}"
    );
    let name = format!("{id}.vm.{}.internal", m["app"].as_str().unwrap());
    let ip: std::net::Ipv6Addr = now["private_ip"].as_str().unwrap().parse().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || aaaa_at(dns, &name) == [ip]),
        "DNS at {dns} names {name} {ip}: {:?}",
        aaaa_at(dns, &name)
    );
}

/// Samples every agent while a migration runs: the most copies of the machine seen running at
/// once. A pass over the agents takes milliseconds; between a source's stop and a
/// destination's start lie a final copy round, the switch and the mapping, so a pass never
/// sees both unless both really run.
struct CopySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl CopySampler {
    fn start(f: &Fleet, hosts: &[String], id: &str) -> CopySampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let eps: Vec<PathBuf> = hosts
            .iter()
            .map(|h| f.dir.join("hosts").join("hosts").join(h).join("agent.addr"))
            .collect();
        let (s, id) = (stop.clone(), id.to_owned());
        let tls = f.servers[0].state.join("tls");
        let thread = std::thread::spawn(move || {
            let http = agent_client(&tls, Duration::from_secs(2));
            let mut most = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let n = eps
                    .iter()
                    .filter(|p| {
                        let Ok(ep) = std::fs::read_to_string(p) else {
                            return false;
                        };
                        http.get(format!("{ep}/v1/machines"))
                            .send()
                            .ok()
                            .and_then(|r| r.json::<Value>().ok())
                            .is_some_and(|l| {
                                l.as_array()
                                    .unwrap()
                                    .iter()
                                    .any(|m| m["id"] == id.as_str() && m["running"] == true)
                            })
                    })
                    .count();
                most = most.max(n);
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        });
        CopySampler {
            stop,
            thread: Some(thread),
        }
    }

    fn most(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn a_killed_server_s_migration_is_taken_over_at_every_phase() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let t_test = Instant::now();
    let mut f = Fleet::start("m");
    let hosts = f.hosts();
    let api0 = f.servers[0].api();
    let (m, sum) = machine_with_data(&f, &api0, "db", &hosts[0]);
    let id = m["id"].as_str().unwrap().to_owned();
    let mut takeovers = Vec::new();
    for (k, phase) in PHASES.iter().enumerate() {
        let t_phase = Instant::now();
        let marker = f.dir.join(format!("crash-{phase}"));
        let marker_s = marker.to_string_lossy().into_owned();
        // Both servers armed, one marker: whichever drives the migration dies there (once).
        f.restart_servers(&[("FERRY_CRASH_AT", phase), ("FERRY_CRASH_MARKER", &marker_s)]);
        let api0 = f.servers[0].api();
        let from = f.machine(&api0, &m)["host"].as_str().unwrap().to_owned();
        let to = hosts[(hosts.iter().position(|h| *h == from).unwrap() + 1) % hosts.len()].clone();
        let sampler = CopySampler::start(&f, &hosts, &id);
        // The server may die before it answers (at `pending`): the survivor names the migration.
        let posted = f.call(
            &api0,
            "POST",
            &format!("/v1/apps/db/machines/{id}/migrate"),
            Some(json!({"to": to})),
        );
        if let Ok((s, v)) = &posted {
            assert_eq!(*s, 202, "{phase}: migrate -> {v}");
        }
        assert!(
            eventually(Duration::from_secs(60), || marker.exists()),
            "{phase}: no server reached the phase"
        );
        let t_crash = Instant::now();
        let mut dead = None;
        assert!(
            eventually(Duration::from_secs(10), || {
                dead = f.servers.iter_mut().position(|s| !s.alive());
                dead.is_some()
            }),
            "{phase}: the crash hook fired but no server died"
        );
        let survivor = 1 - dead.unwrap();
        let (sapi, sdns) = (f.servers[survivor].api(), f.servers[survivor].dns());
        let list = f
            .get(&sapi, &format!("/v1/migrations?machine={id}"))
            .unwrap();
        let mig = list.as_array().unwrap().last().unwrap().clone();
        if let Ok((_, v)) = &posted {
            assert_eq!(v["id"], mig["id"], "{phase}");
        }
        let mig_id = mig["id"].as_str().unwrap().to_owned();
        // Taken over: the survivor records a step after the crash (or the end).
        let crash_phase = mig["phase"].as_str().unwrap().to_owned();
        let mut took_over = None;
        let deadline = Instant::now() + Duration::from_secs(90);
        let done = loop {
            let v = f.get(&sapi, &format!("/v1/migrations/{mig_id}")).unwrap();
            if took_over.is_none() && v["phase"] != crash_phase.as_str() {
                took_over = Some(t_crash.elapsed());
            }
            if v["phase"] == "done" || v["phase"] == "rolled_back" {
                break v;
            }
            assert!(Instant::now() < deadline, "{phase}: not finished: {v}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let most = sampler.most();
        assert!(most <= 1, "{phase}: {most} copies ran at once");
        let took_over = took_over.unwrap();
        // The margin: the takeover scan (every 1 s) and the step the survivor runs before it
        // records the next phase (up to a few seconds on a loaded box).
        assert!(
            took_over < CLAIM_TTL + Duration::from_secs(4),
            "{phase}: taken over after {took_over:?}"
        );
        takeovers.push(took_over);
        assert!(
            done["phase"] == "done" || done["phase"] == "rolled_back",
            "{phase}: {done}"
        );
        check_invariants(&f, &sapi, &sdns, &m, &sum, &hosts);
        let now = f.machine(&sapi, &m);
        let want = if done["phase"] == "done" { &to } else { &from };
        assert_eq!(now["host"], want.as_str(), "{phase}: {done}");
        eprintln!(
            "phase {k} {phase}: server {} died, {} took over in {took_over:?}, {} in {:?}",
            dead.unwrap(),
            survivor,
            done["phase"],
            t_phase.elapsed()
        );
    }
    takeovers.sort();
    eprintln!(
        "takeover median {:?} (claim TTL {CLAIM_TTL:?}); test {:?}",
        takeovers[takeovers.len() / 2],
        t_test.elapsed()
    );
}

#[test]
fn agents_fail_over_watch_any_server_and_ride_out_etcd_failures() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut f = Fleet::start("w");
    let hosts = f.hosts();
    let (a0, a1) = (f.servers[0].api(), f.servers[1].api());
    let (m, sum) = machine_with_data(&f, &a0, "web", &hosts[0]);
    let ip: ferry_addr::FleetAddr = m["private_ip"].as_str().unwrap().parse().unwrap();
    let mapping = |field: u32| {
        let old =
            ferry_addr::FleetAddr::new(ip.network(), ip.host(), ferry_addr::MachineField(field), 2);
        ferry_store::BridgeMapping {
            network_id: ip.network().get(),
            old: old.to_string(),
            new: ip.to_string(),
            retired: false,
            created_at_ms: 0,
        }
    };
    let sees = |f: &Fleet, host: &str, old: &str| {
        eventually(Duration::from_secs(10), || {
            f.bridge_olds(host).iter().any(|o| o == old)
        })
    };

    // A change no server pushed (written to etcd directly, as by a server that died between
    // its write and its push) reaches every agent through its watch, whichever server it
    // watches.
    let store = ferry_store::open(&f.store_url).unwrap();
    let quiet = mapping(0xf001);
    store.put_bridge_mapping(&quiet).unwrap();
    for h in &hosts {
        assert!(
            sees(&f, h, &quiet.old),
            "host {h} never heard of {}",
            quiet.old
        );
    }
    // Through the server an agent does not watch: it shows on that agent.
    let watching = |f: &Fleet, h: &str| {
        f.agent_get(h, "/v1/state")
            .and_then(|s| s["watch"]["server"].as_str().map(str::to_owned))
    };
    let mut w = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            w = watching(&f, &hosts[1]);
            w.is_some()
        }),
        "host 1's agent watches a server"
    );
    let w = w.unwrap();
    let other = if w == f.servers[0].agent_api() {
        &a1
    } else {
        &a0
    };
    let via_api = mapping(0xf002);
    f.ok(
        other,
        "POST",
        "/v1/bridge",
        json!({"old": via_api.old, "new": via_api.new}),
    );
    assert!(sees(&f, &hosts[1], &via_api.old));
    // DNS of one server follows a machine created through the other.
    let (c, _) = machine_with_data(&f, &a1, "cache", &hosts[1]);
    let cname = format!("{}.vm.cache.internal", c["id"].as_str().unwrap());
    let cip: std::net::Ipv6Addr = c["private_ip"].as_str().unwrap().parse().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || aaaa_at(
            &f.servers[0].dns(),
            &cname
        ) == [cip]),
        "server 0's DNS names a machine created through server 1"
    );

    // Server 0 (every agent's first) dies: reports reach server 1. The machine's command ends
    // by itself (restart policy "no"), its agent reports the exit.
    f.ok(&a0, "POST", "/v1/apps", json!({"app_name": "job"}));
    let job = f.ok(
        &a0,
        "POST",
        "/v1/apps/job/machines",
        json!({"host": hosts[2], "config": {
            "init": {"cmd": ["sh", "-c", "while [ ! -f /tmp/stop ]; do sleep 0.05; done"]},
            "restart": {"policy": "no"},
        }}),
    );
    assert_eq!(job["state"], "started", "{job}");
    f.servers[0].kill();
    f.exec(&a1, &job, &["touch", "/tmp/stop"]);
    assert!(
        eventually(Duration::from_secs(20), || f.machine(&a1, &job)["state"]
            == "stopped"),
        "the exit report reached server 1: {}",
        f.machine(&a1, &job)
    );
    let events = f
        .get(
            &a1,
            &format!(
                "/v1/apps/job/machines/{}/events",
                job["id"].as_str().unwrap()
            ),
        )
        .unwrap();
    let exits = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "exit")
        .count();
    assert_eq!(exits, 1, "recorded once: {events}");
    // An agent that restarts registers with the server that is up (its new endpoint).
    let old_ep = f.agent(&hosts[2]).unwrap();
    let pid: i32 = std::fs::read_to_string(
        f.dir
            .join("hosts")
            .join("hosts")
            .join(&hosts[2])
            .join("agent.pid"),
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || {
            let ep = f.agent(&hosts[2]).unwrap_or_default();
            ep != old_ep
                && f.get(&a1, "/v1/hosts").is_some_and(|l| {
                    l.as_array()
                        .unwrap()
                        .iter()
                        .any(|h| h["id"] == hosts[2].as_str() && h["endpoint"] == ep.as_str())
                })
        }),
        "the restarted agent registered with server 1"
    );
    f.servers[0].start(&f.store_url.clone(), &[], 0);

    // One etcd member down: creates and migrations go on.
    f.etcd.kill(1);
    let (d, dsum) = machine_with_data(&f, &a0, "docs", &hosts[1]);
    let mig = f.ok(
        &a1,
        "POST",
        &format!(
            "/v1/apps/docs/machines/{}/migrate",
            d["id"].as_str().unwrap()
        ),
        json!({"to": hosts[2]}),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = f
            .get(
                &a0,
                &format!("/v1/migrations/{}", mig["id"].as_str().unwrap()),
            )
            .unwrap();
        if v["phase"] == "done" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "migration with a member down: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    check_invariants(&f, &a0, &f.servers[0].dns(), &d, &dsum, &hosts);

    // Every member down: 503 with a clear error, nothing changes, machines run, DNS answers.
    f.etcd.kill(0);
    f.etcd.kill(2);
    let (s, e) = f
        .call(&a0, "POST", "/v1/apps", Some(json!({"app_name": "nope"})))
        .unwrap();
    assert_eq!((s, e["code"].as_str()), (503, Some("unavailable")), "{e}");
    assert!(
        e["error"].as_str().is_some_and(|t| !t.is_empty()),
        "a clear error: {e}"
    );
    let (s, _) = f.call(&a1, "GET", "/v1/hosts", None).unwrap();
    assert_eq!(s, 503);
    let mid = m["id"].as_str().unwrap();
    assert_eq!(
        f.running_on(&hosts, mid),
        [hosts[0].as_str()],
        "machines keep running"
    );
    let name = format!("{mid}.vm.web.internal");
    let mip: std::net::Ipv6Addr = m["private_ip"].as_str().unwrap().parse().unwrap();
    for s in &f.servers {
        assert_eq!(
            aaaa_at(&s.dns(), &name),
            [mip],
            "DNS answers with etcd down"
        );
    }

    // etcd back: service resumes with no manual step (bounded), the refused create changed
    // nothing, and the watches carry changes again.
    f.etcd.restart_all().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || f
            .call(&a0, "GET", "/v1/apps", None)
            .is_ok_and(|(s, _)| s == 200)),
        "service did not resume after etcd came back"
    );
    let apps = f.get(&a1, "/v1/apps").unwrap();
    assert!(
        !apps.as_array().unwrap().iter().any(|a| a["name"] == "nope"),
        "{apps}"
    );
    f.ok(&a1, "POST", "/v1/apps", json!({"app_name": "nope"}));
    let after = mapping(0xf003);
    ferry_store::open(&f.store_url)
        .unwrap()
        .put_bridge_mapping(&after)
        .unwrap();
    for h in &hosts {
        assert!(sees(&f, h, &after.old), "host {h} after etcd came back");
    }
    check_invariants(&f, &a1, &f.servers[1].dns(), &m, &sum, &hosts);
}

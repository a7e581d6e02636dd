//! A whole `ferry dev` fleet per test (unique name, port and state directory), driven over its
//! real HTTP API and CLI, stopped and cleaned up on drop even when the test panics.
#![allow(dead_code)]

pub mod oci;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

pub struct Dev {
    pub name: String,
    pub api: String,
    /// The operator DNS listener (UDP and TCP on 127.0.0.1).
    pub dns: String,
    pub state: PathBuf,
    hosts: usize,
    extra: Vec<String>,
    /// Environment for the `ferry dev` process (and so its agents), e.g. crash hooks.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    /// The fleet's admin token (`admin.token` in its state directory, written by `ferry dev`):
    /// every call of [`Dev::call`] and [`Dev::cli`] sends it.
    pub token: String,
    http: reqwest::blocking::Client,
    /// With `FERRY_TEST_STORE=etcd`: the etcd this fleet's state lives in (under its own key
    /// prefix), kept up while the fleet lives; dropped after it.
    _etcd: Option<std::sync::Arc<ferry_store::testing::EtcdCluster>>,
}

/// `FERRY_TEST_STORE=etcd` runs every dev fleet of the tests on etcd instead of SQLite (the
/// test script runs the end-to-end tests once more so), unless the test chose a store itself.
fn test_store(
    name: &str,
    extra: &mut Vec<String>,
) -> Option<std::sync::Arc<ferry_store::testing::EtcdCluster>> {
    if std::env::var("FERRY_TEST_STORE").as_deref() != Ok("etcd")
        || extra.iter().any(|a| a == "--store")
    {
        return None;
    }
    let etcd = ferry_store::testing::shared_etcd();
    extra.push("--store".into());
    extra.push(etcd.url(name));
    Some(etcd)
}

/// A blocking HTTP client that sends `token` as its bearer token on every request.
pub fn authed_client(token: &str) -> reqwest::blocking::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .default_headers(h)
        .build()
        .unwrap()
}

/// A client of a fleet's agents as a server is: agents answer over mutual TLS to a server's
/// role certificate from the fleet CA only (the one in `tls`), made here.
pub fn agent_client(tls: &Path, timeout: Duration) -> reqwest::blocking::Client {
    let ca = ferry_pki::Ca::load(tls).unwrap();
    let me = ca.issue_server_role(&["127.0.0.1".into()]).unwrap();
    reqwest::blocking::Client::builder()
        .timeout(timeout)
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .identity(
            reqwest::Identity::from_pem(format!("{}\n{}", me.key_pem, me.cert_pem).as_bytes())
                .unwrap(),
        )
        .build()
        .unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Dev {
    pub fn start(tag: &str, hosts: usize) -> Dev {
        Dev::start_with(tag, hosts, &[])
    }

    /// Like [`Dev::start`], with extra `ferry dev` flags.
    pub fn start_with(tag: &str, hosts: usize, extra: &[&str]) -> Dev {
        Dev::start_env(tag, hosts, extra, &[])
    }

    /// Like [`Dev::start_with`], with environment variables for `ferry dev` and its agents.
    pub fn start_env(tag: &str, hosts: usize, extra: &[&str], env: &[(&str, &str)]) -> Dev {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "e{tag}{:x}{}",
            std::process::id() & 0xffff,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let state = std::env::temp_dir().join(format!("ferry-test-{name}"));
        let _ = std::fs::remove_dir_all(&state);
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let etcd = test_store(&name, &mut extra);
        let mut d = Dev {
            name,
            api: String::new(),
            dns: String::new(),
            state,
            hosts,
            extra,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            token: String::new(),
            http: reqwest::blocking::Client::new(),
            _etcd: etcd,
        };
        d.boot();
        d
    }

    /// A fleet this test runs itself (a `ferry server` and `ferry agent`s it started): the
    /// same API helpers, and on drop the same cleanup of namespaces, pins and `state` (stop
    /// the processes first).
    pub fn external(name: &str, api: &str, token: &str, state: &Path) -> Dev {
        Dev {
            name: name.to_owned(),
            api: api.to_owned(),
            dns: String::new(),
            state: state.to_owned(),
            hosts: 0,
            extra: Vec::new(),
            env: Vec::new(),
            child: None,
            token: token.to_owned(),
            http: authed_client(token),
            _etcd: None,
        }
    }

    /// The `ferry dev` process (its server and DNS publisher; the agents are its children).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The network namespace of machine `m` (from its address: `fdaa:net:host:field::2`).
    pub fn machine_netns(&self, m: &Value) -> String {
        let ip: std::net::Ipv6Addr = m["private_ip"].as_str().unwrap().parse().unwrap();
        let s = ip.segments();
        let host = (u32::from(s[3]) << 16) | u32::from(s[4]);
        let field = (u32::from(s[5]) << 16) | u32::from(s[6]);
        format!("ferry-{}-m{host:x}-{field:x}", self.name)
    }

    /// Starts `ferry dev` on this fleet's state directory and waits for every agent.
    pub fn boot(&mut self) {
        let port = free_port();
        self.api = format!("http://127.0.0.1:{port}");
        self.dns = format!("127.0.0.1:{}", free_port());
        let child = Command::new(FERRY)
            .args([
                "dev",
                "--no-demo",
                "--name",
                &self.name,
                "--hosts",
                &self.hosts.to_string(),
            ])
            .arg("--state-dir")
            .arg(&self.state)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--dns-listen",
                &self.dns,
            ])
            .args(&self.extra)
            // The CLI's token file goes into the fleet's own directory, not the user's home.
            .env("FERRY_CONFIG_DIR", self.state.join("cli"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning ferry dev");
        self.child = Some(child);
        // The control plane writes its admin token before it listens.
        let file = self.state.join("admin.token");
        assert!(
            eventually(Duration::from_secs(60), || file.exists()),
            "ferry dev wrote no admin token to {}",
            file.display()
        );
        self.token = std::fs::read_to_string(&file).unwrap().trim().to_owned();
        self.http = authed_client(&self.token);
        let ok = eventually(Duration::from_secs(60), || {
            self.try_get("/v1/hosts").is_some_and(|v| {
                v.as_array()
                    .is_some_and(|a| a.len() == self.hosts && a.iter().all(|h| h["endpoint"] != ""))
            })
        });
        assert!(
            ok,
            "ferry dev did not come up with {} registered hosts",
            self.hosts
        );
    }

    /// Waits for the `ferry dev` process to end by itself (e.g. a crash hook); true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Ctrl-C: machines stop with their stop_config, the fleet goes away.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + Duration::from_secs(90);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn try_get(&self, path: &str) -> Option<Value> {
        let r = self.http.get(format!("{}{path}", self.api)).send().ok()?;
        r.status().is_success().then(|| r.json().ok()).flatten()
    }

    /// Any call: (HTTP status, JSON body).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let url = format!("{}{path}", self.api);
        let mut req = match method {
            "GET" => self.http.get(&url),
            "POST" => self.http.post(&url),
            "DELETE" => self.http.delete(&url),
            m => panic!("method {m}"),
        };
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let r = req.send().expect("API reachable");
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let (s, v) = self.call(method, path, Some(&body.to_string()));
        assert!((200..300).contains(&s), "{method} {path} -> {s}: {v}");
        v
    }

    pub fn hosts(&self) -> Vec<String> {
        self.try_get("/v1/hosts")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Creates the app if needed and a started machine on `host`.
    pub fn machine(&self, app: &str, host: &str, config: Value) -> Value {
        let _ = self.call(
            "POST",
            "/v1/apps",
            Some(&json!({"app_name": app}).to_string()),
        );
        self.ok(
            "POST",
            &format!("/v1/apps/{app}/machines"),
            json!({"host": host, "config": config}),
        )
    }

    pub fn get_machine(&self, m: &Value) -> Value {
        self.try_get(&format!(
            "/v1/apps/{}/machines/{}",
            m["app"].as_str().unwrap(),
            m["id"].as_str().unwrap()
        ))
        .unwrap()
    }

    pub fn exec(&self, m: &Value, cmd: &[&str]) -> Value {
        self.ok(
            "POST",
            &format!(
                "/v1/apps/{}/machines/{}/exec",
                m["app"].as_str().unwrap(),
                m["id"].as_str().unwrap()
            ),
            json!({"cmd": cmd, "timeout": 60}),
        )
    }

    /// A client of this fleet's agents as its server is (see [`agent_client`]).
    #[allow(dead_code)] // not every test asks agents directly
    pub fn agent_http(&self) -> reqwest::blocking::Client {
        agent_client(&self.state.join("tls"), Duration::from_secs(30))
    }

    /// The server's start-phase counters (`ferry_machine_start_phase_seconds_count` lines of
    /// `GET /metrics`): where this fleet's machine starts spent their time.
    pub fn start_phase_counts(&self) -> Vec<String> {
        self.http
            .get(format!("{}/metrics", self.api))
            .send()
            .unwrap()
            .text()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("ferry_machine_start_phase_seconds_count"))
            .map(str::to_owned)
            .collect()
    }

    /// An HTTP client that sends this fleet's admin token.
    pub fn http(&self) -> &reqwest::blocking::Client {
        &self.http
    }

    /// Runs the CLI against this fleet (with its admin token).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(FERRY)
            .args(args)
            .env("FERRY_API", &self.api)
            .env("FERRY_TOKEN", &self.token)
            .output()
            .unwrap()
    }

    /// `dig +short` against the operator listener.
    pub fn dig(&self, name: &str, qtype: &str) -> String {
        let (ip, port) = self.dns.split_once(':').unwrap();
        let out = Command::new("dig")
            .args([
                &format!("@{ip}"),
                "-p",
                port,
                "+short",
                "+time=1",
                "+tries=1",
                qtype,
                name,
            ])
            .output()
            .expect("dig (scripts/setup.sh installs dnsutils)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// AAAA answers from the operator listener, over one UDP socket (fast enough to poll).
    pub fn aaaa(&self, name: &str) -> Vec<std::net::Ipv6Addr> {
        aaaa_at(&self.dns, name)
    }

    pub fn pins(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/ferry").join(&self.name)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the machines said, for the failure report.
            for h in std::fs::read_dir(self.state.join("hosts"))
                .into_iter()
                .flatten()
                .flatten()
            {
                for m in std::fs::read_dir(h.path().join("machines"))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    for f in ["log", "exit.json"] {
                        if let Ok(t) = std::fs::read_to_string(m.path().join(f)) {
                            eprintln!("--- {}/{f}:\n{t}", m.path().display());
                        }
                    }
                }
                // Their output, as the shims kept it (`<host>/logs/<machine>/<instance>.log`).
                for m in std::fs::read_dir(h.path().join("logs"))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    for f in std::fs::read_dir(m.path()).into_iter().flatten().flatten() {
                        if let Ok(t) = std::fs::read_to_string(f.path()) {
                            let tail: Vec<&str> = t.lines().rev().take(40).collect();
                            eprintln!("--- {} (last 40 lines):", f.path().display());
                            for l in tail.into_iter().rev() {
                                eprintln!("{l}");
                            }
                        }
                    }
                }
            }
        }
        self.stop();
        // Whatever a crashed dev left: namespaces of this fleet only.
        remove_fleet_namespaces(&self.name);
        let _ = std::fs::remove_dir_all(self.pins());
        // Volume file systems a killed dev left mounted below its state dir (their loop devices
        // go with their last mount).
        ferry_agent::disk::unmount_volumes_under(&self.state);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A size-limited volume of `mb` MiB; its ID.
pub fn new_volume(dev: &Dev, mb: u64) -> String {
    let v = dev.ok("POST", "/v1/volumes", json!({"size_mb": mb}));
    v["id"].as_str().unwrap().to_owned()
}

/// Starts a migration of machine `m`; its ID.
pub fn migrate(dev: &Dev, m: &Value, body: Value) -> String {
    let r = dev.ok(
        "POST",
        &format!(
            "/v1/apps/{}/machines/{}/migrate",
            m["app"].as_str().unwrap(),
            m["id"].as_str().unwrap()
        ),
        body,
    );
    r["id"].as_str().unwrap().to_owned()
}

/// Waits (at most `timeout`) for migration `mig` to end, done or rolled back; its record.
pub fn wait_migration(dev: &Dev, mig: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (s, v) = dev.call("GET", &format!("/v1/migrations/{mig}"), None);
        if s == 200 && (v["phase"] == "done" || v["phase"] == "rolled_back") {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "migration {mig} did not end: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// AAAA answers for `name` from the DNS listener at `dns` (`IP:PORT`), over one UDP socket
/// (fast enough to poll); empty if it does not answer within 500 ms.
pub fn aaaa_at(dns: &str, name: &str) -> Vec<std::net::Ipv6Addr> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut m = Message::new();
    m.set_id(std::process::id() as u16);
    m.set_message_type(MessageType::Query);
    m.set_op_code(OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii(name).unwrap(),
        RecordType::AAAA,
    ));
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    sock.send_to(&m.to_vec().unwrap(), dns).unwrap();
    let mut buf = [0u8; 4096];
    let Ok(n) = sock.recv(&mut buf) else {
        return vec![];
    };
    let r = Message::from_vec(&buf[..n]).unwrap();
    r.answers()
        .iter()
        .filter_map(|rec| match rec.data() {
            RData::AAAA(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// Deletes the network namespaces of fleet `name` (`ferry-<name>-*`) that a killed `ferry dev`
/// left behind, and no other.
pub fn remove_fleet_namespaces(name: &str) {
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&format!("ferry-{name}-")) {
            let _ = Command::new("ip").args(["netns", "del", &n]).status();
        }
    }
}

pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A small HTTP server for machines: answers every GET with its machine ID.
pub const WEB_PY: &str = r#"import http.server, os, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(s):
        b = ("hello from %s\n" % os.environ["FERRY_MACHINE_ID"]).encode()
        s.send_response(200); s.end_headers(); s.wfile.write(b)
    def log_message(s, *a):
        pass
class S(http.server.HTTPServer):
    address_family = socket.AF_INET6
S(("::", 8080), H).serve_forever()
"#;

/// A client script: fetch http://[ip]:8080/ with a few retries.
pub fn fetch_py(ip: &str) -> String {
    format!(
        r#"import urllib.request, time
for i in range(40):
    try:
        print(urllib.request.urlopen("http://[{ip}]:8080/", timeout=2).read().decode(), end="")
        break
    except Exception as e:
        time.sleep(0.1)
else:
    raise SystemExit(1)
"#
    )
}

/// The agent process that owns `host` in `dev`'s fleet, found by its command line.
pub fn agent_pid(dev: &Dev, host: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(" agent ")
            && cmd.contains(&format!("/hosts/{host} "))
            && cmd.contains(&format!("--fleet ferry-{} ", dev.name))
        {
            return Some(pid);
        }
    }
    None
}

//! Hosts that share nothing (issue 15): each host is a network namespace with its own
//! `ferry agent` process started inside it (the agent's own namespace is the host's: no
//! `--netns`), its own state directory and cgroup subtree, joined to the others only by an
//! underlay; the server runs in a namespace of its own and the test reaches its API over a
//! management link. Each agent joins with the server's join token (its host ID and certificate
//! come from the server) and talks to the server over mutual TLS only. Nothing is wired by `ferry dev`: each agent puts the fabric programs on its
//! underlay link and keeps exactly one route per other host from what the server streams.
//!
//! Two underlays: one IPv6 L2 segment (routes straight to the peers' underlay addresses), and
//! two IPv4 subnets joined by a router namespace (every peer through the VXLAN overlay link).

mod support;

use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use support::*;

/// `ip ARGS...`, which must succeed; its output.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS...` inside namespace `ns`.
fn ip_in(ns: &str, args: &[&str]) -> String {
    ip(&[&["-n", ns], args].concat())
}

/// A command that runs inside network namespace `ns` (and only that: unlike `ip netns exec`,
/// the mount namespace, /sys and with it the cgroup and BPF file systems stay the machine's).
fn in_netns(ns: &str, cmd: Command) -> Command {
    in_host(ns, &[], cmd)
}

/// [`in_netns`], and the process joins the cgroups whose `cgroup.procs` files are `procs` (a
/// host's own subtree, which its agent then creates its machines' cgroups below).
fn in_host(ns: &str, procs: &[PathBuf], mut cmd: Command) -> Command {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    // Opened before the fork: between fork and exec only write(2) and setns(2) run.
    let procs: Vec<std::fs::File> = procs
        .iter()
        .map(|p| std::fs::OpenOptions::new().write(true).open(p).unwrap())
        .collect();
    // SAFETY: setns and write are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for p in &procs {
                // "0": the writing process itself.
                nix::unistd::write(p, b"0").map_err(std::io::Error::from)?;
            }
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    cmd
}

/// A host's own cgroup subtree: a directory `rf-<fleet>-h<i>` below this test's cgroup in
/// every hierarchy ferry uses (v1 memory, cpu, pids and the v2 tree, as this box has them).
struct HostCgroup {
    dirs: Vec<PathBuf>,
    /// The layout an agent in the subtree discovers (to find its machines' cgroups).
    layout: ferry_runtime::CgroupLayout,
}

impl HostCgroup {
    fn create(name: &str) -> HostCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let ours = ferry_runtime::CgroupLayout::parse(&mountinfo, &own).unwrap();
        let dirs: Vec<PathBuf> = ours
            .own_dirs()
            .into_iter()
            .map(|(_, d)| d.join(name))
            .collect();
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
        }
        // As /proc/self/cgroup reads for a process in the subtree.
        let moved: String = own
            .lines()
            .map(|l| {
                let (head, path) = l.rsplit_once(':').unwrap();
                format!("{head}:{}/{name}\n", path.trim_end_matches('/'))
            })
            .collect();
        HostCgroup {
            dirs,
            layout: ferry_runtime::CgroupLayout::parse(&mountinfo, &moved).unwrap(),
        }
    }

    fn procs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Machine IDs with a cgroup in this subtree (`<id>.h<host>`).
    fn machines(&self) -> Vec<String> {
        self.layout.machine_ids()
    }

    /// Kills whatever is left in it and removes it (its agent must be gone).
    fn remove(&self) {
        for name in self.layout.machine_ids() {
            if let Ok(Some(cg)) = ferry_runtime::MachineCgroup::open(&self.layout, &name) {
                cg.kill_all();
                let _ = cg.remove();
            }
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d.join("ferry"));
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Underlay {
    /// One IPv6 segment: every host on-link with every other.
    SegmentV6,
    /// Two IPv4 subnets joined by a router: every host reaches the others through VXLAN.
    RoutedV4,
    /// Two IPv6 subnets joined by a router: hosts on the other subnet through VXLAN over
    /// IPv6, hosts on their own straight.
    RoutedV6,
}

impl Underlay {
    fn routed(self) -> bool {
        self != Underlay::SegmentV6
    }
}

struct Host {
    id: u32,
    ns: String,
    addr: String,
    state: PathBuf,
    cgroup: HostCgroup,
    agent: Option<Child>,
}

struct Fleet {
    name: String,
    dir: PathBuf,
    kind: Underlay,
    server: Option<Child>,
    /// The server's address on the underlay (agents call it there).
    server_url: String,
    join: String,
    hosts: Vec<Host>,
    /// Last: its drop removes the namespaces, pins and state once the processes are gone.
    dev: Dev,
}

impl Fleet {
    fn start(tag: &str, kind: Underlay, hosts: usize) -> Fleet {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("rf{tag}{:x}{n}", std::process::id() & 0xfff);
        let dir = std::env::temp_dir().join(format!("ferry-test-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ns = |s: &str| format!("ferry-{name}-{s}");
        // The namespaces first, so a failure below still cleans them up (Dev's drop).
        let dev = Dev::external(&name, "", "", &dir);
        let (srv, mgmt_root) = (ns("srv"), format!("fm{name}"));
        for s in [ns("ula"), ns("ulb"), srv.clone()] {
            ip(&["netns", "add", &s]);
            ip_in(&s, &["link", "set", "lo", "up"]);
        }
        for seg in [ns("ula"), ns("ulb")] {
            ip_in(
                &seg,
                &[
                    "link",
                    "add",
                    "br0",
                    "type",
                    "bridge",
                    "mcast_snooping",
                    "0",
                ],
            );
            ip_in(&seg, &["link", "set", "br0", "up"]);
        }
        let (server_addr, server_url) = match kind {
            Underlay::SegmentV6 => ("fd00:77::fe/64", "https://[fd00:77::fe]:4281"),
            Underlay::RoutedV4 => ("10.77.1.100/24", "https://10.77.1.100:4281"),
            Underlay::RoutedV6 => ("fd00:77:1::fe/64", "https://[fd00:77:1::fe]:4281"),
        };
        Self::plug(&ns("ula"), "srv", &srv, server_addr, kind);
        if kind.routed() {
            let rt = ns("rt");
            ip(&["netns", "add", &rt]);
            ip_in(&rt, &["link", "set", "lo", "up"]);
            let v4 = kind == Underlay::RoutedV4;
            let (a, b) = if v4 {
                ("10.77.1.254/24", "10.77.2.254/24")
            } else {
                ("fd00:77:1::ff/64", "fd00:77:2::ff/64")
            };
            for (seg, port, addr) in [(ns("ula"), "ra", a), (ns("ulb"), "rb", b)] {
                ip_in(
                    &seg,
                    &[
                        "link", "add", port, "type", "veth", "peer", "name", port, "netns", &rt,
                    ],
                );
                ip_in(&seg, &["link", "set", port, "master", "br0", "up"]);
                ip_in(
                    &rt,
                    &["addr", "add", addr, "dev", port, "nodad"][..if v4 { 5 } else { 6 }],
                );
                ip_in(&rt, &["link", "set", port, "up"]);
            }
            let key = if v4 {
                "net.ipv4.ip_forward=1"
            } else {
                "net.ipv6.conf.all.forwarding=1"
            };
            let out = in_netns(&rt, {
                let mut c = Command::new("sysctl");
                c.args(["-qw", key]);
                c
            })
            .status()
            .unwrap();
            assert!(out.success());
        }
        // The test's own way to the API: a management link into the server's namespace.
        let mgmt = format!("fd00:78:{:x}::", (std::process::id() ^ (n << 12)) & 0xffff);
        ip(&[
            "link", "add", &mgmt_root, "type", "veth", "peer", "name", "mg0", "netns", &srv,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{mgmt}1/64"),
            "dev",
            &mgmt_root,
            "nodad",
        ]);
        ip(&["link", "set", &mgmt_root, "up"]);
        ip_in(
            &srv,
            &["addr", "add", &format!("{mgmt}2/64"), "dev", "mg0", "nodad"],
        );
        ip_in(&srv, &["link", "set", "mg0", "up"]);

        let state = dir.join("server");
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut cmd = Command::new(FERRY);
        // Agents reach it on the underlay, over mutual TLS: its certificate names that address.
        let san = server_addr.split('/').next().unwrap();
        cmd.args(["server", "--listen", "[::]:4280"])
            .args(["--agent-listen", "[::]:4281", "--agent-san", san])
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        let server = in_netns(&srv, cmd).spawn().unwrap();
        let token_file = state.join("admin.token");
        assert!(
            eventually(Duration::from_secs(30), || token_file.exists()
                && state.join("join.token").exists()
                && state.join("tls/ca.pem").exists()),
            "the server wrote no tokens"
        );
        let read = |f: &str| {
            std::fs::read_to_string(state.join(f))
                .unwrap()
                .trim()
                .to_owned()
        };
        let api = format!("http://[{mgmt}2]:4280");
        let mut dev = dev;
        dev = {
            let d = Dev::external(&name, &api, &read("admin.token"), &dir);
            // The placeholder's drop must not clean up what the real one owns.
            std::mem::forget(dev);
            d
        };
        let mut f = Fleet {
            name,
            dir,
            kind,
            server: Some(server),
            server_url: server_url.to_owned(),
            join: read("join.token"),
            hosts: Vec::new(),
            dev,
        };
        assert!(
            eventually(Duration::from_secs(30), || f
                .dev
                .call("GET", "/v1/hosts", None)
                .0
                == 200),
            "the API did not answer on the management link"
        );
        for _ in 0..hosts {
            f.add_host();
        }
        f
    }

    /// A veth from segment `seg` into namespace `ns` (`ul0` there), addressed `addr`.
    fn plug(seg: &str, port: &str, ns: &str, addr: &str, kind: Underlay) {
        ip_in(
            seg,
            &[
                "link", "add", port, "type", "veth", "peer", "name", "ul0", "netns", ns,
            ],
        );
        ip_in(seg, &["link", "set", port, "master", "br0", "up"]);
        if kind == Underlay::RoutedV4 {
            ip_in(ns, &["addr", "add", addr, "dev", "ul0"]);
        } else {
            ip_in(ns, &["addr", "add", addr, "dev", "ul0", "nodad"]);
        }
        ip_in(ns, &["link", "set", "ul0", "up"]);
        let gw = match kind {
            Underlay::SegmentV6 => None,
            Underlay::RoutedV4 if addr.starts_with("10.77.1.") => Some("10.77.1.254"),
            Underlay::RoutedV4 => Some("10.77.2.254"),
            Underlay::RoutedV6 if addr.starts_with("fd00:77:1::") => Some("fd00:77:1::ff"),
            Underlay::RoutedV6 => Some("fd00:77:2::ff"),
        };
        if let Some(gw) = gw {
            ip_in(ns, &["route", "add", "default", "via", gw]);
        }
    }

    /// A new host: its namespace on the underlay, then its agent. Host i (from 1) of a routed
    /// fleet is on subnet A if odd, B if even.
    fn add_host(&mut self) -> usize {
        let i = self.hosts.len() + 1;
        let ns = format!("ferry-{}-h{i}", self.name);
        ip(&["netns", "add", &ns]);
        ip_in(&ns, &["link", "set", "lo", "up"]);
        let (seg, addr, cidr) = match self.kind {
            Underlay::SegmentV6 => ("ula", format!("fd00:77::{i}"), 64),
            Underlay::RoutedV4 if i % 2 == 1 => ("ula", format!("10.77.1.{i}"), 24),
            Underlay::RoutedV4 => ("ulb", format!("10.77.2.{i}"), 24),
            Underlay::RoutedV6 if i % 2 == 1 => ("ula", format!("fd00:77:1::{i}"), 64),
            Underlay::RoutedV6 => ("ulb", format!("fd00:77:2::{i}"), 64),
        };
        Self::plug(
            &format!("ferry-{}-{seg}", self.name),
            &format!("h{i}"),
            &ns,
            &format!("{addr}/{cidr}"),
            self.kind,
        );
        self.hosts.push(Host {
            id: 0, // the server gives it when the agent joins
            cgroup: HostCgroup::create(&format!("rf-{}-h{i}", self.name)),
            ns,
            addr,
            state: self.dir.join(format!("h{i}")),
            agent: None,
        });
        self.start_agent(i - 1);
        // The host's ID, from the identity its agent got by joining.
        let state = self.hosts[i - 1].state.clone();
        let mut joined = None;
        assert!(
            eventually(Duration::from_secs(60), || {
                joined = ferry_agent::identity::load(&state).ok().flatten();
                joined.is_some()
            }),
            "host {i} did not join"
        );
        self.hosts[i - 1].id = joined.unwrap().host_id.get();
        let id = format!("{:x}", self.hosts[i - 1].id);
        assert!(
            eventually(Duration::from_secs(60), || self.host_ids().contains(&id)),
            "host {id} did not register"
        );
        i - 1
    }

    fn start_agent(&mut self, k: usize) {
        let h = &self.hosts[k];
        std::fs::create_dir_all(&h.state).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(h.state.with_extension("log"))
            .unwrap();
        let mut cmd = Command::new(FERRY);
        cmd.args(["agent", "--region", "test", "--underlay", &h.addr])
            .args(["--fleet", &format!("ferry-{}", self.name)])
            .arg("--state-dir")
            .arg(&h.state)
            .args(["--server", &self.server_url])
            .env("FERRY_JOIN_TOKEN", &self.join)
            .env("FERRY_SERVER_CA", self.dir.join("server/tls/ca.pem"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        let child = in_host(&h.ns, &h.cgroup.procs(), cmd).spawn().unwrap();
        self.hosts[k].agent = Some(child);
    }

    fn kill_agent(&mut self, k: usize) {
        if let Some(mut c) = self.hosts[k].agent.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn host_ids(&self) -> Vec<String> {
        let (s, v) = self.dev.call("GET", "/v1/hosts", None);
        if s != 200 {
            return Vec::new();
        }
        v.as_array()
            .unwrap()
            .iter()
            .filter(|h| h["underlay"] != "")
            .map(|h| h["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Host `k`'s infra /48, as `ip` prints it.
    fn infra_prefix(&self, k: usize) -> String {
        ferry_addr::host_infra_prefix(ferry_addr::HostId::new(self.hosts[k].id).unwrap())
            .to_string()
    }

    fn hex(&self, k: usize) -> String {
        format!("{:x}", self.hosts[k].id)
    }

    /// Host `k`'s routes to other hosts: the static /48s of the fleet's space, as
    /// `(prefix, device)`.
    fn host_routes(&self, k: usize) -> Vec<(String, String)> {
        ip_in(
            &self.hosts[k].ns,
            &["-6", "route", "show", "proto", "static"],
        )
        .lines()
        .filter(|l| {
            l.starts_with("fdaa:") && l.split_whitespace().next().unwrap().ends_with("::/48")
        })
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let dev = w
                .iter()
                .position(|x| *x == "dev")
                .map(|p| w[p + 1].to_owned())
                .unwrap_or_default();
            (w[0].to_owned(), dev)
        })
        .collect()
    }

    /// Waits until every live host `alive` routes to exactly the other live hosts; how long
    /// that took.
    fn routes_converge(&self, alive: &[usize]) -> Duration {
        let t0 = Instant::now();
        let want = |k: usize| -> Vec<String> {
            let mut v: Vec<String> = alive
                .iter()
                .filter(|&&o| o != k)
                .map(|&o| self.infra_prefix(o))
                .collect();
            v.sort();
            v
        };
        let ok = eventually(Duration::from_secs(20), || {
            alive.iter().all(|&k| {
                let mut have: Vec<String> =
                    self.host_routes(k).into_iter().map(|(p, _)| p).collect();
                have.sort();
                have == want(k)
            })
        });
        assert!(
            ok,
            "routes did not converge: {:?}",
            alive
                .iter()
                .map(|&k| (k, self.host_routes(k)))
                .collect::<Vec<_>>()
        );
        t0.elapsed()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for f in ["server.log", "h1.log", "h2.log", "h3.log", "h4.log"] {
                if let Ok(t) = std::fs::read_to_string(self.dir.join(f)) {
                    let tail: Vec<&str> = t.lines().rev().take(30).collect();
                    eprintln!("--- {f} (last 30 lines):");
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        // Machines first (their agents stop them), then the processes.
        let (s, apps) = self.dev.call("GET", "/v1/apps", None);
        for app in apps.as_array().into_iter().flatten().filter(|_| s == 200) {
            let app = app["name"].as_str().unwrap_or_default();
            let (_, ms) = self
                .dev
                .call("GET", &format!("/v1/apps/{app}/machines"), None);
            for m in ms.as_array().into_iter().flatten() {
                let id = m["id"].as_str().unwrap_or_default();
                let _ = self.dev.call(
                    "DELETE",
                    &format!("/v1/apps/{app}/machines/{id}?force=true"),
                    None,
                );
            }
        }
        for k in 0..self.hosts.len() {
            self.kill_agent(k);
        }
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever still runs in a host's subtree (a test that panicked mid-way), then the
        // subtrees themselves.
        for h in &self.hosts {
            h.cgroup.remove();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("fm{}", self.name)])
            .status();
        // Then `dev`'s drop: the fleet's namespaces, pins, volumes and state directory.
    }
}

/// A web server that also serves 1 MiB at `/big` (bigger than any MTU: it crosses only if
/// path-MTU discovery works end to end).
const WEB_BIG_PY: &str = r#"import http.server, os, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(s):
        if s.path == "/big":
            b = b"x" * (1 << 20)
        else:
            b = ("hello from %s\n" % os.environ["FERRY_MACHINE_ID"]).encode()
        s.send_response(200); s.send_header("Content-Length", str(len(b))); s.end_headers(); s.wfile.write(b)
    def log_message(s, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
S(("::", 8080), H).serve_forever()
"#;

/// From machine `from`, GET `http://NAME:8080/PATH` (a name through the host's DNS, or an
/// address); (exit code, stdout).
fn fetch(dev: &Dev, from: &Value, host: &str, path: &str) -> (i64, String) {
    let py = format!(
        r#"import urllib.request, time, sys
for i in range(50):
    try:
        b = urllib.request.urlopen("http://{host}:8080{path}", timeout=3).read()
        print(len(b) if len(b) > 4096 else b.decode(), end="")
        break
    except Exception as e:
        err = e
        time.sleep(0.1)
else:
    print(err, file=sys.stderr)
    raise SystemExit(1)
"#
    );
    let r = dev.exec(from, &["python3", "-c", &py]);
    (
        r["exit_code"].as_i64().unwrap_or(-1),
        r["stdout"].as_str().unwrap_or_default().to_owned(),
    )
}

/// `from` gets `to`'s greeting by `to`'s name.
fn serves_by_name(dev: &Dev, from: &Value, to: &Value) {
    let (code, out) = fetch(dev, from, &name_of(to), "/");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        format!("hello from {}", to["id"].as_str().unwrap())
    );
}

/// `from` gets all of `to`'s 1 MiB by name (full-size segments end to end).
fn serves_big(dev: &Dev, from: &Value, to: &Value) {
    let (code, out) = fetch(dev, from, &name_of(to), "/big");
    assert_eq!((code, out.as_str()), (0, "1048576"), "from {}", from["id"]);
}

/// Whether `from`'s TCP connection to `to`'s address on port 8080 fails (isolation).
fn refused(dev: &Dev, from: &Value, to: &Value) -> bool {
    let py = format!(
        "import socket\ns = socket.socket(socket.AF_INET6)\ns.settimeout(2)\ntry:\n    \
         s.connect(('{}', 8080))\n    print('connected')\nexcept OSError:\n    print('refused')",
        to["private_ip"].as_str().unwrap()
    );
    let r = dev.exec(from, &["python3", "-c", &py]);
    match r["stdout"].as_str().unwrap().trim() {
        "refused" => true,
        "connected" => false,
        _ => panic!("{r}"),
    }
}

fn name_of(m: &Value) -> String {
    format!(
        "{}.vm.{}.internal",
        m["id"].as_str().unwrap(),
        m["app"].as_str().unwrap()
    )
}

fn web(dev: &Dev, app: &str, org: &str, host: &str) -> Value {
    let _ = dev.call(
        "POST",
        "/v1/apps",
        Some(&json!({"app_name": app, "org_slug": org}).to_string()),
    );
    dev.machine(
        app,
        host,
        json!({"init": {"cmd": ["python3", "-c", WEB_BIG_PY]},
               "checks": {"web": {"type": "tcp", "port": 8080, "kind": "readiness",
                                   "interval": "200ms", "timeout": "1s"}}}),
    )
}

fn idle(dev: &Dev, app: &str, org: &str, host: &str) -> Value {
    let _ = dev.call(
        "POST",
        "/v1/apps",
        Some(&json!({"app_name": app, "org_slug": org}).to_string()),
    );
    dev.machine(app, host, json!({"init": {"cmd": ["sleep", "infinity"]}}))
}

#[test]
fn hosts_on_one_ipv6_segment_share_nothing_but_the_underlay() {
    let mut f = Fleet::start("s", Underlay::SegmentV6, 3);
    let took = f.routes_converge(&[0, 1, 2]);
    eprintln!("3 hosts: every host routes to the 2 others after {took:?}");
    for k in 0..3 {
        for (p, dev) in f.host_routes(k) {
            assert_eq!(
                dev, "ul0",
                "host {k}: {p} should go straight over the segment"
            );
        }
    }

    // Machines on different hosts reach each other by name (each host's own DNS).
    let w = web(&f.dev, "rfweb", "acme", &f.hex(0));
    let c = idle(&f.dev, "rfcli", "acme", &f.hex(1));
    serves_by_name(&f.dev, &c, &w);
    serves_big(&f.dev, &c, &w);
    // Each machine's cgroup is in its own host's subtree, and only there.
    let cg_of = |k: usize| f.hosts[k].cgroup.machines();
    let (wid, cid) = (w["id"].as_str().unwrap(), c["id"].as_str().unwrap());
    assert!(
        cg_of(0).iter().any(|n| n.starts_with(wid)),
        "{:?}",
        cg_of(0)
    );
    assert!(
        cg_of(1).iter().any(|n| n.starts_with(cid)),
        "{:?}",
        cg_of(1)
    );
    assert!(
        !cg_of(1).iter().any(|n| n.starts_with(wid))
            && !cg_of(0).iter().any(|n| n.starts_with(cid))
    );

    // Another org's machine: no name, no packets, and its token sees nothing of acme.
    let g = idle(&f.dev, "rfother", "globex", &f.hex(2));
    let r = f.dev.exec(
        &g,
        &["python3", "-c", &format!(
            "import socket\ntry:\n    socket.getaddrinfo('{}', 8080)\n    print('resolved')\nexcept socket.gaierror:\n    print('nxdomain')",
            name_of(&w)
        )],
    );
    assert_eq!(r["stdout"].as_str().unwrap().trim(), "nxdomain", "{r}");
    assert!(refused(&f.dev, &g, &w), "another org's machine connected");
    // The route count: one /48 per other host and one /112 per local machine, nothing per
    // remote machine (as on a dev fleet: ferry-net's dataplane tests).
    for (k, local) in [(0, &w), (1, &c), (2, &g)] {
        let all = ip_in(&f.hosts[k].ns, &["-6", "route", "show", "proto", "static"]);
        let fleet: Vec<&str> = all
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|d| d.starts_with("fdaa:"))
            .collect();
        let ip: std::net::Ipv6Addr = local["private_ip"].as_str().unwrap().parse().unwrap();
        let own = std::net::Ipv6Addr::from(u128::from(ip) & !0xffff);
        let has_own = fleet.iter().any(|d| {
            d.strip_suffix("/112")
                .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
                == Some(own)
        });
        assert_eq!(fleet.len(), 3, "host {k}: {all}");
        assert_eq!(
            fleet.iter().filter(|d| d.ends_with("/48")).count(),
            2,
            "host {k}: {all}"
        );
        assert!(has_own, "host {k}: {own}/112 missing in {all}");
    }
    let tok = f.dev.ok(
        "POST",
        "/v1/tokens",
        json!({"kind": "org", "org": "globex"}),
    );
    let globex = authed_client(tok["token"].as_str().unwrap());
    let url = format!(
        "{}/v1/apps/rfweb/machines/{}",
        f.dev.api,
        w["id"].as_str().unwrap()
    );
    assert_eq!(globex.get(&url).send().unwrap().status().as_u16(), 404);
    assert_eq!(
        globex
            .delete(format!("{url}?force=true"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    assert_eq!(f.dev.get_machine(&w)["state"], "started");

    // An agent answers its servers only. A machine cannot even reach its host's agent (its
    // packets may go to fdaa::/16 only); a process on the underlay without a server's
    // certificate gets no TLS session, let alone an answer.
    let agent_ep = format!("[{}]:4282", f.hosts[1].addr);
    let r = f.dev.exec(
        &c,
        &[
            "python3",
            "-c",
            &format!(
                "import socket\ntry:\n    socket.create_connection(('{}', 4282), timeout=2)\n    \
                 print('connected')\nexcept OSError:\n    print('refused')",
                f.hosts[1].addr
            ),
        ],
    );
    assert_eq!(r["stdout"].as_str().unwrap().trim(), "refused", "{r}");
    for insecure in [false, true] {
        let mut curl = Command::new("curl");
        curl.args(["-s", "-o", "/dev/null", "--max-time", "5"])
            .args(if insecure { vec!["-k"] } else { vec![] })
            .arg(format!("https://{agent_ep}/v1/state"));
        let out = in_netns(&format!("ferry-{}-srv", f.name), curl)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "curl (insecure: {insecure}) reached the agent"
        );
    }

    // A migration across hosts: the volume's bytes cross the underlay; the name follows.
    let vol = new_volume(&f.dev, 16);
    let _ = f.dev.call(
        "POST",
        "/v1/apps",
        Some(&json!({"app_name": "rfdb", "org_slug": "acme"}).to_string()),
    );
    let db = f.dev.machine(
        "rfdb",
        &f.hex(0),
        json!({"init": {"cmd": ["python3", "-c", WEB_BIG_PY]},
               "mounts": [{"volume": vol, "path": "/data"}],
               "checks": {"web": {"type": "tcp", "port": 8080, "kind": "readiness",
                                   "interval": "200ms", "timeout": "1s"}}}),
    );
    let r = f.dev.exec(
        &db,
        &[
            "sh",
            "-c",
            "head -c 4000000 /dev/urandom > /data/blob && sha256sum /data/blob",
        ],
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    let before = r["stdout"].as_str().unwrap().to_owned();
    let mig = migrate(&f.dev, &db, json!({"to": f.hex(2)}));
    let done = wait_migration(&f.dev, &mig, Duration::from_secs(120));
    assert_eq!(done["phase"], "done", "{done}");
    let moved = f.dev.get_machine(&db);
    assert!(
        moved["private_ip"]
            .as_str()
            .unwrap()
            .parse::<ferry_addr::FleetAddr>()
            .unwrap()
            .host()
            .get()
            == f.hosts[2].id,
        "{moved}"
    );
    let r = f.dev.exec(&moved, &["sha256sum", "/data/blob"]);
    assert_eq!(r["stdout"].as_str().unwrap(), before);
    serves_by_name(&f.dev, &c, &db);

    // kill -9 the agent of the web machine's host: the machine keeps serving (the data plane
    // and the other hosts' DNS do not need it); a new agent takes it over.
    f.kill_agent(0);
    // (With host 0's agent dead.)
    serves_by_name(&f.dev, &c, &w);
    f.start_agent(0);
    assert!(
        eventually(Duration::from_secs(30), || {
            let (s, r) = f.dev.call(
                "POST",
                &format!("/v1/apps/rfweb/machines/{}/exec", w["id"].as_str().unwrap()),
                Some(&json!({"cmd": ["true"], "timeout": 10}).to_string()),
            );
            s == 200 && r["exit_code"] == 0
        }),
        "the restarted agent did not take the machine over"
    );
    assert_eq!(f.dev.get_machine(&w)["state"], "started");
    f.routes_converge(&[0, 1, 2]);

    // A fourth host joins while machines run: every host then routes to exactly the others.
    let t0 = Instant::now();
    let k4 = f.add_host();
    let took = f.routes_converge(&[0, 1, 2, 3]);
    eprintln!(
        "host 4 joined: registered after {:?}, every host routes to it {took:?} later",
        t0.elapsed() - took
    );
    let c4 = idle(&f.dev, "rfcli4", "acme", &f.hex(k4));
    serves_by_name(&f.dev, &c4, &w);

    // A host leaves: refused while a machine is placed there (nothing changes), then, once it
    // is empty and its agent stopped, every other host drops its route.
    let hex4 = f.hex(k4);
    let (s, v) = f.dev.call("DELETE", &format!("/v1/hosts/{hex4}"), None);
    assert_eq!(s, 409, "{v}");
    assert!(f.host_ids().contains(&hex4));
    f.dev.ok(
        "DELETE",
        &format!(
            "/v1/apps/rfcli4/machines/{}?force=true",
            c4["id"].as_str().unwrap()
        ),
        json!({}),
    );
    f.kill_agent(k4);
    let out = f.dev.cli(&["host", "remove", &hex4, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!f.host_ids().contains(&hex4));
    let took = f.routes_converge(&[0, 1, 2]);
    eprintln!("host 4 left: every other host dropped its route after {took:?}");
    serves_by_name(&f.dev, &c, &w);
}

#[test]
fn hosts_on_two_ipv4_subnets_reach_each_other_through_the_overlay() {
    let f = Fleet::start("v", Underlay::RoutedV4, 3);
    let took = f.routes_converge(&[0, 1, 2]);
    eprintln!("3 hosts on 2 subnets: routes after {took:?}");
    for k in 0..3 {
        for (p, dev) in f.host_routes(k) {
            assert_eq!(
                dev, "ferry-vx0",
                "host {k}: {p} should go through the overlay"
            );
        }
    }
    // The overlay link leaves room for its own headers (VXLAN over IPv4: 50 bytes).
    let link = ip_in(&f.hosts[1].ns, &["link", "show", "ferry-vx0"]);
    assert!(link.contains("mtu 1450"), "{link}");

    // Host 1 is on subnet A, host 2 on subnet B: by name, through the router.
    let w = web(&f.dev, "rvweb", "acme", &f.hex(0));
    let c = idle(&f.dev, "rvcli", "acme", &f.hex(1));
    serves_by_name(&f.dev, &c, &w);
    // 1 MiB in full-size segments (the machines' MTU is 1500, the overlay's 1450): it arrives
    // only if the overlay's Packet Too Big reaches the sending machine.
    serves_big(&f.dev, &c, &w);
    let (code, out) = fetch(
        &f.dev,
        &w,
        &format!("[{}]", c["private_ip"].as_str().unwrap()),
        "/",
    );
    // The client runs no server: refused, not a black hole (an answer crossed back).
    assert_ne!(code, 0, "{out}");

    // And the other org's machine on the third host is unreachable across the overlay too.
    let g = idle(&f.dev, "rvother", "globex", &f.hex(2));
    assert!(refused(&f.dev, &g, &w), "another org's machine connected");
}

#[test]
fn hosts_on_two_ipv6_subnets_route_on_link_peers_straight_and_others_through_the_overlay() {
    let f = Fleet::start("w", Underlay::RoutedV6, 3);
    f.routes_converge(&[0, 1, 2]);
    // Hosts 1 and 3 (indexes 0 and 2) share subnet A; host 2 is on B.
    let dev_of = |k: usize, peer: usize| -> String {
        let p = f.infra_prefix(peer);
        f.host_routes(k)
            .into_iter()
            .find(|(x, _)| *x == p)
            .map(|(_, d)| d)
            .unwrap()
    };
    assert_eq!(dev_of(0, 2), "ul0");
    assert_eq!(dev_of(2, 0), "ul0");
    assert_eq!(dev_of(0, 1), "ferry-vx0");
    assert_eq!(dev_of(1, 0), "ferry-vx0");
    assert_eq!(dev_of(1, 2), "ferry-vx0");
    // VXLAN over IPv6: 70 bytes of headers.
    let link = ip_in(&f.hosts[1].ns, &["link", "show", "ferry-vx0"]);
    assert!(link.contains("mtu 1430"), "{link}");
    let w = web(&f.dev, "rwweb", "acme", &f.hex(0));
    for k in [1, 2] {
        let c = idle(&f.dev, &format!("rwcli{k}"), "acme", &f.hex(k));
        serves_big(&f.dev, &c, &w);
    }
}

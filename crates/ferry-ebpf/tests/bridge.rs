//! The address-mapping bridge on real namespaces, cgroups and eBPF (root, as CI is).
//!
//! Each test builds its own tiny topology, without the rest of ferry: two network namespaces
//! "machines" A (client) and B (server) joined by a veth pair, guest-form /128 addresses of
//! network 1, on-link routes for `fdaa::/16`, and cgroup v2 machine cgroups for the clients. The
//! client is a short Python program started in A's cgroup (joined *before* `ip netns exec`, which
//! remounts /sys) and inside A's namespace; it reports what came back over the socket. Servers are
//! threads in B bound to B's addresses only.
//!
//! B's old address `B_OLD` exists nowhere: without the bridge, connecting to it times out in
//! neighbour discovery.

use ferry_addr::NetworkId;
use ferry_ebpf::bridge::{cgroup_id, Bridge, BridgeError, BridgeStat, Mapping};
use ferry_net::netns::{spawn_in, NetNs};
use ferry_runtime::{CgroupLayout, Limits, MachineCgroup};
use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddrV6, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const A: &str = "fdaa:0:1:8000:0:0:1:2";
const B_NEW: &str = "fdaa:0:1:8000:1:0:2:2";
const B_OLD: &str = "fdaa:0:1:8000:0:0:9:2";
/// Network 2's pair: B also holds `N2_NEW`, so a wrongly applied net-2 mapping would reach it.
const N2_NEW: &str = "fdaa:0:2:8000:1:0:2:2";
const N2_OLD: &str = "fdaa:0:2:8000:0:0:9:2";
const PORT: u16 = 7000;
/// Client timeout for connections that must not succeed.
const SHORT: f64 = 0.5;
/// Client timeout for connections that must succeed.
const LONG: f64 = 5.0;

fn ip(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn net(n: u32) -> NetworkId {
    NetworkId::new(n).unwrap()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ipcmd(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// What a server saw: (peer, payload, over TCP?).
type Log = Arc<Mutex<Vec<(Ipv6Addr, Vec<u8>, bool)>>>;

/// TCP and UDP echo servers bound to one address inside a namespace.
struct Server {
    log: Log,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<(), ferry_net::NetError>>>,
}

impl Server {
    fn start(ns: &NetNs, addr: Ipv6Addr) -> Server {
        let log: Log = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let sa = SocketAddrV6::new(addr, PORT, 0, 0);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (l, s, r) = (log.clone(), stop.clone(), ready_tx.clone());
        let tcp = spawn_in(ns, move || {
            let lst = TcpListener::bind(sa).expect("bind tcp");
            lst.set_nonblocking(true).unwrap();
            r.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                match lst.accept() {
                    Ok((mut c, peer)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let std::net::SocketAddr::V6(p) = peer else {
                            unreachable!()
                        };
                        // Logged before echoing: once the client has its reply, the log has it.
                        let mut buf = [0u8; 4096];
                        if let Ok(n @ 1..) = c.read(&mut buf) {
                            l.lock().unwrap().push((*p.ip(), buf[..n].to_vec(), true));
                            let _ = c.write_all(&buf[..n]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        let (l, s, r) = (log.clone(), stop.clone(), ready_tx);
        let udp = spawn_in(ns, move || {
            let sock = UdpSocket::bind(sa).expect("bind udp");
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            r.send(()).unwrap();
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, std::net::SocketAddr::V6(p))) = sock.recv_from(&mut buf) {
                    l.lock().unwrap().push((*p.ip(), buf[..n].to_vec(), false));
                    let _ = sock.send_to(&buf[..n], p);
                }
            }
        });
        for _ in 0..2 {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("server did not start");
        }
        Server {
            log,
            stop,
            threads: vec![tcp, udp],
        }
    }

    fn seen(&self) -> Vec<(Ipv6Addr, Vec<u8>, bool)> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the client got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The peer as the application saw it (getpeername or recvfrom), the echoed payload, and
    /// how long it took.
    Ok {
        peer: Ipv6Addr,
        reply: String,
        ms: u64,
    },
    /// An errno (-1: timed out) and how long it took.
    Err { errno: i32, ms: u64 },
}

const CLIENT: &str = r#"
import socket, sys, time
mode, addr, port, timeout, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5].encode()
t = time.monotonic()
ms = lambda: int((time.monotonic() - t) * 1000)
try:
    if mode == "tcp":
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect((addr, port))
        s.sendall(payload)
        reply = s.recv(65536)
        peer = s.getpeername()[0]
    elif mode == "udp":
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.sendto(payload, (addr, port))
        reply, frm = s.recvfrom(65536)
        peer = frm[0]
    else:  # connected UDP: connect6 rewrites, getpeername6 restores
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.connect((addr, port))
        s.send(payload)
        reply, frm = s.recvfrom(65536)
        peer = s.getpeername()[0]
        assert frm[0] == peer, (frm, peer)
    s.close()  # explicitly: an unclosed socket's ResourceWarning repr calls getpeername again
    print("ok", peer, reply.decode(), ms())
except OSError as e:
    print("err", e.errno if e.errno is not None else -1, ms())
"#;

/// Two namespaces, machine cgroups for clients in A, a pin directory; all removed on drop.
struct Topo {
    id: String,
    a: NetNs,
    b: NetNs,
    cgroups: Vec<MachineCgroup>,
    sub_cgroups: Vec<PathBuf>,
    pin_dir: PathBuf,
    servers: Vec<Server>,
}

impl Topo {
    fn new() -> Topo {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "ferry-t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut t = Topo {
            a: NetNs::named(&format!("{id}-a")),
            b: NetNs::named(&format!("{id}-b")),
            pin_dir: Path::new("/sys/fs/bpf").join(&id),
            id,
            cgroups: Vec::new(),
            sub_cgroups: Vec::new(),
            servers: Vec::new(),
        };
        // From here on, Drop cleans up whatever was made (also when an assertion fails).
        t.a = NetNs::create(t.a.name()).expect("creating netns A (run as root)");
        t.b = NetNs::create(t.b.name()).expect("creating netns B");
        let (a, b) = (t.a.name().to_owned(), t.b.name().to_owned());
        ipcmd(&[
            "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ]);
        for (ns, addrs) in [(&a, vec![A]), (&b, vec![B_NEW, N2_NEW])] {
            for addr in addrs {
                ipcmd(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/128"),
                    "dev",
                    "eth0",
                    "nodad",
                ]);
            }
            ipcmd(&["-n", ns, "link", "set", "lo", "up"]);
            ipcmd(&["-n", ns, "link", "set", "eth0", "up"]);
            ipcmd(&["-n", ns, "-6", "route", "add", "fdaa::/16", "dev", "eth0"]);
        }
        t.servers.push(Server::start(&t.b, ip(B_NEW)));
        t.servers.push(Server::start(&t.b, ip(N2_NEW)));
        t
    }

    /// The server on `B_NEW` (index 0) or `N2_NEW` (index 1).
    fn server(&self, i: usize) -> &Server {
        &self.servers[i]
    }

    /// A new machine cgroup for clients in A; returns its index.
    fn machine_cgroup(&mut self, tag: &str) -> usize {
        let layout = CgroupLayout::discover().expect("cgroup layout");
        let cg = layout
            .create_machine(
                &format!("{}-{tag}", self.id),
                Limits {
                    memory_mb: 0,
                    cpus: 0.0,
                    pids: 0,
                },
            )
            .expect("creating a machine cgroup");
        assert!(cg.v2_dir().is_some(), "this host has no cgroup v2 tree");
        self.cgroups.push(cg);
        self.cgroups.len() - 1
    }

    fn v2_dir(&self, cg: usize) -> &Path {
        self.cgroups[cg].v2_dir().unwrap()
    }

    fn cg_id(&self, cg: usize) -> u64 {
        cgroup_id(self.v2_dir(cg)).unwrap()
    }

    /// A child cgroup (v2 only) below a machine cgroup, as a machine's own supervisor would make.
    fn sub_cgroup(&mut self, cg: usize) -> PathBuf {
        let d = self.v2_dir(cg).join("sub");
        std::fs::create_dir(&d).unwrap();
        self.sub_cgroups.push(d.clone());
        d
    }

    fn load(&self) -> Bridge {
        Bridge::load(&self.pin_dir).expect("loading the bridge")
    }

    /// Runs the client in machine cgroup `cg` (or the given v2 directory instead of the
    /// machine's v2 one) inside A.
    fn client_in(
        &self,
        cg: usize,
        v2_override: Option<&Path>,
        mode: &str,
        dst: &str,
        timeout: f64,
    ) -> Outcome {
        let mut files: Vec<PathBuf> = self.cgroups[cg].join_paths();
        if let Some(d) = v2_override {
            let v2 = self.v2_dir(cg).join("cgroup.procs");
            files.retain(|f| *f != v2);
            files.push(d.join("cgroup.procs"));
        }
        let files: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        let out = Command::new("sh")
            .arg("-c")
            .arg(
                r#"for f in $FERRY_CG; do echo $$ > "$f" || exit 97; done
                   exec ip netns exec "$FERRY_NS" /usr/bin/python3 -c "$FERRY_PY" "$@""#,
            )
            .arg("sh")
            .args([
                mode,
                dst,
                &PORT.to_string(),
                &timeout.to_string(),
                "hello-bridge",
            ])
            .env("FERRY_CG", files.join(" "))
            .env("FERRY_NS", self.a.name())
            .env("FERRY_PY", CLIENT)
            .output()
            .expect("running the client");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let w: Vec<&str> = text.split_whitespace().collect();
        match w.as_slice() {
            ["ok", peer, reply, ms] => Outcome::Ok {
                peer: peer.parse().unwrap(),
                reply: reply.to_string(),
                ms: ms.parse().unwrap(),
            },
            ["err", errno, ms] => Outcome::Err {
                errno: errno.parse().unwrap(),
                ms: ms.parse().unwrap(),
            },
            _ => panic!("unexpected client output {text:?}"),
        }
    }

    fn client(&self, cg: usize, mode: &str, dst: &str, timeout: f64) -> Outcome {
        self.client_in(cg, None, mode, dst, timeout)
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.servers.clear();
        // Removing the pins detaches the links (nothing else holds them) and frees the maps.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        for d in self.sub_cgroups.drain(..).rev() {
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
            for _ in 0..100 {
                if std::fs::remove_dir(&d).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for cg in self.cgroups.drain(..) {
            if let Err(e) = cg.remove() {
                eprintln!("removing cgroup {}: {e}", cg.machine_id());
            }
        }
        for ns in [&self.a, &self.b] {
            let _ = ns.delete();
        }
    }
}

/// A bridge for network 1 with A's machine cgroup `cg` attached and configured.
fn bridge_for(t: &Topo, cg: usize, enabled: bool) -> Bridge {
    let mut br = t.load();
    br.attach_cgroup(t.v2_dir(cg)).expect("attaching");
    br.set_machine(t.cg_id(cg), net(1), ip(A), enabled)
        .expect("configuring the machine");
    br
}

fn ok_peer(o: &Outcome, want: &str) {
    match o {
        Outcome::Ok { peer, reply, .. } => {
            assert_eq!(*peer, ip(want), "{o:?}");
            assert_eq!(reply, "hello-bridge");
        }
        Outcome::Err { .. } => panic!("expected a reply from {want}, got {o:?}"),
    }
}

#[test]
fn tcp_and_udp_through_an_old_address_show_the_old_peer_and_count_each_caller() {
    let mut t = Topo::new();
    let c1 = t.machine_cgroup("c1");
    let c2 = t.machine_cgroup("c2");
    let mut br = bridge_for(&t, c1, true);
    br.attach_cgroup(t.v2_dir(c2)).unwrap();
    br.set_machine(t.cg_id(c2), net(1), ip(A), true).unwrap();
    br.map(net(1), ip(B_OLD), ip(B_NEW)).unwrap();
    assert_eq!(
        br.mappings().unwrap(),
        vec![Mapping {
            net: net(1),
            old: ip(B_OLD),
            new: ip(B_NEW),
            retired: false
        }]
    );

    // Direct use of the new address is untouched and shows the truth.
    ok_peer(&t.client(c1, "tcp", B_NEW, LONG), B_NEW);
    ok_peer(&t.client(c1, "udp", B_NEW, LONG), B_NEW);
    assert!(br.hits().unwrap().is_empty(), "direct use is no hit");

    // Through the old address: the server (bound to B_NEW only) answers, the app sees B_OLD.
    ok_peer(&t.client(c1, "tcp", B_OLD, LONG), B_OLD);
    ok_peer(&t.client(c1, "udp", B_OLD, LONG), B_OLD);
    ok_peer(&t.client(c2, "udpc", B_OLD, LONG), B_OLD);
    ok_peer(&t.client(c2, "tcp", B_OLD, LONG), B_OLD);
    ok_peer(&t.client(c2, "tcp", B_OLD, LONG), B_OLD);

    // The server saw A's real address, the payload, over both protocols.
    let seen = t.server(0).seen();
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert!(seen
        .iter()
        .all(|(peer, p, _)| *peer == ip(A) && p == b"hello-bridge"));

    // Hits name each caller with its own count.
    let hits = br.hits().unwrap();
    let count = |cg: usize| {
        hits.iter()
            .find(|h| h.caller_cgroup_id == t.cg_id(cg))
            .map(|h| (h.net, h.old, h.count, h.first_ns <= h.last_ns))
    };
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert_eq!(count(c1), Some((net(1), ip(B_OLD), 2, true)));
    assert_eq!(count(c2), Some((net(1), ip(B_OLD), 3, true)));
    let last = ferry_ebpf::bridge::boot_ns_to_system_time(hits[0].last_ns);
    let age = std::time::SystemTime::now().duration_since(last).unwrap();
    assert!(age < Duration::from_secs(60), "last use {age:?} ago");

    assert_eq!(br.stat(BridgeStat::ConnectRewritten).unwrap(), 4);
    assert_eq!(br.stat(BridgeStat::SendmsgRewritten).unwrap(), 1);
    assert_eq!(br.stat(BridgeStat::GetpeernameRestored).unwrap(), 4);
    assert!(br.stat(BridgeStat::RecvmsgRestored).unwrap() >= 2);
    assert_eq!(br.stat(BridgeStat::StorageFailed).unwrap(), 0);
}

#[test]
fn processes_in_a_machines_sub_cgroup_use_the_machines_config() {
    let mut t = Topo::new();
    let c = t.machine_cgroup("c");
    let sub = t.sub_cgroup(c);
    let mut br = bridge_for(&t, c, true);
    br.map(net(1), ip(B_OLD), ip(B_NEW)).unwrap();
    ok_peer(&t.client_in(c, Some(&sub), "tcp", B_OLD, LONG), B_OLD);
    let hits = br.hits().unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(
        hits[0].caller_cgroup_id,
        t.cg_id(c),
        "the machine is the caller"
    );
}

#[test]
fn gate_off_or_unconfigured_leaves_old_addresses_alone() {
    let mut t = Topo::new();
    let c = t.machine_cgroup("c");
    let mut br = bridge_for(&t, c, false);
    br.map(net(1), ip(B_OLD), ip(B_NEW)).unwrap();

    let o = t.client(c, "tcp", B_OLD, SHORT);
    assert!(matches!(o, Outcome::Err { .. }), "gate off: {o:?}");
    let o = t.client(c, "udp", B_OLD, SHORT);
    assert!(matches!(o, Outcome::Err { .. }), "gate off: {o:?}");

    // Switching the gate on takes effect on the next socket call.
    br.set_machine(t.cg_id(c), net(1), ip(A), true).unwrap();
    ok_peer(&t.client(c, "tcp", B_OLD, LONG), B_OLD);

    // No config at all: left alone too.
    br.forget_machine(t.cg_id(c)).unwrap();
    let o = t.client(c, "tcp", B_OLD, SHORT);
    assert!(matches!(o, Outcome::Err { .. }), "unconfigured: {o:?}");

    assert_eq!(
        t.server(0).seen().len(),
        1,
        "only the gated-on call arrived"
    );
    let hits = br.hits().unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].count, 1);
}

#[test]
fn mappings_never_cross_networks() {
    let mut t = Topo::new();
    let c = t.machine_cgroup("c");
    let mut br = bridge_for(&t, c, true);

    // Refused up front, with a message that names the problem.
    let refusals = [
        (1, B_OLD, N2_NEW),
        (2, B_OLD, N2_NEW),
        (1, N2_OLD, B_NEW),
        (1, B_OLD, "fdaa:8000:1:0:1:0:2:2"), // infra form of B_NEW
        (1, B_OLD, "fdaa::3"),
        (1, "2001:db8::1", B_NEW),
    ];
    for (n, old, new) in refusals {
        let e = br.map(net(n), ip(old), ip(new)).unwrap_err();
        assert!(matches!(e, BridgeError::WrongNetwork { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("network {n}")), "{msg}");
    }
    assert!(matches!(
        br.map(net(1), ip(B_OLD), ip(B_OLD)),
        Err(BridgeError::SelfMapping { .. })
    ));
    // A machine cannot be declared to be in a network its address is not in.
    assert!(matches!(
        br.set_machine(t.cg_id(c), net(2), ip(A), true),
        Err(BridgeError::WrongNetwork { .. })
    ));
    assert!(br.mappings().unwrap().is_empty());

    // A valid mapping of network 2 exists, and its target is reachable from A: a net-1 caller
    // dialling the net-2 old address is still not rewritten.
    br.map(net(2), ip(N2_OLD), ip(N2_NEW)).unwrap();
    let o = t.client(c, "tcp", N2_OLD, SHORT);
    assert!(matches!(o, Outcome::Err { .. }), "{o:?}");
    let o = t.client(c, "udp", N2_OLD, SHORT);
    assert!(matches!(o, Outcome::Err { .. }), "{o:?}");
    assert!(t.server(1).seen().is_empty());
    assert!(br.hits().unwrap().is_empty());
    assert_eq!(br.stat(BridgeStat::ConnectRewritten).unwrap(), 0);
    assert_eq!(br.stat(BridgeStat::SendmsgRewritten).unwrap(), 0);
}

#[test]
fn a_retired_old_address_fails_fast_and_reaches_nobody() {
    let mut t = Topo::new();
    let c = t.machine_cgroup("c");
    let mut br = bridge_for(&t, c, true);
    br.map(net(1), ip(B_OLD), ip(B_NEW)).unwrap();
    ok_peer(&t.client(c, "tcp", B_OLD, LONG), B_OLD);

    br.retire(net(1), ip(B_OLD)).unwrap();
    assert!(br.mappings().unwrap()[0].retired);
    for mode in ["tcp", "udp", "udpc"] {
        match t.client(c, mode, B_OLD, LONG) {
            Outcome::Err { errno, ms } => {
                assert_eq!(errno, libc::EPERM, "{mode}");
                assert!(ms < 100, "{mode}: took {ms} ms");
            }
            o => panic!("{mode}: retired address answered: {o:?}"),
        }
    }
    assert_eq!(
        t.server(0).seen().len(),
        1,
        "only the call before retirement"
    );
    assert_eq!(br.stat(BridgeStat::RetiredRefused).unwrap(), 3);
    // Retired uses are still hits: they name the configs left to fix.
    assert_eq!(br.hits().unwrap()[0].count, 4);
    // The new address itself is unaffected.
    ok_peer(&t.client(c, "tcp", B_NEW, LONG), B_NEW);

    assert!(matches!(
        br.retire(net(1), ip(N2_OLD)),
        Err(BridgeError::NotMapped { .. })
    ));
    // Unmapping lets the address alone again (back to timing out).
    assert!(br.unmap(net(1), ip(B_OLD)).unwrap());
    assert!(!br.unmap(net(1), ip(B_OLD)).unwrap());
    let o = t.client(c, "tcp", B_OLD, SHORT);
    assert!(matches!(o, Outcome::Err { errno: -1, .. }), "{o:?}");
}

#[test]
fn links_survive_the_bridge_object_and_a_reload_shares_the_pins() {
    let mut t = Topo::new();
    let c = t.machine_cgroup("c");
    {
        let mut br = bridge_for(&t, c, true);
        br.map(net(1), ip(B_OLD), ip(B_NEW)).unwrap();
    } // dropped: the programs stay attached through the pinned links

    ok_peer(&t.client(c, "tcp", B_OLD, LONG), B_OLD);
    ok_peer(&t.client(c, "udp", B_OLD, LONG), B_OLD);

    // A new process (here: a new object) sees the same maps.
    let mut br = t.load();
    assert_eq!(br.mappings().unwrap().len(), 1);
    assert_eq!(br.hits().unwrap()[0].count, 2);
    assert_eq!(br.machines().unwrap()[0].cgroup_id, t.cg_id(c));
    assert_eq!(br.attached_cgroups(), vec![t.cg_id(c)]);

    // Re-attaching is idempotent (cgroup links would otherwise stack).
    br.attach_cgroup(t.v2_dir(c)).unwrap();
    let pins = std::fs::read_dir(t.pin_dir.join("links")).unwrap().count();
    assert_eq!(pins, 4);

    // A change made through the new object reaches the old programs at once.
    br.retire(net(1), ip(B_OLD)).unwrap();
    assert!(matches!(
        t.client(c, "tcp", B_OLD, LONG),
        Outcome::Err {
            errno: libc::EPERM,
            ..
        }
    ));
    br.map(net(1), ip(B_OLD), ip(B_NEW)).unwrap();
    ok_peer(&t.client(c, "tcp", B_OLD, LONG), B_OLD);

    // Detaching removes the pins, and with them the programs.
    br.detach_cgroup(t.v2_dir(c)).unwrap();
    assert!(br.attached_cgroups().is_empty());
    let o = t.client(c, "tcp", B_OLD, SHORT);
    assert!(matches!(o, Outcome::Err { errno: -1, .. }), "{o:?}");
    assert_eq!(t.server(0).seen().len(), 3);
}

#[test]
fn chains_stay_one_step_and_loops_are_refused() {
    let t = Topo::new();
    let mut br = t.load();
    let (a1, a2, a3) = (
        ip("fdaa:0:1:8000:0:0:11:2"),
        ip("fdaa:0:1:8000:1:0:11:2"),
        ip("fdaa:0:1:8000:2:0:11:2"),
    );
    let pairs = |br: &Bridge| -> Vec<(Ipv6Addr, Ipv6Addr)> {
        br.mappings()
            .unwrap()
            .iter()
            .map(|m| (m.old, m.new))
            .collect()
    };
    br.map(net(1), a1, a2).unwrap();
    // The machine moves again: a1 must lead straight to a3 (the programs rewrite once).
    br.map(net(1), a2, a3).unwrap();
    assert_eq!(pairs(&br), vec![(a1, a3), (a2, a3)]);
    assert!(matches!(
        br.map(net(1), a3, a1),
        Err(BridgeError::Loop { .. })
    ));
    // Mapping onto an old address follows it to where it leads.
    let a0 = ip("fdaa:0:1:8000:0:0:10:2");
    br.map(net(1), a0, a2).unwrap();
    assert!(pairs(&br).contains(&(a0, a3)));
}

#[test]
fn cgroup_id_is_the_kernels_cgroup_id() {
    let mut t = Topo::new();
    let c = t.machine_cgroup("c");
    let dir = t.v2_dir(c).to_owned();
    // The kernel's own answer: a cgroup2 file handle is the 64-bit cgroup ID.
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: u64,
    }
    let mut h = Handle {
        bytes: 8,
        kind: 0,
        id: 0,
    };
    let mut mount_id = 0;
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `h` starts with the `file_handle` header (bytes, type) and has room for the
    // 8-byte handle it announces; `path` is NUL-terminated; `mount_id` is a valid out-pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            path.as_ptr(),
            &mut h as *mut Handle,
            &mut mount_id as *mut i32,
            0,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(cgroup_id(&dir).unwrap(), h.id);

    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(
        cgroup_id(tmp.path()),
        Err(BridgeError::NotCgroup2 { .. })
    ));
}

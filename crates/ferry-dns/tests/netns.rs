//! The server in a real network namespace, as a host runs it: bound to `[fdaa::3]:53` (UDP and
//! TCP) by a thread that entered a "host" namespace, queried from a "machine" namespace joined
//! to it by a veth (the machine's only route is `fdaa::/16` via the host, docs/design.md#data-plane), with `dig`,
//! `getent`, Python's `getaddrinfo` and a Rust client.
//!
//! Needs root and `ip` (the test alone uses `ip`; the crate never does). Namespaces are named
//! `ferry-t<pid>-<n>-{h,m}` and deleted on drop, with `/etc/netns/<name>/` (the resolv.conf that
//! `ip netns exec` bind-mounts). Every command and wait is bounded.

mod common;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces and a veth, removed on drop (also when the test panics).
struct Pair {
    host: String,
    machine: String,
}

impl Pair {
    fn new() -> Pair {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = format!("ferry-t{}-{n}", std::process::id());
        let pair = Pair {
            host: format!("{base}-h"),
            machine: format!("{base}-m"),
        };
        ip(&["netns", "add", &pair.host]);
        ip(&["netns", "add", &pair.machine]);
        pair
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.host, &self.machine] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

fn exec_in(ns: &str, cmd: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg("10")
        .args(["ip", "netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("running ip netns exec");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Enters `ns` on the calling thread (only on threads this test spawned).
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("opening netns");
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

#[test]
fn serves_fdaa_3_inside_a_namespace_to_a_machine() {
    if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
        println!("skipped: needs root and iproute2");
        return;
    }
    let pair = Pair::new();
    let (h, mns) = (pair.host.clone(), pair.machine.clone());
    // The machine: org A (network 1) on an ord host.
    let me: Ipv6Addr = addr(1, HOST_ORD, 0x999);
    let me_s = me.to_string();
    let veth_h = format!("vh{}", SEQ.load(Ordering::Relaxed));
    let veth_m = format!("vm{}", SEQ.load(Ordering::Relaxed));
    for ns in [&h, &mns] {
        // No DAD: addresses are usable at once (the test must not sleep for it).
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        for k in ["all", "default"] {
            let _ = exec_in(
                ns,
                &["sysctl", "-qw", &format!("net.ipv6.conf.{k}.accept_dad=0")],
            );
        }
    }
    ip(&[
        "-n", &h, "link", "add", &veth_h, "type", "veth", "peer", "name", &veth_m, "netns", &mns,
    ]);
    ip(&["-n", &h, "addr", "add", "fdaa::3/128", "dev", "lo"]);
    ip(&[
        "-n",
        &h,
        "addr",
        "add",
        "fe80::1/64",
        "dev",
        &veth_h,
        "nodad",
    ]);
    ip(&["-n", &h, "link", "set", &veth_h, "up"]);
    ip(&[
        "-n",
        &h,
        "-6",
        "route",
        "add",
        &format!("{me_s}/128"),
        "dev",
        &veth_h,
    ]);
    ip(&[
        "-n",
        &mns,
        "addr",
        "add",
        &format!("{me_s}/128"),
        "dev",
        &veth_m,
        "nodad",
    ]);
    ip(&["-n", &mns, "link", "set", &veth_m, "up"]);
    ip(&[
        "-n",
        &mns,
        "-6",
        "route",
        "add",
        "fdaa::/16",
        "via",
        "fe80::1",
        "dev",
        &veth_m,
    ]);
    std::fs::create_dir_all(format!("/etc/netns/{mns}")).unwrap();
    std::fs::write(
        format!("/etc/netns/{mns}/resolv.conf"),
        "nameserver fdaa::3\noptions timeout:2 attempts:1\n",
    )
    .unwrap();

    // The server thread: enter the host namespace, bind there, serve until told to stop.
    let server = server();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h2 = h.clone();
    let thread = std::thread::spawn(move || {
        enter(&h2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let at: SocketAddr = "[fdaa::3]:53".parse().unwrap();
            let udp = tokio::net::UdpSocket::bind(at)
                .await
                .expect("bind udp fdaa::3");
            let tcp = tokio::net::TcpListener::bind(at)
                .await
                .expect("bind tcp fdaa::3");
            ready_tx.send(()).unwrap();
            let s1 = server.clone();
            tokio::select! {
                r = server.serve_udp(udp) => panic!("udp loop ended: {r:?}"),
                r = s1.serve_tcp(tcp) => panic!("tcp loop ended: {r:?}"),
                _ = stop_rx => {}
            }
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server ready");

    // dig, over UDP and TCP.
    let dig = |args: &[&str]| {
        let mut cmd = vec!["dig", "@fdaa::3", "+time=2", "+tries=1"];
        cmd.extend_from_slice(args);
        exec_in(&mns, &cmd)
    };
    let (ok, out) = dig(&["+short", "web.internal", "AAAA"]);
    assert!(ok, "{out}");
    let mut got: Vec<Ipv6Addr> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    got.sort();
    let mut want = vec![
        addr(1, HOST_ORD, 1),
        addr(1, HOST_ORD2, 2),
        addr(1, HOST_LAX, 3),
    ];
    want.sort();
    assert_eq!(got, want, "{out}");
    let (_, out) = dig(&["+tcp", "+short", "vms.web.internal", "TXT"]);
    assert!(out.contains("0000000000a001 ord"), "{out}");
    // The view: org B's name does not exist for this machine.
    let (_, out) = dig(&["secret.internal", "AAAA"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    let (_, out) = dig(&["big.internal", "AAAA", "+noedns"]);
    assert!(out.contains("ANSWER: 70"), "TC then TCP retry: {out}");

    // The system resolver (glibc, through /etc/netns/<m>/resolv.conf).
    let (ok, out) = exec_in(
        &mns,
        &["getent", "ahostsv6", "0000000000a003.vm.web.internal"],
    );
    assert!(
        ok && out.contains(&addr(1, HOST_LAX, 3).to_string()),
        "{out}"
    );
    let py = "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('web.internal', 80, socket.AF_INET6)}))";
    let (ok, out) = exec_in(&mns, &["python3", "-c", py]);
    assert!(ok, "{out}");
    for w in &want {
        assert!(out.contains(&w.to_string()), "{out}");
    }

    // A Rust client on a thread inside the machine namespace.
    let m2 = mns.clone();
    let answer = std::thread::spawn(move || {
        enter(&m2);
        let sock = std::net::UdpSocket::bind("[::]:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let q = query_bytes(
            "top1.nearest.of.web.internal.",
            RecordType::AAAA,
            Some(1232),
        );
        sock.send_to(&q, "[fdaa::3]:53").unwrap();
        let mut buf = [0u8; 2048];
        let n = sock.recv(&mut buf).expect("answer within 2 s");
        Message::from_vec(&buf[..n]).unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    let ips: Vec<Ipv6Addr> = answer
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::AAAA(a) => Some(a.0),
            _ => None,
        })
        .collect();
    // Nearest to an ord host: the first ord machine.
    assert_eq!(ips, vec![addr(1, HOST_ORD, 1)]);

    let _ = stop_tx.send(());
    thread.join().unwrap();
    drop(pair);
}

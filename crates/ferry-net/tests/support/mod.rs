//! Helpers for data-plane tests on real namespaces: unique fleet names, echo servers inside
//! machines, clients that report what actually came back over the socket.
#![allow(dead_code)]

use ferry_net::netns::{self, spawn_in};
use ferry_net::{DevFleet, MachineNet, Mode};
use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const PORT: u16 = 7000;

/// A fleet name unique to this process and call, short enough for every derived name.
pub fn unique_fleet(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "t{tag}{:x}{:x}{:x}",
        std::process::id() & 0xffff,
        N.fetch_add(1, Ordering::Relaxed),
        nanos & 0xfff
    )
}

pub fn fleet(tag: &str, mode: Mode) -> DevFleet {
    DevFleet::create(&unique_fleet(tag), mode).expect("creating a dev fleet (run as root)")
}

/// What a server saw: (peer address, payload, over TCP?).
pub type Log = Arc<Mutex<Vec<(Ipv6Addr, Vec<u8>, bool)>>>;

/// TCP and UDP echo servers on a machine's address, logging every payload with its peer.
pub struct Echo {
    pub log: Log,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<(), ferry_net::NetError>>>,
}

impl Echo {
    pub fn start(m: &MachineNet) -> Echo {
        let log: Log = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let addr = SocketAddrV6::new(m.addr.ip(), PORT, 0, 0);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (l, s, r) = (log.clone(), stop.clone(), ready_tx.clone());
        let tcp = spawn_in(&m.ns, move || {
            let lst = retry_bind(|| TcpListener::bind(addr));
            lst.set_nonblocking(true).unwrap();
            r.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                match lst.accept() {
                    Ok((mut c, peer)) => {
                        c.set_nonblocking(false).unwrap();
                        // One thread per connection: many clients dial one server at once.
                        let l = l.clone();
                        std::thread::spawn(move || {
                            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                            let mut buf = vec![0u8; 1 << 16];
                            let mut got = Vec::new();
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 {
                                    break;
                                }
                                got.extend_from_slice(&buf[..n]);
                                let _ = c.write_all(&buf[..n]);
                            }
                            let ip = match peer {
                                std::net::SocketAddr::V6(p) => *p.ip(),
                                _ => unreachable!(),
                            };
                            l.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((ip, got, true));
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        let (l, s) = (log.clone(), stop.clone());
        let udp = spawn_in(&m.ns, move || {
            let sock = retry_bind(|| UdpSocket::bind(addr));
            sock.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let ip = match peer {
                        std::net::SocketAddr::V6(p) => *p.ip(),
                        _ => unreachable!(),
                    };
                    // Logged before the reply: a client that got its echo finds the entry.
                    l.lock().unwrap_or_else(|e| e.into_inner()).push((
                        ip,
                        buf[..n].to_vec(),
                        false,
                    ));
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        for _ in 0..2 {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("echo server did not start");
        }
        Echo {
            log,
            stop,
            threads: vec![tcp, udp],
        }
    }

    pub fn saw(&self, payload: &[u8]) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|(_, p, _)| p == payload)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends `payload` over TCP from `from` to `to`'s echo server; returns what came back.
pub fn tcp_echo(
    from: &MachineNet,
    to: Ipv6Addr,
    payload: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    tcp_echo_src(from, None, to, payload, timeout)
}

/// Like [`tcp_echo`], from a chosen source address (std cannot bind before connecting).
pub fn tcp_echo_src(
    from: &MachineNet,
    src: Option<Ipv6Addr>,
    to: Ipv6Addr,
    payload: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn6};
    use std::os::fd::AsRawFd;
    let payload = payload.to_vec();
    netns::run_in(&from.ns, move || {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .ok()?;
        if let Some(src) = src {
            // A bind that fails must not pass for "nothing got through": retried while a fresh
            // address is still tentative (DAD), then a panic.
            retry_bind(|| {
                bind(
                    fd.as_raw_fd(),
                    &SockaddrIn6::from(SocketAddrV6::new(src, 0, 0, 0)),
                )
                .map_err(std::io::Error::from)
            });
        }
        let _ = connect(
            fd.as_raw_fd(),
            &SockaddrIn6::from(SocketAddrV6::new(to, PORT, 0, 0)),
        );
        let mut c = TcpStream::from(fd);
        // Wait for the handshake, bounded: peer_addr succeeds once connected.
        if !eventually(timeout, || c.peer_addr().is_ok()) {
            return None;
        }
        c.set_nonblocking(false).ok()?;
        c.set_read_timeout(Some(timeout)).ok()?;
        c.write_all(&payload).ok()?;
        let mut back = vec![0u8; payload.len()];
        c.read_exact(&mut back).ok()?;
        Some(back)
    })
    .unwrap()
}

/// Sends one UDP datagram from `from` (optionally from a chosen source address) and waits for
/// the echo.
pub fn udp_echo(
    from: &MachineNet,
    src: Option<Ipv6Addr>,
    to: Ipv6Addr,
    payload: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    let payload = payload.to_vec();
    netns::run_in(&from.ns, move || {
        // A fresh source address is unusable while it is tentative (duplicate address detection).
        let s = retry_bind(|| {
            UdpSocket::bind(SocketAddrV6::new(
                src.unwrap_or(Ipv6Addr::UNSPECIFIED),
                0,
                0,
                0,
            ))
        });
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 1 << 16];
        // UDP may lose the first datagram while neighbours resolve: resend, bounded.
        while Instant::now() < deadline {
            let _ = s.send_to(&payload, SocketAddrV6::new(to, PORT, 0, 0));
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    })
    .unwrap()
}

/// Binds, retrying for up to 10 s (a fresh address is unusable while duplicate address detection
/// runs, about a second, longer on a loaded box); panics with the error if it never works.
fn retry_bind<T>(mut f: impl FnMut() -> std::io::Result<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("bind: {e}; retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("bind: {e}"),
        }
    }
}

/// Polls `f` until it is true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command inside a namespace (test-only: tools such as ethtool have no netlink API).
pub fn ns_exec(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

//! The address-mapping bridge's cost: TCP connections per second and UDP round trips per second
//! from one machine to another on another host, dialling the server's current address directly
//! vs dialling an old address that the eBPF bridge maps to it, alternating rounds in one run.
//!
//! The same binary is the workload: `bridge serve` runs as the server machine's command and
//! `bridge client ...` is exec'd inside the client machine (so its sockets are in the machine's
//! cgroup, where the bridge programs are attached).

use anyhow::{bail, ensure, Result};
use ferry_bench::{median, report, BenchFleet};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const TCP_PORT: u16 = 7200;
const UDP_PORT: u16 = 7201;

fn serve() -> Result<()> {
    let ip: Ipv6Addr = std::env::var("FERRY_PRIVATE_IP")?.parse()?;
    let udp = UdpSocket::bind(SocketAddrV6::new(ip, UDP_PORT, 0, 0))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, a)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], a);
        }
    });
    let l = TcpListener::bind(SocketAddrV6::new(ip, TCP_PORT, 0, 0))?;
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        let mut b = [0u8; 1];
        if c.read_exact(&mut b).is_ok() {
            let _ = c.write_all(&b);
        }
    }
    Ok(())
}

/// Connect, one byte each way, close; or one UDP datagram each way. Returns per second.
fn client(target: Ipv6Addr, kind: &str, secs: f64) -> Result<f64> {
    let dur = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n = 0u64;
    match kind {
        "tcp" => {
            let addr = SocketAddrV6::new(target, TCP_PORT, 0, 0);
            while start.elapsed() < dur {
                let mut c = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
                c.set_nodelay(true)?;
                // Close with RST: tens of thousands of TIME_WAIT sockets would otherwise exhaust
                // the ephemeral ports within the first round and measure port search instead.
                nix::sys::socket::setsockopt(
                    &c,
                    nix::sys::socket::sockopt::Linger,
                    &libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    },
                )?;
                c.write_all(b"x")?;
                let mut b = [0u8; 1];
                c.read_exact(&mut b)?;
                n += 1;
            }
        }
        "udp" => {
            let s = UdpSocket::bind("[::]:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let addr = SocketAddrV6::new(target, UDP_PORT, 0, 0);
            let mut b = [0u8; 64];
            while start.elapsed() < dur {
                s.send_to(b"ping", addr)?;
                s.recv_from(&mut b)?;
                n += 1;
            }
        }
        k => bail!("kind {k}"),
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn orchestrate() -> Result<()> {
    let ferry = std::env::var("FERRY_BIN").unwrap_or_else(|_| "target/release/ferry".into());
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let secs: f64 = std::env::var("SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let me = std::env::current_exe()?.display().to_string();
    // BRIDGE_MODE=nft measures the nftables DNAT mode instead of the eBPF programs.
    let mode = std::env::var("BRIDGE_MODE").unwrap_or_else(|_| "ebpf".into());
    let name = format!("bb{:x}", std::process::id() & 0xffff);
    let dev = BenchFleet::start(&ferry, &name, 2, &["--bridge-mode", &mode])?;
    let hosts = dev.get("/v1/hosts")?;
    let (h0, h1) = (
        hosts[0]["id"].as_str().unwrap().to_owned(),
        hosts[1]["id"].as_str().unwrap().to_owned(),
    );
    dev.call(
        reqwest::Method::POST,
        "/v1/apps",
        json!({"app_name": "bench"}),
    )?;
    let server = dev.call(
        reqwest::Method::POST,
        "/v1/apps/bench/machines",
        json!({"host": h0, "config": {"init": {"cmd": [me, "serve"]}}}),
    )?;
    let client_m = dev.call(
        reqwest::Method::POST,
        "/v1/apps/bench/machines",
        json!({"host": h1, "config": {"init": {"cmd": ["sleep", "infinity"]}}}),
    )?;
    let new: ferry_addr::FleetAddr = server["private_ip"].as_str().unwrap().parse()?;
    let host1 = ferry_addr::HostId::new(u32::from_str_radix(&h1, 16)?)?;
    let old =
        ferry_addr::FleetAddr::primary(new.network(), host1, ferry_addr::MachineField(0xfff0_0002));
    dev.call(
        reqwest::Method::POST,
        "/v1/bridge",
        json!({"old": old.to_string(), "new": new.to_string()}),
    )?;
    std::thread::sleep(Duration::from_millis(500));

    let run = |target: &FleetAddrLike, kind: &str| -> Result<f64> {
        let out = dev.call(
            reqwest::Method::POST,
            &format!(
                "/v1/apps/bench/machines/{}/exec",
                client_m["id"].as_str().unwrap()
            ),
            json!({"cmd": [me, "client", target.0, kind, secs.to_string()], "timeout": 60}),
        )?;
        ensure!(out["exit_code"] == 0, "client failed: {out}");
        Ok(out["stdout"].as_str().unwrap().trim().parse()?)
    };
    let (direct, bridged) = (
        FleetAddrLike(new.to_string()),
        FleetAddrLike(old.to_string()),
    );
    println!("bridge ({mode}): {rounds} rounds of {secs} s per side; direct {} vs old address {} through the bridge", direct.0, bridged.0);
    let (mut tcp_d, mut tcp_b, mut udp_d, mut udp_b) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        // Alternate which side goes first so drift on a noisy machine hits both alike.
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for via_bridge in order {
            let t = if via_bridge { &bridged } else { &direct };
            let (tcp, udp) = (run(t, "tcp")?, run(t, "udp")?);
            if via_bridge {
                tcp_b.push(tcp);
                udp_b.push(udp);
            } else {
                tcp_d.push(tcp);
                udp_d.push(udp);
            }
        }
        eprintln!(
            "round {}: tcp conn/s direct {:.0} bridged {:.0}; udp rt/s direct {:.0} bridged {:.0}",
            r + 1,
            tcp_d[r],
            tcp_b[r],
            udp_d[r],
            udp_b[r]
        );
    }
    let hits = dev.call(reqwest::Method::GET, "/v1/bridge", json!(null))?;
    let r1 = report(
        "TCP connections/s (bridge vs direct)",
        "conn/s",
        &tcp_b,
        &tcp_d,
    );
    let r2 = report(
        "UDP round trips/s (bridge vs direct)",
        "rt/s",
        &udp_b,
        &udp_d,
    );
    println!(
        "medians of {rounds} rounds; goal: ratios >= 0.97; bridge hits counted: {}",
        hits[0]["hits"]
    );
    println!(
        "{}",
        json!({"tcp_conn_direct": median(&tcp_d), "tcp_conn_bridge": median(&tcp_b), "tcp_ratio": r1,
        "udp_rt_direct": median(&udp_d), "udp_rt_bridge": median(&udp_b), "udp_ratio": r2})
    );
    drop(dev);
    Ok(())
}

struct FleetAddrLike(String);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(),
        Some("client") => {
            let rate = client(args[2].parse()?, &args[3], args[4].parse()?)?;
            println!("{rate}");
            Ok(())
        }
        _ => orchestrate(),
    }
}

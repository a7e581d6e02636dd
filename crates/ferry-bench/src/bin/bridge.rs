//! The address-mapping bridge's cost: TCP connections per second and UDP round trips per second
//! from one machine to another on another host, dialling the server's current address directly
//! vs dialling an old address that the bridge maps to it.
//!
//! The same binary is the workload: `bridge serve` runs as the server machine's command and
//! `bridge client ...` is exec'd inside the client machine (so its sockets are in the machine's
//! cgroup, where the bridge programs are attached).
//!
//! Pairing: each round is one client process that alternates short blocks (`BLOCK_MS`, default
//! 100 ms) dialling the direct address and the old one, ABBA within every pair of blocks, for
//! `SECS` seconds; it reports both rates. Load from other work on the machine changes over
//! seconds, so both sides of a round see the same conditions, and each round gives one
//! bridge/direct ratio. The report gives the ratio of the medians and the median of the per-round
//! ratios.
//!
//! `BPF_STATS=1` first measures the bridge programs attached to the client machine's cgroup
//! (kernel `bpf_stats_enabled`, restored afterwards): ns per program run on each path.

use anyhow::{bail, ensure, Context, Result};
use ferry_bench::{env_or, median, report, BenchFleet};
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

/// One TCP connection: connect, one byte each way, close with RST.
fn tcp_once(addr: &SocketAddrV6) -> Result<()> {
    let mut c = TcpStream::connect_timeout(&(*addr).into(), Duration::from_secs(2))?;
    c.set_nodelay(true)?;
    // Close with RST: tens of thousands of TIME_WAIT sockets would otherwise exhaust the
    // ephemeral ports within the first round and measure port search instead.
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
    Ok(())
}

/// Operations on one side for `dur`; returns (count, seconds taken).
fn block(target: Ipv6Addr, kind: &str, udp: &UdpSocket, dur: Duration) -> Result<(u64, f64)> {
    let start = Instant::now();
    let mut n = 0u64;
    match kind {
        "tcp" => {
            let addr = SocketAddrV6::new(target, TCP_PORT, 0, 0);
            while start.elapsed() < dur {
                tcp_once(&addr)?;
                n += 1;
            }
        }
        "udp" => {
            let addr = SocketAddrV6::new(target, UDP_PORT, 0, 0);
            let mut b = [0u8; 64];
            while start.elapsed() < dur {
                udp.send_to(b"ping", addr)?;
                udp.recv_from(&mut b)?;
                n += 1;
            }
        }
        k => bail!("kind {k}"),
    }
    Ok((n, start.elapsed().as_secs_f64()))
}

/// Alternates blocks on `a` and `b` (ABBA ABBA ...) for `secs`; prints both rates per second.
/// With only `a`, measures that one target for `secs`.
fn client(args: &[String]) -> Result<()> {
    let kind = args[0].as_str();
    let secs: f64 = args[1].parse()?;
    let block_ms: u64 = args[2].parse()?;
    let a: Ipv6Addr = args[3].parse()?;
    let b: Option<Ipv6Addr> = args.get(4).map(|s| s.parse()).transpose()?;
    let udp = UdpSocket::bind("[::]:0")?;
    udp.set_read_timeout(Some(Duration::from_secs(2)))?;
    let Some(b) = b else {
        let (n, t) = block(a, kind, &udp, Duration::from_secs_f64(secs))?;
        println!("{}", n as f64 / t);
        return Ok(());
    };
    let blk = Duration::from_millis(block_ms);
    let (mut na, mut ta, mut nb, mut tb) = (0u64, 0f64, 0u64, 0f64);
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let order = if i.is_multiple_of(2) { [a, b] } else { [b, a] };
        for t in order {
            let (n, s) = block(t, kind, &udp, blk)?;
            if t == a {
                (na, ta) = (na + n, ta + s);
            } else {
                (nb, tb) = (nb + n, tb + s);
            }
        }
        i += 1;
    }
    println!("{} {}", na as f64 / ta, nb as f64 / tb);
    Ok(())
}

/// `bpftool` as JSON.
fn bpftool(args: &[&str]) -> Result<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// (name, run_time_ns, run_cnt) of the programs with these IDs.
fn prog_stats(ids: &[u64]) -> Result<Vec<(String, u64, u64)>> {
    let all = bpftool(&["prog", "show"])?;
    let mut v = Vec::new();
    for p in all.as_array().into_iter().flatten() {
        if ids.contains(&p["id"].as_u64().unwrap_or(0)) {
            v.push((
                p["name"].as_str().unwrap_or("?").to_owned(),
                p["run_time_ns"].as_u64().unwrap_or(0),
                p["run_cnt"].as_u64().unwrap_or(0),
            ));
        }
    }
    v.sort();
    Ok(v)
}

fn orchestrate() -> Result<()> {
    let ferry = std::env::var("FERRY_BIN").unwrap_or_else(|_| {
        let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{dir}/release/ferry")
    });
    let rounds: usize = env_or("ROUNDS", 15);
    let secs: f64 = env_or("SECS", 2.0);
    let block_ms: u64 = env_or("BLOCK_MS", 100);
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

    let exec = |args: Vec<String>| -> Result<String> {
        let mut cmd = vec![me.clone()];
        cmd.extend(args);
        let out = dev.call(
            reqwest::Method::POST,
            &format!(
                "/v1/apps/bench/machines/{}/exec",
                client_m["id"].as_str().unwrap()
            ),
            json!({"cmd": cmd, "timeout": 120}),
        )?;
        ensure!(out["exit_code"] == 0, "client failed: {out}");
        Ok(out["stdout"].as_str().unwrap().trim().to_owned())
    };
    let (direct, bridged) = (new.to_string(), old.to_string());
    println!(
        "bridge ({mode}): {rounds} rounds of {secs} s per protocol, blocks of {block_ms} ms \
         alternating direct {direct} and old address {bridged} through the bridge"
    );

    if std::env::var("BPF_STATS").is_ok_and(|v| v == "1") && mode == "ebpf" {
        bpf_stats(&exec, &direct, &bridged, secs)?;
    }

    let (mut tcp_d, mut tcp_b, mut udp_d, mut udp_b) = (vec![], vec![], vec![], vec![]);
    let (mut tcp_r, mut udp_r) = (vec![], vec![]);
    for r in 0..rounds {
        // Alternate which protocol and which side of a block pair goes first.
        let kinds = if r.is_multiple_of(2) {
            ["tcp", "udp"]
        } else {
            ["udp", "tcp"]
        };
        for kind in kinds {
            let (a, b) = if r % 4 < 2 {
                (&direct, &bridged)
            } else {
                (&bridged, &direct)
            };
            let out = exec(vec![
                "client".into(),
                kind.into(),
                secs.to_string(),
                block_ms.to_string(),
                a.clone(),
                b.clone(),
            ])?;
            let rates: Vec<f64> = out
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            ensure!(rates.len() == 2, "client printed {out:?}");
            let (d, br) = if a == &direct {
                (rates[0], rates[1])
            } else {
                (rates[1], rates[0])
            };
            let (dv, bv, rv) = if kind == "tcp" {
                (&mut tcp_d, &mut tcp_b, &mut tcp_r)
            } else {
                (&mut udp_d, &mut udp_b, &mut udp_r)
            };
            dv.push(d);
            bv.push(br);
            rv.push(br / d);
        }
        eprintln!(
            "round {:>2}: tcp conn/s direct {:>6.0} bridged {:>6.0} ({:.3}); \
             udp rt/s direct {:>6.0} bridged {:>6.0} ({:.3})",
            r + 1,
            tcp_d[r],
            tcp_b[r],
            tcp_r[r],
            udp_d[r],
            udp_b[r],
            udp_r[r]
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
    let (p1, p2) = (median(&tcp_r), median(&udp_r));
    println!("median of per-round ratios: tcp {p1:.3}, udp {p2:.3}");
    // Every round gives both paths the same interleaved time, so the totals over all rounds are
    // the least noisy estimate: one slow stretch of the machine hits both sides alike.
    let pooled = |b: &[f64], d: &[f64]| b.iter().sum::<f64>() / d.iter().sum::<f64>();
    println!(
        "pooled over all rounds (total bridged / total direct): tcp {:.3}, udp {:.3}",
        pooled(&tcp_b, &tcp_d),
        pooled(&udp_b, &udp_d)
    );
    println!(
        "medians of {rounds} rounds; goal: ratios >= 0.97; bridge hits counted: {}",
        hits[0]["hits"]
    );
    println!(
        "{}",
        json!({"mode": mode, "rounds": rounds, "secs": secs, "block_ms": block_ms,
        "tcp_conn_direct": median(&tcp_d), "tcp_conn_bridge": median(&tcp_b), "tcp_ratio": r1,
        "tcp_pair_ratio_median": p1,
        "udp_rt_direct": median(&udp_d), "udp_rt_bridge": median(&udp_b), "udp_ratio": r2,
        "udp_pair_ratio_median": p2})
    );
    drop(dev);
    Ok(())
}

/// ns per run of each bridge program attached to the client machine's cgroup, on each path
/// (one side at a time, `secs` each, TCP then UDP).
fn bpf_stats(
    exec: &dyn Fn(Vec<String>) -> Result<String>,
    direct: &str,
    bridged: &str,
    secs: f64,
) -> Result<()> {
    let cg = exec(vec!["cgroup".into()])?;
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let root = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| f[1].to_owned())
        .context("no cgroup2 mount")?;
    let dir = format!("{root}{cg}");
    let progs = bpftool(&["cgroup", "show", &dir, "effective"])?;
    let ids: Vec<u64> = progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    ensure!(!ids.is_empty(), "no programs on {dir}");
    let before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")?;
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
    let res = (|| -> Result<()> {
        for kind in ["tcp", "udp"] {
            for (side, target) in [("direct", direct), ("bridged", bridged)] {
                let s0 = prog_stats(&ids)?;
                let rate: f64 = exec(vec![
                    "client".into(),
                    kind.into(),
                    secs.to_string(),
                    "0".into(),
                    target.into(),
                ])?
                .parse()?;
                let s1 = prog_stats(&ids)?;
                let per: Vec<String> = s0
                    .iter()
                    .zip(&s1)
                    .filter(|(a, b)| b.2 > a.2)
                    .map(|(a, b)| {
                        format!(
                            "{} {:.0} ns x {}",
                            b.0,
                            (b.1 - a.1) as f64 / (b.2 - a.2) as f64,
                            b.2 - a.2
                        )
                    })
                    .collect();
                println!("bpf_stats {kind} {side} ({rate:.0}/s): {}", per.join("; "));
            }
        }
        Ok(())
    })();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", before.trim())?;
    res
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(),
        Some("client") => client(&args[2..]),
        Some("cgroup") => {
            // The v2 cgroup this process runs in (for BPF_STATS).
            let c = std::fs::read_to_string("/proc/self/cgroup")?;
            let p = c
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .context("no cgroup v2 line")?;
            println!("{p}");
            Ok(())
        }
        _ => orchestrate(),
    }
}

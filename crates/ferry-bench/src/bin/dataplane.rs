//! Machine-to-machine across two hosts: TCP throughput (iperf3) and TCP request/response rate,
//! through the eBPF swap path vs the same topology joined by plain per-machine routes without
//! eBPF, both fleets up at once and measured in alternating rounds.

use anyhow::{ensure, Context, Result};
use ferry_addr::NetworkId;
use ferry_bench::{median, report};
use ferry_net::netns::{self, spawn_in};
use ferry_net::{DevFleet, MachineNet, Mode};
use std::io::{Read, Write};
use std::net::{SocketAddrV6, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const RR_PORT: u16 = 7100;

fn pair(name: &str, mode: Mode) -> Result<(DevFleet, MachineNet, MachineNet)> {
    let mut f = DevFleet::create(name, mode)?;
    let (h1, h2) = (f.add_host()?, f.add_host()?);
    let n = NetworkId::new(1)?;
    let a = f.add_machine(h1, n)?;
    let b = f.add_machine(h2, n)?;
    Ok((f, a, b))
}

/// iperf3 from a to b for `secs`; returns Gbit/s received.
fn throughput(a: &MachineNet, b: &MachineNet, secs: u32) -> Result<f64> {
    let ip = b.addr.to_string();
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            b.ns.name(),
            "iperf3",
            "-s",
            "-1",
            "-B",
            &ip,
            "-p",
            "5211",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 (run scripts/setup.sh)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            a.ns.name(),
            "iperf3",
            "-c",
            &ip,
            "-p",
            "5211",
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output()?;
    let _ = server.wait();
    ensure!(
        out.status.success(),
        "iperf3 client failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON")?;
    Ok(bps / 1e9)
}

/// One-byte request, one-byte response over one TCP connection for `dur`; returns per second.
fn request_response(a: &MachineNet, b: &MachineNet, dur: Duration) -> Result<f64> {
    let addr = SocketAddrV6::new(b.addr.ip(), RR_PORT, 0, 0);
    let listener = netns::run_in(&b.ns, move || TcpListener::bind(addr))??;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut c, _) = listener.accept()?;
        c.set_nodelay(true)?;
        let mut buf = [0u8; 1];
        while c.read_exact(&mut buf).is_ok() {
            c.write_all(&buf)?;
        }
        Ok(())
    });
    let client = spawn_in(&a.ns, move || -> std::io::Result<f64> {
        let mut c = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
        c.set_nodelay(true)?;
        let mut buf = [0u8; 1];
        let (start, mut n) = (Instant::now(), 0u64);
        while start.elapsed() < dur {
            c.write_all(b"x")?;
            c.read_exact(&mut buf)?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    });
    let rate = client.join().expect("client thread")??;
    let _ = server.join();
    Ok(rate)
}

fn main() -> Result<()> {
    let rounds: usize = ferry_bench::env_or("ROUNDS", 5);
    let secs: u32 = ferry_bench::env_or("SECS", 3);
    let tag = std::process::id() & 0xffff;
    let (_fs, sa, sb) = pair(&format!("bs{tag:x}"), Mode::Swap)?;
    let (_fp, pa, pb) = pair(&format!("bp{tag:x}"), Mode::PlainRoutes)?;
    println!(
        "dataplane: {rounds} rounds of {secs} s, eBPF swap ({} -> {}) vs plain routes",
        sa.addr, sb.addr
    );

    let (mut tput, mut tput_base, mut rr, mut rr_base) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        // Alternate which goes first so drift on a noisy machine hits both sides alike.
        let order: [bool; 2] = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for swap in order {
            let (a, b) = if swap { (&sa, &sb) } else { (&pa, &pb) };
            let t = throughput(a, b, secs)?;
            let r = request_response(a, b, Duration::from_secs(secs.into()))?;
            if swap {
                tput.push(t);
                rr.push(r);
            } else {
                tput_base.push(t);
                rr_base.push(r);
            }
        }
        eprintln!(
            "round {}: swap {:.2} Gbit/s {:.0} rr/s, plain {:.2} Gbit/s {:.0} rr/s",
            round + 1,
            tput.last().unwrap(),
            rr.last().unwrap(),
            tput_base.last().unwrap(),
            rr_base.last().unwrap()
        );
    }
    let r1 = report("TCP throughput (iperf3)", "Gbit/s", &tput, &tput_base);
    let r2 = report("TCP request/response (1 byte)", "req/s", &rr, &rr_base);
    println!("medians of {rounds} rounds; goal: ratios >= 0.95");
    println!(
        "{}",
        serde_json::json!({"throughput_gbps": median(&tput), "throughput_baseline_gbps": median(&tput_base),
            "throughput_ratio": r1, "rr_per_s": median(&rr), "rr_baseline_per_s": median(&rr_base), "rr_ratio": r2})
    );
    Ok(())
}

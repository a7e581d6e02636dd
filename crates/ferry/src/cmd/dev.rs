//! `ferry dev`: a whole fleet on this box, and `ferry dev clean`.

use anyhow::{bail, Context, Result};
use ferry_addr::NetworkId;
use ferry_net::netns;
use ferry_net::{DevFleet, MachineNet, Mode};
use std::io::{Read, Write};
use std::net::{SocketAddrV6, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    #[command(subcommand)]
    cmd: Option<DevCmd>,
    /// How many hosts (network namespaces joined by a fabric bridge).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    hosts: u32,
    /// Fleet name: prefixes every namespace (`ferry-<name>-...`) and BPF pin of this fleet.
    #[arg(long, default_value = "dev")]
    name: String,
    /// Run the demo, print the result, tear the fleet down and exit (for scripts and CI).
    #[arg(long)]
    exit_after_demo: bool,
    /// Print the fleet as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum DevCmd {
    /// Remove everything ferry created on this machine: `ferry-*` namespaces (with their links,
    /// routes and TC programs) and BPF pins under /sys/fs/bpf/ferry. Safe to run any time no
    /// fleet is in use.
    Clean,
}

pub fn run(args: DevArgs) -> Result<ExitCode> {
    if let Some(DevCmd::Clean) = args.cmd {
        let removed = ferry_net::clean_all().context("cleaning up")?;
        if removed.is_empty() {
            println!("nothing to clean");
        }
        for r in removed {
            println!("removed {r}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("ferry dev creates network namespaces and loads eBPF: run it as root");
    }
    if !netns::list(&format!("ferry-{}-", args.name)).is_empty() {
        bail!(
            "a fleet named {:?} already exists on this machine (another `ferry dev` is running, or one \
             crashed): stop it, or run `ferry dev clean`",
            args.name
        );
    }
    // Block the stop signals before any thread starts, so every thread inherits the mask and the
    // main thread alone receives them through sigwait.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.thread_block()?;

    let mut fleet = DevFleet::create(&args.name, Mode::Swap)?;
    let t0 = Instant::now();
    let hosts: Vec<_> = (0..args.hosts).map(|_| fleet.add_host()).collect::<Result<_, _>>()?;
    let nets = [NetworkId::new(1)?, NetworkId::new(2)?];
    let mut machines = Vec::new();
    for &h in &hosts {
        for &n in &nets {
            machines.push(fleet.add_machine(h, n)?);
        }
    }
    let setup = t0.elapsed();

    let demo = demo(&machines)?;
    if args.json {
        let out = serde_json::json!({
            "fleet": args.name,
            "hosts": hosts.iter().map(|h| serde_json::json!({
                "id": format!("{:x}", h.get()),
                "namespace": format!("ferry-{}-h{:x}", args.name, h.get()),
                "infra_prefix": ferry_addr::host_infra_prefix(*h).to_string(),
            })).collect::<Vec<_>>(),
            "machines": machines.iter().map(|m| serde_json::json!({
                "namespace": m.ns.name(), "private_ip": m.addr.to_string(),
                "network": m.addr.network().get(), "host": format!("{:x}", m.host().get()),
            })).collect::<Vec<_>>(),
            "demo": demo.iter().map(|d| serde_json::json!({"from": d.0, "to": d.1, "result": d.2})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("fleet {:?}: {} hosts, {} machines, up in {:.0?}\n", args.name, hosts.len(), machines.len(), setup);
        println!("{:<10} {:<26} {:<22}", "HOST", "NAMESPACE", "INFRA PREFIX");
        for h in &hosts {
            let ns = format!("ferry-{}-h{:x}", args.name, h.get());
            println!("{:<10} {:<26} {:<22}", format!("{:x}", h.get()), ns, ferry_addr::host_infra_prefix(*h).to_string());
        }
        println!("\n{:<34} {:<8} {:<10} NAMESPACE", "PRIVATE IP", "NETWORK", "HOST");
        for m in &machines {
            println!("{:<34} {:<8} {:<10} {}", m.addr.to_string(), m.addr.network().get(), format!("{:x}", m.host().get()), m.ns.name());
        }
        println!("\ndemo (TCP echo over private addresses):");
        for (from, to, result, _) in &demo {
            println!("  {from} -> {to}: {result}");
        }
    }
    let ok = demo.iter().all(|d| d.3);
    if args.exit_after_demo {
        fleet.teardown()?;
        return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    println!(
        "\nexplore it: `ip netns exec {} ping {}`; Ctrl-C tears the fleet down.",
        machines[0].ns.name(),
        machines.last().map(|m| m.addr.to_string()).unwrap_or_default()
    );
    let sig = sigs.wait()?;
    eprintln!("{sig:?}: tearing down fleet {:?}", args.name);
    fleet.teardown()?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Talks between machines: same network across hosts (must work), other network (must not).
fn demo(ms: &[MachineNet]) -> Result<Vec<(String, String, String, bool)>> {
    let a = &ms[0];
    let same = ms.iter().rev().find(|m| m.addr.network() == a.addr.network() && m.host() != a.host());
    let other = ms.iter().rev().find(|m| m.addr.network() != a.addr.network());
    let mut out = Vec::new();
    for (to, expect) in [(same, true), (other, false)] {
        let Some(to) = to else { continue };
        let got = echo_once(a, to)?;
        let result = match (&got, expect) {
            (Some(b), true) => format!("ok, {} bytes echoed (same network, across hosts)", b.len()),
            (None, false) => "blocked (different network: isolation)".into(),
            (Some(_), false) => "REACHED another network: isolation is broken".into(),
            (None, true) => "FAILED: no answer".into(),
        };
        out.push((a.addr.to_string(), to.addr.to_string(), result, got.is_some() == expect));
    }
    Ok(out)
}

fn echo_once(from: &MachineNet, to: &MachineNet) -> Result<Option<Vec<u8>>> {
    let addr = SocketAddrV6::new(to.addr.ip(), 7, 0, 0);
    let listener = netns::run_in(&to.ns, move || TcpListener::bind(addr))??;
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok((mut c, _)) = listener.accept() {
                c.set_nonblocking(false)?;
                let mut buf = [0u8; 64];
                let n = c.read(&mut buf)?;
                c.write_all(&buf[..n])?;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok::<_, std::io::Error>(())
    });
    let msg = format!("hello from {}", from.addr).into_bytes();
    let got = netns::run_in(&from.ns, move || -> Option<Vec<u8>> {
        let mut c = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(500)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        c.write_all(&msg).ok()?;
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).ok()?;
        Some(back)
    })?;
    let _ = server.join();
    Ok(got)
}

//! Benchmark helper for `bench/dns/run.sh`: serves a generated snapshot on a loopback port, and
//! writes the very same records as an NSD zone file and as a dnsperf query file, so both
//! servers answer identical questions with identical data.
//!
//! Usage:
//!   ferry-dns-bench serve PORT        serve UDP+TCP on 127.0.0.1:PORT (operator view) until killed
//!   ferry-dns-bench zone              print the NSD zone file for `internal.`
//!   ferry-dns-bench queries           print the dnsperf query file (mixed AAAA/TXT/NXDOMAIN)
//!   ferry-dns-bench publish ORGS      time publishing ORGS x 200 machines (median of 5)
//!
//! It must never bind anything but loopback: it is a benchmark, not a server deployment.

use ferry_dns::{DnsMachine, DnsServer, Snapshot, ZoneData, TTL};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv6Addr;
use std::sync::Arc;

const ORGS: u32 = 5;
const APPS_PER_ORG: u32 = 10;
const MACHINES_PER_APP: u32 = 20;
const REGIONS: [&str; 4] = ["ord", "lax", "ams", "syd"];
const TOP_N: [usize; 2] = [1, 3];

fn snapshot() -> Snapshot {
    snapshot_of(ORGS)
}

/// `orgs` orgs of the bench's shape (10 apps x 20 machines each).
fn snapshot_of(orgs: u32) -> Snapshot {
    let mut machines = Vec::new();
    let mut field = 0u32;
    for org in 1..=orgs {
        for a in 0..APPS_PER_ORG {
            for i in 0..MACHINES_PER_APP {
                field += 1;
                let host = 0x8000_0000 + (i % 8);
                machines.push(DnsMachine {
                    id: format!("{:08x}{:06x}", org * 100 + a, i),
                    app: format!("app{org}x{a}"),
                    org: format!("org{org}"),
                    network_id: org,
                    region: REGIONS[(i % 4) as usize].into(),
                    private_ip: Ipv6Addr::new(
                        0xfdaa,
                        0,
                        org as u16,
                        (host >> 16) as u16,
                        host as u16,
                        0,
                        field as u16,
                        2,
                    ),
                    process_group: if i % 5 == 0 { "worker" } else { "app" }.into(),
                    // One in ten is stopped: it must be in neither server's answers.
                    started: i % 10 != 9,
                });
            }
        }
    }
    Snapshot { machines }
}

fn started(s: &Snapshot) -> impl Iterator<Item = &DnsMachine> {
    s.machines.iter().filter(|m| m.started)
}

fn apps(s: &Snapshot) -> BTreeSet<String> {
    s.machines.iter().map(|m| m.app.clone()).collect()
}

fn quoted_chunks(v: &str) -> String {
    v.as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The operator view of the snapshot as a zone file (what ferry answers from loopback).
fn zone(s: &Snapshot) -> String {
    let mut z = String::new();
    let _ = writeln!(z, "$ORIGIN internal.\n$TTL {TTL}");
    let _ = writeln!(
        z,
        "@ IN SOA ns.internal. hostmaster.internal. 1 3600 600 86400 {TTL}\n@ IN NS ns.internal.\nns IN AAAA fdaa::3"
    );
    let all_apps = apps(s);
    let _ = writeln!(
        z,
        "_apps IN TXT {}",
        quoted_chunks(&all_apps.iter().cloned().collect::<Vec<_>>().join(","))
    );
    for app in &all_apps {
        let mut ms: Vec<&DnsMachine> = started(s).filter(|m| &m.app == app).collect();
        ms.sort_by(|a, b| a.id.cmp(&b.id));
        for m in &ms {
            let ip = m.private_ip;
            for owner in [
                app.clone(),
                format!("global.{app}"),
                format!("{}.vm.{app}", m.id),
                format!("{}.{app}", m.region),
                format!("{}.process.{app}", m.process_group),
            ] {
                let _ = writeln!(z, "{owner} IN AAAA {ip}");
            }
        }
        for n in TOP_N {
            for m in ms.iter().take(n) {
                let _ = writeln!(z, "top{n}.nearest.of.{app} IN AAAA {}", m.private_ip);
            }
        }
        let vms: Vec<String> = ms
            .iter()
            .map(|m| format!("{} {}", m.id, m.region))
            .collect();
        let regions: BTreeSet<&str> = ms.iter().map(|m| m.region.as_str()).collect();
        let _ = writeln!(z, "vms.{app} IN TXT {}", quoted_chunks(&vms.join(",")));
        let _ = writeln!(
            z,
            "regions.{app} IN TXT {}",
            quoted_chunks(&regions.into_iter().collect::<Vec<_>>().join(","))
        );
    }
    z
}

fn queries(s: &Snapshot) -> String {
    let mut q = String::new();
    for app in apps(s) {
        let ms: Vec<&DnsMachine> = started(s).filter(|m| m.app == app).collect();
        let _ = writeln!(q, "{app}.internal AAAA");
        for m in ms.iter().take(3) {
            let _ = writeln!(q, "{}.vm.{app}.internal AAAA", m.id);
        }
        let _ = writeln!(q, "ord.{app}.internal AAAA");
        let _ = writeln!(q, "worker.process.{app}.internal AAAA");
        let _ = writeln!(q, "top3.nearest.of.{app}.internal AAAA");
        let _ = writeln!(q, "vms.{app}.internal TXT");
        let _ = writeln!(q, "regions.{app}.internal TXT");
        let _ = writeln!(q, "nope-{app}.internal AAAA");
    }
    q.push_str("_apps.internal TXT\n");
    q
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let snap = snapshot();
    match args.get(1).map(String::as_str) {
        Some("zone") => print!("{}", zone(&snap)),
        Some("queries") => print!("{}", queries(&snap)),
        Some("publish") => {
            // How long a publish takes (index + prepared names) for a fleet of ORGS x 200
            // machines: it is part of the freshness budget. Median of 5.
            let orgs: u32 = args
                .get(2)
                .and_then(|p| p.parse().ok())
                .expect("usage: ferry-dns-bench publish ORGS");
            let snap = snapshot_of(orgs);
            let zone = ZoneData::new();
            let mut took: Vec<_> = (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    zone.publish(snap.clone());
                    t.elapsed()
                })
                .collect();
            took.sort();
            println!(
                "publish: {} machines, {} prepared names, median {:?} (min {:?}, max {:?})",
                snap.machines.len(),
                zone.prepared_names(),
                took[2],
                took[0],
                took[4]
            );
        }
        Some("serve") => {
            let port: u16 = args
                .get(2)
                .and_then(|p| p.parse().ok())
                .expect("usage: ferry-dns-bench serve PORT");
            let zone = Arc::new(ZoneData::new());
            let machines = snap.machines.len();
            // A publish indexes the snapshot and prepares every name's answer; its time is part
            // of the freshness budget (a change must show within 100 ms).
            let t = std::time::Instant::now();
            let skipped = zone.publish(snap);
            let took = t.elapsed();
            assert!(skipped.is_empty(), "{skipped:?}");
            eprintln!(
                "ferry-dns-bench: published {machines} machines ({} prepared names) in {took:?}",
                zone.prepared_names()
            );
            let server = DnsServer::new(zone);
            // One thread, like NSD with server-count 1: the comparison is per core.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let udp = tokio::net::UdpSocket::bind(("127.0.0.1", port))
                    .await
                    .expect("bind udp");
                let tcp = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("bind tcp");
                eprintln!("ferry-dns-bench: serving on 127.0.0.1:{port}");
                let s2 = server.clone();
                let r = tokio::select! {
                    r = server.serve_udp(udp) => r,
                    r = s2.serve_tcp(tcp) => r,
                };
                eprintln!("ferry-dns-bench: stopped: {r:?}");
            });
        }
        _ => {
            eprintln!("usage: ferry-dns-bench serve PORT | zone | queries | publish ORGS");
            std::process::exit(2);
        }
    }
}

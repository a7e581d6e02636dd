//! Serving `.internal` DNS for a dev fleet: a snapshot of the store after every change, listeners
//! at `[fdaa::3]:53` inside every host namespace and one on loopback for operators.
//!
//! On a dev fleet the server process answers for every host (it already holds the state); the
//! sockets are created inside each host's namespace, so machines reach them at `fdaa::3` through
//! their own host exactly as they would reach a per-host server.

use anyhow::{Context, Result};
use ferry_dns::{DnsMachine, DnsServer, Snapshot, ZoneData};
use ferry_net::netns::{self, NetNs};
use ferry_store::{MachineState, Store};
use std::net::{SocketAddr, SocketAddrV6};
use std::sync::Arc;

/// What DNS should answer, from the store.
pub fn snapshot(store: &dyn Store) -> Option<Snapshot> {
    // A store that cannot answer gives no snapshot (not an empty one): DNS keeps the last.
    let machines = store.list_machines(None).ok()?;
    Some(Snapshot {
        machines: machines
            .into_iter()
            .filter_map(|m| {
                let ip = m.private_ip.as_deref()?.parse().ok()?;
                let group = m.config["metadata"]["process_group"]
                    .as_str()
                    .unwrap_or("app")
                    .to_owned();
                Some(DnsMachine {
                    id: m.id,
                    app: m.app,
                    org: m.org,
                    network_id: m.network_id.get(),
                    region: m.region,
                    private_ip: ip,
                    process_group: group,
                    started: m.state == MachineState::Started,
                })
            })
            .collect(),
    })
}

/// Starts the listeners on `rt`: `[fdaa::3]:53` (UDP and TCP) in each host namespace, and
/// `operator` on the host.
pub fn serve(
    rt: &tokio::runtime::Runtime,
    zone: Arc<ZoneData>,
    hosts: &[NetNs],
    operator: SocketAddr,
) -> Result<()> {
    let server = DnsServer::new(zone);
    let mut sockets = Vec::new();
    for ns in hosts {
        let addr = SocketAddrV6::new(ferry_addr::DNS_ADDR, 53, 0, 0);
        let pair = netns::run_in(ns, move || -> std::io::Result<_> {
            let udp = std::net::UdpSocket::bind(addr)?;
            let tcp = std::net::TcpListener::bind(addr)?;
            Ok((udp, tcp))
        })?
        .with_context(|| format!("binding [fdaa::3]:53 in {}", ns.name()))?;
        sockets.push(pair);
    }
    sockets.push((
        std::net::UdpSocket::bind(operator)
            .with_context(|| format!("binding the operator DNS listener {operator}"))?,
        std::net::TcpListener::bind(operator)
            .with_context(|| format!("binding the operator DNS listener {operator}"))?,
    ));
    for (udp, tcp) in sockets {
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let _guard = rt.enter();
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let (s1, s2) = (server.clone(), server.clone());
        rt.spawn(async move { s1.serve_udp(udp).await });
        rt.spawn(async move { s2.serve_tcp(tcp).await });
    }
    Ok(())
}

//! The control plane's side of `.internal` DNS: the snapshot of the store built after every
//! change (which every host's agent receives on its watch stream and serves to its machines at
//! `[fdaa::3]:53`), and the operators' listener on the server itself.

use anyhow::{Context, Result};
use ferry_dns::{DnsMachine, DnsServer, Snapshot, ZoneData};
use ferry_store::{MachineState, Store};
use std::net::SocketAddr;
use std::sync::Arc;

/// What DNS should answer, from the store.
pub fn snapshot(store: &dyn Store) -> Option<Snapshot> {
    // A store that cannot answer gives no snapshot (not an empty one): DNS keeps the last.
    // Summaries, not whole machines: this runs after every change (three per create), and
    // reading and parsing every machine's config here made creates slower as machines piled up.
    // Followed (on etcd, from the watch's memory): this runs when the change feed moves, and
    // ranging over every machine on every change was most of the cluster's work under a drain.
    let machines = store.followed_machine_summaries(None).ok()?;
    Some(Snapshot {
        machines: machines
            .into_iter()
            .filter_map(|m| {
                let ip = m.private_ip.as_deref()?.parse().ok()?;
                let group = m.process_group.unwrap_or_else(|| "app".to_owned());
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

/// Starts the operators' listener (UDP and TCP) on `rt`.
pub fn serve(
    rt: &tokio::runtime::Runtime,
    zone: Arc<ZoneData>,
    operator: SocketAddr,
) -> Result<()> {
    let server = DnsServer::new(zone);
    let mut sockets = Vec::new();
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

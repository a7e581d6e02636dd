//! `.internal` DNS on this host: the agent answers its machines at `[fdaa::3]:53` (UDP and TCP,
//! inside the host's network namespace) from the fleet's snapshot, which the server streams on
//! the watch. The last snapshot is kept on disk too, so a restarted agent answers at once, and
//! DNS keeps answering what it last knew while no server can be reached.

use crate::AgentError;
use ferry_dns::{DnsServer, Snapshot, ZoneData};
use ferry_net::netns::NetNs;
use std::net::SocketAddrV6;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) struct HostDns {
    zone: Arc<ZoneData>,
    saved: PathBuf,
}

impl HostDns {
    /// Binds `[fdaa::3]:53` in `ns` and serves it on `rt`, with the snapshot saved in
    /// `state_dir` if there is one.
    pub(crate) fn start(
        ns: &NetNs,
        state_dir: &Path,
        rt: &tokio::runtime::Handle,
    ) -> Result<HostDns, AgentError> {
        let zone = Arc::new(ZoneData::new());
        let saved = state_dir.join("dns.json");
        if let Some(snap) = std::fs::read(&saved)
            .ok()
            .and_then(|b| serde_json::from_slice::<Snapshot>(&b).ok())
        {
            publish(&zone, snap);
        }
        let addr = SocketAddrV6::new(ferry_addr::DNS_ADDR, 53, 0, 0);
        let (udp, tcp) = ferry_net::netns::run_in(ns, move || -> std::io::Result<_> {
            let udp = std::net::UdpSocket::bind(addr)?;
            let tcp = std::net::TcpListener::bind(addr)?;
            udp.set_nonblocking(true)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })?
        .map_err(|e| AgentError::io(format!("binding [fdaa::3]:53 in {}", ns.name()), e))?;
        let server = DnsServer::new(zone.clone());
        let _guard = rt.enter();
        let udp = tokio::net::UdpSocket::from_std(udp)
            .map_err(|e| AgentError::io("the DNS socket", e))?;
        let tcp = tokio::net::TcpListener::from_std(tcp)
            .map_err(|e| AgentError::io("the DNS listener", e))?;
        let s2 = server.clone();
        rt.spawn(async move { server.serve_udp(udp).await });
        rt.spawn(async move { s2.serve_tcp(tcp).await });
        Ok(HostDns { zone, saved })
    }

    /// Serves `snapshot` from now on (a watch line's), and keeps it for the next start.
    pub(crate) fn apply(&self, snapshot: serde_json::Value) -> Result<(), AgentError> {
        let snap: Snapshot = serde_json::from_value(snapshot)
            .map_err(|e| AgentError::Invalid(format!("DNS snapshot: {e}")))?;
        let bytes = serde_json::to_vec(&snap).expect("a snapshot serializes");
        publish(&self.zone, snap);
        crate::machines::write_atomic(&self.saved, &bytes)
    }

    /// Responses by RCODE so far (index = RCODE), for the agent's metrics.
    pub(crate) fn answered(&self) -> [u64; 16] {
        self.zone.answered()
    }
}

fn publish(zone: &ZoneData, snap: Snapshot) {
    for e in zone.publish(snap) {
        tracing::warn!("a machine left out of DNS: {e}");
    }
}

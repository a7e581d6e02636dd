//! One host's data plane: what `ferry agent` drives on a real host and `ferry dev` on each
//! host namespace.
//!
//! Routes (docs/design.md#routes), and nothing else:
//! * one per local machine: its guest /112 on its veth;
//! * one per *other* host: that host's infra /48 via its underlay address (swap mode);
//! * none per remote machine (except in [`Mode::PlainRoutes`](crate::Mode), the benchmark
//!   baseline without eBPF, which routes guest /112s directly).

use crate::netns::{self, NetNs, NsThread};
use crate::nl::{Netlink, Route6};
use crate::NetError;
use ferry_addr::{
    host_infra_prefix, FleetAddr, HostId, MachineField, NetworkId, DNS_ADDR, FLEET_PREFIX,
};
use ferry_ebpf::{Dataplane, Stat};
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;

/// The host side of every machine veth carries this link-local address; machines route
/// `fdaa::/16` via it.
pub const HOST_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Name of a host's fabric link inside its namespace.
pub const FABRIC_IFACE: &str = "fab0";

/// Name of a machine's interface inside its namespace.
pub const MACHINE_IFACE: &str = "eth0";

/// A real host's overlay link (docs/design.md#underlay): VXLAN, the one encapsulation this
/// kernel family always has built in (no ip6tnl, sit or GENEVE here), which crosses routers and
/// IPv4-only underlays alike (it is UDP), spreads over ECMP paths by its source port, and keeps
/// an Ethernet header, so the fabric programs run on it unchanged.
pub const OVERLAY_IFACE: &str = "ferry-vx0";
/// The overlay's VXLAN network identifier: one per fleet's underlay.
pub const OVERLAY_VNI: u32 = 0xfdaa;
/// VXLAN's IANA port.
pub const OVERLAY_PORT: u16 = 4789;

/// How this host reaches another host's infra /48.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath {
    /// Routed to its underlay address, which is on-link on the underlay interface.
    Direct(Ipv6Addr),
    /// Through the overlay link to its overlay address, encapsulated to its underlay address
    /// (another subnet, or an IPv4 underlay).
    Overlay(IpAddr),
}

/// A real host's underlay as [`HostNet::attach_underlay`] found it.
#[derive(Debug, Clone)]
struct UnderlayState {
    addr: IpAddr,
    /// The interface holding `addr`.
    link: u32,
    overlay: u32,
}

/// Everything the host thread keeps.
struct HostState {
    nl: Netlink,
    dp: Option<Dataplane>,
    fabric: Option<u32>,
    underlay: Option<UnderlayState>,
}

/// The data plane of one host, driven from a thread that lives in the host's namespace.
pub struct HostNet {
    id: HostId,
    ns: NetNs,
    worker: NsThread<HostState>,
    swap: bool,
}

/// A machine's network as created on its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineNet {
    pub ns: NetNs,
    pub addr: FleetAddr,
    /// The host side of its veth (`vm<machine field>`), in the host namespace.
    pub host_iface: String,
}

impl MachineNet {
    pub fn host(&self) -> HostId {
        self.addr.host()
    }
}

/// The host side of a machine's veth: `vm<machine field>` (unique per host, 10 characters).
pub fn machine_iface(field: MachineField) -> String {
    format!("vm{:08x}", field.0)
}

impl HostNet {
    /// Prepares the host namespace `ns` (forwarding on, DAD off, `fdaa::3` on loopback) and,
    /// when `pin_dir` is given, loads the eBPF data plane with its maps pinned there.
    pub fn start(id: HostId, ns: &NetNs, pin_dir: Option<PathBuf>) -> Result<Self, NetError> {
        let swap = pin_dir.is_some();
        let worker = NsThread::start(ns, move || {
            for (k, v) in [
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_ra", "0"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.conf.default.forwarding", "1"),
            ] {
                netns::sysctl(k, v)?;
            }
            let nl = Netlink::new()?;
            let lo = nl.require_index("lo")?;
            nl.up(lo, None)?;
            // Reserved for the DNS server on every host (docs/design.md#dns).
            match nl.add_address(lo, DNS_ADDR, 128) {
                Ok(()) => {}
                Err(NetError::Netlink { msg, .. }) if msg.contains("File exists") => {}
                Err(e) => return Err(e),
            }
            let dp = pin_dir.map(|p| Dataplane::load(&p, id)).transpose()?;
            Ok(HostState {
                nl,
                dp,
                fabric: None,
                underlay: None,
            })
        })?;
        Ok(HostNet {
            id,
            ns: ns.clone(),
            worker,
            swap,
        })
    }

    pub fn id(&self) -> HostId {
        self.id
    }
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// This host's underlay address on the fabric (dev fleets): `fdfe::<host id>`.
    pub fn underlay_addr(id: HostId) -> Ipv6Addr {
        let h = id.get();
        Ipv6Addr::new(0xfdfe, 0, 0, 0, 0, 0, (h >> 16) as u16, h as u16)
    }

    /// Configures the fabric link (already moved into this namespace as [`FABRIC_IFACE`]): up,
    /// underlay address, fabric programs.
    pub fn attach_fabric(&self, mtu: u32) -> Result<(), NetError> {
        let underlay = Self::underlay_addr(self.id);
        self.worker.run(move |s| {
            let idx = s.nl.require_index(FABRIC_IFACE)?;
            s.nl.up(idx, Some(mtu))?;
            s.nl.add_address(idx, underlay, 64)?;
            if let Some(dp) = s.dp.as_mut() {
                dp.attach_fabric(FABRIC_IFACE, idx)?;
            }
            s.fabric = Some(idx);
            Ok(())
        })?
    }

    /// Takes over a fabric link that an earlier process configured (a dev fleet adopted after a
    /// crash): its address, filters and routes are still there; only the index is needed.
    pub fn adopt_fabric(&self) -> Result<(), NetError> {
        self.worker.run(move |s| {
            s.fabric = Some(s.nl.require_index(FABRIC_IFACE)?);
            Ok(())
        })?
    }

    /// A host's address on its overlay link (and the next hop other hosts route its infra /48
    /// to through that link): the same `fdfe::<host id>` a dev fleet's fabric uses.
    pub fn overlay_addr(id: HostId) -> Ipv6Addr {
        Self::underlay_addr(id)
    }

    /// A host's MAC address on the overlay link: locally administered, from its ID, so every
    /// host knows every other's without asking.
    pub fn overlay_mac(id: HostId) -> [u8; 6] {
        let h = id.get().to_be_bytes();
        [0x02, 0xfe, h[0], h[1], h[2], h[3]]
    }

    /// A real host: the interface holding `addr` is the underlay. The fabric programs go on it
    /// and on the overlay link (created over it, or taken over from an earlier agent), whose MTU
    /// leaves room for the encapsulation. Returns the overlay link's MTU.
    pub fn attach_underlay(&self, addr: IpAddr) -> Result<u32, NetError> {
        if !self.swap {
            return Err(NetError::Invalid(
                "an underlay needs the eBPF data plane".into(),
            ));
        }
        let id = self.id;
        self.worker.run(move |s| -> Result<u32, NetError> {
            let link = s
                .nl
                .addresses()?
                .into_iter()
                .find(|(_, a, _)| *a == addr)
                .map(|(i, _, _)| i)
                .ok_or_else(|| NetError::NotFound(format!("an interface with address {addr}")))?;
            let (link_name, link_mtu) =
                s.nl.link_name_mtu(link)?
                    .ok_or_else(|| NetError::NotFound(format!("link {link}")))?;
            // VXLAN's own headers: outer IP (20 or 40), UDP 8, VXLAN 8, inner Ethernet 14.
            let overhead = if addr.is_ipv4() { 50 } else { 70 };
            let mtu = link_mtu.saturating_sub(overhead);
            let overlay = match s.nl.link_index(OVERLAY_IFACE)? {
                Some(i) => i,
                None => s.nl.create_vxlan(&crate::nl::Vxlan {
                    name: OVERLAY_IFACE.into(),
                    vni: OVERLAY_VNI,
                    dev: link,
                    local: addr,
                    port: OVERLAY_PORT,
                    mtu,
                    mac: Self::overlay_mac(id),
                })?,
            };
            match s.nl.add_address(overlay, Self::overlay_addr(id), 64) {
                Ok(()) => {}
                Err(NetError::Netlink { msg, .. }) if msg.contains("File exists") => {}
                Err(e) => return Err(e),
            }
            if let Some(dp) = s.dp.as_mut() {
                // An earlier agent's programs are still attached (their links pinned): leave
                // them, a second copy would swap every packet twice.
                let pinned = dp.pinned_ifaces();
                for (name, idx) in [(link_name.as_str(), link), (OVERLAY_IFACE, overlay)] {
                    if !pinned.contains(&idx) {
                        dp.attach_fabric(name, idx)?;
                    }
                }
            }
            s.underlay = Some(UnderlayState {
                addr,
                link,
                overlay,
            });
            Ok(mtu)
        })?
    }

    /// Makes this host's routes to other hosts exactly `peers` (a real host; see
    /// [`HostNet::attach_underlay`]): one route per other host, its infra /48 to its underlay
    /// address when that is on-link, else through the overlay. Routes to hosts not in `peers`
    /// go. Returns each peer's path.
    pub fn set_peers(&self, peers: Vec<(HostId, IpAddr)>) -> Result<Vec<PeerPath>, NetError> {
        let me = self.id;
        self.worker.run(move |s| -> Result<Vec<PeerPath>, NetError> {
            let u = s
                .underlay
                .clone()
                .ok_or_else(|| NetError::NotFound("the underlay (attach it first)".into()))?;
            // The on-link IPv6 prefixes of the underlay interface.
            let onlink: Vec<(Ipv6Addr, u8)> = s
                .nl
                .addresses()?
                .into_iter()
                .filter(|(i, _, _)| *i == u.link)
                .filter_map(|(_, a, len)| match a {
                    IpAddr::V6(a) if a.segments()[0] & 0xffc0 != 0xfe80 => Some((a, len)),
                    _ => None,
                })
                .collect();
            let mut want: Vec<(Ipv6Addr, u8, u32, Ipv6Addr)> = Vec::new();
            let mut paths = Vec::new();
            for (peer, addr) in peers.into_iter().filter(|(p, _)| *p != me) {
                let path = match addr {
                    IpAddr::V6(a) if u.addr.is_ipv6() && onlink.iter().any(|p| in_prefix(a, *p)) => {
                        PeerPath::Direct(a)
                    }
                    a => PeerPath::Overlay(a),
                };
                let (oif, via) = match path {
                    PeerPath::Direct(a) => (u.link, a),
                    PeerPath::Overlay(a) => {
                        if a.is_ipv4() != u.addr.is_ipv4() {
                            tracing::warn!(
                                "host {peer}: underlay {a} is not of this host's family ({}); no route",
                                u.addr
                            );
                            continue;
                        }
                        let mac = Self::overlay_mac(peer);
                        s.nl.set_fdb(u.overlay, mac, a)?;
                        s.nl.set_neighbour(u.overlay, Self::overlay_addr(peer), mac)?;
                        (u.overlay, Self::overlay_addr(peer))
                    }
                };
                let p = host_infra_prefix(peer);
                want.push((p.addr(), p.len(), oif, via));
                paths.push(path);
            }
            // Reconcile: ferry's host routes (static /48s in fdaa::/16) become exactly `want`.
            let have: Vec<Route6> = s
                .nl
                .routes6()?
                .into_iter()
                .filter(|r| r.is_static && r.len == 48 && r.dst.segments()[0] == FLEET_PREFIX)
                .collect();
            for r in &have {
                let keep = want.iter().any(|w| {
                    (w.0, w.1, Some(w.2), Some(w.3)) == (r.dst, r.len, r.oif, r.gateway)
                });
                if !keep {
                    if let Some(oif) = r.oif {
                        s.nl.del_route(r.dst, r.len, oif, r.gateway)?;
                    }
                }
            }
            for w in &want {
                let present = have.iter().any(|r| {
                    (w.0, w.1, Some(w.2), Some(w.3)) == (r.dst, r.len, r.oif, r.gateway)
                });
                if !present {
                    s.nl.add_route(w.0, w.1, w.2, Some(w.3))?;
                }
            }
            Ok(paths)
        })?
    }

    /// The one route for another host: its infra /48 via its underlay address.
    pub fn add_peer_host(&self, peer: HostId, underlay: Ipv6Addr) -> Result<(), NetError> {
        if !self.swap {
            return Ok(()); // the plain baseline routes machines, not hosts
        }
        let p = host_infra_prefix(peer);
        self.worker.run(move |s| {
            let fab = s
                .fabric
                .ok_or_else(|| NetError::NotFound("fabric link".into()))?;
            s.nl.add_route(p.addr(), p.len(), fab, Some(underlay))
        })?
    }

    /// Baseline only: a direct route for a remote machine's /112.
    pub fn add_plain_remote(&self, m: FleetAddr, underlay: Ipv6Addr) -> Result<(), NetError> {
        let p = m.machine_prefix();
        self.worker.run(move |s| {
            let fab = s
                .fabric
                .ok_or_else(|| NetError::NotFound("fabric link".into()))?;
            s.nl.add_route(p.addr(), p.len(), fab, Some(underlay))
        })?
    }

    /// Creates a machine's network: its namespace, a veth into it, its address, its routes, the
    /// machine programs on the host side.
    pub fn add_machine(
        &self,
        ns_name: &str,
        net: NetworkId,
        field: MachineField,
        mtu: u32,
    ) -> Result<MachineNet, NetError> {
        let addr = FleetAddr::primary(net, self.id, field);
        let ns = NetNs::create(ns_name)?;
        let built = self.build_machine(&ns, addr, mtu);
        if built.is_err() {
            let _ = ns.delete();
        }
        built?;
        Ok(MachineNet {
            ns,
            addr,
            host_iface: machine_iface(field),
        })
    }

    fn build_machine(&self, ns: &NetNs, addr: FleetAddr, mtu: u32) -> Result<(), NetError> {
        // Inside the machine first: DAD off before its interface is born there.
        netns::run_in(ns, || -> Result<(), NetError> {
            netns::sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            netns::sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            let nl = Netlink::new()?;
            nl.up(nl.require_index("lo")?, None)
        })??;

        let iface = machine_iface(addr.machine());
        let ns_file = ns.open()?;
        let (net, host, field) = (addr.network(), addr.host(), addr.machine());
        let prefix = addr.machine_prefix();
        self.worker.run(move |s| -> Result<(), NetError> {
            let idx = s.nl.create_veth(&iface, MACHINE_IFACE, &ns_file, mtu)?;
            s.nl.add_address(idx, HOST_LINK_LOCAL, 64)?;
            s.nl.up(idx, None)?;
            if let Some(dp) = s.dp.as_mut() {
                dp.attach_machine(&iface, idx, net, host, field)?;
            }
            s.nl.add_route(prefix.addr(), prefix.len(), idx, None)
        })??;

        netns::run_in(ns, move || -> Result<(), NetError> {
            let nl = Netlink::new()?;
            let eth = nl.require_index(MACHINE_IFACE)?;
            nl.up(eth, None)?;
            nl.add_address(eth, addr.ip(), 128)?;
            // The machine's only route: the whole fleet prefix via its host.
            nl.add_route(
                Ipv6Addr::new(0xfdaa, 0, 0, 0, 0, 0, 0, 0),
                16,
                eth,
                Some(HOST_LINK_LOCAL),
            )
        })?
    }

    /// Removes a machine's network (its namespace; the veth and the /112 route go with it).
    pub fn remove_machine(&self, m: &MachineNet) -> Result<(), NetError> {
        let iface = m.host_iface.clone();
        self.worker.run(move |s| -> Result<(), NetError> {
            if let Some(idx) = s.nl.link_index(&iface)? {
                // The link first: its programs stay attached until the kernel removes the
                // interface, so no packet of the machine's ever passes unchecked.
                s.nl.delete_link(idx)?;
                if let Some(dp) = s.dp.as_mut() {
                    dp.forget_iface(idx)?;
                }
            }
            Ok(())
        })??;
        m.ns.delete()
    }

    /// The host's IPv6 routes (main table).
    pub fn routes(&self) -> Result<Vec<Route6>, NetError> {
        self.worker.run(|s| s.nl.routes6())?
    }

    /// The data plane's counters (all zero without eBPF).
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>, NetError> {
        self.worker.run(|s| {
            Stat::ALL
                .iter()
                .map(|&st| {
                    Ok((
                        st,
                        s.dp.as_ref().map(|d| d.stat(st)).transpose()?.unwrap_or(0),
                    ))
                })
                .collect::<Result<Vec<_>, NetError>>()
        })?
    }

    pub fn set_machine_mtu(&self, m: &MachineNet, mtu: u32) -> Result<(), NetError> {
        let iface = m.host_iface.clone();
        self.worker
            .run(move |s| s.nl.set_mtu(s.nl.require_index(&iface)?, mtu))??;
        netns::run_in(&m.ns, move || {
            let nl = Netlink::new()?;
            nl.set_mtu(nl.require_index(MACHINE_IFACE)?, mtu)
        })?
    }
}

/// Whether `a` is inside `prefix`.
fn in_prefix(a: Ipv6Addr, (p, len): (Ipv6Addr, u8)) -> bool {
    let len = u32::from(len.min(128));
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    u128::from(a) & mask == u128::from(p) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_link_is_the_prefix_and_nothing_around_it() {
        let p: (Ipv6Addr, u8) = ("2001:db8:1::5".parse().unwrap(), 64);
        assert!(in_prefix("2001:db8:1::9".parse().unwrap(), p));
        assert!(in_prefix("2001:db8:1:0:ffff::1".parse().unwrap(), p));
        assert!(!in_prefix("2001:db8:2::9".parse().unwrap(), p));
        assert!(!in_prefix("2001:db8:1:1::9".parse().unwrap(), p));
        assert!(in_prefix(
            "fd00::1".parse().unwrap(),
            (Ipv6Addr::UNSPECIFIED, 0)
        ));
        let host: (Ipv6Addr, u8) = ("2001:db8::1".parse().unwrap(), 128);
        assert!(in_prefix("2001:db8::1".parse().unwrap(), host));
        assert!(!in_prefix("2001:db8::2".parse().unwrap(), host));
    }

    #[test]
    fn overlay_identities_follow_the_host_id() {
        let h = HostId::new(0x8000_007d).unwrap();
        assert_eq!(
            HostNet::overlay_mac(h),
            [0x02, 0xfe, 0x80, 0x00, 0x00, 0x7d]
        );
        assert_eq!(
            HostNet::overlay_addr(h),
            "fdfe::8000:7d".parse::<Ipv6Addr>().unwrap()
        );
        // Locally administered, unicast: never a vendor's or a multicast MAC.
        assert_eq!(HostNet::overlay_mac(h)[0] & 0b11, 0b10);
    }
}

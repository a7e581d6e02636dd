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
use ferry_addr::{host_infra_prefix, FleetAddr, HostId, MachineField, NetworkId, DNS_ADDR};
use ferry_ebpf::{Dataplane, Stat};
use std::net::Ipv6Addr;
use std::path::PathBuf;

/// The host side of every machine veth carries this link-local address; machines route
/// `fdaa::/16` via it.
pub const HOST_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Name of a host's fabric link inside its namespace.
pub const FABRIC_IFACE: &str = "fab0";

/// Name of a machine's interface inside its namespace.
pub const MACHINE_IFACE: &str = "eth0";

/// Everything the host thread keeps.
struct HostState {
    nl: Netlink,
    dp: Option<Dataplane>,
    fabric: Option<u32>,
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

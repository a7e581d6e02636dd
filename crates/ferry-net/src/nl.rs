//! Synchronous netlink (rtnetlink) for the calling thread's network namespace.
//!
//! A [`Netlink`] owns a current-thread tokio runtime and one rtnetlink connection. Create it on the
//! thread that is inside the namespace you mean (the socket binds to the creator's namespace), and
//! keep it on that thread.

use crate::NetError;
use futures::TryStreamExt;
use netlink_packet_route::link::{InfoBridge, InfoData, InfoKind, InfoVeth, LinkAttribute};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsRawFd;

/// One IPv6 route as read back from the kernel (main table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route6 {
    pub dst: Ipv6Addr,
    pub len: u8,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv6Addr>,
    /// Routes ferry installed carry the "static" protocol; kernel ones (link-local, prefix
    /// routes of addresses) do not.
    pub is_static: bool,
}

/// A VXLAN link to create ([`Netlink::create_vxlan`]).
#[derive(Debug, Clone)]
pub struct Vxlan {
    pub name: String,
    pub vni: u32,
    pub dev: u32,
    pub local: IpAddr,
    pub port: u16,
    pub mtu: u32,
    pub mac: [u8; 6],
}

pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

fn nl(what: &str) -> impl FnOnce(rtnetlink::Error) -> NetError + '_ {
    move |e| NetError::Netlink {
        what: what.to_owned(),
        msg: e.to_string(),
    }
}

impl Netlink {
    pub fn new() -> Result<Self, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetError::io("building a netlink runtime".into(), e))?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| NetError::io("opening netlink".into(), e))?;
            tokio::spawn(conn);
            Ok::<_, NetError>(handle)
        })?;
        Ok(Netlink { rt, handle })
    }

    pub fn link_index(&self, name: &str) -> Result<Option<u32>, NetError> {
        self.rt.block_on(async {
            let mut s = self
                .handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute();
            match s.try_next().await {
                Ok(Some(m)) => Ok(Some(m.header.index)),
                Ok(None) => Ok(None),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
                Err(e) => Err(nl("looking up a link")(e)),
            }
        })
    }

    pub fn require_index(&self, name: &str) -> Result<u32, NetError> {
        self.link_index(name)?
            .ok_or_else(|| NetError::NotFound(format!("link {name}")))
    }

    /// Brings a link up, optionally setting its MTU.
    pub fn up(&self, index: u32, mtu: Option<u32>) -> Result<(), NetError> {
        let mut b = LinkUnspec::new_with_index(index).up();
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        self.rt
            .block_on(self.handle.link().set(b.build()).execute())
            .map_err(nl("setting a link up"))
    }

    pub fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetError> {
        let m = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.rt
            .block_on(self.handle.link().set(m).execute())
            .map_err(nl("setting an MTU"))
    }

    /// Creates a veth pair whose peer is born inside the namespace `peer_ns` (so its name only has
    /// to be unique there). Returns the local end's index.
    pub fn create_veth(
        &self,
        name: &str,
        peer: &str,
        peer_ns: &std::fs::File,
        mtu: u32,
    ) -> Result<u32, NetError> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_owned())
            .mtu(mtu)
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_owned())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(nl("creating a veth pair"))?;
        self.require_index(name)
    }

    /// Creates a bridge with multicast snooping off: there is no MLD querier on a dev fabric,
    /// and snooping would then starve neighbour discovery.
    pub fn create_bridge(&self, name: &str) -> Result<u32, NetError> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Bridge)
            .name(name.to_owned())
            .set_info_data(InfoData::Bridge(vec![InfoBridge::MulticastSnooping(0)]))
            .up()
            .build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(nl("creating a bridge"))?;
        self.require_index(name)
    }

    pub fn set_controller(&self, index: u32, bridge: u32) -> Result<(), NetError> {
        let m = LinkUnspec::new_with_index(index)
            .controller(bridge)
            .up()
            .build();
        self.rt
            .block_on(self.handle.link().set(m).execute())
            .map_err(nl("adding a bridge port"))
    }

    pub fn delete_link(&self, index: u32) -> Result<(), NetError> {
        let h = self.handle.clone();
        self.rt
            .block_on(h.link().del(index).execute())
            .map_err(nl("deleting a link"))
    }

    pub fn add_address(&self, index: u32, addr: Ipv6Addr, len: u8) -> Result<(), NetError> {
        let req = self.handle.address().add(index, IpAddr::V6(addr), len);
        self.rt
            .block_on(req.execute())
            .map_err(nl("adding an address"))
    }

    /// Adds an IPv6 route; `gateway` None means on-link through `oif`.
    pub fn add_route(
        &self,
        dst: Ipv6Addr,
        len: u8,
        oif: u32,
        gateway: Option<Ipv6Addr>,
    ) -> Result<(), NetError> {
        self.rt
            .block_on(
                self.handle
                    .route()
                    .add(route_msg(dst, len, oif, gateway))
                    .execute(),
            )
            .map_err(nl("adding a route"))
    }

    pub fn del_route(
        &self,
        dst: Ipv6Addr,
        len: u8,
        oif: u32,
        gateway: Option<Ipv6Addr>,
    ) -> Result<(), NetError> {
        self.rt
            .block_on(
                self.handle
                    .route()
                    .del(route_msg(dst, len, oif, gateway))
                    .execute(),
            )
            .map_err(nl("deleting a route"))
    }

    /// The IPv6 routes of the main table.
    pub fn routes6(&self) -> Result<Vec<Route6>, NetError> {
        self.rt.block_on(async {
            let q = RouteMessageBuilder::<Ipv6Addr>::new().build();
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(q)
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing routes"))?;
            Ok(msgs
                .into_iter()
                .filter(|m| {
                    m.header.address_family == AddressFamily::Inet6 && m.header.table == 254
                })
                .map(|m| {
                    let mut r = Route6 {
                        dst: Ipv6Addr::UNSPECIFIED,
                        len: m.header.destination_prefix_length,
                        oif: None,
                        gateway: None,
                        is_static: m.header.protocol == RouteProtocol::Static,
                    };
                    for a in &m.attributes {
                        match a {
                            RouteAttribute::Destination(RouteAddress::Inet6(d)) => r.dst = *d,
                            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some(*g),
                            RouteAttribute::Oif(i) => r.oif = Some(*i),
                            _ => {}
                        }
                    }
                    r
                })
                .collect())
        })
    }

    /// Every address of this namespace: (link index, address, prefix length).
    pub fn addresses(&self) -> Result<Vec<(u32, IpAddr, u8)>, NetError> {
        use netlink_packet_route::address::AddressAttribute;
        self.rt.block_on(async {
            let msgs: Vec<_> = self
                .handle
                .address()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing addresses"))?;
            Ok(msgs
                .into_iter()
                .filter_map(|m| {
                    let ip = m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })?;
                    Some((m.header.index, ip, m.header.prefix_len))
                })
                .collect())
        })
    }

    /// Creates a VXLAN link over `dev` from `local` (no learning: every remote is a static
    /// forwarding entry, [`Netlink::set_fdb`]), up, with MAC `mac` and MTU `mtu`.
    pub fn create_vxlan(&self, v: &Vxlan) -> Result<u32, NetError> {
        let b = rtnetlink::LinkVxlan::new(&v.name, v.vni)
            .dev(v.dev)
            .port(v.port)
            .learning(false)
            .mtu(v.mtu)
            .address(v.mac.to_vec())
            .up();
        let b = match v.local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a).udp_csum(true),
        };
        self.rt
            .block_on(self.handle.link().add(b.build()).execute())
            .map_err(nl("creating a VXLAN link"))?;
        self.require_index(&v.name)
    }

    /// A permanent IPv6 neighbour entry (`ip -6 neigh replace IP lladdr MAC nud permanent`).
    pub fn set_neighbour(&self, index: u32, ip: Ipv6Addr, mac: [u8; 6]) -> Result<(), NetError> {
        let req = self
            .handle
            .neighbours()
            .add(index, IpAddr::V6(ip))
            .link_local_address(&mac)
            .replace();
        self.rt
            .block_on(req.execute())
            .map_err(nl("adding a neighbour"))
    }

    /// A static forwarding entry of a VXLAN link (`bridge fdb replace MAC dev LINK dst IP`).
    pub fn set_fdb(&self, index: u32, mac: [u8; 6], dst: IpAddr) -> Result<(), NetError> {
        use netlink_packet_route::neighbour::NeighbourFlags;
        let req = self
            .handle
            .neighbours()
            .add_bridge(index, &mac)
            .destination(dst)
            .flags(NeighbourFlags::Own)
            .replace();
        self.rt
            .block_on(req.execute())
            .map_err(nl("adding a forwarding entry"))
    }

    /// A link's name and MTU (one request), or `None` if there is no such link.
    pub fn link_name_mtu(&self, index: u32) -> Result<Option<(String, u32)>, NetError> {
        self.rt.block_on(async {
            let mut s = self.handle.link().get().match_index(index).execute();
            let m = match s.try_next().await {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(None),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                    return Ok(None)
                }
                Err(e) => return Err(nl("looking up a link")(e)),
            };
            let (mut name, mut mtu) = (None, None);
            for a in m.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n),
                    LinkAttribute::Mtu(m) => mtu = Some(m),
                    _ => {}
                }
            }
            match (name, mtu) {
                (Some(n), Some(m)) => Ok(Some((n, m))),
                _ => Err(NetError::NotFound(format!(
                    "the name or MTU of link {index}"
                ))),
            }
        })
    }

    /// The names of all links in this namespace.
    pub fn link_names(&self) -> Result<Vec<String>, NetError> {
        self.rt.block_on(async {
            let msgs: Vec<_> = self
                .handle
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing links"))?;
            Ok(msgs
                .into_iter()
                .filter_map(|m| {
                    m.attributes.into_iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n),
                        _ => None,
                    })
                })
                .collect())
        })
    }
}

fn route_msg(dst: Ipv6Addr, len: u8, oif: u32, gateway: Option<Ipv6Addr>) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(dst, len)
        .output_interface(oif)
        .protocol(RouteProtocol::Static);
    if let Some(g) = gateway {
        b = b.gateway(g);
    }
    b.build()
}

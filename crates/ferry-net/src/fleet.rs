//! A dev fleet: N hosts on one box. Each host is a network namespace (`ferry-<fleet>-h<N>`), all
//! joined by a bridge in a fabric namespace (`ferry-<fleet>-fab`) that stands in for the
//! datacenter underlay. The same [`HostNet`] code drives a real host over a real IPv6 underlay.
//!
//! Dropping a [`DevFleet`] removes everything it created (namespaces, and with them links, routes
//! and TC programs; BPF pins), also when a test panics.

use crate::host::{HostNet, MachineNet, FABRIC_IFACE};
use crate::netns::{NetNs, NsThread};
use crate::nl::Netlink;
use crate::{NetError, BPF_PIN_ROOT, FERRY_PREFIX};
use ferry_addr::{HostAllocator, HostId, MachineAllocator, MachineField, NetworkId};
use std::collections::HashMap;
use std::path::PathBuf;

/// How hosts reach each other's machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// docs/design.md#routes: eBPF swap to infra form, one static route per other host.
    Swap,
    /// Benchmark baseline: no eBPF, a route per remote machine. Not isolated; never for users.
    PlainRoutes,
}

/// One MTU everywhere: there is no encapsulation.
pub const DEFAULT_MTU: u32 = 1500;

struct FleetHost {
    net: HostNet,
    machines: MachineAllocator,
}

pub struct DevFleet {
    name: String,
    mode: Mode,
    mtu: u32,
    fabric_ns: NetNs,
    fabric: Option<NsThread<(Netlink, u32)>>,
    hosts: Vec<FleetHost>,
    host_ids: HostAllocator,
    machines: HashMap<FleetAddrKey, MachineNet>,
}

type FleetAddrKey = std::net::Ipv6Addr;

fn validate_name(name: &str) -> Result<(), NetError> {
    if name.is_empty()
        || name.len() > 24
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(NetError::Invalid(format!(
            "fleet name {name:?}: use 1-24 letters, digits or '-'"
        )));
    }
    Ok(())
}

impl DevFleet {
    /// Creates the fabric of fleet `name` (short: letters, digits, `-`).
    pub fn create(name: &str, mode: Mode) -> Result<Self, NetError> {
        validate_name(name)?;
        let fabric_ns = NetNs::create(&format!("{FERRY_PREFIX}{name}-fab"))?;
        let mut fleet = DevFleet::empty(name, mode, fabric_ns.clone());
        // From here on, Drop cleans up whatever fails.
        fleet.fabric = Some(NsThread::start(&fabric_ns, || {
            let nl = Netlink::new()?;
            nl.up(nl.require_index("lo")?, None)?;
            let br = nl.create_bridge("br0")?;
            Ok((nl, br))
        })?);
        Ok(fleet)
    }

    fn empty(name: &str, mode: Mode, fabric_ns: NetNs) -> Self {
        DevFleet {
            name: name.to_owned(),
            mode,
            mtu: DEFAULT_MTU,
            fabric_ns,
            fabric: None,
            hosts: Vec::new(),
            host_ids: HostAllocator::default(),
            machines: HashMap::new(),
        }
    }

    /// Takes over fleet `name` as a crashed process left it: namespaces, links, routes, TC
    /// filters and pinned maps are all still in place (and machines may still run in them), so
    /// nothing is created or re-attached for the hosts that exist; hosts in `hosts` that do not
    /// exist yet are added as by [`DevFleet::add_host_with_id`].
    pub fn adopt(name: &str, mode: Mode, hosts: &[HostId]) -> Result<Self, NetError> {
        validate_name(name)?;
        let fabric_ns = NetNs::named(&format!("{FERRY_PREFIX}{name}-fab"));
        if !fabric_ns.exists() {
            return Err(NetError::NotFound(format!("fabric of fleet {name}")));
        }
        let mut fleet = DevFleet::empty(name, mode, fabric_ns.clone());
        fleet.fabric = Some(NsThread::start(&fabric_ns, || {
            let nl = Netlink::new()?;
            let br = nl.require_index("br0")?;
            Ok((nl, br))
        })?);
        for &id in hosts {
            let ns = NetNs::named(&format!("{FERRY_PREFIX}{name}-h{:x}", id.get()));
            if !ns.exists() {
                fleet.add_host_with_id(id)?;
                continue;
            }
            let pin = (mode == Mode::Swap).then(|| fleet.pin_dir(id));
            let net = HostNet::start(id, &ns, pin)?;
            net.adopt_fabric()?;
            fleet.hosts.push(FleetHost {
                net,
                machines: MachineAllocator::default(),
            });
        }
        Ok(fleet)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn pin_dir(&self, host: HostId) -> PathBuf {
        PathBuf::from(BPF_PIN_ROOT)
            .join(&self.name)
            .join(format!("{:x}", host.get()))
    }

    /// Adds a host: its namespace, its fabric link, the one route to and from every other host.
    pub fn add_host(&mut self) -> Result<HostId, NetError> {
        let id = self.host_ids.allocate()?;
        self.add_host_with_id(id)?;
        Ok(id)
    }

    /// Adds a host whose ID was allocated elsewhere (the store, when a fleet comes back).
    pub fn add_host_with_id(&mut self, id: HostId) -> Result<(), NetError> {
        if self.hosts.iter().any(|h| h.net.id() == id) {
            return Err(NetError::Exists(format!("host {id}")));
        }
        let ns = NetNs::create(&format!("{FERRY_PREFIX}{}-h{:x}", self.name, id.get()))?;
        let pin = (self.mode == Mode::Swap).then(|| self.pin_dir(id));
        let net = match HostNet::start(id, &ns, pin) {
            Ok(n) => n,
            Err(e) => {
                let _ = ns.delete();
                return Err(e);
            }
        };
        self.hosts.push(FleetHost {
            net,
            machines: MachineAllocator::default(),
        });

        // Fabric: a veth whose bridge end stays in the fabric namespace.
        let host_file = ns.open()?;
        let port = format!("h{:x}", id.get());
        let mtu = self.mtu;
        self.fabric()
            .run(move |(nl, br)| -> Result<(), NetError> {
                let idx = nl.create_veth(&port, FABRIC_IFACE, &host_file, mtu)?;
                nl.set_controller(idx, *br)
            })??;
        let this = self.host(id)?;
        this.attach_fabric(self.mtu)?;
        for other in self.hosts.iter().filter(|h| h.net.id() != id) {
            this.add_peer_host(other.net.id(), HostNet::underlay_addr(other.net.id()))?;
            other.net.add_peer_host(id, HostNet::underlay_addr(id))?;
        }
        if self.mode == Mode::PlainRoutes {
            for m in self.machines.values() {
                this.add_plain_remote(m.addr, HostNet::underlay_addr(m.host()))?;
            }
        }
        Ok(())
    }

    fn fabric(&self) -> &NsThread<(Netlink, u32)> {
        self.fabric.as_ref().expect("fabric exists after create")
    }

    pub fn host(&self, id: HostId) -> Result<&HostNet, NetError> {
        self.hosts
            .iter()
            .map(|h| &h.net)
            .find(|h| h.id() == id)
            .ok_or_else(|| NetError::NotFound(format!("host {id}")))
    }

    pub fn host_ids(&self) -> Vec<HostId> {
        self.hosts.iter().map(|h| h.net.id()).collect()
    }

    /// Adds a machine of network `net` on `host`.
    pub fn add_machine(&mut self, host: HostId, net: NetworkId) -> Result<MachineNet, NetError> {
        let h = self
            .hosts
            .iter_mut()
            .find(|h| h.net.id() == host)
            .ok_or_else(|| NetError::NotFound(format!("host {host}")))?;
        let field: MachineField = h.machines.allocate()?;
        let ns_name = format!(
            "{FERRY_PREFIX}{}-m{:x}-{:x}",
            self.name,
            host.get(),
            field.0
        );
        let m = h.net.add_machine(&ns_name, net, field, self.mtu)?;
        self.machines.insert(m.addr.ip(), m.clone());
        if self.mode == Mode::PlainRoutes {
            for other in self.hosts.iter().filter(|o| o.net.id() != host) {
                other
                    .net
                    .add_plain_remote(m.addr, HostNet::underlay_addr(host))?;
            }
        }
        Ok(m)
    }

    pub fn remove_machine(&mut self, m: &MachineNet) -> Result<(), NetError> {
        self.host(m.host())?.remove_machine(m)?;
        self.machines.remove(&m.addr.ip());
        Ok(())
    }

    pub fn machines(&self) -> impl Iterator<Item = &MachineNet> {
        self.machines.values()
    }

    /// Every namespace of this fleet.
    pub fn namespaces(&self) -> Vec<NetNs> {
        crate::netns::list(&format!("{FERRY_PREFIX}{}-", self.name))
    }

    /// Removes everything this fleet created. Idempotent; also run by Drop.
    pub fn teardown(&mut self) -> Result<(), NetError> {
        let mut first_err = None;
        let mut note = |r: Result<(), NetError>| {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        };
        for (_, m) in self.machines.drain() {
            note(m.ns.delete());
        }
        // Threads inside the namespaces must end before the kernel can free them.
        let hosts: Vec<FleetHost> = self.hosts.drain(..).collect();
        for h in hosts {
            let ns = h.net.ns().clone();
            drop(h);
            note(ns.delete());
        }
        self.fabric.take();
        note(self.fabric_ns.delete());
        // Whatever a crash left under this fleet's prefix.
        for ns in self.namespaces() {
            note(ns.delete());
        }
        let pins = PathBuf::from(BPF_PIN_ROOT).join(&self.name);
        if pins.exists() {
            note(
                std::fs::remove_dir_all(&pins)
                    .map_err(|e| NetError::io(format!("removing {}", pins.display()), e)),
            );
        }
        // The shared root goes too once no fleet uses it (fails harmlessly while one does).
        let _ = std::fs::remove_dir(BPF_PIN_ROOT);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for DevFleet {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!("cleaning up fleet {}: {e}", self.name);
        }
    }
}

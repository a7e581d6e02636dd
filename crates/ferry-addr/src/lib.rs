//! The ferry address plan (docs/design.md#address-plan): every private address is
//!
//! ```text
//! fdaa : NNNN:NNNN : HHHH:HHHH : MMMM:MMMM : SSSS
//!  /16   network 32   host 32     machine 32  suffix 16
//! ```
//!
//! and on the fabric between hosts the network and host fields trade places ("infra form"), so each
//! host owns one /48 of infra space and the fabric needs one static route per host.
//!
//! This crate is pure data: it never touches the network, the kernel or a file. It knows the
//! layout, the two ID spaces (networks below 2^31, hosts at or above 2^31, so the two forms can
//! never be confused), and allocators that never hand out a value twice.
//!
//! ```
//! use ferry_addr::{FleetAddr, NetworkId, HostId, MachineField};
//! let a: FleetAddr = "fdaa:0:18:8000:7d:f066:b83b:2".parse().unwrap();
//! assert_eq!(a.network(), NetworkId::new(0x18).unwrap());
//! assert_eq!(a.host(), HostId::new(0x8000_007d).unwrap());
//! assert_eq!(a.machine(), MachineField(0xf066_b83b));
//! assert_eq!(a.to_infra().to_string(), "fdaa:8000:7d:0:18:f066:b83b:2");
//! assert_eq!(a.to_infra().to_guest(), a);
//! ```

mod alloc;
mod ids;

pub use alloc::{Allocator, AllocatorState, HostAllocator, MachineAllocator, NetworkAllocator};
pub use ids::{HostId, MachineField, NetworkId};

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// First 16 bits of every fleet address.
pub const FLEET_PREFIX: u16 = 0xfdaa;

/// The DNS server's address on every host (network 0, host 0: infrastructure).
pub const DNS_ADDR: Ipv6Addr = Ipv6Addr::new(FLEET_PREFIX, 0, 0, 0, 0, 0, 0, 3);

/// Suffix of a machine's primary address inside its /112.
pub const PRIMARY_SUFFIX: u16 = 2;

/// Errors from parsing or building fleet addresses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrError {
    #[error("{input:?} is not an IPv6 address")]
    Syntax { input: String },
    #[error("{addr} is outside the fleet prefix fdaa::/16")]
    NotFleet { addr: Ipv6Addr },
    #[error("{addr} is not a guest-form address: {reason}")]
    NotGuest {
        addr: Ipv6Addr,
        reason: &'static str,
    },
    #[error("network ID {0:#x} is outside the network space (below 2^31)")]
    NetworkOutOfRange(u64),
    #[error("host ID {0:#x} is outside the host space (2^31 and above)")]
    HostOutOfRange(u64),
    #[error("the {kind} allocator is exhausted")]
    Exhausted { kind: &'static str },
}

/// Which of the two layouts an address in `fdaa::/16` is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `fdaa:net:host:machine:suffix`, what guests see.
    Guest,
    /// `fdaa:host:net:machine:suffix`, what the fabric carries.
    Infra,
    /// Network 0 and host 0: infrastructure services such as the DNS server at `fdaa::3`.
    Service,
    /// Neither field pair is in its space (e.g. a crafted address); never routed.
    Invalid,
}

/// Swaps the network and host fields (16-bit words 1-2 with words 3-4).
///
/// The swap is its own inverse, and because it only permutes 16-bit words of one address it
/// keeps the one's-complement sum of that address, so TCP/UDP/ICMPv6 checksums (whose pseudo-header
/// is a sum of 16-bit words) stay valid without any fix-up.
pub fn swap_fields(a: Ipv6Addr) -> Ipv6Addr {
    let w = a.segments();
    Ipv6Addr::new(w[0], w[3], w[4], w[1], w[2], w[5], w[6], w[7])
}

fn word_pair(w: &[u16; 8], i: usize) -> u32 {
    (u32::from(w[i]) << 16) | u32::from(w[i + 1])
}

/// Classifies any IPv6 address by its fleet layout. `None` outside `fdaa::/16`.
pub fn classify(a: Ipv6Addr) -> Option<Form> {
    let w = a.segments();
    if w[0] != FLEET_PREFIX {
        return None;
    }
    let (first, second) = (word_pair(&w, 1), word_pair(&w, 3));
    Some(match (first, second) {
        (0, 0) => Form::Service,
        (f, s) if f < HostId::MIN && s >= HostId::MIN && f != 0 => Form::Guest,
        (f, s) if f >= HostId::MIN && s < HostId::MIN && s != 0 => Form::Infra,
        _ => Form::Invalid,
    })
}

/// A guest-form fleet address: `fdaa:net:host:machine:suffix` with a valid network and host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FleetAddr(Ipv6Addr);

impl FleetAddr {
    pub fn new(net: NetworkId, host: HostId, machine: MachineField, suffix: u16) -> Self {
        let (n, h, m) = (net.get(), host.get(), machine.0);
        FleetAddr(Ipv6Addr::new(
            FLEET_PREFIX,
            (n >> 16) as u16,
            n as u16,
            (h >> 16) as u16,
            h as u16,
            (m >> 16) as u16,
            m as u16,
            suffix,
        ))
    }

    /// The machine's primary address (`...::2` in its /112).
    pub fn primary(net: NetworkId, host: HostId, machine: MachineField) -> Self {
        Self::new(net, host, machine, PRIMARY_SUFFIX)
    }

    /// Accepts a guest-form address; rejects anything else with the reason.
    pub fn from_ipv6(a: Ipv6Addr) -> Result<Self, AddrError> {
        match classify(a) {
            None => Err(AddrError::NotFleet { addr: a }),
            Some(Form::Guest) => Ok(FleetAddr(a)),
            Some(Form::Infra) => Err(AddrError::NotGuest {
                addr: a,
                reason: "it is in infra form",
            }),
            Some(Form::Service) => Err(AddrError::NotGuest {
                addr: a,
                reason: "it is an infrastructure service address",
            }),
            Some(Form::Invalid) => Err(AddrError::NotGuest {
                addr: a,
                reason: "its network or host field is outside its ID space",
            }),
        }
    }

    pub fn ip(&self) -> Ipv6Addr {
        self.0
    }
    pub fn network(&self) -> NetworkId {
        NetworkId(word_pair(&self.0.segments(), 1))
    }
    pub fn host(&self) -> HostId {
        HostId(word_pair(&self.0.segments(), 3))
    }
    pub fn machine(&self) -> MachineField {
        MachineField(word_pair(&self.0.segments(), 5))
    }
    pub fn suffix(&self) -> u16 {
        self.0.segments()[7]
    }
    /// The machine's /112: every address sharing network, host and machine fields.
    pub fn machine_prefix(&self) -> Prefix {
        Prefix::new(self.0, 112)
    }
    /// The org's network /48: `fdaa:NNNN:NNNN::/48`.
    pub fn network_prefix(&self) -> Prefix {
        Prefix::new(self.0, 48)
    }
    /// The address as the fabric carries it.
    pub fn to_infra(&self) -> InfraAddr {
        InfraAddr(swap_fields(self.0))
    }
}

impl fmt::Display for FleetAddr {
    /// RFC 5952 canonical text (lower case, longest zero run compressed), as std formats it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for FleetAddr {
    type Err = AddrError;
    /// Any RFC 4291 text form: compressed, expanded, upper case, leading zeros.
    fn from_str(s: &str) -> Result<Self, AddrError> {
        let ip: Ipv6Addr = s.trim().parse().map_err(|_| AddrError::Syntax {
            input: s.to_owned(),
        })?;
        FleetAddr::from_ipv6(ip)
    }
}

/// An infra-form address: `fdaa:host:net:machine:suffix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InfraAddr(Ipv6Addr);

impl InfraAddr {
    pub fn from_ipv6(a: Ipv6Addr) -> Result<Self, AddrError> {
        match classify(a) {
            Some(Form::Infra) => Ok(InfraAddr(a)),
            Some(_) => Err(AddrError::NotGuest {
                addr: a,
                reason: "it is not in infra form",
            }),
            None => Err(AddrError::NotFleet { addr: a }),
        }
    }
    pub fn ip(&self) -> Ipv6Addr {
        self.0
    }
    pub fn to_guest(&self) -> FleetAddr {
        FleetAddr(swap_fields(self.0))
    }
}

impl fmt::Display for InfraAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The /48 of infra space a host owns: the one route every other host needs for it.
pub fn host_infra_prefix(host: HostId) -> Prefix {
    let h = host.get();
    Prefix::new(
        Ipv6Addr::new(FLEET_PREFIX, (h >> 16) as u16, h as u16, 0, 0, 0, 0, 0),
        48,
    )
}

/// An IPv6 prefix, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: Ipv6Addr,
    len: u8,
}

impl Prefix {
    /// # Panics
    /// If `len > 128`.
    pub fn new(addr: Ipv6Addr, len: u8) -> Self {
        assert!(len <= 128, "prefix length {len} > 128");
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        };
        Prefix {
            addr: Ipv6Addr::from(u128::from(addr) & mask),
            len,
        }
    }
    pub fn addr(&self) -> Ipv6Addr {
        self.addr
    }
    pub fn len(&self) -> u8 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn contains(&self, a: Ipv6Addr) -> bool {
        Prefix::new(a, self.len).addr == self.addr
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests;

//! The three ID spaces of the address plan. Network and host IDs live in disjoint halves of the
//! 32-bit space so a guest-form address can never be read as an infra-form one (docs/design.md#id-spaces).

use crate::AddrError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An org's network: below 2^31. Network 0 is infrastructure and is never allocated to an org.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct NetworkId(pub(crate) u32);

impl NetworkId {
    pub const MAX: u32 = (1 << 31) - 1;
    pub fn new(v: u32) -> Result<Self, AddrError> {
        if v == 0 || v > Self::MAX {
            return Err(AddrError::NetworkOutOfRange(v.into()));
        }
        Ok(NetworkId(v))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

/// A host: 2^31 and above (top bit set), never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct HostId(pub(crate) u32);

impl HostId {
    pub const MIN: u32 = 1 << 31;
    pub fn new(v: u32) -> Result<Self, AddrError> {
        if v < Self::MIN {
            return Err(AddrError::HostOutOfRange(v.into()));
        }
        Ok(HostId(v))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

/// A machine's 32-bit field, allocated per host, never reused on that host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MachineField(pub u32);

macro_rules! hex_display {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:x}", self.0)
            }
        }
    )*};
}
hex_display!(NetworkId, HostId, MachineField);

impl TryFrom<u32> for NetworkId {
    type Error = AddrError;
    fn try_from(v: u32) -> Result<Self, AddrError> {
        NetworkId::new(v)
    }
}
impl From<NetworkId> for u32 {
    fn from(v: NetworkId) -> u32 {
        v.0
    }
}
impl TryFrom<u32> for HostId {
    type Error = AddrError;
    fn try_from(v: u32) -> Result<Self, AddrError> {
        HostId::new(v)
    }
}
impl From<HostId> for u32 {
    fn from(v: HostId) -> u32 {
        v.0
    }
}

//! ferry's eBPF programs and their loader.
//!
//! The programs are C (`bpf/*.bpf.c`), built by clang in `build.rs`, embedded in the binary and
//! loaded with aya. This crate only loads, attaches and fills maps; it never creates interfaces or
//! namespaces, and it assumes the calling thread is already in the right network namespace
//! (attachment resolves interface names there).
//!
//! Attachments use TC netlink filters (a `clsact` qdisc), not TCX links: a filter belongs to the
//! interface, so it keeps working when the process that attached it exits (an agent restart) and
//! goes away with the interface. Maps are pinned under a per-host directory on bpffs so a new
//! process picks up the same configuration.

pub mod bridge;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::tc::{self, NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{include_bytes_aligned, Ebpf, EbpfLoader};
use ferry_addr::{HostId, MachineField, NetworkId};
use std::path::{Path, PathBuf};

static DATAPLANE: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane.bpf.o"));

/// Errors from loading or attaching the programs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EbpfError {
    #[error("creating the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the data-plane object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("adding the clsact qdisc to {iface}: {source}")]
    Qdisc {
        iface: String,
        source: std::io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the object has no {0}")]
    Missing(&'static str),
}

/// What an interface is to the data plane (the value in `ferry_ifaces`, same layout as the C).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IfaceCfg {
    kind: u32,
    net: u32,
    host: u32,
    machine: u32,
}
// SAFETY: plain `repr(C)` integers with no padding.
unsafe impl aya::Pod for IfaceCfg {}

const IFACE_MACHINE: u32 = 1;
const IFACE_FABRIC: u32 = 2;

/// Counters kept by the programs (indices match `enum stat` in the C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stat {
    SpoofedSrc = 0,
    OtherNetwork = 1,
    NotFleet = 2,
    BadDst = 3,
    FabricBadDst = 4,
    FabricBadSrc = 5,
    NonIpv6 = 6,
    SwappedOut = 7,
    SwappedIn = 8,
    IcmpInner = 9,
}

impl Stat {
    /// Whether the counter counts dropped packets (the others count rewrites).
    pub fn is_drop(self) -> bool {
        !matches!(self, Stat::SwappedOut | Stat::SwappedIn | Stat::IcmpInner)
    }

    pub const ALL: [Stat; 10] = [
        Stat::SpoofedSrc,
        Stat::OtherNetwork,
        Stat::NotFleet,
        Stat::BadDst,
        Stat::FabricBadDst,
        Stat::FabricBadSrc,
        Stat::NonIpv6,
        Stat::SwappedOut,
        Stat::SwappedIn,
        Stat::IcmpInner,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Stat::SpoofedSrc => "dropped_spoofed_source",
            Stat::OtherNetwork => "dropped_other_network",
            Stat::NotFleet => "dropped_not_fleet",
            Stat::BadDst => "dropped_bad_destination",
            Stat::FabricBadDst => "dropped_fabric_bad_destination",
            Stat::FabricBadSrc => "dropped_fabric_bad_source",
            Stat::NonIpv6 => "dropped_non_ipv6",
            Stat::SwappedOut => "swapped_to_infra",
            Stat::SwappedIn => "swapped_to_guest",
            Stat::IcmpInner => "icmp_quoted_fixed",
        }
    }
}

/// The loaded data plane of one host.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

const PROGRAMS: [&str; 4] = ["machine_in", "machine_out", "fabric_in", "fabric_out"];

impl Dataplane {
    /// Loads the programs, reusing the maps pinned in `pin_dir` (created if missing) so that a
    /// restarted process sees and edits the same configuration.
    pub fn load(pin_dir: &Path) -> Result<Self, EbpfError> {
        std::fs::create_dir_all(pin_dir).map_err(|source| EbpfError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(DATAPLANE)?;
        for name in PROGRAMS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(EbpfError::Missing(name))?
                .try_into()
                .map_err(|source| EbpfError::Program { name, source })?;
            prog.load()
                .map_err(|source| EbpfError::Program { name, source })?;
        }
        Ok(Dataplane {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the machine programs to the host side of a machine's veth (in the calling
    /// thread's netns) and records what the machine may send.
    pub fn attach_machine(
        &mut self,
        iface: &str,
        ifindex: u32,
        net: NetworkId,
        host: HostId,
        machine: MachineField,
    ) -> Result<(), EbpfError> {
        let cfg = IfaceCfg {
            kind: IFACE_MACHINE,
            net: net.get(),
            host: host.get(),
            machine: machine.0,
        };
        // The map entry goes in first: until it exists the programs pass traffic untouched, and
        // the machine has no address before its veth is attached, so nothing slips through.
        self.set_iface(ifindex, cfg)?;
        self.attach(iface, "machine_in", TcAttachType::Ingress)?;
        self.attach(iface, "machine_out", TcAttachType::Egress)
    }

    /// Attaches the fabric programs to a host's fabric link.
    pub fn attach_fabric(
        &mut self,
        iface: &str,
        ifindex: u32,
        host: HostId,
    ) -> Result<(), EbpfError> {
        self.set_iface(
            ifindex,
            IfaceCfg {
                kind: IFACE_FABRIC,
                net: 0,
                host: host.get(),
                machine: 0,
            },
        )?;
        self.attach(iface, "fabric_in", TcAttachType::Ingress)?;
        self.attach(iface, "fabric_out", TcAttachType::Egress)
    }

    /// Forgets an interface (its filters go away with the interface itself).
    pub fn forget_iface(&mut self, ifindex: u32) -> Result<(), EbpfError> {
        match self.ifaces()?.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(EbpfError::Map {
                name: "ferry_ifaces",
                source,
            }),
        }
    }

    /// Sums a counter over all CPUs.
    pub fn stat(&self, stat: Stat) -> Result<u64, EbpfError> {
        let map = self
            .ebpf
            .map("ferry_stats")
            .ok_or(EbpfError::Missing("ferry_stats"))?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| EbpfError::Map {
                name: "ferry_stats",
                source,
            })?;
        let per_cpu = arr
            .get(&(stat as u32), 0)
            .map_err(|source| EbpfError::Map {
                name: "ferry_stats",
                source,
            })?;
        Ok(per_cpu.iter().sum())
    }

    fn ifaces(&mut self) -> Result<BpfHashMap<&mut MapData, u32, IfaceCfg>, EbpfError> {
        let map = self
            .ebpf
            .map_mut("ferry_ifaces")
            .ok_or(EbpfError::Missing("ferry_ifaces"))?;
        BpfHashMap::try_from(map).map_err(|source| EbpfError::Map {
            name: "ferry_ifaces",
            source,
        })
    }

    fn set_iface(&mut self, ifindex: u32, cfg: IfaceCfg) -> Result<(), EbpfError> {
        self.ifaces()?
            .insert(ifindex, cfg, 0)
            .map_err(|source| EbpfError::Map {
                name: "ferry_ifaces",
                source,
            })
    }

    fn attach(
        &mut self,
        iface: &str,
        name: &'static str,
        at: TcAttachType,
    ) -> Result<(), EbpfError> {
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            // Both directions share one clsact qdisc: the second attach finds it in place.
            let msg = e.to_string();
            if !(msg.contains("exists") || msg.contains("Exclusivity")) {
                return Err(EbpfError::Qdisc {
                    iface: iface.to_owned(),
                    source: std::io::Error::other(msg),
                });
            }
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(EbpfError::Missing(name))?
            .try_into()
            .map_err(|source| EbpfError::Program { name, source })?;
        let id = prog
            .attach_with_options(iface, at, TcAttachOptions::Netlink(NlOptions::default()))
            .map_err(|source| EbpfError::Program { name, source })?;
        // Taking the link out of aya's bookkeeping and forgetting it keeps the filter attached
        // after this object is dropped: it belongs to the interface from now on.
        let link = prog
            .take_link(id)
            .map_err(|source| EbpfError::Program { name, source })?;
        std::mem::forget(link);
        Ok(())
    }
}

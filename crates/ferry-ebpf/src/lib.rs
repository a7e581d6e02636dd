//! ferry's eBPF programs and their loader.
//!
//! The programs are C (`bpf/*.bpf.c`), built by clang in `build.rs`, embedded in the binary and
//! loaded with aya. This crate only loads, attaches and fills maps; it never creates interfaces or
//! namespaces, and it assumes the calling thread is already in the right network namespace
//! (attachment resolves interface names there).
//!
//! Attachments are TCX links (kernel 6.6+), not `clsact` filters: a packet then runs the program
//! straight from the device's TCX entry instead of through the classic classifier layer
//! (`tcf_classify`, `cls_bpf_classify` and the qdisc's counters), which was ~2% of a TCP stream's
//! CPU across the four programs (BENCHMARKS.md, issue 17 item 3). A link lives as long as a
//! descriptor or a pin holds it, so each one is pinned at `<pin_dir>/tc/<ifindex>-<program>`:
//! the attachment outlives the process that made it (an agent restart), as a filter did. When the
//! interface goes, the kernel detaches the link; [`Dataplane::forget_iface`] removes its pins,
//! and removing the pin directory (fleet teardown, `ferry dev clean`) removes them all. Maps are
//! pinned in the same per-host directory so a new process picks up the same configuration.

pub mod bridge;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, LinkOrder};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{include_bytes_aligned, Ebpf, EbpfLoader};
use ferry_addr::{HostId, MachineField, NetworkId};
use std::io::ErrorKind;
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
    #[error("program {name}: the kernel returned a link that cannot be pinned: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("pinning the {name} link at {path}: {source}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
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

/// The directory (below the pin directory) of the TC link pins.
const TC_LINKS: &str = "tc";

impl Dataplane {
    /// Loads the programs for host `host`, reusing the maps pinned in `pin_dir` (created if
    /// missing) so that a restarted process sees and edits the same configuration. The fabric
    /// programs get `host` as a load-time constant (they need nothing else per packet).
    pub fn load(pin_dir: &Path, host: HostId) -> Result<Self, EbpfError> {
        std::fs::create_dir_all(pin_dir.join(TC_LINKS)).map_err(|source| EbpfError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let this_host = host.get();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global("this_host", &this_host, true)
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
        self.attach(iface, ifindex, "machine_in", TcAttachType::Ingress)?;
        self.attach(iface, ifindex, "machine_out", TcAttachType::Egress)
    }

    /// Attaches the fabric programs to this host's fabric link (they know the host from
    /// [`Dataplane::load`]; the interface needs no entry in `ferry_ifaces`).
    pub fn attach_fabric(&mut self, iface: &str, ifindex: u32) -> Result<(), EbpfError> {
        self.attach(iface, ifindex, "fabric_in", TcAttachType::Ingress)?;
        self.attach(iface, ifindex, "fabric_out", TcAttachType::Egress)
    }

    /// Forgets an interface: its `ferry_ifaces` entry and its link pins. Call it once the
    /// interface is gone (the kernel has detached its links then; only the pins are left):
    /// removing the pins of a live interface would detach its programs and let its traffic
    /// through unchecked.
    pub fn forget_iface(&mut self, ifindex: u32) -> Result<(), EbpfError> {
        for name in PROGRAMS {
            let pin = self.link_pin(ifindex, name);
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(EbpfError::Io {
                        what: "removing",
                        path: pin,
                        source,
                    })
                }
            }
        }
        match self.ifaces()?.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(EbpfError::Map {
                name: "ferry_ifaces",
                source,
            }),
        }
    }

    /// The interfaces that have link pins in this pin directory, by ifindex.
    pub fn pinned_ifaces(&self) -> Vec<u32> {
        let mut v: Vec<u32> = std::fs::read_dir(self.pin_dir.join(TC_LINKS))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                name.to_str()?.split_once('-')?.0.parse().ok()
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn link_pin(&self, ifindex: u32, name: &str) -> PathBuf {
        self.pin_dir
            .join(TC_LINKS)
            .join(format!("{ifindex}-{name}"))
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
        ifindex: u32,
        name: &'static str,
        at: TcAttachType,
    ) -> Result<(), EbpfError> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(EbpfError::Missing(name))?
            .try_into()
            .map_err(|source| EbpfError::Program { name, source })?;
        // The default order appends: each interface gets one program per direction from us, and
        // whatever else (a packet capture tool's) keeps its place.
        let id = prog
            .attach_with_options(iface, at, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(|source| EbpfError::Program { name, source })?;
        // Out of aya's bookkeeping (which would detach it when this object is dropped) and
        // pinned: the pin holds the link, so it stays attached after our descriptor closes.
        let link = prog
            .take_link(id)
            .map_err(|source| EbpfError::Program { name, source })?;
        let fd: FdLink = link
            .try_into()
            .map_err(|source| EbpfError::Link { name, source })?;
        // Pinned under a temporary name and renamed over the final one: a pin left there by an
        // interface that had the same ifindex before (its link detached with it) is replaced,
        // and there is no moment where a live interface's program is unpinned before the new
        // one is attached.
        let pin = self.link_pin(ifindex, name);
        // (bpffs refuses names with a dot in them, hence no `.new`.)
        let tmp = self.link_pin(ifindex, &format!("{name}-new"));
        let _ = std::fs::remove_file(&tmp);
        fd.pin(&tmp).map_err(|source| EbpfError::PinLink {
            name,
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &pin).map_err(|source| EbpfError::Io {
            what: "renaming the link pin to",
            path: pin,
            source,
        })
    }
}

//! The address-mapping bridge's kernel side (docs/design.md#bridge, issue 5): loader and map editor for the
//! cgroup socket-address programs in `bpf/bridge.bpf.c`.
//!
//! A machine's sockets that target one of its network's *old* addresses (a machine that has
//! moved) are rewritten to the current address in `connect()`/`sendmsg()`, and `getpeername()`/
//! `recvfrom()` give the application the old address back. Everything is per network: the
//! programs look mappings up under the *caller's* network only, and [`Bridge::map`] refuses any
//! address outside the given network.
//!
//! # State and lifetime
//!
//! * **Maps** are pinned by name in the host's pin directory (bpffs), so every process that loads
//!   a [`Bridge`] from that directory (the agent, a restarted agent, the CLI) reads and edits the
//!   same tables, and the programs see an edit on their next socket call: a mapping change takes
//!   effect for every machine of the host at once, including machines started later.
//! * **Attachments** are BPF links (kernel 5.7+), which are file-descriptor based: they would
//!   detach when the last descriptor closes. [`Bridge::attach_cgroup`] therefore pins each link
//!   under `<pin_dir>/links/<cgroup id>-<program>`, which keeps it attached after the process
//!   exits; [`Bridge::detach_cgroup`] removes those pins (and so the attachment). Removing the
//!   cgroup also detaches them (the pins then linger until `detach_cgroup_id`).
//! * **Configuration per machine** (`bridge_cfg`) is keyed by the machine's cgroup v2 ID, which is
//!   the inode number of its cgroup directory ([`cgroup_id`]). No entry means the programs leave
//!   the machine's sockets alone; `enabled = false` is the feature gate.
//!
//! # Hit timestamps
//!
//! `first_ns`/`last_ns` in [`Hit`] are `CLOCK_BOOTTIME` nanoseconds (the programs use
//! `bpf_ktime_get_boot_ns`, which unlike `bpf_ktime_get_ns` keeps counting through suspend).
//! [`boot_ns_to_system_time`] turns them into wall-clock time with the current offset between
//! the two clocks.

use crate::EbpfError;
use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{include_bytes_aligned, Ebpf, EbpfLoader};
use ferry_addr::{FleetAddr, NetworkId};
use std::io::ErrorKind;
use std::net::Ipv6Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

static BRIDGE: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bridge.bpf.o"));

/// The programs, in attach order, with the name used in link pin files.
const PROGRAMS: [(&str, &str); 4] = [
    ("bridge_connect6", "connect6"),
    ("bridge_sendmsg6", "sendmsg6"),
    ("bridge_recvmsg6", "recvmsg6"),
    ("bridge_getpeername6", "getpeername6"),
];

const MAP: &str = "bridge_map";
const REV: &str = "bridge_rev";
const CFG: &str = "bridge_cfg";
/// Per-CPU hash (see [`Bridge::hits`]); not `bridge_hits`, which older builds pinned as a plain
/// hash.
const HITS: &str = "bridge_hits_pc";
const STATS: &str = "bridge_stats";

/// `bridge_map` value flag: the old address is retired and must fail fast.
const RETIRED: u32 = 1;

/// `statfs` magic of cgroup v2 (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// How many mappings a chain (`a -> b`, `b -> c`, ...) may have before it is called a loop.
const MAX_CHAIN: usize = 64;

/// Errors from the bridge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// Loading, a program or a map failed (shared with the data plane's loader).
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning the {program} link at {path}: {source}")]
    PinLink {
        program: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("program {program}: the kernel returned a link that cannot be pinned: {source}")]
    Link {
        program: &'static str,
        source: aya::programs::links::LinkError,
    },
    /// A mapping or machine address that is not a guest-form address of the given network.
    #[error("{addr} cannot be used in network {net}: {reason}")]
    WrongNetwork {
        net: NetworkId,
        addr: Ipv6Addr,
        reason: String,
    },
    #[error("{addr} cannot be mapped to itself")]
    SelfMapping { addr: Ipv6Addr },
    #[error("mapping {old} -> {new} would form a loop ({new} already leads back to {old})")]
    Loop { old: Ipv6Addr, new: Ipv6Addr },
    #[error("{old} has no mapping in network {net}")]
    NotMapped { net: NetworkId, old: Ipv6Addr },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> BridgeError {
    move |source| BridgeError::Ebpf(EbpfError::Map { name, source })
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> BridgeError {
    move |source| BridgeError::Ebpf(EbpfError::Program { name, source })
}

// The map layouts, identical to the C structs. Addresses are stored as their 16 octets, which
// are exactly the four network-order words the programs read from the socket context.

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapKey {
    net: u32,
    old: [u8; 16],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapValue {
    new: [u8; 16],
    flags: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RevKey {
    net: u32,
    new: [u8; 16],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RevValue {
    old: [u8; 16],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MachineCfg {
    net: u32,
    enabled: u32,
    self_addr: [u8; 16],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HitKey {
    net: u32,
    /// Explicit padding (keys compare bytewise): always zero.
    pad: u32,
    old: [u8; 16],
    caller_cgroup: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HitValue {
    count: u64,
    first_ns: u64,
    last_ns: u64,
}

// SAFETY: all of these are `repr(C)` structs of integers and byte arrays whose fields are laid
// out without implicit padding (checked by `layouts_match_the_c_structs` below), so every bit
// pattern is valid and no uninitialised byte is ever copied into a map.
unsafe impl aya::Pod for MapKey {}
// SAFETY: as above.
unsafe impl aya::Pod for MapValue {}
// SAFETY: as above.
unsafe impl aya::Pod for RevKey {}
// SAFETY: as above.
unsafe impl aya::Pod for RevValue {}
// SAFETY: as above.
unsafe impl aya::Pod for MachineCfg {}
// SAFETY: as above.
unsafe impl aya::Pod for HitKey {}
// SAFETY: as above.
unsafe impl aya::Pod for HitValue {}

/// One mapping of a network: sockets aimed at `old` reach `new` (unless `retired`, in which case
/// they fail with `EPERM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub net: NetworkId,
    pub old: Ipv6Addr,
    pub new: Ipv6Addr,
    pub retired: bool,
}

/// Uses of one old address by one calling machine (identified by its cgroup v2 ID).
/// Timestamps are `CLOCK_BOOTTIME` nanoseconds: see [`boot_ns_to_system_time`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hit {
    pub net: NetworkId,
    pub old: Ipv6Addr,
    pub caller_cgroup_id: u64,
    pub count: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// A machine's bridge configuration as the programs see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MachineConfig {
    pub cgroup_id: u64,
    pub net: NetworkId,
    pub self_addr: Ipv6Addr,
    pub enabled: bool,
}

/// Counters kept by the programs (indices match `enum stat` in the C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BridgeStat {
    ConnectRewritten = 0,
    SendmsgRewritten = 1,
    RetiredRefused = 2,
    RecvmsgRestored = 3,
    GetpeernameRestored = 4,
    /// A hit could not be recorded because `bridge_hits_pc` is full (the socket still worked).
    HitsFull = 5,
    /// A socket's bridge storage could not be created (its peer shows the new address).
    StorageFailed = 6,
}

impl BridgeStat {
    pub const ALL: [BridgeStat; 7] = [
        BridgeStat::ConnectRewritten,
        BridgeStat::SendmsgRewritten,
        BridgeStat::RetiredRefused,
        BridgeStat::RecvmsgRestored,
        BridgeStat::GetpeernameRestored,
        BridgeStat::HitsFull,
        BridgeStat::StorageFailed,
    ];
    pub fn name(self) -> &'static str {
        match self {
            BridgeStat::ConnectRewritten => "connect_rewritten",
            BridgeStat::SendmsgRewritten => "sendmsg_rewritten",
            BridgeStat::RetiredRefused => "retired_refused",
            BridgeStat::RecvmsgRestored => "recvmsg_restored",
            BridgeStat::GetpeernameRestored => "getpeername_restored",
            BridgeStat::HitsFull => "hits_table_full",
            BridgeStat::StorageFailed => "socket_storage_failed",
        }
    }
}

/// The cgroup v2 ID of a cgroup directory: on cgroup v2 the ID `bpf_get_current_cgroup_id()`
/// returns is the kernfs node ID, which is the directory's inode number. Refuses anything that
/// is not on a cgroup2 file system (a v1 hierarchy's inode numbers mean nothing to the programs).
pub fn cgroup_id(v2_dir: &Path) -> Result<u64, BridgeError> {
    let c = std::ffi::CString::new(v2_dir.as_os_str().as_encoded_bytes()).map_err(|_| {
        BridgeError::NotCgroup2 {
            path: v2_dir.to_owned(),
        }
    })?;
    // SAFETY: `statfs` is plain data, so all-zero is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer for the call's duration.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(BridgeError::Io {
            what: "statfs",
            path: v2_dir.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)] // f_type's integer type differs between libcs
    if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(BridgeError::NotCgroup2 {
            path: v2_dir.to_owned(),
        });
    }
    let md = std::fs::metadata(v2_dir).map_err(|source| BridgeError::Io {
        what: "reading",
        path: v2_dir.to_owned(),
        source,
    })?;
    if !md.is_dir() {
        return Err(BridgeError::NotCgroup2 {
            path: v2_dir.to_owned(),
        });
    }
    Ok(md.ino())
}

/// Converts a `CLOCK_BOOTTIME` timestamp from [`Hit`] into wall-clock time, using the offset
/// between the two clocks now (so a wall-clock step after the hit shifts the result with it).
pub fn boot_ns_to_system_time(boot_ns: u64) -> SystemTime {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_BOOTTIME exists on every Linux we support.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let wall_now = SystemTime::now();
    let boot_now = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    let then = Duration::from_nanos(boot_ns);
    if then <= boot_now {
        wall_now - (boot_now - then)
    } else {
        wall_now + (then - boot_now)
    }
}

/// Deletes `key`; a key that is already gone is not an error (aya reports it as a failed
/// syscall with `ENOENT`, not as `KeyNotFound`).
fn remove_quiet<K: aya::Pod, V: aya::Pod>(
    m: &mut BpfHashMap<&mut MapData, K, V>,
    key: &K,
) -> Result<(), MapError> {
    match m.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// One hit from its per-CPU shares: counts add up, the first use is the earliest of the CPUs that
/// saw it, the last use the latest. `None` when no CPU counted it.
fn merge_hits<'a>(per_cpu: impl Iterator<Item = &'a HitValue>) -> Option<HitValue> {
    per_cpu
        .filter(|h| h.count > 0)
        .fold(None, |acc: Option<HitValue>, h| {
            Some(match acc {
                None => *h,
                Some(a) => HitValue {
                    count: a.count + h.count,
                    first_ns: a.first_ns.min(h.first_ns),
                    last_ns: a.last_ns.max(h.last_ns),
                },
            })
        })
}

fn octets(a: Ipv6Addr) -> [u8; 16] {
    a.octets()
}

/// Checks that `a` is a guest-form address of `net` (the only kind a mapping may hold).
fn check_in_network(net: NetworkId, a: Ipv6Addr) -> Result<(), BridgeError> {
    let f = FleetAddr::from_ipv6(a).map_err(|e| BridgeError::WrongNetwork {
        net,
        addr: a,
        reason: e.to_string(),
    })?;
    if f.network() != net {
        return Err(BridgeError::WrongNetwork {
            net,
            addr: a,
            reason: format!(
                "it belongs to network {}; mappings never cross networks",
                f.network()
            ),
        });
    }
    Ok(())
}

/// The loaded bridge programs of one host, with the pinned maps they share.
pub struct Bridge {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Bridge {
    /// Loads the four programs, reusing the maps pinned in `pin_dir` (created if missing; it must
    /// be on bpffs). One pin directory per host: every process that loads from it shares the
    /// mappings, machine configs and hits.
    pub fn load(pin_dir: &Path) -> Result<Bridge, BridgeError> {
        std::fs::create_dir_all(pin_dir).map_err(|source| EbpfError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(BRIDGE)
            .map_err(EbpfError::Load)?;
        for (name, _) in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(EbpfError::Missing(name))?
                .try_into()
                .map_err(prog_err(name))?;
            prog.load().map_err(prog_err(name))?;
        }
        Ok(Bridge {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }

    fn link_pin(&self, cgroup_id: u64, short: &str) -> PathBuf {
        self.links_dir().join(format!("{cgroup_id}-{short}"))
    }

    /// Attaches the four programs to a machine's cgroup v2 directory, each as a BPF link pinned
    /// under `<pin_dir>/links/`, so the attachment outlives this object and this process.
    ///
    /// Idempotent: a program whose link pin already exists for this cgroup (attached earlier, by
    /// this or a previous process) is left as it is rather than stacked a second time (cgroup
    /// links always stack). If one attach fails, the ones made by this call are undone.
    pub fn attach_cgroup(&mut self, v2_dir: &Path) -> Result<(), BridgeError> {
        let id = cgroup_id(v2_dir)?;
        let links = self.links_dir();
        std::fs::create_dir_all(&links).map_err(|source| BridgeError::Io {
            what: "creating",
            path: links.clone(),
            source,
        })?;
        let cgroup = std::fs::File::open(v2_dir).map_err(|source| BridgeError::Io {
            what: "opening",
            path: v2_dir.to_owned(),
            source,
        })?;
        let mut made: Vec<PathBuf> = Vec::new();
        for (name, short) in PROGRAMS {
            let pin = self.link_pin(id, short);
            if PinnedLink::from_pin(&pin).is_ok() {
                continue;
            }
            // A file that is not a link (or a stale one) would make the pin below fail.
            let _ = std::fs::remove_file(&pin);
            match self.attach_one(name, &cgroup, &pin) {
                Ok(()) => made.push(pin),
                Err(e) => {
                    for p in made {
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn attach_one(
        &mut self,
        name: &'static str,
        cgroup: &std::fs::File,
        pin: &Path,
    ) -> Result<(), BridgeError> {
        let prog: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .ok_or(EbpfError::Missing(name))?
            .try_into()
            .map_err(prog_err(name))?;
        // `Single` is the only mode the kernel accepts for cgroup *links* (flags must be 0);
        // links on one cgroup run one after another regardless.
        let link_id = prog
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(prog_err(name))?;
        // Out of aya's bookkeeping (which would detach it when the program is dropped), then
        // pinned: the pin holds a reference to the link, so closing our descriptor (dropping the
        // PinnedLink at the end of this function) leaves it attached.
        let link = prog.take_link(link_id).map_err(prog_err(name))?;
        let fd: FdLink = link.try_into().map_err(|source| BridgeError::Link {
            program: name,
            source,
        })?;
        fd.pin(pin).map_err(|source| BridgeError::PinLink {
            program: name,
            path: pin.to_owned(),
            source,
        })?;
        Ok(())
    }

    /// Detaches the programs from a machine's cgroup by removing the link pins (the links have
    /// no other holder, so the kernel detaches them). Missing pins are not an error.
    pub fn detach_cgroup(&mut self, v2_dir: &Path) -> Result<(), BridgeError> {
        self.detach_cgroup_id(cgroup_id(v2_dir)?)
    }

    /// [`detach_cgroup`](Self::detach_cgroup) by cgroup ID, for a cgroup that is already gone
    /// (removing a cgroup detaches its links, but their pins stay until this is called).
    pub fn detach_cgroup_id(&mut self, cgroup_id: u64) -> Result<(), BridgeError> {
        for (_, short) in PROGRAMS {
            let pin = self.link_pin(cgroup_id, short);
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(BridgeError::Io {
                        what: "removing",
                        path: pin,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Cgroup IDs that have link pins in this pin directory (attached machines).
    pub fn attached_cgroups(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = std::fs::read_dir(self.links_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.split_once('-')?.0.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Records a machine's network and feature gate, keyed by its cgroup v2 ID (see
    /// [`cgroup_id`]). `self_addr` must be a guest-form address of `net`. Takes effect on the
    /// machine's next socket call.
    pub fn set_machine(
        &mut self,
        cgroup_id: u64,
        net: NetworkId,
        self_addr: Ipv6Addr,
        enabled: bool,
    ) -> Result<(), BridgeError> {
        check_in_network(net, self_addr)?;
        let cfg = MachineCfg {
            net: net.get(),
            enabled: u32::from(enabled),
            self_addr: octets(self_addr),
        };
        self.hash::<u64, MachineCfg>(CFG)?
            .insert(cgroup_id, cfg, 0)
            .map_err(map_err(CFG))
    }

    /// Removes a machine's configuration: the programs then leave its sockets alone.
    pub fn forget_machine(&mut self, cgroup_id: u64) -> Result<(), BridgeError> {
        remove_quiet(&mut self.hash::<u64, MachineCfg>(CFG)?, &cgroup_id).map_err(map_err(CFG))
    }

    /// Every configured machine.
    pub fn machines(&self) -> Result<Vec<MachineConfig>, BridgeError> {
        let m = self.hash_ref::<u64, MachineCfg>(CFG)?;
        let mut v = Vec::new();
        for item in m.iter() {
            let (id, c) = item.map_err(map_err(CFG))?;
            let Ok(net) = NetworkId::new(c.net) else {
                tracing::warn!(
                    cgroup_id = id,
                    net = c.net,
                    "bridge config with an invalid network"
                );
                continue;
            };
            v.push(MachineConfig {
                cgroup_id: id,
                net,
                self_addr: Ipv6Addr::from(c.self_addr),
                enabled: c.enabled != 0,
            });
        }
        v.sort_by_key(|c| c.cgroup_id);
        Ok(v)
    }

    /// Maps `old` to `new` in network `net`: sockets of `net`'s machines aimed at `old` reach
    /// `new`. Both must be guest-form addresses of `net`; anything else is refused.
    ///
    /// Chains are kept one step deep, because the programs rewrite once: if `new` is itself a
    /// mapped old address, the mapping goes to where `new` leads; and mappings that led to `old`
    /// (a machine moving a second time) are redirected to the final address. Re-mapping a
    /// retired address revives it.
    pub fn map(&mut self, net: NetworkId, old: Ipv6Addr, new: Ipv6Addr) -> Result<(), BridgeError> {
        check_in_network(net, old)?;
        check_in_network(net, new)?;
        if old == new {
            return Err(BridgeError::SelfMapping { addr: old });
        }
        let current = self.raw_mappings()?;
        let live = |a: Ipv6Addr| {
            current
                .iter()
                .find(|(k, v)| k.net == net.get() && k.old == octets(a) && v.flags & RETIRED == 0)
        };
        // Follow `new` to its final address.
        let mut target = new;
        for _ in 0..=MAX_CHAIN {
            if target == old {
                return Err(BridgeError::Loop { old, new });
            }
            match live(target) {
                Some((_, v)) => target = Ipv6Addr::from(v.new),
                None => break,
            }
        }
        if live(target).is_some() {
            return Err(BridgeError::Loop { old, new });
        }
        let previous = current
            .iter()
            .find(|(k, _)| k.net == net.get() && k.old == octets(old))
            .map(|(_, v)| Ipv6Addr::from(v.new));
        let mut map = self.hash::<MapKey, MapValue>(MAP)?;
        map.insert(
            MapKey {
                net: net.get(),
                old: octets(old),
            },
            MapValue {
                new: octets(target),
                flags: 0,
            },
            0,
        )
        .map_err(map_err(MAP))?;
        // Earlier mappings that led to `old` now lead to the final address.
        let mut moved = Vec::new();
        for (k, v) in &current {
            if k.net == net.get() && v.new == octets(old) {
                let nv = MapValue {
                    new: octets(target),
                    flags: v.flags,
                };
                map.insert(*k, nv, 0).map_err(map_err(MAP))?;
                moved.push(*k);
            }
        }
        self.set_rev(net, target, old)?;
        if let Some(p) = previous.filter(|p| *p != target) {
            // `old` used to lead elsewhere: that address may have lost its last old one.
            self.fix_rev(net, p)?;
        }
        if !moved.is_empty() {
            // Nothing maps to `old` any more.
            self.fix_rev(net, old)?;
        }
        Ok(())
    }

    /// Retires the mapping of `old`: from now on connecting or sending to `old` from a machine of
    /// `net` fails at once with `EPERM` instead of reaching any machine.
    pub fn retire(&mut self, net: NetworkId, old: Ipv6Addr) -> Result<(), BridgeError> {
        let key = MapKey {
            net: net.get(),
            old: octets(old),
        };
        let mut map = self.hash::<MapKey, MapValue>(MAP)?;
        let mut v = match map.get(&key, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Err(BridgeError::NotMapped { net, old }),
            Err(e) => return Err(map_err(MAP)(e)),
        };
        v.flags |= RETIRED;
        map.insert(key, v, 0).map_err(map_err(MAP))?;
        self.fix_rev(net, Ipv6Addr::from(v.new))
    }

    /// Removes the mapping of `old` altogether (sockets aimed at it are left alone again).
    /// Returns whether there was one.
    pub fn unmap(&mut self, net: NetworkId, old: Ipv6Addr) -> Result<bool, BridgeError> {
        let key = MapKey {
            net: net.get(),
            old: octets(old),
        };
        let mut map = self.hash::<MapKey, MapValue>(MAP)?;
        let v = match map.get(&key, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(map_err(MAP)(e)),
        };
        remove_quiet(&mut map, &key).map_err(map_err(MAP))?;
        self.fix_rev(net, Ipv6Addr::from(v.new))?;
        Ok(true)
    }

    /// Every mapping of every network, sorted by network and old address.
    pub fn mappings(&self) -> Result<Vec<Mapping>, BridgeError> {
        let mut v: Vec<Mapping> = self
            .raw_mappings()?
            .into_iter()
            .filter_map(|(k, val)| {
                let net = NetworkId::new(k.net).ok()?;
                Some(Mapping {
                    net,
                    old: Ipv6Addr::from(k.old),
                    new: Ipv6Addr::from(val.new),
                    retired: val.flags & RETIRED != 0,
                })
            })
            .collect();
        v.sort_by_key(|m| (m.net, m.old));
        Ok(v)
    }

    /// Every recorded use of an old address, per calling machine, sorted by network, old address
    /// and caller.
    ///
    /// The programs count each hit on the CPU it happened on (no atomics on the connect path);
    /// this sums the counts and takes the earliest first use and the latest last use over the
    /// CPUs that saw the hit.
    pub fn hits(&self) -> Result<Vec<Hit>, BridgeError> {
        let m = self.hits_map()?;
        let mut v = Vec::new();
        for item in m.iter() {
            let (k, per_cpu) = item.map_err(map_err(HITS))?;
            let Ok(net) = NetworkId::new(k.net) else {
                continue;
            };
            let Some(h) = merge_hits(per_cpu.iter()) else {
                continue;
            };
            v.push(Hit {
                net,
                old: Ipv6Addr::from(k.old),
                caller_cgroup_id: k.caller_cgroup,
                count: h.count,
                first_ns: h.first_ns,
                last_ns: h.last_ns,
            });
        }
        v.sort_by_key(|h| (h.net, h.old, h.caller_cgroup_id));
        Ok(v)
    }

    /// Forgets the hits of one old address (e.g. after its mapping is removed for good).
    pub fn clear_hits(&mut self, net: NetworkId, old: Ipv6Addr) -> Result<(), BridgeError> {
        let keys: Vec<HitKey> = self
            .hits_map()?
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.net == net.get() && k.old == octets(old))
            .collect();
        let map = self.ebpf.map_mut(HITS).ok_or(EbpfError::Missing(HITS))?;
        let mut m: PerCpuHashMap<&mut MapData, HitKey, HitValue> =
            PerCpuHashMap::try_from(map).map_err(map_err(HITS))?;
        for k in keys {
            match m.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err(HITS)(e)),
            }
        }
        Ok(())
    }

    fn hits_map(&self) -> Result<PerCpuHashMap<&MapData, HitKey, HitValue>, BridgeError> {
        let map = self.ebpf.map(HITS).ok_or(EbpfError::Missing(HITS))?;
        PerCpuHashMap::try_from(map).map_err(map_err(HITS))
    }

    /// Sums a counter over all CPUs.
    pub fn stat(&self, stat: BridgeStat) -> Result<u64, BridgeError> {
        let map = self.ebpf.map(STATS).ok_or(EbpfError::Missing(STATS))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(STATS))?;
        let per_cpu = arr.get(&(stat as u32), 0).map_err(map_err(STATS))?;
        Ok(per_cpu.iter().sum())
    }

    fn raw_mappings(&self) -> Result<Vec<(MapKey, MapValue)>, BridgeError> {
        self.hash_ref::<MapKey, MapValue>(MAP)?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP))
    }

    /// Points the reverse entry of `new` at `old` (what recvmsg6 reports as the source).
    fn set_rev(&mut self, net: NetworkId, new: Ipv6Addr, old: Ipv6Addr) -> Result<(), BridgeError> {
        self.hash::<RevKey, RevValue>(REV)?
            .insert(
                RevKey {
                    net: net.get(),
                    new: octets(new),
                },
                RevValue { old: octets(old) },
                0,
            )
            .map_err(map_err(REV))
    }

    /// Recomputes the reverse entry of `new` after a mapping to it changed: it names one of the
    /// live (not retired) old addresses still mapped to `new`, or disappears.
    fn fix_rev(&mut self, net: NetworkId, new: Ipv6Addr) -> Result<(), BridgeError> {
        let key = RevKey {
            net: net.get(),
            new: octets(new),
        };
        let current = self.hash_ref::<RevKey, RevValue>(REV)?.get(&key, 0).ok();
        let live: Vec<[u8; 16]> = self
            .raw_mappings()?
            .into_iter()
            .filter(|(k, v)| k.net == net.get() && v.new == key.new && v.flags & RETIRED == 0)
            .map(|(k, _)| k.old)
            .collect();
        let mut rev = self.hash::<RevKey, RevValue>(REV)?;
        match live.first() {
            // Keep the current choice while it is still live.
            Some(_) if current.is_some_and(|c| live.contains(&c.old)) => Ok(()),
            Some(old) => rev
                .insert(key, RevValue { old: *old }, 0)
                .map_err(map_err(REV)),
            None => remove_quiet(&mut rev, &key).map_err(map_err(REV)),
        }
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<BpfHashMap<&mut MapData, K, V>, BridgeError> {
        let map = self.ebpf.map_mut(name).ok_or(EbpfError::Missing(name))?;
        BpfHashMap::try_from(map).map_err(map_err(name))
    }

    fn hash_ref<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<BpfHashMap<&MapData, K, V>, BridgeError> {
        let map = self.ebpf.map(name).ok_or(EbpfError::Missing(name))?;
        BpfHashMap::try_from(map).map_err(map_err(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, size_of};

    #[test]
    fn layouts_match_the_c_structs() {
        // Sizes from the C (clang -target bpf): no implicit padding anywhere.
        assert_eq!(size_of::<MapKey>(), 20);
        assert_eq!(size_of::<MapValue>(), 20);
        assert_eq!(size_of::<RevKey>(), 20);
        assert_eq!(size_of::<RevValue>(), 16);
        assert_eq!(size_of::<MachineCfg>(), 24);
        assert_eq!(size_of::<HitKey>(), 32);
        assert_eq!(align_of::<HitKey>(), 8);
        assert_eq!(size_of::<HitValue>(), 24);
    }

    #[test]
    fn per_cpu_hits_merge() {
        let h = |count, first_ns, last_ns| HitValue {
            count,
            first_ns,
            last_ns,
        };
        let cpus = [h(2, 50, 90), h(0, 0, 0), h(3, 40, 70)];
        assert_eq!(merge_hits(cpus.iter()), Some(h(5, 40, 90)));
        assert_eq!(merge_hits([h(0, 0, 0)].iter()), None);
    }

    #[test]
    fn addresses_outside_the_network_are_refused() {
        let n1 = NetworkId::new(1).unwrap();
        assert!(check_in_network(n1, "fdaa:0:1:8000:0:0:9:2".parse().unwrap()).is_ok());
        for bad in [
            "fdaa:0:2:8000:0:0:9:2", // another network
            "fdaa:8000:0:0:1:0:9:2", // infra form
            "fdaa::3",               // infrastructure service
            "2001:db8::1",           // outside the fleet
        ] {
            let a: Ipv6Addr = bad.parse().unwrap();
            let e = check_in_network(n1, a).unwrap_err();
            assert!(e.to_string().contains(&a.to_string()), "{e}");
        }
    }
}

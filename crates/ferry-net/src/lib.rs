//! ferry's host data plane (docs/design.md#data-plane): network namespaces, veths, routes and the eBPF swap.
//!
//! * [`netns`]: named namespaces and threads that live inside them.
//! * [`nl`]: synchronous rtnetlink for the calling thread's namespace.
//! * [`host`]: one host's data plane ([`HostNet`]): its fabric link, the one route per other
//!   host, one route and one veth per local machine, the TC programs.
//! * [`fleet`]: a dev fleet ([`DevFleet`]): hosts as namespaces joined by a fabric bridge.
//!
//! This crate never decides *what* should run where (that is the agent's and the server's job);
//! it only makes the kernel match a description, and it never shells out to `ip`.

pub mod fleet;
pub mod host;
pub mod netns;
pub mod nl;

pub use fleet::{DevFleet, Mode};
pub use host::{HostNet, MachineNet};
pub use netns::NetNs;

/// Prefix of every namespace, pin directory and fleet ferry creates on this machine.
pub const FERRY_PREFIX: &str = "ferry-";
/// Where ferry pins BPF maps (one directory per fleet, one below it per host).
pub const BPF_PIN_ROOT: &str = "/sys/fs/bpf/ferry";

/// Errors from the data plane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {errno}")]
    Sys {
        what: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("netlink, {what}: {msg}")]
    Netlink { what: String, msg: String },
    #[error("eBPF: {0}")]
    Ebpf(#[from] ferry_ebpf::EbpfError),
    #[error("address plan: {0}")]
    Addr(#[from] ferry_addr::AddrError),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("the thread working in namespace {0} died")]
    Panicked(String),
}

impl NetError {
    pub(crate) fn io(what: String, source: std::io::Error) -> Self {
        NetError::Io { what, source }
    }
    pub(crate) fn sys(what: &'static str, errno: nix::errno::Errno) -> Self {
        NetError::Sys { what, errno }
    }
}

/// Removes everything ferry created on this machine: every `ferry-*` namespace (which takes
/// their interfaces, routes and TC programs with it) and every BPF pin under [`BPF_PIN_ROOT`].
/// Returns what it removed.
pub fn clean_all() -> Result<Vec<String>, NetError> {
    let mut removed = Vec::new();
    for ns in netns::list(FERRY_PREFIX) {
        ns.delete()?;
        removed.push(format!("netns {}", ns.name()));
    }
    if std::path::Path::new(BPF_PIN_ROOT).exists() {
        std::fs::remove_dir_all(BPF_PIN_ROOT)
            .map_err(|e| NetError::io(format!("removing {BPF_PIN_ROOT}"), e))?;
        removed.push(format!("bpf pins {BPF_PIN_ROOT}"));
    }
    Ok(removed)
}

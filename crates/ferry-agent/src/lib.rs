//! The per-host agent (docs/design.md#machine-lifecycle). It owns everything of its host's machines: their network
//! namespaces and veths (through `ferry-net`), cgroups and processes (through `ferry-runtime`),
//! and their run directories. The server tells it what to run over mutual TLS (its listener serves
//! under the host's certificate and answers the fleet's servers only: [`identity`]); it tells
//! the server what happened by itself (exits, restarts, checks).
//!
//! Machines outlive the agent: their processes are not its children in any way that matters
//! (each has a shim), their TC programs belong to their interfaces, their maps are pinned. A new
//! agent process finds them again from the run directories and reports the true state.
//!
//! **Architecture Invariant:** only the agent touches namespaces, links, cgroups and BPF.

mod control;
pub mod disk;
mod dns;
pub mod identity;
mod images;
mod logs;
mod machines;
mod nft;
mod volumes;

pub use control::{SendError, Servers, WatchStatus};
pub use logs::LogPolicy;
pub use machines::{Agent, AgentConfig};

/// How the address-mapping bridge is implemented on a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BridgeMode {
    /// cgroup eBPF programs on every machine (docs/design.md#bridge).
    #[default]
    Ebpf,
    /// nftables DNAT inside every machine's namespace (comparison; kernels without cgroup BPF).
    Nft,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("machine {0} is not on this host")]
    UnknownMachine(String),
    #[error("machine {0} is not running")]
    NotRunning(String),
    #[error("network: {0}")]
    Net(#[from] ferry_net::NetError),
    #[error("runtime: {0}")]
    Runtime(#[from] ferry_runtime::RuntimeError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("invalid: {0}")]
    Invalid(String),
    /// A volume holds something a fork never copies (a device node): retrying cannot help.
    #[error("{0}")]
    VolumeUnsupported(String),
    #[error("image: {0}")]
    Image(#[from] ferry_image::ImageError),
    /// The instance moved away (`fence`): it never runs on this host again.
    #[error(
        "machine {machine} instance {instance} moved to another host: it never runs here again"
    )]
    Fenced { machine: String, instance: String },
}

impl AgentError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            what: what.into(),
            source,
        }
    }
}

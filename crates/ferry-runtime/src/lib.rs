//! ferry's machine runtime (docs/design.md#machine-lifecycle): runs one machine's processes on this host.
//!
//! * [`cgroup`]: discovers the host's cgroup layout (pure v2 or hybrid v1+v2) and creates one
//!   cgroup per machine *below* the cgroup ferry itself runs in, with memory/cpu limits.
//! * [`init`]: `ferry init`, the shim that stays in the host pid namespace as the machine's
//!   handle and the PID 1 it forks into the machine's own pid namespace.
//! * [`machine`]: spawning a machine, finding it again after an agent restart, signals, stop.
//! * [`logs`]: the machine's stdout and stderr, kept by the shim in bounded, rotated files.
//! * [`exec`]: running a command inside a live machine's namespaces and cgroups.
//! * [`checks`]: tcp/http/exec health checks.
//! * [`sandbox`]: the machine's own root filesystem, user namespace, capabilities and seccomp.
//!
//! This crate never touches routes, links or BPF programs (`ferry-net` does) and never opens the
//! store: it only starts, watches and stops processes.

pub mod cgroup;
pub mod checks;
pub mod exec;
pub mod init;
pub mod logs;
pub mod machine;
pub mod sandbox;
mod sys;
pub mod user;

pub use cgroup::{CgroupKind, CgroupLayout, Limits, MachineCgroup};
pub use checks::{run_check, Check, CheckKind, CheckResult, CheckRole};
pub use exec::{exec_in, ExecOutput};
pub use init::{init_main, InitArgs, InitSpec, MountSpec};
pub use machine::{parse_signal, spawn_machine, stop, ExitInfo, Running, StopOutcome};
pub use nix::sys::signal::Signal;
pub use sandbox::{claim_id_range, default_image, Layer, SandboxSpec};

use std::time::Duration;

/// Errors from the machine runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {errno}")]
    Sys {
        what: String,
        errno: nix::errno::Errno,
    },
    #[error("{what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("invalid {0}")]
    Invalid(String),
    #[error(
        "unsupported signal {0:?}: allowed are SIGINT, SIGTERM, SIGQUIT, SIGUSR1, SIGUSR2, SIGKILL, SIGSTOP"
    )]
    Signal(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("cgroups: {0}")]
    Cgroup(String),
    #[error("timed out after {0:?}: {1}")]
    Timeout(Duration, String),
    #[error("machine is not running (its shim exited)")]
    NotRunning,
}

impl RuntimeError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            what: what.into(),
            source,
        }
    }
    pub(crate) fn sys(what: impl Into<String>, errno: nix::errno::Errno) -> Self {
        RuntimeError::Sys {
            what: what.into(),
            errno,
        }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

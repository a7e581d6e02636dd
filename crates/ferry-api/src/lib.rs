//! ferry's REST API (docs/design.md#api): Fly Machines-shaped JSON over HTTP.
//!
//! * [`config`]: the machine config and its validation (the edge: nothing invalid gets past it).
//! * [`error`]: JSON errors with stable codes.
//! * [`views`]: what the API returns.
//! * [`proto`]: the internal server <-> agent messages.
//! * [`server`]: the axum router: handlers validate, talk to the store, call agents.
//!
//! The server never touches the kernel: agents do, on their hosts.

pub mod agents;
pub mod bridge;
pub mod config;
pub mod doc;
pub mod error;
pub mod images;
pub mod legacy;
pub mod migrate;
pub mod proto;
pub mod server;
pub mod views;
pub mod watch;

pub use error::ApiError;

/// The header carrying a lease nonce on mutating calls (as Fly names it).
pub const LEASE_HEADER: &str = "fly-machine-lease-nonce";

/// Test hook for crash-safety tests: when `FERRY_CRASH_AT` names `step`, the process kills itself
/// with SIGKILL right here (no cleanup, no flush: like a power cut for this process). The hook is
/// armed while the file named by `FERRY_CRASH_MARKER` does not exist, and firing creates it, so it
/// fires once per fleet (a restarted process with the same environment runs on), and a test arms
/// it by deleting the file at the moment it chooses.
pub fn crash_point(step: &str) {
    let Ok(want) = std::env::var("FERRY_CRASH_AT") else {
        return;
    };
    if want != step {
        return;
    }
    let Ok(marker) = std::env::var("FERRY_CRASH_MARKER") else {
        return;
    };
    if std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&marker)
        .is_err()
    {
        return;
    }
    eprintln!("FERRY_CRASH_AT={step}: killing this process (test hook)");
    // SAFETY: kill and getpid have no preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

//! ferry's control plane, with no HTTP in it (docs/design.md): what the API does, as functions
//! of a [`Core`] that the HTTP layer (`ferry-api`) only parses input for, authorizes and calls.
//!
//! * [`config`]: the machine config and its validation (nothing invalid gets past it).
//! * [`error`]: errors with a [`Kind`] and a stable code.
//! * [`views`]: what the API returns; [`proto`]: the control plane <-> agent messages.
//! * [`machines`], [`hosts`], [`volumes`]: apps, machines, leases, placement, registration.
//! * [`dashboard`]: the web dashboard's one-read view of the fleet (or of one org).
//! * [`logs`]: a machine's output, gathered from the hosts its instances ran on.
//! * [`migrate`]: migrations and their driver; [`bridge`]: the address-mapping bridge;
//!   [`images`]: registries and pulls.
//! * [`agents`]: the side effects (hosts' agents, webhooks) behind traits, so the driver and
//!   placement are unit-tested with recording doubles and a manual clock.
//!
//! The core never touches the kernel (agents do, on their hosts) and never speaks HTTP.

pub mod agents;
pub mod auth;
pub mod bridge;
mod cache;
pub mod config;
mod core;
pub mod dashboard;
pub mod error;
pub mod hosts;
pub mod images;
pub mod legacy;
pub mod logs;
pub mod machines;
pub mod metrics;
pub mod migrate;
pub mod proto;
#[cfg(feature = "testing")]
pub mod testing;
pub mod views;
pub mod volumes;

pub use crate::core::Core;
pub use error::{Error, Kind, Result};

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

/// `bytes` random bytes as lowercase hex (IDs of volumes and migrations, secrets).
pub(crate) fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

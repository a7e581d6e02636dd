//! ferry's REST API (SPEC §5): Fly Machines-shaped JSON over HTTP.
//!
//! * [`config`]: the machine config and its validation (the edge: nothing invalid gets past it).
//! * [`error`]: JSON errors with stable codes.
//! * [`views`]: what the API returns.
//! * [`proto`]: the internal server <-> agent messages.
//! * [`server`]: the axum router: handlers validate, talk to the store, call agents.
//!
//! The server never touches the kernel: agents do, on their hosts.

pub mod bridge;
pub mod config;
pub mod error;
pub mod proto;
pub mod server;
pub mod views;

pub use error::ApiError;

/// The header carrying a lease nonce on mutating calls (as Fly names it).
pub const LEASE_HEADER: &str = "fly-machine-lease-nonce";

//! ferry's REST API (docs/design.md#api): Fly Machines-shaped JSON over HTTP, on top of the
//! HTTP-free core ([`ferry_core`]).
//!
//! * [`server`] and [`routes`]: the axum router; handlers parse, call the core, answer.
//! * [`error`]: the status of each error kind and the JSON error body.
//! * [`doc`]: what the OpenAPI document shares between routes.
//! * [`agents`]: the HTTP implementations of the core's side-effect traits (the agents' typed
//!   client, webhooks).
//!
//! The server never touches the kernel: agents do, on their hosts.

pub mod agents;
pub mod doc;
pub mod error;
pub mod routes;
pub mod server;
pub mod watch;

pub use error::ApiError;

/// The header carrying a lease nonce on mutating calls (as Fly names it).
pub const LEASE_HEADER: &str = "fly-machine-lease-nonce";

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A core whose agents and webhooks are reached over HTTP: what `ferry server` and `ferry dev`
/// run.
pub fn http_core(
    store: Arc<dyn ferry_store::Store>,
    volumes_dir: PathBuf,
) -> Arc<ferry_core::Core> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(330)) // above the longest stop timeout
        .build()
        .expect("building an HTTP client");
    ferry_core::Core::new(
        store,
        volumes_dir,
        Arc::new(agents::HttpAgents::new(http.clone())),
        Arc::new(agents::HttpWebhooks::new(http)),
    )
}

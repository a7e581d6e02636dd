//! ferry's REST API (docs/design.md#api): Fly Machines-shaped JSON over HTTP, on top of the
//! HTTP-free core ([`ferry_core`]).
//!
//! * [`server`] and [`routes`]: the axum router; handlers parse, call the core, answer.
//! * [`error`]: the status of each error kind and the JSON error body.
//! * [`doc`]: what the OpenAPI document shares between routes.
//! * [`agent_api`]: the servers' agent listener's routes (join, registration, reports, watch),
//!   authorized by hosts' certificates.
//! * [`agents`]: the HTTP implementations of the core's side-effect traits (the agents' typed
//!   client, webhooks).
//!
//! The server never touches the kernel: agents do, on their hosts.

pub mod agent_api;
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

/// A core whose agents and webhooks are reached over plain HTTP (tests with fake agents).
pub fn http_core(
    store: Arc<dyn ferry_store::Store>,
    volumes_dir: PathBuf,
) -> Arc<ferry_core::Core> {
    http_core_with(store, volumes_dir, None).expect("building an HTTP client")
}

/// How a server reaches its agents: mutual TLS, presenting its role certificate
/// ([`ferry_pki::Ca::issue_server_role`]) and trusting the fleet CA alone, never the system's
/// roots (an agent's certificate names its host, and only the fleet CA signs those).
pub struct AgentTls {
    pub ca_pem: String,
    pub identity: ferry_pki::Issued,
}

/// A core whose agents are reached over HTTP, through TLS with `tls`: what `ferry server` and
/// `ferry dev` run.
pub fn http_core_with(
    store: Arc<dyn ferry_store::Store>,
    volumes_dir: PathBuf,
    tls: Option<&AgentTls>,
) -> Result<Arc<ferry_core::Core>, reqwest::Error> {
    // Above the longest stop timeout.
    let timeout = Duration::from_secs(330);
    let mut agents = reqwest::Client::builder().timeout(timeout);
    if let Some(t) = tls {
        let id = format!("{}\n{}", t.identity.key_pem, t.identity.cert_pem);
        agents = agents
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(t.ca_pem.as_bytes())?)
            .identity(reqwest::Identity::from_pem(id.as_bytes())?);
    }
    let webhooks = reqwest::Client::builder().timeout(timeout).build()?;
    Ok(ferry_core::Core::new(
        store,
        volumes_dir,
        Arc::new(agents::HttpAgents::new(agents.build()?)),
        Arc::new(agents::HttpWebhooks::new(webhooks)),
    ))
}

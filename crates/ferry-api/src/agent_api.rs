//! The servers' agent listener (docs/design.md#tokens): what hosts' agents call, apart from
//! the operators' API. Always TLS (the server's role certificate from the fleet CA); a client
//! certificate is optional at the handshake, since a host that joins has none yet:
//!
//! - `POST /internal/v1/join` takes a join (or admin) token and a CSR; the server allocates a
//!   host ID never used before and the CA signs the host's certificate for it.
//! - registration, reports and the watch take a host's certificate (no token), and a host acts
//!   as itself only: the ID its certificate names must be the one the request names (403).
//!
//! The TLS listener itself is the binary's; it hands each request the [`Peer`] its connection
//! proved (a certificate rustls checked against the fleet CA, or none).

use crate::error::ApiError;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ferry_addr::HostId;
use ferry_core::auth::{self, Caller, Scope};
use ferry_core::proto::{AgentReport, RegisterHost};
use ferry_core::{hosts, machines, Core};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::sync::Arc;

type Result<T, E = ApiError> = std::result::Result<T, E>;

/// Who is at the other end of a connection to the agent listener, from its client certificate
/// (already checked against the fleet CA by the TLS layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// No client certificate (a host joining, or anybody).
    Anonymous,
    /// A host's certificate: this host.
    Host(HostId),
    /// A certificate of the fleet that names no host (a server's).
    Other,
}

impl Peer {
    /// The peer a checked certificate (DER) makes.
    pub fn of(cert: Option<&[u8]>) -> Peer {
        match cert {
            None => Peer::Anonymous,
            Some(der) => ferry_pki::host_of(der)
                .and_then(|h| HostId::new(h).ok())
                .map_or(Peer::Other, Peer::Host),
        }
    }
}

/// `POST /internal/v1/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub region: String,
    /// A PKCS#10 request (PEM) for the key the host keeps.
    pub csr: String,
    /// The addresses its agent's listener serves on: the certificate's IP names.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

/// The answer to a join: the new host's ID, its certificate, and the fleet CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    /// Hex, as the API writes host IDs.
    pub host_id: String,
    /// PEM.
    pub certificate: String,
    /// PEM: the CA the servers' and other hosts' certificates chain to.
    pub ca: String,
}

/// The agent listener's routes. Each request must carry a [`Peer`] extension (the TLS listener
/// sets it; none answers 401 like an anonymous peer).
pub fn router(ctx: Arc<Core>, ca: Arc<ferry_pki::Ca>) -> Router {
    Router::new()
        .route("/internal/v1/join", post(join))
        .route("/internal/v1/hosts", post(register_host))
        .route("/internal/v1/reports", post(agent_report))
        .route("/internal/v1/hosts/{host}/watch", get(host_watch))
        .fallback(|| async { ApiError::not_found("route") })
        .layer(Extension(ca))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            crate::server::measure,
        ))
        .with_state(ctx)
}

fn peer(req: &axum::http::Extensions) -> Peer {
    req.get::<Peer>().copied().unwrap_or(Peer::Anonymous)
}

/// The host a request comes from, as a [`Caller`] whose events name it (`host:<hex>`):
/// 401 without a certificate, 403 with one that names no host or another host than `claimed`.
fn as_host(p: Peer, claimed: Option<u32>) -> Result<(HostId, Caller)> {
    let h = match p {
        Peer::Anonymous => {
            return Err(ApiError(auth::unauthenticated(
                "the agents' routes need the host's certificate (join first)",
            )))
        }
        Peer::Other => {
            return Err(ApiError(auth::forbidden(
                "this certificate is not a host's",
            )))
        }
        Peer::Host(h) => h,
    };
    if let Some(c) = claimed {
        if c != h.get() {
            return Err(ApiError(auth::forbidden(format!(
                "host {:x} may act only as itself, not as {c:x}",
                h.get()
            ))));
        }
    }
    let caller = Caller {
        token_id: format!("host:{}", hosts::host_hex(h)),
        scope: Scope::Join,
    };
    Ok((h, caller))
}

async fn join(
    State(ctx): State<Arc<Core>>,
    Extension(ca): Extension<Arc<ferry_pki::Ca>>,
    headers: axum::http::HeaderMap,
    Json(req): Json<JoinRequest>,
) -> Result<Json<JoinResponse>> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let caller = auth::authenticate(&ctx, bearer)?;
    caller.require_host()?;
    if req.region.is_empty() || req.region.len() > 64 {
        return Err(ApiError::invalid("region: 1 to 64 characters"));
    }
    // Checked before an ID is spent: a request the CA would refuse allocates nothing.
    ferry_pki::host_csr_ok(&req.csr).map_err(|e| ApiError::invalid(e.to_string()))?;
    let (ctx2, region) = (ctx.clone(), req.region.clone());
    let host = tokio::task::spawn_blocking(move || hosts::join_host(&ctx2, &region))
        .await
        .map_err(ApiError::internal)??;
    let certificate = ca
        .sign_host(&req.csr, host.id.get(), &req.addresses)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    tracing::info!(
        "host {} joined (region {}, token {})",
        hosts::host_hex(host.id),
        req.region,
        caller.token_id
    );
    Ok(Json(JoinResponse {
        host_id: hosts::host_hex(host.id),
        certificate,
        ca: ca.pem().to_owned(),
    }))
}

async fn register_host(
    State(ctx): State<Arc<Core>>,
    ext: axum::http::Extensions,
    Json(req): Json<RegisterHost>,
) -> Result<Json<serde_json::Value>> {
    let (_, caller) = as_host(peer(&ext), Some(req.host_id))?;
    auth::acting(&caller, async {
        Ok(Json(hosts::register_host(&ctx, req)?))
    })
    .await
}

async fn agent_report(
    State(ctx): State<Arc<Core>>,
    ext: axum::http::Extensions,
    Json(r): Json<AgentReport>,
) -> Result<Json<serde_json::Value>> {
    // Any host of the fleet: a report names a machine, and during a migration two hosts
    // report about one machine.
    let (_, caller) = as_host(peer(&ext), None)?;
    auth::acting(&caller, async {
        Ok(Json(machines::agent_report(&ctx, r)?))
    })
    .await
}

async fn host_watch(
    state: State<Arc<Core>>,
    ext: axum::http::Extensions,
    crate::server::Path(host): crate::server::Path<String>,
) -> Result<axum::response::Response> {
    let claimed = hosts::parse_host(&host)?.get();
    let (_, caller) = as_host(peer(&ext), Some(claimed))?;
    crate::watch::host_watch(
        state,
        crate::server::Auth(caller),
        crate::server::Path(host),
    )
    .await
}

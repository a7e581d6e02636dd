//! A host's identity (docs/design.md#tokens): its host ID and the certificate the fleet CA gave
//! it when it joined, kept in `<state dir>/identity/` (`host.json`, `host.key` mode 0600,
//! `host.pem`, `ca.pem`). An agent that has one reuses it (a restart keeps its host ID and
//! certificate and only registers again); one that has none joins first ([`join`]).
//!
//! The key is made on the host and never leaves it: the server gets a CSR and signs it.

use ferry_addr::HostId;
use ferry_api::agent_api::{JoinRequest, JoinResponse};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] ferry_pki::PkiError),
    #[error("{0}")]
    Invalid(String),
    /// A server answered and refused (e.g. 401: no or a wrong join token).
    #[error("joining: server {server} refused: {status}: {body}")]
    Refused {
        server: String,
        status: u16,
        body: String,
    },
    #[error("joining: no server answered (last: {0})")]
    Unavailable(String),
}

/// Who this host is to the fleet.
#[derive(Clone)]
pub struct Identity {
    pub host_id: HostId,
    /// PEM.
    pub cert_pem: String,
    /// PEM (mode 0600 on disk).
    pub key_pem: String,
    /// The fleet CA (PEM): what the servers' certificates chain to.
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("host_id", &format_args!("{:x}", self.host_id.get()))
            .finish_non_exhaustive() // never the key
    }
}

#[derive(Serialize, Deserialize)]
struct HostFile {
    /// Hex.
    host_id: String,
}

/// `<state dir>/identity`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("identity")
}

fn read(f: PathBuf) -> Result<String, IdentityError> {
    std::fs::read_to_string(&f).map_err(|source| IdentityError::Io {
        what: format!("reading {}", f.display()),
        source,
    })
}

fn parse_host(s: &str) -> Result<HostId, IdentityError> {
    u32::from_str_radix(s, 16)
        .ok()
        .and_then(|v| HostId::new(v).ok())
        .ok_or_else(|| IdentityError::Invalid(format!("{s:?} is not a host ID")))
}

/// The identity kept in `state_dir`, if the host joined already (`host.json` is written last,
/// so its presence says the rest is there).
pub fn load(state_dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let d = dir(state_dir);
    if !d.join("host.json").exists() {
        return Ok(None);
    }
    let h: HostFile = serde_json::from_str(&read(d.join("host.json"))?)
        .map_err(|e| IdentityError::Invalid(format!("{}: {e}", d.join("host.json").display())))?;
    let id = Identity {
        host_id: parse_host(&h.host_id)?,
        cert_pem: read(d.join("host.pem"))?,
        key_pem: read(d.join("host.key"))?,
        ca_pem: read(d.join("ca.pem"))?,
    };
    // The certificate must name the host the file says (a hand-edited host.json would
    // otherwise register as a host the certificate is refused for).
    let der = ferry_pki::first_cert_der(&id.cert_pem)?;
    if ferry_pki::host_of(&der) != Some(id.host_id.get()) {
        return Err(IdentityError::Invalid(format!(
            "{}: host.pem does not name host {:x}",
            d.display(),
            id.host_id.get()
        )));
    }
    Ok(Some(id))
}

/// Keeps `id` in `state_dir` (the key mode 0600; `host.json` last).
pub fn save(state_dir: &Path, id: &Identity) -> Result<(), IdentityError> {
    let d = dir(state_dir);
    ferry_pki::write_private(&d.join("host.key"), &id.key_pem)?;
    ferry_pki::write_public(&d.join("host.pem"), &id.cert_pem)?;
    ferry_pki::write_public(&d.join("ca.pem"), &id.ca_pem)?;
    let h = serde_json::to_string(&HostFile {
        host_id: format!("{:x}", id.host_id.get()),
    })
    .expect("serializes");
    ferry_pki::write_public(&d.join("host.json"), &h)?;
    Ok(())
}

/// Joins the fleet through the first of `servers` (agent listeners, `https://`) that answers:
/// a new key, a CSR for it, the join token; the server allocates a host ID never used before
/// and signs a certificate naming it and `addresses`. `server_ca` (PEM) is the fleet CA the
/// servers' certificates must chain to: trust has to start somewhere, and it is not the
/// system's roots.
pub async fn join(
    servers: &[String],
    join_token: &str,
    server_ca: &[u8],
    region: &str,
    addresses: &[IpAddr],
) -> Result<Identity, IdentityError> {
    let (key_pem, csr) = ferry_pki::host_csr()?;
    let ca = reqwest::Certificate::from_pem(server_ca)
        .map_err(|e| IdentityError::Invalid(format!("the servers' CA: {e}")))?;
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| IdentityError::Invalid(format!("an HTTP client: {e}")))?;
    let body = JoinRequest {
        region: region.to_owned(),
        csr,
        addresses: addresses.to_vec(),
    };
    let mut last = String::new();
    for url in servers {
        let r = http
            .post(format!("{url}/internal/v1/join"))
            .bearer_auth(join_token)
            .json(&body)
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                let j: JoinResponse = r
                    .json()
                    .await
                    .map_err(|e| IdentityError::Invalid(format!("{url}: the join answer: {e}")))?;
                return Ok(Identity {
                    host_id: parse_host(&j.host_id)?,
                    cert_pem: j.certificate,
                    key_pem,
                    ca_pem: j.ca,
                });
            }
            Ok(r) if r.status().is_server_error() => last = format!("{url}: {}", r.status()),
            Ok(r) => {
                return Err(IdentityError::Refused {
                    server: url.clone(),
                    status: r.status().as_u16(),
                    body: r.text().await.unwrap_or_default(),
                })
            }
            // Nothing was allocated on a server we could not reach (or, if it died after, an
            // ID is burnt: never reused, so harmless).
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(IdentityError::Unavailable(last))
}

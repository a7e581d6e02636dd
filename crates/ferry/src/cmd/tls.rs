//! TLS (docs/design.md#tokens). Every control plane has the fleet's CA in `<state dir>/tls`
//! (`ca.pem`, `ca.key`; made at its first start, [`ferry_pki`]): it signs hosts' certificates
//! when they join, and each server's role certificate (made in memory at every start) for the
//! agent listener and for the calls to agents, both mutual TLS. Several servers of one fleet
//! share that directory: copy `tls/` to every server before its first start.
//!
//! The operator API is another matter: it is TLS only once `ferry server init` made its server
//! certificate (`tls/server.pem`); clients trust the CA (the CLI: `--ca`/`FERRY_CA`, or the
//! copy `ferry dev` writes next to its token), never the system's roots: the fleet's API is not
//! a public site.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `<state dir>/tls`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("tls")
}

/// The CA certificate clients and agents trust.
pub fn ca_file(state_dir: &Path) -> PathBuf {
    ferry_pki::ca_file(&dir(state_dir))
}

/// The API's server certificate: the API is TLS once this exists.
pub fn server_file(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("server.pem")
}

/// The fleet's CA, made if this state directory has none yet.
pub fn fleet_ca(state_dir: &Path) -> Result<ferry_pki::Ca> {
    ferry_pki::Ca::load_or_create(&dir(state_dir))
        .with_context(|| format!("the fleet CA in {}", dir(state_dir).display()))
}

/// Makes the API's server certificate for `names` (DNS names or IP addresses; localhost,
/// 127.0.0.1 and ::1 always), signed by the fleet CA (made first if missing, reused if there).
/// Refuses to replace an existing server certificate: start over by removing it.
pub fn init(state_dir: &Path, names: &[String]) -> Result<()> {
    let d = dir(state_dir);
    if server_file(state_dir).exists() {
        bail!(
            "{} exists: this server has its API certificate already (remove it and server.key \
             to make a new one; keep ca.pem and ca.key, which the fleet trusts)",
            server_file(state_dir).display(),
        );
    }
    let ca = fleet_ca(state_dir)?;
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for n in names {
        if !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    let id = ca.issue_api_server(&sans)?;
    // The key readable by its owner only; the certificate last: its presence turns TLS on.
    ferry_pki::write_private(&d.join("server.key"), &id.key_pem)?;
    ferry_pki::write_public(&server_file(state_dir), &id.cert_pem)?;
    eprintln!(
        "ferry server init: a server certificate for {} in {}, signed by the fleet CA {}",
        sans.join(", "),
        d.display(),
        ca_file(state_dir).display(),
    );
    Ok(())
}

/// The API's TLS configuration if `ferry server init` made its certificate.
pub fn server_config(state_dir: &Path) -> Result<Option<Arc<rustls::ServerConfig>>> {
    let d = dir(state_dir);
    if !server_file(state_dir).exists() {
        return Ok(None);
    }
    let id = ferry_pki::read_issued(&server_file(state_dir), &d.join("server.key"))?;
    let config = ferry_pki::server_config(&id, ferry_pki::ClientAuth::None)
        .context("the API's server certificate")?;
    Ok(Some(config))
}

/// Serves `app` over TLS on `listener`: each connection's handshake runs in its own task, so a
/// slow or broken client holds up nobody.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    config: Arc<rustls::ServerConfig>,
) {
    serve_peers(listener, app, config, |_| Some(())).await
}

/// [`serve`], and each connection's client certificate (checked by rustls against the CA the
/// configuration names; `None` when the client sent none) goes through `admit`: `None` closes
/// the connection, `Some(p)` serves it with `p` in every request's extensions.
pub async fn serve_peers<P: Clone + Send + Sync + 'static>(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    config: Arc<rustls::ServerConfig>,
    admit: impl Fn(Option<&[u8]>) -> Option<P> + Send + Sync + 'static,
) {
    let admit = Arc::new(admit);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accepting: {e}");
                continue;
            }
        };
        let (acceptor, app, admit) = (acceptor.clone(), app.clone(), admit.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!("TLS handshake with {peer}: {e}");
                    return;
                }
            };
            let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let Some(who) = admit(cert.map(|c| c.as_ref())) else {
                tracing::debug!("{peer}: its certificate is not admitted here");
                return;
            };
            let app = app.layer(axum::Extension(who));
            let service = hyper_util::service::TowerToHyperService::new(app);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
}

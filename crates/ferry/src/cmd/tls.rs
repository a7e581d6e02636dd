//! TLS for the API: `ferry server init` makes a CA and the server's certificate in the state
//! directory (`tls/`), and a control plane whose state directory has them serves the API over
//! TLS only. Clients trust that CA (the CLI: `--ca`/`FERRY_CA`, or the copy `ferry dev` writes
//! next to its token; agents: `FERRY_SERVER_CA`), never the system's roots: the fleet's API is
//! not a public site.
//!
//! Not done yet: the server's calls to agents are still plain HTTP and unauthenticated (mutual
//! TLS to agents, with certificates the CA gives hosts when they join, is the next step).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `<state dir>/tls`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("tls")
}

/// The CA certificate clients trust.
pub fn ca_file(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("ca.pem")
}

/// Makes a CA and a server certificate for `names` (DNS names or IP addresses; localhost,
/// 127.0.0.1 and ::1 always) signed by it. Refuses to replace an existing CA: clients trust
/// it, and a new one would lock them all out.
pub fn init(state_dir: &Path, names: &[String]) -> Result<()> {
    let d = dir(state_dir);
    if ca_file(state_dir).exists() {
        bail!(
            "{} exists: this server has a CA already (remove {} to start over; every client \
             must then trust the new CA)",
            ca_file(state_dir).display(),
            d.display()
        );
    }
    let mut ca_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferry fleet CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().context("the CA's key")?;
    let ca = ca_params
        .self_signed(&ca_key)
        .context("the CA certificate")?;

    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for n in names {
        if !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(sans.clone()).context("--san")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferry server");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().context("the server's key")?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .context("the server certificate")?;

    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    // Keys readable by their owner only; certificates are public.
    super::control::write_secret(&d.join("ca.key"), &ca_key.serialize_pem())?;
    super::control::write_secret(&d.join("server.key"), &key.serialize_pem())?;
    std::fs::write(d.join("server.pem"), cert.pem())?;
    // Last: its presence says the directory is complete.
    std::fs::write(ca_file(state_dir), ca.pem())?;
    eprintln!(
        "ferry server init: CA {} and a server certificate for {} in {}",
        ca_file(state_dir).display(),
        sans.join(", "),
        d.display()
    );
    Ok(())
}

/// The server's TLS configuration if `ferry server init` ran on `state_dir`.
pub fn server_config(state_dir: &Path) -> Result<Option<Arc<rustls::ServerConfig>>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let d = dir(state_dir);
    if !ca_file(state_dir).exists() {
        return Ok(None);
    }
    let certs = CertificateDer::pem_file_iter(d.join("server.pem"))
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {}", d.join("server.pem").display()))?;
    let key = PrivateKeyDer::from_pem_file(d.join("server.key"))
        .with_context(|| format!("reading {}", d.join("server.key").display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the server certificate and key do not match")?;
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// Serves `app` over TLS on `listener`: each connection's handshake runs in its own task, so a
/// slow or broken client holds up nobody.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    config: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accepting: {e}");
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!("TLS handshake with {peer}: {e}");
                    return;
                }
            };
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

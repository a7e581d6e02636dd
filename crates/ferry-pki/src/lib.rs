//! The fleet's certificates (docs/design.md#tokens): one CA per fleet, kept in a control plane's
//! `<state dir>/tls` (`ca.pem`, `ca.key`), which signs
//!
//! - the API's server certificate (`ferry server init`; `server.pem`), for operators' clients;
//! - each host's certificate, when its agent joins ([`Ca::sign_host`]): the CA, not the request,
//!   decides its names: `h<hex id>.hosts.ferry` and the IP addresses its agent listens on;
//! - each server's role certificate ([`Ca::issue_server_role`], made in memory at every start):
//!   named [`SERVER_NAME`], presented on the agents' listener and to agents when the server
//!   calls them.
//!
//! Who a peer is comes from the names in its certificate after rustls checked it chains to the
//! fleet CA: [`host_of`] and [`is_server`]. Nothing else here talks to the network.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The DNS name in every server's role certificate. A host's certificate never has it (the CA
/// names hosts itself), so it tells a server from a host.
pub const SERVER_NAME: &str = "server.ferry";
/// Hosts' names are `h<hex id>.` + this.
pub const HOST_DOMAIN: &str = "hosts.ferry";

/// A host's name in its certificate: `h<hex id>.hosts.ferry`.
pub fn host_dns_name(host: u32) -> String {
    format!("h{host:x}.{HOST_DOMAIN}")
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Cert {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = PkiError> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Io { what, source }
}

fn cert(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Cert { what, source }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive() // never the key
    }
}

/// The fleet's CA: its certificate and key.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
}

/// `<dir>/ca.pem`: the certificate every member of the fleet trusts.
pub fn ca_file(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

impl Ca {
    /// The CA in `dir` (`ca.pem`, `ca.key`), made there if `ca.pem` is missing (key mode 0600;
    /// the certificate written last, so its presence says the pair is complete). Several
    /// servers of one fleet share it: copy `dir` to each before it starts.
    pub fn load_or_create(dir: &Path) -> Result<Ca> {
        if ca_file(dir).exists() {
            return Ca::load(dir);
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert("CA"))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "ferry fleet CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(cert("the CA's key"))?;
        let c = params.self_signed(&key).map_err(cert("the CA"))?;
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        write_private(&dir.join("ca.key"), &key.serialize_pem())?;
        write_public(&ca_file(dir), &c.pem())?;
        Ca::load(dir)
    }

    /// The CA in `dir`; an error if it is not there.
    pub fn load(dir: &Path) -> Result<Ca> {
        let pem = std::fs::read_to_string(ca_file(dir))
            .map_err(io(format!("reading {}", ca_file(dir).display())))?;
        let key_file = dir.join("ca.key");
        let key_pem = std::fs::read_to_string(&key_file)
            .map_err(io(format!("reading {}", key_file.display())))?;
        let key = KeyPair::from_pem(&key_pem).map_err(cert(key_file.display().to_string()))?;
        // rcgen signs with an issuer `Certificate`: rebuilt from the stored one's parameters
        // and key, so what it signs chains to `ca.pem` (same subject, same key).
        let params = CertificateParams::from_ca_cert_pem(&pem)
            .map_err(cert(ca_file(dir).display().to_string()))?;
        let cert_ = params
            .self_signed(&key)
            .map_err(cert("rebuilding the CA"))?;
        Ok(Ca {
            cert: cert_,
            key,
            pem,
        })
    }

    /// The CA certificate (PEM): what the fleet trusts.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The API's server certificate for `names` (DNS names or IP addresses).
    pub fn issue_api_server(&self, names: &[String]) -> Result<Issued> {
        let mut params = CertificateParams::new(names.to_vec()).map_err(cert("--san"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "ferry server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, "the server certificate")
    }

    /// A server's role certificate: [`SERVER_NAME`] plus `names` (what agents dial it at), for
    /// both ends of TLS (the agents' listener, and the server's calls to agents).
    pub fn issue_server_role(&self, names: &[String]) -> Result<Issued> {
        let mut all = vec![SERVER_NAME.to_owned()];
        all.extend(names.iter().filter(|n| *n != SERVER_NAME).cloned());
        let mut params = CertificateParams::new(all).map_err(cert("server names"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params, "the server's role certificate")
    }

    /// A host's certificate for the key in `csr_pem` (its signature is checked): the names are
    /// the CA's choice, `h<hex id>.hosts.ferry` and `ips`; whatever the CSR asks is ignored.
    pub fn sign_host(&self, csr_pem: &str, host: u32, ips: &[IpAddr]) -> Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("not a signed CSR: {e}")))?;
        csr.params = host_params(host, ips)?;
        let c = csr
            .signed_by(&self.cert, &self.key)
            .map_err(cert("the host certificate"))?;
        Ok(c.pem())
    }

    /// A host's key and certificate made here (a control plane that runs its hosts, `ferry
    /// dev`): the same certificate [`Ca::sign_host`] gives.
    pub fn issue_host(&self, host: u32, ips: &[IpAddr]) -> Result<Issued> {
        let (key_pem, csr_pem) = host_csr()?;
        Ok(Issued {
            cert_pem: self.sign_host(&csr_pem, host, ips)?,
            key_pem,
        })
    }

    fn issue(&self, mut params: CertificateParams, what: &str) -> Result<Issued> {
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(cert(format!("{what}'s key")))?;
        let c = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(cert(what))?;
        Ok(Issued {
            cert_pem: c.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn host_params(host: u32, ips: &[IpAddr]) -> Result<CertificateParams> {
    let name = host_dns_name(host);
    let mut params = CertificateParams::new(vec![name.clone()]).map_err(cert("host name"))?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A host serves its agent's listener and is a client of the servers' agent listener.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A new key pair and a CSR for it (PEM, PEM): what an agent sends when it joins. The key
/// never leaves the host.
pub fn host_csr() -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(cert("the host's key"))?;
    let params = CertificateParams::new(Vec::<String>::new()).map_err(cert("CSR"))?;
    let csr = params
        .serialize_request(&key)
        .map_err(cert("the CSR"))?
        .pem()
        .map_err(cert("the CSR"))?;
    Ok((key.serialize_pem(), csr))
}

/// Whether `csr_pem` is a CSR whose signature holds (what [`Ca::sign_host`] will take), so a
/// server can refuse a bad one before it spends a host ID on it.
pub fn host_csr_ok(csr_pem: &str) -> Result<()> {
    CertificateSigningRequestParams::from_pem(csr_pem)
        .map(|_| ())
        .map_err(|e| PkiError::Invalid(format!("not a signed CSR: {e}")))
}

/// The DNS names of a certificate (DER). Only meaningful once the certificate was checked to
/// chain to the fleet CA.
pub fn dns_names(cert_der: &[u8]) -> Result<Vec<String>> {
    use x509_parser::extensions::GeneralName;
    let (_, c) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::Invalid(format!("not a certificate: {e}")))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                out.push((*d).to_owned());
            }
        }
    }
    Ok(out)
}

/// The host a (checked) certificate names, if it is a host's.
pub fn host_of(cert_der: &[u8]) -> Option<u32> {
    let names = dns_names(cert_der).ok()?;
    let mut hosts = names.iter().filter_map(|n| {
        let h = n.strip_prefix('h')?.strip_suffix(HOST_DOMAIN)?;
        u32::from_str_radix(h.strip_suffix('.')?, 16).ok()
    });
    let h = hosts.next()?;
    // The CA never names two hosts in one certificate; one that does names none.
    hosts.next().is_none().then_some(h)
}

/// Whether a (checked) certificate is a server's role certificate.
pub fn is_server(cert_der: &[u8]) -> bool {
    dns_names(cert_der).is_ok_and(|n| n.iter().any(|n| n == SERVER_NAME))
}

/// Who may connect to a TLS listener.
pub enum ClientAuth<'a> {
    /// Anyone (the operator API: callers prove themselves with tokens).
    None,
    /// A client certificate is checked against this CA (PEM) if one is sent; none is fine too
    /// (the servers' agent listener: joining hosts have none yet).
    Optional(&'a str),
    /// A client certificate chaining to this CA (PEM) or no handshake (an agent's listener).
    Required(&'a str),
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let v = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Invalid(format!("{what}: {e}")))?;
    if v.is_empty() {
        return Err(PkiError::Invalid(format!("{what}: no certificate")));
    }
    Ok(v)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "the fleet CA")? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// A TLS server configuration (TLS 1.2 and 1.3; h2 and HTTP/1.1) presenting `id`.
pub fn server_config(id: &Issued, clients: ClientAuth<'_>) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::server::WebPkiClientVerifier;
    let chain = certs(&id.cert_pem, "the certificate")?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("the key: {e}")))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match clients {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| PkiError::Invalid(format!("client verifier: {e}")))?,
        ),
        ClientAuth::Required(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|e| PkiError::Invalid(format!("client verifier: {e}")))?,
        ),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads a certificate and key pair from two PEM files.
pub fn read_issued(cert_file: &Path, key_file: &Path) -> Result<Issued> {
    Ok(Issued {
        cert_pem: std::fs::read_to_string(cert_file)
            .map_err(io(format!("reading {}", cert_file.display())))?,
        key_pem: std::fs::read_to_string(key_file)
            .map_err(io(format!("reading {}", key_file.display())))?,
    })
}

/// Writes a private key readable by its owner only, atomically (a reader never sees half).
pub fn write_private(file: &Path, pem: &str) -> Result<()> {
    write_atomic(file, pem, 0o600)
}

/// Writes a certificate (public), atomically.
pub fn write_public(file: &Path, pem: &str) -> Result<()> {
    write_atomic(file, pem, 0o644)
}

fn write_atomic(file: &Path, data: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = file.parent() {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    let tmp = file.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(format!("writing {}", tmp.display())))?;
    f.write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, file).map_err(io(format!("writing {}", file.display())))?;
    Ok(())
}

/// The first certificate of a PEM chain, DER (e.g. to read its names with [`host_of`]).
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>> {
    Ok(certs(pem, "the certificate")?.remove(0).to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_ca_is_made_once_and_names_hosts_itself() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(d.path()).unwrap();
        let mode = std::fs::metadata(d.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Ca::load_or_create(d.path()).unwrap();
        assert_eq!(ca.pem(), again.pem());

        // A CSR asking for the server's name and another host's gets neither.
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec![SERVER_NAME.into(), host_dns_name(0x8000_0009)])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let c = again
            .sign_host(&csr, 0x8000_0001, &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let der = first_cert_der(&c).unwrap();
        assert_eq!(dns_names(&der).unwrap(), vec!["h80000001.hosts.ferry"]);
        assert_eq!(host_of(&der), Some(0x8000_0001));
        assert!(!is_server(&der));

        let s = ca.issue_server_role(&["localhost".into()]).unwrap();
        let der = first_cert_der(&s.cert_pem).unwrap();
        assert!(is_server(&der));
        assert_eq!(host_of(&der), None);
        assert!(sign_garbage(&ca));
    }

    fn sign_garbage(ca: &Ca) -> bool {
        matches!(
            ca.sign_host(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                0x8000_0001,
                &[]
            ),
            Err(PkiError::Invalid(_))
        )
    }

    #[test]
    fn configurations_build() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(d.path()).unwrap();
        let h = ca.issue_host(0x8000_0002, &[]).unwrap();
        server_config(&h, ClientAuth::Required(ca.pem())).unwrap();
        server_config(&h, ClientAuth::Optional(ca.pem())).unwrap();
        server_config(&h, ClientAuth::None).unwrap();
    }
}

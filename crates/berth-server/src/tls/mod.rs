//! TLS for `berth server`: one port serves plain HTTP and HTTPS.
//!
//! AWS SDKs (boto3, the `bedrock-agentcore` SDK's `wss://` shell client) only speak
//! HTTPS, while the CLI and existing clients speak plain HTTP; rather than a second port,
//! [`SniffingListener`] peeks at the first byte of every connection: a TLS handshake
//! record (`0x16`, which no HTTP/1 request line or HTTP/2 preface starts with) gets a
//! rustls handshake, anything else is served as plain HTTP. ALPN offers `h2` and
//! `http/1.1`.
//!
//! The certificate is the operator's ([`CertSource::Operator`]) or one Berth keeps in
//! `<data-dir>/tls/` ([`CertDir`]): a CA generated on first start and a server
//! certificate signed by it, re-issued from the same CA when the names it must cover
//! change or it nears expiry, so clients keep trusting `ca.pem` across restarts.
//!
//! rustls runs on the `ring` provider, passed explicitly everywhere (no process-wide
//! default), and without aws-lc-rs, which would need cmake and a C toolchain to build.

mod certs;
mod listener;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

pub use certs::{CaState, CertDir, Ensured, Reissue, ServerState};
pub use listener::{Io, SniffingListener, HANDSHAKE_TIMEOUT};

/// The protocols offered in ALPN, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Where the server's certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// The operator's certificate chain and private key, both PEM.
    Operator { cert: PathBuf, key: PathBuf },
    /// A CA and server certificate Berth generates and keeps in `<data_dir>/tls/`,
    /// valid for `names` (DNS names or IP addresses; see [`default_names`]).
    Generated {
        data_dir: PathBuf,
        names: Vec<String>,
    },
}

/// What clients must trust to verify the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The CA Berth generated: `<data-dir>/tls/ca.pem`.
    GeneratedCa(PathBuf),
    /// Whatever issued the operator's certificate (this path).
    Operator(PathBuf),
}

/// A ready TLS configuration.
#[derive(Debug)]
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub trust: Trust,
    /// What happened to the generated certificates on this start (for the log).
    pub generated: Option<Ensured>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse the PEM in {}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("cannot load the CA key {}", path.display())]
    CaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "{0}/ca.pem exists but its key {0}/ca.key does not: restore the key, or delete {0} \
         to start a new CA (clients must then trust the new ca.pem)",
        dir.display()
    )]
    CaKeyMissing { dir: PathBuf },
    #[error("cannot use {} as a trust anchor", path.display())]
    CaUnusable {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("invalid TLS name {name:?}: expected a DNS name or an IP address")]
    InvalidName { name: String },
    #[error("cannot generate a certificate")]
    Generate(#[source] rcgen::Error),
    #[error(
        "the newly issued {0}/server.pem does not verify against {0}/ca.pem; delete {0} to \
         start a new CA",
        dir.display()
    )]
    IssuedUntrusted {
        dir: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot serve the certificate {} with the key {}", cert.display(), key.display())]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The crypto provider every rustls object here is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `<data_dir>/tls/ca.pem`, what clients trust when Berth generates the certificate.
pub fn ca_path(data_dir: &Path) -> PathBuf {
    CertDir::in_data_dir(data_dir).ca_cert()
}

/// The names a generated server certificate covers: `localhost`, `127.0.0.1`, `::1`,
/// this host's hostname and `extra`, without duplicates.
pub fn default_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(String::from)
        .collect();
    // The UTS hostname, what gethostname(2) returns; skipped if it is no DNS name.
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim().to_ascii_lowercase();
        if !host.is_empty() && rustls::pki_types::DnsName::try_from(host.as_str()).is_ok() {
            names.push(host);
        }
    }
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Check an operator-given name (`--tls-san`): a DNS name (`*.` wildcards allowed) or
/// an IP address.
pub fn check_name(name: &str) -> Result<(), TlsError> {
    certs::Name::parse(name).map(|_| ())
}

/// Load or generate the certificate and build the server's TLS configuration.
pub fn setup(source: &CertSource) -> Result<Tls, TlsError> {
    match source {
        CertSource::Operator { cert, key } => Ok(Tls {
            config: server_config(cert, key)?,
            trust: Trust::Operator(cert.clone()),
            generated: None,
        }),
        CertSource::Generated { data_dir, names } => {
            let dir = CertDir::in_data_dir(data_dir);
            let ensured = dir.ensure(names, std::time::SystemTime::now())?;
            Ok(Tls {
                config: server_config(&dir.server_cert(), &dir.server_key())?,
                trust: Trust::GeneratedCa(dir.ca_cert()),
                generated: Some(ensured),
            })
        }
    }
}

/// A rustls server configuration for a PEM certificate chain (leaf first) and key,
/// offering [`ALPN`].
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|source| TlsError::Pem {
        path: key.to_path_buf(),
        source,
    })?;
    let config_error = |source| TlsError::Config {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(config_error)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

//! The CA and server certificate Berth generates in `<data-dir>/tls/`.
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` (0600) | the CA clients trust; generated once, kept for good |
//! | `server.pem`, `server.key` (0600) | the served certificate, signed by the CA |
//!
//! On every start [`CertDir::ensure`] reuses the server certificate if its key matches,
//! it names exactly the wanted DNS names and addresses, and it verifies against
//! `ca.pem` (with the same rustls verifier clients use) 30 days from now; otherwise it
//! issues a new one from the same CA. The CA's subject is derived from its key alone,
//! so the CA certificate can be rebuilt from `ca.key` and issuing needs no parser for
//! `ca.pem`. Every file is written to a temporary name and renamed into place.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, RootCertStore};
use sha2::Digest;

use super::{provider, read_certs, TlsError};

/// How long a generated CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// How long a generated server certificate is valid.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// A server certificate that expires sooner than this is re-issued on start.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Certificates start being valid this long before they are made (clock skew).
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// The directory holding the generated CA and server certificate.
#[derive(Debug, Clone)]
pub struct CertDir {
    dir: PathBuf,
}

/// What [`CertDir::ensure`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    pub ca: CaState,
    pub server: ServerState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaState {
    /// A new CA: clients must (newly) trust `ca.pem`.
    Created,
    /// `ca.pem` was missing and was rebuilt from `ca.key` (same subject and key).
    Rebuilt,
    /// The existing CA.
    Existing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerState {
    Reused,
    Issued(Reissue),
}

/// Why a server certificate was issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reissue {
    Missing,
    Unreadable(String),
    KeyMismatch,
    NamesChanged {
        added: Vec<String>,
        removed: Vec<String>,
    },
    ExpiresSoon,
    /// It does not verify against `ca.pem` (a new CA, say).
    Untrusted(String),
}

impl fmt::Display for Reissue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reissue::Missing => write!(f, "there was none"),
            Reissue::Unreadable(why) => write!(f, "the old one is unreadable: {why}"),
            Reissue::KeyMismatch => write!(f, "the old one does not match server.key"),
            Reissue::NamesChanged { added, removed } => {
                write!(f, "the names changed")?;
                if !added.is_empty() {
                    write!(f, " (added {})", added.join(", "))?;
                }
                if !removed.is_empty() {
                    write!(f, " (removed {})", removed.join(", "))?;
                }
                Ok(())
            }
            Reissue::ExpiresSoon => write!(f, "the old one expires within 30 days"),
            Reissue::Untrusted(why) => {
                write!(f, "the old one does not verify against ca.pem: {why}")
            }
        }
    }
}

/// A name a certificate covers, normalised for comparison.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Name {
    Dns(String),
    Ip(IpAddr),
}

impl Name {
    pub(super) fn parse(s: &str) -> Result<Name, TlsError> {
        let invalid = || TlsError::InvalidName {
            name: s.to_string(),
        };
        let s = s.trim();
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Name::Ip(ip));
        }
        let dns = s.to_ascii_lowercase();
        let base = dns.strip_prefix("*.").unwrap_or(&dns);
        // A DNS name, not an address in disguise such as `127.1`.
        if rustls::pki_types::DnsName::try_from(base).is_err()
            || base
                .rsplit('.')
                .next()
                .is_some_and(|tld| !tld.is_empty() && tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(invalid());
        }
        Ok(Name::Dns(dns))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Name::Dns(d) => f.write_str(d),
            Name::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl CertDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CertDir { dir: dir.into() }
    }

    /// `<data_dir>/tls`.
    pub fn in_data_dir(data_dir: &Path) -> Self {
        Self::new(data_dir.join("tls"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// Make sure the directory holds a CA and a server certificate signed by it, valid
    /// for exactly `names` for at least another 30 days at `now`.
    pub fn ensure(&self, names: &[String], now: SystemTime) -> Result<Ensured, TlsError> {
        let want = names
            .iter()
            .map(|n| Name::parse(n))
            .collect::<Result<BTreeSet<_>, _>>()?;
        if want.is_empty() {
            return Err(TlsError::InvalidName {
                name: String::new(),
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .and_then(|()| fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)))
            .map_err(|source| TlsError::CreateDir {
                path: self.dir.clone(),
                source,
            })?;

        let (ca_key, ca) = self.ensure_ca(now)?;
        let ca_der = read_certs(&self.ca_cert())?.swap_remove(0);
        let verifier = verifier(&ca_der).map_err(|source| TlsError::CaUnusable {
            path: self.ca_cert(),
            source,
        })?;
        let server = match self.check_server(verifier.as_ref(), &want, now) {
            Ok(()) => ServerState::Reused,
            Err(why) => {
                self.issue_server(&ca_key, &want, now)?;
                // Never serve a certificate clients would reject.
                let leaf = read_certs(&self.server_cert())?.swap_remove(0);
                let at = UnixTime::since_unix_epoch(since_epoch(now));
                for name in &want {
                    verify(verifier.as_ref(), &leaf, name, at).map_err(|source| {
                        TlsError::IssuedUntrusted {
                            dir: self.dir.clone(),
                            source,
                        }
                    })?;
                }
                ServerState::Issued(why)
            }
        };
        Ok(Ensured { ca, server })
    }

    /// Load the CA key, creating the CA or rebuilding `ca.pem` as needed.
    fn ensure_ca(&self, now: SystemTime) -> Result<(KeyPair, CaState), TlsError> {
        let (cert_path, key_path) = (self.ca_cert(), self.ca_key());
        let state = match (key_path.exists(), cert_path.exists()) {
            (true, true) => CaState::Existing,
            (true, false) => CaState::Rebuilt,
            (false, false) => CaState::Created,
            (false, true) => {
                return Err(TlsError::CaKeyMissing {
                    dir: self.dir.clone(),
                })
            }
        };
        let key = if state == CaState::Created {
            let key = KeyPair::generate().map_err(TlsError::Generate)?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            key
        } else {
            let pem = fs::read_to_string(&key_path).map_err(|source| TlsError::Read {
                path: key_path.clone(),
                source,
            })?;
            KeyPair::from_pem(&pem).map_err(|source| TlsError::CaKey {
                path: key_path.clone(),
                source,
            })?
        };
        if state != CaState::Existing {
            let cert = ca_params(&key, now)
                .self_signed(&key)
                .map_err(TlsError::Generate)?;
            write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
        }
        Ok((key, state))
    }

    /// Whether the current server certificate can be served on: `Err` says why not.
    fn check_server(
        &self,
        verifier: &WebPkiServerVerifier,
        want: &BTreeSet<Name>,
        now: SystemTime,
    ) -> Result<(), Reissue> {
        let (cert_path, key_path) = (self.server_cert(), self.server_key());
        if !cert_path.exists() || !key_path.exists() {
            return Err(Reissue::Missing);
        }
        let unreadable = |e: &dyn fmt::Display| Reissue::Unreadable(e.to_string());
        let leaf = read_certs(&cert_path)
            .map_err(|e| unreadable(&error_chain(&e)))?
            .swap_remove(0);
        let key = fs::read(&key_path)
            .map_err(|e| unreadable(&e))
            .and_then(|pem| PrivateKeyDer::from_pem_slice(&pem).map_err(|e| unreadable(&e)))?;
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| unreadable(&e))?;
        CertifiedKey::new(vec![leaf.clone()], signer)
            .keys_match()
            .map_err(|_| Reissue::KeyMismatch)?;

        let have = names_in(&leaf).map_err(|e| unreadable(&format!("{e:?}")))?;
        if &have != want {
            return Err(Reissue::NamesChanged {
                added: want.difference(&have).map(Name::to_string).collect(),
                removed: have.difference(want).map(Name::to_string).collect(),
            });
        }
        let at = UnixTime::since_unix_epoch(since_epoch(now) + RENEW_BEFORE);
        for name in want {
            match verify(verifier, &leaf, name, at) {
                Ok(()) => {}
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. },
                )) => return Err(Reissue::ExpiresSoon),
                Err(e) => return Err(Reissue::Untrusted(e.to_string())),
            }
        }
        Ok(())
    }

    /// Issue a new server key and certificate for `names`, signed by the CA.
    fn issue_server(
        &self,
        ca_key: &KeyPair,
        names: &BTreeSet<Name>,
        now: SystemTime,
    ) -> Result<(), TlsError> {
        let ca = ca_params(ca_key, now);
        let issuer = Issuer::from_params(&ca, ca_key);
        let mut params =
            CertificateParams::new(names.iter().map(Name::to_string).collect::<Vec<_>>())
                .map_err(TlsError::Generate)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Berth");
        params
            .distinguished_name
            .push(DnType::CommonName, "Berth server");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + SERVER_VALIDITY).into();
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(TlsError::Generate)?;
        // Key first: a crash in between leaves a pair that fails `keys_match` and is
        // re-issued on the next start.
        write_atomic(&self.server_key(), key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&self.server_cert(), cert.pem().as_bytes(), 0o644)
    }
}

/// The CA's parameters. Its subject depends only on its key, so the same issuer can be
/// rebuilt from `ca.key` on every start.
fn ca_params(key: &KeyPair, now: SystemTime) -> CertificateParams {
    let id = sha2::Sha256::digest(key.subject_public_key_info());
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, "Berth");
    p.distinguished_name.push(
        DnType::CommonName,
        format!("Berth CA {}", hex::encode(&id[..4])),
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(random_serial());
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + CA_VALIDITY).into();
    p
}

/// 16 random bytes, positive: never the same issuer and serial twice.
fn random_serial() -> SerialNumber {
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    SerialNumber::from_slice(&serial)
}

fn verifier(ca: &CertificateDer<'_>) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone().into_owned())?;
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

/// Would a client trusting the CA accept `leaf` for `name` at time `at`?
fn verify(
    verifier: &WebPkiServerVerifier,
    leaf: &CertificateDer<'_>,
    name: &Name,
    at: UnixTime,
) -> Result<(), rustls::Error> {
    let server_name = match name {
        Name::Ip(ip) => ServerName::IpAddress((*ip).into()),
        // A wildcard covers any one label: check it with one.
        Name::Dns(d) => {
            let d = match d.strip_prefix("*.") {
                Some(rest) => format!("berth-check.{rest}"),
                None => d.clone(),
            };
            ServerName::try_from(d).map_err(|e| rustls::Error::General(e.to_string()))?
        }
    };
    verifier
        .verify_server_cert(leaf, &[], &server_name, &[], at)
        .map(|_| ())
}

/// The DNS names and IP addresses in a certificate's subjectAltName extension.
fn names_in(cert: &[u8]) -> Result<BTreeSet<Name>, yasna::ASN1Error> {
    use yasna::Tag;
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let tbs = yasna::parse_der(cert, |r| {
        r.read_sequence(|r| {
            let tbs = r.next().read_der()?;
            r.next().read_der()?;
            r.next().read_der()?;
            Ok(tbs)
        })
    })?;
    // TBSCertificate ::= SEQUENCE { ..., extensions [3] EXPLICIT Extensions OPTIONAL }
    let mut extensions = None;
    yasna::parse_der(&tbs, |r| {
        r.read_sequence_of(|r| {
            let field = r.read_tagged_der()?;
            if field.tag() == Tag::context(3) {
                extensions = Some(field.value().to_vec());
            }
            Ok(())
        })
    })?;
    let mut names = BTreeSet::new();
    let Some(extensions) = extensions else {
        return Ok(names);
    };
    // Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }
    const SUBJECT_ALT_NAME: [u64; 4] = [2, 5, 29, 17];
    let mut san = None;
    yasna::parse_der(&extensions, |r| {
        r.read_sequence_of(|r| {
            r.read_sequence(|r| {
                let id = r.next().read_oid()?;
                r.read_default(false, |r| r.read_bool())?;
                let value = r.next().read_bytes()?;
                if id.components().as_slice() == SUBJECT_ALT_NAME {
                    san = Some(value);
                }
                Ok(())
            })
        })
    })?;
    let Some(san) = san else {
        return Ok(names);
    };
    // GeneralNames ::= SEQUENCE OF GeneralName; dNSName [2] IA5String,
    // iPAddress [7] OCTET STRING (4 or 16 bytes)
    yasna::parse_der(&san, |r| {
        r.read_sequence_of(|r| {
            let name = r.read_tagged_der()?;
            let v = name.value();
            if name.tag() == Tag::context(2) {
                names.insert(Name::Dns(String::from_utf8_lossy(v).to_ascii_lowercase()));
            } else if name.tag() == Tag::context(7) {
                if let Ok(b) = <[u8; 4]>::try_from(v) {
                    names.insert(Name::Ip(IpAddr::from(b)));
                } else if let Ok(b) = <[u8; 16]>::try_from(v) {
                    names.insert(Name::Ip(IpAddr::from(b)));
                }
            }
            Ok(())
        })
    })?;
    Ok(names)
}

/// Write `data` to a temporary file beside `path` with `mode`, then rename it over
/// `path`: readers see the old file or the new one, never half of one.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let write_error = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // A leftover from a crash may have another mode: start afresh.
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(write_error)?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(write_error)?;
    drop(file);
    fs::rename(&tmp, path).map_err(write_error)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_error)?;
    }
    Ok(())
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn names(extra: &[&str]) -> Vec<String> {
        ["localhost", "127.0.0.1", "::1"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    fn ca_verifier(dir: &CertDir) -> Arc<WebPkiServerVerifier> {
        let ca = read_certs(&dir.ca_cert()).expect("ca.pem").swap_remove(0);
        verifier(&ca).expect("verifier")
    }

    fn leaf(dir: &CertDir) -> CertificateDer<'static> {
        read_certs(&dir.server_cert())
            .expect("server.pem")
            .swap_remove(0)
    }

    fn verifies(dir: &CertDir, name: &str) -> Result<(), rustls::Error> {
        let name = Name::parse(name).expect("name");
        let at = UnixTime::since_unix_epoch(since_epoch(SystemTime::now()));
        verify(&ca_verifier(dir), &leaf(dir), &name, at)
    }

    #[test]
    fn generates_a_ca_and_a_server_certificate() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = CertDir::new(tmp.path().join("tls"));
        let got = dir
            .ensure(&names(&["berth.example", "10.1.2.3"]), SystemTime::now())
            .expect("ensure");
        assert_eq!(
            got,
            Ensured {
                ca: CaState::Created,
                server: ServerState::Issued(Reissue::Missing)
            }
        );
        assert_eq!(mode(dir.dir()), 0o700);
        assert_eq!(mode(&dir.ca_key()), 0o600);
        assert_eq!(mode(&dir.server_key()), 0o600);
        for name in ["localhost", "127.0.0.1", "::1", "berth.example", "10.1.2.3"] {
            verifies(&dir, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(verifies(&dir, "other.example").is_err());
        assert!(verifies(&dir, "10.1.2.4").is_err());
        let want: BTreeSet<Name> = names(&["berth.example", "10.1.2.3"])
            .iter()
            .map(|n| Name::parse(n).expect("name"))
            .collect();
        assert_eq!(names_in(&leaf(&dir)).expect("parse SANs"), want);
        // No temporary files are left.
        let mut files: Vec<String> = fs::read_dir(dir.dir())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["ca.key", "ca.pem", "server.key", "server.pem"]);
    }

    #[test]
    fn reuses_until_the_names_change_and_keeps_the_ca() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = CertDir::in_data_dir(tmp.path());
        let now = SystemTime::now();
        dir.ensure(&names(&[]), now).expect("first");
        let ca = fs::read(dir.ca_cert()).expect("ca.pem");
        let server = fs::read(dir.server_cert()).expect("server.pem");

        // Same names in another order and case: reused as is.
        let again = dir
            .ensure(&["::1".into(), "LOCALHOST".into(), "127.0.0.1".into()], now)
            .expect("again");
        assert_eq!(again.ca, CaState::Existing);
        assert_eq!(again.server, ServerState::Reused);
        assert_eq!(fs::read(dir.server_cert()).expect("server.pem"), server);

        // A name added: re-issued from the same CA.
        let added = dir.ensure(&names(&["berth.example"]), now).expect("added");
        assert_eq!(
            added.server,
            ServerState::Issued(Reissue::NamesChanged {
                added: vec!["berth.example".into()],
                removed: vec![]
            })
        );
        assert_eq!(fs::read(dir.ca_cert()).expect("ca.pem"), ca);
        verifies(&dir, "berth.example").expect("new name");
        verifies(&dir, "localhost").expect("old name");

        // A name removed (an address): re-issued too.
        let server = fs::read(dir.server_cert()).expect("server.pem");
        let removed = dir
            .ensure(&["localhost".into(), "berth.example".into()], now)
            .expect("removed");
        assert!(
            matches!(&removed.server, ServerState::Issued(Reissue::NamesChanged { added, removed })
                if added.is_empty() && removed == &["127.0.0.1", "::1"]),
            "{removed:?}"
        );
        assert_ne!(fs::read(dir.server_cert()).expect("server.pem"), server);
        assert!(verifies(&dir, "127.0.0.1").is_err());
        assert_eq!(fs::read(dir.ca_cert()).expect("ca.pem"), ca);
    }

    #[test]
    fn reissues_within_30_days_of_expiry() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = CertDir::in_data_dir(tmp.path());
        let issued = SystemTime::now() - SERVER_VALIDITY + 40 * DAY;
        dir.ensure(&names(&[]), issued).expect("first");
        let ca = fs::read(dir.ca_cert()).expect("ca.pem");
        // 40 days left: kept.
        let kept = dir.ensure(&names(&[]), SystemTime::now()).expect("kept");
        assert_eq!(kept.server, ServerState::Reused);
        // 25 days left: re-issued, valid for a year from now.
        let later = SystemTime::now() + 15 * DAY;
        let renewed = dir.ensure(&names(&[]), later).expect("renewed");
        assert_eq!(renewed.server, ServerState::Issued(Reissue::ExpiresSoon));
        assert_eq!(fs::read(dir.ca_cert()).expect("ca.pem"), ca);
        assert_eq!(
            dir.ensure(&names(&[]), later).expect("after").server,
            ServerState::Reused
        );
    }

    #[test]
    fn a_mismatched_key_or_a_new_ca_means_a_new_certificate() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = CertDir::in_data_dir(tmp.path());
        let now = SystemTime::now();
        dir.ensure(&names(&[]), now).expect("first");

        // server.key replaced (say a crash between the two renames of an issue).
        let other = KeyPair::generate().expect("key");
        write_atomic(&dir.server_key(), other.serialize_pem().as_bytes(), 0o600).expect("write");
        assert_eq!(
            dir.ensure(&names(&[]), now).expect("mismatch").server,
            ServerState::Issued(Reissue::KeyMismatch)
        );
        verifies(&dir, "localhost").expect("verifies");

        // A new CA (the operator deleted both CA files): the old server cert is
        // untrusted and replaced.
        fs::remove_file(dir.ca_cert()).expect("rm");
        fs::remove_file(dir.ca_key()).expect("rm");
        let fresh = dir.ensure(&names(&[]), now).expect("new CA");
        assert_eq!(fresh.ca, CaState::Created);
        assert!(
            matches!(fresh.server, ServerState::Issued(Reissue::Untrusted(_))),
            "{fresh:?}"
        );
        verifies(&dir, "localhost").expect("verifies");
    }

    #[test]
    fn ca_pem_is_rebuilt_from_ca_key_and_a_lost_key_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = CertDir::in_data_dir(tmp.path());
        let now = SystemTime::now();
        dir.ensure(&names(&[]), now).expect("first");
        let server = fs::read(dir.server_cert()).expect("server.pem");

        // Same key and subject: the existing server certificate still verifies.
        fs::remove_file(dir.ca_cert()).expect("rm");
        let rebuilt = dir.ensure(&names(&[]), now).expect("rebuilt");
        assert_eq!(
            rebuilt,
            Ensured {
                ca: CaState::Rebuilt,
                server: ServerState::Reused
            }
        );
        assert_eq!(fs::read(dir.server_cert()).expect("server.pem"), server);

        fs::remove_file(dir.ca_key()).expect("rm");
        let err = dir.ensure(&names(&[]), now).expect_err("no CA key");
        assert!(matches!(err, TlsError::CaKeyMissing { .. }), "{err}");
        assert!(
            !dir.ca_key().exists(),
            "no new key behind the operator's back"
        );
    }

    #[test]
    fn names_are_checked() {
        for ok in [
            "localhost",
            "Berth.Example",
            "*.berth.example",
            "10.0.0.1",
            "fe80::1",
        ] {
            Name::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "a b", "https://x", "bad..name", "127.1", "-x-.com", "*"] {
            assert!(Name::parse(bad).is_err(), "{bad:?} accepted");
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = CertDir::in_data_dir(tmp.path());
        let err = dir
            .ensure(
                &["localhost".into(), "not a name".into()],
                SystemTime::now(),
            )
            .expect_err("bad name");
        assert!(matches!(err, TlsError::InvalidName { .. }), "{err}");
    }

    #[test]
    fn wildcard_names_are_issued_and_verified() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = CertDir::in_data_dir(tmp.path());
        dir.ensure(&names(&["*.berth.example"]), SystemTime::now())
            .expect("ensure");
        verifies(&dir, "agent.berth.example").expect("wildcard");
        assert_eq!(
            dir.ensure(&names(&["*.berth.example"]), SystemTime::now())
                .expect("again")
                .server,
            ServerState::Reused
        );
    }
}

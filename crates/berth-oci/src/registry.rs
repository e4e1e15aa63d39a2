//! Which registries are reached how: plain HTTP for loopback and `--insecure-registry`
//! hosts, HTTPS (the system's trust store) for the rest; anonymous pulls unless a Docker
//! `config.json` (`--registry-config`) has credentials for the registry.
//!
//! Registry names are compared as `host[:port]`, lower-cased; Docker Hub's aliases
//! (`docker.io`, `registry-1.docker.io`, `https://index.docker.io/v1/`) are one registry.
//! The credentials file is read at every pull, so a `docker login` (or a refreshed ECR
//! token) takes effect without a restart. Only inline credentials are used: `auth`
//! (base64 `user:password`), `username` + `password`, or `registrytoken` (a bearer
//! token). Credential helpers (`credsStore`, `credHelpers`) would run programs on the
//! server and are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// How to reach registries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// A Docker `config.json` with an `auths` object.
    pub credentials: Option<PathBuf>,
    /// Registries (`host` for any port, or `host:port`) reached over plain HTTP, besides
    /// loopback ones.
    pub insecure: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a Docker config.json")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("the {registry} entry of {path} has no usable credentials ({why})")]
    Entry {
        path: PathBuf,
        registry: String,
        why: &'static str,
    },
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Debug, Default, Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// `host[:port]` of a registry name or a `config.json` key (which may be a URL).
pub fn normalize(registry: &str) -> String {
    let r = registry
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let r = r.split('/').next().unwrap_or(r).to_ascii_lowercase();
    match r.as_str() {
        "docker.io" | "registry-1.docker.io" | "index.docker.io" => "index.docker.io".into(),
        _ => r,
    }
}

/// The host part of `host[:port]` (brackets of an IPv6 literal removed).
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => registry,
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl RegistryConfig {
    /// Whether `registry` (`host[:port]`) is reached over plain HTTP.
    pub fn plain_http(&self, registry: &str) -> bool {
        let r = normalize(registry);
        let host = host_of(&r);
        is_loopback(host)
            || self
                .insecure
                .iter()
                .any(|i| normalize(i) == r || normalize(i) == host)
    }

    /// Read the credentials file once (at server start, to fail early).
    pub fn check(&self) -> Result<(), CredentialsError> {
        match &self.credentials {
            Some(path) => read(path).map(drop),
            None => Ok(()),
        }
    }

    /// The credentials for `registry`; anonymous when none are configured.
    pub fn auth_for(&self, registry: &str) -> Result<RegistryAuth, CredentialsError> {
        let Some(path) = &self.credentials else {
            return Ok(RegistryAuth::Anonymous);
        };
        let want = normalize(registry);
        let config = read(path)?;
        let Some((key, entry)) = config.auths.iter().find(|(k, _)| normalize(k) == want) else {
            return Ok(RegistryAuth::Anonymous);
        };
        let bad = |why| CredentialsError::Entry {
            path: path.clone(),
            registry: key.clone(),
            why,
        };
        if let Some(token) = entry.registrytoken.as_ref().filter(|t| !t.is_empty()) {
            return Ok(RegistryAuth::Bearer(token.clone()));
        }
        if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad("auth is not base64"))?;
            let text = String::from_utf8(decoded).map_err(|_| bad("auth is not UTF-8"))?;
            let (user, password) = text
                .split_once(':')
                .ok_or_else(|| bad("auth is not user:password"))?;
            return Ok(RegistryAuth::Basic(user.into(), password.into()));
        }
        match (&entry.username, &entry.password) {
            (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.clone(), p.clone())),
            _ if entry.identitytoken.is_some() => Err(bad(
                "identity tokens (OAuth refresh tokens) are not supported",
            )),
            _ => Err(bad("no auth, username/password or registrytoken")),
        }
    }
}

fn read(path: &Path) -> Result<DockerConfig, CredentialsError> {
    let text = std::fs::read(path).map_err(|e| CredentialsError::Read(path.to_path_buf(), e))?;
    serde_json::from_slice(&text).map_err(|e| CredentialsError::Parse(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn loopback_and_listed_registries_are_plain_http() {
        let c = RegistryConfig {
            credentials: None,
            insecure: ["registry.lan".into(), "10.0.0.5:5000".into()].into(),
        };
        for plain in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.0.0.2",
            "registry.lan:443",
            "registry.lan",
            "10.0.0.5:5000",
        ] {
            assert!(c.plain_http(plain), "{plain}");
        }
        for tls in [
            "10.0.0.5:5001",
            "ghcr.io",
            "public.ecr.aws",
            "index.docker.io",
        ] {
            assert!(!c.plain_http(tls), "{tls}");
        }
    }

    #[test]
    fn credentials_come_from_a_docker_config() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:x");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{
                "https://index.docker.io/v1/":{{"auth":"{b64}"}},
                "ghcr.io":{{"username":"bob","password":"pw"}},
                "registry.lan:5000":{{"registrytoken":"tok"}},
                "broken.example":{{"identitytoken":"x"}}
            }},"credsStore":"desktop"}}"#
            ),
        )
        .unwrap();
        let c = RegistryConfig {
            credentials: Some(path.clone()),
            insecure: BTreeSet::new(),
        };
        c.check().unwrap();
        let basic = |u: &str, p: &str| RegistryAuth::Basic(u.into(), p.into());
        assert_eq!(
            c.auth_for("index.docker.io").unwrap(),
            basic("alice", "s3cret:x")
        );
        assert_eq!(c.auth_for("docker.io").unwrap(), basic("alice", "s3cret:x"));
        assert_eq!(c.auth_for("GHCR.io").unwrap(), basic("bob", "pw"));
        assert_eq!(
            c.auth_for("registry.lan:5000").unwrap(),
            RegistryAuth::Bearer("tok".into())
        );
        assert_eq!(c.auth_for("quay.io").unwrap(), RegistryAuth::Anonymous);
        let err = c.auth_for("broken.example").unwrap_err().to_string();
        assert!(err.contains("identity tokens"), "{err}");
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(c.check(), Err(CredentialsError::Parse(..))));
        assert_eq!(
            RegistryConfig::default().auth_for("ghcr.io").unwrap(),
            RegistryAuth::Anonymous
        );
    }
}

//! The parts of an image's config blob (`application/vnd.oci.image.config.v1+json`) that
//! say how to run it, and the platform check.

use serde::{Deserialize, Serialize};

/// How an image says to run it (the `config` object of its config blob). Stored by
/// Berth as this struct's own JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`: the entrypoint's arguments, or the command when there is no entrypoint.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`, `KEY=VALUE` each.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir`; `None` when empty.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `User`; `None` when empty.
    #[serde(default)]
    pub user: Option<String>,
    /// `ExposedPorts` keys, such as `8080/tcp`, sorted.
    #[serde(default)]
    pub exposed_ports: Vec<String>,
}

impl ImageConfig {
    /// The process to start: `Entrypoint` followed by `Cmd` (as `docker run` does
    /// without arguments). Empty when the image names neither.
    pub fn argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    /// `Env` as pairs, in order (a later duplicate wins when collected into a map);
    /// entries without `=` are skipped.
    pub fn env_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().filter_map(|kv| kv.split_once('='))
    }
}

/// The wire form of the config blob (only what Berth reads).
#[derive(Debug, Deserialize)]
struct Blob {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<BlobConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BlobConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    exposed_ports: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigBlobError {
    #[error("the image config is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("the image is for {found}; this server runs {wanted} images")]
    Platform { found: String, wanted: String },
}

/// The OCI name of the architecture this server runs (`amd64`, `arm64`, …).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Parse a config blob and check that it is a `linux/<host arch>` image (a missing `os`
/// or `architecture` is taken as matching: some tools leave them out).
pub fn parse(blob: &[u8]) -> Result<ImageConfig, ConfigBlobError> {
    let b: Blob = serde_json::from_slice(blob).map_err(ConfigBlobError::Json)?;
    let (os, arch) = (
        b.os.unwrap_or_else(|| "linux".into()),
        b.architecture.unwrap_or_else(|| host_arch().into()),
    );
    if os != "linux" || arch != host_arch() {
        return Err(ConfigBlobError::Platform {
            found: format!("{os}/{arch}"),
            wanted: format!("linux/{}", host_arch()),
        });
    }
    let c = b.config.unwrap_or_default();
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Ok(ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: non_empty(c.working_dir),
        user: non_empty(c.user),
        exposed_ports: c
            .exposed_ports
            .map(|m| m.into_keys().collect())
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_what_docker_writes() {
        let blob = format!(
            r#"{{"architecture":"{}","os":"linux","config":{{"Entrypoint":["/bin/app"],
            "Cmd":["--port","8080"],"Env":["PATH=/usr/bin","A=b=c","junk"],"WorkingDir":"/app",
            "User":"","ExposedPorts":{{"8080/tcp":{{}},"9000/tcp":{{}}}}}},"rootfs":{{}}}}"#,
            host_arch()
        );
        let c = parse(blob.as_bytes()).unwrap();
        assert_eq!(c.argv(), ["/bin/app", "--port", "8080"]);
        assert_eq!(
            c.env_pairs().collect::<Vec<_>>(),
            [("PATH", "/usr/bin"), ("A", "b=c")]
        );
        assert_eq!(c.working_dir.as_deref(), Some("/app"));
        assert_eq!(c.user, None);
        assert_eq!(c.exposed_ports, ["8080/tcp", "9000/tcp"]);
        // Nulls and a missing config are empty.
        let c = parse(br#"{"config":{"Entrypoint":null,"Cmd":["sh"]}}"#).unwrap();
        assert_eq!(c.argv(), ["sh"]);
        assert_eq!(parse(b"{}").unwrap(), ImageConfig::default());
        let back: ImageConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn other_platforms_are_named() {
        let wrong = if host_arch() == "arm64" {
            "amd64"
        } else {
            "arm64"
        };
        let err =
            parse(format!(r#"{{"architecture":"{wrong}","os":"linux"}}"#).as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the image is for linux/{wrong}; this server runs linux/{} images",
                host_arch()
            )
        );
        assert!(parse(br#"{"os":"windows"}"#).is_err());
        assert!(matches!(parse(b"[1]"), Err(ConfigBlobError::Json(_))));
    }
}

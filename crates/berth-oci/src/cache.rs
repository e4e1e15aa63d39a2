//! The image cache: one unpacked rootfs per image manifest digest, pulled on first use.
//!
//! Layout under the cache root (0700, never inside the server's data dir):
//!
//! ```text
//! <root>/sha256-<hex>/rootfs/        the unpacked layers (a native runtime's image)
//! <root>/sha256-<hex>/config.json    the ImageConfig (entrypoint, cmd, env, …)
//! <root>/.tmp-…                      a pull or a removal in progress (deleted by sweep)
//! ```
//!
//! A pull resolves the reference to a manifest (an image index → its `linux/<host arch>`
//! entry) and keys the cache by that manifest's digest: a hit downloads nothing more. A
//! miss downloads the config and each layer into a temp dir beside the final one,
//! checking each blob's size and digest, unpacks the layers in order
//! ([`crate::unpack`]), and renames the temp dir into place, so a half-made rootfs never
//! has the final name. Per-digest locks serialize pulls and removals of one digest.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{self, OciDescriptor};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::Digest as _;
use tokio::sync::OwnedMutexGuard;

use crate::image_config::{self, ConfigBlobError, ImageConfig};
use crate::registry::{CredentialsError, RegistryConfig};
use crate::unpack::{self, UnpackError, Unpacker};

const TMP_PREFIX: &str = ".tmp-";
const CONFIG_FILE: &str = "config.json";
/// Config blobs are small; a bigger one is not an image config.
const MAX_CONFIG_BYTES: i64 = 4 << 20;

/// What one image may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of all layers as downloaded (compressed).
    pub max_download: u64,
    /// Unpacked bytes and entries.
    pub unpack: unpack::Limits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_download: 10 << 30,
            unpack: unpack::Limits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{reference:?} is not a valid image reference")]
    Reference {
        reference: String,
        #[source]
        source: oci_client::ParseError,
    },
    #[error("cannot read the registry credentials")]
    Credentials(#[source] CredentialsError),
    #[error("the registry {registry} answered: {answer}")]
    Registry { registry: String, answer: String },
    #[error("cannot reach the registry {registry}")]
    Connect {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("the registry sent a manifest digest Berth cannot use ({0})")]
    Digest(String),
    #[error("not a container image (its config is {0})")]
    NotAnImage(String),
    #[error("layer {index} has media type {media_type}, not a tar layer")]
    MediaType { index: usize, media_type: String },
    #[error("the image's layers are larger than {0} bytes")]
    TooLarge(u64),
    #[error("blob {digest} is not what its descriptor says ({why})")]
    Blob { digest: String, why: String },
    #[error("cannot download blob {digest}")]
    Download {
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigBlobError),
    #[error("cannot unpack layer {index} ({digest})")]
    Unpack {
        index: usize,
        digest: String,
        #[source]
        source: UnpackError,
    },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PullError {
    let path = path.to_path_buf();
    move |source| PullError::Io { what, path, source }
}

/// The registry's answer in words: its error codes and messages, or the HTTP status.
fn registry_error(registry: &str, auth: &RegistryAuth, e: OciDistributionError) -> PullError {
    let answer = match &e {
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .map(|err| {
                let code = serde_json::to_value(&err.code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("{:?}", err.code));
                if err.message.is_empty() {
                    code
                } else {
                    format!("{code} ({})", err.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        OciDistributionError::ServerError { code, message, .. } => {
            let message = message.trim();
            let message = &message[..message.floor_char_boundary(300)];
            format!("HTTP {code} {message}").trim_end().to_string()
        }
        OciDistributionError::UnauthorizedError { .. } => match auth {
            RegistryAuth::Anonymous => {
                "401 Unauthorized (Berth pulled anonymously: no credentials for this registry \
                 in --registry-config)"
                    .to_string()
            }
            _ => "401 Unauthorized (the configured credentials were refused)".to_string(),
        },
        OciDistributionError::AuthenticationFailure(m) => format!("authentication failed: {m}"),
        OciDistributionError::ImageManifestNotFoundError(m) => {
            format!(
                "no usable manifest ({m}); Berth runs linux/{} images",
                image_config::host_arch()
            )
        }
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => {
            return PullError::Connect {
                registry: registry.to_string(),
                source: e,
            }
        }
        other => other.to_string(),
    };
    PullError::Registry {
        registry: registry.to_string(),
        answer,
    }
}

/// A cached image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    /// The image manifest's digest (`sha256:…`), the cache key.
    pub digest: String,
    /// The unpacked rootfs.
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// Whether this pull downloaded the layers (`false`: a cache hit).
    pub downloaded: bool,
}

/// Holds one digest's lock: no pull or removal of that digest runs meanwhile.
pub struct DigestGuard {
    key: String,
    _guard: OwnedMutexGuard<()>,
}

impl std::fmt::Debug for DigestGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DigestGuard").field(&self.key).finish()
    }
}

/// The cache directory name of a digest (`sha256:ab…` → `sha256-ab…`); `None` for
/// anything but `algorithm:hex`.
pub fn cache_key(digest: &str) -> Option<String> {
    let (alg, hex) = digest.split_once(':')?;
    let ok = !alg.is_empty()
        && alg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && hex.len() >= 32
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then(|| format!("{alg}-{hex}"))
}

fn digest_of_key(key: &str) -> Option<String> {
    let (alg, hex) = key.split_once('-')?;
    let d = format!("{alg}:{hex}");
    (cache_key(&d).as_deref() == Some(key)).then_some(d)
}

/// sha256 or sha512 of a blob being downloaded.
enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn for_digest(digest: &str) -> Option<Self> {
        match digest.split_once(':')?.0 {
            "sha256" => Some(Self::Sha256(sha2::Sha256::new())),
            "sha512" => Some(Self::Sha512(sha2::Sha512::new())),
            _ => None,
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
        }
    }

    fn finish(self) -> String {
        match self {
            Self::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            Self::Sha512(h) => format!("sha512:{}", hex::encode(h.finalize())),
        }
    }
}

/// Layer media types Berth unpacks (the bytes are sniffed for gzip/zstd regardless).
fn is_tar_layer(media_type: &str) -> bool {
    [
        manifest::IMAGE_LAYER_MEDIA_TYPE,
        manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE,
        manifest::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
        manifest::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
        manifest::IMAGE_LAYER_NONDISTRIBUTABLE_MEDIA_TYPE,
        manifest::IMAGE_LAYER_NONDISTRIBUTABLE_GZIP_MEDIA_TYPE,
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    ]
    .contains(&media_type)
}

/// Parse an image reference as Berth accepts it: `[REGISTRY[:PORT]/]REPOSITORY[:TAG][@DIGEST]`
/// (Docker Hub when there is no registry; `latest` when there is neither tag nor digest).
pub fn parse_reference(s: &str) -> Result<Reference, oci_client::ParseError> {
    Reference::try_from(s)
}

/// The cache of unpacked images under one root directory.
pub struct ImageCache {
    root: PathBuf,
    registries: RegistryConfig,
    limits: Limits,
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for ImageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageCache")
            .field("root", &self.root)
            .field("registries", &self.registries)
            .finish()
    }
}

impl ImageCache {
    /// A cache under `root` (created, 0700, on the first pull).
    pub fn new(root: impl Into<PathBuf>, registries: RegistryConfig, limits: Limits) -> Self {
        crate::install_crypto_provider();
        Self {
            root: root.into(),
            registries,
            limits,
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn registries(&self) -> &RegistryConfig {
        &self.registries
    }

    /// Where the rootfs of `digest` is (whether or not it is cached).
    pub fn rootfs_path(&self, digest: &str) -> Option<PathBuf> {
        cache_key(digest).map(|k| self.root.join(k).join("rootfs"))
    }

    /// Lock one digest (see [`DigestGuard`]).
    pub async fn lock(&self, digest: &str) -> DigestGuard {
        let key = cache_key(digest).unwrap_or_else(|| digest.to_string());
        let mutex = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.retain(|_, w| w.strong_count() > 0);
            match locks.get(&key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key.clone(), Arc::downgrade(&m));
                    m
                }
            }
        };
        DigestGuard {
            key,
            _guard: mutex.lock_owned().await,
        }
    }

    fn client(&self, registry: &str) -> Result<Client, PullError> {
        let protocol = if self.registries.plain_http(registry) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            platform_resolver: Some(Box::new(oci_client::client::current_platform_resolver)),
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        };
        Client::try_from(config).map_err(|e| PullError::Connect {
            registry: registry.to_string(),
            source: e,
        })
    }

    /// Make `reference`'s image available; returns it with its digest locked, so that the
    /// caller can record that it uses the digest before a removal may look.
    pub async fn pull(&self, reference: &str) -> Result<(CachedImage, DigestGuard), PullError> {
        let r = parse_reference(reference).map_err(|source| PullError::Reference {
            reference: reference.to_string(),
            source,
        })?;
        let registry = r.resolve_registry().to_string();
        let auth = self
            .registries
            .auth_for(&registry)
            .map_err(PullError::Credentials)?;
        let client = self.client(&registry)?;
        let (manifest, digest) = client
            .pull_image_manifest(&r, &auth)
            .await
            .map_err(|e| registry_error(&registry, &auth, e))?;
        let key = cache_key(&digest).ok_or_else(|| PullError::Digest(digest.clone()))?;
        let guard = self.lock(&digest).await;
        let dir = self.root.join(&key);
        if let Some(config) = read_config(&dir) {
            return Ok((
                CachedImage {
                    digest,
                    rootfs: dir.join("rootfs"),
                    config,
                    downloaded: false,
                },
                guard,
            ));
        }
        if dir.exists() {
            // A directory without a readable config is not a finished pull: replace it.
            tracing::warn!(path = %dir.display(), "an incomplete cached image; pulling it again");
            let stale = self.root.join(format!("{TMP_PREFIX}stale-{key}"));
            std::fs::rename(&dir, &stale).map_err(io_err("move away", &dir))?;
            remove_tree(stale).await;
        }
        self.prepare_root()?;
        let tmp = self
            .root
            .join(format!("{TMP_PREFIX}{key}-{:016x}", rand::random::<u64>()));
        let made = self
            .fetch(&client, &r, &registry, &auth, &manifest, &tmp)
            .await;
        let config = match made {
            Ok(config) => config,
            Err(e) => {
                remove_tree(tmp).await;
                return Err(e);
            }
        };
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => {}
            // Made meanwhile by another process sharing the cache: use that one.
            Err(_) if read_config(&dir).is_some() => remove_tree(tmp).await,
            Err(e) => {
                remove_tree(tmp).await;
                return Err(io_err("rename into", &dir)(e));
            }
        }
        tracing::info!(reference, %digest, "image pulled and unpacked");
        Ok((
            CachedImage {
                digest,
                rootfs: dir.join("rootfs"),
                config,
                downloaded: true,
            },
            guard,
        ))
    }

    fn prepare_root(&self) -> Result<(), PullError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.root).map_err(io_err("create", &self.root))?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("restrict the permissions of", &self.root))
    }

    /// Download and unpack into `tmp`; the image's config.
    async fn fetch(
        &self,
        client: &Client,
        r: &Reference,
        registry: &str,
        auth: &RegistryAuth,
        manifest: &manifest::OciImageManifest,
        tmp: &Path,
    ) -> Result<ImageConfig, PullError> {
        let config_type = manifest.config.media_type.as_str();
        if config_type != manifest::IMAGE_CONFIG_MEDIA_TYPE
            && config_type != manifest::IMAGE_DOCKER_CONFIG_MEDIA_TYPE
        {
            return Err(PullError::NotAnImage(config_type.to_string()));
        }
        let mut total: u64 = 0;
        for (index, layer) in manifest.layers.iter().enumerate() {
            if !is_tar_layer(&layer.media_type) {
                return Err(PullError::MediaType {
                    index,
                    media_type: layer.media_type.clone(),
                });
            }
            total = total.saturating_add(u64::try_from(layer.size).unwrap_or(u64::MAX));
        }
        if total > self.limits.max_download {
            return Err(PullError::TooLarge(self.limits.max_download));
        }
        if !(0..=MAX_CONFIG_BYTES).contains(&manifest.config.size) {
            return Err(PullError::Blob {
                digest: manifest.config.digest.clone(),
                why: format!("a config larger than {MAX_CONFIG_BYTES} bytes"),
            });
        }
        let rootfs = tmp.join("rootfs");
        std::fs::create_dir(tmp).map_err(io_err("create", tmp))?;
        std::fs::create_dir(&rootfs).map_err(io_err("create", &rootfs))?;

        let blob = tmp.join("blob");
        download(client, r, &manifest.config, &blob)
            .await
            .map_err(|e| e.or_registry(registry, auth))?;
        let bytes = std::fs::read(&blob).map_err(io_err("read", &blob))?;
        let config = image_config::parse(&bytes)?;

        let mut unpacker = Unpacker::new(&rootfs, self.limits.unpack);
        for (index, layer) in manifest.layers.iter().enumerate() {
            download(client, r, layer, &blob)
                .await
                .map_err(|e| e.or_registry(registry, auth))?;
            let path = blob.clone();
            let digest = layer.digest.clone();
            unpacker = tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&path).map_err(UnpackError::Read)?;
                let reader =
                    unpack::decompress(std::io::BufReader::new(file)).map_err(UnpackError::Read)?;
                unpacker.apply(reader)?;
                Ok::<_, UnpackError>(unpacker)
            })
            .await
            .map_err(|e| PullError::Io {
                what: "unpack (the task failed) into",
                path: rootfs.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| PullError::Unpack {
                index,
                digest,
                source,
            })?;
        }
        std::fs::remove_file(&blob).map_err(io_err("remove", &blob))?;
        unpacker.finish().map_err(|source| PullError::Unpack {
            index: manifest.layers.len(),
            digest: "(directory modes)".into(),
            source,
        })?;
        let path = tmp.join(CONFIG_FILE);
        let json = serde_json::to_vec(&config).map_err(|e| PullError::Io {
            what: "serialize",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let mut f = std::fs::File::create(&path).map_err(io_err("create", &path))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io_err("write", &path))?;
        Ok(config)
    }

    /// The digests cached now (finished pulls only).
    pub fn cached(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return vec![];
        };
        let mut out: Vec<String> = dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(digest_of_key))
            .collect();
        out.sort();
        out
    }

    /// Remove a digest's rootfs, under its lock. Missing is fine.
    pub async fn remove(&self, guard: &DigestGuard) -> Result<(), PullError> {
        let dir = self.root.join(&guard.key);
        if !dir.exists() {
            return Ok(());
        }
        let doomed = self.root.join(format!(
            "{TMP_PREFIX}rm-{}-{:016x}",
            guard.key,
            rand::random::<u64>()
        ));
        std::fs::rename(&dir, &doomed).map_err(io_err("move away", &dir))?;
        tracing::info!(image = %guard.key, "removed a cached image");
        remove_tree(doomed).await;
        Ok(())
    }

    /// Delete what interrupted pulls and removals left (`.tmp-*`). Call when no pull runs.
    pub async fn clean_temp(&self) {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in dir.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                remove_tree(e.path()).await;
            }
        }
    }
}

fn read_config(dir: &Path) -> Option<ImageConfig> {
    if !dir.join("rootfs").is_dir() {
        return None;
    }
    let bytes = std::fs::read(dir.join(CONFIG_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

async fn remove_tree(path: PathBuf) {
    let shown = path.clone();
    let done = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    })
    .await;
    if let Ok(Err(e)) = done {
        tracing::warn!(path = %shown.display(), error = %e, "cannot remove an image directory");
    }
}

/// A download failure: the registry's error, or one of ours.
enum DownloadError {
    Registry(OciDistributionError),
    Ours(PullError),
}

impl DownloadError {
    fn or_registry(self, registry: &str, auth: &RegistryAuth) -> PullError {
        match self {
            Self::Registry(e) => registry_error(registry, auth, e),
            Self::Ours(e) => e,
        }
    }
}

impl From<PullError> for DownloadError {
    fn from(e: PullError) -> Self {
        Self::Ours(e)
    }
}

/// Download a blob to `dest`, no longer than its descriptor's size, and check its digest.
async fn download(
    client: &Client,
    r: &Reference,
    desc: &OciDescriptor,
    dest: &Path,
) -> Result<(), DownloadError> {
    let digest = desc.digest.clone();
    let blob_err = |why: String| {
        DownloadError::Ours(PullError::Blob {
            digest: digest.clone(),
            why,
        })
    };
    let mut hasher = Hasher::for_digest(&desc.digest)
        .ok_or_else(|| blob_err("an unsupported digest algorithm".into()))?;
    let size = u64::try_from(desc.size).map_err(|_| blob_err("a negative size".into()))?;
    let mut stream = client
        .pull_blob_stream(r, desc)
        .await
        .map_err(DownloadError::Registry)?;
    let mut file = std::fs::File::create(dest).map_err(io_err("create", dest))?;
    let mut got: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| {
            DownloadError::Ours(PullError::Download {
                digest: digest.clone(),
                source,
            })
        })?;
        got += chunk.len() as u64;
        if got > size {
            return Err(blob_err(format!("more than its {size} bytes")));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(io_err("write", dest))?;
    }
    if got != size {
        return Err(blob_err(format!("{got} bytes instead of {size}")));
    }
    let actual = hasher.finish();
    if actual != desc.digest {
        return Err(blob_err(format!("its content has digest {actual}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cache_keys_are_path_safe() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let key = cache_key(&d).unwrap();
        assert_eq!(key, format!("sha256-{}", "ab".repeat(32)));
        assert_eq!(digest_of_key(&key).as_deref(), Some(d.as_str()));
        for bad in [
            "sha256",
            "sha256:../../x",
            "SHA256:abcd",
            ":ab",
            "sha256:AB",
        ] {
            assert_eq!(cache_key(bad), None, "{bad}");
        }
        assert_eq!(digest_of_key(".tmp-sha256-ab"), None);
        assert_eq!(digest_of_key("rootfs"), None);
    }

    #[test]
    fn references_any_registry() {
        for ok in [
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/agents/echo:v1",
            "public.ecr.aws/x/y:1",
            "127.0.0.1:5000/agents/echo:v1",
            "localhost:5000/a/b/c@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "ghcr.io/org/agent",
            "python:3.12-slim",
        ] {
            parse_reference(ok).unwrap();
        }
        for bad in ["", "upper/CASE:1", "a:b:c", "repo@sha256:abc", "x y"] {
            assert!(parse_reference(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn locks_are_per_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(tmp.path(), RegistryConfig::default(), Limits::default());
        let a = cache.lock("sha256:aa").await;
        // Another digest is not blocked; the same one is until the guard drops.
        let _b = cache.lock("sha256:bb").await;
        let again = tokio::time::timeout(Duration::from_millis(50), cache.lock("sha256:aa")).await;
        assert!(again.is_err());
        drop(a);
        let _a = cache.lock("sha256:aa").await;
    }

    #[tokio::test]
    async fn removal_and_temp_cleanup() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(tmp.path(), RegistryConfig::default(), Limits::default());
        assert!(cache.cached().is_empty());
        let d = format!("sha256:{}", "cd".repeat(32));
        let rootfs = cache.rootfs_path(&d).unwrap();
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(rootfs.parent().unwrap().join(CONFIG_FILE), "{}").unwrap();
        std::fs::create_dir(tmp.path().join(".tmp-sha256-ee-1")).unwrap();
        assert_eq!(cache.cached(), vec![d.clone()]);
        cache.clean_temp().await;
        assert!(!tmp.path().join(".tmp-sha256-ee-1").exists());
        let g = cache.lock(&d).await;
        cache.remove(&g).await.unwrap();
        assert!(!rootfs.exists());
        assert!(cache.cached().is_empty());
        cache.remove(&g).await.unwrap();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}

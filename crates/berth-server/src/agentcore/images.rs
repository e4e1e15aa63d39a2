//! Container images of AgentCore versions (`containerConfiguration.containerUri`): the
//! pull while a version is prepared, the version → digest record, the removal of cached
//! images no version uses, and [`AgentCore::container_command`] for the data plane.
//!
//! The pulling, caching and unpacking are `berth-oci`'s; this module decides where the
//! cache is and when an image may go. A digest's lock (held from the pull until the
//! version's record is written, and by every removal) keeps a removal from deleting an
//! image a version is about to use.

use std::path::{Path, PathBuf};

use berth_oci::{ImageCache, ImageConfig, RegistryConfig};
use berth_store::agentcore::AcVersionImage;
use berth_store::StoreError;

use super::mapping::{self, AgentCommand};
use super::model::RuntimeSpec;
use super::runtimes::spec_of;
use super::{AgentCore, AwsError};

/// Where images are cached and how registries are reached (`berth server --oci-cache`,
/// `--registry-config`, `--insecure-registry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagesConfig {
    /// The image cache. Never inside the data dir: a native runtime's `image` must not
    /// overlap it (the namespace driver refuses that, so that no sandbox ever sees the
    /// data dir).
    pub cache_dir: PathBuf,
    pub registries: RegistryConfig,
}

impl ImagesConfig {
    /// The default: the cache beside the data dir, `<data-dir>-oci` (`/var/lib/berth-oci`
    /// for `/var/lib/berth`).
    pub fn beside(data_dir: &Path) -> Self {
        let cache_dir = match (data_dir.parent(), data_dir.file_name()) {
            (Some(parent), Some(name)) => parent.join(format!("{}-oci", name.to_string_lossy())),
            _ => PathBuf::from("/var/lib/berth-oci"),
        };
        Self {
            cache_dir,
            registries: RegistryConfig::default(),
        }
    }

    pub(super) fn check(&self, data_dir: &Path) -> Result<(), String> {
        let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let (cache, data) = (real(&self.cache_dir), real(data_dir));
        if !self.cache_dir.is_absolute() {
            return Err(format!(
                "the image cache {} is not an absolute path",
                self.cache_dir.display()
            ));
        }
        if cache.to_string_lossy().contains([',', ':', '\n']) {
            // Overlay mount options cannot carry these (the namespace driver refuses them).
            return Err(format!(
                "the image cache {} contains ',', ':' or a newline",
                cache.display()
            ));
        }
        if cache.starts_with(&data) || data.starts_with(&cache) {
            return Err(format!(
                "the image cache {} overlaps the data dir {}: sandboxes use cached images \
                 as their root, and must never reach the data dir",
                self.cache_dir.display(),
                data_dir.display()
            ));
        }
        self.registries.check().map_err(|e| berth_oci::report(&e))
    }
}

/// The cache for a configuration.
pub(super) fn cache(config: &ImagesConfig) -> ImageCache {
    ImageCache::new(
        &config.cache_dir,
        config.registries.clone(),
        berth_oci::Limits::default(),
    )
}

/// A pulled image as a version uses it.
pub(super) struct Pulled {
    pub digest: String,
    pub rootfs: PathBuf,
    pub config: ImageConfig,
}

impl AgentCore {
    fn images(&self) -> &ImageCache {
        &self.inner.images
    }

    /// Pull the image of a container version and record that the version runs it. `Err`
    /// is the version's `failureReason`.
    pub(super) async fn pull_image(
        &self,
        id: &str,
        version: u32,
        uri: &str,
        spec: &RuntimeSpec,
    ) -> Result<Pulled, String> {
        let (image, guard) = self
            .images()
            .pull(uri)
            .await
            .map_err(|e| format!("cannot pull image {uri}: {}", berth_oci::report(&e)))?;
        tracing::info!(runtime = id, version, uri, digest = %image.digest,
            downloaded = image.downloaded, "agentcore: image ready");
        let checked = mapping::agent_command(&self.config().region, spec, &image.config)
            .map_err(|e| format!("image {uri} cannot run: {e}"));
        let recorded = match checked {
            Ok(_) => self.record_image(id, version, uri, &image).await,
            Err(e) => Err(e),
        };
        drop(guard);
        if let Err(e) = recorded {
            self.release_images(vec![image.digest]).await;
            return Err(e);
        }
        Ok(Pulled {
            digest: image.digest,
            rootfs: image.rootfs,
            config: image.config,
        })
    }

    async fn record_image(
        &self,
        id: &str,
        version: u32,
        uri: &str,
        image: &berth_oci::CachedImage,
    ) -> Result<(), String> {
        let config = serde_json::to_string(&image.config).map_err(|e| {
            tracing::error!(error = %e, "agentcore: cannot serialize an image config");
            "the server could not record the image; see the Berth server log".to_string()
        })?;
        self.store()
            .agentcore()
            .put_version_image(&AcVersionImage {
                runtime_id: id.to_string(),
                version,
                reference: uri.to_string(),
                digest: image.digest.clone(),
                config,
            })
            .await
            .map_err(|e| {
                tracing::warn!(runtime = id, version, error = ?e, "agentcore: cannot record a version's image");
                "the server could not record the image (was the version deleted?)".to_string()
            })
    }

    /// The image digests of a runtime's versions (all when `version` is `None`), read
    /// before they are deleted.
    pub(super) async fn image_digests(
        &self,
        id: &str,
        version: Option<u32>,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .store()
            .agentcore()
            .version_images(id, version)
            .await?
            .into_iter()
            .map(|i| i.digest)
            .collect())
    }

    /// A failed or deleted version no longer holds its image.
    pub(super) async fn forget_image(&self, id: &str, version: u32) {
        let store = self.store().agentcore();
        let digests = match self.image_digests(id, Some(version)).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(runtime = id, version, error = ?e, "agentcore: cannot read a version's image");
                return;
            }
        };
        if digests.is_empty() {
            return;
        }
        if let Err(e) = store.delete_version_image(id, version).await {
            tracing::warn!(runtime = id, version, error = ?e, "agentcore: cannot forget a version's image");
            return;
        }
        self.release_images(digests).await;
    }

    /// Remove each digest's cached rootfs that no version runs any more.
    pub(super) async fn release_images(&self, mut digests: Vec<String>) {
        digests.sort();
        digests.dedup();
        for digest in digests {
            let guard = self.images().lock(&digest).await;
            match self.store().agentcore().image_digests_in_use().await {
                Ok(used) if used.contains(&digest) => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%digest, error = ?e, "agentcore: cannot tell whether an image is in use; keeping it");
                    continue;
                }
            }
            if let Err(e) = self.images().remove(&guard).await {
                tracing::warn!(%digest, error = %berth_oci::report(&e), "agentcore: cannot remove a cached image");
            }
        }
    }

    /// At start (nothing is pulling): delete interrupted pulls, and cached images no
    /// version runs (left by a server killed between a pull and its record).
    pub(super) async fn sweep_images(&self) -> Result<(), StoreError> {
        if !self.images().root().exists() {
            return Ok(());
        }
        self.images().clean_temp().await;
        let used = self.store().agentcore().image_digests_in_use().await?;
        let unused: Vec<String> = self
            .images()
            .cached()
            .into_iter()
            .filter(|d| !used.contains(d))
            .collect();
        self.release_images(unused).await;
        Ok(())
    }

    /// How to start the agent of a container version (see [`AgentCommand`]); `None` for a
    /// version deployed from code. For the data plane: the version's native runtime
    /// already has the image as its root and the image's environment.
    pub async fn container_command(
        &self,
        runtime_id: &str,
        version: u32,
    ) -> Result<Option<AgentCommand>, AwsError> {
        let Some(image) = self
            .store()
            .agentcore()
            .version_images(runtime_id, Some(version))
            .await?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let spec = spec_of(&self.version(runtime_id, version).await?)?;
        let config: ImageConfig = serde_json::from_str(&image.config).map_err(|e| {
            tracing::error!(runtime = runtime_id, version, error = %e,
                "agentcore: a stored image config is corrupt");
            AwsError::internal()
        })?;
        mapping::agent_command(&self.config().region, &spec, &config)
            .map(Some)
            .map_err(|e| {
                tracing::error!(runtime = runtime_id, version, error = %e,
                    "agentcore: a READY image version cannot run");
                AwsError::internal()
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_cache_is_beside_the_data_dir_never_inside() {
        let c = ImagesConfig::beside(Path::new("/var/lib/berth"));
        assert_eq!(c.cache_dir, Path::new("/var/lib/berth-oci"));
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        ImagesConfig::beside(&data).check(&data).unwrap();
        for bad in [data.join("images"), data.clone(), tmp.path().to_path_buf()] {
            let c = ImagesConfig {
                cache_dir: bad,
                registries: RegistryConfig::default(),
            };
            assert!(c
                .check(&data)
                .unwrap_err()
                .contains("overlaps the data dir"));
        }
        let colon = ImagesConfig {
            cache_dir: tmp.path().join("a:b"),
            registries: RegistryConfig::default(),
        };
        assert!(colon.check(&data).unwrap_err().contains("','"));
        let relative = ImagesConfig {
            cache_dir: "cache".into(),
            registries: RegistryConfig::default(),
        };
        assert!(relative.check(&data).is_err());
    }
}

//! Preparing a version in the background (CREATING/UPDATING → READY or *_FAILED), and
//! what a restart does with versions whose preparation died with the server.
//!
//! Preparation: fetch and unpack the code zip, check the entry point and the managed
//! runtime ([`super::artifacts`]), or pull the container image into the image cache and
//! record it ([`super::images`]); create the native runtime ([`super::mapping`]), then
//! mark the version READY, which also moves the endpoints that target it. The final
//! step only succeeds while the version is still in progress, so a version deleted
//! meanwhile is cleaned up instead (its image released too).
//!
//! A server killed during preparation leaves the version CREATING or UPDATING; on start,
//! [`AgentCore::recover`] marks it failed ("interrupted by a server restart; update the
//! runtime to retry") and removes its half-made native runtime and files. Resuming would
//! also work, but failing is predictable: the client sees a final status and retries
//! with an update, which makes a fresh version.

use berth_store::StoreError;

use super::model::Status;
use super::runtimes::{spec_of, status_of};
use super::{artifacts, mapping, now_ms, AgentCore};

pub const INTERRUPTED: &str = "interrupted by a server restart; update the runtime to retry";

/// Prepare `version` of runtime `runtime_id` on a background task.
pub(super) fn spawn(ac: AgentCore, runtime_id: String, version: u32) {
    tokio::spawn(async move { ac.provision(&runtime_id, version).await });
}

/// The failed status matching an in-progress one.
fn failed(in_progress: Status) -> Status {
    if in_progress == Status::Creating {
        Status::CreateFailed
    } else {
        Status::UpdateFailed
    }
}

impl AgentCore {
    async fn provision(&self, id: &str, version: u32) {
        let store = self.store().agentcore();
        let status = match store.get_version(id, version).await {
            Ok(Some(rec)) => status_of(&rec),
            Ok(None) => return,
            Err(e) => {
                tracing::error!(runtime = id, version, error = ?e, "agentcore: cannot read a version to prepare");
                return;
            }
        };
        let outcome = self.prepare(id, version).await;
        let now = now_ms();
        let finished = match &outcome {
            Ok(_) => {
                store
                    .finish_version(id, version, Status::Ready.as_str(), None, now)
                    .await
            }
            Err(reason) => {
                tracing::info!(runtime = id, version, reason, "agentcore: version failed");
                self.discard(id, version).await;
                store
                    .finish_version(id, version, failed(status).as_str(), Some(reason), now)
                    .await
            }
        };
        match finished {
            Ok(true) if outcome.is_ok() => {
                tracing::info!(runtime = id, version, "agentcore: version ready");
            }
            Ok(true) => {}
            // Deleted (or finished by someone else) meanwhile: nothing may stay behind.
            Ok(false) => {
                self.discard(id, version).await;
                // Its image record may have gone with the version, unseen by the deletion.
                if let Ok(Some(digest)) = outcome {
                    self.release_images(vec![digest]).await;
                }
            }
            Err(e) => {
                tracing::error!(runtime = id, version, error = ?e, "agentcore: cannot record a version's status");
            }
        }
    }

    /// Everything up to READY; `Err` is the `failureReason`. `Ok` holds the digest of a
    /// container version's image.
    async fn prepare(&self, id: &str, version: u32) -> Result<Option<String>, String> {
        let rec = self
            .store()
            .agentcore()
            .get_version(id, version)
            .await
            .map_err(|e| internal("read the version", &e))?
            .ok_or("the version was deleted")?;
        let spec = spec_of(&rec).map_err(|e| e.message)?;
        let artifact = spec.agent_runtime_artifact.clone().unwrap_or_default();
        let config = self.config();
        let image = match (
            &artifact.container_configuration,
            &artifact.code_configuration,
        ) {
            (Some(container), _) => {
                let uri = container.container_uri.as_deref().unwrap_or_default();
                Some(self.pull_image(id, version, uri, &spec).await?)
            }
            (None, Some(code)) => {
                artifacts::prepare(
                    &self.inner.objects,
                    self.inner.base_image.clone(),
                    &config.data_dir,
                    id,
                    version,
                    code,
                    self.inner.limits,
                )
                .await?;
                None
            }
            (None, None) => return Err("the version has no artifact".into()),
        };
        let ctx = mapping::Context {
            region: &config.region,
            shared_dirs: &config.shared_dirs,
        };
        let native = mapping::native_spec(
            &ctx,
            id,
            version,
            &spec,
            image.as_ref().map(|i| mapping::Image {
                rootfs: &i.rootfs,
                config: &i.config,
            }),
        )?;
        let digest = image.map(|i| i.digest);
        let core = self.core();
        let created = match core.create_runtime(native.clone()).await {
            Err(berth_core::CoreError::AlreadyExists { .. }) => {
                // Left by an attempt that died before it was recorded.
                self.remove_native(id, version)
                    .await
                    .map_err(|e| e.message)?;
                core.create_runtime(native).await
            }
            other => other,
        };
        created.map(|_| digest).map_err(|e| {
            let api = berth_api::ApiError::from(&e);
            if api.code == berth_api::ErrorCode::Internal {
                tracing::error!(runtime = id, version, error = ?e, "agentcore: cannot create the native runtime");
                "the server could not create the runtime; see the Berth server log".to_string()
            } else {
                format!("the runtime does not work on this server: {}", api.message)
            }
        })
    }

    /// Remove what a failed or deleted version left: its native runtime, its files, and
    /// its hold on a cached image.
    async fn discard(&self, id: &str, version: u32) {
        if let Err(e) = self.remove_native(id, version).await {
            tracing::warn!(runtime = id, version, error = %e, "agentcore: cannot remove a native runtime");
        }
        self.forget_image(id, version).await;
        let data = &self.config().data_dir;
        let root = artifacts::runtime_code_root(data, id);
        artifacts::remove_all(&artifacts::code_dir(data, id, version));
        artifacts::remove_all(&root.join(format!(".v{version}.tmp")));
        artifacts::remove_all(&root.join(format!(".v{version}.zip")));
    }

    /// Fail every version a previous server process left in progress, and sweep the image
    /// cache of interrupted pulls and images no version runs.
    pub(super) async fn recover(&self) -> Result<(), StoreError> {
        let store = self.store().agentcore();
        for rec in store.unfinished_versions().await? {
            let status = failed(status_of(&rec));
            tracing::warn!(runtime = %rec.runtime_id, version = rec.version,
                "agentcore: a version was being prepared when the server stopped; marking it {}",
                status.as_str());
            self.discard(&rec.runtime_id, rec.version).await;
            store
                .finish_version(
                    &rec.runtime_id,
                    rec.version,
                    status.as_str(),
                    Some(INTERRUPTED),
                    now_ms(),
                )
                .await?;
        }
        self.sweep_images().await
    }
}

fn internal(what: &str, err: &StoreError) -> String {
    tracing::error!(error = ?err, "agentcore: cannot {what}");
    format!("the server could not {what}; see the Berth server log")
}

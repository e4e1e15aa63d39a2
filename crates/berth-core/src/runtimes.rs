use berth_api::runtime::defaults::{IMAGE_HOST, MAX_MOUNTS};
use berth_api::{validate, Runtime, RuntimeSpec, DEFAULT_RUNTIME};

use crate::{now_ms, Core, CoreError};

/// API-level checks on a runtime spec (host-level checks are the driver's).
pub(crate) fn check_spec(spec: &RuntimeSpec) -> Result<(), CoreError> {
    validate::id("name", &spec.name)?;
    if spec.image != IMAGE_HOST && !spec.image.starts_with('/') {
        return Err(CoreError::invalid(
            "image",
            "must be \"host\" or an absolute directory path",
        ));
    }
    validate::sandbox_path("workspace_path", &spec.workspace_path)?;
    if spec.workspace_path == "/" {
        return Err(CoreError::invalid("workspace_path", "must not be /"));
    }
    if spec.workspace_size < (16 << 20) {
        return Err(CoreError::invalid(
            "workspace_size",
            "must be at least 16 MiB",
        ));
    }
    if spec.mounts.len() > MAX_MOUNTS {
        return Err(CoreError::invalid(
            "mounts",
            format!("at most {MAX_MOUNTS} mounts per runtime"),
        ));
    }
    for (i, m) in spec.mounts.iter().enumerate() {
        if !m.source.starts_with('/') {
            return Err(CoreError::invalid(
                &format!("mounts[{i}].source"),
                "must be an absolute host path",
            ));
        }
        validate::sandbox_path(&format!("mounts[{i}].target"), &m.target)?;
    }
    validate::env_names("env", spec.env.keys())?;
    if let Some(cpus) = spec.cpus {
        if !(cpus.is_finite() && (0.01..=1024.0).contains(&cpus)) {
            return Err(CoreError::invalid("cpus", "must be between 0.01 and 1024"));
        }
    }
    if spec.memory < (32 << 20) {
        return Err(CoreError::invalid("memory", "must be at least 32 MiB"));
    }
    if spec.pids < 8 {
        return Err(CoreError::invalid("pids", "must be at least 8"));
    }
    if spec.idle_timeout_s == 0 {
        return Err(CoreError::invalid(
            "idle_timeout_s",
            "must be at least 1 second",
        ));
    }
    if spec.max_lifetime_s == 0 {
        return Err(CoreError::invalid(
            "max_lifetime_s",
            "must be at least 1 second",
        ));
    }
    Ok(())
}

fn to_api(stored: berth_store::StoredRuntime) -> Runtime {
    Runtime {
        spec: stored.spec,
        created_at_ms: stored.created_at_ms,
    }
}

impl Core {
    pub async fn create_runtime(&self, spec: RuntimeSpec) -> Result<Runtime, CoreError> {
        check_spec(&spec)?;
        self.driver().validate(&spec)?;
        let now = now_ms();
        self.store()
            .insert_runtime(&spec, now)
            .await
            .map_err(|e| match e {
                berth_store::StoreError::AlreadyExists { .. } => CoreError::AlreadyExists {
                    what: "runtime",
                    id: spec.name.clone(),
                },
                other => other.into(),
            })?;
        Ok(Runtime {
            spec,
            created_at_ms: now,
        })
    }

    pub async fn get_runtime(&self, name: &str) -> Result<Runtime, CoreError> {
        validate::id("name", name)?;
        self.store()
            .get_runtime(name)
            .await?
            .map(to_api)
            .ok_or_else(|| CoreError::NotFound {
                what: "runtime",
                id: name.into(),
            })
    }

    pub async fn list_runtimes(&self) -> Result<Vec<Runtime>, CoreError> {
        Ok(self
            .store()
            .list_runtimes()
            .await?
            .into_iter()
            .map(to_api)
            .collect())
    }

    pub async fn delete_runtime(&self, name: &str) -> Result<(), CoreError> {
        self.get_runtime(name).await?;
        let users = self.store().sessions_using_runtime(name).await?;
        if users > 0 {
            return Err(CoreError::Conflict(format!(
                "runtime {name:?} is used by {users} session(s); delete them first"
            )));
        }
        self.store().delete_runtime(name).await?;
        Ok(())
    }

    /// Create the `default` runtime (host image, all defaults) if it is missing.
    pub(crate) async fn ensure_default_runtime(&self) -> Result<(), CoreError> {
        if self.store().get_runtime(DEFAULT_RUNTIME).await?.is_none() {
            self.store()
                .insert_runtime(&RuntimeSpec::named(DEFAULT_RUNTIME), now_ms())
                .await?;
        }
        Ok(())
    }
}

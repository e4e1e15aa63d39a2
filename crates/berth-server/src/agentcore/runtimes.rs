//! The runtime operations: CreateAgentRuntime, GetAgentRuntime, UpdateAgentRuntime,
//! DeleteAgentRuntime, ListAgentRuntimes, ListAgentRuntimeVersions.

use berth_store::agentcore::{AcEndpoint, AcRuntime, AcVersion};
use berth_store::StoreError;
use serde_json::Value;

use super::idempotency::Idempotency;
use super::model::{
    iso8601, CreateRuntimeRequest, CreateRuntimeResponse, DeleteRuntimeResponse,
    GetRuntimeResponse, ListRuntimesResponse, RuntimeSpec, RuntimeSummary, Status,
    UpdateRuntimeRequest, UpdateRuntimeResponse,
};
use super::validate::{self, Checker};
use super::{
    artifacts, endpoints, ids, mapping, now_ms, pagination, provision, Ac, AgentCore, AwsError,
    Body, PathParams, Query, Reply,
};

pub(super) async fn create(Ac(ac): Ac, Body(body): Body) -> Result<Reply, AwsError> {
    ac.create_runtime(body).await
}

pub(super) async fn get(
    Ac(ac): Ac,
    PathParams(id): PathParams<String>,
    Query(q): Query,
) -> Result<Reply, AwsError> {
    ac.get_runtime(&id, q.get("version").map(String::as_str))
        .await
}

pub(super) async fn update(
    Ac(ac): Ac,
    PathParams(id): PathParams<String>,
    Body(body): Body,
) -> Result<Reply, AwsError> {
    ac.update_runtime(&id, body).await
}

pub(super) async fn delete(
    Ac(ac): Ac,
    PathParams(id): PathParams<String>,
    Query(q): Query,
) -> Result<Reply, AwsError> {
    ac.delete_runtime(
        &id,
        q.get("version").map(String::as_str),
        q.get("clientToken").map(String::as_str),
    )
    .await
}

pub(super) async fn list(Ac(ac): Ac, Query(q): Query) -> Result<Reply, AwsError> {
    ac.list_runtimes(&q).await
}

pub(super) async fn list_versions(
    Ac(ac): Ac,
    PathParams(id): PathParams<String>,
    Query(q): Query,
) -> Result<Reply, AwsError> {
    ac.list_versions(&id, &q).await
}

/// A stored version's status (a value outside the enum is reported as failed).
pub(super) fn status_of(v: &AcVersion) -> Status {
    Status::parse(&v.status).unwrap_or_else(|| {
        tracing::error!(status = %v.status, "agentcore: unknown stored version status");
        Status::UpdateFailed
    })
}

/// A stored version's request members.
pub(super) fn spec_of(v: &AcVersion) -> Result<RuntimeSpec, AwsError> {
    serde_json::from_str(&v.spec).map_err(|e| {
        tracing::error!(runtime = %v.runtime_id, version = v.version, error = %e,
            "agentcore: stored runtime version is corrupt");
        AwsError::internal()
    })
}

fn to_json(v: &impl serde::Serialize) -> Result<String, AwsError> {
    serde_json::to_string(v).map_err(|e| {
        tracing::error!(error = %e, "agentcore: cannot serialize a record");
        AwsError::internal()
    })
}

/// A malformed runtime id in the path: ValidationException where the operation declares
/// it, ResourceNotFoundException for the Delete operations (which do not).
pub(super) fn check_runtime_id(id: &str, not_found_instead: bool) -> Result<(), AwsError> {
    let mut c = Checker::new();
    validate::runtime_id(&mut c, "agentRuntimeId", id);
    match c.finish() {
        Err(_) if not_found_instead => Err(not_found(id)),
        other => other,
    }
}

pub(super) fn not_found(id: &str) -> AwsError {
    AwsError::not_found(format!("agent runtime {id} not found"))
}

fn version_not_found(id: &str, version: u32) -> AwsError {
    AwsError::not_found(format!("version {version} of agent runtime {id} not found"))
}

/// Parse an optional `version` parameter.
fn version_param(path: &str, value: Option<&str>) -> Result<Option<u32>, AwsError> {
    let Some(v) = value else { return Ok(None) };
    let mut c = Checker::new();
    let n = validate::version(&mut c, path, v);
    c.finish()?;
    Ok(n)
}

impl AgentCore {
    pub(super) async fn runtime(&self, id: &str) -> Result<AcRuntime, AwsError> {
        self.store()
            .agentcore()
            .get_runtime(id)
            .await?
            .ok_or_else(|| not_found(id))
    }

    pub(super) async fn latest(&self, id: &str) -> Result<AcVersion, AwsError> {
        self.store()
            .agentcore()
            .latest_version(id)
            .await?
            .ok_or_else(|| not_found(id))
    }

    pub(super) async fn version(&self, id: &str, version: u32) -> Result<AcVersion, AwsError> {
        self.store()
            .agentcore()
            .get_version(id, version)
            .await?
            .ok_or_else(|| version_not_found(id, version))
    }

    fn summary(&self, rt: &AcRuntime, v: &AcVersion) -> Result<RuntimeSummary, AwsError> {
        let spec = spec_of(v)?;
        Ok(RuntimeSummary {
            agent_runtime_arn: ids::runtime_arn(self.config(), &rt.id),
            agent_runtime_id: rt.id.clone(),
            agent_runtime_version: v.version.to_string(),
            agent_runtime_name: rt.name.clone(),
            description: spec.description.unwrap_or_default(),
            last_updated_at: iso8601(v.updated_at_ms),
            status: status_of(v),
        })
    }

    async fn create_runtime(
        &self,
        body: serde_json::Map<String, Value>,
    ) -> Result<Reply, AwsError> {
        let req = CreateRuntimeRequest::parse(body)?;
        let mut c = Checker::new();
        validate::create_runtime(&mut c, &req);
        mapping::check_shared_dirs(&mut c, &req.spec, &self.config().shared_dirs);
        c.finish()?;
        let name = req.agent_runtime_name.clone().unwrap_or_default();
        let key = Idempotency::new(
            "CreateAgentRuntime",
            req.client_token.as_deref(),
            &(&name, &req.spec, &req.tags),
        );
        let _writes = self.writes().await;
        if let Some(reply) = self.replay(&key).await? {
            return Ok(reply);
        }
        let id = ids::new_id(&name);
        let now = now_ms();
        let runtime = AcRuntime {
            id: id.clone(),
            name: name.clone(),
            tags: to_json(&req.tags.clone().unwrap_or_default())?,
            created_at_ms: now,
        };
        let first = AcVersion {
            runtime_id: id.clone(),
            version: 1,
            spec: to_json(&req.spec)?,
            status: Status::Creating.as_str().into(),
            failure_reason: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let default = AcEndpoint {
            runtime_id: id.clone(),
            name: endpoints::DEFAULT.into(),
            id: ids::new_id(endpoints::DEFAULT),
            pinned_version: None,
            live_version: None,
            description: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.store()
            .agentcore()
            .create_runtime(&runtime, &first, &default)
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists { .. } => {
                    AwsError::conflict(format!("an agent runtime named {name} already exists"))
                }
                other => other.into(),
            })?;
        provision::spawn(self.clone(), id.clone(), 1);
        let reply = Reply::accepted(&CreateRuntimeResponse {
            agent_runtime_arn: ids::runtime_arn(self.config(), &id),
            agent_runtime_id: id,
            agent_runtime_version: "1".into(),
            created_at: iso8601(now),
            status: Status::Creating,
        })?;
        self.remember(&key, &reply).await?;
        Ok(reply)
    }

    async fn get_runtime(&self, id: &str, version: Option<&str>) -> Result<Reply, AwsError> {
        check_runtime_id(id, false)?;
        let version = version_param("version", version)?;
        let rt = self.runtime(id).await?;
        let v = match version {
            Some(n) => self.version(id, n).await?,
            None => self.latest(id).await?,
        };
        let mut spec = spec_of(&v)?;
        spec.lifecycle_configuration = Some(mapping::lifecycle_echo(&spec));
        Reply::ok(&GetRuntimeResponse {
            agent_runtime_arn: ids::runtime_arn(self.config(), id),
            agent_runtime_name: rt.name,
            agent_runtime_id: rt.id,
            agent_runtime_version: v.version.to_string(),
            created_at: iso8601(rt.created_at_ms),
            last_updated_at: iso8601(v.updated_at_ms),
            status: status_of(&v),
            failure_reason: v.failure_reason.clone(),
            spec,
        })
    }

    async fn update_runtime(
        &self,
        id: &str,
        body: serde_json::Map<String, Value>,
    ) -> Result<Reply, AwsError> {
        check_runtime_id(id, false)?;
        let req = UpdateRuntimeRequest::parse(body)?;
        let mut c = Checker::new();
        validate::update_runtime(&mut c, &req);
        mapping::check_shared_dirs(&mut c, &req.spec, &self.config().shared_dirs);
        c.finish()?;
        let key = Idempotency::new(
            format!("UpdateAgentRuntime/{id}"),
            req.client_token.as_deref(),
            &req.spec,
        );
        let _writes = self.writes().await;
        if let Some(reply) = self.replay(&key).await? {
            return Ok(reply);
        }
        let rt = self.runtime(id).await?;
        let latest = self.latest(id).await?;
        if status_of(&latest).in_progress() {
            return Err(AwsError::conflict(format!(
                "version {} of agent runtime {id} is still {}; update it once it is READY or has failed",
                latest.version, latest.status
            )));
        }
        let now = now_ms();
        let version = self
            .store()
            .agentcore()
            .add_version(id, &to_json(&req.spec)?, Status::Updating.as_str(), now)
            .await?;
        provision::spawn(self.clone(), id.to_string(), version);
        let reply = Reply::accepted(&UpdateRuntimeResponse {
            agent_runtime_arn: ids::runtime_arn(self.config(), id),
            agent_runtime_id: id.to_string(),
            agent_runtime_version: version.to_string(),
            created_at: iso8601(rt.created_at_ms),
            last_updated_at: iso8601(now),
            status: Status::Updating,
        })?;
        self.remember(&key, &reply).await?;
        Ok(reply)
    }

    async fn delete_runtime(
        &self,
        id: &str,
        version: Option<&str>,
        token: Option<&str>,
    ) -> Result<Reply, AwsError> {
        check_runtime_id(id, true)?;
        let version = version_param("version", version)?;
        let mut c = Checker::new();
        validate::client_token(&mut c, token);
        c.finish()?;
        let key = Idempotency::new(format!("DeleteAgentRuntime/{id}"), token, &version);
        let _writes = self.writes().await;
        if let Some(reply) = self.replay(&key).await? {
            return Ok(reply);
        }
        self.runtime(id).await?;
        let store = self.store().agentcore();
        let images = self.image_digests(id, version).await?;
        if let Some(n) = version {
            self.version(id, n).await?;
            let latest = self.latest(id).await?;
            if latest.version == n {
                return Err(AwsError::conflict(format!(
                    "version {n} is the latest version of agent runtime {id}, which the DEFAULT \
                     endpoint follows; update the runtime first, or delete the whole runtime"
                )));
            }
            if let Some(ep) = store
                .list_endpoints(id)
                .await?
                .into_iter()
                .find(|e| e.pinned_version == Some(n) || e.live_version == Some(n))
            {
                return Err(AwsError::conflict(format!(
                    "version {n} of agent runtime {id} is served by endpoint {}; point it at \
                     another version or delete it first",
                    ep.name
                )));
            }
            self.remove_native(id, n).await?;
            store.delete_version(id, n).await?;
            let code = artifacts::code_dir(&self.config().data_dir, id, n);
            artifacts::remove_all(&code);
            artifacts::remove_all(&super::data::agent::code_tar_path(&code));
        } else {
            for v in store.list_versions(id).await? {
                self.remove_native(id, v.version).await?;
            }
            store.delete_runtime(id).await?;
            artifacts::remove_all(&artifacts::runtime_code_root(&self.config().data_dir, id));
        }
        self.release_images(images).await;
        let reply = Reply::accepted(&DeleteRuntimeResponse {
            status: Status::Deleting,
            agent_runtime_id: id.to_string(),
            agent_runtime_version: version.map(|n| n.to_string()),
        })?;
        self.remember(&key, &reply).await?;
        Ok(reply)
    }

    /// Delete a version's native runtime and the sessions on it (their sandboxes are
    /// stopped and their workspaces deleted, as AWS ends a deleted runtime's sessions).
    pub(super) async fn remove_native(&self, id: &str, version: u32) -> Result<(), AwsError> {
        let name = mapping::native_name(id, version);
        let core = self.core();
        for session in core.list_sessions().await? {
            if session.runtime == name {
                match core.delete_session(&session.id).await {
                    Ok(()) | Err(berth_core::CoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        match core.delete_runtime(&name).await {
            Ok(()) | Err(berth_core::CoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn list_runtimes(
        &self,
        query: &std::collections::HashMap<String, String>,
    ) -> Result<Reply, AwsError> {
        const OP: &str = "ListAgentRuntimes";
        let page = pagination::page(OP, query)?;
        let store = self.store().agentcore();
        let mut latest: std::collections::HashMap<String, AcVersion> = store
            .latest_versions()
            .await?
            .into_iter()
            .map(|v| (v.runtime_id.clone(), v))
            .collect();
        let items: Vec<(AcRuntime, AcVersion)> = store
            .list_runtimes()
            .await?
            .into_iter()
            .filter_map(|rt| latest.remove(&rt.id).map(|v| (rt, v)))
            .collect();
        let (items, next_token) = pagination::paginate(
            OP,
            items,
            |(rt, _)| pagination::time_key(rt.created_at_ms, &rt.id),
            &page,
        );
        let agent_runtimes = items
            .iter()
            .map(|(rt, v)| self.summary(rt, v))
            .collect::<Result<_, _>>()?;
        Reply::ok(&ListRuntimesResponse {
            agent_runtimes,
            next_token,
        })
    }

    async fn list_versions(
        &self,
        id: &str,
        query: &std::collections::HashMap<String, String>,
    ) -> Result<Reply, AwsError> {
        const OP: &str = "ListAgentRuntimeVersions";
        check_runtime_id(id, false)?;
        let page = pagination::page(OP, query)?;
        let rt = self.runtime(id).await?;
        let versions = self.store().agentcore().list_versions(id).await?;
        // Newest first: the key grows as the version number falls.
        let (versions, next_token) = pagination::paginate(
            OP,
            versions,
            |v| format!("{:010}", u32::MAX - v.version),
            &page,
        );
        let agent_runtimes = versions
            .iter()
            .map(|v| self.summary(&rt, v))
            .collect::<Result<_, _>>()?;
        Reply::ok(&ListRuntimesResponse {
            agent_runtimes,
            next_token,
        })
    }
}

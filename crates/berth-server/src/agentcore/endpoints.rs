//! The runtime-endpoint operations: Create/Get/Update/Delete/ListAgentRuntimeEndpoint(s).
//!
//! Every runtime has a `DEFAULT` endpoint that follows its latest version; other endpoints
//! pin a version (the latest at creation unless `agentRuntimeVersion` says otherwise). An
//! endpoint's status comes from the version it targets ([`view`]).

use std::collections::HashMap;

use berth_store::agentcore::{AcEndpoint, AcVersion};
use berth_store::StoreError;
use serde_json::Value;

use super::idempotency::Idempotency;
use super::model::{
    self, iso8601, CreateEndpointRequest, CreateEndpointResponse, DeleteEndpointResponse,
    EndpointSummary, GetEndpointResponse, ListEndpointsResponse, Status, UpdateEndpointRequest,
    UpdateEndpointResponse,
};
use super::runtimes::{check_runtime_id, status_of};
use super::validate::{self, Checker};
use super::{ids, now_ms, pagination, Ac, AgentCore, AwsError, Body, PathParams, Query, Reply};

/// The endpoint every runtime has.
pub const DEFAULT: &str = "DEFAULT";

pub(super) async fn create(
    Ac(ac): Ac,
    PathParams(id): PathParams<String>,
    Body(body): Body,
) -> Result<Reply, AwsError> {
    ac.create_endpoint(&id, body).await
}

pub(super) async fn get(
    Ac(ac): Ac,
    PathParams((id, name)): PathParams<(String, String)>,
) -> Result<Reply, AwsError> {
    ac.get_endpoint(&id, &name).await
}

pub(super) async fn update(
    Ac(ac): Ac,
    PathParams((id, name)): PathParams<(String, String)>,
    Body(body): Body,
) -> Result<Reply, AwsError> {
    ac.update_endpoint(&id, &name, body).await
}

pub(super) async fn delete(
    Ac(ac): Ac,
    PathParams((id, name)): PathParams<(String, String)>,
    Query(q): Query,
) -> Result<Reply, AwsError> {
    ac.delete_endpoint(&id, &name, q.get("clientToken").map(String::as_str))
        .await
}

pub(super) async fn list(
    Ac(ac): Ac,
    PathParams(id): PathParams<String>,
    Query(q): Query,
) -> Result<Reply, AwsError> {
    ac.list_endpoints(&id, &q).await
}

/// What an endpoint serves and its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    pub target: u32,
    pub live: Option<u32>,
    pub status: Status,
    pub failure_reason: Option<String>,
}

/// An endpoint's state from the version it targets (`target`, the record of its pinned
/// version or of the runtime's `latest`): READY when that version is; CREATING or
/// UPDATING (it still serves its previous live version) while the version is being
/// prepared; CREATE_FAILED or UPDATE_FAILED with the version's reason when it failed.
pub fn view(ep: &AcEndpoint, latest: u32, target: Option<&AcVersion>) -> EndpointView {
    let target_version = ep.pinned_version.unwrap_or(latest);
    let (failed, pending) = if ep.live_version.is_some() {
        (Status::UpdateFailed, Status::Updating)
    } else {
        (Status::CreateFailed, Status::Creating)
    };
    let at = |status, live, failure_reason| EndpointView {
        target: target_version,
        live,
        status,
        failure_reason,
    };
    let Some(rec) = target else {
        let reason = format!("version {target_version} no longer exists");
        return at(failed, ep.live_version, Some(reason));
    };
    match status_of(rec) {
        Status::Ready => at(Status::Ready, Some(target_version), None),
        st if st.in_progress() => at(pending, ep.live_version, None),
        _ => {
            let reason = format!(
                "version {target_version} failed: {}",
                rec.failure_reason.as_deref().unwrap_or("unknown reason")
            );
            at(failed, ep.live_version, Some(reason))
        }
    }
}

fn endpoint_not_found(id: &str, name: &str) -> AwsError {
    AwsError::not_found(format!("endpoint {name} of agent runtime {id} not found"))
}

/// A malformed endpoint name in the path (see [`check_runtime_id`]).
fn check_endpoint_name(name: &str, id: &str, not_found_instead: bool) -> Result<(), AwsError> {
    let mut c = Checker::new();
    validate::endpoint_name(&mut c, "endpointName", name);
    match c.finish() {
        Err(_) if not_found_instead => Err(endpoint_not_found(id, name)),
        other => other,
    }
}

impl AgentCore {
    async fn endpoint(&self, id: &str, name: &str) -> Result<AcEndpoint, AwsError> {
        self.store()
            .agentcore()
            .get_endpoint(id, name)
            .await?
            .ok_or_else(|| endpoint_not_found(id, name))
    }

    async fn view_of(&self, ep: &AcEndpoint) -> Result<EndpointView, AwsError> {
        let latest = self.latest(&ep.runtime_id).await?;
        let target = match ep.pinned_version {
            Some(n) if n != latest.version => {
                self.store()
                    .agentcore()
                    .get_version(&ep.runtime_id, n)
                    .await?
            }
            _ => Some(latest.clone()),
        };
        Ok(view(ep, latest.version, target.as_ref()))
    }

    fn summary_of(&self, ep: &AcEndpoint, v: &EndpointView) -> EndpointSummary {
        EndpointSummary {
            name: ep.name.clone(),
            live_version: v.live.map(|n| n.to_string()),
            target_version: Some(v.target.to_string()),
            agent_runtime_endpoint_arn: ids::endpoint_arn(self.config(), &ep.runtime_id, &ep.name),
            agent_runtime_arn: ids::runtime_arn(self.config(), &ep.runtime_id),
            status: v.status,
            id: ep.id.clone(),
            description: ep.description.clone(),
            created_at: iso8601(ep.created_at_ms),
            last_updated_at: iso8601(ep.updated_at_ms),
        }
    }

    async fn create_endpoint(
        &self,
        id: &str,
        body: serde_json::Map<String, Value>,
    ) -> Result<Reply, AwsError> {
        check_runtime_id(id, false)?;
        let req: CreateEndpointRequest = model::parse(Value::Object(body))?;
        let mut c = Checker::new();
        validate::create_endpoint(&mut c, &req);
        c.finish()?;
        let name = req.name.clone().unwrap_or_default();
        let key = Idempotency::new(
            format!("CreateAgentRuntimeEndpoint/{id}"),
            req.client_token.as_deref(),
            &(
                &name,
                &req.agent_runtime_version,
                &req.description,
                &req.tags,
            ),
        );
        let _writes = self.writes().await;
        if let Some(reply) = self.replay(&key).await? {
            return Ok(reply);
        }
        self.runtime(id).await?;
        let target = match req.agent_runtime_version.as_deref() {
            Some(v) => self.version(id, v.parse().unwrap_or_default()).await?,
            None => self.latest(id).await?,
        };
        let now = now_ms();
        let ep = AcEndpoint {
            runtime_id: id.to_string(),
            name: name.clone(),
            id: ids::new_id(&name),
            pinned_version: Some(target.version),
            live_version: (status_of(&target) == Status::Ready).then_some(target.version),
            description: req.description.clone(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.store()
            .agentcore()
            .insert_endpoint(&ep)
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists { .. } => AwsError::conflict(format!(
                    "agent runtime {id} already has an endpoint named {name}"
                )),
                other => other.into(),
            })?;
        let v = self.view_of(&ep).await?;
        let reply = Reply::accepted(&CreateEndpointResponse {
            target_version: v.target.to_string(),
            agent_runtime_endpoint_arn: ids::endpoint_arn(self.config(), id, &name),
            agent_runtime_arn: ids::runtime_arn(self.config(), id),
            agent_runtime_id: id.to_string(),
            endpoint_name: name,
            status: v.status,
            created_at: iso8601(now),
        })?;
        self.remember(&key, &reply).await?;
        Ok(reply)
    }

    async fn get_endpoint(&self, id: &str, name: &str) -> Result<Reply, AwsError> {
        check_runtime_id(id, false)?;
        check_endpoint_name(name, id, false)?;
        self.runtime(id).await?;
        let ep = self.endpoint(id, name).await?;
        let v = self.view_of(&ep).await?;
        Reply::ok(&GetEndpointResponse {
            live_version: v.live.map(|n| n.to_string()),
            target_version: Some(v.target.to_string()),
            agent_runtime_endpoint_arn: ids::endpoint_arn(self.config(), id, name),
            agent_runtime_arn: ids::runtime_arn(self.config(), id),
            description: ep.description.clone(),
            status: v.status,
            created_at: iso8601(ep.created_at_ms),
            last_updated_at: iso8601(ep.updated_at_ms),
            failure_reason: v.failure_reason,
            name: ep.name,
            id: ep.id,
        })
    }

    async fn update_endpoint(
        &self,
        id: &str,
        name: &str,
        body: serde_json::Map<String, Value>,
    ) -> Result<Reply, AwsError> {
        check_runtime_id(id, false)?;
        check_endpoint_name(name, id, false)?;
        let req: UpdateEndpointRequest = model::parse(Value::Object(body))?;
        let mut c = Checker::new();
        validate::update_endpoint(&mut c, &req);
        if name == DEFAULT && req.agent_runtime_version.is_some() {
            c.fail(
                "agentRuntimeVersion",
                "the DEFAULT endpoint follows the latest version and cannot be pinned; \
                 create another endpoint to pin a version",
            );
        }
        c.finish()?;
        let key = Idempotency::new(
            format!("UpdateAgentRuntimeEndpoint/{id}/{name}"),
            req.client_token.as_deref(),
            &(&req.agent_runtime_version, &req.description),
        );
        let _writes = self.writes().await;
        if let Some(reply) = self.replay(&key).await? {
            return Ok(reply);
        }
        self.runtime(id).await?;
        let mut ep = self.endpoint(id, name).await?;
        if let Some(v) = req.agent_runtime_version.as_deref() {
            let target = self.version(id, v.parse().unwrap_or_default()).await?;
            ep.pinned_version = Some(target.version);
            if status_of(&target) == Status::Ready {
                ep.live_version = Some(target.version);
            }
        }
        if let Some(d) = &req.description {
            ep.description = Some(d.clone());
        }
        ep.updated_at_ms = now_ms();
        self.store().agentcore().update_endpoint(&ep).await?;
        let v = self.view_of(&ep).await?;
        let reply = Reply::accepted(&UpdateEndpointResponse {
            live_version: v.live.map(|n| n.to_string()),
            target_version: Some(v.target.to_string()),
            agent_runtime_endpoint_arn: ids::endpoint_arn(self.config(), id, name),
            agent_runtime_arn: ids::runtime_arn(self.config(), id),
            status: v.status,
            created_at: iso8601(ep.created_at_ms),
            last_updated_at: iso8601(ep.updated_at_ms),
        })?;
        self.remember(&key, &reply).await?;
        Ok(reply)
    }

    async fn delete_endpoint(
        &self,
        id: &str,
        name: &str,
        token: Option<&str>,
    ) -> Result<Reply, AwsError> {
        check_runtime_id(id, true)?;
        check_endpoint_name(name, id, true)?;
        let mut c = Checker::new();
        validate::client_token(&mut c, token);
        c.finish()?;
        let key = Idempotency::new(
            format!("DeleteAgentRuntimeEndpoint/{id}/{name}"),
            token,
            &(),
        );
        let _writes = self.writes().await;
        if let Some(reply) = self.replay(&key).await? {
            return Ok(reply);
        }
        self.runtime(id).await?;
        self.endpoint(id, name).await?;
        if name == DEFAULT {
            return Err(AwsError::conflict(
                "the DEFAULT endpoint is deleted with its runtime (DeleteAgentRuntime)",
            ));
        }
        self.store().agentcore().delete_endpoint(id, name).await?;
        let reply = Reply::accepted(&DeleteEndpointResponse {
            status: Status::Deleting,
            agent_runtime_id: id.to_string(),
            endpoint_name: name.to_string(),
        })?;
        self.remember(&key, &reply).await?;
        Ok(reply)
    }

    async fn list_endpoints(
        &self,
        id: &str,
        query: &HashMap<String, String>,
    ) -> Result<Reply, AwsError> {
        const OP: &str = "ListAgentRuntimeEndpoints";
        check_runtime_id(id, false)?;
        let page = pagination::page(OP, query)?;
        self.runtime(id).await?;
        let store = self.store().agentcore();
        let latest = self.latest(id).await?;
        let versions: HashMap<u32, AcVersion> = store
            .list_versions(id)
            .await?
            .into_iter()
            .map(|v| (v.version, v))
            .collect();
        let (eps, next_token) = pagination::paginate(
            OP,
            store.list_endpoints(id).await?,
            |e| pagination::time_key(e.created_at_ms, &e.name),
            &page,
        );
        let runtime_endpoints = eps
            .iter()
            .map(|ep| {
                let target = versions.get(&ep.pinned_version.unwrap_or(latest.version));
                self.summary_of(ep, &view(ep, latest.version, target))
            })
            .collect();
        Reply::ok(&ListEndpointsResponse {
            runtime_endpoints,
            next_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(pinned: Option<u32>, live: Option<u32>) -> AcEndpoint {
        AcEndpoint {
            runtime_id: "a-0123456789".into(),
            name: "e".into(),
            id: "e-0123456789".into(),
            pinned_version: pinned,
            live_version: live,
            description: None,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn version(n: u32, status: &str, reason: Option<&str>) -> AcVersion {
        AcVersion {
            runtime_id: "a-0123456789".into(),
            version: n,
            spec: "{}".into(),
            status: status.into(),
            failure_reason: reason.map(str::to_string),
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn default_follows_the_latest_version() {
        let v = view(&ep(None, None), 1, Some(&version(1, "CREATING", None)));
        assert_eq!((v.target, v.live, v.status), (1, None, Status::Creating));
        let v = view(&ep(None, Some(1)), 2, Some(&version(2, "UPDATING", None)));
        assert_eq!((v.target, v.live, v.status), (2, Some(1), Status::Updating));
        let v = view(&ep(None, Some(1)), 2, Some(&version(2, "READY", None)));
        assert_eq!((v.target, v.live, v.status), (2, Some(2), Status::Ready));
    }

    #[test]
    fn failures_say_which_version_failed() {
        let v = view(
            &ep(None, Some(1)),
            2,
            Some(&version(2, "UPDATE_FAILED", Some("no zip"))),
        );
        assert_eq!(v.status, Status::UpdateFailed);
        assert_eq!(v.live, Some(1));
        assert_eq!(
            v.failure_reason.as_deref(),
            Some("version 2 failed: no zip")
        );
        let v = view(
            &ep(None, None),
            1,
            Some(&version(1, "CREATE_FAILED", Some("x"))),
        );
        assert_eq!(v.status, Status::CreateFailed);
    }

    #[test]
    fn pinned_endpoints_stay_on_their_version() {
        let v = view(&ep(Some(1), Some(1)), 3, Some(&version(1, "READY", None)));
        assert_eq!((v.target, v.live, v.status), (1, Some(1), Status::Ready));
        let v = view(&ep(Some(3), Some(1)), 3, None);
        assert_eq!(v.status, Status::UpdateFailed);
    }
}

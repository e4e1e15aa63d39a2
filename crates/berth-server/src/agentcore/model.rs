//! The control-plane request and response shapes of `bedrock-agentcore-control`
//! 2023-06-05 (botocore 1.44.5), as inert serde types. Member names are the wire names;
//! every member is optional here so that [`super::validate`] can name a missing required
//! one by its path. Members Berth rejects are kept as raw JSON.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::AwsError;

/// `AgentRuntimeStatus` (= `AgentRuntimeEndpointStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Creating,
    CreateFailed,
    Updating,
    UpdateFailed,
    Ready,
    Deleting,
    DeleteFailed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "CREATING",
            Status::CreateFailed => "CREATE_FAILED",
            Status::Updating => "UPDATING",
            Status::UpdateFailed => "UPDATE_FAILED",
            Status::Ready => "READY",
            Status::Deleting => "DELETING",
            Status::DeleteFailed => "DELETE_FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Status::Creating,
            Status::CreateFailed,
            Status::Updating,
            Status::UpdateFailed,
            Status::Ready,
            Status::Deleting,
            Status::DeleteFailed,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    pub fn in_progress(self) -> bool {
        matches!(self, Status::Creating | Status::Updating)
    }

    pub fn failed(self) -> bool {
        matches!(self, Status::CreateFailed | Status::UpdateFailed)
    }
}

/// The members CreateAgentRuntime and UpdateAgentRuntime share (plus
/// `metadataConfiguration`, which only Update and Get have). Stored per version as JSON
/// and echoed by GetAgentRuntime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_runtime_artifact: Option<AgentRuntimeArtifact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_configuration: Option<NetworkConfiguration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Rejected: not supported by Berth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorizer_configuration: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_header_configuration: Option<RequestHeaderConfiguration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_configuration: Option<ProtocolConfiguration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle_configuration: Option<LifecycleConfiguration>,
    /// Rejected: not supported by Berth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks_configuration: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment_variables: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem_configurations: Option<Vec<FilesystemConfiguration>>,
    /// Rejected: not supported by Berth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_provider_configuration: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform_version: Option<String>,
    /// Rejected: not supported by Berth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_ports: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_configurations: Option<Vec<ResourceConfiguration>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_configuration: Option<MetadataConfiguration>,
}

/// Union: exactly one member.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentRuntimeArtifact {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_configuration: Option<ContainerConfiguration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_configuration: Option<CodeConfiguration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerConfiguration {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_uri: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CodeConfiguration {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<Code>,
    /// `PYTHON_3_10` … `PYTHON_3_14`, `NODE_22`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<Vec<String>>,
}

/// Union: exactly one member.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Code {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Location>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Location {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// The zip's object key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkConfiguration {
    /// `PUBLIC` or `VPC`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<String>,
    /// Only meaningful with `VPC`, which Berth rejects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_mode_config: Option<Value>,
}

/// Union: exactly one member.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestHeaderConfiguration {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_header_allowlist: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtocolConfiguration {
    /// `MCP`, `HTTP`, `A2A` or `AGUI`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LifecycleConfiguration {
    /// Seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_runtime_session_timeout: Option<i64>,
    /// Seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<i64>,
}

/// Union: exactly one member.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilesystemConfiguration {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_storage: Option<SessionStorage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_files_access_point: Option<AccessPoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub efs_access_point: Option<AccessPoint>,
    /// Rejected: not supported by Berth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_provider_volume: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionStorage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
}

/// `S3FilesAccessPointConfiguration` and `EfsAccessPointConfiguration` (same members).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessPoint {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_point_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfiguration {
    #[serde(rename = "minimumMemoryInMiB", skip_serializing_if = "Option::is_none")]
    pub minimum_memory_in_mib: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataConfiguration {
    #[serde(rename = "requireMMDSV2", skip_serializing_if = "Option::is_none")]
    pub require_mmdsv2: Option<bool>,
}

/// CreateAgentRuntime's body.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CreateRuntimeRequest {
    pub agent_runtime_name: Option<String>,
    pub client_token: Option<String>,
    pub tags: Option<BTreeMap<String, String>>,
    pub spec: RuntimeSpec,
}

/// UpdateAgentRuntime's body.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UpdateRuntimeRequest {
    pub client_token: Option<String>,
    pub spec: RuntimeSpec,
}

/// CreateAgentRuntimeEndpoint's body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateEndpointRequest {
    pub name: Option<String>,
    pub agent_runtime_version: Option<String>,
    pub description: Option<String>,
    pub client_token: Option<String>,
    pub tags: Option<BTreeMap<String, String>>,
}

/// UpdateAgentRuntimeEndpoint's body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateEndpointRequest {
    pub agent_runtime_version: Option<String>,
    pub description: Option<String>,
    pub client_token: Option<String>,
}

/// Deserialize a request body, naming a member of the wrong type, or unknown, by its path.
pub fn parse<T: DeserializeOwned>(body: Value) -> Result<T, AwsError> {
    serde_path_to_error::deserialize(body).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner().to_string();
        if let Some(rest) = inner.strip_prefix("unknown field `") {
            let field = rest.split('`').next().unwrap_or_default();
            let name = if path == "." || path.ends_with(field) {
                path.trim_start_matches('.').to_string()
            } else {
                format!("{path}.{field}")
            };
            let name = if name.is_empty() {
                field.to_string()
            } else {
                name
            };
            return AwsError::field(
                name,
                "not a member of this request in bedrock-agentcore-control 2023-06-05 \
                 (botocore 1.44.5), which is what Berth implements",
            );
        }
        let name = if path == "." {
            "body".to_string()
        } else {
            path
        };
        AwsError::field(name, inner)
    })
}

/// Take the named top-level members out of a body, leaving the rest.
fn take(map: &mut Map<String, Value>, key: &str) -> Value {
    map.remove(key).unwrap_or(Value::Null)
}

impl CreateRuntimeRequest {
    pub fn parse(mut body: Map<String, Value>) -> Result<Self, AwsError> {
        let name = take(&mut body, "agentRuntimeName");
        let token = take(&mut body, "clientToken");
        let tags = take(&mut body, "tags");
        if body.contains_key("metadataConfiguration") {
            return Err(AwsError::field(
                "metadataConfiguration",
                "not a member of CreateAgentRuntime (set it with UpdateAgentRuntime)",
            ));
        }
        let prefixed = |field: &str, e: AwsError| {
            if e.fields.len() == 1 && e.fields[0].name == "body" {
                AwsError::field(field, e.fields[0].message.clone())
            } else {
                e
            }
        };
        Ok(Self {
            agent_runtime_name: parse(name).map_err(|e| prefixed("agentRuntimeName", e))?,
            client_token: parse(token).map_err(|e| prefixed("clientToken", e))?,
            tags: parse(tags).map_err(|e| prefixed("tags", e))?,
            spec: parse(Value::Object(body))?,
        })
    }
}

impl UpdateRuntimeRequest {
    pub fn parse(mut body: Map<String, Value>) -> Result<Self, AwsError> {
        let token = take(&mut body, "clientToken");
        let client_token = parse(token).map_err(|e| {
            if e.fields.len() == 1 && e.fields[0].name == "body" {
                AwsError::field("clientToken", e.fields[0].message.clone())
            } else {
                e
            }
        })?;
        Ok(Self {
            client_token,
            spec: parse(Value::Object(body))?,
        })
    }
}

// ---- responses ----

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateRuntimeResponse {
    pub agent_runtime_arn: String,
    pub agent_runtime_id: String,
    pub agent_runtime_version: String,
    pub created_at: String,
    pub status: Status,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateRuntimeResponse {
    pub agent_runtime_arn: String,
    pub agent_runtime_id: String,
    pub agent_runtime_version: String,
    pub created_at: String,
    pub last_updated_at: String,
    pub status: Status,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GetRuntimeResponse {
    pub agent_runtime_arn: String,
    pub agent_runtime_name: String,
    pub agent_runtime_id: String,
    pub agent_runtime_version: String,
    pub created_at: String,
    pub last_updated_at: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Every RuntimeSpec member as stored, `lifecycleConfiguration` with defaults filled.
    #[serde(flatten)]
    pub spec: RuntimeSpec,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteRuntimeResponse {
    pub status: Status,
    /// Optional in the model; always sent (the SDK's delete-and-wait helper reads it).
    pub agent_runtime_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_runtime_version: Option<String>,
}

/// `AgentRuntime`, the item of ListAgentRuntimes and ListAgentRuntimeVersions.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSummary {
    pub agent_runtime_arn: String,
    pub agent_runtime_id: String,
    pub agent_runtime_version: String,
    pub agent_runtime_name: String,
    /// Required by the model: `""` when the version has none.
    pub description: String,
    pub last_updated_at: String,
    pub status: Status,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListRuntimesResponse {
    pub agent_runtimes: Vec<RuntimeSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateEndpointResponse {
    pub target_version: String,
    pub agent_runtime_endpoint_arn: String,
    pub agent_runtime_arn: String,
    pub agent_runtime_id: String,
    pub endpoint_name: String,
    pub status: Status,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GetEndpointResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    pub agent_runtime_endpoint_arn: String,
    pub agent_runtime_arn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub status: Status,
    pub created_at: String,
    pub last_updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    pub name: String,
    pub id: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateEndpointResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    pub agent_runtime_endpoint_arn: String,
    pub agent_runtime_arn: String,
    pub status: Status,
    pub created_at: String,
    pub last_updated_at: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteEndpointResponse {
    pub status: Status,
    pub agent_runtime_id: String,
    pub endpoint_name: String,
}

/// `AgentRuntimeEndpoint`, the item of ListAgentRuntimeEndpoints.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSummary {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    pub agent_runtime_endpoint_arn: String,
    pub agent_runtime_arn: String,
    pub status: Status,
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: String,
    pub last_updated_at: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListEndpointsResponse {
    pub runtime_endpoints: Vec<EndpointSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// Unix milliseconds as ISO-8601 UTC with milliseconds: `2025-01-02T03:04:05.123Z`.
pub fn iso8601(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_are_iso8601_with_millis() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_735_787_045_123), "2025-01-02T03:04:05.123Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn statuses_round_trip() {
        for s in ["CREATING", "CREATE_FAILED", "UPDATING", "READY", "DELETING"] {
            let st = Status::parse(s).unwrap();
            assert_eq!(st.as_str(), s);
            assert_eq!(serde_json::to_value(st).unwrap(), json!(s));
        }
        assert_eq!(Status::parse("ready"), None);
    }

    #[test]
    fn create_splits_its_own_members_from_the_spec() {
        let body = json!({
            "agentRuntimeName": "a",
            "clientToken": "t",
            "tags": {"k": "v"},
            "roleArn": "arn:aws:iam::123456789012:role/r",
            "lifecycleConfiguration": {"maxLifetime": 60},
        });
        let Value::Object(map) = body else { panic!() };
        let req = CreateRuntimeRequest::parse(map).unwrap();
        assert_eq!(req.agent_runtime_name.as_deref(), Some("a"));
        assert_eq!(
            req.spec.lifecycle_configuration.unwrap().max_lifetime,
            Some(60)
        );
    }

    #[test]
    fn wrong_types_and_unknown_members_are_named_by_path() {
        let Value::Object(map) = json!({
            "lifecycleConfiguration": {"idleRuntimeSessionTimeout": "soon"},
        }) else {
            panic!()
        };
        let err = UpdateRuntimeRequest::parse(map).unwrap_err();
        assert_eq!(
            err.fields[0].name,
            "lifecycleConfiguration.idleRuntimeSessionTimeout"
        );
        let Value::Object(map) =
            json!({"protocolConfiguration": {"serverProtocol": "HTTP", "colour": 1}})
        else {
            panic!()
        };
        let err = UpdateRuntimeRequest::parse(map).unwrap_err();
        assert_eq!(err.fields[0].name, "protocolConfiguration.colour");
        let Value::Object(map) = json!({"agentRuntimeName": 3}) else {
            panic!()
        };
        let err = CreateRuntimeRequest::parse(map).unwrap_err();
        assert_eq!(err.fields[0].name, "agentRuntimeName");
        let Value::Object(map) = json!({"metadataConfiguration": {"requireMMDSV2": true}}) else {
            panic!()
        };
        assert!(CreateRuntimeRequest::parse(map).is_err());
    }

    #[test]
    fn unions_serialize_one_key() {
        let fs = FilesystemConfiguration {
            session_storage: Some(SessionStorage {
                mount_path: Some("/mnt/data".into()),
            }),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&fs).unwrap(),
            json!({"sessionStorage": {"mountPath": "/mnt/data"}})
        );
    }
}

//! The constraints of the service model that botocore does not check on the client
//! (S7: `pattern`, `max`, `enum`, integer ranges; and everything for other clients), plus
//! Berth's own limits and the members Berth does not support. Every failure names the
//! member by its wire path (`filesystemConfigurations[0].sessionStorage.mountPath`);
//! all failures of a request are reported together in one `ValidationException`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use regex::Regex;

use super::error::FieldError;
use super::model::{
    AgentRuntimeArtifact, CodeConfiguration, CreateEndpointRequest, CreateRuntimeRequest,
    FilesystemConfiguration, RuntimeSpec, UpdateEndpointRequest, UpdateRuntimeRequest,
};
use super::AwsError;

/// A model `pattern`, matched against the whole value.
pub struct Pattern {
    pub src: &'static str,
    re: LazyLock<Regex>,
}

impl Pattern {
    pub fn matches(&self, value: &str) -> bool {
        self.re.is_match(value)
    }
}

macro_rules! pattern {
    ($name:ident, $src:literal) => {
        pub static $name: Pattern = Pattern {
            src: $src,
            re: LazyLock::new(|| {
                Regex::new(concat!("^(?:", $src, ")$")).expect("model patterns compile")
            }),
        };
    };
}

// Patterns of `CP:shapes.*` (docs/design/agentcore-wire.md §3).
pattern!(NAME, "[a-zA-Z][a-zA-Z0-9_]{0,47}");
pattern!(RUNTIME_ID, "[a-zA-Z][a-zA-Z0-9_]{0,99}-[a-zA-Z0-9]{10}");
pattern!(VERSION, "([1-9][0-9]{0,4})");
pattern!(CLIENT_TOKEN, "[a-zA-Z0-9](-*[a-zA-Z0-9]){0,256}");
pattern!(ROLE_ARN, "arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+");
pattern!(BUCKET, "[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]");
pattern!(TAG, r"[a-zA-Z0-9\s._:/=+@-]*");
pattern!(MOUNT_PATH, "/mnt/[a-zA-Z0-9._-]+/?");
pattern!(
    S3_FILES_ACCESS_POINT,
    "arn:aws[-a-z]*:s3files:[0-9a-z-:]+:file-system/fs-[0-9a-f]{17,40}/access-point/fsap-[0-9a-f]{17,40}"
);
pattern!(
    EFS_ACCESS_POINT,
    "arn:aws[-a-z]*:elasticfilesystem:[0-9a-z-:]+:access-point/fsap-[0-9a-f]{8,40}"
);
pattern!(HEADER_NAME, "[A-Za-z][A-Za-z0-9_-]{0,255}");
pattern!(PROTOCOL_PATH, r"/[A-Za-z0-9\-._~/%]*");
pattern!(PLATFORM_VERSION, r"[^\s]+");
pattern!(NEXT_TOKEN, r"\S*");

pub const RUNTIMES: [&str; 6] = [
    "PYTHON_3_10",
    "PYTHON_3_11",
    "PYTHON_3_12",
    "PYTHON_3_13",
    "PYTHON_3_14",
    "NODE_22",
];
pub const SERVER_PROTOCOLS: [&str; 4] = ["MCP", "HTTP", "A2A", "AGUI"];
pub const NETWORK_MODES: [&str; 2] = ["PUBLIC", "VPC"];

/// `LifecycleConfiguration` bounds, seconds.
pub const LIFECYCLE_MIN_S: i64 = 60;
pub const LIFECYCLE_MAX_S: i64 = 1_209_600;
/// Berth's bound on `resourceConfigurations[0].minimumMemoryInMiB` (the model has none).
pub const MAX_MEMORY_MIB: i64 = 1 << 20;

/// Collects failures; [`Checker::finish`] turns them into one `ValidationException`.
#[derive(Default)]
pub struct Checker {
    fields: Vec<FieldError>,
}

impl Checker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn fail(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.fields.push(FieldError {
            name: path.into(),
            message: message.into(),
        });
    }

    pub fn failed(&self) -> bool {
        !self.fields.is_empty()
    }

    pub fn finish(self) -> Result<(), AwsError> {
        if self.fields.is_empty() {
            Ok(())
        } else {
            Err(AwsError::fields(self.fields))
        }
    }

    /// A required member: `Some` if present, else a failure.
    pub fn required<'a, T>(&mut self, path: &str, value: &'a Option<T>) -> Option<&'a T> {
        if value.is_none() {
            self.fail(path, "Member must not be null");
        }
        value.as_ref()
    }

    /// String length in characters, `min..=max`.
    pub fn len(&mut self, path: &str, value: &str, min: usize, max: usize) -> bool {
        let n = value.chars().count();
        let ok = (min..=max).contains(&n);
        if !ok {
            self.fail(
                path,
                format!("Member must have length between {min} and {max}"),
            );
        }
        ok
    }

    pub fn pattern(&mut self, path: &str, value: &str, pattern: &Pattern) -> bool {
        let ok = pattern.matches(value);
        if !ok {
            self.fail(
                path,
                format!(
                    "Member must satisfy regular expression pattern: {}",
                    pattern.src
                ),
            );
        }
        ok
    }

    /// Length then pattern (the pattern is only checked when the length is right).
    pub fn string(&mut self, path: &str, value: &str, min: usize, max: usize, pattern: &Pattern) {
        if self.len(path, value, min, max) {
            self.pattern(path, value, pattern);
        }
    }

    pub fn one_of(&mut self, path: &str, value: &str, allowed: &[&str]) -> bool {
        let ok = allowed.contains(&value);
        if !ok {
            self.fail(
                path,
                format!(
                    "Member must satisfy enum value set: [{}]",
                    allowed.join(", ")
                ),
            );
        }
        ok
    }

    pub fn range(&mut self, path: &str, value: i64, min: i64, max: i64) -> bool {
        let ok = (min..=max).contains(&value);
        if !ok {
            self.fail(
                path,
                format!("Member must have value between {min} and {max}"),
            );
        }
        ok
    }

    /// Number of list items or map entries, `min..=max`.
    pub fn count(&mut self, path: &str, n: usize, min: usize, max: usize) -> bool {
        let ok = (min..=max).contains(&n);
        if !ok {
            self.fail(
                path,
                format!("Member must have between {min} and {max} items"),
            );
        }
        ok
    }

    /// A union: exactly one of `members` (name, present) must be set.
    pub fn union(&mut self, path: &str, members: &[(&str, bool)]) -> bool {
        let set: Vec<&str> = members.iter().filter(|m| m.1).map(|m| m.0).collect();
        match set.len() {
            1 => true,
            0 => {
                let names: Vec<&str> = members.iter().map(|m| m.0).collect();
                self.fail(
                    path,
                    format!("Member is a union: set exactly one of {}", names.join(", ")),
                );
                false
            }
            _ => {
                self.fail(
                    path,
                    format!(
                        "Member is a union: set exactly one member, not {}",
                        set.join(" and ")
                    ),
                );
                false
            }
        }
    }

    /// A valid member that Berth does not implement.
    pub fn unsupported(&mut self, path: &str, why: &str) {
        self.fail(path, format!("not supported by Berth: {why}"));
    }
}

fn join(path: &str, member: &str) -> String {
    format!("{path}.{member}")
}

pub fn runtime_name(c: &mut Checker, path: &str, value: &str) {
    c.string(path, value, 1, 48, &NAME);
}

pub fn runtime_id(c: &mut Checker, path: &str, value: &str) {
    c.string(path, value, 1, 111, &RUNTIME_ID);
}

pub fn endpoint_name(c: &mut Checker, path: &str, value: &str) {
    c.string(path, value, 1, 48, &NAME);
}

/// A version string; its number when valid.
pub fn version(c: &mut Checker, path: &str, value: &str) -> Option<u32> {
    let before = c.fields.len();
    c.string(path, value, 1, 5, &VERSION);
    if c.fields.len() > before {
        return None;
    }
    value.parse().ok()
}

pub fn client_token(c: &mut Checker, value: Option<&str>) {
    if let Some(t) = value {
        c.string("clientToken", t, 33, 256, &CLIENT_TOKEN);
    }
}

pub fn tags(c: &mut Checker, tags: Option<&BTreeMap<String, String>>) {
    let Some(tags) = tags else { return };
    c.count("tags", tags.len(), 0, 50);
    for (k, v) in tags {
        c.string(&format!("tags.{k}"), k, 1, 128, &TAG);
        if c.len(&format!("tags.{k}"), v, 0, 256) {
            c.pattern(&format!("tags.{k}"), v, &TAG);
        }
    }
}

pub fn max_results(c: &mut Checker, value: Option<&str>) -> usize {
    let Some(raw) = value else { return 100 };
    match raw.parse::<i64>() {
        Ok(n) if c.range("maxResults", n, 1, 100) => usize::try_from(n).unwrap_or(100),
        Ok(_) => 100,
        Err(_) => {
            c.fail("maxResults", "Member must be an integer");
            100
        }
    }
}

pub fn next_token(c: &mut Checker, value: Option<&str>) {
    if let Some(t) = value {
        c.string("nextToken", t, 1, 2048, &NEXT_TOKEN);
    }
}

/// Which operation a [`RuntimeSpec`] came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
}

pub fn create_runtime(c: &mut Checker, req: &CreateRuntimeRequest) {
    if let Some(name) = c.required("agentRuntimeName", &req.agent_runtime_name) {
        runtime_name(c, "agentRuntimeName", name);
    }
    client_token(c, req.client_token.as_deref());
    tags(c, req.tags.as_ref());
    spec(c, &req.spec, Op::Create);
}

pub fn update_runtime(c: &mut Checker, req: &UpdateRuntimeRequest) {
    client_token(c, req.client_token.as_deref());
    spec(c, &req.spec, Op::Update);
}

pub fn create_endpoint(c: &mut Checker, req: &CreateEndpointRequest) {
    if let Some(name) = c.required("name", &req.name) {
        endpoint_name(c, "name", name);
    }
    if let Some(v) = &req.agent_runtime_version {
        version(c, "agentRuntimeVersion", v);
    }
    if let Some(d) = &req.description {
        c.len("description", d, 1, 256);
    }
    client_token(c, req.client_token.as_deref());
    tags(c, req.tags.as_ref());
}

pub fn update_endpoint(c: &mut Checker, req: &UpdateEndpointRequest) {
    if let Some(v) = &req.agent_runtime_version {
        version(c, "agentRuntimeVersion", v);
    }
    if let Some(d) = &req.description {
        c.len("description", d, 1, 256);
    }
    client_token(c, req.client_token.as_deref());
}

/// The RuntimeSpec members shared by Create and Update.
pub fn spec(c: &mut Checker, s: &RuntimeSpec, op: Op) {
    if let Some(a) = c.required("agentRuntimeArtifact", &s.agent_runtime_artifact) {
        artifact(c, "agentRuntimeArtifact", a);
    }
    if let Some(role) = c.required("roleArn", &s.role_arn) {
        c.string("roleArn", role, 1, 2048, &ROLE_ARN);
    }
    if let Some(n) = &s.network_configuration {
        if let Some(mode) = c.required("networkConfiguration.networkMode", &n.network_mode) {
            if c.one_of("networkConfiguration.networkMode", mode, &NETWORK_MODES) && mode == "VPC" {
                c.unsupported(
                    "networkConfiguration.networkMode",
                    "sandboxes are not placed in a VPC; use PUBLIC",
                );
            }
        }
        if n.network_mode_config.is_some() {
            c.unsupported(
                "networkConfiguration.networkModeConfig",
                "VPC subnets and security groups (networkMode VPC) do not exist on a Berth server",
            );
        }
    }
    if let Some(d) = &s.description {
        c.len("description", d, 1, 4096);
    }
    if s.authorizer_configuration.is_some() {
        c.unsupported(
            "authorizerConfiguration",
            "inbound JWT authorization is not implemented; callers authenticate to Berth \
             with its bearer tokens or SigV4 access keys",
        );
    }
    if let Some(h) = &s.request_header_configuration {
        let path = "requestHeaderConfiguration";
        if c.union(
            path,
            &[(
                "requestHeaderAllowlist",
                h.request_header_allowlist.is_some(),
            )],
        ) {
            let list = h.request_header_allowlist.as_deref().unwrap_or_default();
            let lpath = join(path, "requestHeaderAllowlist");
            c.count(&lpath, list.len(), 1, 20);
            for (i, name) in list.iter().enumerate() {
                c.string(&format!("{lpath}[{i}]"), name, 1, 256, &HEADER_NAME);
            }
        }
    }
    if let Some(p) = &s.protocol_configuration {
        if let Some(proto) = c.required("protocolConfiguration.serverProtocol", &p.server_protocol)
        {
            c.one_of(
                "protocolConfiguration.serverProtocol",
                proto,
                &SERVER_PROTOCOLS,
            );
        }
        if let Some(port) = p.port {
            c.range("protocolConfiguration.port", port, 8000, 12000);
        }
        if let Some(path) = &p.path {
            c.string("protocolConfiguration.path", path, 1, 2048, &PROTOCOL_PATH);
        }
    }
    if let Some(l) = &s.lifecycle_configuration {
        let idle_ok = l.idle_runtime_session_timeout.is_none_or(|v| {
            c.range(
                "lifecycleConfiguration.idleRuntimeSessionTimeout",
                v,
                LIFECYCLE_MIN_S,
                LIFECYCLE_MAX_S,
            )
        });
        let max_ok = l.max_lifetime.is_none_or(|v| {
            c.range(
                "lifecycleConfiguration.maxLifetime",
                v,
                LIFECYCLE_MIN_S,
                LIFECYCLE_MAX_S,
            )
        });
        let (idle, max) = super::mapping::lifecycle(s);
        if idle_ok && max_ok && idle > max {
            c.fail(
                "lifecycleConfiguration.idleRuntimeSessionTimeout",
                format!("Member must not exceed maxLifetime ({max} seconds)"),
            );
        }
    }
    if s.hooks_configuration.is_some() {
        c.unsupported(
            "hooksConfiguration",
            "lifecycle hooks (build warmup) are not implemented",
        );
    }
    if let Some(env) = &s.environment_variables {
        c.count("environmentVariables", env.len(), 0, 50);
        for (k, v) in env {
            let path = format!("environmentVariables.{k}");
            c.len(&path, k, 1, 100);
            c.len(&path, v, 0, 5000);
            if k.contains(['=', '\0']) || v.contains('\0') {
                c.fail(&path, "Member must not contain '=' in its name, or NUL");
            }
        }
    }
    if let Some(list) = &s.filesystem_configurations {
        filesystems(c, list);
    }
    if s.capacity_provider_configuration.is_some() {
        c.unsupported(
            "capacityProviderConfiguration",
            "capacity providers are an AWS capacity feature; Berth runs sandboxes on its own host",
        );
    }
    if let Some(v) = &s.platform_version {
        c.string("platformVersion", v, 1, 128, &PLATFORM_VERSION);
    }
    if s.allowed_ports.is_some() {
        c.unsupported(
            "allowedPorts",
            "extra sandbox ports are not exposed through session endpoint URLs",
        );
    }
    if let Some(list) = &s.resource_configurations {
        c.count("resourceConfigurations", list.len(), 0, 1);
        for (i, r) in list.iter().enumerate() {
            let path = format!("resourceConfigurations[{i}].minimumMemoryInMiB");
            if let Some(mib) = c.required(&path, &r.minimum_memory_in_mib) {
                c.range(&path, *mib, 1, MAX_MEMORY_MIB);
            }
        }
    }
    if let Some(m) = &s.metadata_configuration {
        if op == Op::Create {
            c.fail(
                "metadataConfiguration",
                "not a member of CreateAgentRuntime",
            );
        }
        c.required("metadataConfiguration.requireMMDSV2", &m.require_mmdsv2);
    }
}

fn artifact(c: &mut Checker, path: &str, a: &AgentRuntimeArtifact) {
    if !c.union(
        path,
        &[
            (
                "containerConfiguration",
                a.container_configuration.is_some(),
            ),
            ("codeConfiguration", a.code_configuration.is_some()),
        ],
    ) {
        return;
    }
    if let Some(cc) = &a.container_configuration {
        let upath = join(&join(path, "containerConfiguration"), "containerUri");
        if let Some(uri) = c.required(&upath, &cc.container_uri) {
            container_uri(c, &upath, uri);
        }
    }
    if let Some(code) = &a.code_configuration {
        code_configuration(c, &join(path, "codeConfiguration"), code);
    }
}

/// Any OCI image reference, not only the model's ECR pattern (botocore does not check
/// it): Berth pulls from any registry.
fn container_uri(c: &mut Checker, path: &str, uri: &str) {
    if !c.len(path, uri, 1, 1024) {
        return;
    }
    if let Err(e) = berth_oci::parse_reference(uri) {
        c.fail(
            path,
            format!(
                "not an OCI image reference ({e}): expected [REGISTRY[:PORT]/]REPOSITORY[:TAG][@DIGEST], \
                 such as 123456789012.dkr.ecr.us-east-1.amazonaws.com/agent:v1 or 127.0.0.1:5000/agent:v1"
            ),
        );
    }
}

fn code_configuration(c: &mut Checker, path: &str, cc: &CodeConfiguration) {
    if let Some(code) = c.required(&join(path, "code"), &cc.code) {
        let cpath = join(path, "code");
        if c.union(&cpath, &[("s3", code.s3.is_some())]) {
            if let Some(s3) = &code.s3 {
                let spath = join(&cpath, "s3");
                if let Some(b) = c.required(&join(&spath, "bucket"), &s3.bucket) {
                    c.string(&join(&spath, "bucket"), b, 3, 63, &BUCKET);
                }
                if let Some(p) = c.required(&join(&spath, "prefix"), &s3.prefix) {
                    c.len(&join(&spath, "prefix"), p, 1, 1024);
                }
                if let Some(v) = &s3.version_id {
                    if c.len(&join(&spath, "versionId"), v, 3, 1024) {
                        c.unsupported(
                            &join(&spath, "versionId"),
                            "Berth's object store (a local directory per bucket) keeps no object versions",
                        );
                    }
                }
            }
        }
    }
    if let Some(rt) = c.required(&join(path, "runtime"), &cc.runtime) {
        c.one_of(&join(path, "runtime"), rt, &RUNTIMES);
    }
    if let Some(ep) = c.required(&join(path, "entryPoint"), &cc.entry_point) {
        let epath = join(path, "entryPoint");
        c.count(&epath, ep.len(), 1, 2);
        for (i, item) in ep.iter().enumerate() {
            let ipath = format!("{epath}[{i}]");
            if c.len(&ipath, item, 1, 128)
                && (item.starts_with('/')
                    || item.contains('\0')
                    || item.split('/').any(|seg| seg == ".."))
            {
                c.fail(
                    &ipath,
                    "Member must be a relative path inside the code zip (no leading '/', no '..')",
                );
            }
        }
    }
}

/// The mount path without its optional trailing `/`.
pub fn normalized_mount_path(p: &str) -> &str {
    p.strip_suffix('/').unwrap_or(p)
}

fn mount_path(c: &mut Checker, path: &str, value: Option<&String>, used: &mut BTreeSet<String>) {
    let Some(value) = value else {
        c.fail(path, "Member must not be null");
        return;
    };
    if !c.len(path, value, 6, 200) || !c.pattern(path, value, &MOUNT_PATH) {
        return;
    }
    let norm = normalized_mount_path(value);
    if norm == "/mnt/." || norm == "/mnt/.." {
        c.fail(path, "Member must name a directory under /mnt");
        return;
    }
    if !used.insert(norm.to_string()) {
        c.fail(
            path,
            "Member must differ from the other filesystemConfigurations' mount paths",
        );
    }
}

fn filesystems(c: &mut Checker, list: &[FilesystemConfiguration]) {
    c.count("filesystemConfigurations", list.len(), 0, 5);
    let mut used = BTreeSet::new();
    let mut session_storage = 0;
    for (i, fs) in list.iter().enumerate() {
        let path = format!("filesystemConfigurations[{i}]");
        if !c.union(
            &path,
            &[
                ("sessionStorage", fs.session_storage.is_some()),
                ("s3FilesAccessPoint", fs.s3_files_access_point.is_some()),
                ("efsAccessPoint", fs.efs_access_point.is_some()),
                (
                    "capacityProviderVolume",
                    fs.capacity_provider_volume.is_some(),
                ),
            ],
        ) {
            continue;
        }
        if let Some(s) = &fs.session_storage {
            session_storage += 1;
            if session_storage > 1 {
                c.fail(
                    join(&path, "sessionStorage"),
                    "Member may appear once: a session has one workspace",
                );
            }
            mount_path(
                c,
                &format!("{path}.sessionStorage.mountPath"),
                s.mount_path.as_ref(),
                &mut used,
            );
        }
        for (member, ap, pattern, max) in [
            (
                "s3FilesAccessPoint",
                &fs.s3_files_access_point,
                &S3_FILES_ACCESS_POINT,
                256,
            ),
            (
                "efsAccessPoint",
                &fs.efs_access_point,
                &EFS_ACCESS_POINT,
                128,
            ),
        ] {
            let Some(ap) = ap else { continue };
            let apath = format!("{path}.{member}");
            if let Some(arn) = c.required(&join(&apath, "accessPointArn"), &ap.access_point_arn) {
                c.string(&join(&apath, "accessPointArn"), arn, 0, max, pattern);
            }
            mount_path(
                c,
                &join(&apath, "mountPath"),
                ap.mount_path.as_ref(),
                &mut used,
            );
        }
        if fs.capacity_provider_volume.is_some() {
            c.unsupported(
                &join(&path, "capacityProviderVolume"),
                "capacity provider volumes need an AWS capacity provider",
            );
        }
    }
    // Nested mount points would hide one another.
    let paths: Vec<&String> = used.iter().collect();
    for (a, b) in paths.iter().zip(paths.iter().skip(1)) {
        if b.starts_with(&format!("{a}/")) {
            c.fail(
                "filesystemConfigurations",
                format!("mount paths must not be nested: {b} is inside {a}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::agentcore::model::*;
    use serde_json::json;

    /// A valid Create body; tests break one member at a time.
    fn valid() -> serde_json::Value {
        json!({
            "agentRuntimeName": "my_agent",
            "roleArn": "arn:aws:iam::123456789012:role/AgentRole",
            "agentRuntimeArtifact": {"codeConfiguration": {
                "code": {"s3": {"bucket": "agents", "prefix": "a/agent.zip"}},
                "runtime": "PYTHON_3_11",
                "entryPoint": ["main.py"],
            }},
            "clientToken": "0123456789abcdef0123456789abcdef-0",
        })
    }

    fn check(body: serde_json::Value) -> Result<(), AwsError> {
        let serde_json::Value::Object(map) = body else {
            panic!("not an object")
        };
        let req = CreateRuntimeRequest::parse(map)?;
        let mut c = Checker::new();
        create_runtime(&mut c, &req);
        c.finish()
    }

    /// The names of the failed members.
    fn failures(body: serde_json::Value) -> Vec<String> {
        match check(body) {
            Ok(()) => Vec::new(),
            Err(e) => e.fields.into_iter().map(|f| f.name).collect(),
        }
    }

    fn with(path: &[&str], value: serde_json::Value) -> serde_json::Value {
        let mut body = valid();
        let mut at = &mut body;
        for (i, key) in path.iter().enumerate() {
            if i + 1 == path.len() {
                at[*key] = value.clone();
            } else {
                at = &mut at[*key];
            }
        }
        body
    }

    #[test]
    fn every_model_pattern_compiles() {
        for p in [
            &NAME,
            &RUNTIME_ID,
            &VERSION,
            &CLIENT_TOKEN,
            &ROLE_ARN,
            &BUCKET,
            &TAG,
            &MOUNT_PATH,
            &S3_FILES_ACCESS_POINT,
            &EFS_ACCESS_POINT,
            &HEADER_NAME,
            &PROTOCOL_PATH,
            &PLATFORM_VERSION,
            &NEXT_TOKEN,
        ] {
            let _ = p.matches("");
        }
        assert!(check(valid()).is_ok());
    }

    #[test]
    fn required_members() {
        let mut body = valid();
        body.as_object_mut().unwrap().remove("roleArn");
        body.as_object_mut().unwrap().remove("agentRuntimeName");
        assert_eq!(failures(body), ["agentRuntimeName", "roleArn"]);
        let body = with(
            &["agentRuntimeArtifact", "codeConfiguration", "entryPoint"],
            json!(null),
        );
        assert_eq!(
            failures(body),
            ["agentRuntimeArtifact.codeConfiguration.entryPoint"]
        );
    }

    #[test]
    fn patterns() {
        assert_eq!(
            failures(with(&["agentRuntimeName"], json!("9lives"))),
            ["agentRuntimeName"]
        );
        assert_eq!(
            failures(with(&["agentRuntimeName"], json!("has-dash"))),
            ["agentRuntimeName"]
        );
        assert_eq!(
            failures(with(&["roleArn"], json!("arn:aws:iam::123:role/x"))),
            ["roleArn"]
        );
        let bucket = with(
            &[
                "agentRuntimeArtifact",
                "codeConfiguration",
                "code",
                "s3",
                "bucket",
            ],
            json!("Upper_Case"),
        );
        assert_eq!(
            failures(bucket),
            ["agentRuntimeArtifact.codeConfiguration.code.s3.bucket"]
        );
        let err = check(with(&["clientToken"], json!("short"))).unwrap_err();
        assert_eq!(err.fields[0].name, "clientToken");
        assert!(err.fields[0].message.contains("length"));
        let err = check(with(&["clientToken"], json!("_".repeat(40)))).unwrap_err();
        assert!(err.fields[0].message.contains("pattern"));
    }

    #[test]
    fn lengths() {
        assert_eq!(
            failures(with(&["agentRuntimeName"], json!("a".repeat(49)))),
            ["agentRuntimeName"]
        );
        assert_eq!(failures(with(&["description"], json!(""))), ["description"]);
        assert_eq!(
            failures(with(&["description"], json!("d".repeat(4097)))),
            ["description"]
        );
        assert!(failures(with(&["description"], json!("é".repeat(4096)))).is_empty());
        let env: serde_json::Map<String, serde_json::Value> =
            (0..51).map(|i| (format!("K{i}"), json!("v"))).collect();
        assert_eq!(
            failures(with(&["environmentVariables"], json!(env))),
            ["environmentVariables"]
        );
        assert_eq!(
            failures(with(
                &["environmentVariables"],
                json!({"K": "v".repeat(5001)})
            )),
            ["environmentVariables.K"]
        );
    }

    #[test]
    fn enums() {
        let rt = with(
            &["agentRuntimeArtifact", "codeConfiguration", "runtime"],
            json!("PYTHON_2_7"),
        );
        let err = check(rt).unwrap_err();
        assert_eq!(
            err.fields[0].name,
            "agentRuntimeArtifact.codeConfiguration.runtime"
        );
        assert!(err.fields[0].message.contains("NODE_22"));
        assert_eq!(
            failures(with(
                &["protocolConfiguration"],
                json!({"serverProtocol": "GRPC"})
            )),
            ["protocolConfiguration.serverProtocol"]
        );
        assert_eq!(
            failures(with(
                &["networkConfiguration"],
                json!({"networkMode": "PRIVATE"})
            )),
            ["networkConfiguration.networkMode"]
        );
        assert!(failures(with(
            &["networkConfiguration"],
            json!({"networkMode": "PUBLIC"})
        ))
        .is_empty());
    }

    #[test]
    fn integer_ranges() {
        assert_eq!(
            failures(with(
                &["lifecycleConfiguration"],
                json!({"idleRuntimeSessionTimeout": 59})
            )),
            ["lifecycleConfiguration.idleRuntimeSessionTimeout"]
        );
        assert_eq!(
            failures(with(
                &["lifecycleConfiguration"],
                json!({"maxLifetime": 1_209_601})
            )),
            ["lifecycleConfiguration.maxLifetime"]
        );
        // idle must not exceed the lifetime, defaults included (28800).
        assert_eq!(
            failures(with(
                &["lifecycleConfiguration"],
                json!({"idleRuntimeSessionTimeout": 30000})
            )),
            ["lifecycleConfiguration.idleRuntimeSessionTimeout"]
        );
        assert_eq!(
            failures(with(
                &["protocolConfiguration"],
                json!({"serverProtocol": "MCP", "port": 80})
            )),
            ["protocolConfiguration.port"]
        );
        assert_eq!(
            failures(with(
                &["resourceConfigurations"],
                json!([{"minimumMemoryInMiB": 0}])
            )),
            ["resourceConfigurations[0].minimumMemoryInMiB"]
        );
    }

    #[test]
    fn container_uris_are_any_oci_reference() {
        let container = |uri: &str| {
            with(
                &["agentRuntimeArtifact"],
                json!({"containerConfiguration": {"containerUri": uri}}),
            )
        };
        for ok in [
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/agents/echo:v1",
            "public.ecr.aws/x/y:1",
            "127.0.0.1:5000/agents/echo:v1",
            "registry.lan:8443/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "ghcr.io/org/agent",
        ] {
            assert_eq!(failures(container(ok)), Vec::<String>::new(), "{ok}");
        }
        for bad in ["Not A Reference", "repo@sha256:abc", ""] {
            let err = check(container(bad)).unwrap_err();
            assert_eq!(
                err.fields[0].name, "agentRuntimeArtifact.containerConfiguration.containerUri",
                "{bad}"
            );
        }
        let missing = with(
            &["agentRuntimeArtifact"],
            json!({"containerConfiguration": {}}),
        );
        assert_eq!(
            failures(missing),
            ["agentRuntimeArtifact.containerConfiguration.containerUri"]
        );
    }

    #[test]
    fn unions_need_exactly_one_member() {
        let both = with(
            &["agentRuntimeArtifact", "containerConfiguration"],
            json!({"containerUri": "public.ecr.aws/x/y:1"}),
        );
        let err = check(both).unwrap_err();
        assert_eq!(err.fields[0].name, "agentRuntimeArtifact");
        assert!(err.fields[0]
            .message
            .contains("not containerConfiguration and codeConfiguration"));
        assert_eq!(
            failures(with(&["agentRuntimeArtifact"], json!({}))),
            ["agentRuntimeArtifact"]
        );
        assert_eq!(
            failures(with(&["requestHeaderConfiguration"], json!({}))),
            ["requestHeaderConfiguration"]
        );
        assert_eq!(
            failures(with(&["filesystemConfigurations"], json!([{}]))),
            ["filesystemConfigurations[0]"]
        );
    }

    #[test]
    fn list_counts_and_items() {
        let ep = with(
            &["agentRuntimeArtifact", "codeConfiguration", "entryPoint"],
            json!(["a", "b", "c"]),
        );
        assert_eq!(
            failures(ep),
            ["agentRuntimeArtifact.codeConfiguration.entryPoint"]
        );
        let ep = with(
            &["agentRuntimeArtifact", "codeConfiguration", "entryPoint"],
            json!(["../main.py"]),
        );
        assert_eq!(
            failures(ep),
            ["agentRuntimeArtifact.codeConfiguration.entryPoint[0]"]
        );
        assert_eq!(
            failures(with(
                &["requestHeaderConfiguration"],
                json!({"requestHeaderAllowlist": ["X-Ok", "1bad"]})
            )),
            ["requestHeaderConfiguration.requestHeaderAllowlist[1]"]
        );
        assert_eq!(
            failures(with(&["tags"], json!({"k": "bad\u{1}value"}))),
            ["tags.k"]
        );
    }

    #[test]
    fn filesystem_mount_paths() {
        let fs = |v: serde_json::Value| failures(with(&["filesystemConfigurations"], v));
        assert!(fs(json!([{"sessionStorage": {"mountPath": "/mnt/data/"}}])).is_empty());
        assert_eq!(
            fs(json!([{"sessionStorage": {"mountPath": "/data/x"}}])),
            ["filesystemConfigurations[0].sessionStorage.mountPath"]
        );
        assert_eq!(
            fs(json!([{"sessionStorage": {"mountPath": "/mnt/.."}}])),
            ["filesystemConfigurations[0].sessionStorage.mountPath"]
        );
        let efs =
            "arn:aws:elasticfilesystem:us-east-1:123456789012:access-point/fsap-0123456789abcdef0";
        assert_eq!(
            fs(json!([
                {"sessionStorage": {"mountPath": "/mnt/data"}},
                {"efsAccessPoint": {"accessPointArn": efs, "mountPath": "/mnt/data/"}},
            ])),
            ["filesystemConfigurations[1].efsAccessPoint.mountPath"]
        );
        assert_eq!(
            fs(
                json!([{"efsAccessPoint": {"accessPointArn": "arn:aws:s3:::b", "mountPath": "/mnt/x"}}])
            ),
            ["filesystemConfigurations[0].efsAccessPoint.accessPointArn"]
        );
        assert_eq!(
            fs(json!([
                {"sessionStorage": {"mountPath": "/mnt/a"}},
                {"sessionStorage": {"mountPath": "/mnt/b"}},
            ])),
            ["filesystemConfigurations[1].sessionStorage"]
        );
    }

    #[test]
    fn unsupported_members_say_so() {
        for (member, value) in [
            (
                "authorizerConfiguration",
                json!({"customJWTAuthorizer": {"discoveryUrl": "https://x/.well-known/openid-configuration"}}),
            ),
            ("hooksConfiguration", json!({"build": {}})),
            (
                "capacityProviderConfiguration",
                json!({"capacityProviderArn": "x"}),
            ),
            ("allowedPorts", json!([{"port": 8001}])),
        ] {
            let err = check(with(&[member], value)).unwrap_err();
            assert_eq!(err.fields[0].name, member);
            assert!(
                err.fields[0].message.starts_with("not supported by Berth"),
                "{}",
                err.fields[0].message
            );
        }
        let vpc = check(with(
            &["networkConfiguration"],
            json!({"networkMode": "VPC"}),
        ))
        .unwrap_err();
        assert!(vpc.message.contains("not supported by Berth"));
        let version = with(
            &[
                "agentRuntimeArtifact",
                "codeConfiguration",
                "code",
                "s3",
                "versionId",
            ],
            json!("v123"),
        );
        assert_eq!(
            failures(version),
            ["agentRuntimeArtifact.codeConfiguration.code.s3.versionId"]
        );
    }

    #[test]
    fn list_parameters() {
        let mut c = Checker::new();
        assert_eq!(max_results(&mut c, None), 100);
        assert_eq!(max_results(&mut c, Some("7")), 7);
        assert!(!c.failed());
        max_results(&mut c, Some("101"));
        max_results(&mut c, Some("x"));
        next_token(&mut c, Some("has space"));
        let err = c.finish().unwrap_err();
        let names: Vec<&str> = err.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["maxResults", "maxResults", "nextToken"]);
    }

    #[test]
    fn endpoint_requests() {
        let mut c = Checker::new();
        create_endpoint(
            &mut c,
            &CreateEndpointRequest {
                name: Some("prod".into()),
                agent_runtime_version: Some("0".into()),
                description: Some(String::new()),
                ..Default::default()
            },
        );
        let err = c.finish().unwrap_err();
        let names: Vec<&str> = err.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["agentRuntimeVersion", "description"]);
        let mut c = Checker::new();
        assert_eq!(version(&mut c, "v", "12"), Some(12));
        assert_eq!(version(&mut c, "v", "123456"), None);
    }
}

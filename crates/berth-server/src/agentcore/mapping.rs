//! How one AgentCore runtime version becomes one native Berth runtime (the whole
//! mapping, in one place; the table is in `README.md` beside this file).
//!
//! | AgentCore member | native runtime |
//! |---|---|
//! | runtime id + version | name `ac.<agentRuntimeId>.v<N>` |
//! | `lifecycleConfiguration` | `idle_timeout_s` / `max_lifetime_s` (900 / 28800 by default) |
//! | `environmentVariables` | `env` (plus `AWS_REGION`, `AWS_DEFAULT_REGION` unless given) |
//! | `filesystemConfigurations[].sessionStorage.mountPath` | `workspace_path` (default `/mnt/workspace`) |
//! | `filesystemConfigurations[].efsAccessPoint` / `s3FilesAccessPoint` | a read-write `mounts` entry from the operator's `--shared-dir ARN=DIR` |
//! | `resourceConfigurations[0].minimumMemoryInMiB` | `memory`, at least the native default |
//! | `protocolConfiguration`, `requestHeaderConfiguration` | not native: [`protocol`] and [`header_allowlist`] for the data plane |
//! | `containerConfiguration.containerUri` | `image` = the pulled image's cached rootfs, isolation `namespace`; the image's `Env` under `env`; its entrypoint, cmd and working dir: [`agent_command`] |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_api::RuntimeSpec as NativeSpec;
use berth_oci::ImageConfig;

use super::model::{LifecycleConfiguration, RuntimeSpec};
use super::validate::{normalized_mount_path, Checker};

pub const DEFAULT_IDLE_S: u64 = 900;
pub const DEFAULT_MAX_LIFETIME_S: u64 = 28_800;
pub const DEFAULT_WORKSPACE: &str = "/mnt/workspace";

/// The native runtime that serves `version` of AgentCore runtime `runtime_id`. Ids are
/// at most 111 characters of `[a-zA-Z0-9_-]`, so the name always passes
/// `berth_api::validate::id`.
pub fn native_name(runtime_id: &str, version: u32) -> String {
    format!("ac.{runtime_id}.v{version}")
}

/// The runtime id and version a native runtime name serves ([`native_name`] read back),
/// if it is one (runtime ids have no dots).
pub fn parse_native_name(name: &str) -> Option<(&str, u32)> {
    let (runtime_id, version) = name.strip_prefix("ac.")?.split_once(".v")?;
    if runtime_id.is_empty()
        || runtime_id.contains('.')
        || !version.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((runtime_id, version.parse().ok()?))
}

fn secs(v: Option<i64>, default: u64) -> u64 {
    v.and_then(|v| u64::try_from(v).ok()).unwrap_or(default)
}

/// (idle timeout, max lifetime) in seconds, AWS's defaults filled in.
pub fn lifecycle(spec: &RuntimeSpec) -> (u64, u64) {
    let l = spec.lifecycle_configuration.clone().unwrap_or_default();
    (
        secs(l.idle_runtime_session_timeout, DEFAULT_IDLE_S),
        secs(l.max_lifetime, DEFAULT_MAX_LIFETIME_S),
    )
}

/// `lifecycleConfiguration` as GetAgentRuntime reports it (required there): defaults filled.
pub fn lifecycle_echo(spec: &RuntimeSpec) -> LifecycleConfiguration {
    let (idle, max) = lifecycle(spec);
    LifecycleConfiguration {
        idle_runtime_session_timeout: i64::try_from(idle).ok(),
        max_lifetime: i64::try_from(max).ok(),
    }
}

/// `protocolConfiguration.serverProtocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerProtocol {
    Http,
    Mcp,
    A2a,
    /// AG-UI: served like HTTP (`/invocations` on 8080, SSE responses).
    Agui,
}

/// Where the data plane reaches the agent inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    pub server_protocol: ServerProtocol,
    pub port: u16,
    pub path: String,
}

/// The agent's protocol, port and path: HTTP 8080 `/invocations` (also the default),
/// MCP 8000 `/mcp`, A2A 9000 `/`, AGUI 8080 `/invocations`; `port` and `path` override.
pub fn protocol(spec: &RuntimeSpec) -> Protocol {
    let p = spec.protocol_configuration.clone().unwrap_or_default();
    let (server_protocol, port, path) = match p.server_protocol.as_deref() {
        Some("MCP") => (ServerProtocol::Mcp, 8000, "/mcp"),
        Some("A2A") => (ServerProtocol::A2a, 9000, "/"),
        Some("AGUI") => (ServerProtocol::Agui, 8080, "/invocations"),
        _ => (ServerProtocol::Http, 8080, "/invocations"),
    };
    Protocol {
        server_protocol,
        port: p.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(port),
        path: p.path.unwrap_or_else(|| path.to_string()),
    }
}

/// Caller headers the data plane forwards to the agent besides the
/// `X-Amzn-Bedrock-AgentCore-Runtime-Custom-*` ones.
pub fn header_allowlist(spec: &RuntimeSpec) -> Vec<String> {
    spec.request_header_configuration
        .as_ref()
        .and_then(|h| h.request_header_allowlist.clone())
        .unwrap_or_default()
}

/// Where the session's workspace is mounted in the sandbox.
pub fn workspace_path(spec: &RuntimeSpec) -> String {
    spec.filesystem_configurations
        .iter()
        .flatten()
        .find_map(|fs| fs.session_storage.as_ref()?.mount_path.as_deref())
        .map(|p| normalized_mount_path(p).to_string())
        .unwrap_or_else(|| DEFAULT_WORKSPACE.to_string())
}

/// A shared access point: its ARN, its wire path, and the sandbox mount path.
struct SharedMount<'a> {
    arn: &'a str,
    path: String,
    target: &'a str,
}

fn shared_mounts(spec: &RuntimeSpec) -> Vec<SharedMount<'_>> {
    let mut out = Vec::new();
    for (i, fs) in spec.filesystem_configurations.iter().flatten().enumerate() {
        for (member, ap) in [
            ("s3FilesAccessPoint", &fs.s3_files_access_point),
            ("efsAccessPoint", &fs.efs_access_point),
        ] {
            if let Some(ap) = ap {
                if let (Some(arn), Some(target)) = (&ap.access_point_arn, &ap.mount_path) {
                    out.push(SharedMount {
                        arn,
                        path: format!("filesystemConfigurations[{i}].{member}.accessPointArn"),
                        target: normalized_mount_path(target),
                    });
                }
            }
        }
    }
    out
}

/// Every EFS / S3 Files access point must be one the operator configured with
/// `berth server --shared-dir ARN=DIR`.
pub fn check_shared_dirs(c: &mut Checker, spec: &RuntimeSpec, shared: &BTreeMap<String, PathBuf>) {
    for m in shared_mounts(spec) {
        if !shared.contains_key(m.arn) {
            c.fail(
                m.path,
                "no shared directory is configured for this access point on the Berth server \
                 (the operator maps one with `berth server --shared-dir ARN=DIR`)",
            );
        }
    }
}

/// What the mapping needs from the server's configuration.
pub struct Context<'a> {
    pub region: &'a str,
    pub shared_dirs: &'a BTreeMap<String, PathBuf>,
}

/// A container version's pulled image.
#[derive(Debug, Clone, Copy)]
pub struct Image<'a> {
    /// The unpacked rootfs in the server's image cache.
    pub rootfs: &'a Path,
    pub config: &'a ImageConfig,
}

/// The environment of a version's sandboxes: the image's `Env`, then
/// `environmentVariables` over it, then `AWS_REGION` / `AWS_DEFAULT_REGION` = the
/// server's region unless either set them.
pub fn environment(
    region: &str,
    spec: &RuntimeSpec,
    image: Option<&ImageConfig>,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = image
        .into_iter()
        .flat_map(ImageConfig::env_pairs)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some(vars) = &spec.environment_variables {
        env.extend(vars.clone());
    }
    for key in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
        env.entry(key.to_string())
            .or_insert_with(|| region.to_string());
    }
    env
}

/// How to start the agent of a container version: the process the data plane runs in
/// the version's sandbox (as `docker run IMAGE` would, with no arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCommand {
    /// The image's `Entrypoint` followed by its `Cmd`; never empty.
    pub argv: Vec<String>,
    /// The whole environment ([`environment`]). The native runtime's `env` already holds
    /// it, so every process in the sandbox gets it; it is here for process APIs that
    /// take an explicit environment.
    pub env: BTreeMap<String, String>,
    /// The image's `WorkingDir`; `None` means `/`.
    pub cwd: Option<String>,
    /// The image's `User`, for information: Berth runs the agent as the sandbox's root
    /// (uid 0 of its user namespace) whatever the image says.
    pub user: Option<String>,
}

/// The agent command of a container version, or why the image cannot run.
pub fn agent_command(
    region: &str,
    spec: &RuntimeSpec,
    config: &ImageConfig,
) -> Result<AgentCommand, String> {
    let argv = config.argv();
    if argv.is_empty() {
        return Err("the image has neither an Entrypoint nor a Cmd".into());
    }
    Ok(AgentCommand {
        argv,
        env: environment(region, spec, Some(config)),
        cwd: config.working_dir.clone(),
        user: config.user.clone(),
    })
}

/// The native runtime for a validated version (with its pulled image for a container
/// version). Fails (with a failure reason) only when an access point's shared directory
/// is no longer configured.
pub fn native_spec(
    ctx: &Context<'_>,
    runtime_id: &str,
    version: u32,
    spec: &RuntimeSpec,
    image: Option<Image<'_>>,
) -> Result<NativeSpec, String> {
    let mut native = NativeSpec::named(native_name(runtime_id, version));
    let (idle, max) = lifecycle(spec);
    native.idle_timeout_s = idle;
    native.max_lifetime_s = max;
    native.workspace_path = workspace_path(spec);
    native.env = environment(ctx.region, spec, image.map(|i| i.config));
    if let Some(image) = image {
        // A microVM boots a guest image built by `berth image build`, not a directory.
        native.image = image.rootfs.display().to_string();
        native.isolation = berth_api::runtime::Isolation::Namespace;
    }
    for m in shared_mounts(spec) {
        let Some(dir) = ctx.shared_dirs.get(m.arn) else {
            return Err(format!(
                "no shared directory is configured for access point {} any more \
                 (berth server --shared-dir ARN=DIR)",
                m.arn
            ));
        };
        native.mounts.push(berth_api::runtime::Mount {
            source: dir.display().to_string(),
            target: m.target.to_string(),
            read_only: false,
        });
    }
    let min_mib = spec
        .resource_configurations
        .iter()
        .flatten()
        .filter_map(|r| r.minimum_memory_in_mib)
        .filter_map(|m| u64::try_from(m).ok())
        .max();
    if let Some(mib) = min_mib {
        native.memory = native.memory.max(mib << 20);
    }
    Ok(native)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use berth_api::runtime::defaults;
    use serde_json::json;

    const EFS: &str =
        "arn:aws:elasticfilesystem:us-east-1:123456789012:access-point/fsap-0123456789abcdef0";

    fn spec(v: serde_json::Value) -> RuntimeSpec {
        serde_json::from_value(v).unwrap()
    }

    fn shared() -> BTreeMap<String, PathBuf> {
        BTreeMap::from([(EFS.to_string(), PathBuf::from("/srv/skills"))])
    }

    #[test]
    fn native_names_are_valid_native_ids() {
        let id = format!("{}-AbCdE12345", "a".repeat(100));
        let name = native_name(&id, 99999);
        berth_api::validate::id("name", &name).unwrap();
        assert_eq!(native_name("x-0123456789", 2), "ac.x-0123456789.v2");
        assert_eq!(parse_native_name(&name), Some((id.as_str(), 99999)));
        assert_eq!(
            parse_native_name("ac.x-0123456789.v2"),
            Some(("x-0123456789", 2))
        );
        for other in [
            "default",
            "ac.x-0123456789",
            "ac..v2",
            "ac.x-0123456789.v",
            "ac.x-0123456789.v+2",
            "ac.x-0123456789.v2.v3",
            "ac.x.y-0123456789.v2",
            "xac.x-0123456789.v2",
        ] {
            assert_eq!(parse_native_name(other), None, "{other}");
        }
    }

    #[test]
    fn defaults() {
        let shared = shared();
        let ctx = Context {
            region: "eu-west-1",
            shared_dirs: &shared,
        };
        let native = native_spec(&ctx, "a-0123456789", 1, &RuntimeSpec::default(), None).unwrap();
        assert_eq!(native.name, "ac.a-0123456789.v1");
        assert_eq!((native.idle_timeout_s, native.max_lifetime_s), (900, 28800));
        assert_eq!(native.workspace_path, "/mnt/workspace");
        assert_eq!(native.image, "host");
        assert!(native.mounts.is_empty());
        assert_eq!(native.env["AWS_REGION"], "eu-west-1");
        assert_eq!(native.memory, defaults::memory());
        assert_eq!(
            lifecycle_echo(&RuntimeSpec::default()),
            LifecycleConfiguration {
                idle_runtime_session_timeout: Some(900),
                max_lifetime: Some(28800),
            }
        );
    }

    #[test]
    fn every_member_lands_in_the_native_runtime() {
        let shared = shared();
        let ctx = Context {
            region: "us-east-1",
            shared_dirs: &shared,
        };
        let s = spec(json!({
            "lifecycleConfiguration": {"idleRuntimeSessionTimeout": 120, "maxLifetime": 3600},
            "environmentVariables": {"MODEL": "m", "AWS_REGION": "ap-south-1"},
            "filesystemConfigurations": [
                {"sessionStorage": {"mountPath": "/mnt/data/"}},
                {"efsAccessPoint": {"accessPointArn": EFS, "mountPath": "/mnt/skills"}},
            ],
            "resourceConfigurations": [{"minimumMemoryInMiB": 8192}],
        }));
        let native = native_spec(&ctx, "a-0123456789", 3, &s, None).unwrap();
        assert_eq!((native.idle_timeout_s, native.max_lifetime_s), (120, 3600));
        assert_eq!(native.env["MODEL"], "m");
        assert_eq!(native.env["AWS_REGION"], "ap-south-1");
        assert_eq!(native.env["AWS_DEFAULT_REGION"], "us-east-1");
        assert_eq!(native.workspace_path, "/mnt/data");
        assert_eq!(
            native.mounts,
            [berth_api::runtime::Mount {
                source: "/srv/skills".into(),
                target: "/mnt/skills".into(),
                read_only: false,
            }]
        );
        assert_eq!(native.memory, 8192 << 20);
        // A smaller minimum keeps the native default.
        let small = spec(json!({"resourceConfigurations": [{"minimumMemoryInMiB": 64}]}));
        assert_eq!(
            native_spec(&ctx, "a-0123456789", 1, &small, None)
                .unwrap()
                .memory,
            defaults::memory()
        );
    }

    #[test]
    fn unknown_access_points_are_named() {
        let s = spec(json!({"filesystemConfigurations": [
            {"sessionStorage": {"mountPath": "/mnt/data"}},
            {"efsAccessPoint": {"accessPointArn": EFS.replace("0123", "9999"), "mountPath": "/mnt/skills"}},
        ]}));
        let mut c = Checker::new();
        check_shared_dirs(&mut c, &s, &shared());
        let err = c.finish().unwrap_err();
        assert_eq!(
            err.fields[0].name,
            "filesystemConfigurations[1].efsAccessPoint.accessPointArn"
        );
        let empty = BTreeMap::new();
        let ctx = Context {
            region: "us-east-1",
            shared_dirs: &empty,
        };
        assert!(native_spec(&ctx, "a-0123456789", 1, &s, None).is_err());
    }

    #[test]
    fn container_images_become_the_native_image() {
        let shared = shared();
        let ctx = Context {
            region: "us-east-1",
            shared_dirs: &shared,
        };
        let config = ImageConfig {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--port".into(), "8080".into()],
            env: vec![
                "PATH=/usr/local/bin:/usr/bin".into(),
                "MODEL=image".into(),
                "AWS_REGION=eu-central-1".into(),
            ],
            working_dir: Some("/app".into()),
            user: Some("1000".into()),
            exposed_ports: vec!["8080/tcp".into()],
        };
        let s = spec(json!({"environmentVariables": {"MODEL": "request"}}));
        let rootfs = Path::new("/var/lib/berth-oci/sha256-ab/rootfs");
        let image = Image {
            rootfs,
            config: &config,
        };
        let native = native_spec(&ctx, "a-0123456789", 2, &s, Some(image)).unwrap();
        assert_eq!(native.image, "/var/lib/berth-oci/sha256-ab/rootfs");
        assert_eq!(native.isolation, berth_api::runtime::Isolation::Namespace);
        // The request's variables override the image's; the image's region is kept.
        assert_eq!(native.env["MODEL"], "request");
        assert_eq!(native.env["PATH"], "/usr/local/bin:/usr/bin");
        assert_eq!(native.env["AWS_REGION"], "eu-central-1");
        assert_eq!(native.env["AWS_DEFAULT_REGION"], "us-east-1");
        let cmd = agent_command("us-east-1", &s, &config).unwrap();
        assert_eq!(cmd.argv, ["/bin/app", "--port", "8080"]);
        assert_eq!(cmd.env, native.env);
        assert_eq!(cmd.cwd.as_deref(), Some("/app"));
        assert_eq!(cmd.user.as_deref(), Some("1000"));
        let empty = agent_command("us-east-1", &s, &ImageConfig::default()).unwrap_err();
        assert_eq!(empty, "the image has neither an Entrypoint nor a Cmd");
    }

    #[test]
    fn protocols_and_headers() {
        assert_eq!(
            protocol(&RuntimeSpec::default()),
            Protocol {
                server_protocol: ServerProtocol::Http,
                port: 8080,
                path: "/invocations".into()
            }
        );
        let mcp = spec(json!({"protocolConfiguration": {"serverProtocol": "MCP"}}));
        assert_eq!(
            (protocol(&mcp).port, protocol(&mcp).path.as_str()),
            (8000, "/mcp")
        );
        let a2a = spec(json!({"protocolConfiguration": {"serverProtocol": "A2A", "port": 9100}}));
        assert_eq!(
            (protocol(&a2a).port, protocol(&a2a).path.as_str()),
            (9100, "/")
        );
        let custom =
            spec(json!({"protocolConfiguration": {"serverProtocol": "HTTP", "path": "/run"}}));
        assert_eq!(protocol(&custom).path, "/run");
        let h =
            spec(json!({"requestHeaderConfiguration": {"requestHeaderAllowlist": ["X-Tenant"]}}));
        assert_eq!(header_allowlist(&h), ["X-Tenant"]);
        assert!(header_allowlist(&RuntimeSpec::default()).is_empty());
    }
}

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How a runtime's sandboxes are isolated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// The server's default, decided each time a sandbox starts: `microvm` when the
    /// server's KVM really boots guests and a guest image is built (and every mount's
    /// source is a directory: microVMs share directories only), else `namespace`. The operator
    /// can pin it with `berth server --default-isolation`.
    #[default]
    Auto,
    /// Linux namespaces + cgroups + seccomp (youki libcontainer).
    Namespace,
    /// One QEMU `microvm` per session with its own kernel (needs `berth image build`).
    Microvm,
}

impl Isolation {
    pub fn name(self) -> &'static str {
        match self {
            Isolation::Auto => "auto",
            Isolation::Namespace => "namespace",
            Isolation::Microvm => "microvm",
        }
    }
}

/// An extra host directory mounted into every sandbox of a runtime. The sandbox's
/// users act on it as the session's mapped host uids (sandbox root = `--uid-base` +
/// slot × 65536), never as host root. In a microVM it is shared over virtio-fs and must
/// be a directory; a namespace sandbox can also bind a single file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Absolute host path.
    pub source: String,
    /// Absolute path inside the sandbox.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// What a client sends to create a runtime; every field but `name` has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    pub name: String,
    /// `host` (the host's system directories, read-only, secrets masked) or an absolute
    /// path to a root filesystem directory on the server.
    #[serde(default = "defaults::image")]
    pub image: String,
    #[serde(default)]
    pub isolation: Isolation,
    #[serde(default = "defaults::workspace_path")]
    pub workspace_path: String,
    /// Workspace quota in bytes.
    #[serde(default = "defaults::workspace_size")]
    pub workspace_size: u64,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// CPU limit in cores (e.g. 1.5); none = unlimited.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory limit in bytes.
    #[serde(default = "defaults::memory")]
    pub memory: u64,
    /// Maximum number of processes.
    #[serde(default = "defaults::pids")]
    pub pids: u64,
    #[serde(default = "defaults::idle_timeout_s")]
    pub idle_timeout_s: u64,
    #[serde(default = "defaults::max_lifetime_s")]
    pub max_lifetime_s: u64,
}

/// A stored runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Runtime {
    #[serde(flatten)]
    pub spec: RuntimeSpec,
    /// Unix time in milliseconds.
    pub created_at_ms: i64,
}

pub mod defaults {
    pub const IMAGE_HOST: &str = "host";
    pub const MAX_MOUNTS: usize = 5;

    pub fn image() -> String {
        IMAGE_HOST.to_string()
    }
    pub fn workspace_path() -> String {
        "/mnt/workspace".to_string()
    }
    pub fn workspace_size() -> u64 {
        10 << 30
    }
    pub fn memory() -> u64 {
        2 << 30
    }
    pub fn pids() -> u64 {
        1024
    }
    pub fn idle_timeout_s() -> u64 {
        15 * 60
    }
    pub fn max_lifetime_s() -> u64 {
        8 * 3600
    }
}

impl RuntimeSpec {
    /// A spec with every default filled in.
    pub fn named(name: impl Into<String>) -> Self {
        serde_json::from_value(serde_json::json!({ "name": name.into() }))
            .expect("defaults deserialize")
    }
}

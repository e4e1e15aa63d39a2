//! The seam between the lifecycle logic and the isolation backends.
//!
//! `berth-sandbox` implements [`Driver`] for namespace sandboxes (and later microVMs);
//! the core never touches namespaces, mounts or cgroups itself.

use std::path::PathBuf;

use async_trait::async_trait;
use berth_api::RuntimeSpec;
use berth_guest::client::Guest;

/// Everything a driver needs to start a session's sandbox.
#[derive(Debug, Clone)]
pub struct SandboxRequest {
    pub session_id: String,
    pub runtime: RuntimeSpec,
    /// Stable per-session index used to pick the session's host uid/gid range, so
    /// workspace file ownership is the same on every resume.
    pub uid_slot: u32,
}

/// A running sandbox whose guest agent answers.
#[derive(Clone)]
pub struct Sandbox {
    pub guest: Guest,
    /// Host pid of the sandbox's first process (the guest agent).
    pub init_pid: u32,
}

/// Resource use of one sandbox since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxStats {
    pub cpu_ns: u64,
    pub memory_peak_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The runtime's configuration cannot work on this host (bad image dir, mount source
    /// missing…); reported to the client as a 400 naming the field.
    #[error("{field}: {message}")]
    InvalidRuntime {
        field: &'static str,
        message: String,
    },
    #[error("sandbox for session {session} failed to start")]
    Start {
        session: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{op} failed for session {session}")]
    Io {
        op: &'static str,
        session: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Short name shown in logs and `server --info` (`namespace`).
    fn name(&self) -> &'static str;

    /// Check a runtime spec against this host before it is stored (image dir exists,
    /// mount sources exist, …).
    fn validate(&self, runtime: &RuntimeSpec) -> Result<(), DriverError>;

    /// Whether `auto` isolation should pick this driver for `runtime` on this host (a
    /// microVM driver: it can run the runtime, a guest image is built and KVM really
    /// boots it). May probe once.
    async fn preferred(&self, _runtime: &RuntimeSpec) -> bool {
        false
    }

    /// Create (if needed) the session's workspace and start a fresh sandbox on it.
    /// Returns once the guest agent answers `Health`.
    async fn start(&self, req: &SandboxRequest) -> Result<Sandbox, DriverError>;

    /// Reconnect to a sandbox a previous server process left running. `Ok(None)` when
    /// there is none or it is not healthy (anything left of it has then been cleaned up).
    async fn adopt(&self, req: &SandboxRequest) -> Result<Option<Sandbox>, DriverError>;

    /// Whether the sandbox's first process is still alive.
    async fn is_alive(&self, session_id: &str) -> bool;

    /// Why a sandbox that is no longer alive ended, as a `stop_reason` (e.g. a microVM's
    /// `guest_kernel_panic`).
    async fn exit_reason(&self, _session_id: &str) -> &'static str {
        "sandbox_exited"
    }

    /// Stop the sandbox and release everything it held on the host (processes, cgroup,
    /// mounts, loop device, sockets). Idempotent; the workspace image stays.
    async fn stop(&self, session_id: &str) -> Result<(), DriverError>;

    /// Resource use of the running sandbox; `None` when it is not running.
    async fn stats(&self, session_id: &str) -> Option<SandboxStats>;

    /// Bytes used in the session's workspace (works whether or not it is running).
    async fn workspace_bytes(&self, session_id: &str) -> u64;

    /// Delete the session's workspace image. The sandbox must be stopped.
    async fn delete_workspace(&self, session_id: &str) -> Result<(), DriverError>;

    /// Session ids that have host state (a run dir) — used on start to find leftovers.
    async fn leftovers(&self) -> Vec<String>;

    /// Where the session's persistent workspace lives on the host (for docs and logs).
    fn workspace_image(&self, session_id: &str) -> PathBuf;
}

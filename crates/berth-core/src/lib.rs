//! Berth's core: runtimes, sessions, the lifecycle state machine, metering and retention.
//!
//! Knows nothing about HTTP (the server converts) or Linux (the [`Driver`] does that).

mod activity;
mod commands;
pub mod driver;
mod error;
mod files;
mod lifecycle;
mod ports;
mod recordings;
mod runtimes;
mod sessions;
mod shells;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use activity::BusyHold;
pub use commands::{CommandStream, ExecEvent};
pub use driver::{Driver, DriverError, Sandbox, SandboxRequest, SandboxStats};
pub use error::CoreError;
pub use files::{FileInfo, ReadStream};
pub use ports::{PortStream, TunnelKind};
pub use sessions::Core;
pub use shells::{
    NoticeKind, ShellAttached, ShellAttachment, ShellEvent, ShellEvents, ShellInputs,
};

/// Server-wide knobs the core needs.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Most sandboxes running at once; more → `ResourceExhausted`.
    pub max_sandboxes: usize,
    /// Stopped sessions inactive this long lose their workspace and record.
    pub retention: Duration,
    /// How often idle/lifetime/liveness checks run.
    pub tick: Duration,
    /// Most running shells per session (passed to the guest); more → `ResourceExhausted`.
    pub max_shells: usize,
    /// Where shell recordings go (`<logs_dir>/<session>/<shell>.cast`, kept on the host);
    /// `None` = shells are not recorded.
    pub logs_dir: Option<PathBuf>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            max_sandboxes: 64,
            retention: Duration::from_secs(14 * 24 * 3600),
            tick: Duration::from_millis(500),
            max_shells: 10,
            logs_dir: None,
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

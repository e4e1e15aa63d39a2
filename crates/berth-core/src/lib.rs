//! Berth's core: runtimes, sessions, the lifecycle state machine, metering and retention.

pub mod driver;

pub use driver::{Driver, DriverError, Sandbox, SandboxRequest, SandboxStats};

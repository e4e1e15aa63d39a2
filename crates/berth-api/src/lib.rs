//! Berth's native `/v1` API as inert data.
//!
//! Every transport (the axum server, the typed client, the CLI) converts into and out of
//! these types; nothing here performs I/O. Validation rules that belong to the API itself
//! (identifier syntax, limits) live here too so that the server and the CLI agree.

pub mod access_key;
pub mod command;
pub mod error;
pub mod file;
pub mod frames;
pub mod runtime;
pub mod session;
pub mod shell;
pub mod validate;

pub use access_key::{AccessKey, CreateAccessKey, CreatedAccessKey};
pub use command::{CommandEvent, CommandRequest, SignalRequest};
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use file::FileInfo;
pub use runtime::{Isolation, Mount, Runtime, RuntimeSpec};
pub use session::{CreateSession, Session, SessionState, SessionUsage};
pub use shell::{OpenShell, ShellInfo, ShellStatus};

/// Name of the runtime that exists on every fresh server.
pub const DEFAULT_RUNTIME: &str = "default";
/// Header that carries the bearer token.
pub const AUTH_HEADER: &str = "authorization";

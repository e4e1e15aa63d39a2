use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/sessions/{id}/commands`: exactly one of `command` (run by `/bin/sh -c`) or
/// `argv` (run directly).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// Working directory; the runtime's workspace path when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Kill the whole process group after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Text written to the command's stdin, which is then closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Same as `stdin`, base64-encoded, for binary input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    /// Runtime used when this request creates the session; ignored otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

/// One line of the NDJSON stream a command request answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandEvent {
    Started {
        command_id: String,
        session_id: String,
    },
    /// `data` is base64 so that any byte sequence survives.
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    Exit {
        /// Exit status when the process exited normally.
        code: Option<i32>,
        /// Signal number when it was killed by one.
        signal: Option<i32>,
        timed_out: bool,
        duration_ms: u64,
    },
    /// The command could not run to completion for a reason outside the process.
    Error {
        error: crate::ApiError,
    },
}

/// `POST /v1/sessions/{id}/commands/{command_id}/signal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// Signal name (`INT`, `SIGTERM`, …) or number.
    pub signal: String,
}

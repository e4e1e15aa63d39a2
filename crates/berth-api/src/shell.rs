//! Interactive shells: the REST types and the attach protocol.
//!
//! `GET /v1/sessions/{id}/shells/{shell}/attach` upgrades to a WebSocket with the
//! Kubernetes `v5.channel.k8s.io` framing: every binary message starts with a channel
//! byte ([`channel`]) and is at most [`MAX_MESSAGE`] bytes long. The server first sends a
//! [`ShellStatus::attached`] status frame (whose `metadata.offset` is the shell-output
//! offset of the first byte after the snapshot and whose `metadata.snapshotBytes` is the
//! length of the snapshot that follows on channel 1), then live output on channel 1. A
//! client's position is therefore `offset + (channel-1 bytes received − snapshotBytes)`,
//! which is what it passes as `?offset=` to reattach without loss or duplication.
//!
//! Nothing here performs I/O: the server and the CLI both build and parse frames with
//! these functions.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiError;

/// The WebSocket subprotocol the attach route speaks (and echoes back).
pub const SUBPROTOCOL: &str = "v5.channel.k8s.io";
/// Response header of the upgrade naming the shell.
pub const SHELL_ID_HEADER: &str = "x-berth-shell-id";
/// Largest WebSocket message either side sends, channel byte included.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Longest shell id.
pub const MAX_SHELL_ID_LEN: usize = 128;
/// Largest terminal dimension, in cells.
pub const MAX_DIMENSION: u16 = 1000;
/// Content type of `GET …/shells/{shell}/recording`.
pub const RECORDING_CONTENT_TYPE: &str = "application/x-asciicast";

/// Channel numbers (byte 0 of every message).
pub mod channel {
    /// Client → server: keystrokes.
    pub const STDIN: u8 = 0;
    /// Server → client: terminal output (the snapshot first, then live output).
    pub const STDOUT: u8 = 1;
    /// Unused (a PTY merges stderr into stdout); kept for the k8s numbering.
    pub const STDERR: u8 = 2;
    /// Server → client: a JSON [`super::ShellStatus`].
    pub const STATUS: u8 = 3;
    /// Client → server: JSON [`super::ResizeMessage`].
    pub const RESIZE: u8 = 4;
    /// Client → server, echoed back with the same payload.
    pub const HEARTBEAT: u8 = 5;
    /// Client → server: the client is leaving (the shell keeps running).
    pub const CLOSE: u8 = 0xFF;
}

/// `POST /v1/sessions/{id}/shells`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenShell {
    /// Client-chosen id (1–128 characters, none of `?#&/`, no control characters);
    /// generated (`sh-…`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell_id: Option<String>,
    /// argv of the shell process; the runtime's shell (`bash -l`, else `sh -l`) when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Working directory of the shell process, an absolute path in the sandbox (no
    /// `..`); the runtime's workspace path when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Initial size in cells (80 × 24 when absent; 1–1000 each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u16>,
}

/// A shell as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ShellInfo {
    pub shell_id: String,
    /// argv of the shell process.
    pub command: Vec<String>,
    pub width: u16,
    pub height: u16,
    /// Attached read-write clients.
    pub clients: u32,
    /// Attached read-only (`mode=watch`) clients.
    pub watchers: u32,
    pub started_at_ms: i64,
    pub running: bool,
    /// Set once the shell has exited; 128 + N when it was killed by signal N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that killed the shell, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// Shell ids appear in URLs and file names: 1–128 characters, none of `?#&/`, no
/// control characters.
pub fn validate_shell_id(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.chars().count() > MAX_SHELL_ID_LEN {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_SHELL_ID_LEN} characters long"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| matches!(c, '?' | '#' | '&' | '/') || c.is_control())
    {
        return Err(ApiError::invalid(
            field,
            format!("character {c:?} is not allowed (no '?', '#', '&', '/' or control characters)"),
        ));
    }
    Ok(())
}

/// A terminal dimension: 1–1000 cells.
pub fn validate_dimension(field: &str, value: u16) -> Result<(), ApiError> {
    if value == 0 || value > MAX_DIMENSION {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_DIMENSION} cells"),
        ));
    }
    Ok(())
}

impl OpenShell {
    /// Check the fields the server does not pass through unchanged.
    pub fn validate(&self) -> Result<(), ApiError> {
        if let Some(id) = &self.shell_id {
            validate_shell_id("shell_id", id)?;
        }
        if let Some(argv) = &self.command {
            if argv.is_empty() || argv[0].is_empty() {
                return Err(ApiError::invalid(
                    "command",
                    "must hold at least the program to run",
                ));
            }
        }
        if let Some(cwd) = &self.cwd {
            crate::validate::sandbox_path("cwd", cwd)?;
        }
        if let Some(w) = self.width {
            validate_dimension("width", w)?;
        }
        if let Some(h) = self.height {
            validate_dimension("height", h)?;
        }
        Ok(())
    }
}

/// Attach mode: read-write (default) or read-only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    #[default]
    Rw,
    Watch,
}

/// The attach route's query string, as received (every value a string so that a bad
/// one is reported naming its field).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachQuery {
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub offset: Option<String>,
    #[serde(default)]
    pub width: Option<String>,
    #[serde(default)]
    pub height: Option<String>,
}

/// Parsed attach parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachOptions {
    pub mode: AttachMode,
    /// Resume from this output offset (a reconnect); a snapshot when absent.
    pub offset: Option<u64>,
    /// The client's terminal size, applied before the snapshot (read-write only).
    pub width: Option<u16>,
    pub height: Option<u16>,
}

impl AttachQuery {
    pub fn parse(&self) -> Result<AttachOptions, ApiError> {
        let mode = match self.mode.as_deref() {
            None | Some("rw") => AttachMode::Rw,
            Some("watch") => AttachMode::Watch,
            Some(other) => {
                return Err(ApiError::invalid(
                    "mode",
                    format!("{other:?} is not a mode (use watch or rw)"),
                ))
            }
        };
        let offset =
            match self.offset.as_deref() {
                None => None,
                Some(s) => Some(s.parse::<u64>().map_err(|_| {
                    ApiError::invalid("offset", format!("{s:?} is not a byte offset"))
                })?),
            };
        let dim = |field: &str, v: &Option<String>| -> Result<Option<u16>, ApiError> {
            match v.as_deref() {
                None => Ok(None),
                Some(s) => {
                    let n = s.parse::<u16>().map_err(|_| {
                        ApiError::invalid(field, format!("{s:?} is not a number of cells"))
                    })?;
                    validate_dimension(field, n)?;
                    Ok(Some(n))
                }
            }
        };
        Ok(AttachOptions {
            mode,
            offset,
            width: dim("width", &self.width)?,
            height: dim("height", &self.height)?,
        })
    }
}

/// Channel 4 payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResizeMessage {
    pub width: u16,
    pub height: u16,
}

/// A status frame (channel 3): the shape of Kubernetes' `metav1.Status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShellStatus {
    /// Always `Status`.
    pub kind: String,
    /// Always `v1`.
    pub api_version: String,
    pub metadata: StatusMetadata,
    /// `Success` or `Failure`.
    pub status: String,
    /// Why it failed: `Forbidden`, `BadRequest`, `TooSlow`, `NonZeroExitCode`,
    /// `InternalError`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
}

/// Present on the first status frame of an attachment (and `offset` on `TooSlow`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnected: Option<bool>,
    /// Output offset of the first byte after the snapshot (or, on `TooSlow`, the offset
    /// to reattach with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Length of the snapshot that follows on channel 1 (0 when resuming).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusDetails {
    pub causes: Vec<StatusCause>,
}

/// `{"reason":"ExitCode","message":"3"}` or `{"reason":"Signal","message":"9"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusCause {
    pub reason: String,
    pub message: String,
}

/// Reasons a failure status carries.
pub mod reason {
    pub const FORBIDDEN: &str = "Forbidden";
    pub const BAD_REQUEST: &str = "BadRequest";
    pub const TOO_SLOW: &str = "TooSlow";
    pub const NON_ZERO_EXIT_CODE: &str = "NonZeroExitCode";
    pub const INTERNAL_ERROR: &str = "InternalError";
    pub const EXIT_CODE: &str = "ExitCode";
    pub const SIGNAL: &str = "Signal";
}

impl ShellStatus {
    fn new(status: &str) -> Self {
        Self {
            kind: "Status".into(),
            api_version: "v1".into(),
            metadata: StatusMetadata::default(),
            status: status.into(),
            reason: None,
            message: None,
            details: None,
        }
    }

    /// The first frame of an attachment.
    pub fn attached(shell_id: &str, reconnected: bool, offset: u64, snapshot_bytes: u64) -> Self {
        let mut s = Self::new("Success");
        s.metadata = StatusMetadata {
            shell_id: Some(shell_id.into()),
            reconnected: Some(reconnected),
            offset: Some(offset),
            snapshot_bytes: Some(snapshot_bytes),
        };
        s
    }

    /// A failure; whether the attachment continues depends on the reason.
    pub fn failure(reason: &str, message: impl Into<String>) -> Self {
        let mut s = Self::new("Failure");
        s.reason = Some(reason.into());
        s.message = Some(message.into());
        s
    }

    /// The shell exited: `Success` for code 0, else `NonZeroExitCode` with the code (and
    /// the signal, the code then being 128 + N) in `details.causes`.
    pub fn exited(code: Option<i32>, signal: Option<i32>) -> Self {
        let code = exit_code(code, signal);
        if code == 0 && signal.is_none() {
            return Self::new("Success");
        }
        let message = match signal {
            Some(sig) => format!("command terminated by signal {sig}"),
            None => format!("command terminated with non-zero exit code: {code}"),
        };
        let mut s = Self::failure(reason::NON_ZERO_EXIT_CODE, message);
        let mut causes = vec![StatusCause {
            reason: reason::EXIT_CODE.into(),
            message: code.to_string(),
        }];
        if let Some(sig) = signal {
            causes.push(StatusCause {
                reason: reason::SIGNAL.into(),
                message: sig.to_string(),
            });
        }
        s.details = Some(StatusDetails { causes });
        s
    }

    /// The exit code carried in `details.causes` (0 for a `Success` status), if any.
    pub fn exit_code(&self) -> Option<i32> {
        if self.status == "Success" && self.metadata.shell_id.is_none() {
            return Some(0);
        }
        self.details
            .as_ref()?
            .causes
            .iter()
            .find(|c| c.reason == reason::EXIT_CODE)?
            .message
            .parse()
            .ok()
    }
}

/// The exit code a shell reports: its own, or 128 + N when killed by signal N.
pub fn exit_code(code: Option<i32>, signal: Option<i32>) -> i32 {
    match (code, signal) {
        (_, Some(sig)) => 128 + sig,
        (Some(code), None) => code,
        (None, None) => 0,
    }
}

/// A message: the channel byte, then the payload.
pub fn frame(channel: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 1);
    out.push(channel);
    out.extend_from_slice(payload);
    out
}

/// A status message (channel 3).
pub fn status_frame(status: &ShellStatus) -> Vec<u8> {
    frame(
        channel::STATUS,
        &serde_json::to_vec(status).unwrap_or_default(),
    )
}

/// Output bytes as channel-1 messages of at most [`MAX_MESSAGE`] bytes each.
pub fn stdout_frames(data: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    data.chunks(MAX_MESSAGE - 1)
        .map(|chunk| frame(channel::STDOUT, chunk))
}

/// A message from the client, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    Stdin(&'a [u8]),
    Resize(ResizeMessage),
    Heartbeat(&'a [u8]),
    Close,
}

/// Why a client message was rejected. `TooLarge` ends the attachment (close 1009); the
/// others are reported in a `BadRequest` status and the attachment continues.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrameError {
    Empty,
    TooLarge(usize),
    UnknownChannel(u8),
    BadResize(String),
}

impl std::fmt::Display for ClientFrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientFrameError::Empty => write!(f, "empty message ignored: a message starts with a channel byte"),
            ClientFrameError::TooLarge(n) => write!(f, "message of {n} bytes is larger than the limit of {MAX_MESSAGE} bytes"),
            ClientFrameError::UnknownChannel(c) => write!(f, "message on unknown channel {c} ignored (0 stdin, 4 resize, 5 heartbeat, 255 close)"),
            ClientFrameError::BadResize(e) => write!(f, "resize ignored: the payload must be JSON {{\"width\":W,\"height\":H}} with 1 to {MAX_DIMENSION} cells each: {e}"),
        }
    }
}

/// Decode one binary message from the client.
pub fn parse_client_frame(msg: &[u8]) -> Result<ClientFrame<'_>, ClientFrameError> {
    if msg.len() > MAX_MESSAGE {
        return Err(ClientFrameError::TooLarge(msg.len()));
    }
    let (&chan, payload) = msg.split_first().ok_or(ClientFrameError::Empty)?;
    match chan {
        channel::STDIN => Ok(ClientFrame::Stdin(payload)),
        channel::RESIZE => {
            let size: ResizeMessage = serde_json::from_slice(payload)
                .map_err(|e| ClientFrameError::BadResize(e.to_string()))?;
            for (field, v) in [("width", size.width), ("height", size.height)] {
                validate_dimension(field, v).map_err(|e| ClientFrameError::BadResize(e.message))?;
            }
            Ok(ClientFrame::Resize(size))
        }
        channel::HEARTBEAT => Ok(ClientFrame::Heartbeat(payload)),
        channel::CLOSE => Ok(ClientFrame::Close),
        other => Err(ClientFrameError::UnknownChannel(other)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shell_ids() {
        assert!(validate_shell_id("shell_id", "main").is_ok());
        assert!(validate_shell_id("shell_id", "é ok.1").is_ok());
        for bad in ["", "a/b", "a?b", "a#b", "a&b", "a\nb", &"x".repeat(129)] {
            let err = validate_shell_id("shell_id", bad).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("shell_id"), "{bad:?}");
        }
    }

    #[test]
    fn open_shell_cwd_is_an_absolute_sandbox_path() {
        let open = |cwd: &str| OpenShell {
            cwd: Some(cwd.into()),
            ..Default::default()
        };
        assert!(open("/app").validate().is_ok());
        assert!(OpenShell::default().validate().is_ok());
        for bad in ["app", "/a/../b", "/a\0b"] {
            let err = open(bad).validate().unwrap_err();
            assert_eq!(err.field.as_deref(), Some("cwd"), "{bad:?}");
        }
        let parsed: OpenShell = serde_json::from_str(r#"{"cwd":"/srv"}"#).unwrap();
        assert_eq!(parsed.cwd.as_deref(), Some("/srv"));
    }

    #[test]
    fn status_frames_have_the_metav1_shape() {
        let s = ShellStatus::attached("main", true, 42, 0);
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kind":"Status","apiVersion":"v1","metadata":{"shellId":"main","reconnected":true,"offset":42,"snapshotBytes":0},"status":"Success"})
        );
        let v = serde_json::to_value(ShellStatus::exited(Some(0), None)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Success"})
        );
        let s = ShellStatus::exited(None, Some(9));
        assert_eq!(s.exit_code(), Some(137));
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(
            v["details"]["causes"],
            serde_json::json!([{"reason":"ExitCode","message":"137"},{"reason":"Signal","message":"9"}])
        );
        assert_eq!(ShellStatus::exited(Some(3), None).exit_code(), Some(3));
    }

    #[test]
    fn client_frames() {
        assert_eq!(
            parse_client_frame(b"\x00ls").unwrap(),
            ClientFrame::Stdin(b"ls")
        );
        assert_eq!(
            parse_client_frame(b"\x04{\"width\":100,\"height\":30}").unwrap(),
            ClientFrame::Resize(ResizeMessage {
                width: 100,
                height: 30
            })
        );
        assert_eq!(
            parse_client_frame(b"\x05ab").unwrap(),
            ClientFrame::Heartbeat(b"ab")
        );
        assert_eq!(parse_client_frame(b"\xff").unwrap(), ClientFrame::Close);
        assert_eq!(parse_client_frame(b""), Err(ClientFrameError::Empty));
        assert_eq!(
            parse_client_frame(b"\x09x"),
            Err(ClientFrameError::UnknownChannel(9))
        );
        assert!(matches!(
            parse_client_frame(b"\x04{\"width\":0,\"height\":30}"),
            Err(ClientFrameError::BadResize(_))
        ));
        assert!(matches!(
            parse_client_frame(b"\x04nope"),
            Err(ClientFrameError::BadResize(_))
        ));
        let big = vec![0u8; MAX_MESSAGE + 1];
        assert_eq!(
            parse_client_frame(&big),
            Err(ClientFrameError::TooLarge(MAX_MESSAGE + 1))
        );
        let out: Vec<_> = stdout_frames(&vec![7u8; 2 * MAX_MESSAGE]).collect();
        assert!(out.iter().all(|m| m.len() <= MAX_MESSAGE && m[0] == 1));
        assert_eq!(
            out.iter().map(|m| m.len() - 1).sum::<usize>(),
            2 * MAX_MESSAGE
        );
    }

    #[test]
    fn attach_query() {
        let q = AttachQuery {
            mode: Some("watch".into()),
            offset: Some("12".into()),
            ..Default::default()
        };
        let o = q.parse().unwrap();
        assert_eq!(o.mode, AttachMode::Watch);
        assert_eq!(o.offset, Some(12));
        for (q, field) in [
            (
                AttachQuery {
                    mode: Some("x".into()),
                    ..Default::default()
                },
                "mode",
            ),
            (
                AttachQuery {
                    offset: Some("-1".into()),
                    ..Default::default()
                },
                "offset",
            ),
            (
                AttachQuery {
                    width: Some("0".into()),
                    ..Default::default()
                },
                "width",
            ),
            (
                AttachQuery {
                    height: Some("abc".into()),
                    ..Default::default()
                },
                "height",
            ),
        ] {
            assert_eq!(q.parse().unwrap_err().field.as_deref(), Some(field));
        }
    }
}

//! Shell routes: REST for open/list/kill/recording, and the attach WebSocket, which
//! translates `v5.channel.k8s.io` messages (`berth_api::shell`) to and from a core
//! [`ShellAttachment`].
//!
//! The WebSocket itself is [`pump`], shared with AgentCore's shells; [`Native`] is this
//! route's dialect of it (every report a `metav1.Status` on channel 3).

pub(crate) mod pump;

use axum::body::Body;
use axum::extract::ws::{rejection::WebSocketUpgradeRejection, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_api::shell::{
    self, channel, reason, status_frame, AttachQuery, OpenShell, ShellInfo, ShellStatus,
};
use berth_api::ErrorCode;
use berth_core::{CoreError, NoticeKind, ShellAttachment};
use futures::StreamExt;

use crate::extract::{ApiJson, ApiQuery};
use crate::{AppError, AppState};

#[utoipa::path(post, path = "/v1/sessions/{id}/shells", params(("id" = String, Path)), request_body = OpenShell,
    responses((status = 201, body = ShellInfo), (status = 400, body = berth_api::ErrorBody),
              (status = 409, description = "a running shell has this id", body = berth_api::ErrorBody),
              (status = 429, description = "the session runs --max-shells shells already", body = berth_api::ErrorBody)))]
pub(crate) async fn open_shell(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<OpenShell>,
) -> Result<(StatusCode, Json<ShellInfo>), AppError> {
    Ok((
        StatusCode::CREATED,
        Json(s.core.open_shell(&id, req).await?),
    ))
}

/// Running shells and the most recently exited ones (none while the session is stopped).
#[utoipa::path(get, path = "/v1/sessions/{id}/shells", params(("id" = String, Path)),
    responses((status = 200, body = Vec<ShellInfo>), (status = 404, body = berth_api::ErrorBody)))]
pub(crate) async fn list_shells(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<ShellInfo>>, AppError> {
    Ok(Json(s.core.list_shells(&id).await?))
}

/// SIGHUP to the shell's process group, SIGKILL after a grace period; answers once it
/// has exited. Deleting an exited shell forgets it.
#[utoipa::path(delete, path = "/v1/sessions/{id}/shells/{shell}", params(("id" = String, Path), ("shell" = String, Path)),
    responses((status = 204), (status = 404, body = berth_api::ErrorBody)))]
pub(crate) async fn kill_shell(
    State(s): State<AppState>,
    Path((id, shell)): Path<(String, String)>,
) -> Result<StatusCode, AppError> {
    s.core.kill_shell(&id, &shell).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The shell's output with timing, as an asciicast v2 file (plays with `asciinema play`).
/// Recorded by the server, outside the sandbox, so it is there after the session stopped.
#[utoipa::path(get, path = "/v1/sessions/{id}/shells/{shell}/recording", params(("id" = String, Path), ("shell" = String, Path)),
    responses((status = 200, description = "asciicast v2: a JSON header line, then `[seconds, \"o\"|\"r\"|\"m\", data]` lines (output, resize `WxH`, marker noting a gap)", content_type = "application/x-asciicast"),
              (status = 400, body = berth_api::ErrorBody),
              (status = 404, description = "no such session, or no recording of that shell in it", body = berth_api::ErrorBody)))]
pub(crate) async fn shell_recording(
    State(s): State<AppState>,
    Path((id, shell)): Path<(String, String)>,
) -> Result<Response, AppError> {
    let stream = s.core.shell_recording(&id, &shell).await.map_err(|e| {
        // Name the path parameter a 404 is about.
        let field = match &e {
            CoreError::NotFound {
                what: "session", ..
            } => Some("session_id"),
            CoreError::NotFound { .. } => Some("shell_id"),
            _ => None,
        };
        let mut err = AppError::from(e);
        if err.0.field.is_none() {
            err.0.field = field.map(str::to_string);
        }
        err
    })?;
    let body =
        Body::from_stream(stream.map(|r| r.map_err(|e| std::io::Error::other(e.to_string()))));
    Ok((
        [(header::CONTENT_TYPE, shell::RECORDING_CONTENT_TYPE)],
        body,
    )
        .into_response())
}

/// Query of the attach route.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[allow(dead_code)] // documentation only: the route parses `berth_api::shell::AttachQuery`
pub(crate) struct AttachParams {
    /// `rw` (default) or `watch` (read-only: stdin and resizes are refused).
    mode: Option<String>,
    /// Reconnect: the output offset of the first byte not received yet. Output resumes
    /// exactly there if the shell still holds it (256 KiB ring), else a snapshot.
    offset: Option<u64>,
    /// The client's terminal size (1–1000 cells), applied before the screen is drawn.
    width: Option<u16>,
    height: Option<u16>,
}

/// Attach to a shell: upgrades to a WebSocket with subprotocol `v5.channel.k8s.io`
/// (echoed back) and header `X-Berth-Shell-Id`. A missing session or shell is a plain
/// 404 before the upgrade, a bad parameter a 400 naming it.
///
/// Binary messages of at most 64 KiB; byte 0 is the channel: 0 stdin (client → server),
/// 1 stdout (server → client), 2 stderr (unused), 3 status (server → client, a JSON
/// `metav1.Status`), 4 resize (client → server, `{"width":W,"height":H}`), 5 heartbeat
/// (client → server, echoed back with the same payload; counts as activity), 0xFF close
/// (client → server: leaving; the shell keeps running).
///
/// The server first sends `{"kind":"Status","apiVersion":"v1","metadata":{"shellId",
/// "reconnected","offset","snapshotBytes"},"status":"Success"}`, then `snapshotBytes`
/// of screen snapshot on channel 1 (0 when resuming from `offset`), then live output on
/// channel 1: a client's position is `offset + (channel-1 bytes − snapshotBytes)`.
/// Rejected input (a watcher typing, an unknown channel, a malformed resize, an empty
/// message) gets a `Failure` status (`Forbidden` / `BadRequest`) and the attachment
/// continues; a message over 64 KiB gets `BadRequest` and close 1009. A client that falls
/// too far behind gets `TooSlow` (with `metadata.offset` to reattach with) and close
/// 1013. When the shell exits: `Success` for code 0, else `NonZeroExitCode` with
/// `details.causes` `ExitCode` (128 + N for signal N) and `Signal`, then close 1000.
#[utoipa::path(get, path = "/v1/sessions/{id}/shells/{shell}/attach",
    params(("id" = String, Path), ("shell" = String, Path), AttachParams),
    responses((status = 101, description = "switching to the v5.channel.k8s.io WebSocket protocol"),
              (status = 400, body = berth_api::ErrorBody), (status = 404, body = berth_api::ErrorBody)))]
pub(crate) async fn attach_shell(
    State(s): State<AppState>,
    Path((id, shell_id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<AttachQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, AppError> {
    let opts = query.parse()?;
    let attachment = s.core.attach_shell(&id, &shell_id, opts).await?;
    let ws = ws.map_err(|rej| {
        AppError::new(
            ErrorCode::InvalidArgument,
            format!(
                "this route upgrades to a WebSocket (subprotocol {}): {rej}",
                shell::SUBPROTOCOL
            ),
        )
    })?;
    let header_value = HeaderValue::from_bytes(attachment.attached.shell_id.as_bytes()).ok();
    let mut resp = ws
        .protocols([shell::SUBPROTOCOL])
        .max_message_size(pump::TRANSPORT_LIMIT)
        .max_frame_size(pump::TRANSPORT_LIMIT)
        .on_upgrade(move |socket| serve(socket, attachment));
    if let Some(v) = header_value {
        resp.headers_mut().insert(shell::SHELL_ID_HEADER, v);
    }
    Ok(resp)
}

/// The native dialect: every report is a `metav1.Status` on channel 3.
struct Native;

impl pump::Dialect for Native {
    const TOO_SLOW_CLOSE: &'static str = "client too slow; reattach with the offset";
    const FAILED_CLOSE: &'static str = "attachment failed";

    fn rejected(message: String) -> Vec<u8> {
        status_frame(&ShellStatus::failure(reason::BAD_REQUEST, message))
    }

    fn heartbeat(payload: &[u8]) -> Vec<u8> {
        shell::frame(channel::HEARTBEAT, payload)
    }

    fn notice(kind: NoticeKind, message: String) -> Vec<u8> {
        let reason = match kind {
            NoticeKind::Forbidden => reason::FORBIDDEN,
            NoticeKind::BadRequest => reason::BAD_REQUEST,
        };
        status_frame(&ShellStatus::failure(reason, message))
    }

    fn exited(code: Option<i32>, signal: Option<i32>) -> Vec<u8> {
        status_frame(&ShellStatus::exited(code, signal))
    }

    fn too_slow(offset: u64, message: String) -> Vec<u8> {
        let mut st = ShellStatus::failure(reason::TOO_SLOW, message);
        st.metadata.offset = Some(offset);
        status_frame(&st)
    }

    fn failed(message: String) -> Vec<u8> {
        status_frame(&ShellStatus::failure(reason::INTERNAL_ERROR, message))
    }
}

/// Drive one attachment until the shell exits or the client leaves.
async fn serve(socket: WebSocket, attachment: ShellAttachment) {
    let attached = &attachment.attached;
    let first = ShellStatus::attached(
        &attached.shell_id,
        attached.reconnected,
        attached.offset,
        attached.snapshot.as_ref().map_or(0, |s| s.len()) as u64,
    );
    pump::serve::<Native>(
        socket,
        attachment,
        status_frame(&first),
        std::future::pending(),
    )
    .await;
}

//! Shell routes: REST for open/list/kill/recording, and the attach WebSocket, which
//! translates `v5.channel.k8s.io` messages (`berth_api::shell`) to and from a core
//! [`ShellAttachment`].
//!
//! One attachment = two halves. A reader task decodes the client's messages: stdin and
//! resizes go to the guest, heartbeats are echoed (and count as session activity), bad
//! messages are answered with a `BadRequest` status. The writer (the upgrade's own task)
//! forwards guest output and the reader's replies, in order, to the socket. Whoever
//! ends the attachment first (the shell exiting, the client leaving, a fatal frame) ends
//! both; dropping the core's `ShellEvents` detaches from the guest and releases the
//! session's busy guard.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{
    rejection::WebSocketUpgradeRejection, CloseFrame, Message, WebSocket, WebSocketUpgrade,
};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_api::shell::{
    self, channel, parse_client_frame, reason, status_frame, stdout_frames, AttachQuery,
    ClientFrame, ClientFrameError, OpenShell, ShellInfo, ShellStatus,
};
use berth_api::ErrorCode;
use berth_core::{CoreError, NoticeKind, ShellAttachment, ShellEvent, ShellInputs};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::extract::{ApiJson, ApiQuery};
use crate::{AppError, AppState};

/// What the transport accepts before our own 64 KiB rule: a message between the two
/// limits is answered with a `BadRequest` status and close 1009; a larger one fails in
/// the WebSocket layer and gets the same close without reading it whole.
const TRANSPORT_LIMIT: usize = 1 << 20;
/// How long to wait for the client to answer our close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

const CLOSE_NORMAL: u16 = 1000;
const CLOSE_INTERNAL: u16 = 1011;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_TRY_AGAIN: u16 = 1013;

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
        .max_message_size(TRANSPORT_LIMIT)
        .max_frame_size(TRANSPORT_LIMIT)
        .on_upgrade(move |socket| serve(socket, attachment));
    if let Some(v) = header_value {
        resp.headers_mut().insert(shell::SHELL_ID_HEADER, v);
    }
    Ok(resp)
}

/// What the reader asks the writer to do.
enum Ctl {
    Send(Vec<u8>),
    Close(u16, String),
}

type Sink = SplitSink<WebSocket, Message>;

async fn send(sink: &mut Sink, msg: Vec<u8>) -> bool {
    sink.send(Message::Binary(Bytes::from(msg))).await.is_ok()
}

async fn close(sink: &mut Sink, code: u16, why: String) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: why.into(),
        })))
        .await;
}

/// Drive one attachment until the shell exits or the client leaves.
async fn serve(socket: WebSocket, attachment: ShellAttachment) {
    let ShellAttachment {
        attached,
        inputs,
        mut events,
    } = attachment;
    let (mut sink, stream) = socket.split();
    let snapshot = attached.snapshot.unwrap_or_default();
    let first = ShellStatus::attached(
        &attached.shell_id,
        attached.reconnected,
        attached.offset,
        snapshot.len() as u64,
    );
    let mut ok = send(&mut sink, status_frame(&first)).await;
    for msg in stdout_frames(&snapshot) {
        ok = ok && send(&mut sink, msg).await;
    }
    if !ok {
        return;
    }

    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Ctl>(16);
    let mut reader = tokio::spawn(read_client(stream, inputs, ctl_tx));
    let mut closed_by_us = false;
    loop {
        tokio::select! {
            biased;
            ctl = ctl_rx.recv() => match ctl {
                Some(Ctl::Send(msg)) => {
                    if !send(&mut sink, msg).await {
                        break;
                    }
                }
                Some(Ctl::Close(code, why)) => {
                    close(&mut sink, code, why).await;
                    closed_by_us = true;
                    break;
                }
                // The client went away.
                None => break,
            },
            event = events.next() => {
                let Some(event) = event else { break };
                let (status, close_with) = match event {
                    ShellEvent::Output { data, .. } => {
                        let mut ok = true;
                        for msg in stdout_frames(&data) {
                            ok = ok && send(&mut sink, msg).await;
                        }
                        if !ok {
                            break;
                        }
                        continue;
                    }
                    ShellEvent::Notice { kind, message } => {
                        let reason = match kind {
                            NoticeKind::Forbidden => reason::FORBIDDEN,
                            NoticeKind::BadRequest => reason::BAD_REQUEST,
                        };
                        (ShellStatus::failure(reason, message), None)
                    }
                    ShellEvent::Exited { code, signal } => (
                        ShellStatus::exited(code, signal),
                        Some((CLOSE_NORMAL, "shell exited")),
                    ),
                    ShellEvent::TooSlow { offset, message } => {
                        let mut st = ShellStatus::failure(reason::TOO_SLOW, message);
                        st.metadata.offset = Some(offset);
                        (st, Some((CLOSE_TRY_AGAIN, "client too slow; reattach with the offset")))
                    }
                    ShellEvent::Failed(err) => (
                        ShellStatus::failure(reason::INTERNAL_ERROR, err.message),
                        Some((CLOSE_INTERNAL, "attachment failed")),
                    ),
                };
                if !send(&mut sink, status_frame(&status)).await {
                    break;
                }
                if let Some((code, why)) = close_with {
                    close(&mut sink, code, why.to_string()).await;
                    closed_by_us = true;
                    break;
                }
            }
        }
    }
    // Detach from the guest (and release the busy guard) now, not after the close grace.
    drop(events);
    if closed_by_us {
        // Let the client answer the close so the handshake completes.
        let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
    }
    reader.abort();
}

/// Decode the client's messages until it closes or goes away.
async fn read_client(
    mut stream: SplitStream<WebSocket>,
    inputs: ShellInputs,
    ctl: mpsc::Sender<Ctl>,
) {
    let bad = |message: String| {
        Ctl::Send(status_frame(&ShellStatus::failure(
            reason::BAD_REQUEST,
            message,
        )))
    };
    // After asking the writer to close, only wait for the client's close.
    let mut closing = false;
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(msg) => msg,
            Err(err) => {
                if !closing {
                    // Most likely a message over the transport limit.
                    let why = format!("message rejected: {err}");
                    let _ = ctl.send(bad(why)).await;
                    let _ = ctl
                        .send(Ctl::Close(CLOSE_TOO_BIG, "message too big".into()))
                        .await;
                }
                break;
            }
        };
        if closing {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        }
        let reply = match msg {
            Message::Binary(data) => match parse_client_frame(&data) {
                Ok(ClientFrame::Stdin(_)) => {
                    // A send fails only once the shell's attachment is over; the writer
                    // reports why.
                    let _ = inputs.stdin(data.slice(1..)).await;
                    None
                }
                Ok(ClientFrame::Resize(size)) => {
                    let _ = inputs.resize(size.width, size.height).await;
                    None
                }
                Ok(ClientFrame::Heartbeat(payload)) => {
                    inputs.heartbeat();
                    Some(Ctl::Send(shell::frame(channel::HEARTBEAT, payload)))
                }
                Ok(ClientFrame::Close) => {
                    closing = true;
                    Some(Ctl::Close(CLOSE_NORMAL, "detached".into()))
                }
                Err(err @ ClientFrameError::TooLarge(_)) => {
                    closing = true;
                    let _ = ctl.send(bad(err.to_string())).await;
                    Some(Ctl::Close(CLOSE_TOO_BIG, "message too big".into()))
                }
                Err(err) => Some(bad(err.to_string())),
            },
            Message::Text(_) => Some(bad(
                "text message ignored: this protocol uses binary messages whose first byte is the channel"
                    .into(),
            )),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => None,
        };
        if let Some(reply) = reply {
            if ctl.send(reply).await.is_err() {
                break;
            }
        }
    }
}

//! The port route: a WebSocket carrying one TCP connection to a port on the loopback of
//! a session's sandbox (a core [`PortStream`]), for operators (`berth port-forward`) and
//! for debugging what an agent serves inside its sandbox.
//!
//! Framing, both ways: a non-empty binary message is bytes of the connection; an empty
//! binary message is the end of that direction (TCP half-close). The client's empty
//! message shuts the connection down for writing; the server's says the sandbox's server
//! closed its side. Once both directions have ended the server closes the WebSocket
//! with 1000. A client closing the WebSocket (or going away) closes the connection at
//! once. There is no other framing: the bytes are the connection's, unchanged.
//!
//! One attachment = two halves, as in `shells.rs`: a reader task writes the client's
//! messages to the tunnel (waiting for it, which is the backpressure towards the
//! client), while this task forwards the tunnel's output to the socket. Either can end
//! the connection; whatever reason the server has is the close frame's.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{
    rejection::WebSocketUpgradeRejection, CloseFrame, Message, WebSocket, WebSocketUpgrade,
};
use axum::extract::{Path, State};
use axum::response::Response;
use berth_api::{ApiError, ErrorCode};
use berth_core::PortStream;
use bytes::{BufMut, BytesMut};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use crate::{AppError, AppState};

/// Largest message accepted from a client; larger ones close the WebSocket with 1009.
const TRANSPORT_LIMIT: usize = 1 << 20;
/// Largest message sent to a client.
const CHUNK: usize = 64 * 1024;
/// How long to wait for the client to answer our close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

const CLOSE_NORMAL: u16 = 1000;
const CLOSE_UNSUPPORTED: u16 = 1003;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_INTERNAL: u16 = 1011;

/// Connect to TCP port `port` on the loopback of the session's sandbox: upgrades to a
/// WebSocket whose binary messages carry the connection's bytes, both ways. An empty
/// binary message ends one direction: from the client, the connection is shut down for
/// writing (the server in the sandbox reads EOF); from the server, the server in the
/// sandbox closed its side. When both directions have ended the server closes the
/// WebSocket with 1000; a reset connection is close 1011 with the reason, a text
/// message 1003, data after the client's empty message 1008, a message over 1 MiB
/// 1009. Closing the WebSocket closes the connection. Messages to the client are at most
/// 64 KiB. An open connection keeps the session from idling out.
///
/// The session must be running (this route never starts it): a stopped session is 409.
/// Nothing listening on the port is 503 `unavailable` (retry while the server in the
/// sandbox starts). All errors come before the upgrade, as JSON. Needs the admin token.
#[utoipa::path(get, path = "/v1/sessions/{id}/ports/{port}",
    params(("id" = String, Path), ("port" = u16, Path, description = "TCP port on the sandbox's 127.0.0.1 (1–65535)")),
    responses((status = 101, description = "switching to a WebSocket carrying the connection's bytes in binary messages"),
              (status = 400, description = "not a port number, or not a WebSocket request", body = berth_api::ErrorBody),
              (status = 404, body = berth_api::ErrorBody),
              (status = 409, description = "the session is not running", body = berth_api::ErrorBody),
              (status = 503, description = "nothing listens on the port in the sandbox", body = berth_api::ErrorBody)))]
pub(crate) async fn connect_port(
    State(s): State<AppState>,
    Path((id, port)): Path<(String, String)>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, AppError> {
    let port = parse_port(&port)?;
    // Checked before dialing: the server in the sandbox sees no connection for a request
    // that cannot carry one.
    let ws = ws.map_err(|rej| {
        AppError::new(
            ErrorCode::InvalidArgument,
            format!("this route upgrades to a WebSocket carrying the connection's bytes: {rej}"),
        )
    })?;
    let stream = s.core.connect_port(&id, port).await?;
    Ok(ws
        .max_message_size(TRANSPORT_LIMIT)
        .max_frame_size(TRANSPORT_LIMIT)
        .on_upgrade(move |socket| serve(socket, stream)))
}

fn parse_port(port: &str) -> Result<u16, AppError> {
    port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
        AppError(ApiError::invalid(
            "port",
            format!("{port:?} is not a TCP port (1–65535)"),
        ))
    })
}

/// What the reader reports.
enum Up {
    /// The client's empty message: the connection is shut down for writing.
    Eof,
    /// Writing to the tunnel failed; the output side reports why unless it has ended.
    WriteFailed(String),
    /// A message the protocol does not allow: close with this code and reason.
    Invalid(u16, String),
    /// The client closed the WebSocket or went away.
    Closed,
}

/// How forwarding the tunnel's output ended.
enum Down {
    /// The server in the sandbox closed its side; the client was told.
    Eof,
    /// The connection failed (reset, the sandbox stopped).
    Failed(String),
    /// The client is gone.
    ClientGone,
}

type Sink = SplitSink<WebSocket, Message>;

/// Drive one connection until both directions have ended, it fails, or the client leaves.
async fn serve(socket: WebSocket, stream: PortStream) {
    let label = format!("{}:{}", stream.session_id(), stream.port());
    let (mut sink, source) = socket.split();
    let (mut output, input) = tokio::io::split(stream);
    let (up_tx, mut up_rx) = mpsc::channel(2);
    let mut reader = tokio::spawn(read_client(source, input, up_tx));
    let (mut client_eof, mut server_eof) = (false, false);
    let close = {
        let down = forward_output(&mut output, &mut sink);
        tokio::pin!(down);
        loop {
            tokio::select! {
                end = &mut down, if !server_eof => match end {
                    Down::Eof => {
                        server_eof = true;
                        if client_eof {
                            break Some((CLOSE_NORMAL, "connection closed".to_string()));
                        }
                    }
                    Down::Failed(message) => break Some((CLOSE_INTERNAL, message)),
                    Down::ClientGone => break None,
                },
                up = up_rx.recv() => match up {
                    Some(Up::Eof) => {
                        client_eof = true;
                        if server_eof {
                            break Some((CLOSE_NORMAL, "connection closed".to_string()));
                        }
                    }
                    // While the output runs, it fails too and says why.
                    Some(Up::WriteFailed(message)) if server_eof => {
                        break Some((CLOSE_INTERNAL, message))
                    }
                    Some(Up::WriteFailed(_)) => {}
                    Some(Up::Invalid(code, message)) => break Some((code, message)),
                    Some(Up::Closed) | None => break None,
                },
            }
        }
    };
    // Close the tunnel now (the reader has dropped its half, or drops it when aborted),
    // not after the close handshake.
    drop(output);
    if let Some((code, reason)) = close {
        tracing::debug!(port = %label, code, %reason, "closing port connection");
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: close_reason(reason).into(),
            })))
            .await;
        // Let the client answer the close so that the handshake completes.
        let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
    }
    reader.abort();
}

/// A close frame's reason is at most 123 bytes.
fn close_reason(mut reason: String) -> String {
    if reason.len() > 123 {
        let mut end = 120;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

/// Tunnel → client, in messages of at most `CHUNK`; an empty message at EOF.
async fn forward_output(output: &mut ReadHalf<PortStream>, sink: &mut Sink) -> Down {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(CHUNK);
        let read = output.read_buf(&mut (&mut buf).limit(CHUNK)).await;
        let msg = match read {
            Ok(0) => Bytes::new(),
            Ok(_) => buf.split().freeze(),
            Err(err) => return Down::Failed(err.to_string()),
        };
        let eof = msg.is_empty();
        if sink.send(Message::Binary(msg)).await.is_err() {
            return Down::ClientGone;
        }
        if eof {
            return Down::Eof;
        }
    }
}

/// Client → tunnel, until the client closes or goes away. After a protocol error the
/// tunnel half is dropped and only the client's close is awaited.
async fn read_client(
    mut source: SplitStream<WebSocket>,
    input: WriteHalf<PortStream>,
    up: mpsc::Sender<Up>,
) {
    let mut input = Some(input);
    let mut ended = false;
    while let Some(msg) = source.next().await {
        let event = match msg {
            // Most likely a message over the transport limit.
            Err(err) => Some(Up::Invalid(
                CLOSE_TOO_BIG,
                format!("message rejected: {err}"),
            )),
            Ok(Message::Binary(data)) if data.is_empty() => match input.as_mut() {
                Some(tunnel) if !ended => {
                    ended = true;
                    let _ = tunnel.shutdown().await;
                    Some(Up::Eof)
                }
                _ => None,
            },
            Ok(Message::Binary(_)) if ended => Some(Up::Invalid(
                CLOSE_POLICY,
                "data after the end of input (an empty binary message)".to_string(),
            )),
            Ok(Message::Binary(data)) => match input.as_mut() {
                Some(tunnel) => match tunnel.write_all(&data).await {
                    Ok(()) => None,
                    Err(err) => {
                        input = None;
                        Some(Up::WriteFailed(err.to_string()))
                    }
                },
                // Writing failed before: drop the rest.
                None => None,
            },
            Ok(Message::Text(_)) => Some(Up::Invalid(
                CLOSE_UNSUPPORTED,
                "text message: this WebSocket carries bytes in binary messages".to_string(),
            )),
            Ok(Message::Close(_)) => break,
            Ok(Message::Ping(_) | Message::Pong(_)) => None,
        };
        if let Some(event) = event {
            if matches!(event, Up::Invalid(..)) {
                input = None;
            }
            // After the writer is done, keep reading for the client's close.
            let _ = up.send(event).await;
        }
    }
    let _ = up.send(Up::Closed).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ports_are_parsed_strictly() {
        assert_eq!(parse_port("8080").unwrap(), 8080);
        assert_eq!(parse_port("65535").unwrap(), 65535);
        for bad in ["0", "65536", "-1", "http", "", "80a", " 80"] {
            let err = parse_port(bad).unwrap_err().0;
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{bad:?}");
            assert_eq!(err.field.as_deref(), Some("port"), "{bad:?}");
        }
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        assert_eq!(close_reason("short".into()), "short");
        let long = close_reason("é".repeat(100));
        assert!(long.len() <= 123, "{}", long.len());
        assert!(long.ends_with('…'));
    }
}

//! The attach WebSocket pump shared by native shells ([`super`]) and AgentCore's
//! (`crate::agentcore::data::shells`): both speak the `v5.channel.k8s.io` framing and
//! differ only in what they say, which a [`Dialect`] describes.
//!
//! One attachment = two halves. A reader task decodes the client's messages: stdin and
//! resizes go to the guest, heartbeats are echoed (and count as session activity), bad
//! messages are answered with the dialect's rejection. The writer (the upgrade's own
//! task) forwards guest output and the reader's replies, in order, to the socket.
//! Whoever ends the attachment first (the shell exiting, the client leaving, a fatal
//! frame, a kick) ends both; dropping the core's `ShellEvents` detaches from the guest
//! and releases the session's busy guard.

use std::future::Future;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use berth_api::shell::{parse_client_frame, stdout_frames, ClientFrame, ClientFrameError};
use berth_core::{NoticeKind, ShellAttachment, ShellEvent, ShellInputs};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;

/// What the transport accepts before the protocol's own 64 KiB rule: a message between
/// the two limits is rejected with close 1009; a larger one fails in the WebSocket
/// layer and gets the same close without reading it whole.
pub(crate) const TRANSPORT_LIMIT: usize = 1 << 20;
/// How long to wait for the client to answer our close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

pub(crate) const CLOSE_NORMAL: u16 = 1000;
pub(crate) const CLOSE_TOO_BIG: u16 = 1009;
pub(crate) const CLOSE_INTERNAL: u16 = 1011;
pub(crate) const CLOSE_TRY_AGAIN: u16 = 1013;

/// A close frame's code and reason.
pub(crate) type Close = (u16, &'static str);

const TOO_BIG: Close = (CLOSE_TOO_BIG, "message too big");

/// How one flavour of the protocol words what the pump reports. Output is channel 1 in
/// both; the rest is the dialect's.
pub(crate) trait Dialect: Send + Sync + 'static {
    /// The close reason after [`Dialect::too_slow`] (code 1013).
    const TOO_SLOW_CLOSE: &'static str;
    /// The close reason after [`Dialect::failed`] (code 1011).
    const FAILED_CLOSE: &'static str;

    /// A client message refused: the attachment goes on (or closes 1009 if too big).
    fn rejected(message: String) -> Vec<u8>;
    /// The echo of a client heartbeat with this payload.
    fn heartbeat(payload: &[u8]) -> Vec<u8>;
    /// The core refused the client's input; the attachment goes on.
    fn notice(kind: NoticeKind, message: String) -> Vec<u8>;
    /// The shell exited; close 1000 follows.
    fn exited(code: Option<i32>, signal: Option<i32>) -> Vec<u8>;
    /// The client fell behind; close 1013 follows.
    fn too_slow(offset: u64, message: String) -> Vec<u8>;
    /// The attachment failed; close 1011 follows.
    fn failed(message: String) -> Vec<u8>;
}

/// What the reader asks the writer to do.
enum Ctl {
    Send(Vec<u8>),
    Close(Close),
}

type Sink = SplitSink<WebSocket, Message>;

async fn send(sink: &mut Sink, msg: Vec<u8>) -> bool {
    sink.send(Message::Binary(Bytes::from(msg))).await.is_ok()
}

/// `data` on channel 1, in messages of the protocol's size.
async fn send_stdout(sink: &mut Sink, data: &[u8]) -> bool {
    for msg in stdout_frames(data) {
        if !send(sink, msg).await {
            return false;
        }
    }
    true
}

async fn close(sink: &mut Sink, (code, why): Close) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: why.into(),
        })))
        .await;
}

/// Drive one attachment until the shell exits, the client leaves, or `kick` resolves
/// (with the close to send; `std::future::pending()` for none). `first` is sent before
/// the attachment's snapshot.
pub(crate) async fn serve<D: Dialect>(
    socket: WebSocket,
    attachment: ShellAttachment,
    first: Vec<u8>,
    kick: impl Future<Output = Close>,
) {
    let ShellAttachment {
        attached,
        inputs,
        mut events,
    } = attachment;
    let (mut sink, stream) = socket.split();
    let ok = send(&mut sink, first).await;
    // A screen snapshot, when the guest no longer holds the output asked for; otherwise
    // the replay comes as output events.
    if !(ok && send_stdout(&mut sink, attached.snapshot.as_deref().unwrap_or_default()).await) {
        return;
    }

    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Ctl>(16);
    let mut reader = tokio::spawn(read_client::<D>(stream, inputs, ctl_tx));
    tokio::pin!(kick);
    let mut closed_by_us = false;
    loop {
        tokio::select! {
            biased;
            why = &mut kick => {
                close(&mut sink, why).await;
                closed_by_us = true;
                break;
            }
            ctl = ctl_rx.recv() => match ctl {
                Some(Ctl::Send(msg)) => {
                    if !send(&mut sink, msg).await {
                        break;
                    }
                }
                Some(Ctl::Close(why)) => {
                    close(&mut sink, why).await;
                    closed_by_us = true;
                    break;
                }
                // The client went away.
                None => break,
            },
            event = events.next() => {
                let Some(event) = event else { break };
                let (msg, close_with) = match event {
                    ShellEvent::Output { data, .. } => {
                        if !send_stdout(&mut sink, &data).await {
                            break;
                        }
                        continue;
                    }
                    ShellEvent::Notice { kind, message } => (D::notice(kind, message), None),
                    ShellEvent::Exited { code, signal } => {
                        (D::exited(code, signal), Some((CLOSE_NORMAL, "shell exited")))
                    }
                    ShellEvent::TooSlow { offset, message } => (
                        D::too_slow(offset, message),
                        Some((CLOSE_TRY_AGAIN, D::TOO_SLOW_CLOSE)),
                    ),
                    ShellEvent::Failed(err) => (
                        D::failed(err.message),
                        Some((CLOSE_INTERNAL, D::FAILED_CLOSE)),
                    ),
                };
                if !send(&mut sink, msg).await {
                    break;
                }
                if let Some(why) = close_with {
                    close(&mut sink, why).await;
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
async fn read_client<D: Dialect>(
    mut stream: SplitStream<WebSocket>,
    inputs: ShellInputs,
    ctl: mpsc::Sender<Ctl>,
) {
    // After asking the writer to close, only wait for the client's close.
    let mut closing = false;
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(msg) => msg,
            Err(err) => {
                if !closing {
                    // Most likely a message over the transport limit.
                    let why = format!("message rejected: {err}");
                    let _ = ctl.send(Ctl::Send(D::rejected(why))).await;
                    let _ = ctl.send(Ctl::Close(TOO_BIG)).await;
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
                    Some(Ctl::Send(D::heartbeat(payload)))
                }
                Ok(ClientFrame::Close) => {
                    closing = true;
                    Some(Ctl::Close((CLOSE_NORMAL, "detached")))
                }
                Err(err @ ClientFrameError::TooLarge(_)) => {
                    closing = true;
                    let _ = ctl.send(Ctl::Send(D::rejected(err.to_string()))).await;
                    Some(Ctl::Close(TOO_BIG))
                }
                Err(err) => Some(Ctl::Send(D::rejected(err.to_string()))),
            },
            Message::Text(_) => Some(Ctl::Send(D::rejected(
                "text message ignored: this protocol uses binary messages whose first byte is the channel"
                    .into(),
            ))),
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

//! `Connect`: one TCP connection to a port on the sandbox's loopback, carried by one call.
//!
//! The agent dials `127.0.0.1:<port>` from its own network namespace, which is the
//! sandbox's (PID 1 of the namespace sandbox's container; `/init` of a microVM), so it
//! reaches exactly what a process in the sandbox reaches on its loopback. The open
//! message carries a port and nothing else: no address can be named.
//!
//! Two halves run concurrently, so that neither direction can stall the other (a server
//! that answers while it is still reading, an echo of more than the buffers hold):
//! - the *feed* writes input `data` to the socket in order, and shuts the socket down
//!   for writing at a clean end of the input stream;
//! - the *pump* reads the socket in chunks of at most [`CHUNK`] into a small bounded
//!   channel feeding the output stream, and ends the output stream at EOF.
//!
//! Memory is bounded in both directions by backpressure: a host that does not read
//! fills its HTTP/2 window, then the channel, then the pump stops reading and the
//! peer's writes block in the kernel; input is read from the call only when the
//! previous chunk has been written. A cancelled call (its output receiver dropped; tonic
//! reports a cancelled *input* as a clean end) closes the socket.

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;

use bytes::{BufMut, BytesMut};
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::proto::{tunnel_input, tunnel_output, TunnelInput, TunnelOutput};

/// Bytes read from the socket at most per output message.
pub(crate) const CHUNK: usize = 64 * 1024;
/// Output messages queued towards the host before the pump stops reading.
const OUTPUT_QUEUE: usize = 4;

pub(crate) type OutputStream = Pin<Box<dyn Stream<Item = Result<TunnelOutput, Status>> + Send>>;
type Output = mpsc::Sender<Result<TunnelOutput, Status>>;

/// Read the `open` message, connect, and return the output stream; the connection is
/// served by a task of its own from then on.
pub(crate) async fn connect(mut input: Streaming<TunnelInput>) -> Result<OutputStream, Status> {
    let port = match input.message().await? {
        Some(TunnelInput {
            kind: Some(tunnel_input::Kind::Open(open)),
        }) => check_port(open.port)?,
        _ => {
            return Err(Status::invalid_argument(
                "the first tunnel message must be `open`",
            ))
        }
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let socket = TcpStream::connect(addr)
        .await
        .map_err(|err| dial_error(port, &err))?;
    // Interactive protocols (WebSocket, MCP) send small messages that must not wait.
    let _ = socket.set_nodelay(true);
    tracing::debug!(port, "tunnel connected");
    let (reader, writer) = socket.into_split();
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    tokio::spawn(run(port, input, reader, writer, tx));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

fn check_port(port: u32) -> Result<u16, Status> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument(format!("port {port} is not a TCP port (1–65535)")))
}

/// `Unavailable` either way: a refused port is the usual case while the sandbox's server
/// is still starting, and the caller may retry.
fn dial_error(port: u16, err: &std::io::Error) -> Status {
    if err.kind() == std::io::ErrorKind::ConnectionRefused {
        Status::unavailable(format!(
            "nothing listens on 127.0.0.1:{port} in the sandbox"
        ))
    } else {
        Status::unavailable(format!(
            "cannot connect to 127.0.0.1:{port} in the sandbox: {err}"
        ))
    }
}

enum PumpEnd {
    /// The peer closed its side; the output stream ended with OK.
    Eof,
    /// The call is gone, or a read error was reported on the output.
    Over,
}

enum FeedEnd {
    /// The host ended its input; the socket is shut down for writing.
    Done,
    /// Writing to the socket failed (the connection was reset).
    Failed(String),
    /// The input stream failed: the call is over.
    Cancelled,
}

/// Serve one connection until both directions are done, the connection fails, or the
/// call is cancelled. Returning drops (closes) the socket.
async fn run(
    port: u16,
    input: Streaming<TunnelInput>,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    tx: Output,
) {
    // Ours, to report a write failure while the output is still open; dropped at EOF so
    // that the output stream can end.
    let mut report = Some(tx.clone());
    let pump = pump(port, reader, tx);
    let feed = feed(port, input, writer);
    tokio::pin!(pump, feed);
    let (mut pump_done, mut feed_done) = (false, false);
    while !(pump_done && feed_done) {
        tokio::select! {
            end = &mut pump, if !pump_done => match end {
                PumpEnd::Eof => {
                    pump_done = true;
                    report = None;
                }
                PumpEnd::Over => break,
            },
            end = &mut feed, if !feed_done => match end {
                FeedEnd::Done => feed_done = true,
                FeedEnd::Failed(message) => {
                    tracing::debug!(port, "tunnel write failed: {message}");
                    if let Some(tx) = report.take() {
                        let _ = tx.send(Err(Status::unavailable(message))).await;
                    }
                    break;
                }
                FeedEnd::Cancelled => break,
            },
        }
    }
    tracing::debug!(port, "tunnel closed");
}

/// Socket → output messages, until EOF, a read error or the call going away.
async fn pump(port: u16, mut reader: OwnedReadHalf, tx: Output) -> PumpEnd {
    // Reads land in one buffer that chunks are split off; its storage is reused once the
    // chunks sent from it have been encoded and dropped.
    let mut buf = BytesMut::with_capacity(4 * CHUNK);
    loop {
        if buf.capacity() < CHUNK {
            buf.reserve(CHUNK);
        }
        let read = {
            let mut limited = (&mut buf).limit(CHUNK);
            tokio::select! {
                res = reader.read_buf(&mut limited) => res,
                () = tx.closed() => return PumpEnd::Over,
            }
        };
        match read {
            Ok(0) => return PumpEnd::Eof,
            Ok(_) => {
                let data = buf.split().freeze();
                let msg = TunnelOutput {
                    kind: Some(tunnel_output::Kind::Data(data)),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return PumpEnd::Over;
                }
            }
            Err(err) => {
                let message =
                    format!("the connection to 127.0.0.1:{port} in the sandbox failed: {err}");
                tracing::debug!(port, "tunnel read failed: {err}");
                let _ = tx.send(Err(Status::unavailable(message))).await;
                return PumpEnd::Over;
            }
        }
    }
}

/// Input `data` → socket, in order; a clean end of the input shuts the socket down for
/// writing.
async fn feed(port: u16, mut input: Streaming<TunnelInput>, mut writer: OwnedWriteHalf) -> FeedEnd {
    loop {
        match input.message().await {
            Ok(Some(TunnelInput {
                kind: Some(tunnel_input::Kind::Data(data)),
            })) => {
                if let Err(err) = writer.write_all(&data).await {
                    return FeedEnd::Failed(format!(
                        "the connection to 127.0.0.1:{port} in the sandbox failed: {err}"
                    ));
                }
            }
            Ok(Some(_)) => tracing::debug!(port, "ignoring unexpected tunnel input"),
            Ok(None) => {
                if let Err(err) = writer.shutdown().await {
                    tracing::debug!(port, "tunnel shutdown(SHUT_WR) failed: {err}");
                }
                return FeedEnd::Done;
            }
            Err(status) => {
                tracing::debug!(port, "tunnel input failed: {status}");
                return FeedEnd::Cancelled;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ports_must_be_tcp_ports() {
        assert_eq!(check_port(1).unwrap(), 1);
        assert_eq!(check_port(8080).unwrap(), 8080);
        assert_eq!(check_port(65535).unwrap(), 65535);
        for bad in [0, 65536, u32::MAX] {
            let err = check_port(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(err.message().contains(&bad.to_string()), "{err}");
        }
    }

    #[test]
    fn a_refused_port_is_unavailable_and_says_so() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = dial_error(8080, &refused);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.message(),
            "nothing listens on 127.0.0.1:8080 in the sandbox"
        );
    }
}

//! Port tunnels: a byte stream to a TCP port on the loopback of a session's sandbox,
//! carried by the guest's `Connect` call (the sandbox has no network path from the host).
//!
//! Reaching a port never starts a sandbox: what listens there lives in the sandbox and
//! ends with it. An open tunnel holds a [`BusyGuard`], so it keeps the session from
//! idling out for as long as it lives, like a running command or an attached shell.
//! A [`TunnelKind::HealthCheck`] tunnel does not: it is how the embedding layer asks a
//! server in the sandbox how it is doing without that question counting as activity.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use berth_api::validate;
use berth_guest::proto::{tunnel_output, TunnelOutput};
use bytes::{Buf, Bytes};
use futures::channel::mpsc;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sessions::BusyGuard;
use crate::{Core, CoreError};

/// Largest data message sent to the guest; longer writes are accepted in pieces.
const CHUNK: usize = 64 * 1024;
/// Data messages queued towards the guest before writes wait (the HTTP/2 stream
/// window towards the guest comes on top).
const INPUT_QUEUE: usize = 4;

/// A connection to `127.0.0.1:<port>` inside a session's sandbox, as a byte stream:
/// [`AsyncRead`] + [`AsyncWrite`], so HTTP clients (hyper's `client::conn`) and any other
/// protocol run over it unchanged.
///
/// Reads end (`Ok(0)`) when the server in the sandbox closes its side; writes may go on
/// after that. [`AsyncWriteExt::shutdown`](tokio::io::AsyncWriteExt::shutdown) shuts the
/// connection down for writing (the server reads EOF). Dropping the stream closes the
/// connection. If the sandbox stops or the connection is reset, reads and writes fail
/// with [`std::io::ErrorKind::ConnectionReset`] / [`std::io::ErrorKind::BrokenPipe`].
/// Memory is bounded in both directions: writes wait while the guest is behind, and the
/// guest stops reading the socket while this stream is not read.
pub struct PortStream {
    session: String,
    port: u16,
    input: mpsc::Sender<Bytes>,
    output: tonic::Streaming<TunnelOutput>,
    /// What is left of the last chunk received.
    pending: Bytes,
    /// The output is over (EOF or error): reads return EOF from now on.
    read_done: bool,
    write_closed: bool,
    /// `None` for a [`TunnelKind::HealthCheck`] tunnel.
    _busy: Option<BusyGuard>,
}

/// What a port tunnel is for, which decides whether it counts as activity of its
/// session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    /// Traffic of a client ([`Core::connect_port`]): the session is busy while the
    /// tunnel is open and was last active when it closed.
    Traffic,
    /// A health check of a server in the sandbox by the embedding layer (the AgentCore
    /// adapter's `/ping` poll): neither busy nor activity, since a poller that counted
    /// would keep every session alive for ever. The session may idle out while such a
    /// tunnel is open; its reads and writes then fail.
    HealthCheck,
}

impl std::fmt::Debug for PortStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortStream")
            .field("session", &self.session)
            .field("port", &self.port)
            .field("read_done", &self.read_done)
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl PortStream {
    pub fn session_id(&self) -> &str {
        &self.session
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn io_error(&self, status: &tonic::Status) -> std::io::Error {
        let kind = match status.code() {
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
                std::io::ErrorKind::ConnectionReset
            }
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(
            kind,
            format!(
                "port {} of session {}: {}",
                self.port,
                self.session,
                status.message()
            ),
        )
    }
}

impl AsyncRead for PortStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.output).poll_next(cx)) {
                Some(Ok(TunnelOutput {
                    kind: Some(tunnel_output::Kind::Data(data)),
                })) => this.pending = data,
                // A kind this build does not know: skip it.
                Some(Ok(TunnelOutput { kind: None })) => {}
                None => this.read_done = true,
                Some(Err(status)) => {
                    this.read_done = true;
                    return Poll::Ready(Err(this.io_error(&status)));
                }
            }
        }
    }
}

impl AsyncWrite for PortStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let closed = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                format!("port {} of session {}: {what}", this.port, this.session),
            )
        };
        if this.write_closed {
            return Poll::Ready(Err(closed("the tunnel was shut down for writing")));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if ready!(this.input.poll_ready(cx)).is_err() {
            return Poll::Ready(Err(closed("the connection is closed")));
        }
        let n = buf.len().min(CHUNK);
        if this
            .input
            .start_send(Bytes::copy_from_slice(&buf[..n]))
            .is_err()
        {
            return Poll::Ready(Err(closed("the connection is closed")));
        }
        Poll::Ready(Ok(n))
    }

    /// Written data is queued towards the guest already; there is nothing to flush.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Ends the input: the guest shuts the connection down for writing once everything
    /// queued before is written.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.write_closed = true;
        this.input.close_channel();
        Poll::Ready(Ok(()))
    }
}

impl Core {
    /// Connect to TCP port `port` on the loopback of the session's sandbox. The session
    /// must be running (this never starts or resumes it): a stopped session is
    /// `Conflict`, an unknown one `NotFound`. Nothing listening on the port (yet) is
    /// [`CoreError::Guest`] with [`tonic::Code::Unavailable`] and a message saying so;
    /// a caller waiting for a server in the sandbox to come up retries on it.
    ///
    /// The tunnel counts as activity ([`TunnelKind::Traffic`]); see
    /// [`Core::connect_port_as`] for one that does not.
    pub async fn connect_port(&self, session_id: &str, port: u16) -> Result<PortStream, CoreError> {
        self.connect_port_as(session_id, port, TunnelKind::Traffic)
            .await
    }

    /// [`Core::connect_port`] for a tunnel of `kind`.
    pub async fn connect_port_as(
        &self,
        session_id: &str,
        port: u16,
        kind: TunnelKind,
    ) -> Result<PortStream, CoreError> {
        validate::id("session_id", session_id)?;
        if port == 0 {
            return Err(CoreError::invalid("port", "must be a TCP port (1–65535)"));
        }
        self.record(session_id).await?;
        let slot = self.slot(session_id);
        let (sandbox, busy) = {
            let live = slot.live.lock().await;
            let Some(l) = live.as_ref() else {
                return Err(CoreError::Conflict(format!(
                    "session {session_id:?} is not running; its ports can be reached only while it runs"
                )));
            };
            // Busy before the lock is released: the idle check (which takes the same
            // lock) cannot stop the sandbox between this check and the connection.
            let busy = match kind {
                TunnelKind::Traffic => Some(BusyGuard::new(slot.clone())),
                TunnelKind::HealthCheck => None,
            };
            (l.sandbox.clone(), busy)
        };
        let (input, data) = mpsc::channel(INPUT_QUEUE);
        let mut guest = sandbox.guest.clone();
        let output = berth_guest::client::connect_port(&mut guest, port, data)
            .await
            .map_err(|status| CoreError::guest(session_id, status))?;
        Ok(PortStream {
            session: session_id.to_string(),
            port,
            input,
            output,
            pending: Bytes::new(),
            read_done: false,
            write_closed: false,
            _busy: busy,
        })
    }
}

//! Host side of the guest protocol: connect to a guest over its unix socket, or over
//! vsock (through a hybrid-vsock daemon's unix socket, or the kernel's vhost-vsock).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tonic::transport::{Channel, Endpoint};

use crate::proto::guest_client::GuestClient;
use crate::proto::{
    shell_input, tunnel_input, write_file_input, Empty, ShellAttachStart, ShellInput, ShellOutput,
    TunnelInput, TunnelOpen, TunnelOutput, WriteFileInput, WriteTarget,
};

/// Largest HTTP/2 frame the guest may send us (a whole output chunk fits in one).
const MAX_FRAME: u32 = 1 << 20;
/// Receive window per stream: how much output may be in flight to us per call. This is
/// the bound on what one call that we read slowly can make us buffer.
const STREAM_WINDOW: u32 = 4 << 20;
/// Receive window for the whole connection: deliberately (almost) unlimited. A stream
/// we do not read keeps its share of this window until we do, so a small connection
/// window would let a few stalled calls block every other call on the connection;
/// memory is bounded per stream by `STREAM_WINDOW` instead.
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Longest reply to `CONNECT <port>` we read from a hybrid-vsock daemon (`OK <port>` is
/// at most 14 bytes).
const MAX_HYBRID_REPLY: usize = 64;
/// How long a hybrid-vsock daemon may take to answer `CONNECT`: it forwards the request
/// to the guest and waits for the guest's answer, which a stuck or dying VM never
/// gives; without a bound the dial (and every call waiting on a reconnect) would hang.
const HYBRID_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected guest. Cheap to clone; all clones share one HTTP/2 connection.
pub type Guest = GuestClient<Channel>;

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the guest agent at {target}")]
pub struct ConnectError {
    /// Where we dialled, for the message: "unix socket …", "vsock port … through …".
    target: String,
    #[source]
    source: tonic::transport::Error,
}

/// Connect to a guest listening on a unix socket.
pub async fn connect_unix(path: &Path) -> Result<Guest, ConnectError> {
    let socket = path.to_path_buf();
    connect_with(
        || format!("unix socket {}", path.display()),
        move || tokio::net::UnixStream::connect(socket.clone()),
    )
    .await
}

/// Connect to a guest's vsock `port` through a hybrid-vsock daemon's unix socket `uds`
/// (`vhost-device-vsock --vm …,uds-path=UDS`, Firecracker's scheme): send
/// `CONNECT <port>\n`, read `OK <n>\n`, and the socket then carries the guest
/// connection. While the guest has no listener on `port` (the VM is still booting) the
/// daemon closes the socket instead of replying: that is an `io::Error` of kind
/// `ConnectionRefused` at the bottom of the error's source chain, and the caller should
/// retry (so is a daemon whose VM has not set up the device yet; a daemon that is not
/// running at all is the unix socket's own `NotFound`/`ConnectionRefused`). The same
/// handshake runs again whenever the channel reconnects.
pub async fn connect_hybrid_vsock(uds: &Path, port: u32) -> Result<Guest, ConnectError> {
    let socket = uds.to_path_buf();
    connect_with(
        || format!("vsock port {port} through {}", uds.display()),
        move || hybrid_vsock_handshake(socket.clone(), port),
    )
    .await
}

/// Connect to a guest's vsock `port` at `cid` through the kernel's vhost-vsock backend
/// (`AF_VSOCK`; QEMU's `-device vhost-vsock-device,guest-cid=CID`). A connect to a
/// port nobody listens on yet fails at once, so callers retry as with the hybrid
/// scheme. Neither run nor tested here: it needs `/dev/vhost-vsock` on the host, which
/// the development machines lack; it only shares `connect_with` with the tested paths.
pub async fn connect_vsock(cid: u32, port: u32) -> Result<Guest, ConnectError> {
    connect_with(
        || format!("vsock {cid}:{port}"),
        move || tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(cid, port)),
    )
    .await
}

/// The one place the HTTP/2 connection to a guest is configured, whatever `dial` opens
/// (it runs again on every reconnect of the channel). `target` names it in errors.
async fn connect_with<D, F, S>(
    target: impl FnOnce() -> String,
    dial: D,
) -> Result<Guest, ConnectError>
where
    D: Fn() -> F + Send + 'static,
    F: Future<Output = io::Result<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // The URI is required by the HTTP/2 layer but never resolved: the connector below
    // always calls `dial`.
    let channel = Endpoint::from_static("http://guest.berth")
        // Bulk output (command stdout, file reads) flows guest → host: let the guest
        // send large frames and keep several chunks in flight per round trip. The
        // windows also bound what one stream can make us buffer.
        .max_frame_size(Some(MAX_FRAME))
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .connect_with_connector(tower::service_fn(move |_| {
            let dialled = dial();
            async move { Ok::<_, io::Error>(TokioIo::new(dialled.await?)) }
        }))
        .await
        .map_err(|source| ConnectError {
            target: target(),
            source,
        })?;
    Ok(GuestClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20))
}

/// Open `uds` and ask the daemon for the guest's `port`. Returns the socket positioned
/// at the first byte from the guest: the reply is read one byte at a time so that none
/// of the HTTP/2 bytes behind it are consumed.
async fn hybrid_vsock_handshake(uds: PathBuf, port: u32) -> io::Result<tokio::net::UnixStream> {
    let mut stream = tokio::net::UnixStream::connect(&uds).await?;
    let reply = tokio::time::timeout(HYBRID_HANDSHAKE_TIMEOUT, read_reply(&mut stream, port))
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the vsock daemon did not answer CONNECT {port} within {HYBRID_HANDSHAKE_TIMEOUT:?}"
                ),
            ))
        })
        .map_err(|err| {
        // `vhost-device-vsock` closes a connection without a word while the guest has no
        // listener on the port (EOF), and accepts and closes at once while the VM has not
        // set up its device yet (EPIPE or ECONNRESET, whichever we hit first). Both
        // mean: not ready yet, try again.
        match err.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset => io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "the guest is not listening on vsock port {port} yet (the vsock daemon \
                     closed the connection)"
                ),
            ),
            _ => err,
        }
    })?;
    if !reply.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the vsock daemon replied {:?} to CONNECT {port}",
                String::from_utf8_lossy(&reply)
            ),
        ));
    }
    Ok(stream)
}

/// Send `CONNECT <port>` and read the reply line, without its newline. EOF before the
/// newline is `UnexpectedEof`.
async fn read_reply(stream: &mut tokio::net::UnixStream, port: u32) -> io::Result<Vec<u8>> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut reply = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            return Ok(reply);
        }
        reply.push(byte);
        if reply.len() >= MAX_HYBRID_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the vsock daemon's reply to CONNECT {port} has no newline"),
            ));
        }
    }
}

/// Upload `data` to `target` (a plain file, or a tar archive to unpack) with the framing
/// `WriteFile` requires: `target`, the data chunks, then `end`. Returns the bytes the
/// guest received. Dropping the returned future cancels the upload; the guest then
/// commits nothing (see `proto/guest.proto`).
pub async fn write_file<S>(
    guest: &mut Guest,
    target: WriteTarget,
    data: S,
) -> Result<u64, tonic::Status>
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    let msg = |kind| WriteFileInput { kind: Some(kind) };
    let messages =
        futures::stream::once(async move { msg(write_file_input::Kind::Target(target)) })
            .chain(data.map(move |chunk| msg(write_file_input::Kind::Data(chunk))))
            .chain(futures::stream::once(async move {
                msg(write_file_input::Kind::End(Empty {}))
            }));
    Ok(guest.write_file(messages).await?.into_inner().bytes)
}

/// Open a tunnel to `port` on the sandbox's loopback (`Connect`): sends `open`, then
/// each chunk of `data`; the end of `data` shuts the connection down for writing, and
/// the returned output ends when the peer closes its side. Resolves once the guest is
/// connected: nothing listening on the port is `Unavailable` here. Dropping the output
/// cancels the call — closing the connection outright — once `data` has ended too (an
/// HTTP/2 stream is reset only when neither half is in use), so drop both together.
pub async fn connect_port<S>(
    guest: &mut Guest,
    port: u16,
    data: S,
) -> Result<tonic::Streaming<TunnelOutput>, tonic::Status>
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    let msg = |kind| TunnelInput { kind: Some(kind) };
    let open = tunnel_input::Kind::Open(TunnelOpen {
        port: u32::from(port),
    });
    let messages = futures::stream::once(async move { msg(open) })
        .chain(data.map(move |chunk| msg(tunnel_input::Kind::Data(chunk))));
    Ok(guest.connect(messages).await?.into_inner())
}

/// An attachment to a shell (`ShellAttach`): send inputs with the `ShellInput`
/// constructors below; dropping `output` (the call) detaches.
pub struct ShellAttachment {
    pub input: tokio::sync::mpsc::Sender<ShellInput>,
    pub output: tonic::Streaming<ShellOutput>,
}

/// Attach to a shell: sends `start` as the first input and waits for the call to be
/// accepted (a missing shell or a bad offset fails here).
pub async fn shell_attach(
    guest: &mut Guest,
    start: ShellAttachStart,
) -> Result<ShellAttachment, tonic::Status> {
    let (input, rx) = tokio::sync::mpsc::channel(16);
    // The receiver is alive: this cannot fail.
    let _ = input.try_send(ShellInput {
        kind: Some(shell_input::Kind::Attach(start)),
    });
    let output = guest
        .shell_attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(ShellAttachment { input, output })
}

impl ShellInput {
    pub fn stdin(data: impl Into<Bytes>) -> ShellInput {
        ShellInput {
            kind: Some(shell_input::Kind::Stdin(data.into())),
        }
    }

    pub fn resize(width: u32, height: u32) -> ShellInput {
        ShellInput {
            kind: Some(shell_input::Kind::Resize(crate::proto::ShellSize {
                width,
                height,
            })),
        }
    }

    pub fn heartbeat() -> ShellInput {
        ShellInput {
            kind: Some(shell_input::Kind::Heartbeat(Empty {})),
        }
    }
}

//! Host side of the guest protocol: connect to a guest over its unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
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

/// A connected guest. Cheap to clone; all clones share one HTTP/2 connection.
pub type Guest = GuestClient<Channel>;

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the guest agent at {path}")]
pub struct ConnectError {
    path: PathBuf,
    #[source]
    source: tonic::transport::Error,
}

/// Connect to a guest listening on a unix socket.
pub async fn connect_unix(path: &Path) -> Result<Guest, ConnectError> {
    let socket = path.to_path_buf();
    // The URI is required by the HTTP/2 layer but never resolved: the connector below
    // always dials the socket.
    let channel = Endpoint::from_static("http://guest.berth")
        // Bulk output (command stdout, file reads) flows guest → host: let the guest
        // send large frames and keep several chunks in flight per round trip. The
        // windows also bound what one stream can make us buffer.
        .max_frame_size(Some(MAX_FRAME))
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| ConnectError {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(GuestClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20))
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

//! Host side of the guest protocol: connect to a guest over its unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::proto::guest_client::GuestClient;

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

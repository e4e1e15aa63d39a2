//! The vsock channel (`berth.channel=vsock:PORT`): an `AF_VSOCK` listener, one HTTP/2
//! connection per accepted host connection. Unlike the virtio-serial port there is
//! nothing to infer: each host connection is a socket of its own that starts with its
//! client's preface and ends with a real EOF or reset.

use std::io;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::Stream;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

use super::boot;

/// How long to wait after a failed `accept` before the next one: an error that lasts
/// while the connection stays queued (`EMFILE`) would otherwise spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Listen on `port` for any CID, once the vsock device is up. `vsock::get_local_cid`
/// (the `IOCTL_VM_SOCKETS_GET_LOCAL_CID` of `/dev/vsock`) says `VMADDR_CID_ANY` until the
/// virtio transport has probed a device; binding would succeed before that and then
/// never see a connection, so this waits for the CID (and retries a failed bind) for up
/// to `DEVICE_TIMEOUT`, which turns a VM without the device into a clear error. The
/// backlog is the `vsock` crate's 128: the kernel's default of 5 (what `socat` uses)
/// made half of 20 simultaneous host connects fail.
pub(super) async fn listen(port: u32) -> anyhow::Result<VsockListener> {
    let deadline = Instant::now() + boot::DEVICE_TIMEOUT;
    loop {
        let attempt = local_cid().and_then(|cid| {
            let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))?;
            Ok((cid, listener))
        });
        match attempt {
            Ok((cid, listener)) => {
                tracing::info!(cid, port, "guest agent serving on vsock");
                return Ok(listener);
            }
            Err(err) if Instant::now() >= deadline => {
                return Err(err).with_context(|| {
                    format!(
                        "cannot listen on vsock port {port} after {:?}",
                        boot::DEVICE_TIMEOUT
                    )
                });
            }
            Err(err) => tracing::debug!("vsock not ready yet: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// This VM's CID, or an error while the vsock device is not there (yet).
fn local_cid() -> io::Result<u32> {
    // `::vsock` is the crate, not this module.
    match ::vsock::get_local_cid()? {
        VMADDR_CID_ANY => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no vsock device: /dev/vsock has no CID",
        )),
        cid => Ok(cid),
    }
}

/// Every accepted host connection, for `serve`. Never ends: a failed `accept` is an
/// error item (tonic skips it), after a short pause.
pub(super) fn incoming(
    listener: VsockListener,
) -> impl Stream<Item = io::Result<VsockStream>> + Send {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = match listener.accept().await {
            Ok((stream, peer)) => {
                tracing::info!(cid = peer.cid(), port = peer.port(), "host connected");
                Ok(stream)
            }
            Err(err) => {
                tracing::warn!("cannot accept a vsock connection: {err}");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                Err(err)
            }
        };
        Some((accepted, listener))
    })
}

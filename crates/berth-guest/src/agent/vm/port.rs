//! The guest protocol over a virtio-serial port: one HTTP/2 connection per host
//! connection to QEMU's chardev socket. See `README.md` in this directory for the
//! hang-up and reconnect rules this implements.

use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::Stream;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::agent::sys::{self, EpollFd};

/// The first bytes of every HTTP/2 client connection (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// HTTP/2 frame header length.
const HEADER: usize = 9;
/// Bytes read from the port ahead of HTTP/2. The port hands out at most one 4 KiB
/// virtqueue buffer per read anyway; this only bounds what a write-side look-ahead may
/// hold while hyper is not reading.
const BUFFER: usize = 64 << 10;
/// How long the port must show "no host", with nothing read meanwhile, before that
/// counts as a hang-up. The kernel delivers a host's bytes at once but its connect and
/// disconnect notices later, from a work queue, so a new connection's preface can
/// arrive while the port still says "no host" (its connect, or the previous host's
/// disconnect, not processed yet); believing that would end the new connection before
/// it started, and its host would wait forever. Userspace cannot tell such a late
/// notice from a hang-up (a host that connects and sends nothing leaves no trace in the
/// byte stream), so only time can. The price: a new host that connects within the grace
/// after a hang-up may receive output the old connection still had to write, and its
/// connection fails at once (see README.md).
const HANG_UP_GRACE: Duration = Duration::from_millis(250);

/// Where the next unclassified byte from the host stands in HTTP/2's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Inside the client preface, this many bytes still to come.
    Preface(usize),
    /// At a frame boundary.
    Header,
    /// Inside a frame's payload, this many bytes still to come.
    Payload(usize),
}

#[derive(Debug, PartialEq, Eq)]
struct Scan {
    /// Bytes of the input that belong to the current connection.
    consumed: usize,
    /// The byte after them begins a new client preface.
    preface: bool,
}

impl Framing {
    /// Walk `data`, which starts where the previous scan stopped. A frame header is only
    /// consumed once all of its 9 bytes are there, so the caller must present
    /// unconsumed bytes again with more data appended.
    ///
    /// A new connection shows up as the preface where a frame header is due: read as a
    /// header, `PRI * HTT` would announce a 5 MiB frame of type 0x20, which no peer may
    /// send us (the largest frame we accept is far smaller), so it cannot be a frame.
    fn scan(&mut self, data: &[u8]) -> Scan {
        let mut at = 0;
        loop {
            match *self {
                Framing::Preface(left) | Framing::Payload(left) => {
                    let n = left.min(data.len() - at);
                    at += n;
                    if n < left {
                        *self = match *self {
                            Framing::Preface(_) => Framing::Preface(left - n),
                            _ => Framing::Payload(left - n),
                        };
                        break;
                    }
                    *self = Framing::Header;
                }
                Framing::Header => {
                    let Some(header) = data.get(at..at + HEADER) else {
                        break;
                    };
                    if header == &PREFACE[..HEADER] {
                        return Scan {
                            consumed: at,
                            preface: true,
                        };
                    }
                    let len = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    at += HEADER;
                    if len > 0 {
                        *self = Framing::Payload(len);
                    }
                }
            }
        }
        Scan {
            consumed: at,
            preface: false,
        }
    }
}

/// An open virtio-serial port and the bytes read from it but not yet handed to a
/// connection.
pub(super) struct Port {
    file: File,
    /// Readiness of the port, seen through an edge-triggered epoll instance of our own
    /// that tokio watches. Registering the port with tokio directly does not work: tokio
    /// treats a hang-up (POLLHUP) as final and would report it forever after, while a
    /// virtio-serial port hangs up each time the host disconnects and recovers when it
    /// reconnects. Our epoll reports one edge per change and we ask the port itself
    /// (`poll(2)`) what the state is.
    edges: AsyncFd<EpollFd>,
    buf: Box<[u8]>,
    /// `buf[start..cleared]` belongs to the current connection and is not yet handed
    /// out; `buf[cleared..end]` is not classified yet (a partial frame header, or the
    /// next connection's preface when `preface` is set).
    start: usize,
    cleared: usize,
    end: usize,
    framing: Framing,
    preface: bool,
    /// The host is gone and everything it sent has been read.
    hung_up: bool,
    /// Running while reads return 0 or writes block with no host, until `hung_up`.
    suspected: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// What one non-blocking read found.
enum Got {
    /// New bytes are in the buffer.
    Data,
    /// Nothing to read yet (or no room to read into).
    Nothing,
    /// No bytes and no host.
    NoHost,
}

impl Port {
    pub(super) fn open(path: &Path) -> io::Result<Port> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            file.as_fd(),
            EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLET,
                0,
            ),
        )?;
        Ok(Port {
            file,
            edges: sys::async_epoll(epoll)?,
            buf: vec![0; BUFFER].into_boxed_slice(),
            start: 0,
            cleared: 0,
            end: 0,
            framing: Framing::Header,
            preface: false,
            hung_up: false,
            suspected: None,
        })
    }

    /// Wait for the port to change in any way since the last call. Callers retry their
    /// operation afterwards: a change after that retry makes a new edge.
    fn poll_edge(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = ready!(self.edges.poll_read_ready(cx))?;
        let mut events = [EpollEvent::empty(); 1];
        // Consuming the event is what re-arms the edge; its flags are stale by now.
        let _ = guard
            .get_inner()
            .epoll()
            .wait(&mut events, EpollTimeout::ZERO);
        guard.clear_ready();
        Poll::Ready(Ok(()))
    }

    /// Whether the host is disconnected right now.
    fn host_gone(&self) -> bool {
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
        match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
            Err(_) => false,
        }
    }

    /// Called when the port says there is no host: `Ready(true)` once that has lasted
    /// `HANG_UP_GRACE`, `Ready(false)` when the caller should retry its operation
    /// (something changed), `Pending` while waiting for either.
    fn poll_hang_up(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if !self.host_gone() {
            self.suspected = None;
            return Poll::Ready(Ok(false));
        }
        let grace = self.suspected.get_or_insert_with(|| {
            tracing::debug!("the port says no host; waiting out the grace period");
            Box::pin(tokio::time::sleep(HANG_UP_GRACE))
        });
        if grace.as_mut().poll(cx).is_ready() {
            tracing::debug!("the host hung up");
            self.suspected = None;
            self.hung_up = true;
            return Poll::Ready(Ok(true));
        }
        ready!(self.poll_edge(cx))?;
        Poll::Ready(Ok(false))
    }

    /// One non-blocking read into the buffer.
    fn read_more(&mut self) -> io::Result<Got> {
        if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.cleared -= self.start;
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Ok(Got::Nothing);
        }
        loop {
            match (&self.file).read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(Got::NoHost),
                Ok(n) => {
                    self.end += n;
                    self.suspected = None;
                    self.classify();
                    return Ok(Got::Data);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(Got::Nothing),
                Err(err) => return Err(err),
            }
        }
    }

    /// Read until something new arrived (bytes or the hang-up).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.read_more()? {
                Got::Data => return Poll::Ready(Ok(())),
                Got::NoHost => {
                    if ready!(self.poll_hang_up(cx))? {
                        return Poll::Ready(Ok(()));
                    }
                }
                Got::Nothing if self.end == self.buf.len() => {
                    // Unreachable: callers hand out or discard cleared bytes first.
                    return Poll::Ready(Err(io::Error::other("port buffer full")));
                }
                Got::Nothing => ready!(self.poll_edge(cx))?,
            }
        }
    }

    fn classify(&mut self) {
        if !self.preface {
            let scan = self.framing.scan(&self.buf[self.cleared..self.end]);
            self.cleared += scan.consumed;
            self.preface = scan.preface;
        }
    }

    /// Skip what is left of the previous connection and wait until the next one's
    /// preface arrives.
    fn poll_next_connection(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // Whatever the previous connection did not read is stale.
            self.start = self.cleared;
            if self.preface {
                self.preface = false;
                self.suspected = None;
                self.framing = Framing::Preface(PREFACE.len());
                self.classify();
                return Poll::Ready(Ok(()));
            }
            if self.hung_up {
                // The next host starts at a frame boundary with its preface. A partial
                // frame header held back is the departed host's, unless it is the start
                // of that preface (bytes can arrive before their host's connect notice).
                if !PREFACE.starts_with(&self.buf[self.cleared..self.end]) {
                    self.end = self.cleared;
                }
                self.framing = Framing::Header;
                // A hung-up port reads 0 at once, so only read again after it changed
                // (the host reconnected), or this would spin through grace periods.
                ready!(self.poll_edge(cx))?;
                self.hung_up = false;
            }
            ready!(self.poll_fill(cx))?;
        }
    }
}

/// Open the port named `name` (`/sys/class/virtio-ports/*/name`), if it exists yet.
pub(super) fn find(name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in entries.flatten() {
        let found = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if found.trim_end() == name {
            let dev = Path::new("/dev").join(entry.file_name());
            return dev.exists().then_some(dev);
        }
    }
    None
}

/// One HTTP/2 connection's view of the port: the host's bytes up to its hang-up (or up
/// to the next host's preface), and writes until then.
pub(super) struct Connection {
    /// Always `Some` until dropped, when it goes back to `incoming`.
    port: Option<Port>,
    give_back: Option<oneshot::Sender<Port>>,
    ended: bool,
}

impl Connection {
    fn port(&mut self) -> io::Result<&mut Port> {
        self.port
            .as_mut()
            .ok_or_else(|| io::Error::other("connection without its port"))
    }

    /// The host this connection belongs to is gone (hung up, or replaced by a new one).
    fn is_over(&mut self) -> bool {
        if !self.ended {
            self.ended = self
                .port
                .as_ref()
                .is_none_or(|port| port.preface || port.hung_up);
        }
        self.ended
    }

    fn broken() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "the host hung up")
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        tracing::info!("host connection ended");
        if let (Some(port), Some(tx)) = (self.port.take(), self.give_back.take()) {
            let _ = tx.send(port);
        }
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let port = self.port()?;
            if port.start < port.cleared {
                let n = (port.cleared - port.start).min(out.remaining());
                out.put_slice(&port.buf[port.start..port.start + n]);
                port.start += n;
                return Poll::Ready(Ok(()));
            }
            if self.is_over() {
                return Poll::Ready(Ok(()));
            }
            ready!(self.port()?.poll_fill(cx))?;
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        // If the host hung up and a new one connected before we noticed, whatever we
        // write goes to the new one and breaks its connection. Looking for its preface
        // before each write narrows that window to the time its first bytes take to
        // reach us.
        self.port()?.read_more()?;
        if self.is_over() {
            return Poll::Ready(Err(Self::broken()));
        }
        loop {
            let port = self.port()?;
            match (&port.file).write(data) {
                Ok(n) => {
                    port.suspected = None;
                    return Poll::Ready(Ok(n));
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    // Writes block while the host is away; a hung-up port is never
                    // writable, so without this check hyper would wait here forever
                    // instead of noticing the end of its connection.
                    if port.host_gone() {
                        if ready!(port.poll_hang_up(cx))? {
                            self.ended = true;
                            return Poll::Ready(Err(Self::broken()));
                        }
                        continue;
                    }
                    // hyper polls reads and writes from the same task, so sharing the
                    // one edge waker with `poll_read` loses no wake-up.
                    ready!(port.poll_edge(cx))?;
                }
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A serial line cannot be closed from our end; the host learns that the
    /// connection is over from HTTP/2 (GOAWAY) or not at all.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One `Connection` per host connection, each after the previous one was dropped. Ends
/// (and so stops the server) only if the port fails.
pub(super) fn incoming(port: Port) -> impl Stream<Item = io::Result<Connection>> + Send {
    enum Slot {
        Free(Port),
        Lent(oneshot::Receiver<Port>),
    }
    futures::stream::unfold(Slot::Free(port), |slot| async move {
        let mut port = match slot {
            Slot::Free(port) => port,
            Slot::Lent(rx) => rx.await.ok()?,
        };
        if let Err(err) = futures::future::poll_fn(|cx| port.poll_next_connection(cx)).await {
            tracing::error!("the virtio-serial port failed: {err}");
            return None;
        }
        tracing::info!("host connected");
        let (tx, rx) = oneshot::channel();
        let connection = Connection {
            port: Some(port),
            give_back: Some(tx),
            ended: false,
        };
        Some((Ok(connection), Slot::Lent(rx)))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn frame(len: usize, kind: u8) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            1,
        ];
        f.extend(std::iter::repeat_n(0xab, len));
        f
    }

    /// Feed `bytes` in pieces of `step`, re-presenting unconsumed bytes like `Port`.
    fn feed(framing: &mut Framing, bytes: &[u8], step: usize) -> Option<usize> {
        let mut cleared = 0;
        let mut end = 0;
        while end < bytes.len() {
            end = (end + step).min(bytes.len());
            let scan = framing.scan(&bytes[cleared..end]);
            cleared += scan.consumed;
            if scan.preface {
                return Some(cleared);
            }
        }
        assert!(bytes.len() - cleared < HEADER);
        None
    }

    #[test]
    fn finds_the_next_preface_at_a_frame_boundary() {
        let mut first = PREFACE.to_vec();
        first.extend(frame(6, 4));
        first.extend(frame(0, 4));
        first.extend(frame(70_000, 0));
        first.extend(frame(8, 6));
        let mut both = first.clone();
        both.extend(PREFACE);
        both.extend(frame(6, 4));
        for step in [1, 2, 5, 9, 10, 4096, 1 << 20] {
            let mut framing = Framing::Preface(PREFACE.len());
            assert_eq!(
                feed(&mut framing, &both, step),
                Some(first.len()),
                "step {step}"
            );
            let mut framing = Framing::Preface(PREFACE.len());
            assert_eq!(feed(&mut framing, &first, step), None, "step {step}");
            assert_eq!(framing, Framing::Header);
        }
    }

    #[test]
    fn a_preface_inside_a_payload_is_data() {
        let mut framing = Framing::Header;
        let mut bytes = frame(PREFACE.len(), 0);
        bytes[HEADER..].copy_from_slice(PREFACE);
        assert_eq!(feed(&mut framing, &bytes, 3), None);
        let mut framing = Framing::Header;
        assert_eq!(
            framing.scan(PREFACE),
            Scan {
                consumed: 0,
                preface: true
            }
        );
    }

    #[test]
    fn holds_back_a_partial_header() {
        let mut framing = Framing::Header;
        let scan = framing.scan(&frame(3, 0)[..8]);
        assert_eq!(scan.consumed, 0);
        assert_eq!(framing, Framing::Header);
        let scan = framing.scan(&frame(3, 0)[..10]);
        assert_eq!(scan.consumed, 10);
        assert_eq!(framing, Framing::Payload(2));
    }
}

//! A listener that serves plain HTTP and TLS on one port.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

/// A connection as `axum::serve` gets it: plain TCP or TLS over TCP.
pub type Io = Either<TcpStream, TlsStream<TcpStream>>;

/// How long a new connection may take to send its first byte and, for TLS, to
/// complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS connection: a handshake record (RFC 8446 §5.1). HTTP/1
/// requests start with a method (a letter) and HTTP/2 prior knowledge with `PRI`.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Connections ready for `axum::serve` but not yet taken.
const READY_BACKLOG: usize = 64;

/// Wraps a TCP [`Listener`] (e.g. a `tokio::net::TcpListener`, or one with `tap_io`):
/// every accepted connection gets its own task that peeks at the first byte and, for
/// TLS, runs the handshake, under [`HANDSHAKE_TIMEOUT`]; [`Listener::accept`] yields
/// connections once they are ready. A client that sends nothing, or stalls in the
/// handshake, holds only its own task, never the accept loop.
///
/// Dropping the listener stops accepting (`axum::serve`'s graceful shutdown does).
pub struct SniffingListener {
    ready: mpsc::Receiver<(Io, SocketAddr)>,
    local_addr: SocketAddr,
    accept_task: JoinHandle<()>,
}

impl SniffingListener {
    /// Start accepting on `inner`. Must be called within a Tokio runtime.
    pub fn new<L>(inner: L, tls: Arc<ServerConfig>) -> io::Result<Self>
    where
        L: Listener<Io = TcpStream, Addr = SocketAddr>,
    {
        Self::with_handshake_timeout(inner, tls, HANDSHAKE_TIMEOUT)
    }

    /// [`SniffingListener::new`] with another handshake timeout.
    pub fn with_handshake_timeout<L>(
        mut inner: L,
        tls: Arc<ServerConfig>,
        timeout: Duration,
    ) -> io::Result<Self>
    where
        L: Listener<Io = TcpStream, Addr = SocketAddr>,
    {
        let local_addr = inner.local_addr()?;
        let acceptor = TlsAcceptor::from(tls);
        let (tx, ready) = mpsc::channel(READY_BACKLOG);
        let accept_task = tokio::spawn(async move {
            loop {
                // `Listener::accept` retries errors itself (axum backs off on EMFILE).
                let (tcp, addr) = tokio::select! {
                    conn = inner.accept() => conn,
                    () = tx.closed() => return,
                };
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, sniff(tcp, &acceptor)).await {
                        Ok(Ok(Some(io))) => {
                            // Err: the server stopped; the connection is dropped.
                            let _ = tx.send((io, addr)).await;
                        }
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => tracing::debug!(%addr, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(
                            %addr,
                            "closing a connection that completed no request or TLS handshake \
                             within {timeout:?}"
                        ),
                    }
                });
            }
        });
        Ok(SniffingListener {
            ready,
            local_addr,
            accept_task,
        })
    }
}

/// Plain TCP or TLS, by the first byte; `None` if the peer closed before sending one.
async fn sniff(tcp: TcpStream, acceptor: &TlsAcceptor) -> io::Result<Option<Io>> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    if first[0] == TLS_HANDSHAKE_RECORD {
        Ok(Some(Either::Right(acceptor.accept(tcp).await?)))
    } else {
        Ok(Some(Either::Left(tcp)))
    }
}

impl Listener for SniffingListener {
    type Io = Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Io, SocketAddr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // Only if the accept task died (it never returns while we hold `ready`).
            None => {
                tracing::error!("the TLS accept task stopped; accepting no more connections");
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

impl Drop for SniffingListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::SystemTime;

    use axum::extract::WebSocketUpgrade;
    use axum::routing::get;
    use axum::Router;
    use bytes::Bytes;
    use futures::{SinkExt, StreamExt};
    use http_body_util::{BodyExt, Empty};
    use hyper::Request;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConfig, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::tls::{provider, server_config, CertDir};

    struct Fixture {
        _tmp: tempfile::TempDir,
        addr: SocketAddr,
        ca: CertificateDer<'static>,
        server: tokio::task::JoinHandle<()>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    /// A generated CA and server certificate, and an app on a [`SniffingListener`].
    async fn serve(timeout: Duration) -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = CertDir::in_data_dir(tmp.path());
        dir.ensure(&["localhost".into(), "127.0.0.1".into()], SystemTime::now())
            .expect("certificates");
        let config = server_config(&dir.server_cert(), &dir.server_key()).expect("config");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let listener =
            SniffingListener::with_handshake_timeout(tcp, config, timeout).expect("listener");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/echo", get(echo));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Fixture {
            _tmp: tmp,
            addr,
            ca: ca_of(&dir.ca_cert()),
            server,
        }
    }

    /// A WebSocket that echoes one text message.
    async fn echo(ws: WebSocketUpgrade) -> axum::response::Response {
        ws.on_upgrade(|mut socket| async move {
            if let Some(Ok(msg)) = socket.recv().await {
                let _ = socket.send(msg).await;
            }
        })
    }

    fn ca_of(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).expect("ca.pem")
    }

    /// A TLS connection that trusts only `ca`, offering `alpn`.
    async fn tls_connect(
        f: &Fixture,
        name: &str,
        alpn: &[&[u8]],
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, io::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(f.ca.clone()).expect("add ca");
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(f.addr).await.expect("connect");
        let name = ServerName::try_from(name.to_string()).expect("server name");
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }

    /// GET /healthz over HTTP/1.1 on `io`: (status, body).
    async fn get_http1<T>(io: T) -> (u16, String)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("http1 handshake");
        tokio::spawn(conn);
        let req = Request::get("/healthz")
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn https_verifies_against_the_generated_ca() {
        let f = serve(HANDSHAKE_TIMEOUT).await;
        for name in ["localhost", "127.0.0.1"] {
            let tls = tls_connect(&f, name, &[b"http/1.1"])
                .await
                .unwrap_or_else(|e| panic!("handshake as {name}: {e}"));
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
            assert_eq!(get_http1(tls).await, (200, "ok\n".to_string()));
        }
        // A name the certificate does not cover is refused by the client.
        assert!(tls_connect(&f, "elsewhere.example", &[]).await.is_err());
    }

    #[tokio::test]
    async fn plain_http_on_the_same_port() {
        let f = serve(HANDSHAKE_TIMEOUT).await;
        let tcp = TcpStream::connect(f.addr).await.expect("connect");
        assert_eq!(get_http1(tcp).await, (200, "ok\n".to_string()));
    }

    #[tokio::test]
    async fn http2_over_tls_with_alpn() {
        let f = serve(HANDSHAKE_TIMEOUT).await;
        let tls = tls_connect(&f, "localhost", &[b"h2", b"http/1.1"])
            .await
            .expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        let req = Request::get(format!("https://localhost:{}/healthz", f.addr.port()))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn websocket_upgrades_over_tls_and_plain() {
        use tokio_tungstenite::tungstenite::Message;
        async fn echo_once<T>(io: T, scheme: &str)
        where
            T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        {
            let url = format!("{scheme}://localhost/echo");
            let (mut ws, _) = tokio_tungstenite::client_async(url, io)
                .await
                .expect("websocket handshake");
            ws.send(Message::text("hello")).await.expect("send");
            let back = ws.next().await.expect("a reply").expect("message");
            assert_eq!(back, Message::text("hello"), "over {scheme}");
        }
        let f = serve(HANDSHAKE_TIMEOUT).await;
        // What WebSocket clients do: TLS with ALPN http/1.1 (or none), then Upgrade.
        let tls = tls_connect(&f, "localhost", &[b"http/1.1"])
            .await
            .expect("handshake");
        echo_once(tls, "wss").await;
        let tcp = TcpStream::connect(f.addr).await.expect("connect");
        echo_once(tcp, "ws").await;
    }

    #[tokio::test]
    async fn a_stalled_client_does_not_hold_up_others() {
        // A timeout far beyond any test run: if sniffing blocked the accept loop,
        // the requests below would never be served.
        let f = serve(Duration::from_secs(24 * 60 * 60)).await;
        let _silent = TcpStream::connect(f.addr).await.expect("connect");
        let mut half_hello = TcpStream::connect(f.addr).await.expect("connect");
        half_hello
            .write_all(&[TLS_HANDSHAKE_RECORD, 3, 1])
            .await
            .expect("write");
        let tls = tls_connect(&f, "localhost", &[]).await.expect("handshake");
        assert_eq!(get_http1(tls).await.0, 200);
        let tcp = TcpStream::connect(f.addr).await.expect("connect");
        assert_eq!(get_http1(tcp).await.0, 200);
    }

    #[tokio::test]
    async fn silent_and_broken_connections_are_closed() {
        let f = serve(Duration::from_millis(100)).await;
        // Nothing sent: closed when the handshake timeout passes.
        let mut silent = TcpStream::connect(f.addr).await.expect("connect");
        let mut buf = [0u8; 16];
        assert_eq!(silent.read(&mut buf).await.unwrap_or(0), 0);
        // Not TLS after all: the handshake fails and the connection is closed.
        let mut garbage = TcpStream::connect(f.addr).await.expect("connect");
        garbage
            .write_all(&[TLS_HANDSHAKE_RECORD, 0xff, 0xff, 0, 1, 0])
            .await
            .expect("write");
        let mut rest = Vec::new();
        let _ = garbage.read_to_end(&mut rest).await;
        // The server goes on serving.
        let tcp = TcpStream::connect(f.addr).await.expect("connect");
        assert_eq!(get_http1(tcp).await.0, 200);
    }
}

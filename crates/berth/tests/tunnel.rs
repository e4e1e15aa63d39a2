//! Port tunnels through the real server: `GET /v1/sessions/{id}/ports/{port}` upgrades
//! to a WebSocket carrying a TCP connection to 127.0.0.1:<port> inside the sandbox,
//! driven with a plain tokio-tungstenite client against servers started in the sandbox
//! through the commands API. No assertion depends on timing: waits poll until
//! `common::DEADLINE`.

mod common;

use berth_api::Isolation;
use common::drivers::runtime;
use common::{poll, uniq, Server};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use sha2::Digest;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Largest message the server sends.
const CHUNK: usize = 64 * 1024;
const BIG: usize = 16 << 20;

fn port_request(
    s: &Server,
    session: &str,
    port: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let url = format!(
        "ws://127.0.0.1:{}/v1/sessions/{session}/ports/{port}",
        s.port
    );
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", s.token)).expect("header"),
    );
    req
}

/// Open a tunnel, or the HTTP status and JSON body of the refusal.
async fn open(s: &Server, session: &str, port: &str) -> Result<Ws, (u16, Value)> {
    match tokio_tungstenite::connect_async(port_request(s, session, port)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                .expect("a JSON error body");
            Err((resp.status().as_u16(), body))
        }
        Err(e) => panic!("connecting to port {port} of {session}: {e:?}"),
    }
}

/// Open a tunnel to `port`, retrying while nothing listens there yet (a server in the
/// sandbox starting up).
async fn open_when_listening(s: &Server, session: &str, port: u16) -> Ws {
    let what = format!("something to listen on port {port} in {session}");
    poll(&what, || async {
        match open(s, session, &port.to_string()).await {
            Ok(ws) => Some(ws),
            Err((503, body)) => {
                assert_eq!(body["error"]["code"], "unavailable", "{body}");
                None
            }
            Err(other) => panic!("port {port}: {other:?}"),
        }
    })
    .await
}

/// What the server sent until the end of its output (an empty message) or its close.
#[derive(Debug, Default)]
struct Received {
    data: Vec<u8>,
    eof: bool,
    close: Option<(u16, String)>,
}

async fn read_output(ws: &mut Ws) -> Received {
    let mut r = Received::default();
    while let Some(msg) = ws.next().await {
        match msg.expect("read from the tunnel") {
            Message::Binary(b) if b.is_empty() => {
                r.eof = true;
                return r;
            }
            Message::Binary(b) => {
                assert!(b.len() <= CHUNK, "message of {} bytes", b.len());
                r.data.extend_from_slice(&b);
            }
            Message::Close(frame) => {
                r.close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                return r;
            }
            Message::Text(t) => panic!("text message {t:?}"),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    r
}

/// The server's close frame (after both directions ended, or after a protocol error).
async fn expect_close(ws: &mut Ws, code: u16) -> String {
    let r = read_output(ws).await;
    assert!(r.data.is_empty() && !r.eof, "data before the close: {r:?}");
    let Some((got, reason)) = r.close else {
        panic!("no close frame: {r:?}");
    };
    assert_eq!(got, code, "close reason {reason:?}");
    // Answer it, completing the handshake.
    while let Some(Ok(_)) = ws.next().await {}
    reason
}

async fn send(ws: &mut Ws, data: &[u8]) {
    ws.send(Message::Binary(data.to_vec().into()))
        .await
        .expect("send to the tunnel");
}

/// Send an HTTP/1.0 request and end our side.
async fn request(ws: &mut Ws, path: &str) {
    send(
        ws,
        format!("GET {path} HTTP/1.0\r\nHost: sandbox\r\n\r\n").as_bytes(),
    )
    .await;
    send(ws, b"").await;
}

/// Read an HTTP/1.0 response to the end of the connection: (status line, body).
async fn response(ws: &mut Ws) -> (String, Vec<u8>) {
    let r = read_output(ws).await;
    assert!(r.eof, "the response did not end with EOF: {:?}", r.close);
    expect_close(ws, 1000).await;
    let split = r
        .data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&r.data)));
    let head = String::from_utf8_lossy(&r.data[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, r.data[split + 4..].to_vec())
}

async fn get(ws: &mut Ws, path: &str) -> (String, Vec<u8>) {
    request(ws, path).await;
    response(ws).await
}

/// A server in the sandbox that reads to EOF, then answers `got N bytes` and closes.
const COUNT_PY: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7000))
s.listen()
while True:
    c, _ = s.accept()
    n = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        n += len(d)
    c.sendall(b"got %d bytes" % n)
    c.close()
"#;

/// A server in the sandbox that accepts connections and never reads or closes them.
const HOLD_PY: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7001))
s.listen()
held = []
while True:
    held.append(s.accept()[0])
"#;

/// Start `python3 -m http.server` on 127.0.0.1:8080 in the session (in the background,
/// serving `www/` of the workspace with `hello.txt` and a 16 MiB `big.bin`) and the
/// counting server on 7000 and the holding server on 7001; returns big.bin's sha256 as computed inside.
async fn start_servers(s: &Server, session: &str) -> String {
    let setup = format!(
        "set -e; mkdir -p www; echo 'hello from the sandbox' > www/hello.txt; \
         head -c {BIG} /dev/urandom > www/big.bin; \
         cat > count.py <<'EOF'\n{COUNT_PY}\nEOF\n\
         cat > hold.py <<'EOF'\n{HOLD_PY}\nEOF\n\
         nohup python3 -m http.server 8080 --bind 127.0.0.1 --directory www >http.log 2>&1 & \
         nohup python3 count.py >count.log 2>&1 & \
         nohup python3 hold.py >hold.log 2>&1 & \
         sha256sum www/big.bin"
    );
    let out = s.exec(session, &setup).await.ok();
    out.out()
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

both!(http_over_port_tunnels);
async fn http_over_port_tunnels(s: Server, isolation: Isolation) {
    let rt = runtime(&s, isolation).await;
    let session = s.session(&uniq("port"), &rt).await;
    let big_sha = start_servers(&s, &session).await;

    // Nothing listens on port 9: a clear 503 before any upgrade.
    let (status, body) = open(&s, &session, "9").await.expect_err("port 9 refused");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert_eq!(
        body["error"]["message"],
        "nothing listens on 127.0.0.1:9 in the sandbox"
    );

    // An HTTP GET through the tunnel.
    let mut ws = open_when_listening(&s, &session, 8080).await;
    let (status, body) = get(&mut ws, "/hello.txt").await;
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert_eq!(body, b"hello from the sandbox\n");

    // Two tunnels at once: the 16 MiB response waits (backpressure) while the other
    // tunnel's exchange completes, then arrives intact.
    let mut big = open_when_listening(&s, &session, 8080).await;
    let mut small = open_when_listening(&s, &session, 8080).await;
    request(&mut big, "/big.bin").await;
    request(&mut small, "/hello.txt").await;
    let (status, body) = response(&mut small).await;
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert_eq!(body, b"hello from the sandbox\n");
    let (status, body) = response(&mut big).await;
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert_eq!(body.len(), BIG);
    assert_eq!(format!("{:x}", sha2::Sha256::digest(&body)), big_sha);

    // Half-close: the server in the sandbox reads our bytes to EOF, then answers and
    // closes, which reaches us as EOF and then close 1000.
    let mut ws = open_when_listening(&s, &session, 7000).await;
    let piece = vec![b'x'; 512 * 1024];
    for _ in 0..3 {
        send(&mut ws, &piece).await;
    }
    send(&mut ws, b"").await;
    let r = read_output(&mut ws).await;
    assert!(r.eof, "{r:?}");
    assert_eq!(String::from_utf8_lossy(&r.data), "got 1572864 bytes");
    expect_close(&mut ws, 1000).await;
}

// Namespace only: routing, validation and the WebSocket framing rules are the server's,
// the same for every driver.
#[tokio::test]
async fn port_route_errors_and_protocol_violations() {
    let Some(s) = Server::start("port_route_errors_and_protocol_violations").await else {
        return;
    };
    let rt = runtime(&s, Isolation::Namespace).await;
    let session = s.session(&uniq("port-err"), &rt).await;

    // Documented.
    let doc: Value = s
        .http(reqwest::Method::GET, "/v1/openapi.json")
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("openapi JSON");
    assert!(
        doc["paths"]["/v1/sessions/{id}/ports/{port}"]["get"].is_object(),
        "route missing from the OpenAPI document"
    );

    // A session that does not exist.
    let (status, body) = open(&s, "no-such-session", "8080").await.expect_err("404");
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");

    // Not a port.
    for bad in ["0", "65536", "http"] {
        let (status, body) = open(&s, &session, bad).await.expect_err("400");
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["field"], "port", "{bad}: {body}");
    }

    // Not a WebSocket request.
    let resp = s
        .http(
            reqwest::Method::GET,
            &format!("/v1/sessions/{session}/ports/8080"),
        )
        .send()
        .await
        .expect("plain GET");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("JSON error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("WebSocket"),
        "{body}"
    );

    // Without the token.
    let url = format!("ws://127.0.0.1:{}/v1/sessions/{session}/ports/8080", s.port);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("no token: {:?}", other.map(|_| ())),
    }

    start_servers(&s, &session).await;
    // A text message: close 1003, and the tunnel is gone.
    let mut ws = open_when_listening(&s, &session, 8080).await;
    ws.send(Message::Text("GET / HTTP/1.0\r\n\r\n".into()))
        .await
        .expect("send text");
    let reason = expect_close(&mut ws, u16::from(CloseCode::Unsupported)).await;
    assert!(reason.contains("binary"), "{reason}");
    // Data after our end of input: close 1008 (the holding server never answers, so
    // the tunnel is still open when it arrives).
    let mut ws = open_when_listening(&s, &session, 7001).await;
    send(&mut ws, b"abc").await;
    send(&mut ws, b"").await;
    send(&mut ws, b"more").await;
    let reason = expect_close(&mut ws, u16::from(CloseCode::Policy)).await;
    assert!(reason.contains("end of input"), "{reason}");

    // A stopped session: 409, and it stays stopped.
    s.client
        .stop_session(&session)
        .await
        .expect("stop the session");
    let (status, body) = open(&s, &session, "8080").await.expect_err("409");
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict", "{body}");
    let state = s
        .client
        .get_session(&session)
        .await
        .expect("get session")
        .state;
    assert_eq!(state, berth_api::SessionState::Stopped);
}

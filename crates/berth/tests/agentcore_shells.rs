//! AgentCore interactive shells (`/runtimes/{arn}/ws/shells`) and the agent WebSocket
//! (`/runtimes/{arn}/ws`) against a real `berth server` and real sandboxes, driven with
//! a plain tokio-tungstenite client over HTTP with the admin bearer token (and the OAuth
//! subprotocol mode). The SDK's own clients, SigV4 and presigned URLs over HTTPS are
//! `tests/agentcore/test_shells.py`. No assertion depends on timing: waits poll until
//! `common::DEADLINE`.

mod common;

use std::path::Path;
use std::time::Instant;

use base64::Engine as _;
use berth_api::shell::{channel, ShellInfo};
use common::agentcore::{encode, sid, zip_for};
use common::{poll, uniq, Server, DEADLINE};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const ROLE: &str = "arn:aws:iam::123456789012:role/AgentRole";
const SESSION_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-session-id";
const SHELL_ID_HEADER: &str = "x-amzn-bedrock-agentcore-shell-id";

/// A runtime for shells only: its agent never runs.
const IDLE_AGENT: &str = "print('not started for shells')\n";

/// An agent whose `/ws` echoes (with the session id it was told), and closes with 4321
/// when asked to.
const WS_AGENT: &str = r#"from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()


@app.entrypoint
def invoke(payload, context):
    return {"ok": True}


@app.websocket
async def ws(websocket, context):
    await websocket.accept()
    while True:
        msg = await websocket.receive()
        if msg["type"] == "websocket.disconnect":
            return
        text = msg.get("text")
        if text == "close":
            await websocket.close(code=4321, reason="asked to")
            return
        if text is not None:
            await websocket.send_text(f"echo:{context.session_id}:{text}")
        else:
            await websocket.send_bytes(b"echo:" + msg["bytes"])


if __name__ == "__main__":
    app.run()
"#;

/// An agent without a WebSocket handler.
const PLAIN_AGENT: &str = r#"from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()


@app.entrypoint
def invoke(payload, context):
    return {"ok": True}


if __name__ == "__main__":
    app.run()
"#;

// ---- the agent's code zip (as agentcore_data.rs; the vendored packages are shared) ----

/// Create a runtime from `zip` and wait until it is READY; its id and ARN.
async fn deploy(s: &Server, zip: &Path, runtime: &str) -> (String, String) {
    let key = format!("{}.zip", uniq("agent"));
    let dest = s.data_dir.join("buckets/agents").join(&key);
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("bucket");
    if std::fs::hard_link(zip, &dest).is_err() {
        std::fs::copy(zip, &dest).expect("copy the zip");
    }
    let body = json!({
        "agentRuntimeName": format!("shell_{}", uniq("a").replace(['-', '.'], "_")),
        "roleArn": ROLE,
        "agentRuntimeArtifact": {"codeConfiguration": {
            "code": {"s3": {"bucket": "agents", "prefix": key}},
            "runtime": runtime,
            "entryPoint": ["main.py"],
        }},
    });
    let created = s
        .http(Method::PUT, "/runtimes/")
        .json(&body)
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 202);
    let created: Value = created.json().await.expect("json");
    let id = created["agentRuntimeId"].as_str().expect("id").to_string();
    let got = poll("the runtime to become READY", || async {
        let v: Value = s
            .http(Method::GET, &format!("/runtimes/{id}/"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (v["status"] != "CREATING").then_some(v)
    })
    .await;
    assert_eq!(got["status"], "READY", "{got}");
    (
        id,
        got["agentRuntimeArn"].as_str().expect("arn").to_string(),
    )
}

// ---- WebSocket clients ----

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A request to `/runtimes/{arn}/{op}?{query}` with the bearer token and the session id
/// header (each when given).
fn ws_request(
    s: &Server,
    arn: &str,
    op: &str,
    query: &str,
    token: Option<&str>,
    session: Option<&str>,
) -> Request {
    let url = format!(
        "ws://127.0.0.1:{}/runtimes/{}/{op}?{query}",
        s.port,
        encode(arn)
    );
    let mut req = url.into_client_request().expect("request");
    let h = req.headers_mut();
    if let Some(token) = token {
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
    }
    if let Some(sid) = session {
        h.insert(SESSION_HEADER, HeaderValue::from_str(sid).expect("header"));
    }
    req
}

/// The HTTP answer of a refused upgrade: status and `X-Amzn-ErrorType`.
async fn refused(req: Request) -> (u16, String) {
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get("x-amzn-errortype")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        ),
        Err(e) => panic!("unexpected error: {e:?}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

/// One shell client and everything it has received.
struct Term {
    ws: Ws,
    headers: tokio_tungstenite::tungstenite::http::HeaderMap,
    /// The first status frame.
    first: Value,
    /// Every channel-1 byte.
    out: Vec<u8>,
    stderr: String,
    /// Status frames after the first.
    statuses: Vec<Value>,
    heartbeats: Vec<Vec<u8>>,
    /// The close code, once the server closed.
    closed: Option<u16>,
}

impl Term {
    async fn connect(req: Request) -> Term {
        let (ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .unwrap_or_else(|e| panic!("connect: {e:?}"));
        let mut t = Term {
            ws,
            headers: resp.headers().clone(),
            first: Value::Null,
            out: Vec::new(),
            stderr: String::new(),
            statuses: Vec::new(),
            heartbeats: Vec::new(),
            closed: None,
        };
        t.until("the first status frame", |t| !t.statuses.is_empty())
            .await;
        t.first = t.statuses.remove(0);
        t
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }

    async fn send(&mut self, chan: u8, payload: &[u8]) {
        let mut msg = vec![chan];
        msg.extend_from_slice(payload);
        self.ws
            .send(Message::Binary(msg.into()))
            .await
            .expect("send to the shell");
    }

    async fn type_(&mut self, keys: &str) {
        self.send(channel::STDIN, keys.as_bytes()).await;
    }

    /// Read one message; `false` once the connection is over.
    async fn pump(&mut self) -> bool {
        let msg = match self.ws.next().await {
            Some(Ok(m)) => m,
            _ => return false,
        };
        match msg {
            Message::Binary(b) => {
                assert!(b.len() <= 64 * 1024, "message of {} bytes", b.len());
                assert!(!b.is_empty(), "empty message from the server");
                match b[0] {
                    channel::STDOUT => self.out.extend_from_slice(&b[1..]),
                    channel::STDERR => self.stderr.push_str(&String::from_utf8_lossy(&b[1..])),
                    channel::STATUS => self
                        .statuses
                        .push(serde_json::from_slice(&b[1..]).expect("status JSON")),
                    channel::HEARTBEAT => self.heartbeats.push(b[1..].to_vec()),
                    other => panic!("message on channel {other} from the server"),
                }
            }
            Message::Close(frame) => {
                self.closed = Some(frame.map_or(1005, |f| u16::from(f.code)));
            }
            _ => {}
        }
        true
    }

    /// Read until `done(self)` holds.
    async fn until(&mut self, what: &str, done: impl Fn(&Term) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.pump()).await {
                Ok(true) => {}
                Ok(false) => {
                    assert!(
                        done(self),
                        "connection ended while waiting for {what}; output: {:?}; statuses: {:?}",
                        self.text(),
                        self.statuses
                    );
                    return;
                }
                Err(_) => panic!(
                    "timed out waiting for {what}; output: {:?}; statuses: {:?}",
                    self.text(),
                    self.statuses
                ),
            }
        }
    }

    async fn until_output(&mut self, needle: &str) {
        self.until(&format!("output {needle:?}"), |t| t.text().contains(needle))
            .await;
    }

    async fn until_closed(&mut self) -> u16 {
        self.until("the close", |t| t.closed.is_some()).await;
        self.closed.expect("closed")
    }
}

fn attached(shell: &str, reconnected: bool) -> Value {
    json!({"kind": "Status", "apiVersion": "v1",
           "metadata": {"shellId": shell, "reconnected": reconnected}, "status": "Success"})
}

// ---- tests ----

#[tokio::test]
async fn shells_open_resize_reconnect_kick_and_exit() {
    let test = "shells_open_resize_reconnect_kick_and_exit";
    let Some((zip, runtime)) = zip_for(test, IDLE_AGENT, false).await else {
        return;
    };
    let Some(s) = Server::start(test).await else {
        return;
    };
    let (id, arn) = deploy(&s, &zip, &runtime).await;
    let sid = sid("shell");
    let connect = |shell: &str| {
        Term::connect(ws_request(
            &s,
            &arn,
            "ws/shells",
            &format!("qualifier=DEFAULT&shellId={shell}"),
            Some(&s.token),
            Some(&sid),
        ))
    };

    // Open: the 101 names the shell and the session; no subprotocol; the first frame.
    let mut a = connect("dbg").await;
    assert_eq!(a.header(SHELL_ID_HEADER), Some("dbg"));
    assert_eq!(a.header(SESSION_HEADER), Some(sid.as_str()));
    assert_eq!(a.header("sec-websocket-protocol"), None);
    assert_eq!(a.first, attached("dbg", false));
    a.type_("X=$((6*7)); echo hi-$X\n").await;
    a.until_output("hi-42").await;

    // Resize, then the terminal says so; heartbeats come back as one 0x05.
    a.send(channel::RESIZE, br#"{"width": 101, "height": 33}"#)
        .await;
    a.type_("stty size\n").await;
    a.until_output("33 101").await;
    a.send(channel::HEARTBEAT, b"").await;
    a.until("the heartbeat", |t| !t.heartbeats.is_empty()).await;
    assert_eq!(a.heartbeats, [Vec::<u8>::new()]);

    // It is a Berth shell of the runtime session's native session.
    let native = format!("ac.{id}.{sid}");
    let shells: Vec<ShellInfo> = s
        .http(Method::GET, &format!("/v1/sessions/{native}/shells"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert!(
        shells.iter().any(|sh| sh.shell_id == "dbg" && sh.running),
        "{shells:?}"
    );

    // Leave (the SDK's close(): a plain close, S12): the PTY stays.
    a.ws.close(None).await.expect("close");
    while a.pump().await {}

    // Reconnect: reconnected, the earlier output replayed, the same shell state.
    let mut b = connect("dbg").await;
    assert_eq!(b.first, attached("dbg", true));
    b.until_output("hi-42").await;
    b.type_("echo again-$X\n").await;
    b.until_output("again-42").await;

    // A newer client of the same shell kicks the older one with 4000; the PTY stays.
    let mut c = connect("dbg").await;
    assert_eq!(c.first, attached("dbg", true));
    assert_eq!(b.until_closed().await, 4000);
    c.type_("echo still-$((1+1))\n").await;
    c.until_output("still-2").await;

    // Exit: the status §8 names, empty metadata, then 1000.
    c.type_("exit 3\n").await;
    assert_eq!(c.until_closed().await, 1000);
    assert_eq!(
        c.statuses.last(),
        Some(&json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": "NonZeroExitCode", "message": "command terminated with exit code 3",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
        })),
        "{:?}",
        c.statuses
    );

    // The id of an exited shell opens a new shell.
    let mut d = connect("dbg").await;
    assert_eq!(d.first, attached("dbg", false));
    d.type_("echo fresh-${X:-unset}\n").await;
    d.until_output("fresh-unset").await;
    d.type_("exit\n").await;
    assert_eq!(d.until_closed().await, 1000);
    assert_eq!(
        d.statuses.last(),
        Some(&json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}))
    );
}

#[tokio::test]
async fn shells_oauth_subprotocol_query_session_and_refusals() {
    let test = "shells_oauth_subprotocol_query_session_and_refusals";
    let Some((zip, runtime)) = zip_for(test, IDLE_AGENT, false).await else {
        return;
    };
    let Some(s) = Server::start(test).await else {
        return;
    };
    let (_, arn) = deploy(&s, &zip, &runtime).await;
    let sid = sid("oauth");
    let oauth = |token: &str| {
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
        let mut req = ws_request(
            &s,
            &arn,
            "ws/shells",
            &format!("shellId=web&X-Amzn-Bedrock-AgentCore-Runtime-Session-Id={sid}"),
            None,
            None,
        );
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&format!(
                "base64UrlBearerAuthorization.{encoded}, base64UrlBearerAuthorization"
            ))
            .expect("header"),
        );
        req
    };

    // The OAuth mode: the token as a subprotocol, the session id in the query.
    let mut t = Term::connect(oauth(&s.token)).await;
    assert_eq!(
        t.header("sec-websocket-protocol"),
        Some("base64UrlBearerAuthorization")
    );
    assert_eq!(t.header(SESSION_HEADER), Some(sid.as_str()));
    assert_eq!(t.first, attached("web", false));
    t.type_("echo ok-$((2+3))\n").await;
    t.until_output("ok-5").await;
    // Bad input is reported on channel 2; a status frame would end the SDK's session.
    t.send(9, b"x").await;
    t.send(channel::RESIZE, b"{}").await;
    t.until("two diagnostics", |t| {
        t.stderr.matches("ignored").count() >= 2
    })
    .await;
    assert!(t.statuses.is_empty(), "{:?}", t.statuses);

    // Refusals, before any upgrade.
    assert_eq!(
        refused(oauth("not-a-token")).await.1,
        "UnrecognizedClientException"
    );
    let anonymous = ws_request(&s, &arn, "ws/shells", "shellId=x", None, Some(&sid));
    assert!(refused(anonymous).await.0 >= 400);
    let bad_id = ws_request(
        &s,
        &arn,
        "ws/shells",
        "shellId=a%20b",
        Some(&s.token),
        Some(&sid),
    );
    assert_eq!(refused(bad_id).await, (400, "ValidationException".into()));
    let elsewhere = "arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/nope-AbCdE12345";
    let missing = ws_request(
        &s,
        elsewhere,
        "ws/shells",
        "shellId=x",
        Some(&s.token),
        Some(&sid),
    );
    assert_eq!(
        refused(missing).await,
        (404, "ResourceNotFoundException".into())
    );
    // Not a WebSocket upgrade.
    let plain = s
        .http(
            Method::GET,
            &format!("/runtimes/{}/ws/shells?shellId=x", encode(&arn)),
        )
        .header(SESSION_HEADER, &sid)
        .send()
        .await
        .expect("get");
    assert_eq!(plain.status(), 400);
    assert_eq!(
        plain
            .headers()
            .get("x-amzn-errortype")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("ValidationException")
    );
}

#[tokio::test]
async fn agent_websocket_is_proxied_and_a_missing_handler_closes_1011() {
    let test = "agent_websocket_is_proxied_and_a_missing_handler_closes_1011";
    let Some((ws_zip, runtime)) = zip_for(test, WS_AGENT, true).await else {
        return;
    };
    let Some((plain_zip, _)) = zip_for(test, PLAIN_AGENT, true).await else {
        return;
    };
    let Some(s) = Server::start(test).await else {
        return;
    };
    let (_, arn) = deploy(&s, &ws_zip, &runtime).await;
    let sid = sid("ws");

    // The session id in a header: the agent is started, and hears it.
    let req = ws_request(
        &s,
        &arn,
        "ws",
        "qualifier=DEFAULT",
        Some(&s.token),
        Some(&sid),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    assert_eq!(
        resp.headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some(sid.as_str())
    );
    ws.send(Message::Text("hello".into())).await.expect("send");
    let got = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("in time");
    assert_eq!(
        got.expect("message").expect("ok"),
        Message::Text(format!("echo:{sid}:hello").into())
    );
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .expect("send");
    let got = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("in time");
    assert_eq!(
        got.expect("message").expect("ok"),
        Message::Binary(b"echo:\x01\x02\x03".to_vec().into())
    );
    // The agent's close comes through with its code and reason.
    ws.send(Message::Text("close".into())).await.expect("send");
    let got = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("in time");
    match got.expect("message").expect("ok") {
        Message::Close(Some(f)) => {
            assert_eq!((u16::from(f.code), f.reason.as_str()), (4321, "asked to"))
        }
        other => panic!("expected the agent's close, got {other:?}"),
    }

    // The session id in the query (presigned URLs): the same session (a new one would
    // have been made up without it), the agent already running.
    let req = ws_request(
        &s,
        &arn,
        "ws",
        &format!("X-Amzn-Bedrock-AgentCore-Runtime-Session-Id={sid}"),
        Some(&s.token),
        None,
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    ws.send(Message::Text("again".into())).await.expect("send");
    let got = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("in time");
    assert_eq!(
        got.expect("message").expect("ok"),
        Message::Text(format!("echo:{sid}:again").into())
    );
    ws.close(None).await.expect("close");

    // An agent without @app.websocket: the upgrade succeeds, then closes with 1011.
    let (_, plain) = deploy(&s, &plain_zip, &runtime).await;
    let req = ws_request(&s, &plain, "ws", "", Some(&s.token), Some(&sid));
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let got = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("in time");
    match got.expect("message").expect("ok") {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 1011, "{f:?}");
            assert!(f.reason.contains("refused"), "{f:?}");
        }
        other => panic!("expected a close, got {other:?}"),
    }
}

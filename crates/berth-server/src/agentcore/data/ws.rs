//! The agent's WebSocket: `GET /runtimes/{runtime}/ws[?qualifier=…]`, what the SDK's
//! `generate_ws_connection`, `generate_presigned_url` and `generate_ws_connection_oauth`
//! connect to (`docs/design/agentcore-wire.md` §4.5), proxied to the agent's own `/ws`
//! (`BedrockAgentCoreApp`'s `@app.websocket`).
//!
//! The address and the session are checked and opened before the client's 101 (errors
//! are AWS errors, as for an invoke). Then the client is upgraded at once, since
//! starting a cold session's agent takes longer than WebSocket clients wait for a
//! handshake, and the agent is started as for an invoke and reached with a WebSocket
//! handshake to its `/ws` over a port tunnel to the protocol's port (8080 for HTTP),
//! carrying the headers an invoke forwards (the session id, a new request id, the user
//! id, trace and custom headers, the `requestHeaderAllowlist`; never credentials).
//! What the client sends meanwhile is kept for the agent (up to 1 MiB). An agent that
//! cannot be started or reached closes the client with 1011 and the reason; so does one
//! that refuses the handshake (an app without `@app.websocket` closes before accepting,
//! which its server answers with HTTP 403): its close, passed on.
//!
//! Messages then go both ways unchanged (text, binary); each side's pings are answered
//! by its own WebSocket layer. A close from one side is passed to the other with its
//! code and reason; a side that goes away without one closes the other (1000 towards
//! the agent, 1011 towards the client). The tunnel keeps the session busy while the
//! connection lasts.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::{
    rejection::WebSocketUpgradeRejection, CloseFrame, Message, WebSocket, WebSocketUpgrade,
};
use axum::extract::Extension;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use berth_core::{CoreError, PortStream};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as AgentMessage};
use tokio_tungstenite::WebSocketStream;

use super::agent::{nothing_listens, AGENT_SHELL};
use super::invoke::forwarded_headers;
use super::sessions::{ws_session_id, RuntimeSession};
use super::{address, runtime_client_error, set_header, REQUEST_ID_HEADER, SESSION_HEADER};
use crate::agentcore::request_id::{new_id, RequestId};
use crate::agentcore::{Ac, AgentCore, AwsError, ErrorShape, PathParams, Query};

/// The agent's WebSocket path (`app.py`).
const AGENT_PATH: &str = "/ws";
/// How long to wait for the other side's close once one side closed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// What the client may send before the agent is ready (kept for it meanwhile).
const EARLY_LIMIT: usize = 1 << 20;
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_INTERNAL: u16 = 1011;

type AgentSocket = WebSocketStream<PortStream>;
type ClientTx = SplitSink<WebSocket, Message>;
type ClientRx = SplitStream<WebSocket>;
type AgentTx = SplitSink<AgentSocket, AgentMessage>;
type AgentRx = SplitStream<AgentSocket>;

/// The agent's side of the connection.
enum Agent {
    Open(Box<AgentSocket>),
    /// The agent refused the handshake: the close reason for the client.
    Refused(String),
}

/// The handshake request to the agent's `/ws`.
fn agent_request(
    port: u16,
    incoming: &HeaderMap,
    allowlist: &[String],
    sid: &str,
    rid: &str,
) -> Result<tungstenite::handshake::client::Request, AwsError> {
    let mut req = format!("ws://127.0.0.1:{port}{AGENT_PATH}")
        .into_client_request()
        .map_err(|e| {
            tracing::error!(error = %e, "agentcore: cannot build the agent's WebSocket request");
            AwsError::internal()
        })?;
    let headers = req.headers_mut();
    for (name, value) in &forwarded_headers(incoming, allowlist) {
        // The handshake's own headers are the client library's, not the caller's.
        if !name.as_str().starts_with("sec-websocket-") {
            headers.append(name.clone(), value.clone());
        }
    }
    for (name, value) in [(SESSION_HEADER, sid), (REQUEST_ID_HEADER, rid)] {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
    Ok(req)
}

/// A close reason fits in a control frame (123 bytes), cut at a character boundary.
fn short_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

impl AgentCore {
    /// Start the session's agent as needed and open a WebSocket to its `/ws`. A
    /// connection that finds nothing listening (the agent stopped meanwhile) is tried
    /// once more after making sure the agent runs.
    async fn agent_socket(
        &self,
        s: &RuntimeSession,
        headers: &HeaderMap,
        sid: &str,
        rid: &str,
    ) -> Result<Agent, AwsError> {
        self.ensure_agent(s).await?;
        let port = s.target.protocol.port;
        let mut retried = false;
        loop {
            let stream = match self.core().connect_port(&s.native, port).await {
                Ok(stream) => stream,
                Err(e) => {
                    if !(matches!(e, CoreError::Conflict(_)) || nothing_listens(&e)) {
                        return Err(e.into());
                    }
                    self.inner.data.set_ready(&s.native, None);
                    if retried {
                        return Err(runtime_client_error(format!(
                            "nothing listens on port {port} in the session's sandbox; the agent \
                             stopped (see its shell {AGENT_SHELL})"
                        )));
                    }
                    retried = true;
                    self.ensure_agent(s).await?;
                    continue;
                }
            };
            let req = agent_request(port, headers, &s.target.header_allowlist, sid, rid)?;
            return match tokio_tungstenite::client_async(req, stream).await {
                Ok((socket, _)) => Ok(Agent::Open(Box::new(socket))),
                Err(tungstenite::Error::Http(resp)) => {
                    tracing::info!(session = %s.native, status = %resp.status(),
                        "agentcore: the agent refused a WebSocket at {AGENT_PATH}");
                    Ok(Agent::Refused(short_reason(&format!(
                        "the agent refused {AGENT_PATH}: HTTP {} (no @app.websocket handler?)",
                        resp.status().as_u16()
                    ))))
                }
                Err(e) => Err(runtime_client_error(format!(
                    "the WebSocket handshake with the agent's {AGENT_PATH} on port {port} failed: {e}"
                ))),
            };
        }
    }
}

/// What both WebSocket routes (`/ws`, `/ws/shells`) do first: address the runtime,
/// insist on an upgrade, and open (resume or start) the runtime session `sid`.
pub(super) async fn upgrade_session(
    ac: &AgentCore,
    segment: &str,
    query: &HashMap<String, String>,
    sid: &str,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<(WebSocketUpgrade, RuntimeSession), AwsError> {
    let addr = address::parse(ac.config(), segment, query)?;
    let ws = ws.map_err(|rej| {
        AwsError::new(
            ErrorShape::Validation,
            format!("this operation upgrades to a WebSocket: {rej}"),
        )
    })?;
    let target = ac
        .resolve(&addr.runtime_id, addr.qualifier.as_deref())
        .await?;
    Ok((ws, ac.open_session(target, sid).await?))
}

/// `GET /runtimes/{runtime}/ws[?qualifier=…]`.
pub(crate) async fn agent_ws(
    Ac(ac): Ac,
    PathParams(segment): PathParams<String>,
    Query(query): Query,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let sid = match ws_session_id(&headers, &query) {
        Ok(sid) => sid,
        Err(e) => return e.into_response(),
    };
    let rid = request_id.map_or_else(new_id, |Extension(RequestId(id))| id);
    let result = async {
        let (ws, s) = upgrade_session(&ac, &segment, &query, &sid, ws).await?;
        let (sid, rid) = (sid.clone(), rid.clone());
        Ok::<_, AwsError>(ws.on_upgrade(move |client| async move {
            serve(client, ac, s, headers, sid, rid).await;
        }))
    }
    .await;
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    set_header(&mut resp, SESSION_HEADER, &sid);
    set_header(&mut resp, REQUEST_ID_HEADER, &rid);
    resp
}

/// Reach the agent, then pump. Starting a cold session's agent takes longer than
/// WebSocket clients wait for a handshake (websockets' `open_timeout` is 10 s), so the
/// client's upgrade comes first; meanwhile its messages are read (which answers its
/// pings) and kept for the agent, up to [`EARLY_LIMIT`] bytes. An agent that cannot be
/// started or reached closes the client with 1011 and the reason.
async fn serve(
    client: WebSocket,
    ac: AgentCore,
    s: RuntimeSession,
    headers: HeaderMap,
    sid: String,
    rid: String,
) {
    let (mut client_tx, mut client_rx) = client.split();
    let mut early = Vec::new();
    let mut early_bytes = 0;
    let connect = ac.agent_socket(&s, &headers, &sid, &rid);
    tokio::pin!(connect);
    let agent = loop {
        tokio::select! {
            agent = &mut connect => break agent,
            msg = client_rx.next() => match msg {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) => {
                    // The close is answered as the sink closes.
                    let _ = client_tx.close().await;
                    return;
                }
                Some(Ok(msg)) => {
                    early_bytes += msg.clone().into_data().len();
                    if early_bytes > EARLY_LIMIT {
                        let _ = client_tx
                            .send(close_to_client(
                                CLOSE_TOO_BIG,
                                "too much sent before the agent was ready",
                            ))
                            .await;
                        return;
                    }
                    early.push(msg);
                }
                Some(Err(_)) | None => return,
            },
        }
    };
    let agent = match agent {
        Ok(Agent::Open(agent)) => *agent,
        Ok(Agent::Refused(reason)) => {
            refuse(client_tx, client_rx, &reason).await;
            return;
        }
        Err(e) => {
            tracing::info!(session = %s.native, error = %e.message,
                "agentcore: a WebSocket client could not reach the agent");
            let reason = short_reason(&format!("the agent is not available: {}", e.message));
            refuse(client_tx, client_rx, &reason).await;
            return;
        }
    };
    let (mut agent_tx, agent_rx) = agent.split();
    for msg in early.into_iter().filter_map(to_agent) {
        if agent_tx.send(msg).await.is_err() {
            break;
        }
    }
    proxy(client_tx, client_rx, agent_tx, agent_rx, &s.native).await;
}

/// Close the client with 1011 and `reason`, and let it answer.
async fn refuse(mut tx: ClientTx, mut rx: ClientRx, reason: &str) {
    let _ = tx.send(close_to_client(CLOSE_INTERNAL, reason)).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(msg)) = rx.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// A client message for the agent; `None` for pings and pongs (each side answers its own).
fn to_agent(msg: Message) -> Option<AgentMessage> {
    Some(match msg {
        Message::Text(t) => AgentMessage::Text(t.as_str().into()),
        Message::Binary(b) => AgentMessage::Binary(b),
        Message::Close(frame) => {
            AgentMessage::Close(frame.map(|f| tungstenite::protocol::CloseFrame {
                code: CloseCode::from(f.code),
                reason: f.reason.as_str().into(),
            }))
        }
        Message::Ping(_) | Message::Pong(_) => return None,
    })
}

/// An agent message for the client; `None` for pings, pongs and raw frames.
fn to_client(msg: AgentMessage) -> Option<Message> {
    Some(match msg {
        AgentMessage::Text(t) => Message::Text(t.as_str().into()),
        AgentMessage::Binary(b) => Message::Binary(b),
        AgentMessage::Close(frame) => Message::Close(frame.map(|f| CloseFrame {
            code: u16::from(f.code),
            reason: f.reason.as_str().into(),
        })),
        AgentMessage::Ping(_) | AgentMessage::Pong(_) | AgentMessage::Frame(_) => return None,
    })
}

fn close_to_client(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Pump messages both ways until one side closes (its close passed on) or goes away.
async fn proxy(
    mut client_tx: ClientTx,
    mut client_rx: ClientRx,
    mut agent_tx: AgentTx,
    mut agent_rx: AgentRx,
    session: &str,
) {
    let up = async {
        while let Some(Ok(msg)) = client_rx.next().await {
            let Some(msg) = to_agent(msg) else { continue };
            let is_close = matches!(msg, AgentMessage::Close(_));
            if agent_tx.send(msg).await.is_err() || is_close {
                return;
            }
        }
        // The client went away without a close.
        let _ = agent_tx
            .send(AgentMessage::Close(Some(
                tungstenite::protocol::CloseFrame {
                    code: CloseCode::from(CLOSE_NORMAL),
                    reason: "the client went away".into(),
                },
            )))
            .await;
    };
    let down = async {
        loop {
            match agent_rx.next().await {
                Some(Ok(msg)) => {
                    let Some(msg) = to_client(msg) else { continue };
                    let is_close = matches!(msg, Message::Close(_));
                    if client_tx.send(msg).await.is_err() || is_close {
                        return;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(session, error = %e, "agentcore: the agent's WebSocket failed");
                    break;
                }
                None => break,
            }
        }
        let _ = client_tx
            .send(close_to_client(
                CLOSE_INTERNAL,
                "the agent's connection ended",
            ))
            .await;
    };
    tokio::pin!(up, down);
    // Once one direction is over, give the other a moment for the close handshake.
    tokio::select! {
        () = &mut up => { let _ = tokio::time::timeout(CLOSE_GRACE, &mut down).await; }
        () = &mut down => { let _ = tokio::time::timeout(CLOSE_GRACE, &mut up).await; }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_agent_gets_the_invoke_headers_but_not_the_handshake_or_credentials() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "AWS4-HMAC-SHA256 Credential=AKID"),
            ("sec-websocket-key", "client's key"),
            (
                "sec-websocket-protocol",
                "base64UrlBearerAuthorization.dG9r",
            ),
            ("x-amzn-bedrock-agentcore-runtime-custom-tenant", "t1"),
            ("x-amzn-bedrock-agentcore-runtime-user-id", "user-1"),
            (SESSION_HEADER, "the caller's, replaced"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let req = agent_request(
            8080,
            &h,
            &["Sec-WebSocket-Key".into()],
            &"s".repeat(40),
            "rid",
        )
        .unwrap();
        assert_eq!(req.uri(), "ws://127.0.0.1:8080/ws");
        let got = req.headers();
        assert!(got.get("authorization").is_none());
        assert!(got.get("sec-websocket-protocol").is_none());
        assert_ne!(got.get("sec-websocket-key").unwrap(), "client's key");
        assert_eq!(got.get_all("sec-websocket-key").iter().count(), 1);
        assert_eq!(
            got.get("x-amzn-bedrock-agentcore-runtime-custom-tenant")
                .unwrap(),
            "t1"
        );
        assert_eq!(
            got.get("x-amzn-bedrock-agentcore-runtime-user-id").unwrap(),
            "user-1"
        );
        assert_eq!(got.get(SESSION_HEADER).unwrap(), "s".repeat(40).as_str());
        assert_eq!(got.get(REQUEST_ID_HEADER).unwrap(), "rid");
    }

    #[test]
    fn messages_and_closes_cross_unchanged() {
        let AgentMessage::Text(t) = to_agent(Message::Text("hi".into())).unwrap() else {
            panic!("text")
        };
        assert_eq!(t.as_str(), "hi");
        let close = to_client(AgentMessage::Close(Some(
            tungstenite::protocol::CloseFrame {
                code: CloseCode::from(1011),
                reason: "boom".into(),
            },
        )))
        .unwrap();
        let Message::Close(Some(f)) = close else {
            panic!("close")
        };
        assert_eq!((f.code, f.reason.as_str()), (1011, "boom"));
        assert!(to_agent(Message::Ping(Default::default())).is_none());
        assert_eq!(short_reason(&"é".repeat(100)).len(), 122);
    }
}

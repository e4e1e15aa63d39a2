//! InvokeAgentRuntime (`POST /runtimes/{runtime}/invocations`) and GetAgentCard
//! (`GET /runtimes/{runtime}/invocations/.well-known/agent-card.json`).
//!
//! The payload (≤ 100 MB, buffered: SigV4 hashes it anyway) goes to the agent as
//! `POST <protocol path>` on the protocol's port, with the headers the contract names
//! (§4.1, §9): `Content-Type`, `Accept`, the session id, a request id (also returned),
//! the user id, trace and MCP headers, `X-Amzn-Bedrock-AgentCore-Runtime-Custom-*`, and
//! the version's `requestHeaderAllowlist`. Never the caller's `Authorization` (a SigV4
//! signature or a Berth token), `X-Amz-*`, or hop-by-hop headers. The agent's answer
//! streams back unbuffered, chunk by chunk (SSE arrives as the agent writes it), with its
//! 2xx status and `Content-Type`. An agent 4xx/5xx becomes 424 `RuntimeClientError` with
//! the agent's body in the message: never a 5xx, which botocore would retry (S10).

use axum::body::Body as AxumBody;
use axum::extract::Extension;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::agent::{nothing_listens, request, send, SendError};
use super::sessions::{session_id, RuntimeSession};
use super::{
    address, echo_trace_headers, runtime_client_error, set_header, CUSTOM_HEADER_PREFIX,
    MCP_HEADERS, REQUEST_ID_HEADER, SESSION_HEADER, TRACE_HEADERS, USER_ID_HEADER,
};
use crate::agentcore::request_id::{new_id, RequestId};
use crate::agentcore::{Ac, AgentCore, AwsError, PathParams, Query};

/// The payload limit (`DP:shapes.Body.max`).
pub const MAX_PAYLOAD: usize = 100_000_000;
/// How much of an agent's error body goes into the RuntimeClientError message.
const ERROR_BODY_LIMIT: usize = 16 * 1024;
/// The agent card's size limit.
const AGENT_CARD_LIMIT: usize = 1 << 20;

/// Caller headers that never reach the agent, even when allow-listed: credentials, the
/// request's framing, and hop-by-hop headers.
fn never_forwarded(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "proxy-authorization"
            | "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
            | "proxy-connection"
    ) || name.starts_with("x-amz-")
        || name.starts_with("amz-sdk-")
        || name == SESSION_HEADER
        || name == REQUEST_ID_HEADER
}

/// The caller's headers that go to the agent (names are lower-case in a `HeaderMap`).
pub fn forwarded_headers(incoming: &HeaderMap, allowlist: &[String]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in incoming {
        let n = name.as_str();
        if never_forwarded(n) {
            continue;
        }
        let wanted = n == "content-type"
            || n == "accept"
            || n == USER_ID_HEADER
            || TRACE_HEADERS.contains(&n)
            || MCP_HEADERS.contains(&n)
            || n.starts_with(CUSTOM_HEADER_PREFIX)
            || allowlist.iter().any(|a| a.eq_ignore_ascii_case(n));
        if wanted {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Read up to `limit` bytes of a body, as text (for error messages).
async fn body_text(body: Incoming, limit: usize) -> String {
    let mut body = body;
    let mut buf = Vec::new();
    let mut truncated = false;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                buf.truncate(limit);
                truncated = true;
                break;
            }
        }
    }
    let mut text = String::from_utf8_lossy(&buf).trim().to_string();
    if truncated {
        text.push_str(" …");
    }
    text
}

impl AgentCore {
    /// Send a request to the session's agent on `port`, starting the agent first as
    /// needed. A request that could not be delivered (the sandbox stopped meanwhile, or
    /// the agent no longer listens) is retried once after making sure the agent runs.
    async fn agent_request(
        &self,
        s: &RuntimeSession,
        port: u16,
        make: impl Fn() -> Result<Request<Full<Bytes>>, AwsError>,
    ) -> Result<axum::http::Response<Incoming>, AwsError> {
        self.ensure_agent(s).await?;
        let mut retried = false;
        loop {
            match send(self.core(), &s.native, port, make()?).await {
                Ok(resp) => return Ok(resp),
                Err(SendError::Connect(e)) => {
                    let retryable =
                        matches!(e, berth_core::CoreError::Conflict(_)) || nothing_listens(&e);
                    if !retryable {
                        return Err(e.into());
                    }
                    self.inner.data.set_ready(&s.native, None);
                    if retried {
                        return Err(runtime_client_error(format!(
                            "nothing listens on port {port} in the session's sandbox; the agent \
                             stopped (see its shell {})",
                            super::agent::AGENT_SHELL
                        )));
                    }
                    retried = true;
                    self.ensure_agent(s).await?;
                }
                Err(SendError::Http(e)) => {
                    return Err(runtime_client_error(format!(
                        "the connection to the agent failed before it answered: {e}"
                    )))
                }
            }
        }
    }
}

/// `POST /runtimes/{runtime}/invocations`.
pub(crate) async fn invoke(
    Ac(ac): Ac,
    PathParams(segment): PathParams<String>,
    Query(query): Query,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    body: AxumBody,
) -> Response {
    let sid = match session_id(&headers, true) {
        Ok(sid) => sid,
        Err(e) => return e.into_response(),
    };
    let rid = request_id.map_or_else(new_id, |Extension(RequestId(id))| id);
    let result = async {
        let addr = address::parse(ac.config(), &segment, &query)?;
        let target = ac
            .resolve(&addr.runtime_id, addr.qualifier.as_deref())
            .await?;
        let payload = axum::body::to_bytes(body, MAX_PAYLOAD).await.map_err(|e| {
            AwsError::field(
                "payload",
                format!("cannot read the payload (at most {MAX_PAYLOAD} bytes): {e}"),
            )
        })?;
        let s = ac.open_session(target, &sid).await?;
        let protocol = s.target.protocol.clone();
        let mut fwd = forwarded_headers(&headers, &s.target.header_allowlist);
        for (name, value) in [(SESSION_HEADER, &sid), (REQUEST_ID_HEADER, &rid)] {
            if let Ok(v) = HeaderValue::from_str(value) {
                fwd.insert(HeaderName::from_static(name), v);
            }
        }
        let resp = ac
            .agent_request(&s, protocol.port, || {
                let mut req = request(Method::POST, protocol.port, &protocol.path)
                    .body(Full::new(payload.clone()))
                    .map_err(|_| AwsError::internal())?;
                req.headers_mut().extend(fwd.clone());
                Ok(req)
            })
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let text = body_text(resp.into_body(), ERROR_BODY_LIMIT).await;
            return Err(runtime_client_error(format!(
                "the agent answered {status}: {text}"
            )));
        }
        let mut out = Response::builder().status(status);
        let agent_headers = resp.headers();
        let content_type = agent_headers
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
        out = out.header(header::CONTENT_TYPE, content_type);
        for name in ["mcp-session-id", "mcp-protocol-version"] {
            if let Some(v) = agent_headers.get(name) {
                out = out.header(name, v.clone());
            }
        }
        out.body(AxumBody::new(resp.into_body()))
            .map_err(|_| AwsError::internal())
    }
    .await;
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    set_header(&mut resp, SESSION_HEADER, &sid);
    set_header(&mut resp, REQUEST_ID_HEADER, &rid);
    echo_trace_headers(&mut resp, &headers);
    resp
}

/// `GET /runtimes/{runtime}/invocations/.well-known/agent-card.json`: the A2A agent card,
/// from the agent's `/.well-known/agent-card.json` on the protocol's port.
pub(crate) async fn agent_card(
    Ac(ac): Ac,
    PathParams(segment): PathParams<String>,
    Query(query): Query,
    headers: HeaderMap,
) -> Response {
    let sid = match session_id(&headers, true) {
        Ok(sid) => sid,
        Err(e) => return e.into_response(),
    };
    let result = async {
        let addr = address::parse(ac.config(), &segment, &query)?;
        let target = ac
            .resolve(&addr.runtime_id, addr.qualifier.as_deref())
            .await?;
        let s = ac.open_session(target, &sid).await?;
        let port = s.target.protocol.port;
        let resp = ac
            .agent_request(&s, port, || {
                let mut req = request(Method::GET, port, "/.well-known/agent-card.json")
                    .body(Full::new(Bytes::new()))
                    .map_err(|_| AwsError::internal())?;
                if let Ok(v) = HeaderValue::from_str(&sid) {
                    req.headers_mut().insert(SESSION_HEADER, v);
                }
                Ok(req)
            })
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let text = body_text(resp.into_body(), ERROR_BODY_LIMIT).await;
            return Err(runtime_client_error(format!(
                "the agent answered {status} for /.well-known/agent-card.json: {text}"
            )));
        }
        let bytes = http_body_util::Limited::new(resp.into_body(), AGENT_CARD_LIMIT)
            .collect()
            .await
            .map_err(|e| runtime_client_error(format!("cannot read the agent card: {e}")))?
            .to_bytes();
        if serde_json::from_slice::<serde_json::Value>(&bytes).is_err() {
            return Err(runtime_client_error(
                "the agent's /.well-known/agent-card.json is not JSON",
            ));
        }
        Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response())
    }
    .await;
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    set_header(&mut resp, SESSION_HEADER, &sid);
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn which_headers_reach_the_agent() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
            ("authorization", "AWS4-HMAC-SHA256 Credential=AKID"),
            ("x-amz-date", "20261121T000000Z"),
            ("x-amz-security-token", "secret"),
            ("amz-sdk-invocation-id", "x"),
            ("host", "berth:8443"),
            ("content-length", "2"),
            ("user-agent", "Boto3"),
            (USER_ID_HEADER, "user-1"),
            ("traceparent", "00-abc-def-01"),
            ("mcp-session-id", "m"),
            ("x-amzn-bedrock-agentcore-runtime-custom-tenant", "t1"),
            ("x-tenant", "allowed"),
            ("x-other", "not allowed"),
            (SESSION_HEADER, "the caller's, replaced"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = forwarded_headers(&h, &["X-Tenant".into(), "Authorization".into()]);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "content-type",
                "mcp-session-id",
                "traceparent",
                "x-amzn-bedrock-agentcore-runtime-custom-tenant",
                "x-amzn-bedrock-agentcore-runtime-user-id",
                "x-tenant",
            ]
        );
    }
}

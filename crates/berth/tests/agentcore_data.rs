//! The AgentCore-compatible data plane against a real `berth server` and real sandboxes,
//! over HTTP with the admin bearer token: a real `BedrockAgentCoreApp` agent
//! (bedrock-agentcore 1.25.0 from PyPI, vendored into the code zip, since the sandbox's
//! python sees no venv) answering InvokeAgentRuntime with JSON and SSE, per-session
//! state, RuntimeClientError, InvokeAgentRuntimeCommand's event stream (decoded here),
//! StopRuntimeSession and resume, and the errors for unknown runtimes and sessions.
//!
//! The vendored packages and the zip are built once under `CARGO_TARGET_TMPDIR` (pip's
//! cache makes a rebuild quick); every test links the zip into its server's object store.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::agentcore::{encode, sid, zip_for};
use common::{poll, uniq, Server};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

const ROLE: &str = "arn:aws:iam::123456789012:role/AgentRole";
const SESSION_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-session-id";

/// The agent: echo (with what it was told), a per-process counter, an SSE stream that
/// waits for a file between its two events, and a failure.
const AGENT: &str = r#"import os
import time

from bedrock_agentcore import BedrockAgentCoreApp
from bedrock_agentcore.runtime.context import BedrockAgentCoreContext

app = BedrockAgentCoreApp()
COUNT = 0


def stream(release):
    yield {"i": 0}
    while not os.path.exists(release):
        time.sleep(0.05)
    yield {"i": 1}


@app.entrypoint
def invoke(payload, context):
    global COUNT
    action = payload.get("action")
    if action == "count":
        COUNT += 1
        return {"count": COUNT}
    if action == "stream":
        return stream(payload["release"])
    if action == "fail":
        raise RuntimeError("the agent failed on purpose")
    return {
        "echo": payload,
        "session": context.session_id,
        "request_id": BedrockAgentCoreContext.get_request_id(),
        "headers": dict(context.request_headers or {}),
        "cwd": os.getcwd(),
        "docker": os.environ.get("DOCKER_CONTAINER"),
    }


if __name__ == "__main__":
    app.run()
"#;

// ---- the agent's code zip ----

/// The agent zip and its managed runtime, or `None` (printed) when this host cannot
/// build it (no python3.N, no pip, no PyPI).
async fn agent(test: &str, main_py: &'static str) -> Option<(PathBuf, String)> {
    zip_for(test, main_py, true).await
}

// ---- HTTP ----

/// An HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn error_type(&self) -> Option<&str> {
        self.header("x-amzn-errortype")
    }
    #[track_caller]
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.error_type()),
            (status, Some(code)),
            "{self:?}: {}",
            String::from_utf8_lossy(&self.body)
        );
    }
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("request");
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body = resp.bytes().await.expect("body");
    Answer {
        status,
        headers,
        body,
    }
}

fn dp(arn: &str, op: &str) -> String {
    format!("/runtimes/{}/{op}", encode(arn))
}

/// Create a runtime from `zip` and wait until it is READY; its id and ARN.
async fn deploy(s: &Server, zip: &Path, runtime: &str, extra: Value) -> (String, String) {
    let key = format!("{}.zip", uniq("agent"));
    let dest = s.data_dir.join("buckets/agents").join(&key);
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("bucket");
    if std::fs::hard_link(zip, &dest).is_err() {
        std::fs::copy(zip, &dest).expect("copy the zip");
    }
    let mut body = json!({
        "agentRuntimeName": "data_agent",
        "roleArn": ROLE,
        "agentRuntimeArtifact": {"codeConfiguration": {
            "code": {"s3": {"bucket": "agents", "prefix": key}},
            "runtime": runtime,
            "entryPoint": ["main.py"],
        }},
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let created = send(s.http(Method::PUT, "/runtimes/").json(&body)).await;
    assert_eq!(
        created.status,
        202,
        "create: {created:?} {}",
        created.json()
    );
    let id = created.json()["agentRuntimeId"]
        .as_str()
        .expect("id")
        .to_string();
    let got = poll("the runtime to become READY", || async {
        let a = send(s.http(Method::GET, &format!("/runtimes/{id}/"))).await;
        let v = a.json();
        (v["status"] != "CREATING").then_some(v)
    })
    .await;
    assert_eq!(got["status"], "READY", "{got}");
    (
        id,
        got["agentRuntimeArn"].as_str().expect("arn").to_string(),
    )
}

async fn invoke(s: &Server, arn: &str, session: Option<&str>, payload: Value) -> Answer {
    let mut req = s
        .http(Method::POST, &dp(arn, "invocations"))
        .header("content-type", "application/json")
        .body(payload.to_string());
    if let Some(sid) = session {
        req = req.header(SESSION_HEADER, sid);
    }
    send(req).await
}

// ---- the event stream (decoded by hand, CRCs checked) ----

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Messages: (string headers, JSON payload).
fn decode_events(mut b: &[u8]) -> Vec<(HashMap<String, String>, Value)> {
    let be = |x: &[u8]| u32::from_be_bytes(x.try_into().expect("4 bytes"));
    let mut out = Vec::new();
    while !b.is_empty() {
        let (total, hlen) = (be(&b[0..4]) as usize, be(&b[4..8]) as usize);
        assert_eq!(be(&b[8..12]), crc32(&b[0..8]), "prelude CRC");
        assert_eq!(
            be(&b[total - 4..total]),
            crc32(&b[..total - 4]),
            "message CRC"
        );
        let mut h = &b[12..12 + hlen];
        let mut headers = HashMap::new();
        while !h.is_empty() {
            let n = h[0] as usize;
            let name = String::from_utf8(h[1..1 + n].to_vec()).expect("name");
            assert_eq!(h[1 + n], 7, "string header");
            let len = u16::from_be_bytes([h[2 + n], h[3 + n]]) as usize;
            let value = String::from_utf8(h[4 + n..4 + n + len].to_vec()).expect("value");
            headers.insert(name, value);
            h = &h[4 + n + len..];
        }
        let payload = serde_json::from_slice(&b[12 + hlen..total - 4]).expect("JSON payload");
        out.push((headers, payload));
        b = &b[total..];
    }
    out
}

/// What InvokeAgentRuntimeCommand streamed.
#[derive(Debug, Default)]
struct CommandOutput {
    stdout: String,
    stderr: String,
    stop: Option<Value>,
    exception: Option<(String, Value)>,
    /// Event kinds in order (`contentStart`, `contentDelta`, `contentStop`).
    kinds: Vec<String>,
}

async fn command(s: &Server, arn: &str, session: &str, body: Value) -> (Answer, CommandOutput) {
    let a = send(
        s.http(Method::POST, &dp(arn, "commands"))
            .header(SESSION_HEADER, session)
            .json(&body),
    )
    .await;
    let mut out = CommandOutput::default();
    if a.status != 200 {
        return (a, out);
    }
    assert_eq!(
        a.header("content-type"),
        Some("application/vnd.amazon.eventstream")
    );
    for (headers, payload) in decode_events(&a.body) {
        if headers[":message-type"] == "exception" {
            out.exception = Some((headers[":exception-type"].clone(), payload));
            continue;
        }
        assert_eq!(headers[":message-type"], "event");
        assert_eq!(headers[":event-type"], "chunk");
        let (kind, v) = payload
            .as_object()
            .and_then(|o| o.iter().next())
            .expect("one member");
        out.kinds.push(kind.clone());
        match kind.as_str() {
            "contentDelta" => {
                out.stdout
                    .push_str(v["stdout"].as_str().unwrap_or_default());
                out.stderr
                    .push_str(v["stderr"].as_str().unwrap_or_default());
            }
            "contentStop" => out.stop = Some(v.clone()),
            _ => {}
        }
    }
    (a, out)
}

// ---- tests ----

#[tokio::test]
async fn invoke_json_sessions_and_errors() {
    let Some((zip, runtime)) = agent("invoke_json_sessions_and_errors", AGENT).await else {
        return;
    };
    let Some(s) = Server::start("invoke_json_sessions_and_errors").await else {
        return;
    };
    let allow = json!({"requestHeaderConfiguration": {"requestHeaderAllowlist": ["X-Tenant"]}});
    let (id, arn) = deploy(&s, &zip, &runtime, allow).await;

    // JSON, the session id echoed both ways, the documented headers forwarded.
    let a_sid = sid("a");
    let a = send(
        s.http(Method::POST, &dp(&arn, "invocations"))
            .header("content-type", "application/json")
            .header(SESSION_HEADER, &a_sid)
            .header("x-amzn-bedrock-agentcore-runtime-user-id", "user-1")
            .header("x-amzn-bedrock-agentcore-runtime-custom-color", "blue")
            .header("x-tenant", "t-1")
            .header("x-other", "not allow-listed")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .body(json!({"hello": "world"}).to_string()),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?} {}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.header(SESSION_HEADER), Some(a_sid.as_str()));
    assert!(a.header("x-amzn-requestid").is_some());
    assert_eq!(
        a.header("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    let v = a.json();
    assert_eq!(v["echo"], json!({"hello": "world"}));
    assert_eq!(v["session"], a_sid.as_str());
    assert_eq!(v["cwd"], "/var/task");
    assert_eq!(v["docker"], "1");
    assert_eq!(
        Some(v["request_id"].as_str().expect("request id")),
        a.header("x-amzn-bedrock-agentcore-runtime-request-id")
    );
    let headers = v["headers"].as_object().expect("headers");
    let has = |k: &str| headers.keys().any(|h| h.eq_ignore_ascii_case(k));
    assert!(
        has("x-amzn-bedrock-agentcore-runtime-custom-color"),
        "{headers:?}"
    );
    assert!(has("x-tenant"), "{headers:?}");
    assert!(!has("x-other"), "{headers:?}");
    assert!(
        !has("authorization"),
        "the caller's credentials reached the agent: {headers:?}"
    );

    // The agent runs as a watched shell in the native session `ac.<id>.<sid>`.
    let native = format!("ac.{id}.{a_sid}");
    let shells = send(s.http(Method::GET, &format!("/v1/sessions/{native}/shells"))).await;
    assert_eq!(shells.status, 200, "{shells:?}");
    assert!(
        String::from_utf8_lossy(&shells.body).contains("agentcore-agent"),
        "{}",
        String::from_utf8_lossy(&shells.body)
    );

    // Same session: the agent's state carries on; another session has its own.
    let count = |a: Answer| {
        assert_eq!(a.status, 200, "{a:?}");
        a.json()["count"].as_i64().expect("count")
    };
    assert_eq!(
        count(invoke(&s, &arn, Some(&a_sid), json!({"action": "count"})).await),
        1
    );
    assert_eq!(
        count(invoke(&s, &arn, Some(&a_sid), json!({"action": "count"})).await),
        2
    );
    let b_sid = sid("b");
    assert_eq!(
        count(invoke(&s, &arn, Some(&b_sid), json!({"action": "count"})).await),
        1
    );
    assert_eq!(
        count(invoke(&s, &arn, Some(&a_sid), json!({"action": "count"})).await),
        3
    );

    // No session id: a new one (a uuid4, what botocore would have sent) comes back.
    let fresh = invoke(&s, &arn, None, json!({"action": "count"})).await;
    let new_sid = fresh
        .header(SESSION_HEADER)
        .expect("a session id")
        .to_string();
    assert_eq!(new_sid.len(), 36, "{new_sid}");
    assert_ne!(new_sid, a_sid);
    assert_eq!(count(fresh), 1);

    // The bare id with accountId addresses the same runtime and session.
    let bare = send(
        s.http(
            Method::POST,
            &format!("/runtimes/{id}/invocations?accountId=000000000000&qualifier=DEFAULT"),
        )
        .header(SESSION_HEADER, &a_sid)
        .body(json!({"action": "count"}).to_string()),
    )
    .await;
    assert_eq!(count(bare), 4);

    // An agent failure is 424 RuntimeClientError (never 5xx, which botocore retries).
    let failed = invoke(&s, &arn, Some(&a_sid), json!({"action": "fail"})).await;
    failed.assert_error(424, "RuntimeClientError");
    let msg = failed.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains("500") && msg.contains("the agent failed on purpose"),
        "{msg}"
    );
    assert_eq!(failed.header(SESSION_HEADER), Some(a_sid.as_str()));
    // Invalid JSON is the agent's 400, also a RuntimeClientError.
    let not_json = send(
        s.http(Method::POST, &dp(&arn, "invocations"))
            .header(SESSION_HEADER, &a_sid)
            .body("{not json"),
    )
    .await;
    not_json.assert_error(424, "RuntimeClientError");

    // Unknown runtimes, endpoints, other regions, malformed addresses, bad session ids.
    let unknown = arn.replace(&id, "nope_agent-AbCdE12345");
    invoke(&s, &unknown, Some(&a_sid), json!({}))
        .await
        .assert_error(404, "ResourceNotFoundException");
    let other_region = arn.replace(":us-east-1:", ":eu-west-1:");
    invoke(&s, &other_region, Some(&a_sid), json!({}))
        .await
        .assert_error(404, "ResourceNotFoundException");
    send(s.http(
        Method::POST,
        &format!("{}?qualifier=nope", dp(&arn, "invocations")),
    ))
    .await
    .assert_error(404, "ResourceNotFoundException");
    send(s.http(Method::POST, &format!("/runtimes/{id}/invocations")))
        .await
        .assert_error(400, "ValidationException");
    invoke(&s, &arn, Some("too-short"), json!({}))
        .await
        .assert_error(400, "ValidationException");
}

#[tokio::test]
async fn invoke_streams_sse_as_the_agent_writes() {
    let Some((zip, runtime)) = agent("invoke_streams_sse_as_the_agent_writes", AGENT).await else {
        return;
    };
    let Some(s) = Server::start("invoke_streams_sse_as_the_agent_writes").await else {
        return;
    };
    let (_, arn) = deploy(&s, &zip, &runtime, json!({})).await;
    let session = sid("sse");
    let release = "/mnt/workspace/release";
    let resp = s
        .http(Method::POST, &dp(&arn, "invocations"))
        .header(SESSION_HEADER, &session)
        .header("accept", "text/event-stream")
        .body(json!({"action": "stream", "release": release}).to_string())
        .send()
        .await
        .expect("invoke");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(resp.headers()[SESSION_HEADER], session.as_str());
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    // The first event arrives while the agent waits for the release file (which only
    // the next step creates): Berth streams, it does not buffer.
    while !text.contains("\n\n") {
        let chunk = body.next().await.expect("more body").expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(text, "data: {\"i\": 0}\n\n");
    let (a, out) = command(
        &s,
        &arn,
        &session,
        json!({"command": format!("touch {release}")}),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        out.stop,
        Some(json!({"exitCode": 0, "status": "COMPLETED"}))
    );
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    assert_eq!(text, "data: {\"i\": 0}\n\ndata: {\"i\": 1}\n\n");
}

#[tokio::test]
async fn commands_stream_output_exit_codes_and_timeouts() {
    let Some((zip, runtime)) = agent("commands_stream_output_exit_codes_and_timeouts", AGENT).await
    else {
        return;
    };
    let Some(s) = Server::start("commands_stream_output_exit_codes_and_timeouts").await else {
        return;
    };
    let (id, arn) = deploy(&s, &zip, &runtime, json!({})).await;
    let session = sid("cmd");

    // A command needs no agent: the session is created for it.
    let (a, out) = command(
        &s,
        &arn,
        &session,
        json!({"command": "echo out; echo err >&2; printf '\\342\\202\\254'; exit 3"}),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header(SESSION_HEADER), Some(session.as_str()));
    assert_eq!(out.kinds.first().map(String::as_str), Some("contentStart"));
    assert_eq!(out.kinds.last().map(String::as_str), Some("contentStop"));
    assert_eq!(out.stdout, "out\n€");
    assert_eq!(out.stderr, "err\n");
    assert_eq!(
        out.stop,
        Some(json!({"exitCode": 3, "status": "COMPLETED"}))
    );
    assert!(out.exception.is_none());
    let shells = send(s.http(
        Method::GET,
        &format!("/v1/sessions/ac.{id}.{session}/shells"),
    ))
    .await;
    assert!(
        !String::from_utf8_lossy(&shells.body).contains("agentcore-agent"),
        "a command started the agent"
    );

    // Invalid UTF-8 is replaced, not dropped or split.
    let (_, out) = command(&s, &arn, &session, json!({"command": "printf 'a\\377b'"})).await;
    assert_eq!(out.stdout, "a\u{fffd}b");

    // A timed-out command.
    let (_, out) = command(
        &s,
        &arn,
        &session,
        json!({"command": "sleep 30", "timeout": 1}),
    )
    .await;
    let stop = out.stop.expect("contentStop");
    assert_eq!(stop["status"], "TIMED_OUT", "{stop}");

    // Bad bodies and addresses fail before the stream, as ordinary AWS errors.
    let (a, _) = command(&s, &arn, &session, json!({"command": ""})).await;
    a.assert_error(400, "ValidationException");
    let (a, _) = command(
        &s,
        &arn,
        &session,
        json!({"command": "true", "timeout": 3601}),
    )
    .await;
    a.assert_error(400, "ValidationException");
    let unknown = arn.replace(&id, "nope_agent-AbCdE12345");
    let (a, _) = command(&s, &unknown, &session, json!({"command": "true"})).await;
    a.assert_error(404, "ResourceNotFoundException");
}

#[tokio::test]
async fn stop_runtime_session_then_resume_with_the_workspace() {
    let Some((zip, runtime)) =
        agent("stop_runtime_session_then_resume_with_the_workspace", AGENT).await
    else {
        return;
    };
    let Some(s) = Server::start("stop_runtime_session_then_resume_with_the_workspace").await else {
        return;
    };
    let (id, arn) = deploy(&s, &zip, &runtime, json!({})).await;
    let session = sid("stop");
    let native = format!("ac.{id}.{session}");
    let count = |a: Answer| {
        assert_eq!(a.status, 200, "{a:?}");
        a.json()["count"].as_i64().expect("count")
    };
    assert_eq!(
        count(invoke(&s, &arn, Some(&session), json!({"action": "count"})).await),
        1
    );
    assert_eq!(
        count(invoke(&s, &arn, Some(&session), json!({"action": "count"})).await),
        2
    );
    let (_, out) = command(
        &s,
        &arn,
        &session,
        json!({"command": "echo kept > /mnt/workspace/note"}),
    )
    .await;
    assert_eq!(
        out.stop,
        Some(json!({"exitCode": 0, "status": "COMPLETED"}))
    );

    let stop = |sid: Option<String>| {
        let mut req = s
            .http(Method::POST, &dp(&arn, "stopruntimesession"))
            .json(&json!({"clientToken": uniq("token-0123456789-0123456789")}));
        if let Some(sid) = sid {
            req = req.header(SESSION_HEADER, sid);
        }
        send(req)
    };
    let stopped = stop(Some(session.clone())).await;
    assert_eq!(stopped.status, 200, "{stopped:?}");
    assert_eq!(stopped.header(SESSION_HEADER), Some(session.as_str()));
    let state = send(s.http(Method::GET, &format!("/v1/sessions/{native}"))).await;
    assert_eq!(state.json()["state"], "stopped", "{}", state.json());
    // Idempotent.
    assert_eq!(stop(Some(session.clone())).await.status, 200);
    stop(Some(sid("unknown")))
        .await
        .assert_error(404, "ResourceNotFoundException");
    stop(None).await.assert_error(400, "ValidationException");

    // The next invoke resumes the session: a new agent process (the counter restarts)
    // over the same workspace.
    assert_eq!(
        count(invoke(&s, &arn, Some(&session), json!({"action": "count"})).await),
        1
    );
    let (_, out) = command(
        &s,
        &arn,
        &session,
        json!({"command": "cat /mnt/workspace/note"}),
    )
    .await;
    assert_eq!(out.stdout, "kept\n");
}

/// An agent that exits before it listens: 424 with the end of its output, and the next
/// invoke tries again (and fails the same way).
#[tokio::test]
async fn an_agent_that_exits_fails_with_its_output() {
    const BROKEN: &str =
        "import sys\nprint('cannot start: no model configured', flush=True)\nsys.exit(3)\n";
    let Some((zip, runtime)) = agent("an_agent_that_exits_fails_with_its_output", BROKEN).await
    else {
        return;
    };
    let Some(s) = Server::start("an_agent_that_exits_fails_with_its_output").await else {
        return;
    };
    let (_, arn) = deploy(&s, &zip, &runtime, json!({})).await;
    let session = sid("broken");
    for _ in 0..2 {
        let a = invoke(&s, &arn, Some(&session), json!({})).await;
        a.assert_error(424, "RuntimeClientError");
        let msg = a.json()["message"].as_str().unwrap_or_default().to_string();
        assert!(
            msg.contains("exited with code 3") && msg.contains("cannot start: no model configured"),
            "{msg}"
        );
    }
}

/// An A2A agent with nothing but the standard library: its card, `/ping`, and `POST /`
/// on the protocol's port (`PORT`, 9000).
const A2A_AGENT: &str = r#"import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CARD = {"name": "berth-a2a", "description": "a test agent", "version": "1.0.0",
        "url": "http://127.0.0.1:9000/", "capabilities": {}, "skills": []}


class Handler(BaseHTTPRequestHandler):
    def send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/.well-known/agent-card.json":
            self.send(200, CARD)
        elif self.path == "/ping":
            self.send(200, {"status": "Healthy"})
        else:
            self.send(404, {"error": "no " + self.path})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send(200, {"path": self.path, "received": json.loads(body), "port": os.environ["PORT"]})


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// GetAgentCard, and an invoke reaching an A2A agent at its port and path (`POST /` on
/// 9000), with the runtime addressed by its bare id.
#[tokio::test]
async fn a2a_agent_card_and_invoke() {
    let Some((zip, runtime)) = zip_for("a2a_agent_card_and_invoke", A2A_AGENT, false).await else {
        return;
    };
    let Some(s) = Server::start("a2a_agent_card_and_invoke").await else {
        return;
    };
    let a2a = json!({"protocolConfiguration": {"serverProtocol": "A2A"}});
    let (_, arn) = deploy(&s, &zip, &runtime, a2a).await;
    let session = sid("a2a");
    let card = send(
        s.http(
            Method::GET,
            &dp(&arn, "invocations/.well-known/agent-card.json"),
        )
        .header(SESSION_HEADER, &session),
    )
    .await;
    assert_eq!(card.status, 200, "{card:?}");
    assert_eq!(card.header("content-type"), Some("application/json"));
    assert_eq!(card.header(SESSION_HEADER), Some(session.as_str()));
    assert_eq!(card.json()["name"], "berth-a2a");
    let a = invoke(&s, &arn, Some(&session), json!({"jsonrpc": "2.0"})).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.json(),
        json!({"path": "/", "received": {"jsonrpc": "2.0"}, "port": "9000"})
    );
}

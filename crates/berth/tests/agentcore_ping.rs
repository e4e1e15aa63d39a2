//! AgentCore `/ping` polling against a real `berth server` and a real sandbox: a
//! `BedrockAgentCoreApp` agent (bedrock-agentcore 1.25.0, vendored into the code zip)
//! whose `@app.async_task` work goes on after its invoke returned keeps its session
//! running past the runtime's idle timeout while its `/ping` says `HealthyBusy`; once the
//! work is over (`Healthy`), the session idles out, although the server keeps polling.
//! The same holds across a server restart (SIGKILL, then the core adopts the running
//! sandbox): the restarted server polls the adopted agent without waiting for an invoke,
//! and the next invoke reaches the same agent process.
//!
//! **Slow: about 150 s each** (the two tests run in parallel). The idle timeout is 60 s,
//! the least the AgentCore model allows (`idleRuntimeSessionTimeout` 60..), and there is
//! no faster lifecycle for tests: the session is watched busy past one timeout, then idle
//! for another.

mod common;

use std::path::Path;
use std::time::Duration;

use common::agentcore::{encode, sid, zip_for};
use common::{poll, uniq, Server};
use reqwest::Method;
use serde_json::{json, Value};

const ROLE: &str = "arn:aws:iam::123456789012:role/AgentRole";
const SESSION_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-session-id";
/// The runtime's `idleRuntimeSessionTimeout`.
const IDLE: Duration = Duration::from_secs(60);

/// The agent: `start` begins background work tracked by `@app.async_task` (so `/ping`
/// says `HealthyBusy`) and answers at once; `release` ends it, answering the status
/// from before.
const AGENT: &str = r#"import asyncio
import threading

from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()
RELEASE = threading.Event()
TASKS = set()


@app.async_task
async def background():
    while not RELEASE.is_set():
        await asyncio.sleep(0.1)


@app.entrypoint
async def invoke(payload):
    if payload.get("action") == "start":
        task = asyncio.create_task(background())
        TASKS.add(task)
        task.add_done_callback(TASKS.discard)
        await asyncio.sleep(0)  # the task registers itself before the answer goes
        return {"status": app.get_current_ping_status().value}
    if payload.get("action") == "release":
        before = app.get_current_ping_status().value
        RELEASE.set()
        return {"status_before": before}
    return {}


if __name__ == "__main__":
    app.run()
"#;

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into())),
    )
}

async fn invoke(s: &Server, arn: &str, session: &str, payload: Value) -> Value {
    let (status, body) = send(
        s.http(
            Method::POST,
            &format!("/runtimes/{}/invocations", encode(arn)),
        )
        .header("content-type", "application/json")
        .header(SESSION_HEADER, session)
        .body(payload.to_string()),
    )
    .await;
    assert_eq!(status, 200, "invoke {payload}: {body}");
    body
}

async fn native_session(s: &Server, id: &str) -> Value {
    let (status, body) = send(s.http(Method::GET, &format!("/v1/sessions/{id}"))).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Put the agent's zip in the object store and create its runtime: (id, ARN), READY.
async fn create_runtime(s: &Server, zip: &Path, runtime: &str) -> (String, String) {
    let key = format!("{}.zip", uniq("agent"));
    let dest = s.data_dir.join("buckets/agents").join(&key);
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("bucket");
    std::fs::copy(zip, &dest).expect("the zip into the object store");
    let (status, created) = send(s.http(Method::PUT, "/runtimes/").json(&json!({
        "agentRuntimeName": "ping_agent",
        "roleArn": ROLE,
        "agentRuntimeArtifact": {"codeConfiguration": {
            "code": {"s3": {"bucket": "agents", "prefix": key}},
            "runtime": runtime,
            "entryPoint": ["main.py"],
        }},
        "lifecycleConfiguration": {"idleRuntimeSessionTimeout": IDLE.as_secs()},
    })))
    .await;
    assert_eq!(status, 202, "{created}");
    let id = created["agentRuntimeId"].as_str().expect("id").to_string();
    let ready = poll("the runtime to become READY", || async {
        let (_, v) = send(s.http(Method::GET, &format!("/runtimes/{id}/"))).await;
        (v["status"] != "CREATING").then_some(v)
    })
    .await;
    assert_eq!(ready["status"], "READY", "{ready}");
    let arn = ready["agentRuntimeArn"].as_str().expect("arn").to_string();
    (id, arn)
}

/// The work ends (the agent says Healthy from then on): the session idles out, with the
/// server still polling `/ping` all along. The agent that answers is the one that
/// started the work (a restarted agent would know of none).
async fn release_then_idle_out(s: &Server, arn: &str, sid: &str, native: &str) {
    let released = invoke(s, arn, sid, json!({"action": "release"})).await;
    assert_eq!(released["status_before"], "HealthyBusy", "{released}");
    tokio::time::sleep(IDLE).await;
    let stopped = poll("the session to idle out", || async {
        let v = native_session(s, native).await;
        (v["state"] == "stopped").then_some(v)
    })
    .await;
    assert_eq!(stopped["stop_reason"], "idle_timeout", "{stopped}");
}

#[tokio::test]
async fn healthy_busy_keeps_the_session_from_idling_then_it_idles_out() {
    const TEST: &str = "healthy_busy_keeps_the_session_from_idling_then_it_idles_out";
    let Some((zip, runtime)) = zip_for(TEST, AGENT, true).await else {
        return;
    };
    let Some(s) = Server::start(TEST).await else {
        return;
    };
    let (id, arn) = create_runtime(&s, &zip, &runtime).await;
    let sid = sid("ping");
    let native = format!("ac.{id}.{sid}");

    // Background work outlives the invoke; nothing else happens for longer than the
    // idle timeout, and the session stays up for it.
    let started = invoke(&s, &arn, &sid, json!({"action": "start"})).await;
    assert_eq!(started["status"], "HealthyBusy", "{started}");
    tokio::time::sleep(IDLE + Duration::from_secs(5)).await;
    let busy = native_session(&s, &native).await;
    assert_eq!(busy["state"], "running", "{busy}\n{}", s.log_text());
    assert!(
        s.log_text().contains("the agent reports HealthyBusy"),
        "{}",
        s.log_text()
    );

    release_then_idle_out(&s, &arn, &sid, &native).await;
}

#[tokio::test]
async fn healthy_busy_keeps_an_adopted_session_from_idling_after_a_server_restart() {
    const TEST: &str = "healthy_busy_keeps_an_adopted_session_from_idling_after_a_server_restart";
    let Some((zip, runtime)) = zip_for(TEST, AGENT, true).await else {
        return;
    };
    let Some(mut s) = Server::start(TEST).await else {
        return;
    };
    let (id, arn) = create_runtime(&s, &zip, &runtime).await;
    let sid = sid("ping-restart");
    let native = format!("ac.{id}.{sid}");
    let started = invoke(&s, &arn, &sid, json!({"action": "start"})).await;
    assert_eq!(started["status"], "HealthyBusy", "{started}");

    // The server dies and comes back; the core adopts the running sandbox, whose idle
    // clock starts again. Nothing invokes the agent for longer than the idle timeout.
    s.kill_server();
    s.restart().await;
    tokio::time::sleep(IDLE + Duration::from_secs(10)).await;
    let busy = native_session(&s, &native).await;
    assert_eq!(busy["state"], "running", "{busy}\n{}", s.log_text());
    let log = s.log_text();
    let after_restart = &log[log.rfind("berth: listening on").expect("a listening line")..];
    assert!(
        after_restart.contains("the agent reports HealthyBusy"),
        "{log}"
    );

    // The next invoke finds the agent ready: the same process answers.
    release_then_idle_out(&s, &arn, &sid, &native).await;
    assert_eq!(s.log_text().matches("agentcore: agent started").count(), 1);
}

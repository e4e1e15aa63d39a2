//! AgentCore `/ping` polling against a real `berth server` and a real sandbox: a
//! `BedrockAgentCoreApp` agent (bedrock-agentcore 1.25.0, vendored into the code zip)
//! whose `@app.async_task` work goes on after its invoke returned keeps its session
//! running past the runtime's idle timeout while its `/ping` says `HealthyBusy`; once the
//! work is over (`Healthy`), the session idles out, although the server keeps polling.
//!
//! **Slow: about 140 s.** The idle timeout is 60 s, the least the AgentCore model allows
//! (`idleRuntimeSessionTimeout` 60..), and there is no faster lifecycle for tests: the
//! session is watched busy past one timeout, then idle for another.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::agentcore::{encode, host_python, run, vendored};
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

/// A stored zip of the vendored packages and `main.py`, or `None` (printed) when this
/// host cannot build it.
async fn agent_zip(test: &str) -> Option<(PathBuf, String)> {
    let Some((python, runtime)) = host_python() else {
        eprintln!("skipping {test}: the host has no /usr/bin/python3.N");
        return None;
    };
    let built = tokio::task::spawn_blocking(move || -> Result<PathBuf, String> {
        let vendor = vendored(&python)?;
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let stem = format!("agentcore-ping-{}", std::process::id());
        let (main, zip) = (
            tmp.join(format!("{stem}.py")),
            tmp.join(format!("{stem}.zip")),
        );
        std::fs::write(&main, AGENT).map_err(|e| e.to_string())?;
        let script = r#"
import os, sys, zipfile
vendor, main, out = sys.argv[1:4]
with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
    for root, dirs, files in os.walk(vendor):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f != ".complete":
                p = os.path.join(root, f)
                z.write(p, os.path.relpath(p, vendor))
    z.write(main, "main.py")
"#;
        let made = run(Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(&vendor)
            .arg(&main)
            .arg(&zip));
        let _ = std::fs::remove_file(&main);
        made.map(|()| zip)
    })
    .await
    .expect("zip task");
    match built {
        Ok(zip) => Some((zip, runtime)),
        Err(e) => {
            eprintln!("skipping {test}: cannot build the agent's zip: {e}");
            None
        }
    }
}

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

#[tokio::test]
async fn healthy_busy_keeps_the_session_from_idling_then_it_idles_out() {
    const TEST: &str = "healthy_busy_keeps_the_session_from_idling_then_it_idles_out";
    let Some((zip, runtime)) = agent_zip(TEST).await else {
        return;
    };
    let Some(s) = Server::start(TEST).await else {
        let _ = std::fs::remove_file(&zip);
        return;
    };
    let key = format!("{}.zip", uniq("agent"));
    let dest = s.data_dir.join("buckets/agents").join(&key);
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("bucket");
    std::fs::rename(&zip, &dest)
        .or_else(|_| std::fs::copy(&zip, &dest).map(drop))
        .expect("the zip into the object store");
    let _ = std::fs::remove_file(&zip);
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
    let sid = format!("{:0<40}", format!("ping-{}-", uniq("s")));
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

    // The work ends (the agent says Healthy from then on): the session idles out, with
    // the server still polling `/ping` all along.
    let released = invoke(&s, &arn, &sid, json!({"action": "release"})).await;
    assert_eq!(released["status_before"], "HealthyBusy", "{released}");
    tokio::time::sleep(IDLE).await;
    let stopped = poll("the session to idle out", || async {
        let v = native_session(&s, &native).await;
        (v["state"] == "stopped").then_some(v)
    })
    .await;
    assert_eq!(stopped["stop_reason"], "idle_timeout", "{stopped}");
}

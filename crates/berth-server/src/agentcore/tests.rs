//! The control plane in-process (`tower::ServiceExt::oneshot`) over a real store and a
//! driver that starts nothing: routing, auth, error format, idempotency, pagination and
//! the version/endpoint state machine. The real-server tests are in
//! `crates/berth/tests/agentcore_control.rs`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use berth_api::RuntimeSpec as NativeSpec;
use berth_core::{Core, CoreConfig, Driver, DriverError, Sandbox, SandboxRequest, SandboxStats};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::artifacts::tests::{zip_bytes, AnyImage};
use super::{AgentCore, AgentCoreConfig};
use crate::{AppState, Tokens};

struct NoSandboxes;

#[async_trait]
impl Driver for NoSandboxes {
    fn name(&self) -> &'static str {
        "none"
    }
    fn validate(&self, _: &NativeSpec) -> Result<(), DriverError> {
        Ok(())
    }
    async fn start(&self, req: &SandboxRequest) -> Result<Sandbox, DriverError> {
        Err(DriverError::Start {
            session: req.session_id.clone(),
            source: "no sandboxes in this test".into(),
        })
    }
    async fn adopt(&self, _: &SandboxRequest) -> Result<Option<Sandbox>, DriverError> {
        Ok(None)
    }
    async fn is_alive(&self, _: &str) -> bool {
        false
    }
    async fn stop(&self, _: &str) -> Result<(), DriverError> {
        Ok(())
    }
    async fn stats(&self, _: &str) -> Option<SandboxStats> {
        None
    }
    async fn workspace_bytes(&self, _: &str) -> u64 {
        0
    }
    async fn delete_workspace(&self, _: &str) -> Result<(), DriverError> {
        Ok(())
    }
    async fn leftovers(&self) -> Vec<String> {
        Vec::new()
    }
    fn workspace_image(&self, id: &str) -> PathBuf {
        PathBuf::from(id)
    }
}

const TOKEN: &str = "test-token";
const ROLE: &str = "arn:aws:iam::123456789012:role/AgentRole";

struct App {
    router: axum::Router,
    core: Core,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Resp {
    fn error_type(&self) -> &str {
        self.headers
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn app() -> App {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("buckets/agents")).unwrap();
    std::fs::write(
        data.join("buckets/agents/agent.zip"),
        zip_bytes(&[("main.py", b"print('hi')\n", 0o644)]),
    )
    .unwrap();
    build(dir, data).await
}

async fn build(dir: tempfile::TempDir, data: PathBuf) -> App {
    let store = berth_store::Store::open(&data.join("state.db"))
        .await
        .unwrap();
    let tokens = Arc::new(Tokens::default());
    tokens.insert_hash(crate::hash_token(TOKEN));
    let access_keys = Arc::new(crate::AccessKeys::new(store.clone(), &data));
    let core = Core::new(store.clone(), Arc::new(NoSandboxes), CoreConfig::default())
        .await
        .unwrap();
    let ac = AgentCore::start_with(
        core.clone(),
        store,
        AgentCoreConfig::new(&data),
        Arc::new(AnyImage),
    )
    .await
    .unwrap();
    App {
        router: crate::app(AppState {
            core: core.clone(),
            tokens,
            access_keys,
            agentcore: Some(ac),
        }),
        core,
        data,
        _dir: dir,
    }
}

impl App {
    async fn send(&self, method: &str, uri: &str, body: Option<Value>, auth: bool) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        if auth {
            req = req.header("authorization", format!("Bearer {TOKEN}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert_eq!(
            headers.contains_key("x-amzn-requestid"),
            uri.starts_with("/runtimes"),
            "{method} {uri}: every AgentCore response, and only those, has a request id"
        );
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> Resp {
        self.send(method, uri, body, true).await
    }

    async fn create(&self, name: &str, extra: Value) -> String {
        let mut body = spec("agent.zip");
        body["agentRuntimeName"] = json!(name);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = self.call("PUT", "/runtimes/", Some(body)).await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        r.body["agentRuntimeId"].as_str().unwrap().to_string()
    }

    /// Poll GetAgentRuntime until the version leaves CREATING/UPDATING.
    async fn settled(&self, id: &str, version: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self
                .call("GET", &format!("/runtimes/{id}/?version={version}"), None)
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            let st = r.body["status"].as_str().unwrap().to_string();
            if st != "CREATING" && st != "UPDATING" {
                return r.body;
            }
            assert!(Instant::now() < deadline, "{id} v{version} stays {st}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A valid RuntimeSpec for a code zip in bucket `agents`.
fn spec(key: &str) -> Value {
    json!({
        "roleArn": ROLE,
        "agentRuntimeArtifact": {"codeConfiguration": {
            "code": {"s3": {"bucket": "agents", "prefix": key}},
            "runtime": "PYTHON_3_11",
            "entryPoint": ["main.py"],
        }},
    })
}

fn token(n: u32) -> String {
    format!("0123456789abcdef0123456789abcdef-{n}")
}

#[tokio::test]
async fn create_goes_ready_and_maps_to_a_native_runtime() {
    let app = app().await;
    let r = app
        .call(
            "PUT",
            "/runtimes/",
            Some(json!({
                "agentRuntimeName": "echo",
                "roleArn": ROLE,
                "description": "an echo agent",
                "agentRuntimeArtifact": {"codeConfiguration": {
                    "code": {"s3": {"bucket": "agents", "prefix": "agent.zip"}},
                    "runtime": "PYTHON_3_11",
                    "entryPoint": ["main.py"],
                }},
                "lifecycleConfiguration": {"idleRuntimeSessionTimeout": 120},
                "environmentVariables": {"MODE": "test"},
                "protocolConfiguration": {"serverProtocol": "HTTP"},
                "filesystemConfigurations": [{"sessionStorage": {"mountPath": "/mnt/data"}}],
            })),
        )
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.body["status"], "CREATING");
    assert_eq!(r.body["agentRuntimeVersion"], "1");
    let id = r.body["agentRuntimeId"].as_str().unwrap();
    assert!(
        id.starts_with("echo-") && id.len() == "echo-".len() + 10,
        "{id}"
    );
    assert_eq!(
        r.body["agentRuntimeArn"],
        format!("arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/{id}")
    );
    let created = r.body["createdAt"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.len() == 24, "{created}");

    let got = app.settled(id, "1").await;
    assert_eq!(got["status"], "READY", "{got}");
    assert_eq!(got["agentRuntimeName"], "echo");
    assert_eq!(got["roleArn"], ROLE);
    assert_eq!(got["description"], "an echo agent");
    assert_eq!(
        got["lifecycleConfiguration"],
        json!({"idleRuntimeSessionTimeout": 120, "maxLifetime": 28800})
    );
    assert!(got.get("failureReason").is_none());

    let native = app.core.get_runtime(&format!("ac.{id}.v1")).await.unwrap();
    assert_eq!(native.spec.idle_timeout_s, 120);
    assert_eq!(native.spec.workspace_path, "/mnt/data");
    assert_eq!(native.spec.env["MODE"], "test");
    assert!(app
        .data
        .join(format!("agentcore/code/{id}/1/main.py"))
        .is_file());

    let ep = app
        .call(
            "GET",
            &format!("/runtimes/{id}/runtime-endpoints/DEFAULT/"),
            None,
        )
        .await;
    assert_eq!(ep.status, 200);
    assert_eq!(ep.body["status"], "READY");
    assert_eq!(ep.body["liveVersion"], "1");
    assert_eq!(ep.body["name"], "DEFAULT");
}

#[tokio::test]
async fn missing_artifacts_fail_creation_with_a_reason() {
    let app = app().await;
    let id = app
        .create(
            "missing",
            json!({"agentRuntimeArtifact": spec("nope.zip")["agentRuntimeArtifact"]}),
        )
        .await;
    let got = app.settled(&id, "1").await;
    assert_eq!(got["status"], "CREATE_FAILED");
    assert_eq!(
        got["failureReason"],
        "object s3://agents/nope.zip does not exist in Berth's object store"
    );
    assert!(app.core.get_runtime(&format!("ac.{id}.v1")).await.is_err());
    let ep = app
        .call(
            "GET",
            &format!("/runtimes/{id}/runtime-endpoints/DEFAULT/"),
            None,
        )
        .await;
    assert_eq!(ep.body["status"], "CREATE_FAILED");
    assert!(ep.body["failureReason"]
        .as_str()
        .unwrap()
        .starts_with("version 1 failed: object s3://agents/nope.zip"));
}

#[tokio::test]
async fn updates_make_versions_and_default_follows() {
    let app = app().await;
    let id = app.create("versioned", json!({})).await;
    assert_eq!(app.settled(&id, "1").await["status"], "READY");

    let mut body = spec("agent.zip");
    body["environmentVariables"] = json!({"V": "2"});
    let r = app
        .call("PUT", &format!("/runtimes/{id}/"), Some(body))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.body["agentRuntimeVersion"], "2");
    assert_eq!(r.body["status"], "UPDATING");
    assert!(r.body["lastUpdatedAt"].is_string());
    assert_eq!(app.settled(&id, "2").await["status"], "READY");

    // Version 1 is unchanged; the unversioned Get shows the latest.
    let v1 = app
        .call("GET", &format!("/runtimes/{id}/?version=1"), None)
        .await;
    assert!(v1.body.get("environmentVariables").is_none());
    let latest = app.call("GET", &format!("/runtimes/{id}/"), None).await;
    assert_eq!(latest.body["agentRuntimeVersion"], "2");
    assert_eq!(latest.body["environmentVariables"], json!({"V": "2"}));

    let ep = app
        .call(
            "GET",
            &format!("/runtimes/{id}/runtime-endpoints/DEFAULT/"),
            None,
        )
        .await;
    assert_eq!(
        (
            ep.body["liveVersion"].clone(),
            ep.body["targetVersion"].clone()
        ),
        (json!("2"), json!("2"))
    );

    // A pinned endpoint stays on version 1.
    let r = app
        .call(
            "PUT",
            &format!("/runtimes/{id}/runtime-endpoints/"),
            Some(json!({"name": "stable", "agentRuntimeVersion": "1", "description": "pinned"})),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.body["targetVersion"], "1");
    assert_eq!(r.body["status"], "READY");
    assert_eq!(
        r.body["agentRuntimeEndpointArn"],
        format!(
            "arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/{id}/runtime-endpoint/stable"
        )
    );
    // Version 1 is in use by it, version 2 is the latest: neither can go alone.
    for v in ["1", "2"] {
        let r = app
            .call("DELETE", &format!("/runtimes/{id}/?version={v}"), None)
            .await;
        assert_eq!(
            (r.status.as_u16(), r.error_type()),
            (409, "ConflictException")
        );
    }
    // Moving the endpoint to 2 frees version 1.
    let r = app
        .call(
            "PUT",
            &format!("/runtimes/{id}/runtime-endpoints/stable/"),
            Some(json!({"agentRuntimeVersion": "2"})),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.body["liveVersion"], "2");
    let r = app
        .call("DELETE", &format!("/runtimes/{id}/?version=1"), None)
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(
        r.body,
        json!({"status": "DELETING", "agentRuntimeId": id, "agentRuntimeVersion": "1"})
    );
    assert!(app.core.get_runtime(&format!("ac.{id}.v1")).await.is_err());
    let versions = app
        .call("POST", &format!("/runtimes/{id}/versions/"), None)
        .await;
    let listed: Vec<&str> = versions.body["agentRuntimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["agentRuntimeVersion"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["2"]);

    // The whole runtime: gone, with its native runtimes and code.
    let r = app.call("DELETE", &format!("/runtimes/{id}/"), None).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.body, json!({"status": "DELETING", "agentRuntimeId": id}));
    let r = app.call("GET", &format!("/runtimes/{id}/"), None).await;
    assert_eq!(
        (r.status.as_u16(), r.error_type()),
        (404, "ResourceNotFoundException")
    );
    assert!(app.core.get_runtime(&format!("ac.{id}.v2")).await.is_err());
    assert!(!app.data.join(format!("agentcore/code/{id}")).exists());
}

#[tokio::test]
async fn client_tokens_replay_or_refuse() {
    let app = app().await;
    let mut body = spec("agent.zip");
    body["agentRuntimeName"] = json!("idem");
    body["clientToken"] = json!(token(1));
    let first = app.call("PUT", "/runtimes/", Some(body.clone())).await;
    assert_eq!(first.status, 202);
    let again = app.call("PUT", "/runtimes/", Some(body.clone())).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.body, first.body);
    assert_ne!(
        again.headers["x-amzn-requestid"],
        first.headers["x-amzn-requestid"]
    );
    body["description"] = json!("changed");
    let other = app.call("PUT", "/runtimes/", Some(body.clone())).await;
    assert_eq!(
        (other.status.as_u16(), other.error_type()),
        (400, "ValidationException")
    );
    assert_eq!(other.body["reason"], "IdempotentParameterMismatchException");
    // Without a token the same name is a conflict.
    body.as_object_mut().unwrap().remove("clientToken");
    let dup = app.call("PUT", "/runtimes/", Some(body)).await;
    assert_eq!(
        (dup.status.as_u16(), dup.error_type()),
        (409, "ConflictException")
    );
    let list = app.call("POST", "/runtimes/", None).await;
    assert_eq!(list.body["agentRuntimes"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn lists_paginate() {
    let app = app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.create(&format!("agent{i}"), json!({})).await);
    }
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    let mut pages = 0;
    loop {
        let uri = match &next {
            Some(t) => format!("/runtimes/?maxResults=2&nextToken={t}"),
            None => "/runtimes/?maxResults=2".into(),
        };
        let r = app.call("POST", &uri, None).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        pages += 1;
        for item in r.body["agentRuntimes"].as_array().unwrap() {
            assert!(item["description"].is_string());
            seen.push(item["agentRuntimeId"].as_str().unwrap().to_string());
        }
        match r.body.get("nextToken").and_then(Value::as_str) {
            Some(t) => next = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let (mut a, mut b) = (seen.clone(), ids.clone());
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let r = app.call("POST", "/runtimes/?maxResults=0", None).await;
    assert_eq!(r.body["fieldList"][0]["name"], "maxResults");
    let r = app.call("POST", "/runtimes/?nextToken=bogus", None).await;
    assert_eq!(r.body["fieldList"][0]["name"], "nextToken");

    let id = &ids[0];
    for name in ["e1", "e2"] {
        let r = app
            .call(
                "PUT",
                &format!("/runtimes/{id}/runtime-endpoints/"),
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    let r = app
        .call(
            "POST",
            &format!("/runtimes/{id}/runtime-endpoints/?maxResults=2"),
            None,
        )
        .await;
    let names: Vec<&str> = r.body["runtimeEndpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["DEFAULT", "e1"]);
    let t = r.body["nextToken"].as_str().unwrap();
    let r = app
        .call(
            "POST",
            &format!("/runtimes/{id}/runtime-endpoints/?nextToken={t}"),
            None,
        )
        .await;
    assert_eq!(r.body["runtimeEndpoints"][0]["name"], "e2");
    assert!(r.body.get("nextToken").is_none());
}

#[tokio::test]
async fn every_error_is_an_aws_error() {
    let app = app().await;
    // No credentials.
    let r = app.send("POST", "/runtimes/", None, false).await;
    assert_eq!(
        (r.status.as_u16(), r.error_type()),
        (403, "MissingAuthenticationTokenException")
    );
    assert!(
        r.body["message"].as_str().unwrap().contains("not signed"),
        "{:?}",
        r.body
    );
    // Unknown routes and methods under /runtimes.
    for (method, uri) in [
        ("GET", "/runtimes/"),
        ("PATCH", "/runtimes/x-0123456789/"),
        ("POST", "/runtimes/x/y/z"),
        ("GET", "/runtimes"),
    ] {
        let r = app.call(method, uri, None).await;
        assert!(r.status == 404, "{method} {uri}: {}", r.status);
        assert_eq!(
            r.error_type(),
            "UnknownOperationException",
            "{method} {uri}"
        );
        assert!(r.body["message"].is_string());
    }
    // Not JSON.
    let r = app
        .router
        .clone()
        .oneshot(
            Request::put("/runtimes/")
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value =
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["reason"], "CannotParse");
    // Field validation names the wire path.
    let mut body = spec("agent.zip");
    body["agentRuntimeName"] = json!("bad-name");
    body["lifecycleConfiguration"] = json!({"idleRuntimeSessionTimeout": 5});
    let r = app.call("PUT", "/runtimes/", Some(body)).await;
    assert_eq!(
        (r.status.as_u16(), r.error_type()),
        (400, "ValidationException")
    );
    assert_eq!(r.body["reason"], "FieldValidationFailed");
    let names: Vec<&str> = r.body["fieldList"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "agentRuntimeName",
            "lifecycleConfiguration.idleRuntimeSessionTimeout"
        ]
    );
    // Unknown access points.
    let mut body = spec("agent.zip");
    body["agentRuntimeName"] = json!("shared");
    body["filesystemConfigurations"] = json!([{"efsAccessPoint": {
        "accessPointArn": "arn:aws:elasticfilesystem:us-east-1:123456789012:access-point/fsap-0123456789abcdef0",
        "mountPath": "/mnt/skills"}}]);
    let r = app.call("PUT", "/runtimes/", Some(body)).await;
    assert_eq!(
        r.body["fieldList"][0]["name"],
        "filesystemConfigurations[0].efsAccessPoint.accessPointArn"
    );
    // Not found, by operation.
    let r = app.call("GET", "/runtimes/nope-0123456789/", None).await;
    assert_eq!(
        (r.status.as_u16(), r.error_type()),
        (404, "ResourceNotFoundException")
    );
    let r = app.call("DELETE", "/runtimes/not_an_id/", None).await;
    assert_eq!(
        (r.status.as_u16(), r.error_type()),
        (404, "ResourceNotFoundException")
    );
    let r = app.call("GET", "/runtimes/not_an_id/", None).await;
    assert_eq!(
        (r.status.as_u16(), r.error_type()),
        (400, "ValidationException")
    );
    assert_eq!(r.body["fieldList"][0]["name"], "agentRuntimeId");
    // DEFAULT cannot be pinned or deleted.
    let id = app.create("defaults", json!({})).await;
    let r = app
        .call(
            "PUT",
            &format!("/runtimes/{id}/runtime-endpoints/DEFAULT/"),
            Some(json!({"agentRuntimeVersion": "1"})),
        )
        .await;
    assert_eq!(r.error_type(), "ValidationException");
    let r = app
        .call(
            "DELETE",
            &format!("/runtimes/{id}/runtime-endpoints/DEFAULT/"),
            None,
        )
        .await;
    assert_eq!(r.error_type(), "ConflictException");
    let r = app
        .call(
            "PUT",
            &format!("/runtimes/{id}/runtime-endpoints/"),
            Some(json!({"name": "DEFAULT"})),
        )
        .await;
    assert_eq!(r.error_type(), "ConflictException");
    let r = app
        .call(
            "PUT",
            &format!("/runtimes/{id}/runtime-endpoints/"),
            Some(json!({"name": "e", "agentRuntimeVersion": "7"})),
        )
        .await;
    assert_eq!(r.error_type(), "ResourceNotFoundException");
    // The native API keeps its own error format.
    let r = app.call("GET", "/v1/nothing", None).await;
    assert!(r.body["error"]["code"].is_string());
}

#[tokio::test]
async fn a_restart_fails_versions_it_interrupted() {
    let app = app().await;
    let id = app.create("interrupted", json!({})).await;
    assert_eq!(app.settled(&id, "1").await["status"], "READY");
    // Pretend the server died while preparing version 2: the record says UPDATING and a
    // native runtime was already made.
    let store = berth_store::Store::open(&app.data.join("state.db"))
        .await
        .unwrap();
    let v = store
        .agentcore()
        .add_version(&id, &spec("agent.zip").to_string(), "UPDATING", 1)
        .await
        .unwrap();
    assert_eq!(v, 2);
    app.core
        .create_runtime(NativeSpec::named(format!("ac.{id}.v2")))
        .await
        .unwrap();
    let App { data, _dir, .. } = app;
    let app = build(_dir, data).await;
    let got = app.call("GET", &format!("/runtimes/{id}/"), None).await;
    assert_eq!(got.body["status"], "UPDATE_FAILED");
    assert_eq!(
        got.body["failureReason"],
        "interrupted by a server restart; update the runtime to retry"
    );
    assert!(app.core.get_runtime(&format!("ac.{id}.v2")).await.is_err());
    // Version 1 still serves DEFAULT, and an update retries.
    let ep = app
        .call(
            "GET",
            &format!("/runtimes/{id}/runtime-endpoints/DEFAULT/"),
            None,
        )
        .await;
    assert_eq!(ep.body["liveVersion"], "1");
    let r = app
        .call("PUT", &format!("/runtimes/{id}/"), Some(spec("agent.zip")))
        .await;
    assert_eq!(r.body["agentRuntimeVersion"], "3");
    assert_eq!(app.settled(&id, "3").await["status"], "READY");
}

/// The data plane's checks that come before any sandbox (this driver starts none):
/// addressing, session ids, bodies, unknown runtimes and sessions; the session id
/// header on every answer. The real-sandbox tests are in
/// `crates/berth/tests/agentcore_data.rs`.
#[tokio::test]
async fn data_plane_errors_before_any_sandbox() {
    let app = app().await;
    let id = app.create("dp", json!({})).await;
    assert_eq!(app.settled(&id, "1").await["status"], "READY");
    let arn = format!("arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/{id}");
    let enc = |s: &str| s.replace(':', "%3A").replace('/', "%2F");
    let sid = "0123456789abcdef0123456789abcdef-sid";
    let send = |method: &'static str, uri: String, sid: Option<&'static str>, body: Value| {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json");
        if let Some(sid) = sid {
            req = req.header("x-amzn-bedrock-agentcore-runtime-session-id", sid);
        }
        let router = app.router.clone();
        async move {
            let resp = router
                .oneshot(req.body(Body::from(body.to_string())).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let code = headers
                .get("x-amzn-errortype")
                .map(|v| v.to_str().unwrap().to_string());
            let echoed = headers
                .get("x-amzn-bedrock-agentcore-runtime-session-id")
                .map(|v| v.to_str().unwrap().to_string());
            (
                status,
                code,
                echoed,
                String::from_utf8_lossy(&bytes).into_owned(),
            )
        }
    };
    let path = |op: &str| format!("/runtimes/{}/{op}", enc(&arn));
    let err = |status: u16, code: &str| (status, Some(code.to_string()));

    // Unknown runtime, other region, bare id without accountId, unknown endpoint.
    let unknown = arn.replace(&id, "nope-AbCdE12345");
    let r = send(
        "POST",
        format!("/runtimes/{}/invocations", enc(&unknown)),
        Some(sid),
        json!({}),
    )
    .await;
    assert_eq!(
        (r.0, r.1.clone()),
        err(404, "ResourceNotFoundException"),
        "{r:?}"
    );
    assert_eq!(
        r.2.as_deref(),
        Some(sid),
        "the session id comes back on errors too"
    );
    let other = arn.replace("us-east-1", "eu-west-1");
    let r = send(
        "POST",
        format!("/runtimes/{}/invocations", enc(&other)),
        None,
        json!({}),
    )
    .await;
    assert_eq!(
        (r.0, r.1.clone()),
        err(404, "ResourceNotFoundException"),
        "{r:?}"
    );
    assert_eq!(
        r.2.map(|s| s.len()),
        Some(36),
        "a generated session id comes back"
    );
    let r = send(
        "POST",
        format!("/runtimes/{id}/invocations"),
        None,
        json!({}),
    )
    .await;
    assert_eq!((r.0, r.1.clone()), err(400, "ValidationException"), "{r:?}");
    let r = send(
        "POST",
        format!("{}?qualifier=nope", path("invocations")),
        None,
        json!({}),
    )
    .await;
    assert_eq!(
        (r.0, r.1.clone()),
        err(404, "ResourceNotFoundException"),
        "{r:?}"
    );
    let r = send("POST", path("invocations"), Some("short"), json!({})).await;
    assert_eq!((r.0, r.1.clone()), err(400, "ValidationException"), "{r:?}");

    // Commands: the body is checked first.
    let r = send("POST", path("commands"), Some(sid), json!({"command": ""})).await;
    assert_eq!((r.0, r.1.clone()), err(400, "ValidationException"), "{r:?}");
    let r = send(
        "POST",
        path("commands"),
        Some(sid),
        json!({"command": "ls", "timeout": 0}),
    )
    .await;
    assert_eq!((r.0, r.1.clone()), err(400, "ValidationException"), "{r:?}");

    // StopRuntimeSession: the header is required; a session never used is unknown.
    let r = send("POST", path("stopruntimesession"), None, json!({})).await;
    assert_eq!((r.0, r.1.clone()), err(400, "ValidationException"), "{r:?}");
    let r = send(
        "POST",
        path("stopruntimesession"),
        Some(sid),
        json!({"clientToken": token(1)}),
    )
    .await;
    assert_eq!(
        (r.0, r.1.clone()),
        err(404, "ResourceNotFoundException"),
        "{r:?}"
    );
    let r = send(
        "POST",
        format!("/runtimes/{}/stopruntimesession", enc(&unknown)),
        Some(sid),
        json!({}),
    )
    .await;
    assert_eq!(
        (r.0, r.1.clone()),
        err(404, "ResourceNotFoundException"),
        "{r:?}"
    );

    // Other methods on data-plane paths are unknown operations.
    let r = send("GET", path("invocations"), None, json!({})).await;
    assert_eq!(
        (r.0, r.1.clone()),
        err(404, "UnknownOperationException"),
        "{r:?}"
    );
}

#![allow(clippy::unwrap_used)]

//! The HTTP layer in-process (`tower::ServiceExt::oneshot`): routing, auth, error shapes
//! and status codes. Sandbox behaviour is covered by the real-server tests in
//! `crates/berth/tests`; here the driver refuses to start anything.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use berth_api::RuntimeSpec;
use berth_core::{Core, CoreConfig, Driver, DriverError, Sandbox, SandboxRequest, SandboxStats};
use berth_server::{AppState, Tokens};
use http_body_util::BodyExt;
use tower::ServiceExt;

struct NoSandboxes;

#[async_trait]
impl Driver for NoSandboxes {
    fn name(&self) -> &'static str {
        "none"
    }
    fn validate(&self, _: &RuntimeSpec) -> Result<(), DriverError> {
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

struct App {
    router: axum::Router,
    token: String,
    _dir: tempfile::TempDir,
}

async fn app() -> App {
    let dir = tempfile::tempdir().unwrap();
    let store = berth_store::Store::open(&dir.path().join("state.db"))
        .await
        .unwrap();
    let tokens = Arc::new(Tokens::default());
    let (path, created) = berth_server::ensure_admin_token(&store, dir.path(), &tokens, 0)
        .await
        .unwrap();
    assert!(created);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&path).unwrap().trim().to_string();
    let access_keys = Arc::new(berth_server::AccessKeys::new(store.clone(), dir.path()));
    let core = Core::new(store, Arc::new(NoSandboxes), CoreConfig::default())
        .await
        .unwrap();
    App {
        router: berth_server::app(AppState {
            core,
            tokens,
            access_keys,
            agentcore: None,
        }),
        token,
        _dir: dir,
    }
}

impl App {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        body: &str,
        auth: bool,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        if auth {
            req = req.header("authorization", format!("Bearer {}", self.token));
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }
}

fn code(v: &serde_json::Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {v}"))
}

#[tokio::test]
async fn auth_is_required_everywhere() {
    let app = app().await;
    let (status, body) = app.call("GET", "/v1/sessions", "", false).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    let resp = app
        .router
        .clone()
        .oneshot(
            Request::get("/v1/runtimes")
                .header("authorization", "Bearer wrong")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = app.call("GET", "/v1/openapi.json", "", false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn runtimes_crud_and_errors() {
    let app = app().await;
    let (status, body) = app.call("GET", "/v1/runtimes/default", "", true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["image"], "host");
    assert_eq!(body["workspace_path"], "/mnt/workspace");
    assert_eq!(body["idle_timeout_s"], 900);

    let (status, _) = app
        .call(
            "POST",
            "/v1/runtimes",
            r#"{"name":"small","memory":67108864}"#,
            true,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = app
        .call("POST", "/v1/runtimes", r#"{"name":"small"}"#, true)
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "already_exists")
    );

    let (status, body) = app
        .call("POST", "/v1/runtimes", r#"{"name":"x","memory":1}"#, true)
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("memory"))
    );
    let (status, body) = app
        .call(
            "POST",
            "/v1/runtimes",
            r#"{"name":"x","colour":"red"}"#,
            true,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{body}"
    );
    let (status, body) = app
        .call(
            "POST",
            "/v1/runtimes",
            r#"{"name":"x","pids":"many"}"#,
            true,
        )
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("pids"))
    );
    let (status, body) = app
        .call("POST", "/v1/runtimes", r#"{"name":"../etc"}"#, true)
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("name"))
    );
    let (status, body) = app.call("POST", "/v1/runtimes", "{not json", true).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );

    let (status, body) = app.call("GET", "/v1/runtimes/nope", "", true).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, _) = app.call("DELETE", "/v1/runtimes/small", "", true).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn sessions_and_commands_errors() {
    let app = app().await;
    let (status, body) = app.call("GET", "/v1/sessions/ghost", "", true).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = app.call("POST", "/v1/sessions/ghost/stop", "", true).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = app.call("GET", "/v1/sessions/..%2Fetc", "", true).await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("session_id"))
    );
    let (status, body) = app
        .call(
            "POST",
            "/v1/sessions/s1/commands",
            r#"{"command":"true","timeout_s":-1}"#,
            true,
        )
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("timeout_s"))
    );
    let (status, body) = app
        .call(
            "POST",
            "/v1/sessions/s1/commands",
            r#"{"command":"true","argv":["x"]}"#,
            true,
        )
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("command"))
    );
    let (status, body) = app
        .call(
            "POST",
            "/v1/sessions/s1/commands",
            r#"{"command":"true","runtime":"nope"}"#,
            true,
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = app
        .call(
            "POST",
            "/v1/sessions/s1/commands/c-1/signal",
            r#"{"signal":"BOGUS"}"#,
            true,
        )
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("signal"))
    );
    let (status, body) = app
        .call("GET", "/v1/sessions/s1/files/etc/../../x", "", true)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // A sandbox that cannot start is a 500 that says where to look, with no internals.
    let (status, body) = app
        .call("POST", "/v1/sessions", r#"{"id":"s2"}"#, true)
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::INTERNAL_SERVER_ERROR, "internal")
    );
    assert!(!body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no sandboxes in this test"));
}

#[tokio::test]
async fn oversize_body_is_413() {
    let app = app().await;
    let big = format!(r#"{{"command":"{}"}}"#, "x".repeat(2 << 20));
    let (status, body) = app
        .call("POST", "/v1/sessions/s1/commands", &big, true)
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let app = app().await;
    let (status, body) = app.call("GET", "/v1/nothing", "", true).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = app.call("PATCH", "/v1/sessions", "", true).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(code(&body), "invalid_argument");
}

#[tokio::test]
async fn openapi_lists_the_api() {
    let app = app().await;
    let (status, doc) = app.call("GET", "/v1/openapi.json", "", true).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/runtimes",
        "/v1/sessions/{id}",
        "/v1/sessions/{id}/commands",
        "/v1/sessions/{id}/files/{path}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "missing {path}");
    }
    assert!(doc["components"]["schemas"].get("RuntimeSpec").is_some());
}

//! The AgentCore data plane (`bedrock-agentcore`, botocore 1.44.5, API 2024-02-28):
//! InvokeAgentRuntime, InvokeAgentRuntimeCommand, StopRuntimeSession and GetAgentCard
//! over Berth sessions. The wire contract is `docs/design/agentcore-wire.md` §4, §6, §9;
//! how it maps onto sessions, shells and port tunnels is the "Data plane" section of
//! `README.md` beside the parent module.
//!
//! | file | what |
//! |---|---|
//! | `address.rs` | the `{runtime}` segment (ARN or id + `accountId`) and `qualifier` |
//! | `sessions.rs` | runtime session id → native session; StopRuntimeSession |
//! | `agent.rs` | code copy, the agent's shell, readiness (`GET /ping`), adopted agents after a restart, the HTTP client over a port tunnel |
//! | `ping.rs` | `/ping` polling while the agent runs: `HealthyBusy` holds the session busy, `time_of_last_update` is noted |
//! | `invoke.rs` | InvokeAgentRuntime and GetAgentCard: headers in, streamed body out |
//! | `command.rs` | InvokeAgentRuntimeCommand as an event stream |
//! | `eventstream.rs` | the AWS event-stream messages; UTF-8-safe output deltas |
//! | `shells.rs` | interactive shells over `/ws/shells` (the SDK's `open_shell`) |
//! | `ws.rs` | the agent's WebSocket: `/ws` proxied to the agent's `/ws` |

mod address;
pub(super) mod agent;
mod command;
mod eventstream;
mod invoke;
mod ping;
mod sessions;
mod shells;
mod ws;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::{AwsError, ErrorShape};
use crate::AppState;

/// `X-Amzn-Bedrock-AgentCore-Runtime-Session-Id`.
pub const SESSION_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-session-id";
/// `X-Amzn-Bedrock-AgentCore-Runtime-Request-Id`.
pub const REQUEST_ID_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-request-id";
/// `X-Amzn-Bedrock-AgentCore-Runtime-User-Id`.
pub const USER_ID_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-user-id";
/// Headers with this prefix always reach the agent.
pub const CUSTOM_HEADER_PREFIX: &str = "x-amzn-bedrock-agentcore-runtime-custom-";
/// Trace headers: forwarded to the agent and echoed back.
pub const TRACE_HEADERS: [&str; 4] = ["x-amzn-trace-id", "traceparent", "tracestate", "baggage"];
/// MCP headers of InvokeAgentRuntime (forwarded).
pub const MCP_HEADERS: [&str; 4] = [
    "mcp-session-id",
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
];

/// The data-plane routes, merged into the AgentCore router (behind its auth and
/// request-id layers). The runtime segment is `{runtime}`, like the control plane's.
pub(super) fn routes() -> Router<AppState> {
    let unknown = super::unknown_operation;
    Router::new()
        .route(
            "/{runtime}/invocations",
            post(invoke::invoke).fallback(unknown),
        )
        .route(
            "/{runtime}/invocations/.well-known/agent-card.json",
            get(invoke::agent_card).fallback(unknown),
        )
        .route(
            "/{runtime}/commands",
            post(command::command).fallback(unknown),
        )
        .route(
            "/{runtime}/stopruntimesession",
            post(sessions::stop).fallback(unknown),
        )
        .route("/{runtime}/ws", get(ws::agent_ws).fallback(unknown))
        .route("/{runtime}/ws/shells", get(shells::shell).fallback(unknown))
}

/// What the data plane keeps in memory: one lock per native session (so that only one
/// request starts a session's agent), and which agent shells answered their ping.
#[derive(Default)]
pub(crate) struct DataState {
    locks: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
    /// Native session → `started_at_ms` of the agent shell that answered `/ping`.
    ready: Mutex<HashMap<String, i64>>,
    /// The clients attached to shells over `/ws/shells` (the newest of a shell wins).
    shell_clients: shells::Clients,
    /// The `/ping` pollers of running agents.
    pollers: ping::Pollers,
}

/// Holds a key's lock; the map entry goes when nobody else holds or awaits it.
pub(crate) struct KeyGuard {
    locks: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        #[allow(clippy::unwrap_used)] // poisoned only if a holder panicked
        let mut locks = self.locks.lock().unwrap();
        if let Some(guard) = self.guard.take() {
            // The map's reference and this guard's: nobody else waits for the lock.
            if Arc::strong_count(OwnedMutexGuard::mutex(&guard)) == 2 {
                locks.remove(&self.key);
            }
        }
    }
}

impl DataState {
    /// Wait for `key`'s lock.
    pub(crate) async fn lock(&self, key: &str) -> KeyGuard {
        let mutex = {
            #[allow(clippy::unwrap_used)]
            let mut locks = self.locks.lock().unwrap();
            locks.entry(key.to_string()).or_default().clone()
        };
        KeyGuard {
            locks: self.locks.clone(),
            key: key.to_string(),
            guard: Some(mutex.lock_owned().await),
        }
    }

    fn is_ready(&self, session: &str, shell_started_at_ms: i64) -> bool {
        #[allow(clippy::unwrap_used)]
        let ready = self.ready.lock().unwrap();
        ready.get(session) == Some(&shell_started_at_ms)
    }

    fn set_ready(&self, session: &str, shell_started_at_ms: Option<i64>) {
        #[allow(clippy::unwrap_used)]
        let mut ready = self.ready.lock().unwrap();
        match shell_started_at_ms {
            Some(t) => ready.insert(session.to_string(), t),
            None => ready.remove(session),
        };
    }
}

/// 424 `RuntimeClientError`: the agent (or the code it runs) failed. Never a 5xx,
/// which botocore retries, running the agent again (S10).
pub fn runtime_client_error(message: impl Into<String>) -> AwsError {
    AwsError::new(
        ErrorShape::Other {
            status: 424,
            code: "RuntimeClientError",
        },
        message,
    )
}

/// Set `name` on a response when the value is a valid header value.
fn set_header(resp: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

/// Copy the trace headers of the request onto the response (the model echoes them).
fn echo_trace_headers(resp: &mut Response, request: &HeaderMap) {
    for name in TRACE_HEADERS {
        if let Some(v) = request.get(name) {
            resp.headers_mut().insert(name, v.clone());
        }
    }
}

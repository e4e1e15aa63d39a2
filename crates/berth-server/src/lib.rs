//! Berth's HTTP API: the native `/v1` routes over [`berth_core::Core`].
//!
//! Routes only parse requests into `berth-api` values, call the core, and map results
//! and errors back; every error leaves as `{"error":{"code","message"}}`.

mod access_keys;
pub mod agentcore;
mod auth;
mod error;
mod extract;
mod openapi;
mod ports;
mod routes;
mod shells;
pub mod sigv4;
pub mod tls;

use std::sync::Arc;

use axum::Router;
use berth_core::Core;

pub use access_keys::{AccessKeyError, AccessKeys, AuthenticateError};
pub use auth::{ensure_admin_token, hash_token, Tokens};
pub use error::AppError;

/// Limit on JSON request bodies.
pub const MAX_JSON_BODY: usize = 1 << 20;

#[derive(Clone)]
pub struct AppState {
    pub core: Core,
    pub tokens: Arc<Tokens>,
    /// SigV4 access keys (`/v1/access-keys`, and the AgentCore API's authentication).
    pub access_keys: Arc<AccessKeys>,
    /// The AgentCore-compatible API (`/runtimes/…`); `None` leaves it unmounted.
    pub agentcore: Option<agentcore::AgentCore>,
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let native = routes::router(state.clone());
    if state.agentcore.is_some() {
        native.merge(agentcore::router(state))
    } else {
        native
    }
}

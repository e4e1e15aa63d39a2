//! Authentication of the AgentCore routes: one middleware over all of them.
//!
//! Today it accepts Berth's bearer tokens (the admin token). This is the seam where the
//! SigV4 verifier plugs in: extend [`require_credentials`] to accept a valid SigV4
//! signature as well (keeping [`bearer_ok`]), or wrap the router returned by
//! `agentcore::router` in another layer and have it mark the request as authenticated.
//! Whatever it answers for a refused request must be an [`AwsError`] so that botocore
//! raises a ClientError with the right code.

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AwsError;
use crate::AppState;

/// Whether `Authorization: Bearer <token>` names a token this server issued.
pub fn bearer_ok(state: &AppState, headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .is_some_and(|t| state.tokens.contains(t.trim()))
}

/// Middleware: 401 `UnrecognizedClientException` unless the request is authenticated.
pub async fn require_credentials(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if bearer_ok(&state, req.headers()) {
        next.run(req).await
    } else {
        AwsError::unauthenticated().into_response()
    }
}

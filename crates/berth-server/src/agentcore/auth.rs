//! Authentication of the AgentCore routes: one middleware over all of them.
//!
//! A request is accepted when it carries a SigV4 signature (header or presigned query)
//! made with an access key from `berth access-key create`, scoped to the
//! `bedrock-agentcore` service that both AgentCore models sign as, or Berth's own bearer
//! token: in `Authorization`, or, for a WebSocket upgrade (the SDK's OAuth mode, which
//! browsers need), as the subprotocol `base64UrlBearerAuthorization.<base64url token>`
//! (the handler then answers with the subprotocol `base64UrlBearerAuthorization`). A refusal is an [`AwsError`] with the code AWS itself uses, so botocore raises
//! a `ClientError` whose `Error.Code` says what is wrong.

use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::{AwsError, ErrorShape};
use crate::access_keys::AuthenticateError;
use crate::sigv4::{self, ErrorKind};
use crate::AppState;

/// The signing name of both `bedrock-agentcore` and `bedrock-agentcore-control`.
pub const SERVICES: &[&str] = &["bedrock-agentcore"];

/// Largest body the verifier hashes: InvokeAgentRuntime payloads go up to 100 MB.
pub const MAX_SIGNED_BODY: usize = 100_000_000 + 1024;

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

/// The subprotocol the AgentCore SDK's OAuth mode offers beside the one carrying the
/// token; a server that accepts the token answers with it (§8).
pub const BEARER_SUBPROTOCOL: &str = "base64UrlBearerAuthorization";

/// A bearer token offered as the WebSocket subprotocol
/// `base64UrlBearerAuthorization.<base64url(token), no padding>`: `None` when none is
/// offered, `Some(None)` when one is but does not decode to text.
fn subprotocol_token(headers: &HeaderMap) -> Option<Option<String>> {
    use base64::Engine as _;
    let prefix = format!("{BEARER_SUBPROTOCOL}.");
    let encoded = headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(prefix.as_str()))?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    Some(token)
}

fn has_bearer(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|h| h.len() > 7 && h[..7].eq_ignore_ascii_case("bearer "))
}

/// Middleware: the request goes on only when a bearer token or a SigV4 signature
/// authenticates it.
pub async fn require_credentials(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if bearer_ok(&state, req.headers()) {
        return next.run(req).await;
    }
    if has_bearer(req.headers()) {
        return AwsError::unauthenticated().into_response();
    }
    match subprotocol_token(req.headers()) {
        Some(Some(token)) if state.tokens.contains(token.trim()) => return next.run(req).await,
        Some(_) => return AwsError::unauthenticated().into_response(),
        None => {}
    }
    let (parts, body) = req.into_parts();
    // The payload hash is part of what the client signed and botocore sends no
    // `x-amz-content-sha256`, so the body is read (bounded) and hashed here.
    let body = match axum::body::to_bytes(body, MAX_SIGNED_BODY).await {
        Ok(body) => body,
        Err(_) => {
            return AwsError::new(
                ErrorShape::Validation,
                format!("the request body is larger than {MAX_SIGNED_BODY} bytes"),
            )
            .into_response()
        }
    };
    let payload_sha256 = hex::encode(Sha256::digest(&body));
    let request = sigv4::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        authority: parts.uri.authority().map(|a| a.as_str()),
        payload_sha256: &payload_sha256,
    };
    let verdict = state
        .access_keys
        .authenticate(&request, SERVICES, SystemTime::now())
        .await;
    match verdict {
        Ok(_) => next.run(Request::from_parts(parts, Body::from(body))).await,
        Err(AuthenticateError::Rejected(e)) => refusal(&e).into_response(),
        Err(AuthenticateError::Lookup(e)) => {
            tracing::error!(error = ?e, "cannot look up an access key");
            AwsError::internal().into_response()
        }
    }
}

/// The AWS error for a refused signature (AWS's own codes and statuses).
fn refusal(e: &sigv4::SigV4Error) -> AwsError {
    let (status, code) = match e.kind() {
        ErrorKind::Missing => (403, "MissingAuthenticationTokenException"),
        ErrorKind::Malformed => (400, "IncompleteSignatureException"),
        ErrorKind::UnknownAccessKey => (403, "UnrecognizedClientException"),
        ErrorKind::InvalidScope
        | ErrorKind::Expired
        | ErrorKind::PayloadHashMismatch
        | ErrorKind::SignatureMismatch => (403, "InvalidSignatureException"),
    };
    AwsError::new(ErrorShape::Other { status, code }, e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn tokens_offered_as_a_websocket_subprotocol() {
        let mut h = HeaderMap::new();
        assert_eq!(subprotocol_token(&h), None);
        // What the SDK's connect_shell_oauth offers for the token "berth-token?".
        h.insert(
            axum::http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(
                "base64UrlBearerAuthorization.YmVydGgtdG9rZW4_, base64UrlBearerAuthorization",
            ),
        );
        assert_eq!(subprotocol_token(&h), Some(Some("berth-token?".into())));
        h.insert(
            axum::http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("base64UrlBearerAuthorization.!!!"),
        );
        assert_eq!(subprotocol_token(&h), Some(None));
        h.insert(
            axum::http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v5.channel.k8s.io, base64UrlBearerAuthorization"),
        );
        assert_eq!(subprotocol_token(&h), None);
    }
}

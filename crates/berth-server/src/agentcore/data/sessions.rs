//! Runtime sessions: the caller's `X-Amzn-Bedrock-AgentCore-Runtime-Session-Id` names a
//! native Berth session, per AgentCore runtime; and StopRuntimeSession.
//!
//! The native id is `ac.<runtimeId>.<sessionId>` when that is a valid native id (at most
//! 128 characters of `[A-Za-z0-9._-]`; a botocore uuid4 on a runtime id of up to 86
//! characters fits), else `ac.h<hex SHA-256 of runtimeId "\n" sessionId>`. The two forms
//! never collide (the first has two dots, the second one), and the same session id on
//! two runtimes names two sessions. Nothing needs storing: the id is recomputed.
//!
//! A session is created on the native runtime of the version its endpoint serves at
//! first use, and stays on that version: a later invoke resumes the same sandbox and
//! workspace with the same code even after an update (a version is deleted only with
//! its sessions).

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use berth_api::CreateSession;
use berth_core::CoreError;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{address, set_header, SESSION_HEADER};
use crate::agentcore::mapping;
use crate::agentcore::request_id::new_id;
use crate::agentcore::validate::{self, Checker};
use crate::agentcore::{Ac, AgentCore, AwsError, Body, PathParams, Query, Target};

/// The runtime session id's bounds (`DP:shapes.SessionType`).
const SESSION_ID_MIN: usize = 33;
const SESSION_ID_MAX: usize = 256;

/// The native session id for `session_id` on runtime `runtime_id` (see the module doc).
pub fn native_session_id(runtime_id: &str, session_id: &str) -> String {
    let direct = format!("ac.{runtime_id}.{session_id}");
    if berth_api::validate::id("id", &direct).is_ok() {
        return direct;
    }
    let mut h = Sha256::new();
    h.update(runtime_id.as_bytes());
    h.update(b"\n");
    h.update(session_id.as_bytes());
    format!("ac.h{}", hex::encode(h.finalize()))
}

/// The runtime session id of a request: the header, checked against the model's bounds,
/// or (`generate`) a new uuid4 when absent, as botocore would have sent.
pub fn session_id(headers: &HeaderMap, generate: bool) -> Result<String, AwsError> {
    let Some(value) = headers.get(SESSION_HEADER) else {
        if generate {
            return Ok(new_id());
        }
        return Err(AwsError::field(
            "runtimeSessionId",
            "is required (header X-Amzn-Bedrock-AgentCore-Runtime-Session-Id)",
        ));
    };
    let value = value
        .to_str()
        .map_err(|_| AwsError::field("runtimeSessionId", "must be printable ASCII"))?;
    check_session_id(value)
}

fn check_session_id(value: &str) -> Result<String, AwsError> {
    let n = value.chars().count();
    if !(SESSION_ID_MIN..=SESSION_ID_MAX).contains(&n) {
        return Err(AwsError::field(
            "runtimeSessionId",
            format!("Member must have length between {SESSION_ID_MIN} and {SESSION_ID_MAX}"),
        ));
    }
    Ok(value.to_string())
}

/// The runtime session id of a WebSocket upgrade: the header, else the query parameter
/// of the same name (presigned URLs and the OAuth mode put it there, since browsers
/// cannot set headers), else a new uuid4.
pub fn ws_session_id(
    headers: &HeaderMap,
    query: &std::collections::HashMap<String, String>,
) -> Result<String, AwsError> {
    if headers.contains_key(SESSION_HEADER) {
        return session_id(headers, true);
    }
    match query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(SESSION_HEADER))
    {
        Some((_, v)) => check_session_id(v),
        None => Ok(new_id()),
    }
}

/// A runtime session, open on its native session.
#[derive(Debug, Clone)]
pub struct RuntimeSession {
    /// The native session's id.
    pub native: String,
    /// The version the session runs.
    pub target: Target,
}

/// The version a native runtime name `ac.<id>.v<N>` serves, if it is one of `runtime_id`'s.
fn version_of(runtime_id: &str, native_runtime: &str) -> Option<u32> {
    mapping::parse_native_name(native_runtime)
        .filter(|(id, _)| *id == runtime_id)
        .map(|(_, version)| version)
}

impl AgentCore {
    /// `version` of a runtime as a [`Target`] (for sessions created on an older version
    /// than their endpoint serves now).
    async fn version_target(
        &self,
        runtime_id: &str,
        version: u32,
        endpoint: &str,
    ) -> Result<Target, AwsError> {
        let rec = self
            .store()
            .agentcore()
            .get_version(runtime_id, version)
            .await?
            .ok_or_else(|| {
                AwsError::not_found(format!(
                    "version {version} of agent runtime {runtime_id} not found"
                ))
            })?;
        self.target(endpoint, &rec)
    }

    /// The runtime session `session_id` of `target`'s runtime: resumed if it exists
    /// (on the version it was created on), else created (and started) on `target`.
    pub(super) async fn open_session(
        &self,
        target: Target,
        session_id: &str,
    ) -> Result<RuntimeSession, AwsError> {
        let native = native_session_id(&target.runtime_id, session_id);
        let core = self.core();
        for _ in 0..2 {
            match core.get_session(&native).await {
                Ok(existing) => {
                    let Some(version) = version_of(&target.runtime_id, &existing.runtime) else {
                        return Err(AwsError::conflict(format!(
                            "native session {native} exists but does not belong to agent runtime {}",
                            target.runtime_id
                        )));
                    };
                    let target = if version == target.version {
                        target
                    } else {
                        self.version_target(&target.runtime_id, version, &target.endpoint)
                            .await?
                    };
                    return Ok(RuntimeSession { native, target });
                }
                Err(CoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let created = core
                .create_session(CreateSession {
                    id: Some(native.clone()),
                    runtime: Some(target.native_runtime.clone()),
                })
                .await;
            match created {
                Ok(_) => {
                    tracing::info!(runtime = %target.runtime_id, version = target.version,
                        session = %native, "agentcore: runtime session created");
                    return Ok(RuntimeSession { native, target });
                }
                // Another request created it meanwhile: use it.
                Err(CoreError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        tracing::error!(session = %native, "agentcore: a session kept appearing and vanishing");
        Err(AwsError::internal())
    }

    /// StopRuntimeSession: stop the native session's sandbox; its workspace stays, and
    /// the next invoke resumes it.
    async fn stop_runtime_session(
        &self,
        runtime_id: &str,
        session_id: &str,
    ) -> Result<(), AwsError> {
        if self
            .store()
            .agentcore()
            .get_runtime(runtime_id)
            .await?
            .is_none()
        {
            return Err(AwsError::not_found(format!(
                "agent runtime {runtime_id} not found"
            )));
        }
        let native = native_session_id(runtime_id, session_id);
        let not_found = || {
            AwsError::not_found(format!(
                "runtime session {session_id} of agent runtime {runtime_id} not found"
            ))
        };
        let core = self.core();
        match core.get_session(&native).await {
            Ok(s) if version_of(runtime_id, &s.runtime).is_some() => {}
            Ok(_) | Err(CoreError::NotFound { .. }) => return Err(not_found()),
            Err(e) => return Err(e.into()),
        }
        // Not under the session's agent lock: a stop must not wait for an agent that is
        // starting (its wait then fails, the session being stopped).
        match core.stop_session(&native, "requested").await {
            Ok(_) => {}
            Err(CoreError::NotFound { .. }) => return Err(not_found()),
            Err(e) => return Err(e.into()),
        }
        self.inner.data.set_ready(&native, None);
        tracing::info!(runtime = runtime_id, session = %native, "agentcore: runtime session stopped");
        Ok(())
    }
}

/// `POST /runtimes/{runtime}/stopruntimesession`: header session id (required), JSON
/// body `{"clientToken"}` (S9). 200 with the session id header and `{}`; an unknown
/// session is 404. Stopping a stopped session succeeds (the operation is idempotent).
pub(crate) async fn stop(
    Ac(ac): Ac,
    PathParams(segment): PathParams<String>,
    Query(query): Query,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let sid = match session_id(&headers, false) {
        Ok(sid) => sid,
        Err(e) => return e.into_response(),
    };
    let result = async {
        let addr = address::parse(ac.config(), &segment, &query)?;
        check_stop_body(&body)?;
        ac.stop_runtime_session(&addr.runtime_id, &sid).await
    }
    .await;
    let mut resp = match result {
        Ok(()) => axum::Json(json!({})).into_response(),
        Err(e) => e.into_response(),
    };
    set_header(&mut resp, SESSION_HEADER, &sid);
    resp
}

fn check_stop_body(body: &serde_json::Map<String, Value>) -> Result<(), AwsError> {
    let mut c = Checker::new();
    for (key, value) in body {
        match (key.as_str(), value) {
            ("clientToken", Value::String(t)) => validate::client_token(&mut c, Some(t)),
            ("clientToken", _) => c.fail("clientToken", "must be a string"),
            (other, _) => c.fail(other, "is not a member of StopRuntimeSessionRequest"),
        }
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn native_ids_are_valid_deterministic_and_per_runtime() {
        let sid = "0b9c8f0e-6a55-4b8e-9d53-0c5e0a8b7c1d";
        let a = native_session_id("agent-AbCdE12345", sid);
        assert_eq!(a, format!("ac.agent-AbCdE12345.{sid}"));
        assert_eq!(native_session_id("agent-AbCdE12345", sid), a);
        assert_ne!(native_session_id("other-AbCdE12345", sid), a);
        // Too long, or characters a native id cannot hold: hashed, still valid.
        let long_rt = format!("{}-AbCdE12345", "a".repeat(100));
        for (rt, sid) in [
            (long_rt.as_str(), sid),
            ("agent-AbCdE12345", "has spaces and / slashes, 33 chars+"),
            ("agent-AbCdE12345", &"x".repeat(256)),
        ] {
            let id = native_session_id(rt, sid);
            assert!(id.starts_with("ac.h"), "{id}");
            assert_eq!(id.len(), 68);
            berth_api::validate::id("id", &id).unwrap();
        }
        assert_ne!(
            native_session_id(&long_rt, sid),
            native_session_id(&long_rt, &format!("{sid}x"))
        );
    }

    #[test]
    fn session_id_bounds() {
        let mut h = HeaderMap::new();
        assert_eq!(session_id(&h, true).unwrap().len(), 36);
        assert!(session_id(&h, false).is_err());
        h.insert(SESSION_HEADER, "short".parse().unwrap());
        assert!(session_id(&h, true).is_err());
        h.insert(SESSION_HEADER, "a".repeat(33).parse().unwrap());
        assert_eq!(session_id(&h, false).unwrap(), "a".repeat(33));
        h.insert(SESSION_HEADER, "a".repeat(257).parse().unwrap());
        assert!(session_id(&h, false).is_err());
    }

    #[test]
    fn websocket_session_ids_come_from_the_header_or_the_query() {
        let mut q = std::collections::HashMap::new();
        let mut h = HeaderMap::new();
        assert_eq!(ws_session_id(&h, &q).unwrap().len(), 36);
        q.insert(
            "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id".to_string(),
            "q".repeat(33),
        );
        assert_eq!(ws_session_id(&h, &q).unwrap(), "q".repeat(33));
        h.insert(SESSION_HEADER, "h".repeat(33).parse().unwrap());
        assert_eq!(ws_session_id(&h, &q).unwrap(), "h".repeat(33));
        h.clear();
        q.insert(
            "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id".to_string(),
            "short".into(),
        );
        assert!(ws_session_id(&h, &q).is_err());
    }

    #[test]
    fn versions_of_native_runtimes() {
        assert_eq!(version_of("a-AbCdE12345", "ac.a-AbCdE12345.v3"), Some(3));
        assert_eq!(version_of("a-AbCdE12345", "ac.b-AbCdE12345.v3"), None);
        assert_eq!(version_of("a-AbCdE12345", "default"), None);
    }

    #[test]
    fn stop_bodies() {
        let ok: serde_json::Map<String, Value> =
            serde_json::from_value(json!({"clientToken": "a".repeat(40)})).unwrap();
        check_stop_body(&ok).unwrap();
        check_stop_body(&serde_json::Map::new()).unwrap();
        let bad: serde_json::Map<String, Value> =
            serde_json::from_value(json!({"other": 1})).unwrap();
        assert!(check_stop_body(&bad).is_err());
    }
}

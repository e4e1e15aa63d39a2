//! `clientToken` idempotency (`docs/design/agentcore-wire.md` §2): the same token with
//! the same parameters returns the first response again; the same token with other
//! parameters is a `ValidationException` with reason
//! `IdempotentParameterMismatchException`. Tokens are scoped to the operation and the
//! resource it acts on, and forgotten after [`TOKEN_TTL_MS`] (AWS keeps them about 8 h).
//! Only successful responses are remembered, so a failed request can be retried.

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{AgentCore, AwsError, Reply};
use berth_store::agentcore::AcClientToken;

pub const TOKEN_TTL_MS: i64 = 8 * 3600 * 1000;

/// The SHA-256 of the parameters as canonical JSON (object keys sorted at every level),
/// so that the order in which a client wrote the members does not matter.
pub fn request_hash(params: &impl Serialize) -> String {
    let value = serde_json::to_value(params).unwrap_or(Value::Null);
    let mut text = String::new();
    canonical(&value, &mut text);
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// One request's idempotency key.
pub struct Idempotency {
    scope: String,
    token: Option<String>,
    hash: String,
}

impl Idempotency {
    /// `scope` names the operation and its resource (`UpdateAgentRuntime/<id>`);
    /// `params` are the request's parameters without the token.
    pub fn new(scope: impl Into<String>, token: Option<&str>, params: &impl Serialize) -> Self {
        Self {
            scope: scope.into(),
            token: token.map(str::to_string),
            hash: request_hash(params),
        }
    }
}

impl AgentCore {
    /// The stored reply when the token was used before with the same parameters.
    pub(crate) async fn replay(&self, key: &Idempotency) -> Result<Option<Reply>, AwsError> {
        let Some(token) = &key.token else {
            return Ok(None);
        };
        let Some(stored) = self
            .store()
            .agentcore()
            .client_token(&key.scope, token)
            .await?
        else {
            return Ok(None);
        };
        if stored.request_sha256 != key.hash {
            return Err(AwsError::idempotent_mismatch());
        }
        let body = serde_json::from_str(&stored.response).map_err(|e| {
            tracing::error!(error = %e, "agentcore: stored clientToken response is corrupt");
            AwsError::internal()
        })?;
        Ok(Some(Reply::new(stored.status, body)))
    }

    /// Remember a successful reply under the request's token.
    pub(crate) async fn remember(&self, key: &Idempotency, reply: &Reply) -> Result<(), AwsError> {
        let Some(token) = &key.token else {
            return Ok(());
        };
        let now = super::now_ms();
        let record = AcClientToken {
            request_sha256: key.hash.clone(),
            status: reply.status.as_u16(),
            response: reply.body.to_string(),
        };
        self.store()
            .agentcore()
            .put_client_token(&key.scope, token, &record, now, now - TOKEN_TTL_MS)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hash_ignores_member_order_but_not_values() {
        let a: Value =
            serde_json::from_str(r#"{"a":1,"b":{"x":[1,2],"y":"s"}}"#).unwrap_or_default();
        let b: Value =
            serde_json::from_str(r#"{"b":{"y":"s","x":[1,2]},"a":1}"#).unwrap_or_default();
        assert_eq!(request_hash(&a), request_hash(&b));
        assert_ne!(
            request_hash(&a),
            request_hash(&json!({"a":1,"b":{"x":[2,1],"y":"s"}}))
        );
        assert_ne!(
            request_hash(&json!({"a": "1"})),
            request_hash(&json!({"a": 1}))
        );
    }
}

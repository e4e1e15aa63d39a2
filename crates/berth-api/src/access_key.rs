//! Access keys: the AWS-style key pairs that SigV4 clients (boto3, the AgentCore SDKs)
//! sign requests to the AgentCore-compatible API with.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiError;

/// Every access key id starts with this (AWS's own start with `AKIA` or `ASIA`).
pub const ACCESS_KEY_ID_PREFIX: &str = "BKIA";
/// Length of an access key id, as AWS's.
pub const ACCESS_KEY_ID_LEN: usize = 20;
/// Length of a secret access key, as AWS's (base64 characters).
pub const SECRET_ACCESS_KEY_LEN: usize = 40;
/// Longest access key name.
pub const MAX_ACCESS_KEY_NAME_LEN: usize = 128;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccessKey {
    /// A label for people, e.g. who or what uses the key.
    #[serde(default)]
    pub name: Option<String>,
}

/// An access key as listed. The secret is never shown again after creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AccessKey {
    /// `BKIA` and 16 upper-case letters and digits; what clients send as
    /// `AWS_ACCESS_KEY_ID`.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub created_at_ms: i64,
    /// When a request signed with the key was last accepted (to within a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_ms: Option<i64>,
}

/// The answer to creating an access key: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedAccessKey {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub created_at_ms: i64,
    /// 40 characters; what clients send as `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
}

/// `BKIA` followed by 16 upper-case letters or digits.
pub fn validate_id(field: &str, value: &str) -> Result<(), ApiError> {
    let rest = value.strip_prefix(ACCESS_KEY_ID_PREFIX);
    match rest {
        Some(rest)
            if value.len() == ACCESS_KEY_ID_LEN
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()) =>
        {
            Ok(())
        }
        _ => Err(ApiError::invalid(
            field,
            format!(
                "{value:?} is not an access key id ({ACCESS_KEY_ID_PREFIX} and 16 upper-case letters or digits)"
            ),
        )),
    }
}

/// 1–128 characters, no control characters.
pub fn validate_name(field: &str, value: &str) -> Result<(), ApiError> {
    let len = value.chars().count();
    if len == 0 || len > MAX_ACCESS_KEY_NAME_LEN {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_ACCESS_KEY_NAME_LEN} characters long"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("id", "BKIAIOSFODNN7EXAMPLE").is_ok());
        for bad in [
            "",
            "BKIA",
            "AKIAIOSFODNN7EXAMPLE",
            "BKIAIOSFODNN7EXAMPLEX",
            "BKIAIOSFODNN7EXAMPL",
            "BKIAiosfodnn7example",
            "BKIA/OSFODNN7EXAMPLE",
        ] {
            let err = validate_id("id", bad).expect_err(bad);
            assert_eq!(err.field.as_deref(), Some("id"));
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("name", "ci — agent runner").is_ok());
        assert!(validate_name("name", &"é".repeat(128)).is_ok());
        for bad in ["", "a\nb", &"x".repeat(129)] {
            let err = validate_name("name", bad).expect_err(bad);
            assert_eq!(err.field.as_deref(), Some("name"));
        }
    }

    #[test]
    fn the_listed_form_has_no_secret() {
        let key = AccessKey {
            id: "BKIAIOSFODNN7EXAMPLE".into(),
            name: None,
            created_at_ms: 1,
            last_used_ms: None,
        };
        let json = serde_json::to_string(&key).unwrap_or_default();
        assert_eq!(json, r#"{"id":"BKIAIOSFODNN7EXAMPLE","created_at_ms":1}"#);
    }
}

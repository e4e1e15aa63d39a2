//! The AWS rest-json error format (`docs/design/agentcore-wire.md` §5): the status of the
//! error shape, `X-Amzn-ErrorType: <ShapeName>`, `Content-Type: application/json` and a
//! body `{"message": …}` plus the shape's members. botocore picks the exception class
//! from the header, so `client.exceptions.ValidationException` & co. work unchanged.
//! `x-amzn-RequestId` is added to every AgentCore response by [`super::request_id`].

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_api::{ApiError, ErrorCode};
use berth_core::CoreError;
use serde::Serialize;

/// Header botocore reads the error code from (case-insensitively).
pub const ERROR_TYPE_HEADER: &str = "x-amzn-errortype";

/// The error shapes Berth answers with: those of the two service models, plus two that
/// AWS's front end sends for requests that never reach an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// 400, `reason` and `fieldList` members.
    Validation,
    /// 401: no or unknown credentials (the shape AWS uses for an unknown access key).
    UnrecognizedClient,
    /// 403.
    AccessDenied,
    /// 404.
    ResourceNotFound,
    /// 409.
    Conflict,
    /// 402 (sic: the models say so, S2).
    ServiceQuotaExceeded,
    /// 429, retried by botocore.
    Throttling,
    /// 500, retried by botocore; the message never carries internals.
    InternalServer,
    /// 404: no operation has this method and path.
    UnknownOperation,
    /// Anything else a later layer needs (e.g. SigV4's `InvalidSignatureException`, 403).
    Other { status: u16, code: &'static str },
}

impl ErrorShape {
    pub fn status(self) -> StatusCode {
        let code = match self {
            ErrorShape::Validation => 400,
            // What AWS answers for credentials it does not know.
            ErrorShape::UnrecognizedClient => 403,
            ErrorShape::AccessDenied => 403,
            ErrorShape::ResourceNotFound | ErrorShape::UnknownOperation => 404,
            ErrorShape::Conflict => 409,
            ErrorShape::ServiceQuotaExceeded => 402,
            ErrorShape::Throttling => 429,
            ErrorShape::InternalServer => 500,
            ErrorShape::Other { status, .. } => status,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The shape name, which is what `X-Amzn-ErrorType` carries.
    pub fn code(self) -> &'static str {
        match self {
            ErrorShape::Validation => "ValidationException",
            ErrorShape::UnrecognizedClient => "UnrecognizedClientException",
            ErrorShape::AccessDenied => "AccessDeniedException",
            ErrorShape::ResourceNotFound => "ResourceNotFoundException",
            ErrorShape::Conflict => "ConflictException",
            ErrorShape::ServiceQuotaExceeded => "ServiceQuotaExceededException",
            ErrorShape::Throttling => "ThrottlingException",
            ErrorShape::InternalServer => "InternalServerException",
            ErrorShape::UnknownOperation => "UnknownOperationException",
            ErrorShape::Other { code, .. } => code,
        }
    }
}

/// `ValidationException.reason` (an enum in both models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ValidationReason {
    CannotParse,
    FieldValidationFailed,
    IdempotentParameterMismatchException,
    ResourceConflict,
}

/// One `ValidationException.fieldList` entry: the member's wire path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub name: String,
    pub message: String,
}

/// An error as an AgentCore client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsError {
    pub shape: ErrorShape,
    pub message: String,
    /// Only for [`ErrorShape::Validation`], where the model requires it.
    pub reason: Option<ValidationReason>,
    pub fields: Vec<FieldError>,
}

impl AwsError {
    pub fn new(shape: ErrorShape, message: impl Into<String>) -> Self {
        let reason = (shape == ErrorShape::Validation).then_some(ValidationReason::CannotParse);
        Self {
            shape,
            message: message.into(),
            reason,
            fields: Vec::new(),
        }
    }

    /// A `ValidationException` (`FieldValidationFailed`) listing every failed member, with
    /// AWS's message form: `2 validation errors detected: Value at 'a' failed to satisfy
    /// constraint: …; Value at 'b' …`.
    pub fn fields(fields: Vec<FieldError>) -> Self {
        let n = fields.len();
        let detail = fields
            .iter()
            .map(|f| {
                format!(
                    "Value at '{}' failed to satisfy constraint: {}",
                    f.name, f.message
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let plural = if n == 1 { "" } else { "s" };
        Self {
            shape: ErrorShape::Validation,
            message: format!("{n} validation error{plural} detected: {detail}"),
            reason: Some(ValidationReason::FieldValidationFailed),
            fields,
        }
    }

    /// A `ValidationException` about one member.
    pub fn field(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self::fields(vec![FieldError {
            name: name.into(),
            message: message.into(),
        }])
    }

    /// The request body or query cannot be read at all (`CannotParse`).
    pub fn cannot_parse(message: impl Into<String>) -> Self {
        Self::new(ErrorShape::Validation, message)
    }

    /// A clientToken reused with other parameters.
    pub fn idempotent_mismatch() -> Self {
        Self {
            reason: Some(ValidationReason::IdempotentParameterMismatchException),
            ..Self::new(
                ErrorShape::Validation,
                "the clientToken was already used with different parameters",
            )
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorShape::ResourceNotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorShape::Conflict, message)
    }

    /// A 500 whose cause was logged by the caller.
    pub fn internal() -> Self {
        Self::new(
            ErrorShape::InternalServer,
            "internal error; see the Berth server log",
        )
    }

    /// The answer of the AgentCore auth layer to a request it cannot authenticate.
    pub fn unauthenticated() -> Self {
        Self::new(
            ErrorShape::UnrecognizedClient,
            "the bearer token is not one this server issued",
        )
    }

    pub fn unknown_operation(method: &str, path: &str) -> Self {
        Self::new(
            ErrorShape::UnknownOperation,
            format!(
                "no AgentCore operation is {method} {path}; Berth serves the bedrock-agentcore-control \
                 runtime and endpoint operations (see the README)"
            ),
        )
    }
}

impl std::fmt::Display for AwsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.shape.code(), self.message)
    }
}

impl std::error::Error for AwsError {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<ValidationReason>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    field_list: &'a [FieldError],
}

impl IntoResponse for AwsError {
    fn into_response(self) -> Response {
        let body = Body {
            message: &self.message,
            reason: self.reason,
            field_list: &self.fields,
        };
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = (self.shape.status(), json).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            ERROR_TYPE_HEADER,
            HeaderValue::from_static(self.shape.code()),
        );
        resp
    }
}

/// Core errors, by the native API's classification (one exhaustive table for both APIs);
/// internal causes are logged, not sent.
impl From<CoreError> for AwsError {
    fn from(err: CoreError) -> Self {
        if let CoreError::TooManySandboxes { .. } = err {
            return Self::new(ErrorShape::ServiceQuotaExceeded, err.to_string());
        }
        let api = ApiError::from(&err);
        if api.code == ErrorCode::Internal {
            tracing::error!(error = ?err, "agentcore: internal error");
        }
        Self::from(api)
    }
}

impl From<ApiError> for AwsError {
    fn from(api: ApiError) -> Self {
        let shape = match api.code {
            ErrorCode::InvalidArgument | ErrorCode::PayloadTooLarge => {
                return match api.field {
                    Some(field) => {
                        let prefix = format!("{field}: ");
                        let message = api
                            .message
                            .strip_prefix(&prefix)
                            .unwrap_or(&api.message)
                            .to_string();
                        Self::field(field, message)
                    }
                    None => Self::cannot_parse(api.message),
                };
            }
            ErrorCode::Unauthenticated => ErrorShape::UnrecognizedClient,
            ErrorCode::NotFound => ErrorShape::ResourceNotFound,
            ErrorCode::AlreadyExists | ErrorCode::Conflict => ErrorShape::Conflict,
            ErrorCode::ResourceExhausted => ErrorShape::ServiceQuotaExceeded,
            ErrorCode::Unavailable => ErrorShape::Throttling,
            ErrorCode::Internal => return Self::internal(),
        };
        Self::new(shape, api.message)
    }
}

impl From<berth_store::StoreError> for AwsError {
    fn from(err: berth_store::StoreError) -> Self {
        tracing::error!(error = ?err, "agentcore: state database failed");
        Self::internal()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use http_body_util::BodyExt;

    async fn parts(err: AwsError) -> (u16, String, serde_json::Value) {
        let resp = err.into_response();
        let status = resp.status().as_u16();
        assert_eq!(resp.headers()["content-type"], "application/json");
        let code = resp.headers()[ERROR_TYPE_HEADER]
            .to_str()
            .unwrap()
            .to_string();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, code, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn validation_errors_carry_reason_and_field_list() {
        let (status, code, body) = parts(AwsError::field(
            "lifecycleConfiguration.maxLifetime",
            "Member must have value between 60 and 1209600",
        ))
        .await;
        assert_eq!((status, code.as_str()), (400, "ValidationException"));
        assert_eq!(body["reason"], "FieldValidationFailed");
        assert_eq!(
            body["fieldList"][0]["name"],
            "lifecycleConfiguration.maxLifetime"
        );
        assert_eq!(
            body["message"],
            "1 validation error detected: Value at 'lifecycleConfiguration.maxLifetime' failed to \
             satisfy constraint: Member must have value between 60 and 1209600"
        );
        let (_, _, body) = parts(AwsError::idempotent_mismatch()).await;
        assert_eq!(body["reason"], "IdempotentParameterMismatchException");
        assert!(body.get("fieldList").is_none());
    }

    #[tokio::test]
    async fn every_shape_has_the_models_status() {
        for (shape, status, code) in [
            (
                ErrorShape::ResourceNotFound,
                404,
                "ResourceNotFoundException",
            ),
            (ErrorShape::Conflict, 409, "ConflictException"),
            (
                ErrorShape::ServiceQuotaExceeded,
                402,
                "ServiceQuotaExceededException",
            ),
            (ErrorShape::Throttling, 429, "ThrottlingException"),
            (ErrorShape::InternalServer, 500, "InternalServerException"),
            (ErrorShape::AccessDenied, 403, "AccessDeniedException"),
            (
                ErrorShape::UnrecognizedClient,
                403,
                "UnrecognizedClientException",
            ),
        ] {
            let (s, c, body) = parts(AwsError::new(shape, "m")).await;
            assert_eq!((s, c.as_str()), (status, code));
            assert_eq!(body, serde_json::json!({"message": "m"}));
        }
    }

    #[test]
    fn core_errors_map_onto_aws_shapes() {
        let nf = CoreError::NotFound {
            what: "runtime",
            id: "x".into(),
        };
        assert_eq!(AwsError::from(nf).shape, ErrorShape::ResourceNotFound);
        let dup = CoreError::AlreadyExists {
            what: "runtime",
            id: "x".into(),
        };
        assert_eq!(AwsError::from(dup).shape, ErrorShape::Conflict);
        assert_eq!(
            AwsError::from(CoreError::Conflict("busy".into())).shape,
            ErrorShape::Conflict
        );
        assert_eq!(
            AwsError::from(CoreError::TooManySandboxes { limit: 1 }).shape,
            ErrorShape::ServiceQuotaExceeded
        );
        let invalid = AwsError::from(CoreError::Invalid {
            field: "memory".into(),
            message: "too small".into(),
        });
        assert_eq!(invalid.fields[0].name, "memory");
        assert_eq!(invalid.fields[0].message, "too small");
        let internal = AwsError::from(ApiError::new(ErrorCode::Internal, "secret detail"));
        assert_eq!(internal.shape, ErrorShape::InternalServer);
        assert!(!internal.message.contains("secret"));
        assert_eq!(
            AwsError::from(ApiError::new(ErrorCode::Unavailable, "later")).shape,
            ErrorShape::Throttling
        );
    }
}

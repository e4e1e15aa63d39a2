use berth_api::{ApiError, ErrorCode};

use crate::DriverError;

/// Why a core operation failed. Converts into the API's error shape at the edge.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} {id:?} already exists")]
    AlreadyExists { what: &'static str, id: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error("too many running sandboxes: the server allows {limit}; stop a session or raise --max-sandboxes")]
    TooManySandboxes { limit: usize },
    #[error("the guest agent of session {session} failed: {status}")]
    Guest {
        session: String,
        status: tonic::Status,
    },
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
}

impl CoreError {
    pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Self {
        CoreError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn guest(session: &str, status: tonic::Status) -> Self {
        CoreError::Guest {
            session: session.to_string(),
            status,
        }
    }
}

impl From<ApiError> for CoreError {
    fn from(err: ApiError) -> Self {
        let field = err.field.clone().unwrap_or_default();
        let prefix = format!("{field}: ");
        let message = err
            .message
            .strip_prefix(&prefix)
            .unwrap_or(&err.message)
            .to_string();
        CoreError::Invalid { field, message }
    }
}

impl From<&CoreError> for ApiError {
    fn from(err: &CoreError) -> Self {
        use tonic::Code;
        match err {
            CoreError::NotFound { .. } => ApiError::new(ErrorCode::NotFound, err.to_string()),
            CoreError::AlreadyExists { .. } => {
                ApiError::new(ErrorCode::AlreadyExists, err.to_string())
            }
            CoreError::Invalid { field, message } => ApiError::invalid(field, message),
            CoreError::Conflict(_) => ApiError::new(ErrorCode::Conflict, err.to_string()),
            CoreError::TooManySandboxes { .. } => {
                ApiError::new(ErrorCode::ResourceExhausted, err.to_string())
            }
            CoreError::Guest { status, .. } => {
                // Statuses the guest chose on purpose carry a client-facing message.
                let code = match status.code() {
                    Code::NotFound => ErrorCode::NotFound,
                    Code::InvalidArgument | Code::FailedPrecondition => ErrorCode::InvalidArgument,
                    Code::AlreadyExists => ErrorCode::AlreadyExists,
                    Code::PermissionDenied => ErrorCode::InvalidArgument,
                    Code::ResourceExhausted => ErrorCode::ResourceExhausted,
                    Code::Unavailable | Code::Cancelled => ErrorCode::Unavailable,
                    _ => ErrorCode::Internal,
                };
                let message = if code == ErrorCode::Internal {
                    "the sandbox's guest agent failed; see the server log".to_string()
                } else {
                    status.message().to_string()
                };
                let mut api = ApiError::new(code, message);
                if code == ErrorCode::InvalidArgument || code == ErrorCode::NotFound {
                    api.field = Some("path".into()).filter(|_| status.message().contains('/'));
                }
                api
            }
            CoreError::Driver(DriverError::InvalidRuntime { field, message }) => {
                ApiError::invalid(field, message)
            }
            CoreError::Driver(_) => ApiError::new(
                ErrorCode::Internal,
                "the sandbox could not be started; see the server log",
            ),
            CoreError::Store(_) => ApiError::new(
                ErrorCode::Internal,
                "the state database failed; see the server log",
            ),
        }
    }
}

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_api::{ApiError, ErrorBody, ErrorCode};
use berth_core::CoreError;

/// Every handler error. Internal causes are logged here and never sent to the client.
#[derive(Debug)]
pub struct AppError(pub ApiError);

impl AppError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ApiError::new(code, message))
    }
}

impl From<ApiError> for AppError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<CoreError> for AppError {
    fn from(e: CoreError) -> Self {
        let api = ApiError::from(&e);
        if api.code == ErrorCode::Internal {
            tracing::error!(error = ?e, "internal error");
        }
        Self(api)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(ErrorBody { error: self.0 })).into_response()
    }
}

//! Extractors whose rejections are API errors rather than axum's plain-text ones.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use berth_api::{ApiError, ErrorCode};
use serde::de::DeserializeOwned;

use crate::AppError;

/// JSON body: 413 when over the limit, 400 naming the offending field otherwise.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("request body is larger than {} bytes", crate::MAX_JSON_BODY),
                )
            } else {
                AppError::new(
                    ErrorCode::InvalidArgument,
                    format!("cannot read request body: {rej}"),
                )
            }
        })?;
        let body = if bytes.is_empty() {
            &b"{}"[..]
        } else {
            &bytes[..]
        };
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de)
            .map(ApiJson)
            .map_err(|err| {
                let path = err.path().to_string();
                let field = if path == "." {
                    "body".to_string()
                } else {
                    path
                };
                AppError(ApiError::invalid(&field, err.into_inner()))
            })
    }
}

/// Query string with API-error rejections.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded_de(query).map(ApiQuery)
    }
}

fn serde_urlencoded_de<T: DeserializeOwned>(query: &str) -> Result<T, AppError> {
    axum::extract::Query::<T>::try_from_uri(
        &format!("/?{query}")
            .parse()
            .map_err(|_| AppError(ApiError::invalid("query", "malformed query string")))?,
    )
    .map(|q| q.0)
    .map_err(|e| AppError(ApiError::invalid("query", e.body_text())))
}

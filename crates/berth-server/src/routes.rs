//! The `/v1` routes. Each handler parses, calls the core, and maps the result.

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use berth_api::{
    frames, CommandRequest, CreateSession, ErrorCode, Runtime, RuntimeSpec, Session, SignalRequest,
};
use berth_core::ExecEvent;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::extract::{ApiJson, ApiQuery};
use crate::{auth, openapi, ports, shells, AppError, AppState, MAX_JSON_BODY};

/// Uploads stream to the sandbox, so their limit only guards against runaway clients;
/// the workspace quota is the real bound.
const MAX_UPLOAD_BODY: usize = 64 << 30;

pub fn router(state: AppState) -> Router {
    let files = Router::new()
        .route(
            "/v1/sessions/{id}/files/{*path}",
            get(read_file).put(write_file),
        )
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BODY));
    let v1 = Router::new()
        .route("/v1/info", get(info))
        .route("/v1/openapi.json", get(openapi_doc))
        .route("/v1/runtimes", post(create_runtime).get(list_runtimes))
        .route(
            "/v1/runtimes/{name}",
            get(get_runtime).delete(delete_runtime),
        )
        .route("/v1/sessions", post(create_session).get(list_sessions))
        .route("/v1/sessions/{id}", get(get_session).delete(delete_session))
        .route("/v1/sessions/{id}/stop", post(stop_session))
        .route("/v1/sessions/{id}/commands", post(run_command))
        .route(
            "/v1/sessions/{id}/commands/{command_id}/signal",
            post(signal_command),
        )
        .route(
            "/v1/sessions/{id}/shells",
            post(shells::open_shell).get(shells::list_shells),
        )
        .route(
            "/v1/sessions/{id}/shells/{shell}",
            axum::routing::delete(shells::kill_shell),
        )
        .route(
            "/v1/sessions/{id}/shells/{shell}/recording",
            get(shells::shell_recording),
        )
        .route(
            "/v1/sessions/{id}/shells/{shell}/attach",
            get(shells::attach_shell),
        )
        .route("/v1/sessions/{id}/ports/{port}", get(ports::connect_port))
        .merge(crate::access_keys::routes())
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .merge(files)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found() -> AppError {
    AppError::new(
        ErrorCode::NotFound,
        "no such API route; see /v1/openapi.json",
    )
}

async fn method_not_allowed() -> Response {
    let err = AppError::new(
        ErrorCode::InvalidArgument,
        "method not allowed on this route",
    );
    let mut resp = err.into_response();
    *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    resp
}

/// Facts about the server.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServerInfo {
    pub version: String,
    pub driver: String,
    pub running_sandboxes: usize,
}

#[utoipa::path(get, path = "/v1/info", responses((status = 200, body = ServerInfo)))]
pub(crate) async fn info(State(s): State<AppState>) -> Json<ServerInfo> {
    Json(ServerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        driver: s.core.driver_name().to_string(),
        running_sandboxes: s.core.running_sandboxes(),
    })
}

async fn openapi_doc() -> impl IntoResponse {
    Json(openapi::document())
}

#[utoipa::path(post, path = "/v1/runtimes", request_body = RuntimeSpec,
    responses((status = 201, body = Runtime), (status = 400, body = berth_api::ErrorBody), (status = 409, body = berth_api::ErrorBody)))]
pub(crate) async fn create_runtime(
    State(s): State<AppState>,
    ApiJson(spec): ApiJson<RuntimeSpec>,
) -> Result<(StatusCode, Json<Runtime>), AppError> {
    Ok((
        StatusCode::CREATED,
        Json(s.core.create_runtime(spec).await?),
    ))
}

#[utoipa::path(get, path = "/v1/runtimes", responses((status = 200, body = Vec<Runtime>)))]
pub(crate) async fn list_runtimes(
    State(s): State<AppState>,
) -> Result<Json<Vec<Runtime>>, AppError> {
    Ok(Json(s.core.list_runtimes().await?))
}

#[utoipa::path(get, path = "/v1/runtimes/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Runtime), (status = 404, body = berth_api::ErrorBody)))]
pub(crate) async fn get_runtime(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Runtime>, AppError> {
    Ok(Json(s.core.get_runtime(&name).await?))
}

#[utoipa::path(delete, path = "/v1/runtimes/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = berth_api::ErrorBody), (status = 409, body = berth_api::ErrorBody)))]
pub(crate) async fn delete_runtime(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    s.core.delete_runtime(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sessions", request_body = CreateSession,
    responses((status = 201, body = Session), (status = 409, body = berth_api::ErrorBody), (status = 429, body = berth_api::ErrorBody)))]
pub(crate) async fn create_session(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<CreateSession>,
) -> Result<(StatusCode, Json<Session>), AppError> {
    Ok((StatusCode::CREATED, Json(s.core.create_session(req).await?)))
}

#[utoipa::path(get, path = "/v1/sessions", responses((status = 200, body = Vec<Session>)))]
pub(crate) async fn list_sessions(
    State(s): State<AppState>,
) -> Result<Json<Vec<Session>>, AppError> {
    Ok(Json(s.core.list_sessions().await?))
}

#[utoipa::path(get, path = "/v1/sessions/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Session), (status = 404, body = berth_api::ErrorBody)))]
pub(crate) async fn get_session(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Session>, AppError> {
    Ok(Json(s.core.get_session(&id).await?))
}

#[utoipa::path(post, path = "/v1/sessions/{id}/stop", params(("id" = String, Path)),
    responses((status = 200, body = Session), (status = 404, body = berth_api::ErrorBody)))]
pub(crate) async fn stop_session(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Session>, AppError> {
    Ok(Json(s.core.stop_session(&id, "requested").await?))
}

#[utoipa::path(delete, path = "/v1/sessions/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = berth_api::ErrorBody)))]
pub(crate) async fn delete_session(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    s.core.delete_session(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Streams one JSON `CommandEvent` per line (`application/x-ndjson`), or binary frames
/// with raw output bytes when the client accepts `application/vnd.berth.frames`
/// (see `berth_api::frames`).
#[utoipa::path(post, path = "/v1/sessions/{id}/commands", params(("id" = String, Path)), request_body = CommandRequest,
    responses((status = 200, description = "NDJSON stream of CommandEvent (or binary frames, see berth_api::frames)", body = berth_api::CommandEvent, content_type = "application/x-ndjson"),
              (status = 400, body = berth_api::ErrorBody), (status = 429, body = berth_api::ErrorBody)))]
pub(crate) async fn run_command(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CommandRequest>,
) -> Result<Response, AppError> {
    let binary = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(frames::CONTENT_TYPE));
    let events = s.core.run_command(&id, req).await?;
    if binary {
        // Header and payload go out as separate chunks so output bytes are never copied.
        let body = events.flat_map(|ev| {
            let (kind, payload) = match ev {
                ExecEvent::Stdout(b) => (frames::KIND_STDOUT, b),
                ExecEvent::Stderr(b) => (frames::KIND_STDERR, b),
                other => (
                    frames::KIND_EVENT,
                    Bytes::from(serde_json::to_vec(&other.to_api()).unwrap_or_default()),
                ),
            };
            let head = Bytes::copy_from_slice(&frames::header(kind, payload.len()));
            futures::stream::iter([Ok::<_, std::convert::Infallible>(head), Ok(payload)])
        });
        return Ok((
            [(header::CONTENT_TYPE, frames::CONTENT_TYPE)],
            Body::from_stream(body),
        )
            .into_response());
    }
    let body = events.map(|ev| {
        let mut line = serde_json::to_vec(&ev.to_api()).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

#[utoipa::path(post, path = "/v1/sessions/{id}/commands/{command_id}/signal",
    params(("id" = String, Path), ("command_id" = String, Path)), request_body = SignalRequest,
    responses((status = 204), (status = 404, body = berth_api::ErrorBody)))]
pub(crate) async fn signal_command(
    State(s): State<AppState>,
    Path((id, command_id)): Path<(String, String)>,
    ApiJson(req): ApiJson<SignalRequest>,
) -> Result<StatusCode, AppError> {
    s.core.signal_command(&id, &command_id, &req.signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadFileQuery {
    /// Return a tar archive of the file or directory.
    #[serde(default)]
    tar: bool,
    /// Return the file's metadata as JSON instead of its content.
    #[serde(default)]
    stat: bool,
    /// Return the directory's entries as JSON.
    #[serde(default)]
    list: bool,
}

/// The path after `/files/` is the absolute path inside the sandbox.
#[utoipa::path(get, path = "/v1/sessions/{id}/files/{path}", params(("id" = String, Path), ("path" = String, Path), ReadFileQuery),
    responses((status = 200, description = "file bytes, a tar archive, or JSON metadata", content_type = "application/octet-stream"),
              (status = 404, body = berth_api::ErrorBody)))]
pub(crate) async fn read_file(
    State(s): State<AppState>,
    Path((id, path)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<ReadFileQuery>,
) -> Result<Response, AppError> {
    let path = format!("/{path}");
    if q.stat {
        return Ok(Json(s.core.stat_file(&id, &path).await?).into_response());
    }
    if q.list {
        return Ok(Json(s.core.list_dir(&id, &path).await?).into_response());
    }
    let stream = s.core.read_file(&id, &path, q.tar).await?;
    let content_type = if q.tar {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    let body =
        Body::from_stream(stream.map(|r| r.map_err(|e| std::io::Error::other(e.to_string()))));
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct WriteFileQuery {
    /// The body is a tar archive to unpack into the directory at the path.
    #[serde(default)]
    tar: bool,
    /// Octal file mode for a plain file (default 644).
    #[serde(default)]
    mode: Option<String>,
}

/// Written bytes.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WriteFileResult {
    pub bytes: u64,
}

#[utoipa::path(put, path = "/v1/sessions/{id}/files/{path}", params(("id" = String, Path), ("path" = String, Path), WriteFileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = WriteFileResult), (status = 400, body = berth_api::ErrorBody)))]
pub(crate) async fn write_file(
    State(s): State<AppState>,
    Path((id, path)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<WriteFileQuery>,
    body: Body,
) -> Result<Json<WriteFileResult>, AppError> {
    let path = format!("/{path}");
    let mode = match q.mode.as_deref() {
        None => 0,
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                AppError(berth_api::ApiError::invalid(
                    "mode",
                    "must be an octal file mode such as 644",
                ))
            })?,
    };
    let stream = body
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other));
    let bytes = s.core.write_file(&id, &path, q.tar, mode, stream).await?;
    Ok(Json(WriteFileResult { bytes }))
}

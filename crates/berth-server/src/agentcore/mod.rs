//! The AgentCore-compatible control plane: the runtime and runtime-endpoint operations
//! of `bedrock-agentcore-control` (botocore 1.44.5) over Berth's core, with AWS's
//! rest-json errors. The wire contract is `docs/design/agentcore-wire.md`; the mapping
//! onto native runtimes and every decision about members Berth does not support are in
//! `README.md` beside this file.
//!
//! [`router`] serves the routes under `/runtimes/` behind one auth layer
//! ([`auth::require_credentials`]) and a request-id layer; [`AgentCore`] holds the state
//! the handlers share and the seam the data plane uses ([`AgentCore::resolve`]).

pub mod artifacts;
pub mod auth;
mod data;
mod endpoints;
mod error;
mod idempotency;
mod ids;
pub mod images;
pub mod mapping;
pub mod model;
mod pagination;
mod provision;
pub mod request_id;
mod runtimes;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{middleware, Json, Router};
use berth_core::Core;
use berth_store::Store;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

pub use artifacts::{BaseImage, HostImage, ManagedRuntime};
pub use error::{AwsError, ErrorShape, FieldError, ValidationReason};

use crate::{AppState, MAX_JSON_BODY};

/// `berth server --region` default.
pub const DEFAULT_REGION: &str = "us-east-1";
/// `berth server --account-id` default: twelve zeros, the account id local AWS emulators
/// use, so that it is obviously not a real account.
pub const DEFAULT_ACCOUNT_ID: &str = "000000000000";

/// The server's AgentCore settings.
#[derive(Debug, Clone)]
pub struct AgentCoreConfig {
    /// Region in minted ARNs; clients must use the same one (the SDK's shell client
    /// checks that the ARN's region is the client's).
    pub region: String,
    /// Twelve-digit account id in minted ARNs.
    pub account_id: String,
    /// The server's data dir; code is unpacked under `agentcore/code/`.
    pub data_dir: PathBuf,
    /// The object store: one directory per bucket.
    pub object_store_dir: PathBuf,
    /// EFS / S3 Files access point ARN → the host directory mounted for it.
    pub shared_dirs: BTreeMap<String, PathBuf>,
    /// Container images: the cache (beside the data dir by default) and registries.
    pub images: images::ImagesConfig,
}

impl AgentCoreConfig {
    /// Defaults: `us-east-1`, account `000000000000`, buckets in `<data_dir>/buckets`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            region: DEFAULT_REGION.into(),
            account_id: DEFAULT_ACCOUNT_ID.into(),
            object_store_dir: data_dir.join("buckets"),
            images: images::ImagesConfig::beside(&data_dir),
            data_dir,
            shared_dirs: BTreeMap::new(),
        }
    }

    fn check(&self) -> Result<(), AgentCoreError> {
        static REGION: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
            regex::Regex::new(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$").expect("region pattern compiles")
        });
        if !REGION.is_match(&self.region) {
            return Err(AgentCoreError::Config(format!(
                "region {:?} is not an AWS region name such as us-east-1 (the AgentCore SDK rejects other forms)",
                self.region
            )));
        }
        if self.account_id.len() != 12 || !self.account_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AgentCoreError::Config(format!(
                "account id {:?} is not twelve digits",
                self.account_id
            )));
        }
        for (arn, dir) in &self.shared_dirs {
            if !(validate::EFS_ACCESS_POINT.matches(arn)
                || validate::S3_FILES_ACCESS_POINT.matches(arn))
            {
                return Err(AgentCoreError::Config(format!(
                    "shared dir {arn:?} is not an EFS or S3 Files access point ARN"
                )));
            }
            if !dir.is_absolute() || !dir.is_dir() {
                return Err(AgentCoreError::Config(format!(
                    "shared dir {} for {arn} is not an existing absolute directory",
                    dir.display()
                )));
            }
        }
        self.images
            .check(&self.data_dir)
            .map_err(AgentCoreError::Config)
    }
}

/// Parse `ARN=DIR` (the `--shared-dir` flag).
pub fn parse_shared_dir(s: &str) -> Result<(String, PathBuf), String> {
    let (arn, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ARN=DIR"))?;
    if !(validate::EFS_ACCESS_POINT.matches(arn) || validate::S3_FILES_ACCESS_POINT.matches(arn)) {
        return Err(format!(
            "{arn:?} is not an EFS (arn:aws:elasticfilesystem:…:access-point/fsap-…) or S3 Files access point ARN"
        ));
    }
    Ok((arn.to_string(), PathBuf::from(dir)))
}

#[derive(Debug, thiserror::Error)]
pub enum AgentCoreError {
    #[error("invalid AgentCore configuration: {0}")]
    Config(String),
    #[error("cannot recover AgentCore runtimes interrupted by a restart")]
    Recover(#[source] berth_store::StoreError),
}

/// The control plane's shared state. Cheap to clone.
#[derive(Clone)]
pub struct AgentCore {
    inner: Arc<Inner>,
}

struct Inner {
    core: Core,
    store: Store,
    config: AgentCoreConfig,
    objects: artifacts::ObjectSource,
    images: berth_oci::ImageCache,
    base_image: Arc<dyn BaseImage>,
    limits: artifacts::Limits,
    /// Serializes the mutating operations, so that clientToken checks, name checks and
    /// version numbering never interleave.
    writes: tokio::sync::Mutex<()>,
    /// The data plane's in-memory state.
    data: data::DataState,
}

impl AgentCore {
    /// Start over the core and its store with the host as the base image. Versions a
    /// killed server left CREATING or UPDATING are marked failed (see README), and the
    /// agents of the sessions the core adopted are polled again (in the background).
    pub async fn start(
        core: Core,
        store: Store,
        config: AgentCoreConfig,
    ) -> Result<Self, AgentCoreError> {
        Self::start_with(core, store, config, Arc::new(HostImage::default())).await
    }

    /// [`AgentCore::start`] with another base image.
    pub async fn start_with(
        core: Core,
        store: Store,
        config: AgentCoreConfig,
        base_image: Arc<dyn BaseImage>,
    ) -> Result<Self, AgentCoreError> {
        config.check()?;
        let ac = Self {
            inner: Arc::new(Inner {
                core,
                store,
                objects: artifacts::ObjectSource::new(&config.object_store_dir),
                images: images::cache(&config.images),
                config,
                base_image,
                limits: artifacts::Limits::default(),
                writes: tokio::sync::Mutex::new(()),
                data: data::DataState::default(),
            }),
        };
        ac.recover().await.map_err(AgentCoreError::Recover)?;
        // `Core::new` adopted the sandboxes a previous server left running before it
        // returned the core, so every session to resume is known by now. In the
        // background: probing each agent must not hold up the server's start, and the
        // per-session agent lock orders it with invokes that come meanwhile.
        let resuming = ac.clone();
        tokio::spawn(async move { resuming.resume_agents().await });
        Ok(ac)
    }

    pub fn config(&self) -> &AgentCoreConfig {
        &self.inner.config
    }

    pub(crate) fn core(&self) -> &Core {
        &self.inner.core
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) async fn writes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.writes.lock().await
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What the data plane needs to serve `qualifier` of a runtime.
#[derive(Debug, Clone)]
pub struct Target {
    pub runtime_id: String,
    pub runtime_arn: String,
    pub endpoint: String,
    /// The READY version the endpoint serves.
    pub version: u32,
    /// The native runtime of that version (`ac.<id>.v<N>`).
    pub native_runtime: String,
    /// The version's validated request members.
    pub spec: model::RuntimeSpec,
    pub protocol: mapping::Protocol,
    pub header_allowlist: Vec<String>,
    /// The version's unpacked code on the host.
    pub code_dir: PathBuf,
}

impl AgentCore {
    /// The version an endpoint (`DEFAULT` when `qualifier` is `None`) serves now.
    pub async fn resolve(
        &self,
        runtime_id: &str,
        qualifier: Option<&str>,
    ) -> Result<Target, AwsError> {
        let endpoint = qualifier.unwrap_or(endpoints::DEFAULT);
        let ac = self.store().agentcore();
        let not_found = || {
            AwsError::not_found(format!(
                "endpoint {endpoint} of agent runtime {runtime_id} not found"
            ))
        };
        let ep = ac
            .get_endpoint(runtime_id, endpoint)
            .await?
            .ok_or_else(not_found)?;
        let latest = ac.latest_version(runtime_id).await?.ok_or_else(not_found)?;
        let target = ac
            .get_version(runtime_id, ep.pinned_version.unwrap_or(latest.version))
            .await?;
        let view = endpoints::view(&ep, latest.version, target.as_ref());
        let Some(version) = view.live else {
            return Err(AwsError::conflict(format!(
                "endpoint {endpoint} of agent runtime {runtime_id} has no READY version yet (status {})",
                view.status.as_str()
            )));
        };
        // The live version is usually the target one, already read.
        let rec = match target {
            Some(rec) if rec.version == version => rec,
            _ => ac
                .get_version(runtime_id, version)
                .await?
                .ok_or_else(not_found)?,
        };
        self.target(endpoint, &rec)
    }

    /// What the data plane needs to serve version `rec` through `endpoint`.
    pub(crate) fn target(
        &self,
        endpoint: &str,
        rec: &berth_store::agentcore::AcVersion,
    ) -> Result<Target, AwsError> {
        let spec: model::RuntimeSpec = runtimes::spec_of(rec)?;
        let (runtime_id, version) = (rec.runtime_id.as_str(), rec.version);
        Ok(Target {
            runtime_id: runtime_id.to_string(),
            runtime_arn: ids::runtime_arn(self.config(), runtime_id),
            endpoint: endpoint.to_string(),
            version,
            native_runtime: mapping::native_name(runtime_id, version),
            protocol: mapping::protocol(&spec),
            header_allowlist: mapping::header_allowlist(&spec),
            code_dir: artifacts::code_dir(&self.config().data_dir, runtime_id, version),
            spec,
        })
    }
}

// ---- HTTP plumbing ----

/// A successful response: status and JSON body (kept as a value so that clientToken
/// replays return it byte for byte).
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    pub fn new(status: u16, body: Value) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            body,
        }
    }

    fn json(status: StatusCode, body: &impl Serialize) -> Result<Self, AwsError> {
        let body = serde_json::to_value(body).map_err(|e| {
            tracing::error!(error = %e, "agentcore: cannot serialize a response");
            AwsError::internal()
        })?;
        Ok(Self { status, body })
    }

    /// 200.
    pub fn ok(body: &impl Serialize) -> Result<Self, AwsError> {
        Self::json(StatusCode::OK, body)
    }

    /// 202, what the model says for Create/Update/Delete.
    pub fn accepted(body: &impl Serialize) -> Result<Self, AwsError> {
        Self::json(StatusCode::ACCEPTED, body)
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// The [`AgentCore`] of the app.
pub(crate) struct Ac(pub AgentCore);

impl FromRequestParts<AppState> for Ac {
    type Rejection = AwsError;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self, AwsError> {
        state.agentcore.clone().map(Ac).ok_or_else(|| {
            tracing::error!("agentcore: routes mounted without AgentCore state");
            AwsError::internal()
        })
    }
}

/// A JSON object body (an empty body is `{}`).
pub(crate) struct Body(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = AwsError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AwsError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AwsError::cannot_parse(format!(
                    "the request body is larger than {MAX_JSON_BODY} bytes"
                ))
            } else {
                AwsError::cannot_parse(format!("cannot read the request body: {rej}"))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(Map::new()));
        }
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(Body(map)),
            Ok(_) => Err(AwsError::cannot_parse(
                "the request body must be a JSON object",
            )),
            Err(e) => Err(AwsError::cannot_parse(format!(
                "the request body is not valid JSON: {e}"
            ))),
        }
    }
}

/// The query string as a map (percent-decoded).
pub(crate) struct Query(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Query {
    type Rejection = AwsError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AwsError> {
        axum::extract::Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(|e| {
                AwsError::cannot_parse(format!("malformed query string: {}", e.body_text()))
            })
    }
}

/// Path parameters with an AWS error as rejection.
pub(crate) struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = AwsError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AwsError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParams(p.0))
            .map_err(|e| AwsError::cannot_parse(format!("bad path: {}", e.body_text())))
    }
}

async fn unknown_operation(method: Method, uri: Uri) -> AwsError {
    AwsError::unknown_operation(method.as_str(), uri.path())
}

/// The AgentCore control-plane routes, ready to merge into the app. Auth is one layer over
/// all of them (the SigV4 seam, see [`auth`]); every response carries `x-amzn-RequestId`.
///
/// The routes are nested under `/runtimes/` with their own fallback, so that any unknown
/// path or method there is an AWS-style `UnknownOperationException`. Routes added here
/// later (the data plane) must name the runtime segment `{runtime}`, as these do.
pub fn router(state: AppState) -> Router {
    let operations = Router::new()
        .route(
            "/",
            put(runtimes::create)
                .post(runtimes::list)
                .fallback(unknown_operation),
        )
        .route(
            "/{runtime}/",
            get(runtimes::get)
                .put(runtimes::update)
                .delete(runtimes::delete)
                .fallback(unknown_operation),
        )
        .route(
            "/{runtime}/versions/",
            post(runtimes::list_versions).fallback(unknown_operation),
        )
        .route(
            "/{runtime}/runtime-endpoints/",
            put(endpoints::create)
                .post(endpoints::list)
                .fallback(unknown_operation),
        )
        .route(
            "/{runtime}/runtime-endpoints/{endpoint}/",
            get(endpoints::get)
                .put(endpoints::update)
                .delete(endpoints::delete)
                .fallback(unknown_operation),
        )
        .merge(data::routes())
        .fallback(unknown_operation);
    Router::new()
        .route("/runtimes", any(unknown_operation))
        .nest("/runtimes/", operations)
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_credentials,
        ))
        .layer(middleware::from_fn(request_id::stamp))
        .with_state(state)
}

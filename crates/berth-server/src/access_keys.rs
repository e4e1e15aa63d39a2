//! Access keys for SigV4 clients of the AgentCore-compatible API: the admin routes
//! `POST/GET /v1/access-keys`, `DELETE /v1/access-keys/{id}`, and [`AccessKeys`], the
//! service that keeps the secrets and authenticates signed requests with them.
//!
//! A SigV4 verifier recomputes the client's HMAC, so it needs the secret itself: secrets
//! are sealed with AES-256-GCM (associated data: the key id) under a random 32-byte key in
//! `<data-dir>/keys/access-keys.key` (0600, directory 0700), made on first use. The
//! database alone (a backup, a copy of `state.db`) does not reveal them.
//!
//! For the AgentCore adapter:
//!
//! ```ignore
//! let req = sigv4::Request { method, path: uri.path(), query: uri.query().unwrap_or(""),
//!     headers: &headers, authority: uri.authority().map(|a| a.as_str()),
//!     payload_sha256: &hex::encode(Sha256::digest(&body)) };
//! match state.access_keys.authenticate(&req, &["bedrock-agentcore"], SystemTime::now()).await {
//!     Ok(verified) => …,                                    // verified.credential.access_key_id
//!     Err(AuthenticateError::Rejected(e)) => match e.kind() { … }, // AWS error codes
//!     Err(AuthenticateError::Lookup(e)) => …,               // 500, log e
//! }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequestParts, Path as UrlPath, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Json, Router};
use base64::Engine;
use berth_api::access_key::{
    validate_id, validate_name, ACCESS_KEY_ID_LEN, ACCESS_KEY_ID_PREFIX, SECRET_ACCESS_KEY_LEN,
};
use berth_api::{AccessKey, ApiError, CreateAccessKey, CreatedAccessKey, ErrorCode};
use berth_store::{AccessKeyRecord, SealedSecret, Store, StoreError};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::extract::ApiJson;
use crate::sigv4::{self, SecretKey, SigV4Error, Verified};
use crate::{AppError, AppState};

/// The key file, relative to the data dir.
pub const KEY_FILE: &str = "keys/access-keys.key";
/// A key's last use is written at most this often.
const LAST_USED_GRANULARITY_MS: i64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum AccessKeyError {
    #[error("cannot create the directory {path} for the access key file")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the access key file {path}")]
    ReadKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the access key file {path}")]
    WriteKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the access key file {path} is not a key: it must hold 64 hexadecimal characters (32 bytes)")]
    BadKeyFile { path: PathBuf },
    #[error("the access key file {path} is missing, but {count} access key(s) were sealed with it; restore the file, or delete those keys with `berth access-key delete`")]
    KeyFileMissing { path: PathBuf, count: i64 },
    #[error("cannot decrypt the secret of access key {id}: it was sealed with another key than the one in {path} (was the key file replaced?)")]
    Decrypt { id: String, path: PathBuf },
    #[error("the system random number generator failed")]
    Random,
    #[error("access key storage failed")]
    Store(#[source] StoreError),
}

/// Why [`AccessKeys::authenticate`] did not accept a request.
#[derive(Debug, thiserror::Error)]
pub enum AuthenticateError {
    /// The client's fault: map [`SigV4Error::kind`] to an AWS error code.
    #[error(transparent)]
    Rejected(#[from] SigV4Error),
    /// The server's: log it and answer 500.
    #[error("cannot look up the access key")]
    Lookup(#[source] AccessKeyError),
}

/// The access keys of this server: create, list, delete, look up secrets, authenticate.
pub struct AccessKeys {
    store: Store,
    key_path: PathBuf,
    cipher: tokio::sync::OnceCell<LessSafeKey>,
    rng: SystemRandom,
    /// Last use written to the store, per key, to write it at most once a minute.
    last_written: Mutex<HashMap<String, i64>>,
}

impl AccessKeys {
    /// Keys in `store`, secrets sealed under `<data_dir>/keys/access-keys.key`. Touches no
    /// file: the key file is read, or made, on first use.
    pub fn new(store: Store, data_dir: &Path) -> Self {
        Self {
            store,
            key_path: data_dir.join(KEY_FILE),
            cipher: tokio::sync::OnceCell::new(),
            rng: SystemRandom::new(),
            last_written: Mutex::new(HashMap::new()),
        }
    }

    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// Make a new key pair; the only time its secret is returned.
    pub async fn create(
        &self,
        name: Option<String>,
        now_ms: i64,
    ) -> Result<CreatedAccessKey, AccessKeyError> {
        let cipher = self.cipher(true).await?;
        let mut raw = [0u8; SECRET_ACCESS_KEY_LEN / 4 * 3];
        self.rng
            .fill(&mut raw)
            .map_err(|_| AccessKeyError::Random)?;
        let secret = base64::engine::general_purpose::STANDARD.encode(raw);
        // A clash of 16 random characters is all but impossible; retry anyway.
        let mut attempts = 0;
        loop {
            let record = AccessKeyRecord {
                id: self.new_id()?,
                name: name.clone(),
                created_at_ms: now_ms,
                last_used_ms: None,
            };
            let sealed = self.seal(cipher, &record.id, &secret)?;
            match self.store.insert_access_key(&record, &sealed).await {
                Ok(()) => {
                    return Ok(CreatedAccessKey {
                        id: record.id,
                        name: record.name,
                        created_at_ms: record.created_at_ms,
                        secret_access_key: secret,
                    })
                }
                Err(StoreError::AlreadyExists { .. }) if attempts < 3 => attempts += 1,
                Err(e) => return Err(AccessKeyError::Store(e)),
            }
        }
    }

    pub async fn list(&self) -> Result<Vec<AccessKey>, AccessKeyError> {
        let records = self
            .store
            .list_access_keys()
            .await
            .map_err(AccessKeyError::Store)?;
        Ok(records
            .into_iter()
            .map(|r| AccessKey {
                id: r.id,
                name: r.name,
                created_at_ms: r.created_at_ms,
                last_used_ms: r.last_used_ms,
            })
            .collect())
    }

    /// Delete a key; `false` when there was none. Requests signed with it fail from now on.
    pub async fn delete(&self, id: &str) -> Result<bool, AccessKeyError> {
        self.store
            .delete_access_key(id)
            .await
            .map_err(AccessKeyError::Store)
    }

    /// The secret of access key `id`, `None` when no such key exists.
    pub async fn secret(&self, id: &str) -> Result<Option<SecretKey>, AccessKeyError> {
        let Some(sealed) = self
            .store
            .access_key_secret(id)
            .await
            .map_err(AccessKeyError::Store)?
        else {
            return Ok(None);
        };
        let cipher = self.cipher(false).await?;
        let decrypt = || AccessKeyError::Decrypt {
            id: id.to_string(),
            path: self.key_path.clone(),
        };
        let nonce = Nonce::try_assume_unique_for_key(&sealed.nonce).map_err(|_| decrypt())?;
        let mut buf = sealed.ciphertext;
        let plain = cipher
            .open_in_place(nonce, aad(id), &mut buf)
            .map_err(|_| decrypt())?;
        let secret = String::from_utf8(plain.to_vec()).map_err(|_| decrypt())?;
        Ok(Some(SecretKey::new(secret)))
    }

    /// Verify a SigV4-signed request against these keys (see [`sigv4`]) and record the
    /// key's use.
    pub async fn authenticate(
        &self,
        req: &sigv4::Request<'_>,
        services: &[&str],
        now: SystemTime,
    ) -> Result<Verified, AuthenticateError> {
        let signed = sigv4::parse(req)?;
        signed.check(services, now)?;
        let id = signed.access_key_id();
        // An id that cannot be ours is unknown without a database query.
        let secret = if validate_id("id", id).is_ok() {
            self.secret(id).await.map_err(AuthenticateError::Lookup)?
        } else {
            None
        };
        let secret = secret.ok_or_else(|| SigV4Error::UnknownAccessKey { id: id.to_string() })?;
        let verified = signed.verify(&secret)?;
        self.record_use(id, unix_ms(now)).await;
        Ok(verified)
    }

    async fn record_use(&self, id: &str, now_ms: i64) {
        {
            #[allow(clippy::unwrap_used)] // poisoned only if a holder panicked
            let mut last = self.last_written.lock().unwrap();
            match last.get(id) {
                Some(t) if now_ms - t < LAST_USED_GRANULARITY_MS => return,
                _ => {
                    last.insert(id.to_string(), now_ms);
                }
            }
        }
        if let Err(e) = self.store.touch_access_key(id, now_ms).await {
            tracing::warn!(error = ?e, access_key = id, "cannot record the access key's use");
        }
    }

    fn new_id(&self) -> Result<String, AccessKeyError> {
        const ALPHABET: &[u8; 36] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let mut raw = [0u8; ACCESS_KEY_ID_LEN - ACCESS_KEY_ID_PREFIX.len()];
        self.rng
            .fill(&mut raw)
            .map_err(|_| AccessKeyError::Random)?;
        let mut id = String::from(ACCESS_KEY_ID_PREFIX);
        // 252 = 7 × 36: bytes above it are redrawn so every character is equally likely.
        for b in &mut raw {
            while *b >= 252 {
                let mut one = [0u8; 1];
                self.rng
                    .fill(&mut one)
                    .map_err(|_| AccessKeyError::Random)?;
                *b = one[0];
            }
            id.push(ALPHABET[usize::from(*b % 36)] as char);
        }
        Ok(id)
    }

    fn seal(
        &self,
        cipher: &LessSafeKey,
        id: &str,
        secret: &str,
    ) -> Result<SealedSecret, AccessKeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| AccessKeyError::Random)?;
        let mut buf = secret.as_bytes().to_vec();
        cipher
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), aad(id), &mut buf)
            .map_err(|_| AccessKeyError::Random)?;
        Ok(SealedSecret {
            nonce: nonce.to_vec(),
            ciphertext: buf,
        })
    }

    /// The sealing key; with `create`, made (atomically) when the file does not exist.
    async fn cipher(&self, create: bool) -> Result<&LessSafeKey, AccessKeyError> {
        if let Some(c) = self.cipher.get() {
            return Ok(c);
        }
        let path = &self.key_path;
        let bytes = match std::fs::read_to_string(path) {
            Ok(text) => parse_key_file(path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let count = self
                    .store
                    .access_key_count()
                    .await
                    .map_err(AccessKeyError::Store)?;
                if count > 0 || !create {
                    return Err(AccessKeyError::KeyFileMissing {
                        path: path.clone(),
                        count,
                    });
                }
                create_key_file(path, &self.rng)?
            }
            Err(source) => {
                return Err(AccessKeyError::ReadKeyFile {
                    path: path.clone(),
                    source,
                })
            }
        };
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| AccessKeyError::BadKeyFile { path: path.clone() })?;
        Ok(self
            .cipher
            .get_or_init(|| async { LessSafeKey::new(key) })
            .await)
    }
}

/// What the secret's ciphertext is bound to: a row's sealed secret cannot be moved to
/// another key id.
fn aad(id: &str) -> Aad<Vec<u8>> {
    Aad::from(format!("berth access key {id}").into_bytes())
}

fn parse_key_file(path: &Path, text: &str) -> Result<[u8; 32], AccessKeyError> {
    use std::os::unix::fs::PermissionsExt;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|_| AccessKeyError::BadKeyFile {
        path: path.to_path_buf(),
    })?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the access key file is readable by others than its owner; chmod 600 it"
            );
        }
    }
    Ok(key)
}

/// Write a new random key to `path` (0600, its directory 0700) without ever exposing a
/// half-written file: written to a temp file, synced, then hard-linked into place, which
/// fails if another process made the file first; then that one is used.
fn create_key_file(path: &Path, rng: &SystemRandom) -> Result<[u8; 32], AccessKeyError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir_err = |source| AccessKeyError::CreateDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(dir_err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(dir_err)?;

    let mut key = [0u8; 32];
    rng.fill(&mut key).map_err(|_| AccessKeyError::Random)?;
    let mut suffix = [0u8; 8];
    rng.fill(&mut suffix).map_err(|_| AccessKeyError::Random)?;
    let tmp = dir.join(format!(".access-keys.key.{}", hex::encode(suffix)));
    let write_err = |source| AccessKeyError::WriteKeyFile {
        path: path.to_path_buf(),
        source,
    };
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(write_err)?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text =
                std::fs::read_to_string(path).map_err(|source| AccessKeyError::ReadKeyFile {
                    path: path.to_path_buf(),
                    source,
                })?;
            parse_key_file(path, &text)
        }
        Err(e) => Err(write_err(e)),
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---- routes ----

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/access-keys",
            post(create_access_key).get(list_access_keys),
        )
        .route("/v1/access-keys/{id}", delete(delete_access_key))
}

/// Only the admin token may manage access keys. (The router's middleware has already
/// checked that the token is valid at all.)
pub(crate) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .unwrap_or_default();
        let role = state
            .access_keys
            .store
            .token_role(&crate::hash_token(token))
            .await
            .map_err(|e| internal("look up the token's role", e))?;
        match role.as_deref() {
            Some("admin") => Ok(Admin),
            _ => Err(AppError::new(
                ErrorCode::Unauthenticated,
                "managing access keys needs the admin token (<data-dir>/admin.token)",
            )),
        }
    }
}

fn internal(what: &str, err: impl std::fmt::Debug) -> AppError {
    tracing::error!(error = ?err, "cannot {what}");
    AppError::new(
        ErrorCode::Internal,
        format!("cannot {what}; the server log says why"),
    )
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// Create an access key. The answer holds its secret, which is never shown again.
#[utoipa::path(post, path = "/v1/access-keys", request_body = CreateAccessKey,
    responses((status = 201, body = CreatedAccessKey), (status = 400, body = berth_api::ErrorBody),
              (status = 401, body = berth_api::ErrorBody)))]
pub(crate) async fn create_access_key(
    _: Admin,
    State(s): State<AppState>,
    ApiJson(req): ApiJson<CreateAccessKey>,
) -> Result<(StatusCode, Json<CreatedAccessKey>), AppError> {
    if let Some(name) = &req.name {
        validate_name("name", name)?;
    }
    let created = s
        .access_keys
        .create(req.name, now_ms())
        .await
        .map_err(|e| internal("create the access key", e))?;
    tracing::info!(access_key = %created.id, "created an access key");
    Ok((StatusCode::CREATED, Json(created)))
}

/// List access keys (never their secrets).
#[utoipa::path(get, path = "/v1/access-keys",
    responses((status = 200, body = Vec<AccessKey>), (status = 401, body = berth_api::ErrorBody)))]
pub(crate) async fn list_access_keys(
    _: Admin,
    State(s): State<AppState>,
) -> Result<Json<Vec<AccessKey>>, AppError> {
    let keys = s
        .access_keys
        .list()
        .await
        .map_err(|e| internal("list access keys", e))?;
    Ok(Json(keys))
}

/// Delete an access key; requests signed with it are refused from then on.
#[utoipa::path(delete, path = "/v1/access-keys/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 400, body = berth_api::ErrorBody),
              (status = 401, body = berth_api::ErrorBody), (status = 404, body = berth_api::ErrorBody)))]
pub(crate) async fn delete_access_key(
    _: Admin,
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, AppError> {
    validate_id("id", &id)?;
    let deleted = s
        .access_keys
        .delete(&id)
        .await
        .map_err(|e| internal("delete the access key", e))?;
    if !deleted {
        return Err(ApiError::not_found("access key", &id).into());
    }
    tracing::info!(access_key = %id, "deleted an access key");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    async fn keys(dir: &Path) -> AccessKeys {
        let store = Store::open(&dir.join("state.db")).await.unwrap();
        AccessKeys::new(store, dir)
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn create_list_secret_delete() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys(dir.path()).await;
        assert!(!keys.key_path().exists(), "no key file before first use");
        assert!(keys.list().await.unwrap().is_empty());
        assert_eq!(keys.secret("BKIAAAAAAAAAAAAAAAAA").await.unwrap(), None);
        assert!(
            !keys.key_path().exists(),
            "looking up an unknown key makes no key file"
        );

        let a = keys.create(Some("ci".into()), 10).await.unwrap();
        let b = keys.create(None, 20).await.unwrap();
        for k in [&a, &b] {
            validate_id("id", &k.id).unwrap();
            assert_eq!(k.secret_access_key.len(), SECRET_ACCESS_KEY_LEN);
            assert!(k
                .secret_access_key
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/'));
        }
        assert_ne!(a.id, b.id);
        assert_ne!(a.secret_access_key, b.secret_access_key);
        assert_eq!(mode(keys.key_path()), 0o600);
        assert_eq!(mode(keys.key_path().parent().unwrap()), 0o700);

        let list = keys.list().await.unwrap();
        assert_eq!(
            list,
            vec![
                AccessKey {
                    id: a.id.clone(),
                    name: Some("ci".into()),
                    created_at_ms: 10,
                    last_used_ms: None
                },
                AccessKey {
                    id: b.id.clone(),
                    name: None,
                    created_at_ms: 20,
                    last_used_ms: None
                },
            ]
        );
        assert_eq!(
            keys.secret(&a.id).await.unwrap().unwrap().expose(),
            a.secret_access_key
        );

        // The database holds no secret in clear.
        drop(keys);
        let db = std::fs::read(dir.path().join("state.db")).unwrap();
        let wal = std::fs::read(dir.path().join("state.db-wal")).unwrap_or_default();
        for bytes in [db, wal] {
            assert!(!bytes
                .windows(SECRET_ACCESS_KEY_LEN)
                .any(|w| w == a.secret_access_key.as_bytes()));
        }

        // A new process (same data dir) reads the key file and opens the secrets.
        let keys = super::tests::keys(dir.path()).await;
        assert_eq!(
            keys.secret(&b.id).await.unwrap().unwrap().expose(),
            b.secret_access_key
        );
        assert!(keys.delete(&a.id).await.unwrap());
        assert!(!keys.delete(&a.id).await.unwrap());
        assert_eq!(keys.secret(&a.id).await.unwrap(), None);
        assert_eq!(keys.list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_wrong_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys(dir.path()).await.create(None, 1).await.unwrap();
        let path = dir.path().join(KEY_FILE);

        // Another valid key: the secret cannot be opened, and the error says why.
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        let err = keys(dir.path()).await.secret(&k.id).await.unwrap_err();
        assert!(matches!(err, AccessKeyError::Decrypt { .. }), "{err}");
        assert!(err.to_string().contains(&k.id) && err.to_string().contains("access-keys.key"));

        // Not a key at all.
        std::fs::write(&path, "not a key\n").unwrap();
        let err = keys(dir.path()).await.secret(&k.id).await.unwrap_err();
        assert!(matches!(err, AccessKeyError::BadKeyFile { .. }), "{err}");
        assert!(err.to_string().contains("64 hexadecimal"), "{err}");

        // Gone: neither looking up nor creating silently makes a new key.
        std::fs::remove_file(&path).unwrap();
        let keys = keys(dir.path()).await;
        let err = keys.secret(&k.id).await.unwrap_err();
        assert!(
            matches!(err, AccessKeyError::KeyFileMissing { count: 1, .. }),
            "{err}"
        );
        let err = keys.create(None, 2).await.unwrap_err();
        assert!(err.to_string().contains("restore the file"), "{err}");
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_sealed_secret_is_bound_to_its_key_id() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys(dir.path()).await;
        let a = keys.create(None, 1).await.unwrap();
        let b = keys.create(None, 2).await.unwrap();
        let sealed_a = keys.store.access_key_secret(&a.id).await.unwrap().unwrap();
        keys.store.delete_access_key(&b.id).await.unwrap();
        let moved = AccessKeyRecord {
            id: b.id.clone(),
            name: None,
            created_at_ms: 2,
            last_used_ms: None,
        };
        keys.store
            .insert_access_key(&moved, &sealed_a)
            .await
            .unwrap();
        let err = keys.secret(&b.id).await.unwrap_err();
        assert!(matches!(err, AccessKeyError::Decrypt { .. }), "{err}");
    }

    #[tokio::test]
    async fn concurrent_first_uses_agree_on_one_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let rng = SystemRandom::new();
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| create_key_file(&path, &rng).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["access-keys.key"], "no temp files left behind");
    }

    #[tokio::test]
    async fn authenticate_checks_the_signature_and_records_use() {
        use axum::http::{HeaderMap, HeaderValue};
        use hmac::{Hmac, Mac};
        use sha2::{Digest, Sha256};

        let dir = tempfile::tempdir().unwrap();
        let keys = keys(dir.path()).await;
        let k = keys.create(None, 1).await.unwrap();
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_768_472_430);

        // Sign GET /runtimes/ the SigV4 way, with the new key.
        let empty = hex::encode(Sha256::digest(b""));
        let canonical = format!(
            "GET\n/runtimes/\n\nhost:127.0.0.1:7878\nx-amz-date:20260115T102030Z\n\nhost;x-amz-date\n{empty}"
        );
        let sts = format!(
            "AWS4-HMAC-SHA256\n20260115T102030Z\n20260115/us-east-1/bedrock-agentcore/aws4_request\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let hmac = |key: &[u8], msg: &str| {
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
            m.update(msg.as_bytes());
            m.finalize().into_bytes().to_vec()
        };
        let mut key = format!("AWS4{}", k.secret_access_key).into_bytes();
        for part in ["20260115", "us-east-1", "bedrock-agentcore", "aws4_request"] {
            key = hmac(&key, part);
        }
        let signature = hex::encode(hmac(&key, &sts));
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:7878"));
        headers.insert("x-amz-date", HeaderValue::from_static("20260115T102030Z"));
        let auth = |id: &str, sig: &str| {
            HeaderValue::from_str(&format!(
                "AWS4-HMAC-SHA256 Credential={id}/20260115/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=host;x-amz-date, Signature={sig}"
            ))
            .unwrap()
        };
        headers.insert("authorization", auth(&k.id, &signature));
        fn req<'a>(headers: &'a HeaderMap, empty: &'a str) -> sigv4::Request<'a> {
            sigv4::Request {
                method: "GET",
                path: "/runtimes/",
                query: "",
                headers,
                authority: None,
                payload_sha256: empty,
            }
        }
        let verified = keys
            .authenticate(&req(&headers, &empty), &["bedrock-agentcore"], now)
            .await
            .unwrap();
        assert_eq!(verified.credential.access_key_id, k.id);
        assert_eq!(
            keys.list().await.unwrap()[0].last_used_ms,
            Some(1_768_472_430_000)
        );

        let reject = async |headers: HeaderMap| match keys
            .authenticate(&req(&headers, &empty), &["bedrock-agentcore"], now)
            .await
        {
            Err(AuthenticateError::Rejected(e)) => e.kind(),
            other => panic!("{other:?}"),
        };
        let mut wrong = headers.clone();
        wrong.insert("authorization", auth(&k.id, &"0".repeat(64)));
        assert_eq!(reject(wrong).await, sigv4::ErrorKind::SignatureMismatch);
        let mut unknown = headers.clone();
        unknown.insert("authorization", auth("BKIAAAAAAAAAAAAAAAAA", &signature));
        assert_eq!(reject(unknown).await, sigv4::ErrorKind::UnknownAccessKey);
        let mut foreign = headers.clone();
        foreign.insert("authorization", auth("AKIDEXAMPLE", &signature));
        assert_eq!(reject(foreign).await, sigv4::ErrorKind::UnknownAccessKey);
        keys.delete(&k.id).await.unwrap();
        assert_eq!(
            reject(headers).await,
            sigv4::ErrorKind::UnknownAccessKey,
            "a deleted key stops working at once"
        );
    }
}

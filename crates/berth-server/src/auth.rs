//! Bearer-token authentication. Only SHA-256 hashes of tokens are stored.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use berth_api::ErrorCode;
use berth_store::Store;
use sha2::{Digest, Sha256};

use crate::{AppError, AppState};

/// Hashes of the tokens the server accepts, loaded at start.
#[derive(Default)]
pub struct Tokens {
    hashes: RwLock<HashSet<String>>,
}

impl Tokens {
    pub fn contains(&self, token: &str) -> bool {
        #[allow(clippy::unwrap_used)] // poisoned only if a writer panicked
        self.hashes.read().unwrap().contains(&hash_token(token))
    }

    pub fn insert_hash(&self, hash: String) {
        #[allow(clippy::unwrap_used)]
        self.hashes.write().unwrap().insert(hash);
    }
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// On first start, mint the admin token, store its hash and write it to
/// `<data_dir>/admin.token` (0600). Returns the token file's path and whether it was new.
pub async fn ensure_admin_token(
    store: &Store,
    data_dir: &Path,
    tokens: &Tokens,
    now_ms: i64,
) -> anyhow::Result<(PathBuf, bool)> {
    use anyhow::Context;
    use rand::RngCore;
    let path = data_dir.join("admin.token");
    let mut created = false;
    if store.token_count().await? == 0 {
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let token = format!("berth_{}", hex::encode(raw));
        write_secret(&path, &token).with_context(|| format!("cannot write {}", path.display()))?;
        store
            .insert_token("admin", &hash_token(&token), "admin", now_ms)
            .await?;
        created = true;
    }
    let hashes: Vec<String> = store.token_hashes().await?;
    for h in hashes {
        tokens.insert_hash(h);
    }
    Ok((path, created))
}

fn write_secret(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("token.tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reject requests without a valid `Authorization: Bearer <token>`.
pub async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = header.and_then(|h| {
        h.strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
    });
    match token {
        None => Err(AppError::new(
            ErrorCode::Unauthenticated,
            "missing Authorization: Bearer <token> header; the admin token is in <data-dir>/admin.token",
        )),
        Some(t) if state.tokens.contains(t.trim()) => Ok(next.run(req).await),
        Some(_) => Err(AppError::new(ErrorCode::Unauthenticated, "the bearer token is not valid")),
    }
}

//! Berth's persistent state: API tokens, runtimes and session records in SQLite.
//!
//! The database runs in WAL mode with `synchronous=FULL`, so a record whose write
//! returned survives a SIGKILL of the server (and a power cut).

mod access_keys;
pub mod agentcore;
mod records;

use std::path::Path;
use std::str::FromStr;

use berth_api::RuntimeSpec;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

pub use access_keys::{AccessKeyRecord, SealedSecret};
pub use records::{SessionRecord, StoredRuntime};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate the state database")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("{what} {id:?} already exists")]
    AlreadyExists { what: &'static str, id: String },
    #[error("state database query failed: {op}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("stored {what} is corrupt")]
    Corrupt {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn query_err(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Open (creating if needed) the database at `path` and apply migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        restrict_permissions(path).map_err(|e| open_err(sqlx::Error::Io(e)))?;
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(open_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        Ok(Self { pool })
    }

    // ---- API tokens ----

    pub async fn token_count(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT COUNT(*) FROM api_tokens")
            .fetch_one(&self.pool)
            .await
            .map_err(query_err("count tokens"))
    }

    pub async fn insert_token(
        &self,
        id: &str,
        sha256: &str,
        role: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO api_tokens (id, sha256, role, created_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(sha256)
            .bind(role)
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .map_err(query_err("insert token"))?;
        Ok(())
    }

    pub async fn token_hashes(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT sha256 FROM api_tokens")
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("list tokens"))
    }

    /// The role of the token whose hash is `sha256`, if any.
    pub async fn token_role(&self, sha256: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT role FROM api_tokens WHERE sha256 = ?")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("look up token"))
    }

    // ---- runtimes ----

    pub async fn insert_runtime(&self, spec: &RuntimeSpec, now_ms: i64) -> Result<(), StoreError> {
        let json = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt {
            what: "runtime",
            source: Box::new(e),
        })?;
        sqlx::query("INSERT INTO runtimes (name, spec, created_at) VALUES (?, ?, ?)")
            .bind(&spec.name)
            .bind(json)
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists {
                        what: "runtime",
                        id: spec.name.clone(),
                    }
                } else {
                    StoreError::Query {
                        op: "insert runtime",
                        source: e,
                    }
                }
            })?;
        Ok(())
    }

    pub async fn get_runtime(&self, name: &str) -> Result<Option<StoredRuntime>, StoreError> {
        let row = sqlx::query("SELECT spec, created_at FROM runtimes WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("get runtime"))?;
        row.map(|r| StoredRuntime::from_row(&r)).transpose()
    }

    pub async fn list_runtimes(&self) -> Result<Vec<StoredRuntime>, StoreError> {
        let rows = sqlx::query("SELECT spec, created_at FROM runtimes ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("list runtimes"))?;
        rows.iter().map(StoredRuntime::from_row).collect()
    }

    /// Delete a runtime; `false` when it did not exist.
    pub async fn delete_runtime(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM runtimes WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(query_err("delete runtime"))?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn sessions_using_runtime(&self, name: &str) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT COUNT(*) FROM sessions WHERE runtime = ?")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(query_err("count sessions of runtime"))
    }

    // ---- sessions ----

    /// Insert a new session, choosing the lowest free uid slot.
    pub async fn insert_session(&self, rec: &mut SessionRecord) -> Result<(), StoreError> {
        // IMMEDIATE takes the write lock up front: a deferred transaction that reads the
        // free slot and then writes fails with SQLITE_BUSY under concurrent inserts
        // (WAL cannot upgrade a reader whose snapshot went stale), ignoring busy_timeout.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_err("begin"))?;
        let slot: i64 = sqlx::query_scalar(
            "SELECT COALESCE((SELECT MIN(s.uid_slot + 1) FROM sessions s \
             WHERE NOT EXISTS (SELECT 1 FROM sessions t WHERE t.uid_slot = s.uid_slot + 1)), 0) \
             * (EXISTS (SELECT 1 FROM sessions WHERE uid_slot = 0))",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(query_err("pick uid slot"))?;
        rec.uid_slot = u32::try_from(slot).unwrap_or(u32::MAX);
        sqlx::query(
            "INSERT INTO sessions (id, runtime, state, uid_slot, stop_reason, cpu_ns, \
             peak_memory_bytes, workspace_bytes, created_at, last_activity_at, started_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&rec.id)
        .bind(&rec.runtime)
        .bind(&rec.state)
        .bind(i64::from(rec.uid_slot))
        .bind(&rec.stop_reason)
        .bind(rec.cpu_ns as i64)
        .bind(rec.peak_memory_bytes as i64)
        .bind(rec.workspace_bytes as i64)
        .bind(rec.created_at_ms)
        .bind(rec.last_activity_ms)
        .bind(rec.started_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::AlreadyExists {
                    what: "session",
                    id: rec.id.clone(),
                }
            } else {
                StoreError::Query {
                    op: "insert session",
                    source: e,
                }
            }
        })?;
        tx.commit().await.map_err(query_err("commit session"))?;
        Ok(())
    }

    pub async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(concat!(records::session_select!(), " WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("get session"))?;
        row.map(|r| SessionRecord::from_row(&r)).transpose()
    }

    pub async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            records::session_select!(),
            " ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("list sessions"))?;
        rows.iter().map(SessionRecord::from_row).collect()
    }

    /// Write every mutable field of a session record.
    pub async fn update_session(&self, rec: &SessionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sessions SET state = ?, stop_reason = ?, cpu_ns = ?, peak_memory_bytes = ?, \
             workspace_bytes = ?, last_activity_at = ?, started_at = ? WHERE id = ?",
        )
        .bind(&rec.state)
        .bind(&rec.stop_reason)
        .bind(rec.cpu_ns as i64)
        .bind(rec.peak_memory_bytes as i64)
        .bind(rec.workspace_bytes as i64)
        .bind(rec.last_activity_ms)
        .bind(rec.started_at_ms)
        .bind(&rec.id)
        .execute(&self.pool)
        .await
        .map_err(query_err("update session"))?;
        Ok(())
    }

    pub async fn touch_session(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE sessions SET last_activity_at = MAX(last_activity_at, ?) WHERE id = ?")
            .bind(now_ms)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_err("touch session"))?;
        Ok(())
    }

    pub async fn delete_session(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM sessions WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_err("delete session"))?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The database holds token hashes and session records: owner-only, created so before
/// SQLite opens it (its `-wal` and `-shm` files copy the main file's mode).
fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Column access helper shared by the record decoders.
fn col<'r, T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
    row: &'r sqlx::sqlite::SqliteRow,
    name: &'static str,
) -> Result<T, StoreError> {
    row.try_get(name).map_err(|e| StoreError::Corrupt {
        what: name,
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests;

//! State of the AgentCore-compatible control plane (`berth-server`'s `agentcore`
//! module): agent runtimes, their immutable versions, runtime endpoints and clientToken
//! records. Request bodies are stored as the JSON the server validated; this crate does
//! not interpret them.

use sqlx::sqlite::SqliteRow;
use sqlx::SqlitePool;

use crate::{col, is_unique_violation, query_err, Store, StoreError};

/// Statuses a version is in while the server prepares it.
pub const IN_PROGRESS: [&str; 2] = ["CREATING", "UPDATING"];

/// An agent runtime (`agentcore_runtimes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcRuntime {
    pub id: String,
    pub name: String,
    /// JSON object of the tags given at creation.
    pub tags: String,
    pub created_at_ms: i64,
}

/// One immutable version of an agent runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcVersion {
    pub runtime_id: String,
    pub version: u32,
    /// The validated request members as JSON.
    pub spec: String,
    pub status: String,
    pub failure_reason: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A runtime endpoint. `pinned_version` `None` follows the runtime's latest version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcEndpoint {
    pub runtime_id: String,
    pub name: String,
    pub id: String,
    pub pinned_version: Option<u32>,
    pub live_version: Option<u32>,
    pub description: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// The container image a version runs (`agentcore_version_images`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcVersionImage {
    pub runtime_id: String,
    pub version: u32,
    /// `containerUri` as given.
    pub reference: String,
    /// The image manifest's digest (`sha256:…`).
    pub digest: String,
    /// The image's run configuration as JSON.
    pub config: String,
}

/// The stored response to the first successful request with a clientToken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcClientToken {
    pub request_sha256: String,
    pub status: u16,
    pub response: String,
}

/// The AgentCore tables; see [`Store::agentcore`].
pub struct AgentCoreStore<'a> {
    pool: &'a SqlitePool,
}

impl Store {
    pub fn agentcore(&self) -> AgentCoreStore<'_> {
        AgentCoreStore { pool: &self.pool }
    }
}

fn version_of(row: &SqliteRow, name: &'static str) -> Result<u32, StoreError> {
    let v: i64 = col(row, name)?;
    u32::try_from(v).map_err(|e| StoreError::Corrupt {
        what: name,
        source: Box::new(e),
    })
}

fn opt_version_of(row: &SqliteRow, name: &'static str) -> Result<Option<u32>, StoreError> {
    let v: Option<i64> = col(row, name)?;
    v.map(|v| {
        u32::try_from(v).map_err(|e| StoreError::Corrupt {
            what: name,
            source: Box::new(e),
        })
    })
    .transpose()
}

impl AcRuntime {
    fn from_row(row: &SqliteRow) -> Result<Self, StoreError> {
        Ok(Self {
            id: col(row, "id")?,
            name: col(row, "name")?,
            tags: col(row, "tags")?,
            created_at_ms: col(row, "created_at")?,
        })
    }
}

impl AcVersion {
    fn from_row(row: &SqliteRow) -> Result<Self, StoreError> {
        Ok(Self {
            runtime_id: col(row, "runtime_id")?,
            version: version_of(row, "version")?,
            spec: col(row, "spec")?,
            status: col(row, "status")?,
            failure_reason: col(row, "failure_reason")?,
            created_at_ms: col(row, "created_at")?,
            updated_at_ms: col(row, "updated_at")?,
        })
    }
}

impl AcEndpoint {
    fn from_row(row: &SqliteRow) -> Result<Self, StoreError> {
        Ok(Self {
            runtime_id: col(row, "runtime_id")?,
            name: col(row, "name")?,
            id: col(row, "id")?,
            pinned_version: opt_version_of(row, "pinned_version")?,
            live_version: opt_version_of(row, "live_version")?,
            description: col(row, "description")?,
            created_at_ms: col(row, "created_at")?,
            updated_at_ms: col(row, "updated_at")?,
        })
    }
}

/// Column lists (macros so that every query stays one literal SQL string).
macro_rules! runtime_cols {
    () => {
        "id, name, tags, created_at"
    };
}
macro_rules! version_cols {
    () => {
        "runtime_id, version, spec, status, failure_reason, created_at, updated_at"
    };
}
macro_rules! endpoint_cols {
    () => {
        "runtime_id, name, id, pinned_version, live_version, description, created_at, updated_at"
    };
}

impl AgentCoreStore<'_> {
    // ---- runtimes ----

    /// Insert a runtime with its first version and its DEFAULT endpoint, atomically.
    /// A taken name is `AlreadyExists`.
    pub async fn create_runtime(
        &self,
        rt: &AcRuntime,
        first: &AcVersion,
        default_endpoint: &AcEndpoint,
    ) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_err("begin"))?;
        sqlx::query(concat!(
            "INSERT INTO agentcore_runtimes (",
            runtime_cols!(),
            ") VALUES (?, ?, ?, ?)"
        ))
        .bind(&rt.id)
        .bind(&rt.name)
        .bind(&rt.tags)
        .bind(rt.created_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::AlreadyExists {
                    what: "agent runtime",
                    id: rt.name.clone(),
                }
            } else {
                StoreError::Query {
                    op: "insert agent runtime",
                    source: e,
                }
            }
        })?;
        insert_version(&mut tx, first).await?;
        insert_endpoint(&mut tx, default_endpoint).await?;
        tx.commit()
            .await
            .map_err(query_err("commit agent runtime"))?;
        Ok(())
    }

    pub async fn get_runtime(&self, id: &str) -> Result<Option<AcRuntime>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            runtime_cols!(),
            " FROM agentcore_runtimes WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(self.pool)
        .await
        .map_err(query_err("get agent runtime"))?;
        row.map(|r| AcRuntime::from_row(&r)).transpose()
    }

    /// Every runtime, oldest first (ties by id).
    pub async fn list_runtimes(&self) -> Result<Vec<AcRuntime>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            runtime_cols!(),
            " FROM agentcore_runtimes ORDER BY created_at, id"
        ))
        .fetch_all(self.pool)
        .await
        .map_err(query_err("list agent runtimes"))?;
        rows.iter().map(AcRuntime::from_row).collect()
    }

    /// Delete a runtime with its versions and endpoints; `false` when it did not exist.
    pub async fn delete_runtime(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM agentcore_runtimes WHERE id = ?")
            .bind(id)
            .execute(self.pool)
            .await
            .map_err(query_err("delete agent runtime"))?;
        Ok(done.rows_affected() > 0)
    }

    // ---- versions ----

    /// Add the next version (one more than the highest ever stored, so numbers are
    /// never reused while the latest version exists) and return its number.
    pub async fn add_version(
        &self,
        runtime_id: &str,
        spec: &str,
        status: &str,
        now_ms: i64,
    ) -> Result<u32, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_err("begin"))?;
        let next: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM agentcore_versions WHERE runtime_id = ?",
        )
        .bind(runtime_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(query_err("next agent runtime version"))?;
        let version = u32::try_from(next).map_err(|e| StoreError::Corrupt {
            what: "agent runtime version",
            source: Box::new(e),
        })?;
        insert_version(
            &mut tx,
            &AcVersion {
                runtime_id: runtime_id.to_string(),
                version,
                spec: spec.to_string(),
                status: status.to_string(),
                failure_reason: None,
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
            },
        )
        .await?;
        tx.commit()
            .await
            .map_err(query_err("commit agent runtime version"))?;
        Ok(version)
    }

    pub async fn get_version(
        &self,
        runtime_id: &str,
        version: u32,
    ) -> Result<Option<AcVersion>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            version_cols!(),
            " FROM agentcore_versions WHERE runtime_id = ? AND version = ?"
        ))
        .bind(runtime_id)
        .bind(i64::from(version))
        .fetch_optional(self.pool)
        .await
        .map_err(query_err("get agent runtime version"))?;
        row.map(|r| AcVersion::from_row(&r)).transpose()
    }

    pub async fn latest_version(&self, runtime_id: &str) -> Result<Option<AcVersion>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            version_cols!(),
            " FROM agentcore_versions WHERE runtime_id = ? ORDER BY version DESC LIMIT 1"
        ))
        .bind(runtime_id)
        .fetch_optional(self.pool)
        .await
        .map_err(query_err("get latest agent runtime version"))?;
        row.map(|r| AcVersion::from_row(&r)).transpose()
    }

    /// A runtime's versions, newest first.
    pub async fn list_versions(&self, runtime_id: &str) -> Result<Vec<AcVersion>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            version_cols!(),
            " FROM agentcore_versions WHERE runtime_id = ? ORDER BY version DESC"
        ))
        .bind(runtime_id)
        .fetch_all(self.pool)
        .await
        .map_err(query_err("list agent runtime versions"))?;
        rows.iter().map(AcVersion::from_row).collect()
    }

    /// The latest version of every runtime.
    pub async fn latest_versions(&self) -> Result<Vec<AcVersion>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            version_cols!(),
            " FROM agentcore_versions v WHERE version = \
             (SELECT MAX(version) FROM agentcore_versions w WHERE w.runtime_id = v.runtime_id)"
        ))
        .fetch_all(self.pool)
        .await
        .map_err(query_err("list latest agent runtime versions"))?;
        rows.iter().map(AcVersion::from_row).collect()
    }

    /// Versions still CREATING or UPDATING (after a restart: their preparation died).
    pub async fn unfinished_versions(&self) -> Result<Vec<AcVersion>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            version_cols!(),
            " FROM agentcore_versions WHERE status IN ('CREATING', 'UPDATING') \
             ORDER BY runtime_id, version"
        ))
        .fetch_all(self.pool)
        .await
        .map_err(query_err("list unfinished agent runtime versions"))?;
        rows.iter().map(AcVersion::from_row).collect()
    }

    /// Move a version that is still CREATING or UPDATING to `status`. When that is
    /// `READY`, every endpoint that targets the version (pinned to it, or DEFAULT and it is
    /// the latest) now serves it. `false` when the version is gone or already finished.
    pub async fn finish_version(
        &self,
        runtime_id: &str,
        version: u32,
        status: &str,
        failure_reason: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_err("begin"))?;
        let done = sqlx::query(
            "UPDATE agentcore_versions SET status = ?, failure_reason = ?, updated_at = ? \
             WHERE runtime_id = ? AND version = ? AND status IN ('CREATING', 'UPDATING')",
        )
        .bind(status)
        .bind(failure_reason)
        .bind(now_ms)
        .bind(runtime_id)
        .bind(i64::from(version))
        .execute(&mut *tx)
        .await
        .map_err(query_err("finish agent runtime version"))?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        if status == "READY" {
            sqlx::query(
                "UPDATE agentcore_endpoints SET live_version = ?1, updated_at = ?2 \
                 WHERE runtime_id = ?3 AND (pinned_version = ?1 OR (pinned_version IS NULL AND ?1 = \
                 (SELECT MAX(version) FROM agentcore_versions WHERE runtime_id = ?3)))",
            )
            .bind(i64::from(version))
            .bind(now_ms)
            .bind(runtime_id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("move endpoints to a ready version"))?;
        }
        tx.commit()
            .await
            .map_err(query_err("commit agent runtime version"))?;
        Ok(true)
    }

    /// Delete one version; `false` when it did not exist.
    pub async fn delete_version(&self, runtime_id: &str, version: u32) -> Result<bool, StoreError> {
        let done =
            sqlx::query("DELETE FROM agentcore_versions WHERE runtime_id = ? AND version = ?")
                .bind(runtime_id)
                .bind(i64::from(version))
                .execute(self.pool)
                .await
                .map_err(query_err("delete agent runtime version"))?;
        Ok(done.rows_affected() > 0)
    }

    // ---- container images of versions ----

    /// Record (or replace) the image a version runs.
    pub async fn put_version_image(&self, img: &AcVersionImage) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR REPLACE INTO agentcore_version_images \
             (runtime_id, version, reference, digest, config) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&img.runtime_id)
        .bind(i64::from(img.version))
        .bind(&img.reference)
        .bind(&img.digest)
        .bind(&img.config)
        .execute(self.pool)
        .await
        .map_err(query_err("put agent runtime version image"))?;
        Ok(())
    }

    /// The images of a runtime's versions (all of them when `version` is `None`).
    pub async fn version_images(
        &self,
        runtime_id: &str,
        version: Option<u32>,
    ) -> Result<Vec<AcVersionImage>, StoreError> {
        let rows = sqlx::query(
            "SELECT runtime_id, version, reference, digest, config FROM agentcore_version_images \
             WHERE runtime_id = ?1 AND (?2 IS NULL OR version = ?2) ORDER BY version",
        )
        .bind(runtime_id)
        .bind(version.map(i64::from))
        .fetch_all(self.pool)
        .await
        .map_err(query_err("list agent runtime version images"))?;
        rows.iter()
            .map(|r| {
                Ok(AcVersionImage {
                    runtime_id: col(r, "runtime_id")?,
                    version: version_of(r, "version")?,
                    reference: col(r, "reference")?,
                    digest: col(r, "digest")?,
                    config: col(r, "config")?,
                })
            })
            .collect()
    }

    /// Forget the image of one version; `false` when it had none.
    pub async fn delete_version_image(
        &self,
        runtime_id: &str,
        version: u32,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "DELETE FROM agentcore_version_images WHERE runtime_id = ? AND version = ?",
        )
        .bind(runtime_id)
        .bind(i64::from(version))
        .execute(self.pool)
        .await
        .map_err(query_err("delete agent runtime version image"))?;
        Ok(done.rows_affected() > 0)
    }

    /// Every image digest some version still runs.
    pub async fn image_digests_in_use(&self) -> Result<Vec<String>, StoreError> {
        let rows =
            sqlx::query("SELECT DISTINCT digest FROM agentcore_version_images ORDER BY digest")
                .fetch_all(self.pool)
                .await
                .map_err(query_err("list image digests in use"))?;
        rows.iter().map(|r| col(r, "digest")).collect()
    }

    // ---- endpoints ----

    /// A taken name is `AlreadyExists`.
    pub async fn insert_endpoint(&self, ep: &AcEndpoint) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(query_err("acquire"))?;
        insert_endpoint(&mut conn, ep).await
    }

    pub async fn get_endpoint(
        &self,
        runtime_id: &str,
        name: &str,
    ) -> Result<Option<AcEndpoint>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            endpoint_cols!(),
            " FROM agentcore_endpoints WHERE runtime_id = ? AND name = ?"
        ))
        .bind(runtime_id)
        .bind(name)
        .fetch_optional(self.pool)
        .await
        .map_err(query_err("get agent runtime endpoint"))?;
        row.map(|r| AcEndpoint::from_row(&r)).transpose()
    }

    /// A runtime's endpoints, oldest first (ties by name).
    pub async fn list_endpoints(&self, runtime_id: &str) -> Result<Vec<AcEndpoint>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            endpoint_cols!(),
            " FROM agentcore_endpoints WHERE runtime_id = ? ORDER BY created_at, name"
        ))
        .bind(runtime_id)
        .fetch_all(self.pool)
        .await
        .map_err(query_err("list agent runtime endpoints"))?;
        rows.iter().map(AcEndpoint::from_row).collect()
    }

    /// Write an endpoint's mutable fields (pinned and live version, description, time).
    pub async fn update_endpoint(&self, ep: &AcEndpoint) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agentcore_endpoints SET pinned_version = ?, live_version = ?, description = ?, \
             updated_at = ? WHERE runtime_id = ? AND name = ?",
        )
        .bind(ep.pinned_version.map(i64::from))
        .bind(ep.live_version.map(i64::from))
        .bind(&ep.description)
        .bind(ep.updated_at_ms)
        .bind(&ep.runtime_id)
        .bind(&ep.name)
        .execute(self.pool)
        .await
        .map_err(query_err("update agent runtime endpoint"))?;
        Ok(())
    }

    pub async fn delete_endpoint(&self, runtime_id: &str, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM agentcore_endpoints WHERE runtime_id = ? AND name = ?")
            .bind(runtime_id)
            .bind(name)
            .execute(self.pool)
            .await
            .map_err(query_err("delete agent runtime endpoint"))?;
        Ok(done.rows_affected() > 0)
    }

    // ---- clientToken idempotency ----

    pub async fn client_token(
        &self,
        scope: &str,
        token: &str,
    ) -> Result<Option<AcClientToken>, StoreError> {
        let row = sqlx::query(
            "SELECT request_sha256, status, response FROM agentcore_client_tokens \
             WHERE scope = ? AND token = ?",
        )
        .bind(scope)
        .bind(token)
        .fetch_optional(self.pool)
        .await
        .map_err(query_err("get client token"))?;
        row.map(|r| {
            let status: i64 = col(&r, "status")?;
            Ok(AcClientToken {
                request_sha256: col(&r, "request_sha256")?,
                status: u16::try_from(status).unwrap_or(200),
                response: col(&r, "response")?,
            })
        })
        .transpose()
    }

    /// Remember the response to a request with a clientToken (the first one wins), and
    /// forget tokens recorded before `expire_before_ms`.
    pub async fn put_client_token(
        &self,
        scope: &str,
        token: &str,
        record: &AcClientToken,
        now_ms: i64,
        expire_before_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM agentcore_client_tokens WHERE created_at < ?")
            .bind(expire_before_ms)
            .execute(self.pool)
            .await
            .map_err(query_err("expire client tokens"))?;
        sqlx::query(
            "INSERT OR IGNORE INTO agentcore_client_tokens \
             (scope, token, request_sha256, status, response, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(scope)
        .bind(token)
        .bind(&record.request_sha256)
        .bind(i64::from(record.status))
        .bind(&record.response)
        .bind(now_ms)
        .execute(self.pool)
        .await
        .map_err(query_err("put client token"))?;
        Ok(())
    }
}

async fn insert_version(
    conn: &mut sqlx::SqliteConnection,
    v: &AcVersion,
) -> Result<(), StoreError> {
    sqlx::query(concat!(
        "INSERT INTO agentcore_versions (",
        version_cols!(),
        ") VALUES (?, ?, ?, ?, ?, ?, ?)"
    ))
    .bind(&v.runtime_id)
    .bind(i64::from(v.version))
    .bind(&v.spec)
    .bind(&v.status)
    .bind(&v.failure_reason)
    .bind(v.created_at_ms)
    .bind(v.updated_at_ms)
    .execute(conn)
    .await
    .map_err(query_err("insert agent runtime version"))?;
    Ok(())
}

async fn insert_endpoint(
    conn: &mut sqlx::SqliteConnection,
    ep: &AcEndpoint,
) -> Result<(), StoreError> {
    sqlx::query(concat!(
        "INSERT INTO agentcore_endpoints (",
        endpoint_cols!(),
        ") VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    ))
    .bind(&ep.runtime_id)
    .bind(&ep.name)
    .bind(&ep.id)
    .bind(ep.pinned_version.map(i64::from))
    .bind(ep.live_version.map(i64::from))
    .bind(&ep.description)
    .bind(ep.created_at_ms)
    .bind(ep.updated_at_ms)
    .execute(conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::AlreadyExists {
                what: "agent runtime endpoint",
                id: ep.name.clone(),
            }
        } else {
            StoreError::Query {
                op: "insert agent runtime endpoint",
                source: e,
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).await.unwrap();
        (dir, store)
    }

    fn runtime(id: &str, name: &str, at: i64) -> (AcRuntime, AcVersion, AcEndpoint) {
        (
            AcRuntime {
                id: id.into(),
                name: name.into(),
                tags: "{}".into(),
                created_at_ms: at,
            },
            AcVersion {
                runtime_id: id.into(),
                version: 1,
                spec: "{}".into(),
                status: "CREATING".into(),
                failure_reason: None,
                created_at_ms: at,
                updated_at_ms: at,
            },
            AcEndpoint {
                runtime_id: id.into(),
                name: "DEFAULT".into(),
                id: format!("DEFAULT-{id}"),
                pinned_version: None,
                live_version: None,
                description: None,
                created_at_ms: at,
                updated_at_ms: at,
            },
        )
    }

    #[tokio::test]
    async fn runtime_versions_and_default_endpoint() {
        let (_dir, store) = store().await;
        let ac = store.agentcore();
        let (rt, v1, ep) = runtime("a-0123456789", "a", 10);
        ac.create_runtime(&rt, &v1, &ep).await.unwrap();
        let (dup, dv, de) = runtime("a-9999999999", "a", 11);
        assert!(matches!(
            ac.create_runtime(&dup, &dv, &de).await,
            Err(StoreError::AlreadyExists { .. })
        ));
        // The failed insert left nothing behind.
        assert_eq!(ac.list_runtimes().await.unwrap(), vec![rt.clone()]);

        assert_eq!(
            ac.add_version(&rt.id, "{}", "UPDATING", 20).await.unwrap(),
            2
        );
        assert_eq!(ac.latest_version(&rt.id).await.unwrap().unwrap().version, 2);
        let versions: Vec<u32> = ac
            .list_versions(&rt.id)
            .await
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(versions, [2, 1]);
        assert_eq!(ac.unfinished_versions().await.unwrap().len(), 2);

        // Version 1 becoming READY does not move DEFAULT: it follows the latest (2).
        assert!(ac
            .finish_version(&rt.id, 1, "READY", None, 30)
            .await
            .unwrap());
        let default = ac.get_endpoint(&rt.id, "DEFAULT").await.unwrap().unwrap();
        assert_eq!(default.live_version, None);
        assert!(ac
            .finish_version(&rt.id, 2, "READY", None, 31)
            .await
            .unwrap());
        let default = ac.get_endpoint(&rt.id, "DEFAULT").await.unwrap().unwrap();
        assert_eq!(default.live_version, Some(2));
        // Finishing twice is refused: the version is no longer in progress.
        assert!(!ac
            .finish_version(&rt.id, 2, "UPDATE_FAILED", Some("x"), 32)
            .await
            .unwrap());
        assert!(ac.unfinished_versions().await.unwrap().is_empty());
        assert_eq!(ac.latest_versions().await.unwrap().len(), 1);

        assert!(ac.delete_version(&rt.id, 1).await.unwrap());
        assert!(!ac.delete_version(&rt.id, 1).await.unwrap());
        // Numbers are not reused.
        assert_eq!(
            ac.add_version(&rt.id, "{}", "UPDATING", 40).await.unwrap(),
            3
        );

        assert!(ac.delete_runtime(&rt.id).await.unwrap());
        assert!(ac.get_version(&rt.id, 2).await.unwrap().is_none());
        assert!(ac.list_endpoints(&rt.id).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn pinned_endpoints_follow_their_version() {
        let (_dir, store) = store().await;
        let ac = store.agentcore();
        let (rt, v1, ep) = runtime("b-0123456789", "b", 1);
        ac.create_runtime(&rt, &v1, &ep).await.unwrap();
        ac.finish_version(&rt.id, 1, "READY", None, 2)
            .await
            .unwrap();
        let mut pinned = AcEndpoint {
            name: "prod".into(),
            id: "prod-0123456789".into(),
            pinned_version: Some(2),
            live_version: Some(1),
            ..ep.clone()
        };
        ac.insert_endpoint(&pinned).await.unwrap();
        assert!(matches!(
            ac.insert_endpoint(&pinned).await,
            Err(StoreError::AlreadyExists { .. })
        ));
        ac.add_version(&rt.id, "{}", "UPDATING", 3).await.unwrap();
        ac.finish_version(&rt.id, 2, "READY", None, 4)
            .await
            .unwrap();
        let got = ac.get_endpoint(&rt.id, "prod").await.unwrap().unwrap();
        assert_eq!(got.live_version, Some(2));
        pinned.description = Some("d".into());
        pinned.live_version = Some(2);
        pinned.updated_at_ms = 4;
        ac.update_endpoint(&pinned).await.unwrap();
        assert_eq!(
            ac.get_endpoint(&rt.id, "prod").await.unwrap().unwrap(),
            pinned
        );
        let names: Vec<String> = ac
            .list_endpoints(&rt.id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["DEFAULT", "prod"]);
        assert!(ac.delete_endpoint(&rt.id, "prod").await.unwrap());
        assert!(!ac.delete_endpoint(&rt.id, "prod").await.unwrap());
    }

    #[tokio::test]
    async fn version_images_go_with_their_versions() {
        let (_dir, store) = store().await;
        let ac = store.agentcore();
        let (rt, v1, ep) = runtime("c-0123456789", "c", 1);
        ac.create_runtime(&rt, &v1, &ep).await.unwrap();
        ac.add_version(&rt.id, "{}", "UPDATING", 2).await.unwrap();
        let img = |version, digest: &str| AcVersionImage {
            runtime_id: rt.id.clone(),
            version,
            reference: "127.0.0.1:5000/a:v1".into(),
            digest: digest.into(),
            config: "{}".into(),
        };
        // An image needs its version.
        assert!(ac.put_version_image(&img(9, "sha256:x")).await.is_err());
        ac.put_version_image(&img(1, "sha256:a")).await.unwrap();
        ac.put_version_image(&img(2, "sha256:a")).await.unwrap();
        ac.put_version_image(&img(2, "sha256:b")).await.unwrap();
        assert_eq!(
            ac.version_images(&rt.id, None).await.unwrap(),
            [img(1, "sha256:a"), img(2, "sha256:b")]
        );
        assert_eq!(
            ac.version_images(&rt.id, Some(2)).await.unwrap(),
            [img(2, "sha256:b")]
        );
        assert_eq!(
            ac.image_digests_in_use().await.unwrap(),
            ["sha256:a", "sha256:b"]
        );
        assert!(ac.delete_version_image(&rt.id, 2).await.unwrap());
        assert!(!ac.delete_version_image(&rt.id, 2).await.unwrap());
        ac.put_version_image(&img(2, "sha256:b")).await.unwrap();
        ac.delete_version(&rt.id, 1).await.unwrap();
        assert_eq!(ac.image_digests_in_use().await.unwrap(), ["sha256:b"]);
        ac.delete_runtime(&rt.id).await.unwrap();
        assert!(ac.image_digests_in_use().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn client_tokens_keep_the_first_response_and_expire() {
        let (_dir, store) = store().await;
        let ac = store.agentcore();
        let rec = AcClientToken {
            request_sha256: "h".into(),
            status: 202,
            response: "{\"a\":1}".into(),
        };
        ac.put_client_token("Create", "t", &rec, 100, 0)
            .await
            .unwrap();
        let other = AcClientToken {
            response: "{}".into(),
            ..rec.clone()
        };
        ac.put_client_token("Create", "t", &other, 101, 0)
            .await
            .unwrap();
        assert_eq!(
            ac.client_token("Create", "t").await.unwrap(),
            Some(rec.clone())
        );
        assert_eq!(ac.client_token("Update/x", "t").await.unwrap(), None);
        ac.put_client_token("Create", "u", &rec, 200, 150)
            .await
            .unwrap();
        assert_eq!(ac.client_token("Create", "t").await.unwrap(), None);
    }
}

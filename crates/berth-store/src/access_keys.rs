//! SigV4 access keys. The store only keeps the sealed secret; sealing and opening it is
//! the server's business (`berth_server::AccessKeys`), with a key that is not in here.

use crate::{col, is_unique_violation, query_err, Store, StoreError};

/// An access key as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessKeyRecord {
    pub id: String,
    pub name: Option<String>,
    pub created_at_ms: i64,
    pub last_used_ms: Option<i64>,
}

/// A secret sealed with AES-256-GCM: the nonce and the ciphertext with its tag.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecret")
            .field("nonce", &self.nonce.len())
            .field("ciphertext", &self.ciphertext.len())
            .finish()
    }
}

impl AccessKeyRecord {
    fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Self, StoreError> {
        Ok(Self {
            id: col(row, "id")?,
            name: col(row, "name")?,
            created_at_ms: col(row, "created_at")?,
            last_used_ms: col(row, "last_used_at")?,
        })
    }
}

impl Store {
    pub async fn insert_access_key(
        &self,
        record: &AccessKeyRecord,
        secret: &SealedSecret,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO access_keys (id, name, secret_nonce, secret_ciphertext, created_at, \
             last_used_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&record.id)
        .bind(&record.name)
        .bind(&secret.nonce)
        .bind(&secret.ciphertext)
        .bind(record.created_at_ms)
        .bind(record.last_used_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::AlreadyExists {
                    what: "access key",
                    id: record.id.clone(),
                }
            } else {
                StoreError::Query {
                    op: "insert access key",
                    source: e,
                }
            }
        })?;
        Ok(())
    }

    /// Every access key, oldest first.
    pub async fn list_access_keys(&self) -> Result<Vec<AccessKeyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, last_used_at FROM access_keys ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("list access keys"))?;
        rows.iter().map(AccessKeyRecord::from_row).collect()
    }

    pub async fn access_key_count(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("SELECT COUNT(*) FROM access_keys")
            .fetch_one(&self.pool)
            .await
            .map_err(query_err("count access keys"))
    }

    /// The sealed secret of an access key, if the key exists.
    pub async fn access_key_secret(&self, id: &str) -> Result<Option<SealedSecret>, StoreError> {
        let row =
            sqlx::query("SELECT secret_nonce, secret_ciphertext FROM access_keys WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(query_err("look up access key"))?;
        row.map(|r| {
            Ok(SealedSecret {
                nonce: col(&r, "secret_nonce")?,
                ciphertext: col(&r, "secret_ciphertext")?,
            })
        })
        .transpose()
    }

    /// Record a use of the key (never moves the time backwards).
    pub async fn touch_access_key(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE access_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE id = ?",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_err("record access key use"))?;
        Ok(())
    }

    /// Delete an access key; `false` when it did not exist.
    pub async fn delete_access_key(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM access_keys WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_err("delete access key"))?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(id: &str, created: i64) -> AccessKeyRecord {
        AccessKeyRecord {
            id: id.into(),
            name: Some(format!("name of {id}")),
            created_at_ms: created,
            last_used_ms: None,
        }
    }

    fn sealed(n: u8) -> SealedSecret {
        SealedSecret {
            nonce: vec![n; 12],
            ciphertext: vec![n; 56],
        }
    }

    #[tokio::test]
    async fn access_keys_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).await.unwrap();
        assert_eq!(store.access_key_count().await.unwrap(), 0);
        store
            .insert_access_key(&record("B", 2), &sealed(2))
            .await
            .unwrap();
        let mut a = record("A", 1);
        a.name = None;
        store.insert_access_key(&a, &sealed(1)).await.unwrap();
        assert!(matches!(
            store.insert_access_key(&record("A", 3), &sealed(3)).await,
            Err(StoreError::AlreadyExists {
                what: "access key",
                ..
            })
        ));
        let list = store.list_access_keys().await.unwrap();
        assert_eq!(list, vec![a.clone(), record("B", 2)]);
        assert_eq!(store.access_key_secret("B").await.unwrap(), Some(sealed(2)));
        assert_eq!(store.access_key_secret("C").await.unwrap(), None);

        store.touch_access_key("A", 50).await.unwrap();
        store.touch_access_key("A", 40).await.unwrap();
        assert_eq!(
            store.list_access_keys().await.unwrap()[0].last_used_ms,
            Some(50)
        );

        assert!(store.delete_access_key("A").await.unwrap());
        assert!(!store.delete_access_key("A").await.unwrap());
        assert_eq!(store.access_key_count().await.unwrap(), 1);
        assert_eq!(store.access_key_secret("A").await.unwrap(), None);
    }

    #[test]
    fn sealed_secrets_do_not_show_their_bytes() {
        let s = format!("{:?}", sealed(0xab));
        assert!(!s.contains("171"), "{s}");
    }
}

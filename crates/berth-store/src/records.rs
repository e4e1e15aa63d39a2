use berth_api::RuntimeSpec;

use crate::{col, StoreError};

/// The column list every session query selects (a macro so queries stay literal SQL).
macro_rules! session_select {
    () => {
        "SELECT id, runtime, state, uid_slot, stop_reason, cpu_ns, peak_memory_bytes, \
         workspace_bytes, created_at, last_activity_at, started_at FROM sessions"
    };
}
pub(crate) use session_select;

#[derive(Debug, Clone)]
pub struct StoredRuntime {
    pub spec: RuntimeSpec,
    pub created_at_ms: i64,
}

impl StoredRuntime {
    pub(crate) fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Self, StoreError> {
        let json: String = col(row, "spec")?;
        let spec = serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
            what: "runtime spec",
            source: Box::new(e),
        })?;
        Ok(Self {
            spec,
            created_at_ms: col(row, "created_at")?,
        })
    }
}

/// A session row. `state` is the `berth_api::SessionState` string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub runtime: String,
    pub state: String,
    /// Assigned by `Store::insert_session`.
    pub uid_slot: u32,
    pub stop_reason: Option<String>,
    pub cpu_ns: u64,
    pub peak_memory_bytes: u64,
    pub workspace_bytes: u64,
    pub created_at_ms: i64,
    pub last_activity_ms: i64,
    pub started_at_ms: Option<i64>,
}

impl SessionRecord {
    pub(crate) fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Self, StoreError> {
        let as_u64 = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(Self {
            id: col(row, "id")?,
            runtime: col(row, "runtime")?,
            state: col(row, "state")?,
            uid_slot: u32::try_from(col::<i64>(row, "uid_slot")?).unwrap_or(u32::MAX),
            stop_reason: col(row, "stop_reason")?,
            cpu_ns: as_u64(col(row, "cpu_ns")?),
            peak_memory_bytes: as_u64(col(row, "peak_memory_bytes")?),
            workspace_bytes: as_u64(col(row, "workspace_bytes")?),
            created_at_ms: col(row, "created_at")?,
            last_activity_ms: col(row, "last_activity_at")?,
            started_at_ms: col(row, "started_at")?,
        })
    }
}

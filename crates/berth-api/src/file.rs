use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Metadata of a file in a sandbox (`GET …/files/{path}?stat=true`, `?list=true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileInfo {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub modified_ms: i64,
}

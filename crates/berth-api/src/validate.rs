//! Syntax rules shared by server and CLI.

use crate::ApiError;

/// Longest session or runtime id.
pub const MAX_ID_LEN: usize = 128;

/// Session and runtime ids: 1–128 chars of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
///
/// Ids name files under the data dir (`workspaces/<id>.ext4`), so the rule is what keeps
/// a client from naming a path outside its own session.
pub fn id(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > MAX_ID_LEN {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_ID_LEN} characters long"),
        ));
    }
    let first = value.as_bytes()[0];
    if first == b'.' || first == b'-' {
        return Err(ApiError::invalid(field, "must not start with '.' or '-'"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ApiError::invalid(
            field,
            format!("character {c:?} is not allowed (use letters, digits, '.', '_' and '-')"),
        ));
    }
    Ok(())
}

/// An absolute, normalised path inside the sandbox (no `..`, no empty or `.` segments).
pub fn sandbox_path(field: &str, value: &str) -> Result<(), ApiError> {
    if !value.starts_with('/') {
        return Err(ApiError::invalid(field, "must be an absolute path"));
    }
    if value.contains('\0') {
        return Err(ApiError::invalid(field, "must not contain NUL"));
    }
    if value.split('/').any(|seg| seg == "..") {
        return Err(ApiError::invalid(field, "must not contain '..'"));
    }
    Ok(())
}

/// Environment variable names: non-empty, no `=`, no NUL.
pub fn env_names<'a>(
    field: &str,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<(), ApiError> {
    match names
        .into_iter()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        Some(bad) => Err(ApiError::invalid(
            field,
            format!("invalid variable name {bad:?}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(id("id", "my-task_1.2").is_ok());
        for bad in ["", ".", "..", "../x", "a/b", "-x", "a b", &"x".repeat(129)] {
            let err = id("session_id", bad).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("session_id"), "{bad:?}");
        }
    }

    #[test]
    fn paths() {
        assert!(sandbox_path("path", "/mnt/workspace/a.txt").is_ok());
        assert!(sandbox_path("path", "relative").is_err());
        assert!(sandbox_path("path", "/a/../etc").is_err());
    }
}

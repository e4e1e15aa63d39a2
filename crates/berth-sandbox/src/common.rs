//! Small pieces both drivers need: error wrapping, bounded logs, finding run dirs.

use std::fs;
use std::path::Path;

use berth_core::driver::DriverError;

use crate::namespace::paths::check_session_id;

pub(crate) fn start_error(
    session: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> DriverError {
    DriverError::Start {
        session: session.to_string(),
        source: Box::new(e),
    }
}

pub(crate) fn io_error(
    op: &'static str,
    session: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> DriverError {
    DriverError::Io {
        op,
        session: session.to_string(),
        source: Box::new(e),
    }
}

/// Empty a log file that grew past `max`. Its writer appends (`O_APPEND`), so it
/// continues at the new end.
pub(crate) fn truncate_log(log: &Path, max: u64) {
    if fs::metadata(log).is_ok_and(|m| m.len() > max) {
        if let Ok(f) = fs::OpenOptions::new().write(true).open(log) {
            let _ = f.set_len(0);
        }
    }
}

/// Session ids that have a directory under `dir`, sorted (dot-dirs are not ids).
pub(crate) fn session_dirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return vec![];
    };
    let mut ids: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|id| check_session_id(id).is_ok())
        .collect();
    ids.sort();
    ids
}

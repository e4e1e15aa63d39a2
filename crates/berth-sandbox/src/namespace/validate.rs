//! Checks of a runtime spec against this host, before it is stored or started.

use std::path::{Component, Path};

use berth_api::runtime::defaults::{IMAGE_HOST, MAX_MOUNTS};
use berth_api::RuntimeSpec;
use berth_core::driver::DriverError;

use super::spec::GUEST_SOCK_DIR;
use crate::volume;

/// Paths the sandbox's own setup owns; nothing may be mounted on or over them.
const RESERVED: &[&str] = &["/proc", "/dev", "/sys", GUEST_SOCK_DIR, "/.berth"];

fn invalid(field: &'static str, message: impl Into<String>) -> DriverError {
    DriverError::InvalidRuntime {
        field,
        message: message.into(),
    }
}

/// Absolute, normalised (no `.`/`..`, no `//` trickery), and usable in overlay options.
fn check_abs(field: &'static str, path: &str) -> Result<(), DriverError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(invalid(field, format!("{path:?} is not an absolute path")));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(invalid(field, format!("{path:?} contains '.' or '..'")));
    }
    if path.contains(['\0', ',', ':', '\n']) {
        return Err(invalid(
            field,
            format!("{path:?} contains a character not allowed here (NUL , : newline)"),
        ));
    }
    Ok(())
}

fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// A sandbox path other mounts may use: absolute, not `/`, not over a reserved path.
fn check_target(field: &'static str, target: &str) -> Result<(), DriverError> {
    check_abs(field, target)?;
    let t = Path::new(target);
    if t == Path::new("/") {
        return Err(invalid(field, "cannot mount over /"));
    }
    if let Some(r) = RESERVED.iter().find(|r| overlaps(t, Path::new(r))) {
        return Err(invalid(field, format!("{target:?} overlaps {r}")));
    }
    Ok(())
}

/// `data_dir` must never be reachable from a sandbox.
pub fn check(runtime: &RuntimeSpec, data_dir: &Path) -> Result<(), DriverError> {
    let data_dir = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    if runtime.image != IMAGE_HOST {
        check_abs("image", &runtime.image)?;
        let dir = Path::new(&runtime.image);
        if !dir.is_dir() {
            return Err(invalid(
                "image",
                format!(
                    "{:?} is neither \"host\" nor an existing directory",
                    runtime.image
                ),
            ));
        }
        let real = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        if overlaps(&real, &data_dir) {
            return Err(invalid("image", "must not overlap the server's data dir"));
        }
    }
    check_target("workspace_path", &runtime.workspace_path)?;
    if runtime.workspace_size < volume::MIN_SIZE {
        return Err(invalid(
            "workspace_size",
            format!("must be at least {} bytes", volume::MIN_SIZE),
        ));
    }
    if runtime.mounts.len() > MAX_MOUNTS {
        return Err(invalid("mounts", format!("at most {MAX_MOUNTS} mounts")));
    }
    let mut targets = vec![Path::new(&runtime.workspace_path)];
    for m in &runtime.mounts {
        check_abs("mounts.source", &m.source)?;
        let source = Path::new(&m.source);
        let real = source.canonicalize().map_err(|e| {
            invalid(
                "mounts.source",
                format!("{:?} is not accessible: {e}", m.source),
            )
        })?;
        if overlaps(&real, &data_dir) {
            return Err(invalid(
                "mounts.source",
                format!("{:?} overlaps the server's data dir", m.source),
            ));
        }
        check_target("mounts.target", &m.target)?;
        let t = Path::new(&m.target);
        if targets.contains(&t) {
            return Err(invalid(
                "mounts.target",
                format!("{:?} is used twice", m.target),
            ));
        }
        targets.push(t);
    }
    for key in runtime.env.keys() {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(invalid(
                "env",
                format!("{key:?} is not a valid variable name"),
            ));
        }
    }
    if runtime.env.values().any(|v| v.contains('\0')) {
        return Err(invalid("env", "values must not contain NUL"));
    }
    if let Some(cpus) = runtime.cpus {
        if !(cpus.is_finite() && cpus >= 0.01) {
            return Err(invalid("cpus", "must be at least 0.01"));
        }
    }
    if runtime.memory < 32 << 20 {
        return Err(invalid("memory", "must be at least 32 MiB"));
    }
    if runtime.pids < 8 {
        return Err(invalid("pids", "must be at least 8"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::runtime::Mount;

    fn field(r: Result<(), DriverError>) -> Option<&'static str> {
        match r {
            Err(DriverError::InvalidRuntime { field, .. }) => Some(field),
            Err(e) => panic!("unexpected {e}"),
            Ok(()) => None,
        }
    }

    #[test]
    fn defaults_are_valid() {
        let data = tempfile::tempdir().expect("tmp");
        assert_eq!(field(check(&RuntimeSpec::named("r"), data.path())), None);
    }

    #[test]
    fn rejects_bad_paths() {
        let data = tempfile::tempdir().expect("tmp");
        let d = data.path();
        let with = |f: &dyn Fn(&mut RuntimeSpec)| {
            let mut r = RuntimeSpec::named("r");
            f(&mut r);
            field(check(&r, d))
        };
        assert_eq!(with(&|r| r.image = "relative".into()), Some("image"));
        assert_eq!(with(&|r| r.image = "/does/not/exist".into()), Some("image"));
        assert_eq!(
            with(&|r| r.image = d.to_string_lossy().into()),
            Some("image")
        );
        assert_eq!(with(&|r| r.image = "/usr".into()), None);
        assert_eq!(
            with(&|r| r.workspace_path = "work".into()),
            Some("workspace_path")
        );
        assert_eq!(
            with(&|r| r.workspace_path = "/proc/x".into()),
            Some("workspace_path")
        );
        assert_eq!(
            with(&|r| r.workspace_path = "/".into()),
            Some("workspace_path")
        );
        assert_eq!(
            with(&|r| r.workspace_path = "/a/../dev".into()),
            Some("workspace_path")
        );
        assert_eq!(
            with(&|r| r.workspace_path = "/run/berth".into()),
            Some("workspace_path")
        );
        assert_eq!(with(&|r| r.workspace_path = "/run/other".into()), None);
        let mount = |source: &str, target: &str| Mount {
            source: source.into(),
            target: target.into(),
            read_only: true,
        };
        assert_eq!(
            with(&|r| r.mounts = vec![mount("/usr/share", "/share")]),
            None
        );
        assert_eq!(
            with(&|r| r.mounts = vec![mount("/nope", "/share")]),
            Some("mounts.source")
        );
        assert_eq!(
            with(&|r| r.mounts = vec![mount("usr", "/share")]),
            Some("mounts.source")
        );
        assert_eq!(
            with(&|r| r.mounts = vec![mount("/", "/host")]),
            Some("mounts.source"),
            "/ contains the data dir"
        );
        assert_eq!(
            with(&|r| r.mounts = vec![mount("/usr", "/sys/x")]),
            Some("mounts.target")
        );
        assert_eq!(
            with(&|r| r.mounts = vec![mount("/usr", "/mnt/workspace")]),
            Some("mounts.target")
        );
        assert_eq!(
            with(&|r| r.mounts = vec![mount("/usr", "/a"); 6]),
            Some("mounts")
        );
        assert_eq!(with(&|r| r.cpus = Some(0.0)), Some("cpus"));
        assert_eq!(with(&|r| r.workspace_size = 1), Some("workspace_size"));
        assert_eq!(
            with(&|r| {
                r.env.insert("A=B".into(), "x".into());
            }),
            Some("env")
        );
    }
}

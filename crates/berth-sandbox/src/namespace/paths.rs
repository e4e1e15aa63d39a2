//! The data-dir layout, derived from the data dir and a session id only, so a restarted
//! server (or `sandbox-helper stop`) finds everything again without any memory.

use std::path::{Path, PathBuf};

/// Longest accepted session id; keeps every derived path well below `PATH_MAX` and the
/// unix socket path below its 108-byte limit for reasonable data dirs.
pub const MAX_SESSION_ID_LEN: usize = 128;

#[derive(Debug, thiserror::Error)]
#[error("session id {id:?} is not usable as a file name: {reason}")]
pub struct SessionIdError {
    pub id: String,
    pub reason: &'static str,
}

/// Session ids become file names and container ids: `[A-Za-z0-9._-]`, not starting
/// with a dot, at most [`MAX_SESSION_ID_LEN`] bytes.
pub fn check_session_id(id: &str) -> Result<(), SessionIdError> {
    let reason = if id.is_empty() {
        Some("empty")
    } else if id.len() > MAX_SESSION_ID_LEN {
        Some("longer than 128 bytes")
    } else if id.starts_with('.') {
        Some("starts with a dot")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SessionIdError {
            id: id.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Top-level directories of the data dir.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn workspaces(&self) -> PathBuf {
        self.root.join("workspaces")
    }
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    /// Lower dir of the `host` image: empty mount points, symlinks, /tmp 1777.
    pub fn host_skeleton(&self) -> PathBuf {
        self.images().join("host-skeleton")
    }
    /// Pre-formatted spare workspace images (see `volume::SparePool`).
    pub fn spares(&self) -> PathBuf {
        self.workspaces().join(".spare")
    }
    pub fn workspace_image(&self, session: &str) -> PathBuf {
        self.workspaces().join(format!("{session}.ext4"))
    }
    pub fn session(&self, session: &str) -> SessionPaths {
        SessionPaths {
            id: session.to_string(),
            dir: self.run().join(session),
        }
    }
}

/// Everything ephemeral of one sandbox lives under `run/<session>/`.
#[derive(Debug, Clone)]
pub struct SessionPaths {
    pub id: String,
    pub dir: PathBuf,
}

impl SessionPaths {
    /// Parse the layout back from a run dir (`.../run/<session>`).
    pub fn from_dir(dir: &Path) -> Option<Self> {
        let id = dir.file_name()?.to_str()?.to_string();
        check_session_id(&id).ok()?;
        Some(Self {
            id,
            dir: dir.to_path_buf(),
        })
    }
    /// What the driver asks the helper to do (`plan.json`).
    pub fn plan(&self) -> PathBuf {
        self.dir.join("plan.json")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    pub fn config_json(&self) -> PathBuf {
        self.bundle().join("config.json")
    }
    /// Overlay mount point = the container's root.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn upper(&self) -> PathBuf {
        self.dir.join("overlay/upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("overlay/work")
    }
    pub fn overlay(&self) -> PathBuf {
        self.dir.join("overlay")
    }
    /// Host mount point of the workspace image.
    pub fn workspace(&self) -> PathBuf {
        self.dir.join("workspace")
    }
    /// `hosts` and `hostname` bind-mounted over the image's `/etc` ones.
    pub fn etc(&self) -> PathBuf {
        self.dir.join("etc")
    }
    /// Bind-mounted at `/run/berth` inside the sandbox.
    pub fn sock_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }
    pub fn guest_sock(&self) -> PathBuf {
        self.sock_dir().join("guest.sock")
    }
    /// A short symlink to [`Self::sock_dir`] (`run/.sock/<16 hex of sha256(id)>`): unix
    /// socket paths are limited to 107 bytes and session ids may be 128 long, so the
    /// host connects through this link.
    pub fn sock_link(&self) -> PathBuf {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.id.as_bytes());
        let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let run = self.dir.parent().unwrap_or(Path::new("/"));
        run.join(".sock").join(name)
    }
    /// The path the host connects to.
    pub fn guest_sock_short(&self) -> PathBuf {
        self.sock_link().join("guest.sock")
    }
    /// libcontainer's state root (`state/<session>/state.json`).
    pub fn state_root(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// `<pid> <starttime>` of the container init, written once it runs.
    pub fn init_pid(&self) -> PathBuf {
        self.dir.join("init.pid")
    }
    /// stdout and stderr of the container init (bounded, see the helper).
    pub fn guest_log(&self) -> PathBuf {
        self.dir.join("guest.log")
    }
    /// Cgroup path handed to libcontainer (absolute, relative to each hierarchy root):
    /// `/berth/<12 hex of sha256(run dir)>/<id>`. Cgroups are host-global while session
    /// ids are client-chosen, so the data dir's share keeps two servers on one host from
    /// killing each other's sandboxes of the same session id.
    pub fn cgroup(&self) -> String {
        use sha2::Digest;
        let run_dir = self.dir.parent().unwrap_or(Path::new("/"));
        let digest = sha2::Sha256::digest(run_dir.as_os_str().as_encoded_bytes());
        let server: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("/berth/{server}/{}", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        for ok in ["a", "sess-1", "A.b_c-9", &"x".repeat(128)] {
            assert!(check_session_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "ü",
            &"x".repeat(129),
        ] {
            assert!(check_session_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layout_round_trips() {
        let data = DataDir::new("/var/lib/berth");
        let s = data.session("abc");
        assert_eq!(s.dir, Path::new("/var/lib/berth/run/abc"));
        assert_eq!(
            s.guest_sock(),
            Path::new("/var/lib/berth/run/abc/sock/guest.sock")
        );
        assert!(s.cgroup().starts_with("/berth/") && s.cgroup().ends_with("/abc"));
        let other = DataDir::new("/srv/berth2").session("abc");
        assert_ne!(other.cgroup(), s.cgroup(), "servers must not share cgroups");
        let long = data.session(&"x".repeat(128));
        assert!(long.guest_sock_short().as_os_str().len() < 80);
        assert!(long.sock_link().starts_with("/var/lib/berth/run/.sock"));
        assert_ne!(long.sock_link(), s.sock_link());
        let back = SessionPaths::from_dir(&s.dir).expect("parse");
        assert_eq!(back.id, "abc");
        assert_eq!(
            data.workspace_image("abc"),
            Path::new("/var/lib/berth/workspaces/abc.ext4")
        );
    }
}

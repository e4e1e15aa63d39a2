//! The sandbox's root filesystem: the `host` image skeleton, the overlay mount, mount
//! targets, and the list of host secrets to mask.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{umount2, MntFlags};

// The host directories and the secret list are shared with `berth image build --from
// host`, so a microVM's rootfs hides exactly what a namespace sandbox masks.
pub use berth_image::hostfs::{etc_secrets, HOST_SYSTEM_DIRS};

/// Empty directories of the skeleton (mount points and conventional dirs), with modes.
const SKELETON_DIRS: &[(&str, u32)] = &[
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("root", 0o700),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("mnt", 0o755),
    ("opt", 0o755),
    ("srv", 0o755),
    ("home", 0o755),
    ("media", 0o755),
    (".berth", 0o755),
];

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot inspect {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mount target {path} crosses a symlink in the image")]
    SymlinkInTarget { path: PathBuf },
    #[error("cannot mount the overlay at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot unmount {path}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot chown {path}")]
    Chown {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How the host's system directories appear in a `host` sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLayout {
    /// Real directories: bind-mounted read-only.
    pub binds: Vec<PathBuf>,
    /// Symlinks: replicated in the skeleton (`/bin` → `usr/bin`).
    pub symlinks: Vec<(PathBuf, PathBuf)>,
}

impl HostLayout {
    pub fn probe() -> Result<Self, RootfsError> {
        let mut layout = Self::default();
        for dir in HOST_SYSTEM_DIRS {
            let path = Path::new(dir);
            match fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = fs::read_link(path).map_err(|source| RootfsError::Inspect {
                        path: path.into(),
                        source,
                    })?;
                    layout.symlinks.push((path.into(), target));
                }
                Ok(meta) if meta.is_dir() => layout.binds.push(path.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RootfsError::Inspect {
                        path: path.into(),
                        source,
                    })
                }
            }
        }
        Ok(layout)
    }
}

/// Create (or complete) the `host` image skeleton. Idempotent.
pub fn ensure_skeleton(dir: &Path, layout: &HostLayout) -> Result<(), RootfsError> {
    let mkdir = |path: &Path, mode: u32| -> Result<(), RootfsError> {
        let err = |source| RootfsError::Create {
            path: path.into(),
            source,
        };
        match fs::DirBuilder::new().mode(mode).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(e)),
        }
        // The umask trims the mode given to mkdir.
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)
    };
    mkdir(dir, 0o755)?;
    for (rel, mode) in SKELETON_DIRS {
        mkdir(&dir.join(rel), *mode)?;
    }
    for bind in &layout.binds {
        mkdir(&dir.join(relative(bind)), 0o755)?;
    }
    for (link, target) in &layout.symlinks {
        let at = dir.join(relative(link));
        match fs::read_link(&at) {
            Ok(existing) if &existing == target => continue,
            Ok(_) => fs::remove_file(&at).map_err(|source| RootfsError::Create {
                path: at.clone(),
                source,
            })?,
            Err(_) => {}
        }
        std::os::unix::fs::symlink(target, &at).map_err(|source| RootfsError::Create {
            path: at.clone(),
            source,
        })?;
    }
    let exe = dir.join(".berth/berth");
    if !exe.exists() {
        fs::write(&exe, b"").map_err(|source| RootfsError::Create { path: exe, source })?;
    }
    Ok(())
}

/// `/a/b` → `a/b`.
pub fn relative(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// Overlay options; paths must not contain `,` or `:` (checked by the driver).
pub fn overlay_options(lower: &Path, upper: &Path, work: &Path) -> String {
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    )
}

pub fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), RootfsError> {
    let options = overlay_options(lower, upper, work);
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|source| RootfsError::Mount {
        path: target.into(),
        source,
    })
}

/// Unmount `path` if something is mounted there; retries briefly while busy (the
/// container's processes may still be exiting).
pub fn unmount(path: &Path) -> Result<(), RootfsError> {
    for attempt in 0..50 {
        match umount2(path, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => continue, // stacked mounts: unmount until nothing is left
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => return Ok(()),
            Err(nix::Error::EBUSY) if attempt < 49 => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(source) => {
                return Err(RootfsError::Unmount {
                    path: path.into(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Create `target` (absolute, inside the sandbox) under `rootfs` as host root, refusing
/// to follow symlinks, and hand every created component to the sandbox's root.
pub fn ensure_target(
    rootfs: &Path,
    target: &str,
    is_file: bool,
    uid: u32,
) -> Result<(), RootfsError> {
    let rel = relative(Path::new(target));
    let parts: Vec<_> = rel.components().collect();
    let mut at = rootfs.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        let last = i + 1 == parts.len();
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(RootfsError::SymlinkInTarget { path: at })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let created = if last && is_file {
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&at)
                        .map(drop)
                } else {
                    fs::DirBuilder::new().mode(0o755).create(&at)
                };
                created.map_err(|source| RootfsError::Create {
                    path: at.clone(),
                    source,
                })?;
                chown(&at, uid)?;
            }
            Err(source) => return Err(RootfsError::Inspect { path: at, source }),
        }
    }
    Ok(())
}

/// `lchown` to the sandbox root (uid = gid).
pub fn chown(path: &Path, uid: u32) -> Result<(), RootfsError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).map_err(|source| RootfsError::Chown {
        path: path.into(),
        source,
    })
}

/// Give the sandbox's root ownership of the skeleton's own directories in the merged
/// view (a copy-up of a few empty dirs), so it can create files in `/mnt`, `/opt`…
pub fn adopt_skeleton(rootfs: &Path, uid: u32) -> Result<(), RootfsError> {
    for (rel, _) in SKELETON_DIRS {
        chown(&rootfs.join(rel), uid)?;
    }
    Ok(())
}

/// Mount points at or below `dir` in this process's mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    parse_mount_points(&info)
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Field 5 of each mountinfo line, with the kernel's octal escapes (`\040`) undone.
fn parse_mount_points(info: &str) -> Vec<PathBuf> {
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| {
            let bytes = field.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'\\'
                    && i + 3 < bytes.len()
                    && bytes[i + 1..i + 4]
                        .iter()
                        .all(|b| (b'0'..=b'7').contains(b))
                {
                    let digit = |k: usize| u32::from(bytes[i + k] - b'0');
                    let v = digit(1) * 64 + digit(2) * 8 + digit(3);
                    out.push(u8::try_from(v).unwrap_or(b'?'));
                    i += 4;
                } else {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
            PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeleton_replicates_symlinks_and_is_idempotent() {
        let tmp = tempfile::tempdir().expect("tmp");
        let layout = HostLayout {
            binds: vec!["/usr".into(), "/etc".into()],
            symlinks: vec![("/bin".into(), "usr/bin".into())],
        };
        let skel = tmp.path().join("skel");
        ensure_skeleton(&skel, &layout).expect("first");
        ensure_skeleton(&skel, &layout).expect("second");
        assert_eq!(
            fs::read_link(skel.join("bin")).expect("link"),
            Path::new("usr/bin")
        );
        assert!(skel.join("usr").is_dir());
        let mode = fs::metadata(skel.join("tmp"))
            .expect("tmp")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o1777);
        assert!(skel.join(".berth/berth").is_file());
    }

    #[test]
    fn ensure_target_refuses_symlinks() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        std::os::unix::fs::symlink("/etc", root.join("mnt")).expect("symlink");
        let uid = nix::unistd::getuid().as_raw();
        assert!(matches!(
            ensure_target(root, "/mnt/workspace", false, uid),
            Err(RootfsError::SymlinkInTarget { .. })
        ));
        ensure_target(root, "/a/b/c", false, uid).expect("dirs");
        ensure_target(root, "/x/file", true, uid).expect("file");
        assert!(root.join("a/b/c").is_dir());
        assert!(root.join("x/file").is_file());
    }

    #[test]
    fn mountinfo_escapes() {
        let info =
            "36 35 98:0 / /mnt/a\\040b rw - ext4 /dev/x rw\n37 35 0:1 / /proc rw - proc proc rw\n";
        assert_eq!(
            parse_mount_points(info),
            vec![PathBuf::from("/mnt/a b"), PathBuf::from("/proc")]
        );
    }

    #[test]
    fn overlay_options_format() {
        assert_eq!(
            overlay_options(Path::new("/l"), Path::new("/u"), Path::new("/w")),
            "lowerdir=/l,upperdir=/u,workdir=/w"
        );
    }
}

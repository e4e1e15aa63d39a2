//! Workspace volumes: one sparse ext4 image per session, loop-mounted on the host.
//!
//! The image's size is the workspace quota. Its root directory belongs to the session's
//! mapped root uid, so sandbox root owns `/mnt/workspace`; every later resume maps the
//! same uid (the core keeps the session's `uid_slot` stable).

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::loopdev;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot create workspace image {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mkfs.ext4 failed for {path}: {stderr}")]
    Mkfs { path: PathBuf, stderr: String },
    #[error("cannot mount workspace image {image}: {stderr}")]
    Mount { image: PathBuf, stderr: String },
    #[error("cannot attach workspace image to a loop device")]
    Loop(#[source] loopdev::LoopError),
    #[error("cannot mount workspace image {image} from {device}")]
    MountSyscall {
        image: PathBuf,
        device: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot give the workspace root {path} to the session")]
    Adopt {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot delete workspace image {path}")]
    Delete {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Smallest accepted workspace (ext4 with a journal needs a few MiB).
pub const MIN_SIZE: u64 = 16 << 20;

/// How [`ensure_image`] provided the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provided {
    /// It existed already (left exactly as it was).
    Existing,
    /// A pre-formatted spare was renamed into place; its root dir is owned by host
    /// root until [`adopt_root`] runs on the mounted image.
    Spare,
    /// Formatted now with `mkfs.ext4` (root dir owned by `owner`).
    Formatted,
}

/// Make sure a workspace image exists at `path`: keep an existing one exactly as it is
/// (even if `size` changed), else take a spare of `size` from `spares`, else create a
/// sparse ext4 image of `size` bytes with `mkfs.ext4`.
pub fn ensure_image(
    path: &Path,
    size: u64,
    owner: u32,
    spares: Option<&SparePool>,
) -> Result<Provided, VolumeError> {
    if path.exists() {
        return Ok(Provided::Existing);
    }
    if let Some(pool) = spares {
        match pool.take(size, path) {
            Ok(true) => return Ok(Provided::Spare),
            Ok(false) => {}
            // Someone else made the image meanwhile.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Provided::Existing),
            Err(e) => tracing::warn!(error = %e, "cannot take a spare workspace image"),
        }
    }
    let tmp = path.with_extension("ext4.partial");
    format(&tmp, size, owner).map_err(|e| e.at(path))?;
    // Rename last so a crash never leaves a half-made image under the real name.
    fs::rename(&tmp, path).map_err(|source| VolumeError::Create {
        path: path.into(),
        source,
    })?;
    Ok(Provided::Formatted)
}

/// `truncate` + `mkfs.ext4` at `path`, root dir owned by `owner` (uid = gid). Removes
/// `path` again on failure.
fn format(path: &Path, size: u64, owner: u32) -> Result<(), VolumeError> {
    let create = |source| VolumeError::Create {
        path: path.into(),
        source,
    };
    let file = fs::File::create(path).map_err(create)?;
    file.set_len(size.max(MIN_SIZE)).map_err(create)?;
    drop(file);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E"])
        .arg(format!(
            "root_owner={owner}:{owner},lazy_itable_init=1,lazy_journal_init=1"
        ))
        .arg(path)
        .output();
    let out = match out {
        Ok(out) => out,
        Err(source) => {
            let _ = fs::remove_file(path);
            return Err(VolumeError::Spawn {
                program: "mkfs.ext4",
                source,
            });
        }
    };
    if !out.status.success() {
        let _ = fs::remove_file(path);
        return Err(VolumeError::Mkfs {
            path: path.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

impl VolumeError {
    /// Name the final image rather than its temporary name.
    fn at(self, path: &Path) -> Self {
        match self {
            Self::Create { source, .. } => Self::Create {
                path: path.into(),
                source,
            },
            Self::Mkfs { stderr, .. } => Self::Mkfs {
                path: path.into(),
                stderr,
            },
            other => other,
        }
    }
}

/// Give the root dir of a mounted workspace to the session's root (uid = gid) if it
/// still has a spare's neutral owner (host root, which no sandbox uid ever maps to).
/// Any other owner is the session's own choice and is kept.
pub fn adopt_root(mount: &Path, owner: u32) -> Result<(), VolumeError> {
    let err = |source| VolumeError::Adopt {
        path: mount.into(),
        source,
    };
    let meta = fs::symlink_metadata(mount).map_err(err)?;
    if meta.uid() == 0 && meta.gid() == 0 {
        std::os::unix::fs::lchown(mount, Some(owner), Some(owner)).map_err(err)?;
    }
    Ok(())
}

/// Pre-formatted spare workspace images, `<dir>/<size>-<unique>.ext4`, so a new session
/// renames one into place instead of waiting for `mkfs.ext4`. Spares are formatted with
/// root (0:0) owning their root dir; [`adopt_root`] hands it to the session after the
/// first mount. A spare is made under `<size>-<unique>.tmp`, fsynced, and renamed, so a
/// half-made one is never taken; [`SparePool::clean`] removes such leftovers.
#[derive(Debug, Clone)]
pub struct SparePool {
    dir: PathBuf,
    /// Spares kept per size.
    per_size: usize,
}

impl SparePool {
    pub fn new(dir: impl Into<PathBuf>, per_size: usize) -> Self {
        Self {
            dir: dir.into(),
            per_size,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Create the pool dir (0700) and remove half-made spares of a crashed process.
    pub fn clean(&self) -> io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        for entry in fs::read_dir(&self.dir)?.flatten() {
            if entry.file_name().as_bytes().ends_with(b".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Ready spares of `size` bytes.
    fn spares(&self, size: u64) -> Vec<PathBuf> {
        let prefix = format!("{}-", size.max(MIN_SIZE));
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return vec![];
        };
        entries
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| {
                let n = n.as_bytes();
                n.starts_with(prefix.as_bytes()) && n.ends_with(b".ext4")
            })
            .map(|n| self.dir.join(n))
            .collect()
    }

    /// Sizes that have at least one ready spare.
    pub fn sizes(&self) -> Vec<u64> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut sizes: Vec<u64> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".ext4"))
            .filter_map(|n| n.split('-').next()?.parse().ok())
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    /// Move a spare of `size` to `path`. `Ok(false)`: none left. Never replaces an
    /// existing `path` (`AlreadyExists`).
    pub fn take(&self, size: u64, path: &Path) -> io::Result<bool> {
        use nix::fcntl::{renameat2, RenameFlags};
        for spare in self.spares(size) {
            match renameat2(None, &spare, None, path, RenameFlags::RENAME_NOREPLACE) {
                Ok(()) => return Ok(true),
                // Taken by a concurrent start: try the next one.
                Err(nix::Error::ENOENT) => continue,
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(false)
    }

    /// Make spares of `size` until there are `per_size`; stops early when `stop` says
    /// so. Returns how many were made.
    pub fn fill(&self, size: u64, stop: &dyn Fn() -> bool) -> Result<usize, VolumeError> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let size = size.max(MIN_SIZE);
        let mut made = 0;
        while self.spares(size).len() < self.per_size && !stop() {
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let name = format!("{size}-{}-{nanos}-{n}", std::process::id());
            let tmp = self.dir.join(format!("{name}.tmp"));
            let ready = self.dir.join(format!("{name}.ext4"));
            format(&tmp, size, 0)?;
            let sync = |path: &Path| -> Result<(), VolumeError> {
                fs::File::open(path)
                    .and_then(|f| f.sync_all())
                    .map_err(|source| VolumeError::Create {
                        path: path.into(),
                        source,
                    })
            };
            if let Err(e) = sync(&tmp) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            fs::rename(&tmp, &ready).map_err(|source| VolumeError::Create {
                path: ready.clone(),
                source,
            })?;
            sync(&self.dir)?;
            made += 1;
        }
        Ok(made)
    }
}

/// Loop-mount `image` at `target` (`nosuid,nodev,noatime`): attach it to a loop device
/// with autoclear ([`crate::loopdev`]) and `mount(2)` the device, so unmounting releases
/// the loop device. Falls back to `mount(8)` (which sets autoclear too) on kernels
/// without `LOOP_CONFIGURE`.
pub fn mount(image: &Path, target: &Path) -> Result<(), VolumeError> {
    let device = match loopdev::attach(image) {
        Ok(device) => device,
        Err(e) if e.unsupported() => {
            tracing::debug!(error = %e, "loop attach unsupported, using mount(8)");
            return mount_with_util(image, target);
        }
        Err(e) => return Err(VolumeError::Loop(e)),
    };
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(device.path()),
        target,
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|source| VolumeError::MountSyscall {
        image: image.into(),
        device: device.path().into(),
        source,
    })?;
    // The mount holds the device now; closing ours leaves it as the only user.
    drop(device);
    Ok(())
}

fn mount_with_util(image: &Path, target: &Path) -> Result<(), VolumeError> {
    let out = Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
        .arg(image)
        .arg(target)
        .output()
        .map_err(|source| VolumeError::Spawn {
            program: "mount",
            source,
        })?;
    if !out.status.success() {
        return Err(VolumeError::Mount {
            image: image.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Bytes used: from the mounted filesystem when `mounted` is a mount of the image,
/// else the image file's allocated bytes.
pub fn used_bytes(image: &Path, mounted: Option<&Path>) -> u64 {
    if let Some(dir) = mounted {
        if let Ok(st) = nix::sys::statvfs::statvfs(dir) {
            let frsize = st.fragment_size();
            let used = st.blocks().saturating_sub(st.blocks_free());
            return used.saturating_mul(frsize);
        }
    }
    fs::metadata(image)
        .map(|m| m.blocks().saturating_mul(512))
        .unwrap_or(0)
}

pub fn delete(image: &Path) -> Result<(), VolumeError> {
    match fs::remove_file(image) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VolumeError::Delete {
            path: image.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_sparse_and_kept() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipping: mkfs.ext4 not installed");
            return;
        }
        let tmp = tempfile::tempdir().expect("tmp");
        let img = tmp.path().join("s.ext4");
        assert_eq!(
            ensure_image(&img, 1 << 30, 1_000_000, None).expect("mkfs"),
            Provided::Formatted
        );
        let meta = fs::metadata(&img).expect("meta");
        assert_eq!(meta.len(), 1 << 30);
        assert!(used_bytes(&img, None) < 64 << 20, "sparse");
        assert_eq!(
            ensure_image(&img, 2 << 30, 1_000_000, None).expect("again"),
            Provided::Existing
        );
        assert_eq!(
            fs::metadata(&img).expect("meta").len(),
            1 << 30,
            "size kept"
        );
        delete(&img).expect("delete");
        delete(&img).expect("idempotent");
    }

    #[test]
    fn spares_are_taken_and_refilled() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipping: mkfs.ext4 not installed");
            return;
        }
        let tmp = tempfile::tempdir().expect("tmp");
        let pool = SparePool::new(tmp.path().join(".spare"), 2);
        pool.clean().expect("clean");
        // A half-made spare of a crashed process is removed and never taken.
        fs::write(pool.dir().join(format!("{}-x.tmp", 1u64 << 30)), b"").expect("w");
        pool.clean().expect("clean");
        assert_eq!(fs::read_dir(pool.dir()).expect("ls").count(), 0);
        let img = tmp.path().join("s.ext4");
        assert!(!pool.take(1 << 30, &img).expect("empty pool"));
        assert_eq!(pool.fill(1 << 30, &|| false).expect("fill"), 2);
        assert_eq!(pool.fill(1 << 30, &|| false).expect("full"), 0);
        assert_eq!(pool.sizes(), vec![1 << 30]);
        assert_eq!(
            ensure_image(&img, 1 << 30, 1_000_000, Some(&pool)).expect("take"),
            Provided::Spare
        );
        assert_eq!(fs::metadata(&img).expect("meta").len(), 1 << 30);
        assert_eq!(pool.spares(1 << 30).len(), 1);
        // Another size falls back to mkfs; an existing target is never replaced.
        let other = tmp.path().join("o.ext4");
        assert_eq!(
            ensure_image(&other, 2 << 30, 1_000_000, Some(&pool)).expect("mkfs"),
            Provided::Formatted
        );
        assert_eq!(
            pool.take(1 << 30, &img).expect_err("exists").kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(pool.spares(1 << 30).len(), 1);
        assert_eq!(pool.fill(1 << 30, &|| true).expect("stopped"), 0);
    }
}

//! Workspace volumes: one sparse ext4 image per session, loop-mounted on the host.
//!
//! The image's size is the workspace quota. Its root directory belongs to the session's
//! mapped root uid, so sandbox root owns `/mnt/workspace`; every later resume maps the
//! same uid (the core keeps the session's `uid_slot` stable).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Create a sparse ext4 image of `size` bytes at `path` unless one exists. An existing
/// image is left exactly as it is, even if `size` changed.
///
/// Returns whether a new image was made.
pub fn ensure_image(path: &Path, size: u64, owner: u32) -> Result<bool, VolumeError> {
    if path.exists() {
        return Ok(false);
    }
    let tmp = path.with_extension("ext4.partial");
    let create = |source| VolumeError::Create {
        path: path.into(),
        source,
    };
    let file = fs::File::create(&tmp).map_err(create)?;
    file.set_len(size.max(MIN_SIZE)).map_err(create)?;
    drop(file);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E"])
        .arg(format!(
            "root_owner={owner}:{owner},lazy_itable_init=1,lazy_journal_init=1"
        ))
        .arg(&tmp)
        .output()
        .map_err(|source| VolumeError::Spawn {
            program: "mkfs.ext4",
            source,
        })?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(VolumeError::Mkfs {
            path: path.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    // Rename last so a crash never leaves a half-made image under the real name.
    fs::rename(&tmp, path).map_err(create)?;
    Ok(true)
}

/// Loop-mount `image` at `target` (`nosuid,nodev`). `mount(8)` sets the loop device's
/// autoclear flag, so unmounting releases the loop device.
pub fn mount(image: &Path, target: &Path) -> Result<(), VolumeError> {
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
        assert!(ensure_image(&img, 1 << 30, 1_000_000).expect("mkfs"));
        let meta = fs::metadata(&img).expect("meta");
        assert_eq!(meta.len(), 1 << 30);
        assert!(used_bytes(&img, None) < 64 << 20, "sparse");
        assert!(!ensure_image(&img, 2 << 30, 1_000_000).expect("again"));
        assert_eq!(
            fs::metadata(&img).expect("meta").len(),
            1 << 30,
            "size kept"
        );
        delete(&img).expect("delete");
        delete(&img).expect("idempotent");
    }
}

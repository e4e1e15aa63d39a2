//! The read-only root filesystem image. The source tree is assembled in a private
//! mount namespace — a small tmpfs with the skeleton dirs, the source's directories
//! bind-mounted read-only, secrets and excluded paths covered by empty mounts — and
//! `mkfs.ext4 -d` copies that view into the image. Nothing is copied twice and
//! nothing of the assembly is visible outside the build (or survives a killed build).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use sha2::{Digest, Sha256};

use crate::hostfs::{etc_secrets, HOST_SYSTEM_DIRS};

/// Excluded from `--from host` unless `--no-default-excludes`: the Google Cloud SDK
/// (1.9 GB here, and cloud credentials belong to the gateway, not the sandbox),
/// documentation and man pages (0.2 GB an agent rarely reads), debug symbols.
pub const DEFAULT_HOST_EXCLUDES: &[&str] = &[
    "/usr/lib/google-cloud-sdk",
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/info",
    "/usr/lib/debug",
];

/// Directories every image has (created when the source lacks them), with modes.
pub const SKELETON: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("home", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("mnt", 0o755),
    ("mnt/workspace", 0o755),
];

/// Label of the filesystem in `rootfs.ext4`.
pub const LABEL: &str = "berth-root";
/// Bumped whenever the mkfs options or the staging rules change.
pub const LAYOUT: &str = "rootfs-v1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The host's system directories, secrets masked.
    Host,
    /// A directory used as `/` (a debootstrap tree, say), as it is.
    Dir(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("building an image needs root: the rootfs is assembled with mounts in a private mount namespace (run it with sudo)")]
    NotRoot(#[source] nix::Error),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {what} at {path}")]
    Mount {
        what: String,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("--from {0}: not a directory")]
    NotADir(PathBuf),
    #[error("exclude {0} must be an absolute path inside the image, like /usr/share/doc")]
    BadExclude(String),
    #[error("mkfs.ext4 could not be run (install e2fsprogs)")]
    MkfsMissing(#[source] io::Error),
    #[error("`mkfs.ext4 -d` failed: {0}")]
    Mkfs(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// Give the calling thread its own mount namespace, detached from the host's
/// propagation, so the staging mounts are invisible outside and vanish with the
/// thread and its children. Threads share no mount namespace after `unshare`, so
/// call this on a thread dedicated to the build and spawn the tools from it.
pub fn enter_private_mount_namespace() -> Result<(), RootfsError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(RootfsError::NotRoot)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|source| RootfsError::Mount {
        what: "private propagation".into(),
        path: "/".into(),
        source,
    })
}

/// The assembled tree, ready for `mkfs`.
#[derive(Debug, Clone)]
pub struct Staged {
    pub root: PathBuf,
    /// SHA-256 over every path with its kind, mode, owner, size, mtime and ctime
    /// (symlinks: target) — what decides whether the image must be rebuilt.
    pub listing_sha256: String,
    pub entries: u64,
    /// Bytes the content needs in 4 KiB blocks.
    pub content_bytes: u64,
    /// Paths masked as secrets, and paths excluded, that exist in the source.
    pub masked: Vec<String>,
    pub excluded: Vec<String>,
}

/// Assemble `source` at `staging` (an empty dir); `scratch` is a private dir for
/// the empty file that covers masked files. Call inside the private namespace.
pub fn stage(
    source: &Source,
    excludes: &[String],
    staging: &Path,
    scratch: &Path,
) -> Result<Staged, RootfsError> {
    for e in excludes {
        if !e.starts_with('/') || Path::new(e).components().any(|c| c == Component::ParentDir) {
            return Err(RootfsError::BadExclude(e.clone()));
        }
    }
    let empty = scratch.join("empty");
    fs::write(&empty, b"").map_err(io_err("create", &empty))?;
    fs::set_permissions(&empty, fs::Permissions::from_mode(0o600))
        .map_err(io_err("chmod", &empty))?;
    mount_fs("tmpfs", staging, "mode=0755,size=64m")?;
    let mut synthetic: BTreeSet<PathBuf> = BTreeSet::new();
    synthetic.insert(PathBuf::new());

    let (base, top): (PathBuf, Vec<OsString>) = match source {
        Source::Host => (
            PathBuf::from("/"),
            HOST_SYSTEM_DIRS
                .iter()
                .map(|d| OsString::from(d.trim_start_matches('/')))
                .collect(),
        ),
        Source::Dir(dir) => {
            if !dir.is_dir() {
                return Err(RootfsError::NotADir(dir.clone()));
            }
            let mut names: Vec<OsString> = fs::read_dir(dir)
                .map_err(io_err("list", dir))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(io_err("list", dir))?;
            names.sort();
            (dir.clone(), names)
        }
    };
    for name in &top {
        graft(
            &base.join(name),
            &staging.join(name),
            &mut synthetic,
            staging,
        )?;
    }
    for (rel, mode) in SKELETON {
        ensure_dir(staging, Path::new(rel), *mode, &base, &mut synthetic)?;
    }

    let mut masked = Vec::new();
    if *source == Source::Host {
        for secret in etc_secrets(Path::new("/etc")) {
            if let Some(at) = cover(staging, &secret, 0o700, &empty)? {
                synthetic.insert(at);
                masked.push(secret);
            }
        }
    }
    let mut excluded = Vec::new();
    for path in excludes {
        if let Some(at) = cover(staging, path, 0o755, &empty)? {
            synthetic.insert(at);
            excluded.push(path.clone());
        }
    }

    let mut walk = Walk::default();
    walk.dir(staging, Path::new(""), &synthetic)?;
    Ok(Staged {
        root: staging.into(),
        listing_sha256: hex::encode(walk.hasher.finalize()),
        entries: walk.entries,
        content_bytes: walk.bytes,
        masked,
        excluded,
    })
}

/// Unmount the staging tree (and everything on it).
pub fn unstage(staging: &Path) {
    let _ = umount2(staging, MntFlags::MNT_DETACH);
}

fn mount_fs(fstype: &str, at: &Path, options: &str) -> Result<(), RootfsError> {
    mount(
        Some(fstype),
        at,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options),
    )
    .map_err(|source| RootfsError::Mount {
        what: fstype.into(),
        path: at.into(),
        source,
    })
}

fn bind_ro(src: &Path, at: &Path) -> Result<(), RootfsError> {
    let err = |source| RootfsError::Mount {
        what: src.display().to_string(),
        path: at.into(),
        source,
    };
    mount(Some(src), at, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(err)?;
    // Read-only, so that no bug of ours can write through into the source tree.
    mount(
        None::<&str>,
        at,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(err)
}

/// Make `src` appear at `at` (on the staging tmpfs): directories and files are
/// bind-mounted read-only, symlinks copied, anything else left out.
fn graft(
    src: &Path,
    at: &Path,
    synthetic: &mut BTreeSet<PathBuf>,
    staging: &Path,
) -> Result<(), RootfsError> {
    let meta = match fs::symlink_metadata(src) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect", src)(e)),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = fs::read_link(src).map_err(io_err("read", src))?;
        std::os::unix::fs::symlink(&target, at).map_err(io_err("create", at))?;
        std::os::unix::fs::lchown(at, Some(meta.uid()), Some(meta.gid()))
            .map_err(io_err("chown", at))?;
        if let Ok(rel) = at.strip_prefix(staging) {
            synthetic.insert(rel.into());
        }
    } else if kind.is_dir() {
        fs::create_dir(at).map_err(io_err("create", at))?;
        bind_ro(src, at)?;
    } else if kind.is_file() {
        fs::write(at, b"").map_err(io_err("create", at))?;
        bind_ro(src, at)?;
    }
    Ok(())
}

/// Create the skeleton dir `rel` if the source lacks it. When its parent is a
/// read-only bind of the source (a debootstrap tree has `/mnt` but no
/// `/mnt/workspace`), that parent is rebuilt one level deep on the tmpfs: same mode and
/// owner, each entry grafted, so the new dir can be added beside them.
fn ensure_dir(
    staging: &Path,
    rel: &Path,
    mode: u32,
    base: &Path,
    synthetic: &mut BTreeSet<PathBuf>,
) -> Result<(), RootfsError> {
    let at = staging.join(rel);
    if fs::symlink_metadata(&at).is_ok() {
        return Ok(());
    }
    if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        let parent_at = staging.join(parent);
        if !synthetic.contains(parent) && fs::symlink_metadata(&parent_at).is_ok_and(|m| m.is_dir())
        {
            let src = base.join(parent);
            let meta = fs::metadata(&src).map_err(io_err("inspect", &src))?;
            umount2(&parent_at, MntFlags::MNT_DETACH).map_err(|source| RootfsError::Mount {
                what: "(unmount)".into(),
                path: parent_at.clone(),
                source,
            })?;
            fs::set_permissions(&parent_at, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(io_err("chmod", &parent_at))?;
            std::os::unix::fs::lchown(&parent_at, Some(meta.uid()), Some(meta.gid()))
                .map_err(io_err("chown", &parent_at))?;
            let mut names: Vec<OsString> = fs::read_dir(&src)
                .map_err(io_err("list", &src))?
                .flatten()
                .map(|e| e.file_name())
                .collect();
            names.sort();
            for name in names {
                graft(&src.join(&name), &parent_at.join(&name), synthetic, staging)?;
            }
            synthetic.insert(parent.into());
        }
    }
    fs::DirBuilder::new()
        .mode(mode)
        .create(&at)
        .map_err(io_err("create", &at))?;
    fs::set_permissions(&at, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &at))?;
    synthetic.insert(rel.into());
    Ok(())
}

/// Cover `path` (absolute, inside the image) with something empty: a tmpfs of `mode`
/// on a directory, the empty file on anything else. Symlinks are followed inside the
/// image, as the guest would. Returns the covered path (relative), or None when the
/// image has nothing there.
fn cover(
    staging: &Path,
    path: &str,
    mode: u32,
    empty: &Path,
) -> Result<Option<PathBuf>, RootfsError> {
    let Some(rel) = resolve_in_root(staging, Path::new(path)) else {
        return Ok(None);
    };
    let at = staging.join(&rel);
    let meta = fs::symlink_metadata(&at).map_err(io_err("inspect", &at))?;
    if meta.is_dir() {
        mount_fs("tmpfs", &at, &format!("mode={mode:o},size=4k,nr_inodes=16"))?;
        mount(
            None::<&str>,
            &at,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            Some(format!("mode={mode:o},size=4k,nr_inodes=16").as_str()),
        )
        .map_err(|source| RootfsError::Mount {
            what: "tmpfs (read-only)".into(),
            path: at.clone(),
            source,
        })?;
    } else {
        bind_ro(empty, &at)?;
    }
    Ok(Some(rel))
}

/// Resolve `path` inside `root` the way the guest will: `..` stops at the root,
/// absolute symlinks restart from it. The result is relative to `root` and exists;
/// None when it does not, or after 40 links.
pub fn resolve_in_root(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut pending: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .rev()
        .collect();
    let mut cur = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&part);
        let meta = fs::symlink_metadata(root.join(&next)).ok()?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return None;
            }
            let target = fs::read_link(root.join(&next)).ok()?;
            if target.is_absolute() {
                cur = PathBuf::new();
            }
            for c in target.components().rev() {
                match c {
                    Component::Normal(n) => pending.push(n.to_os_string()),
                    Component::ParentDir => pending.push(OsString::from("..")),
                    _ => {}
                }
            }
        } else {
            cur = next;
        }
    }
    (!cur.as_os_str().is_empty()).then_some(cur)
}

/// A depth-first walk of the staged tree that hashes its listing and sizes it.
#[derive(Default)]
struct Walk {
    hasher: Sha256,
    entries: u64,
    bytes: u64,
    /// Hard-linked files already counted (mkfs stores them once).
    links: std::collections::HashSet<(u64, u64)>,
}

impl Walk {
    fn dir(
        &mut self,
        abs: &Path,
        rel: &Path,
        synthetic: &BTreeSet<PathBuf>,
    ) -> Result<(), RootfsError> {
        let meta = fs::symlink_metadata(abs).map_err(io_err("inspect", abs))?;
        self.record(rel, &meta, None, synthetic.contains(rel));
        let mut children: Vec<(OsString, fs::Metadata)> = Vec::new();
        for entry in fs::read_dir(abs).map_err(io_err("list", abs))? {
            let entry = entry.map_err(io_err("list", abs))?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(io_err("inspect", &path))?;
            children.push((entry.file_name(), meta));
        }
        children.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, meta) in children {
            let child_rel = rel.join(&name);
            let child_abs = abs.join(&name);
            if meta.is_dir() {
                self.dir(&child_abs, &child_rel, synthetic)?;
            } else {
                let target = if meta.file_type().is_symlink() {
                    Some(fs::read_link(&child_abs).map_err(io_err("read", &child_abs))?)
                } else {
                    None
                };
                self.record(
                    &child_rel,
                    &meta,
                    target.as_deref(),
                    synthetic.contains(&child_rel),
                );
            }
        }
        Ok(())
    }

    /// Synthetic entries (made by this build) and symlinks are identified without
    /// their times, which differ on every build.
    fn record(&mut self, rel: &Path, meta: &fs::Metadata, target: Option<&Path>, synthetic: bool) {
        self.entries += 1;
        let block = 4096;
        let kind = meta.file_type();
        let repeat_link =
            kind.is_file() && meta.nlink() > 1 && !self.links.insert((meta.dev(), meta.ino()));
        if (kind.is_file() && !repeat_link) || kind.is_dir() {
            self.bytes += meta
                .size()
                .max(if kind.is_dir() { block } else { 0 })
                .div_ceil(block)
                * block;
        } else if target.is_some_and(|t| t.as_os_str().len() >= 60) {
            self.bytes += block;
        }
        let h = &mut self.hasher;
        h.update(rel.as_os_str().as_bytes());
        h.update([0]);
        let times = if synthetic || target.is_some() {
            (0, 0, 0, 0)
        } else {
            (
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec(),
            )
        };
        let size = if kind.is_dir() && synthetic {
            0
        } else {
            meta.size()
        };
        let _ = write!(
            HashWriter(h),
            "{:o} {} {} {} {} {} {} {} {}",
            meta.mode(),
            meta.uid(),
            meta.gid(),
            size,
            meta.rdev(),
            times.0,
            times.1,
            times.2,
            times.3
        );
        if let Some(t) = target {
            h.update(b" -> ");
            h.update(t.as_os_str().as_bytes());
        }
        h.update(b"\n");
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `mkfs.ext4 -d` of the staged tree into a new file of `size` bytes.
fn mkfs_command(staged: &Staged, out: &Path, size: u64, inodes: u64) -> Command {
    let mut cmd = Command::new("mkfs.ext4");
    crate::child::die_with_parent(&mut cmd);
    cmd.args([
        "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
    ])
    .args(["-L", LABEL])
    // No journal: nothing ever writes.
    .args(["-O", "^has_journal"])
    .args(["-E", "root_owner=0:0,nodiscard"])
    .arg("-N")
    .arg(inodes.to_string())
    .arg("-d")
    .arg(&staged.root)
    .arg(out)
    .arg(format!("{}k", size / 1024))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

/// Set ext4's `read-only` feature, so the kernel refuses to mount the image
/// read-write (mke2fs 1.47.0 cannot set it at creation).
fn set_read_only(image: &Path) -> Result<(), RootfsError> {
    let out = crate::child::die_with_parent(&mut Command::new("tune2fs"))
        .args(["-O", "read-only"])
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .map_err(RootfsError::MkfsMissing)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RootfsError::Mkfs(format!(
            "tune2fs -O read-only: {}",
            crate::kernel::tail(&out.stderr)
        )))
    }
}

/// Write `staged` into a new ext4 image at `out`, sized to the content plus a margin.
/// `progress(done, total)` follows the bytes mkfs has written.
pub fn mkfs(staged: &Staged, out: &Path, progress: &dyn Fn(u64, u64)) -> Result<u64, RootfsError> {
    let inodes = staged.entries + staged.entries / 10 + 1024;
    // Block and inode bitmaps, group descriptors and directory growth stay well under
    // 10 %; the 64 MiB floor covers small trees' fixed metadata.
    let mut size = (staged.content_bytes + staged.content_bytes / 10 + inodes * 256 + (64 << 20))
        .div_ceil(4 << 20)
        * (4 << 20);
    for attempt in 0..3 {
        let _ = fs::remove_file(out);
        let mut child = mkfs_command(staged, out, size, inodes)
            .spawn()
            .map_err(RootfsError::MkfsMissing)?;
        let mut stderr = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = io::Read::read_to_end(s, &mut buf);
            }
            buf
        });
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(io_err("wait for mkfs.ext4 writing", out)(e)),
            }
            if let Ok(m) = fs::metadata(out) {
                progress(
                    (m.blocks() * 512).min(staged.content_bytes),
                    staged.content_bytes,
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let stderr = reader.join().unwrap_or_default();
        if status.success() {
            set_read_only(out)?;
            progress(staged.content_bytes, staged.content_bytes);
            return Ok(size);
        }
        let text = crate::kernel::tail(&stderr);
        let full = text.contains("No space left") || text.contains("Could not allocate");
        if !full || attempt == 2 {
            let _ = fs::remove_file(out);
            return Err(RootfsError::Mkfs(text));
        }
        size = size / 2 * 3;
    }
    Err(RootfsError::Mkfs("image too small three times".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_stays_inside_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let r = tmp.path();
        fs::create_dir_all(r.join("usr/lib/x")).expect("mkdir");
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).expect("link");
        std::os::unix::fs::symlink("/usr/lib/x", r.join("abs")).expect("link");
        std::os::unix::fs::symlink("../../../../etc", r.join("usr/up")).expect("link");
        fs::create_dir_all(r.join("etc")).expect("etc");
        assert_eq!(
            resolve_in_root(r, Path::new("/lib/x")),
            Some("usr/lib/x".into())
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/abs")),
            Some("usr/lib/x".into())
        );
        assert_eq!(resolve_in_root(r, Path::new("/usr/up")), Some("etc".into()));
        assert_eq!(resolve_in_root(r, Path::new("/nope")), None);
        std::os::unix::fs::symlink("loop", r.join("loop")).expect("link");
        assert_eq!(resolve_in_root(r, Path::new("/loop")), None);
    }
}

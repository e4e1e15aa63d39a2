//! MicroVM images: a guest kernel (`vmlinux`), an initramfs whose `/init` is berth,
//! and a read-only ext4 root filesystem, built into `<data-dir>/images/<name>/` and
//! described by its `manifest.json`. The contract with the guest and the QEMU driver
//! is in `docs/design/microvm-image.md`; [`Image::open`] is how the driver reads an
//! image.
//!
//! Each artifact records the hash of its own inputs, and [`build`] makes only those
//! whose inputs changed: a new berth binary remakes the initramfs (sub-second) and
//! keeps the 3 GB rootfs, hard-linked into the new image; equal inputs change nothing.
//! The host side effects (apt, mounts, mkfs) are behind [`Tools`].

pub mod cache;
mod child;
pub mod cpio;
pub mod elf;
pub mod hostfs;
pub mod initramfs;
pub mod kernel;
pub mod libs;
pub mod manifest;
pub mod modules;
pub mod rootfs;
pub mod tools;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use manifest::{Image, Manifest, ManifestError};
pub use rootfs::{Source, DEFAULT_HOST_EXCLUDES};
pub use tools::{HostTools, Tools};

use cache::{sha256_file, sha256_hex, HashMemo, Lock};
use kernel::Kernel;
use manifest::{Artifact, Artifacts, InitInfo, KernelInfo, SourceInfo};

/// Names that `images/` already uses for other things.
const RESERVED_NAMES: &[&str] = &["cache", "host-skeleton", "berth"];

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub data_dir: PathBuf,
    pub name: String,
    pub source: Source,
    /// Paths inside the image to leave empty (directories) or empty out (files).
    pub excludes: Vec<String>,
    /// Add [`DEFAULT_HOST_EXCLUDES`] when building from the host.
    pub default_excludes: bool,
    /// The program that becomes `/init`: the running berth binary.
    pub init: PathBuf,
    /// Remove debug sections from the `/init` copy.
    pub strip_init: bool,
    /// Rebuild even when the inputs are unchanged.
    pub force: bool,
    /// The meta package naming the kernel, normally [`kernel::META_PACKAGE`].
    pub kernel_meta: String,
}

impl BuildRequest {
    pub fn new(data_dir: PathBuf, name: String, source: Source, init: PathBuf) -> Self {
        Self {
            data_dir,
            name,
            source,
            excludes: vec![],
            default_excludes: true,
            init,
            strip_init: true,
            force: false,
            kernel_meta: kernel::META_PACKAGE.into(),
        }
    }
}

/// Where a build is; the CLI draws it.
pub trait Progress: Sync {
    /// Step `index` of `total` (1-based) starts.
    fn step(&self, index: usize, total: usize, what: &str);
    /// Bytes done within the current step.
    fn bytes(&self, _done: u64, _total: u64) {}
    /// A remark worth its own line.
    fn note(&self, _text: &str) {}
}

/// No progress output.
pub struct Quiet;
impl Progress for Quiet {
    fn step(&self, _: usize, _: usize, _: &str) {}
}

#[derive(Debug)]
pub struct BuildOutcome {
    pub image: Image,
    /// True when the existing image already matched the inputs: nothing was written.
    pub cached: bool,
    /// The artifacts this build made; the others are the previous image's files,
    /// hard-linked into the new one.
    pub made: Made,
}

/// Which artifacts a build made (true) or kept from the image's previous version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Made {
    pub vmlinux: bool,
    pub initramfs: bool,
    pub rootfs: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("image name {0:?} is not allowed: use 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit (and not cache, host-skeleton, berth)")]
    Name(String),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot get the guest kernel")]
    Kernel(#[from] kernel::KernelError),
    #[error("cannot build the initramfs")]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error("cannot build the root filesystem")]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("the finished image does not check out")]
    Verify(#[from] ManifestError),
    #[error("the build thread panicked")]
    Panicked,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BuildError + 'a {
    move |source| BuildError::Io {
        what,
        path: path.into(),
        source,
    }
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !RESERVED_NAMES.contains(&name)
}

/// The image name for a source when none is given: `host`, or for a directory (pass
/// it canonicalized) its name made safe plus 8 hex digits of its path's SHA-256, so two
/// trees called `rootfs` get different images. The microVM driver finds the image of
/// a runtime with `--image DIR` under this name.
pub fn default_name(source: &Source) -> String {
    match source {
        Source::Host => "host".into(),
        Source::Dir(dir) => {
            let base: String = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(40)
                .collect();
            let base = base.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
            let hash = &sha256_hex(dir.as_os_str().as_encoded_bytes())[..8];
            if base.is_empty() {
                format!("dir-{hash}")
            } else {
                format!("{base}-{hash}")
            }
        }
    }
}

/// Build (or find up to date) the image `req.name` on this host. Runs on a thread of
/// its own, which gets a private mount namespace for assembling the rootfs.
pub fn build(req: &BuildRequest, progress: &dyn Progress) -> Result<BuildOutcome, BuildError> {
    build_with(req, progress, &HostTools)
}

/// [`build`] with the host side effects (apt, mounts, mkfs) done by `tools`.
pub fn build_with(
    req: &BuildRequest,
    progress: &dyn Progress,
    tools: &dyn Tools,
) -> Result<BuildOutcome, BuildError> {
    if !valid_name(&req.name) {
        return Err(BuildError::Name(req.name.clone()));
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            tools.isolate()?;
            build_here(req, progress, tools)
        })
        .join()
        .unwrap_or(Err(BuildError::Panicked))
    })
}

const STEPS: usize = 5;

/// The hash of each artifact's inputs (see `docs/design/microvm-image.md`): an
/// artifact is made again only when its own inputs change.
#[derive(Debug)]
struct Keys {
    /// The kernel package and the extraction layout.
    vmlinux: String,
    /// The kernel and its modules, `/init` and its libraries, the archive layout.
    initramfs: String,
    /// The staged tree's listing and the mkfs layout.
    rootfs: String,
}

impl Keys {
    fn all_match(&self, a: &Artifacts) -> bool {
        a.vmlinux.input_sha256 == self.vmlinux
            && a.initramfs.input_sha256 == self.initramfs
            && a.rootfs.input_sha256 == self.rootfs
    }
}

/// The previous image's artifact `from` (recorded as `record`), hard-linked at `to`
/// when its inputs hash as `key`: the same file, neither copied nor rewritten.
fn reuse(from: &Path, record: &Artifact, key: &str, to: &Path) -> Option<Artifact> {
    (record.input_sha256 == key && fs::hard_link(from, to).is_ok()).then(|| record.clone())
}

fn build_here(
    req: &BuildRequest,
    progress: &dyn Progress,
    tools: &dyn Tools,
) -> Result<BuildOutcome, BuildError> {
    let images = req.data_dir.join("images");
    let cache_dir = images.join("cache");
    for (dir, mode) in [
        (&req.data_dir, 0o700),
        (&images, 0o711),
        (&cache_dir, 0o700),
    ] {
        match fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create", dir)(e)),
        }
    }
    for sub in ["debs", "kernel", "locks"] {
        let d = cache_dir.join(sub);
        fs::create_dir_all(&d).map_err(io_err("create", &d))?;
    }
    let locks = cache_dir.join("locks");
    let lock_path = locks.join(format!("{}.lock", req.name));
    let _lock = Lock::acquire(&lock_path, &|| {
        progress.note(&format!("waiting for another build of image {}", req.name))
    })
    .map_err(io_err("lock", &lock_path))?;
    remove_stale_builds(&images, &req.name);
    let build_dir = images.join(format!(".build.{}.{}", std::process::id(), req.name));
    let _ = fs::remove_dir_all(&build_dir);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&build_dir)
        .map_err(io_err("create", &build_dir))?;
    let guard = BuildDirGuard(&build_dir);

    // 1. kernel
    progress.step(1, STEPS, "guest kernel");
    let kernel_lock = locks.join("kernel.lock");
    let kernel = {
        let _k = Lock::acquire(&kernel_lock, &|| {
            progress.note("waiting for another build's kernel download")
        })
        .map_err(io_err("lock", &kernel_lock))?;
        let cached = tools.kernel(&req.kernel_meta, &cache_dir, progress)?;
        pin_kernel(&cached, &build_dir.join("kernel"))?
    };

    // 2. inputs
    progress.step(2, STEPS, "hashing inputs");
    let mut memo = HashMemo::load(&cache_dir.join("hashes.json"));
    let init_sha = memo.sha256(&req.init).map_err(io_err("read", &req.init))?;
    memo.save();
    let libraries = libs::needed(&req.init).map_err(|source| initramfs::InitramfsError::Libs {
        init: req.init.clone(),
        source,
    })?;
    let mut libs_listing = String::new();
    for lib in &libraries {
        let m = fs::metadata(&lib.source).map_err(io_err("inspect", &lib.source))?;
        libs_listing.push_str(&format!(
            "{} {} {} {}.{} {}.{}\n",
            lib.path.display(),
            lib.source.display(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ));
    }
    let mut excludes: Vec<String> = Vec::new();
    if req.source == Source::Host && req.default_excludes {
        excludes.extend(DEFAULT_HOST_EXCLUDES.iter().map(|s| (*s).to_owned()));
    }
    excludes.extend(
        req.excludes
            .iter()
            .map(|e| e.trim_end_matches('/').to_owned()),
    );
    // Berth's own data (state, tokens, workspaces, this very build) never goes into an
    // image, wherever the data dir is.
    let source_root = match &req.source {
        Source::Host => PathBuf::from("/"),
        Source::Dir(d) => fs::canonicalize(d).unwrap_or_else(|_| d.clone()),
    };
    let data_dir = fs::canonicalize(&req.data_dir).unwrap_or_else(|_| req.data_dir.clone());
    if let Some(inside) = path_inside(&source_root, &data_dir) {
        excludes.push(inside);
    }
    excludes.sort();
    excludes.dedup();

    let staging = build_dir.join("staging");
    fs::create_dir(&staging).map_err(io_err("create", &staging))?;
    // Declared after `guard`, so dropped before it: the source's bind mounts are gone
    // before the build dir is removed.
    let mounted = Staging {
        tools,
        at: &staging,
    };
    let staged = tools.stage(&req.source, &excludes, &staging, &build_dir)?;

    let module_names: Vec<String> = kernel
        .modules
        .iter()
        .map(|m| file_name(m))
        .collect::<Result<_, _>>()?;
    let keys = Keys {
        vmlinux: sha256_hex(
            format!(
                "{}\nkernel {} {}\n",
                kernel::LAYOUT,
                kernel.package.sha256,
                kernel.release
            )
            .as_bytes(),
        ),
        initramfs: sha256_hex(
            format!(
                "{}\n{}\nkernel {} {} {}\nmodules {}\ninit {} strip={}\n{libs_listing}",
                initramfs::LAYOUT,
                initramfs::DIRS
                    .iter()
                    .map(|(d, m)| format!("{d}:{m:o}"))
                    .collect::<Vec<_>>()
                    .join(","),
                kernel::LAYOUT,
                kernel.package.sha256,
                kernel.release,
                module_names.join(","),
                init_sha,
                req.strip_init,
            )
            .as_bytes(),
        ),
        rootfs: sha256_hex(
            format!("{}\nlisting {}\n", rootfs::LAYOUT, staged.listing_sha256).as_bytes(),
        ),
    };
    let final_dir = images.join(&req.name);
    // Another format's image (or a broken one) gives nothing to reuse.
    let previous = if req.force {
        None
    } else {
        Image::open_dir(&final_dir).ok()
    };
    if let Some(image) = previous
        .as_ref()
        .filter(|p| keys.all_match(&p.manifest.artifacts))
    {
        drop(mounted);
        drop(guard);
        return Ok(BuildOutcome {
            image: image.clone(),
            cached: true,
            made: Made::default(),
        });
    }

    // 3. initramfs
    let initramfs_path = build_dir.join(manifest::INITRAMFS);
    let kept_initramfs = previous.as_ref().and_then(|p| {
        let record = reuse(
            &p.initramfs,
            &p.manifest.artifacts.initramfs,
            &keys.initramfs,
            &initramfs_path,
        )?;
        Some((
            record,
            p.manifest.init.clone(),
            p.manifest.kernel.modules.clone(),
        ))
    });
    let (initramfs_record, init, modules) = match kept_initramfs {
        Some((record, init, modules)) => {
            progress.step(3, STEPS, "initramfs: reused (same kernel and /init)");
            (Some(record), init, modules)
        }
        None => {
            progress.step(3, STEPS, "initramfs");
            let contents = initramfs::write(&initramfs_path, &req.init, req.strip_init, &kernel)?;
            set_private(&initramfs_path)?;
            let init = InitInfo {
                source: req.init.clone(),
                sha256: init_sha,
                stripped: contents.stripped,
                libraries: contents.libraries.iter().map(|l| l.path.clone()).collect(),
            };
            (None, init, contents.modules)
        }
    };

    // 4. rootfs
    let rootfs_path = build_dir.join(manifest::ROOTFS);
    let rootfs_record = previous.as_ref().and_then(|p| {
        reuse(
            &p.rootfs,
            &p.manifest.artifacts.rootfs,
            &keys.rootfs,
            &rootfs_path,
        )
    });
    if rootfs_record.is_some() {
        progress.step(4, STEPS, "rootfs.ext4: reused (source unchanged)");
    } else {
        progress.step(
            4,
            STEPS,
            &format!(
                "rootfs.ext4 ({} entries, {})",
                staged.entries,
                human_bytes(staged.content_bytes)
            ),
        );
        tools.mkfs(&staged, &rootfs_path, &|done, total| {
            progress.bytes(done, total)
        })?;
        set_private(&rootfs_path)?;
    }
    drop(mounted);
    fs::remove_dir(&staging).map_err(io_err("remove", &staging))?;
    let _ = fs::remove_file(build_dir.join("empty"));

    // 5. finish
    progress.step(5, STEPS, "hashing artifacts");
    let vmlinux_path = build_dir.join(manifest::VMLINUX);
    let vmlinux_record = previous.as_ref().and_then(|p| {
        reuse(
            &p.vmlinux,
            &p.manifest.artifacts.vmlinux,
            &keys.vmlinux,
            &vmlinux_path,
        )
    });
    if vmlinux_record.is_none() {
        fs::rename(&kernel.vmlinux, &vmlinux_path).map_err(io_err("move", &kernel.vmlinux))?;
    }
    let pinned = build_dir.join("kernel");
    fs::remove_dir_all(&pinned).map_err(io_err("remove", &pinned))?;
    let made = Made {
        vmlinux: vmlinux_record.is_none(),
        initramfs: initramfs_record.is_none(),
        rootfs: rootfs_record.is_none(),
    };
    let artifact = |kept: Option<Artifact>,
                    path: &Path,
                    key: &str,
                    format: &str|
     -> Result<Artifact, BuildError> {
        if let Some(record) = kept {
            return Ok(record);
        }
        let size = fs::metadata(path).map_err(io_err("inspect", path))?.len();
        Ok(Artifact {
            path: file_name(path)?,
            input_sha256: key.into(),
            sha256: sha256_file(path).map_err(io_err("read", path))?,
            size,
            format: format.into(),
        })
    };
    let manifest = Manifest {
        format: manifest::FORMAT,
        name: req.name.clone(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        kernel: KernelInfo {
            package: kernel.package.package.clone(),
            version: kernel.package.version.clone(),
            deb_sha256: kernel.package.sha256.clone(),
            release: kernel.release.clone(),
            modules,
        },
        init,
        source: SourceInfo {
            kind: match req.source {
                Source::Host => "host".into(),
                Source::Dir(_) => "dir".into(),
            },
            path: match &req.source {
                Source::Host => PathBuf::from("/"),
                Source::Dir(d) => d.clone(),
            },
            excluded: staged.excluded.clone(),
            masked: staged.masked.clone(),
        },
        artifacts: Artifacts {
            vmlinux: artifact(vmlinux_record, &vmlinux_path, &keys.vmlinux, "elf")?,
            initramfs: artifact(
                initramfs_record,
                &initramfs_path,
                &keys.initramfs,
                initramfs::FORMAT,
            )?,
            rootfs: artifact(rootfs_record, &rootfs_path, &keys.rootfs, "ext4")?,
        },
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| io_err("encode", &build_dir)(io::Error::other(e)))?;
    cache::write_atomic(&build_dir.join(manifest::MANIFEST), &json)
        .map_err(io_err("write the manifest in", &build_dir))?;
    sync_dir(&build_dir)?;
    publish(&build_dir, &final_dir)?;
    std::mem::forget(guard);
    prune_kernels(&images, &kernel_lock, &kernel.package.sha256);
    Ok(BuildOutcome {
        image: Image::open_dir(&final_dir)?,
        cached: false,
        made,
    })
}

/// Unmounts the staged tree on every return.
struct Staging<'a> {
    tools: &'a dyn Tools,
    at: &'a Path,
}
impl Drop for Staging<'_> {
    fn drop(&mut self) {
        self.tools.unstage(self.at);
    }
}

fn file_name(path: &Path) -> Result<String, BuildError> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io_err("name", path)(io::ErrorKind::InvalidInput.into()))
}

/// Artifacts are readable by root only (the guest's whole system is in them).
fn set_private(path: &Path) -> Result<(), BuildError> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", path))
}

/// Hard links to `kernel`'s files under `dir` (copies across filesystems): this build
/// keeps its kernel even if another build prunes it from the cache meanwhile.
fn pin_kernel(kernel: &Kernel, dir: &Path) -> Result<Kernel, BuildError> {
    let modules_dir = dir.join("modules");
    fs::create_dir_all(&modules_dir).map_err(io_err("create", &modules_dir))?;
    let link = |from: &Path, to: PathBuf| -> Result<PathBuf, BuildError> {
        if fs::hard_link(from, &to).is_err() {
            fs::copy(from, &to).map_err(io_err("copy", from))?;
        }
        Ok(to)
    };
    let vmlinux = link(&kernel.vmlinux, dir.join(manifest::VMLINUX))?;
    let modules = kernel
        .modules
        .iter()
        .map(|m| link(m, modules_dir.join(file_name(m)?)))
        .collect::<Result<_, _>>()?;
    Ok(Kernel {
        package: kernel.package.clone(),
        release: kernel.release.clone(),
        vmlinux,
        modules,
    })
}

/// Drop the cached kernels that neither this build nor any image's manifest names
/// (images keep their own hard link of `vmlinux`; the cache only spares downloads).
/// Skipped when another build holds the kernel lock: the next build prunes.
fn prune_kernels(images: &Path, kernel_lock: &Path, used: &str) {
    let Ok(Some(_k)) = Lock::try_acquire(kernel_lock) else {
        return;
    };
    let mut keep = kernels_in_use(images);
    keep.insert(used.to_owned());
    kernel::prune(&images.join("cache"), &keep);
}

/// The `.deb` SHA-256 of the kernel of every image under `images`, whatever the
/// manifest's format.
fn kernels_in_use(images: &Path) -> BTreeSet<String> {
    let Ok(entries) = fs::read_dir(images) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && !RESERVED_NAMES.contains(&name.as_ref())
        })
        .filter_map(|e| {
            let bytes = fs::read(e.path().join(manifest::MANIFEST)).ok()?;
            let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            Some(json.get("kernel")?.get("deb_sha256")?.as_str()?.to_owned())
        })
        .collect()
}

/// Move the finished build into place in one step: an atomic exchange with the old
/// image when there is one (readers see the old or the new image, never a mix).
fn publish(build_dir: &Path, final_dir: &Path) -> Result<(), BuildError> {
    use nix::fcntl::{renameat2, RenameFlags};
    let exchanged = renameat2(
        None,
        build_dir,
        None,
        final_dir,
        RenameFlags::RENAME_EXCHANGE,
    );
    match exchanged {
        Ok(()) => {
            // build_dir now holds the old image.
            let _ = fs::remove_dir_all(build_dir);
        }
        Err(nix::Error::ENOENT) => {
            fs::rename(build_dir, final_dir).map_err(io_err("rename into place", final_dir))?
        }
        Err(e) => return Err(io_err("swap in", final_dir)(io::Error::from(e))),
    }
    if let Some(parent) = final_dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), BuildError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", dir))
}

/// Removes an unfinished build dir on every early return.
struct BuildDirGuard<'a>(&'a Path);
impl Drop for BuildDirGuard<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(self.0);
    }
}

/// Build dirs of `name` left by killed builds (the caller holds the name's lock, so
/// none is in progress).
fn remove_stale_builds(images: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(images) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(".build.") else {
            continue;
        };
        if rest
            .split_once('.')
            .is_some_and(|(pid, n)| n == name && pid.bytes().all(|b| b.is_ascii_digit()))
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// `path` as an absolute path inside the image rooted at `root`, if it is under it.
fn path_inside(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    if rel.as_os_str().is_empty() {
        return None; // the data dir as the source is the operator's explicit choice
    }
    Some(format!("/{}", rel.display()))
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["host", "debian-12", "a.b_c", "x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "cache",
            "host-skeleton",
            "berth",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn stale_builds_of_this_name_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        for d in [".build.12.a", ".build.13.a-b", ".build.x.a", "a"] {
            fs::create_dir(tmp.path().join(d)).expect("mkdir");
        }
        remove_stale_builds(tmp.path(), "a");
        let mut left: Vec<String> = fs::read_dir(tmp.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".build.13.a-b", ".build.x.a", "a"]);
    }

    #[test]
    fn default_names_are_valid_and_distinct() {
        assert_eq!(default_name(&Source::Host), "host");
        let a = default_name(&Source::Dir("/srv/a/rootfs".into()));
        let b = default_name(&Source::Dir("/srv/b/rootfs".into()));
        assert!(
            a.starts_with("rootfs-") && a.len() == "rootfs-".len() + 8,
            "{a}"
        );
        assert_ne!(a, b);
        for odd in ["/", "/srv/.hidden tree", "/srv/cache"] {
            let n = default_name(&Source::Dir(odd.into()));
            assert!(valid_name(&n), "{odd} -> {n}");
        }
    }

    #[test]
    fn data_dir_inside_the_source_is_excluded() {
        assert_eq!(
            path_inside(Path::new("/"), Path::new("/var/lib/berth")),
            Some("/var/lib/berth".into())
        );
        assert_eq!(
            path_inside(Path::new("/srv/root"), Path::new("/srv/root/data")),
            Some("/data".into())
        );
        assert_eq!(
            path_inside(Path::new("/srv/root"), Path::new("/var/lib/berth")),
            None
        );
        assert_eq!(
            path_inside(Path::new("/srv/root"), Path::new("/srv/root")),
            None
        );
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}

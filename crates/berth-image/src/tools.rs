//! What a build does to the host that a unit test cannot: apt and dpkg for the kernel,
//! a private mount namespace and mounts for the rootfs staging, `mkfs.ext4`. They sit
//! behind [`Tools`] (youki's `Syscall` seam), so the cache, reuse and publishing logic
//! of [`crate::build_with`] runs in tests with fakes, unprivileged and offline;
//! [`HostTools`] is the real thing.

use std::path::Path;

use crate::kernel::{self, Kernel, KernelError};
use crate::rootfs::{self, RootfsError, Source, Staged};
use crate::Progress;

pub trait Tools: Sync {
    /// The extracted kernel that the meta package `meta` names, kept in the cache
    /// under `cache` (`debs/`, `kernel/`). Called under `cache/locks/kernel.lock`;
    /// the build hard-links what it returns into its own dir before the lock is
    /// released, so a later prune of the cache cannot pull it away.
    fn kernel(
        &self,
        meta: &str,
        cache: &Path,
        progress: &dyn Progress,
    ) -> Result<Kernel, KernelError>;

    /// Give the calling thread (the build's own) a private mount namespace.
    fn isolate(&self) -> Result<(), RootfsError>;

    /// Assemble `source` at the empty dir `staging`; see [`rootfs::stage`].
    fn stage(
        &self,
        source: &Source,
        excludes: &[String],
        staging: &Path,
        scratch: &Path,
    ) -> Result<Staged, RootfsError>;

    /// Undo [`Tools::stage`].
    fn unstage(&self, staging: &Path);

    /// Write the staged tree into a new ext4 image at `out`; see [`rootfs::mkfs`].
    fn mkfs(
        &self,
        staged: &Staged,
        out: &Path,
        progress: &dyn Fn(u64, u64),
    ) -> Result<u64, RootfsError>;
}

/// apt, mounts and mkfs on this host.
pub struct HostTools;

impl Tools for HostTools {
    fn kernel(
        &self,
        meta: &str,
        cache: &Path,
        progress: &dyn Progress,
    ) -> Result<Kernel, KernelError> {
        let pkg = kernel::resolve(meta, cache)?;
        let deb = cache.join("debs").join(format!("{}.deb", pkg.sha256));
        if !deb.is_file() {
            progress.note(&format!("downloading {} {}", pkg.package, pkg.version));
        }
        let deb = kernel::fetch(&pkg, cache)?;
        kernel::extract(&pkg, &deb, cache)
    }

    fn isolate(&self) -> Result<(), RootfsError> {
        rootfs::enter_private_mount_namespace()
    }

    fn stage(
        &self,
        source: &Source,
        excludes: &[String],
        staging: &Path,
        scratch: &Path,
    ) -> Result<Staged, RootfsError> {
        rootfs::stage(source, excludes, staging, scratch)
    }

    fn unstage(&self, staging: &Path) {
        rootfs::unstage(staging)
    }

    fn mkfs(
        &self,
        staged: &Staged,
        out: &Path,
        progress: &dyn Fn(u64, u64),
    ) -> Result<u64, RootfsError> {
        rootfs::mkfs(staged, out, progress)
    }
}

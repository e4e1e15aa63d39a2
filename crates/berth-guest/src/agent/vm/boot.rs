//! From the initramfs to the sandbox's root: kernel filesystems, modules, disks,
//! overlay root, workspace, switch root. Runs before the async runtime, single-threaded.

use std::io;
use std::num::NonZeroU64;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::cmdline::{CmdlineError, ShareMount, VmOptions};

/// Module files and their load order, written by the image build.
const MODULES_DIR: &str = "/lib/modules/berth";
/// The kernel release the modules were taken from.
const KERNEL_RELEASE: &str = "/etc/berth/kernel-release";
/// `serial=` of the root and workspace virtio-blk devices.
const ROOT_SERIAL: &str = "berth-root";
const WORKSPACE_SERIAL: &str = "berth-ws";
/// Where the sandbox's root is assembled before it becomes `/`.
const NEW_ROOT: &str = "/newroot";
/// tmpfs holding the overlay's read-only lower mount, writable upper layer and work dir.
const OVERLAY: &str = "/overlay";
/// How long the kernel may take to show a device after its driver loaded. Generous:
/// under TCG on a loaded host probing is slow, and a missing device is fatal anyway.
pub(super) const DEVICE_TIMEOUT: Duration = Duration::from_secs(30);
const DEVICE_POLL: Duration = Duration::from_millis(10);
/// The cgroup2 hierarchy, and the cgroup every command and shell runs in (the agent
/// stays in the root, which no controller limits).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const SANDBOX_CGROUP: &str = "/sys/fs/cgroup/sandbox";

#[derive(Debug, thiserror::Error)]
pub(super) enum BootError {
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot move the mount {from} to {to}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bad kernel command line")]
    Cmdline(#[from] CmdlineError),
    #[error("the initramfs modules are for kernel {modules}, but {running} is running")]
    KernelMismatch { modules: String, running: String },
    #[error("module name {0:?} in {MODULES_DIR}/order is not a file name")]
    ModuleName(String),
    #[error("cannot load kernel module {path}")]
    Module {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no disk with serial {serial} after {DEVICE_TIMEOUT:?} (disks: {found})")]
    NoDisk { serial: &'static str, found: String },
    #[error("cannot switch the root to {NEW_ROOT}")]
    SwitchRoot(#[source] Errno),
    #[error("cannot set the hostname")]
    Hostname(#[source] Errno),
}

/// Turn the initramfs into the sandbox: on success the process runs in the new root
/// with the workspace mounted, and the initramfs's files are freed.
pub(super) fn boot() -> Result<VmOptions, BootError> {
    for dir in ["/dev", "/proc", "/sys"] {
        mkdir(Path::new(dir))?;
    }
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, "mode=0755")?;
    console_stdio();
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", nodev, "")?;
    mount_fs("sysfs", "/sys", nodev, "")?;
    let options = VmOptions::parse(&read("/proc/cmdline")?)?;
    super::prepare_environment(&options);

    load_modules()?;
    let root = wait_for_disk(ROOT_SERIAL)?;
    let workspace = wait_for_disk(WORKSPACE_SERIAL)?;
    tracing::debug!(root = %root.display(), workspace = %workspace.display(), "disks");
    mount_root(&root, &options.overlay_size)?;
    let new_root = Path::new(NEW_ROOT);
    let workspace_dir = new_root.join(
        options
            .workspace_path
            .strip_prefix("/")
            .unwrap_or(&options.workspace_path),
    );
    mkdir(&workspace_dir)?;
    // A plain read-write mount replays the journal of a workspace whose VM was killed.
    mount_dev(
        &workspace,
        &workspace_dir,
        "ext4",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        "",
    )?;
    mount_shares(new_root, &options.mounts)?;
    write_identity(new_root, &options.hostname)?;
    for dir in ["/dev", "/proc", "/sys"] {
        let to = new_root.join(&dir[1..]);
        mkdir(&to)?;
        mount(Some(dir), &to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| {
            BootError::Move {
                from: dir.into(),
                to: to.clone(),
                source,
            }
        })?;
    }
    free_initramfs(new_root);
    switch_root(new_root).map_err(BootError::SwitchRoot)?;

    mkdir(Path::new("/dev/pts"))?;
    mount_fs(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "gid=5,mode=0620,ptmxmode=0666",
    )?;
    mkdir(Path::new("/dev/shm"))?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777",
    )?;
    if let Err(err) =
        mkdir(Path::new("/dev/mqueue")).and_then(|()| mount_fs("mqueue", "/dev/mqueue", nodev, ""))
    {
        tracing::warn!("no POSIX message queues: {err}");
    }
    mkdir(Path::new("/run"))?;
    mount_fs(
        "tmpfs",
        "/run",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755",
    )?;
    ensure_tmp()?;
    nix::unistd::sethostname(&options.hostname).map_err(BootError::Hostname)?;
    Ok(options)
}

fn mount_fs(
    fstype: &'static str,
    target: &str,
    flags: MsFlags,
    data: &str,
) -> Result<(), BootError> {
    mount(Some(fstype), target, Some(fstype), flags, Some(data)).map_err(|source| {
        BootError::Mount {
            fstype,
            target: target.into(),
            source,
        }
    })
}

fn mount_dev(
    device: &Path,
    target: &Path,
    fstype: &'static str,
    flags: MsFlags,
    data: &str,
) -> Result<(), BootError> {
    mount(Some(device), target, Some(fstype), flags, Some(data)).map_err(|source| {
        BootError::Mount {
            fstype,
            target: target.into(),
            source,
        }
    })
}

fn read(path: &str) -> Result<String, BootError> {
    std::fs::read_to_string(path).map_err(|source| BootError::Read {
        path: path.into(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), BootError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|source| BootError::Write {
            path: path.into(),
            source,
        })
}

/// The kernel gives init `/dev/console` as fds 0–2 only if the initramfs has that node
/// (Debian's built-in initramfs does); make sure log lines reach the console anyway.
fn console_stdio() {
    use std::os::fd::IntoRawFd;
    for fd in 0..=2 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) != Err(Errno::EBADF) {
            continue;
        }
        let Ok(console) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
        else {
            return;
        };
        // open(2) returns the lowest free descriptor, normally `fd` itself.
        let raw = console.into_raw_fd();
        if raw != fd {
            let _ = nix::unistd::dup2(raw, fd);
            let _ = nix::unistd::close(raw);
        }
    }
}

/// Load the modules listed in `order` (dependencies first), as the image build chose
/// them for this kernel.
fn load_modules() -> Result<(), BootError> {
    let dir = Path::new(MODULES_DIR);
    let order = match std::fs::read_to_string(dir.join("order")) {
        Ok(order) => order,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            tracing::debug!("no module list, relying on built-in drivers");
            return Ok(());
        }
        Err(source) => {
            return Err(BootError::Read {
                path: dir.join("order"),
                source,
            })
        }
    };
    // A module built for another kernel fails with an obscure ENOEXEC; say why instead.
    if let Ok(modules) = std::fs::read_to_string(KERNEL_RELEASE) {
        let running = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        if modules.trim() != running {
            return Err(BootError::KernelMismatch {
                modules: modules.trim().to_string(),
                running,
            });
        }
    }
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if name.contains('/') || name.starts_with('.') {
            return Err(BootError::ModuleName(name.to_string()));
        }
        let path = dir.join(name);
        let loaded = std::fs::File::open(&path).and_then(|file| {
            match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
                Ok(()) | Err(Errno::EEXIST) => Ok(()),
                Err(errno) => Err(io::Error::from(errno)),
            }
        });
        loaded.map_err(|source| BootError::Module { path, source })?;
        tracing::debug!(module = name, "loaded");
    }
    Ok(())
}

/// The virtio-blk disks by `serial=` (`/sys/block/vd*/serial`): device names follow
/// probe order, which the host does not control.
fn disks() -> Vec<(String, String)> {
    let mut disks = Vec::new();
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(serial) = std::fs::read_to_string(entry.path().join("serial")) {
            disks.push((name, serial.trim().to_string()));
        }
    }
    disks.sort();
    disks
}

fn wait_for_disk(serial: &'static str) -> Result<PathBuf, BootError> {
    let deadline = Instant::now() + DEVICE_TIMEOUT;
    loop {
        let disks = disks();
        if let Some((name, _)) = disks.iter().find(|(_, s)| s == serial) {
            let dev = Path::new("/dev").join(name);
            if dev.exists() {
                return Ok(dev);
            }
        }
        if Instant::now() >= deadline {
            let found: Vec<String> = disks.iter().map(|(n, s)| format!("{n}={s}")).collect();
            return Err(BootError::NoDisk {
                serial,
                found: if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(" ")
                },
            });
        }
        std::thread::sleep(DEVICE_POLL);
    }
}

/// `NEW_ROOT` = overlay of the read-only root disk and a size-bounded tmpfs: the image
/// is shared by every VM of a runtime, writes outside the workspace are per VM and
/// vanish with it, like the namespace sandbox's overlay.
fn mount_root(device: &Path, size: &str) -> Result<(), BootError> {
    let overlay = Path::new(OVERLAY);
    mkdir(overlay)?;
    let data = format!("size={size},mode=0755");
    mount(
        Some("tmpfs"),
        overlay,
        Some("tmpfs"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|source| BootError::Mount {
        fstype: "tmpfs",
        target: overlay.into(),
        source,
    })?;
    let (lower, upper, work) = (
        overlay.join("lower"),
        overlay.join("upper"),
        overlay.join("work"),
    );
    for dir in [&lower, &upper, &work] {
        mkdir(dir)?;
    }
    mount_dev(device, &lower, "ext4", MsFlags::MS_RDONLY, "")?;
    let new_root = Path::new(NEW_ROOT);
    mkdir(new_root)?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        new_root,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|source| BootError::Mount {
        fstype: "overlay",
        target: new_root.into(),
        source,
    })
}

/// The runtime's host directories, shared by the host's virtio-fs daemons (one per
/// mount, tag = `berth.mounts[i].tag`). Read-only is enforced on the host; the guest's
/// `MS_RDONLY` only makes writes fail early with EROFS. `nosuid,nodev` as the namespace
/// sandbox's bind mounts.
fn mount_shares(root: &Path, shares: &[ShareMount]) -> Result<(), BootError> {
    for share in shares {
        let target = root.join(share.target.strip_prefix("/").unwrap_or(&share.target));
        mkdir(&target)?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if share.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        // The device is probed when `virtiofs` loads, which `load_modules` already
        // did; the retry only covers a slow probe under TCG.
        let started = Instant::now();
        loop {
            match mount(
                Some(share.tag.as_str()),
                &target,
                Some("virtiofs"),
                flags,
                None::<&str>,
            ) {
                Ok(()) => break,
                Err(source) if started.elapsed() >= DEVICE_TIMEOUT => {
                    return Err(BootError::Mount {
                        fstype: "virtiofs",
                        target,
                        source,
                    })
                }
                Err(_) => std::thread::sleep(DEVICE_POLL),
            }
        }
        tracing::debug!(tag = %share.tag, target = %share.target.display(), "share mounted");
    }
    Ok(())
}

/// `/etc/hostname` and `/etc/hosts` naming the VM, as the namespace sandbox has them, so
/// tools that resolve their own hostname work.
fn write_identity(root: &Path, hostname: &str) -> Result<(), BootError> {
    let etc = root.join("etc");
    mkdir(&etc)?;
    let hosts = format!(
        "127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback {hostname}\n"
    );
    for (file, text) in [("hostname", format!("{hostname}\n")), ("hosts", hosts)] {
        let path = etc.join(file);
        // The lower layer's file may be a symlink into a read-only place: replace it.
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, text).map_err(|source| BootError::Write { path, source })?;
    }
    Ok(())
}

/// Delete the initramfs's files (they live in RAM: the berth binary, its libraries and
/// the modules) without crossing into mounts, `root` included. The running binary's
/// pages stay in use until it exits; everything else is freed.
fn free_initramfs(root: &Path) {
    let Ok(meta) = std::fs::symlink_metadata("/") else {
        return;
    };
    remove_tree(Path::new("/"), meta.dev(), root);
}

fn remove_tree(dir: &Path, dev: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if path == keep || meta.dev() != dev {
            continue;
        }
        let removed = if meta.is_dir() {
            remove_tree(&path, dev, keep);
            std::fs::remove_dir(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(err) = removed {
            // Mount points (a different device only inside) stay; nothing else should.
            tracing::debug!(path = %path.display(), "initramfs file kept: {err}");
        }
    }
}

/// What switch_root(8) does: the initramfs (rootfs) cannot be unmounted or pivoted
/// away from, so the new root is moved over it and we chroot into it.
fn switch_root(new_root: &Path) -> Result<(), Errno> {
    nix::unistd::chdir(new_root)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    nix::unistd::chdir("/")
}

/// A root built from a minimal directory may lack `/tmp`; programs expect it.
fn ensure_tmp() -> Result<(), BootError> {
    let tmp = Path::new("/tmp");
    if tmp.is_dir() {
        return Ok(());
    }
    mkdir(tmp)?;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o1777)).map_err(|source| {
        BootError::Write {
            path: tmp.into(),
            source,
        }
    })
}

/// With a `berth.pids` limit: the cgroup commands run in (`pids.max` = the limit), and
/// its `cgroup.procs` opened for writing, which each child writes `0` to (itself)
/// before it execs. Fatal if it cannot be set up: the limit is part of the sandbox.
pub(super) fn sandbox_cgroup(pids: Option<NonZeroU64>) -> Result<Option<OwnedFd>, BootError> {
    let Some(pids) = pids else {
        return Ok(None);
    };
    let root = Path::new(CGROUP_ROOT);
    if !root.join("cgroup.controllers").exists() {
        mkdir(root)?;
        let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount_fs("cgroup2", CGROUP_ROOT, nodev, "")?;
    }
    // Only `pids`: the VM's RAM already bounds memory, and PID 1 is never picked by
    // the OOM killer, so a memory cgroup would add nothing without its own limit.
    write(&root.join("cgroup.subtree_control"), "+pids")?;
    let dir = Path::new(SANDBOX_CGROUP);
    mkdir(dir)?;
    write(&dir.join("pids.max"), &pids.to_string())?;
    let procs = dir.join("cgroup.procs");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&procs)
        .map_err(|source| BootError::Write {
            path: procs,
            source,
        })?;
    tracing::debug!(cgroup = SANDBOX_CGROUP, pids, "commands' cgroup");
    Ok(Some(file.into()))
}

fn write(path: &Path, text: &str) -> Result<(), BootError> {
    std::fs::write(path, text).map_err(|source| BootError::Write {
        path: path.into(),
        source,
    })
}

/// Unmount the workspace so its ext4 image is clean for the next VM. Commands were
/// killed just before, but a dying process may hold files for a moment.
pub(super) fn unmount_workspace(path: &Path) {
    // Within the 5 s the host driver gives a shutdown before it kills QEMU.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match umount2(path, MntFlags::empty()) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "workspace unmounted");
                return;
            }
            Err(Errno::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), "cannot unmount the workspace: {err}");
                break;
            }
        }
    }
    // Still busy: a read-only remount at least leaves a consistent journal behind.
    let remount = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Err(err) = mount(None::<&str>, path, None::<&str>, remount, None::<&str>) {
        tracing::warn!(path = %path.display(), "cannot remount the workspace read-only: {err}");
    }
    nix::unistd::sync();
}

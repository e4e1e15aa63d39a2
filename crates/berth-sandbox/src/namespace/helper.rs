//! `berth sandbox-helper start|stop RUN_DIR`: the privileged, single-threaded half of the
//! driver. `start` mounts the rootfs and workspace and starts the container described by
//! `RUN_DIR/bundle/config.json` and `RUN_DIR/plan.json`; `stop` tears down everything
//! under `RUN_DIR` using nothing but the files there, so it works after a server crash.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};

use super::cgroup::SandboxCgroup;
use super::init_process::InitProcess;
use super::paths::SessionPaths;
use super::rootfs;
use crate::volume;

/// What `start` needs beyond the OCI config; written by the driver.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StartPlan {
    /// Overlay lower dir: the host skeleton or the image dir.
    pub lower: PathBuf,
    /// Whether `lower` is the host skeleton (its dirs are handed to sandbox root).
    pub host_image: bool,
    /// Host uid (= gid) of sandbox root.
    pub root_id: u32,
    pub workspace_image: PathBuf,
    /// Bind-mount targets to create in the rootfs first: (path in sandbox, is a file).
    pub targets: Vec<(String, bool)>,
}

pub fn main(args: Vec<OsString>) -> anyhow::Result<()> {
    let [cmd, dir] = args.as_slice() else {
        bail!("usage: berth sandbox-helper start|stop RUN_DIR");
    };
    // The helper's stderr ends up in the driver's error; `RUST_LOG=debug` on the server
    // shows libcontainer's own account of a failed start.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    }
    let dir = PathBuf::from(dir);
    let paths = SessionPaths::from_dir(&dir)
        .with_context(|| format!("{} is not a session run dir", dir.display()))?;
    match cmd.to_str() {
        Some("start") => {
            // Leave the server's session and process group: the sandbox must survive
            // the server being killed, and the container init inherits our session.
            nix::unistd::setsid().context("setsid")?;
            let result = start(&paths);
            if result.is_err() {
                let _ = stop(&paths);
            }
            result
        }
        Some("stop") => stop(&paths),
        _ => bail!("unknown sandbox-helper subcommand {cmd:?}"),
    }
}

fn mkdir(path: &Path, mode: u32, owner: Option<u32>) -> anyhow::Result<()> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Ok(()) => {}
        Err(e) => return Err(e).with_context(|| format!("create {}", path.display())),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    if let Some(id) = owner {
        rootfs::chown(path, id)?;
    }
    Ok(())
}

fn start(paths: &SessionPaths) -> anyhow::Result<()> {
    let plan: StartPlan = serde_json::from_slice(
        &fs::read(paths.plan()).with_context(|| format!("read {}", paths.plan().display()))?,
    )
    .context("parse plan.json")?;
    let id = plan.root_id;
    mkdir(&paths.overlay(), 0o700, None)?;
    // The upper dir's root becomes the sandbox's `/`: owned by sandbox root.
    mkdir(&paths.upper(), 0o755, Some(id))?;
    mkdir(&paths.work(), 0o700, None)?;
    mkdir(&paths.rootfs(), 0o755, None)?;
    mkdir(&paths.workspace(), 0o755, None)?;
    mkdir(&paths.sock_dir(), 0o700, Some(id))?;
    mkdir(&paths.state_root(), 0o700, None)?;

    let t = Instant::now();
    if let Some(links) = paths.sock_link().parent() {
        mkdir(links, 0o700, None)?;
    }
    let _ = fs::remove_file(paths.sock_link());
    std::os::unix::fs::symlink(paths.sock_dir(), paths.sock_link())
        .with_context(|| format!("link {}", paths.sock_link().display()))?;
    rootfs::mount_overlay(&plan.lower, &paths.upper(), &paths.work(), &paths.rootfs())?;
    if plan.host_image {
        rootfs::adopt_skeleton(&paths.rootfs(), id)?;
    }
    for (target, is_file) in &plan.targets {
        rootfs::ensure_target(&paths.rootfs(), target, *is_file, id)?;
    }
    tracing::debug!(elapsed = ?t.elapsed(), "rootfs ready");
    volume::mount(&plan.workspace_image, &paths.workspace())?;
    // A spare image's root still belongs to host root (a no-op on later starts).
    volume::adopt_root(&paths.workspace(), id)?;
    tracing::debug!(elapsed = ?t.elapsed(), "workspace mounted");

    let devnull = fs::File::open("/dev/null").context("open /dev/null")?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(paths.guest_log())
        .with_context(|| format!("open {}", paths.guest_log().display()))?;
    let log2 = log.try_clone().context("dup guest log")?;
    let mut container = ContainerBuilder::new(paths.id.clone(), SyscallType::default())
        .with_root_path(paths.state_root())
        .context("container state root")?
        .with_stdin(devnull)
        .with_stdout(log)
        .with_stderr(log2)
        .as_init(paths.bundle())
        .with_systemd(false)
        .with_detach(true)
        .build()
        .context("create container")?;
    tracing::debug!(elapsed = ?t.elapsed(), "container created");
    container.start().context("start container")?;
    tracing::debug!(elapsed = ?t.elapsed(), "container started");
    let pid = container.pid().context("container has no init pid")?;
    let init = InitProcess::of(pid.as_raw()).context("container init exited at once")?;
    init.write(&paths.init_pid())
        .with_context(|| format!("write {}", paths.init_pid().display()))?;
    Ok(())
}

/// Tear down everything under the run dir. Idempotent; the run dir is removed only
/// when nothing is mounted below it any more (never delete through a live mount).
pub fn stop(paths: &SessionPaths) -> anyhow::Result<()> {
    if !paths.dir.exists() {
        let _ = fs::remove_file(paths.sock_link());
        return Ok(());
    }
    let mut problems: Vec<String> = vec![];
    let init = InitProcess::read(&paths.init_pid());
    let container_dir = paths.state_root().join(&paths.id);
    if container_dir.join("state.json").exists() {
        match Container::load(container_dir.clone()) {
            Ok(mut c) => {
                if let Err(e) = c.delete(true) {
                    problems.push(format!("delete container: {e}"));
                }
            }
            Err(e) => problems.push(format!("load container state: {e}")),
        }
    }
    // Whatever libcontainer could not do (no state after a crash mid-create, …).
    if let Some(init) = init.filter(InitProcess::is_alive) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(init.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let left = SandboxCgroup::new(&paths.cgroup()).kill_and_remove();
    if !left.is_empty() {
        problems.push(format!("cgroups left: {left:?}"));
    }
    if let Some(init) = init {
        let deadline = Instant::now() + Duration::from_secs(5);
        while init.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if init.is_alive() {
            problems.push(format!("init pid {} still alive", init.pid));
        }
    }
    for mount in [paths.workspace(), paths.rootfs()] {
        if let Err(e) = rootfs::unmount(&mount) {
            problems.push(format!("{e:#}"));
        }
    }
    let still = rootfs::mounts_under(&paths.dir);
    if !still.is_empty() {
        bail!(
            "mounts remain under {}: {still:?}; {}",
            paths.dir.display(),
            problems.join("; ")
        );
    }
    match fs::remove_file(paths.sock_link()) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            problems.push(format!("remove {}: {e}", paths.sock_link().display()))
        }
        _ => {}
    }
    fs::remove_dir_all(&paths.dir).with_context(|| format!("remove {}", paths.dir.display()))?;
    if !problems.is_empty() {
        tracing::warn!(session = %paths.id, ?problems, "sandbox stopped with problems");
    }
    Ok(())
}

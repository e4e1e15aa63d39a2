//! The namespace sandbox driver: one youki `libcontainer` container per session.
//!
//! The server never calls libcontainer itself: it writes the OCI bundle and a plan under
//! `run/<session>/` and runs `berth sandbox-helper start|stop` (see [`helper`]). The setup
//! sequence and the data-dir layout are described in the crate's `README.md`.

pub mod cgroup;
pub mod guest;
pub mod helper;
pub mod init_process;
pub mod paths;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod validate;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_api::runtime::defaults::IMAGE_HOST;
use berth_api::RuntimeSpec;
use berth_core::driver::{Driver, DriverError, Sandbox, SandboxRequest, SandboxStats};
use berth_guest::client::Guest;

use self::cgroup::SandboxCgroup;
use self::guest::HostLoader;
use self::helper::StartPlan;
use self::init_process::InitProcess;
use self::paths::{check_session_id, DataDir, SessionPaths};
use self::rootfs::HostLayout;
use self::spec::{BindMount, SpecInput, GUEST_EXE};
use crate::common::{io_error, start_error};
use crate::{loopdev, volume};

/// How long `start` waits for the guest agent's first `Health` answer.
const GUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long `adopt` gives a guest that should already be up.
const ADOPT_DEADLINE: Duration = Duration::from_secs(2);
/// Bound on one connect + `Health` attempt.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// How long `start` waits for the guest's socket to appear (inotify) before it falls back
/// to polling, which also notices a dead init.
const SOCKET_WAIT: Duration = Duration::from_millis(100);
/// `guest.log` is truncated when it grows past this.
const GUEST_LOG_MAX: u64 = 1 << 20;
/// How long `stop` waits for the workspace image's loop device to be released, and how
/// often it looks (see [`NamespaceDriver::wait_for_workspace_release`]).
const LOOP_RELEASE_WAIT: Duration = Duration::from_secs(5);
const LOOP_RELEASE_POLL: Duration = Duration::from_millis(20);

/// Where the driver keeps its state and which uids it hands out.
#[derive(Debug, Clone)]
pub struct NamespaceConfig {
    /// The server's data dir; the driver uses `workspaces/`, `run/` and `images/`.
    pub data_dir: PathBuf,
    /// The `berth` binary: run as `sandbox-helper`, and bind-mounted read-only into
    /// every sandbox as the guest agent (with the host's loader and its libraries in
    /// directory images, see [`guest`]).
    pub berth_exe: PathBuf,
    /// First host uid/gid handed to sandboxes (default 1 000 000).
    pub uid_base: u32,
    /// Ids per session (default 65 536): session root maps to
    /// `uid_base + uid_slot * uid_range`.
    pub uid_range: u32,
    /// Pre-formatted workspace images kept ready per workspace size (default 2; 0 turns
    /// the pool off), in `workspaces/.spare/`. The default size is kept from the start,
    /// other sizes once a session asked for them.
    pub spare_images: usize,
}

impl NamespaceConfig {
    pub fn new(data_dir: impl Into<PathBuf>, berth_exe: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            berth_exe: berth_exe.into(),
            uid_base: 1_000_000,
            uid_range: 65_536,
            spare_images: 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NewDriverError {
    #[error("the namespace driver must run as root")]
    NotRoot,
    #[error("data dir {0} must be an absolute path without ',' or ':'")]
    DataDir(PathBuf),
    #[error("berth executable {0} does not exist")]
    BerthExe(PathBuf),
    #[error("uid_range must be at least 65536 and uid_base non-zero")]
    Uids,
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the host image skeleton")]
    Skeleton(#[source] rootfs::RootfsError),
}

/// Failures inside `start`/`stop`, wrapped into [`DriverError`].
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid session id")]
    SessionId(#[from] paths::SessionIdError),
    #[error("uid slot {0} is beyond the host's uid space")]
    UidSlot(u32),
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workspace volume")]
    Volume(#[from] volume::VolumeError),
    #[error("cannot run sandbox-helper")]
    HelperSpawn(#[source] std::io::Error),
    #[error("sandbox-helper {cmd} failed: {stderr}")]
    Helper { cmd: &'static str, stderr: String },
    #[error("the guest agent did not answer within {0:?}; guest log: {1}")]
    GuestTimeout(Duration, String),
    #[error("the sandbox's init process exited during start; guest log: {0}")]
    InitExited(String),
    #[error("guest socket path {0} is longer than 107 bytes: use a shorter data dir")]
    SocketPath(PathBuf),
    #[error("the sandbox is running")]
    Running,
    #[error("background task failed")]
    Join(#[from] tokio::task::JoinError),
}

pub struct NamespaceDriver {
    config: NamespaceConfig,
    data: DataDir,
    /// Berth binary as seen by sandboxes (the configured one, or a copy in `images/`
    /// when the configured one is not reachable by unprivileged uids).
    guest_exe: PathBuf,
    /// The host's loader and the agent's libraries for directory images; `None` when
    /// the agent is static or they could not be resolved (it then runs as is).
    host_loader: Option<HostLoader>,
    layout: HostLayout,
    etc_masked: Vec<String>,
    spares: Option<SpareWorker>,
}

/// Refills the spare-image pool in a background thread, one size request at a time,
/// off the start path. Dropping it stops the thread after its current image.
struct SpareWorker {
    pool: volume::SparePool,
    requests: std::sync::Mutex<Option<std::sync::mpsc::Sender<u64>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A refill waits this long before it starts, so it does not compete with the start
/// that used the spare (the guest is usually up well within this).
const SPARE_REFILL_DELAY: Duration = Duration::from_millis(50);

impl SpareWorker {
    fn spawn(pool: volume::SparePool) -> std::io::Result<Self> {
        use std::sync::atomic::Ordering;
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let pool = pool.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("berth-spares".into())
                .spawn(move || {
                    while let Ok(size) = rx.recv() {
                        std::thread::sleep(SPARE_REFILL_DELAY);
                        let stopped = || stop.load(Ordering::Relaxed);
                        match pool.fill(size, &stopped) {
                            Ok(0) => {}
                            Ok(made) => tracing::debug!(size, made, "spare workspace images made"),
                            Err(e) => tracing::warn!(size, error = %e, "cannot make a spare workspace image"),
                        }
                        if stopped() {
                            break;
                        }
                    }
                })?
        };
        Ok(Self {
            pool,
            requests: std::sync::Mutex::new(Some(tx)),
            stop,
            thread: Some(thread),
        })
    }

    fn refill(&self, size: u64) {
        if let Ok(guard) = self.requests.lock() {
            if let Some(tx) = guard.as_ref() {
                let _ = tx.send(size);
            }
        }
    }
}

impl Drop for SpareWorker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut guard) = self.requests.lock() {
            guard.take();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn prepare_dir(path: &Path, mode: u32) -> Result<(), NewDriverError> {
    let err = |source| NewDriverError::Prepare {
        path: path.into(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)
}

/// Whether an unprivileged uid can reach `path` (every ancestor has o+x) and read it
/// (o+r), and execute it (o+x) when `executed`.
fn world_reachable(path: &Path, executed: bool) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    let need = if executed { 0o005 } else { 0o004 };
    meta.mode() & need == need
        && path
            .ancestors()
            .skip(1)
            .all(|dir| fs::metadata(dir).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// Why the sandboxes could not use a data dir (see [`check_data_dir`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataDirError {
    /// Ancestors without `o+x`, outermost first, with their modes.
    #[error(
        "the data dir {} is not reachable by sandboxed users: {}; choose a data dir whose \
         parent directories all have o+x (e.g. /var/lib/berth) or run chmod o+x {}",
        .data_dir.display(),
        modes(.blocked_by),
        dirs(.blocked_by)
    )]
    Unreachable {
        data_dir: PathBuf,
        blocked_by: Vec<(PathBuf, u32)>,
    },
}

fn modes(blocked_by: &[(PathBuf, u32)]) -> String {
    let modes: Vec<String> = blocked_by
        .iter()
        .map(|(dir, mode)| format!("{} has mode {mode:04o}", dir.display()))
        .collect();
    modes.join(", ")
}

fn dirs(blocked_by: &[(PathBuf, u32)]) -> String {
    let dirs: Vec<String> = blocked_by
        .iter()
        .map(|(dir, _)| dir.display().to_string())
        .collect();
    dirs.join(" ")
}

/// Check that the sandboxes' users can traverse every ancestor of `data_dir` to reach
/// their rootfs and socket under `run/` (the driver gives the data dir itself, `run/`
/// and `images/` `o+x`). Sandbox root is an unprivileged host uid, neither owner nor
/// group of these directories, so each needs `o+x`; without it every start fails late
/// with libcontainer's "failed to prepare rootfs". Symlinks in `data_dir` are resolved
/// first; ancestors whose mode cannot be read are not reported.
pub fn check_data_dir(data_dir: &Path) -> Result<(), DataDirError> {
    let data_dir = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let mut blocked_by: Vec<(PathBuf, u32)> = data_dir
        .ancestors()
        .skip(1)
        .filter_map(|dir| {
            let mode = fs::metadata(dir).ok()?.mode() & 0o7777;
            (mode & 0o001 == 0).then(|| (dir.to_path_buf(), mode))
        })
        .collect();
    if blocked_by.is_empty() {
        return Ok(());
    }
    // Outermost first, the order in which a path walk meets them.
    blocked_by.reverse();
    Err(DataDirError::Unreachable {
        data_dir,
        blocked_by,
    })
}

impl NamespaceDriver {
    pub fn new(config: NamespaceConfig) -> Result<Self, NewDriverError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(NewDriverError::NotRoot);
        }
        let dd = &config.data_dir;
        if !dd.is_absolute() || dd.to_string_lossy().contains([',', ':']) {
            return Err(NewDriverError::DataDir(dd.clone()));
        }
        if !config.berth_exe.is_file() {
            return Err(NewDriverError::BerthExe(config.berth_exe.clone()));
        }
        if config.uid_base == 0 || config.uid_range < 65_536 {
            return Err(NewDriverError::Uids);
        }
        let data = DataDir::new(dd.clone());
        // Sandbox root (an unprivileged host uid) must traverse data/ and run/ to reach
        // its rootfs and socket dir; it cannot list them, and workspaces/ stays private.
        fs::create_dir_all(dd).map_err(|source| NewDriverError::Prepare {
            path: dd.clone(),
            source,
        })?;
        let mode = fs::metadata(dd)
            .map_err(|source| NewDriverError::Prepare {
                path: dd.clone(),
                source,
            })?
            .mode();
        if mode & 0o001 == 0 {
            prepare_dir(dd, (mode & 0o7777) | 0o001)?;
        }
        prepare_dir(&data.run(), 0o711)?;
        prepare_dir(&data.workspaces(), 0o700)?;
        prepare_dir(&data.images(), 0o711)?;
        let layout = HostLayout::probe().map_err(NewDriverError::Skeleton)?;
        rootfs::ensure_skeleton(&data.host_skeleton(), &layout)
            .map_err(NewDriverError::Skeleton)?;
        let guest_exe = if world_reachable(&config.berth_exe, true) {
            config.berth_exe.clone()
        } else {
            let copy = data.images().join("berth");
            let err = |source| NewDriverError::Prepare {
                path: copy.clone(),
                source,
            };
            let tmp = copy.with_extension("new");
            fs::copy(&config.berth_exe, &tmp).map_err(err)?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(err)?;
            fs::rename(&tmp, &copy).map_err(err)?;
            copy
        };
        let host_loader = match HostLoader::resolve(&config.berth_exe, world_reachable) {
            Ok(loader) => loader,
            Err(e) => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::new(e)),
                    "the guest agent of directory images will run on the image's own libraries"
                );
                None
            }
        };
        let etc_masked = rootfs::etc_secrets(Path::new("/etc"));
        if !cgroup::favors_dynmods() {
            tracing::info!(
                "no cgroup hierarchy is mounted with favordynmods: every sandbox start waits \
                 for an RCU grace period (~5-15 ms) to move its init into its cgroup; see \
                 docs/design/namespace-sandbox.md"
            );
        }
        let spares = if config.spare_images > 0 {
            let pool = volume::SparePool::new(data.spares(), config.spare_images);
            pool.clean().map_err(|source| NewDriverError::Prepare {
                path: data.spares(),
                source,
            })?;
            let worker = SpareWorker::spawn(pool).map_err(|source| NewDriverError::Prepare {
                path: data.spares(),
                source,
            })?;
            let mut sizes = worker.pool.sizes();
            sizes.push(berth_api::runtime::defaults::workspace_size());
            sizes.sort_unstable();
            sizes.dedup();
            for size in sizes {
                worker.refill(size);
            }
            Some(worker)
        } else {
            None
        };
        Ok(Self {
            config,
            data,
            guest_exe,
            host_loader,
            layout,
            etc_masked,
            spares,
        })
    }

    /// Host uid (= gid) of the session's root.
    fn root_id(&self, slot: u32) -> Result<u32, SandboxError> {
        slot.checked_mul(self.config.uid_range)
            .and_then(|off| off.checked_add(self.config.uid_base))
            .filter(|id| id.checked_add(self.config.uid_range).is_some())
            .ok_or(SandboxError::UidSlot(slot))
    }

    /// The OCI config input for a request.
    fn spec_input(&self, req: &SandboxRequest, paths: &SessionPaths, root_id: u32) -> SpecInput {
        let rt = &req.runtime;
        let host = rt.image == IMAGE_HOST;
        SpecInput {
            session: req.session_id.clone(),
            rootfs: paths.rootfs(),
            host_id: root_id,
            id_range: self.config.uid_range,
            cgroup: paths.cgroup(),
            host_dirs: if host {
                self.layout.binds.clone()
            } else {
                vec![]
            },
            masked: if host {
                self.etc_masked.clone()
            } else {
                vec![]
            },
            berth_exe: self.guest_exe.clone(),
            host_loader: if host {
                None
            } else {
                self.host_loader.as_ref().map(HostLoader::current)
            },
            sock_dir: paths.sock_dir(),
            workspace_source: paths.workspace(),
            etc_dir: paths.etc(),
            workspace_path: rt.workspace_path.clone(),
            mounts: rt
                .mounts
                .iter()
                .map(|m| BindMount {
                    source: m.source.clone().into(),
                    target: m.target.clone(),
                    read_only: m.read_only,
                })
                .collect(),
            env: rt.env.clone(),
            cpus: rt.cpus,
            memory: rt.memory,
            pids: rt.pids,
        }
    }

    fn plan(&self, req: &SandboxRequest, root_id: u32) -> StartPlan {
        let rt = &req.runtime;
        let host = rt.image == IMAGE_HOST;
        let mut targets = vec![
            (GUEST_EXE.to_string(), true),
            ("/etc/hosts".to_string(), true),
            ("/etc/hostname".to_string(), true),
            (rt.workspace_path.clone(), false),
        ];
        if !host {
            for file in self.host_loader.iter().flat_map(HostLoader::files) {
                targets.push((file.target.clone(), true));
            }
        }
        for m in &rt.mounts {
            targets.push((m.target.clone(), Path::new(&m.source).is_file()));
        }
        StartPlan {
            lower: if host {
                self.data.host_skeleton()
            } else {
                PathBuf::from(&rt.image)
            },
            host_image: host,
            root_id,
            workspace_image: self.data.workspace_image(&req.session_id),
            targets,
        }
    }

    async fn helper(&self, cmd: &'static str, paths: &SessionPaths) -> Result<(), SandboxError> {
        let out = tokio::process::Command::new(&self.config.berth_exe)
            .arg("sandbox-helper")
            .arg(cmd)
            .arg(&paths.dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .await
            .map_err(SandboxError::HelperSpawn)?;
        if out.status.success() {
            if !out.stderr.is_empty() {
                tracing::debug!(helper = cmd, stderr = %String::from_utf8_lossy(&out.stderr), "sandbox-helper log");
            }
            Ok(())
        } else {
            // The last lines carry the error; debug logs before them can be long.
            let stderr = &out.stderr[out.stderr.len().saturating_sub(4000)..];
            Err(SandboxError::Helper {
                cmd,
                stderr: String::from_utf8_lossy(stderr).trim().to_string(),
            })
        }
    }

    fn write_bundle(
        &self,
        req: &SandboxRequest,
        paths: &SessionPaths,
        root_id: u32,
    ) -> Result<(), SandboxError> {
        let prep = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SandboxError::Prepare { path, source }
        };
        fs::DirBuilder::new()
            .mode(0o711)
            .create(&paths.dir)
            .map_err(prep(&paths.dir))?;
        fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o711))
            .map_err(prep(&paths.dir))?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(paths.bundle())
            .map_err(prep(&paths.bundle()))?;
        fs::DirBuilder::new()
            .mode(0o755)
            .create(paths.etc())
            .map_err(prep(&paths.etc()))?;
        let hosts = paths.etc().join("hosts");
        fs::write(&hosts, spec::etc_hosts(&req.session_id)).map_err(prep(&hosts))?;
        let hostname = paths.etc().join("hostname");
        fs::write(&hostname, format!("{}\n", spec::hostname(&req.session_id)))
            .map_err(prep(&hostname))?;
        let config = spec::config(&self.spec_input(req, paths, root_id));
        fs::write(paths.config_json(), config.to_string()).map_err(prep(&paths.config_json()))?;
        let plan = serde_json::to_vec(&self.plan(req, root_id)).unwrap_or_default();
        fs::write(paths.plan(), plan).map_err(prep(&paths.plan()))?;
        Ok(())
    }

    async fn start_inner(&self, req: &SandboxRequest) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        check_session_id(&req.session_id)?;
        let root_id = self.root_id(req.uid_slot)?;
        let paths = self.data.session(&req.session_id);
        if paths.guest_sock_short().as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SandboxError::SocketPath(paths.guest_sock_short()));
        }
        if paths.dir.exists() {
            // A leftover of an earlier sandbox: the core asks to start, so it is dead.
            self.helper("stop", &paths).await?;
            self.wait_for_workspace_release(&req.session_id).await;
        }
        let image = self.data.workspace_image(&req.session_id);
        let size = req.runtime.workspace_size;
        let mut provided = volume::Provided::Existing;
        if !image.exists() {
            let pool = self.spares.as_ref().map(|w| w.pool.clone());
            provided = tokio::task::spawn_blocking(move || {
                volume::ensure_image(&image, size, root_id, pool.as_ref())
            })
            .await??;
            if let Some(worker) = &self.spares {
                worker.refill(size);
            }
        }
        self.write_bundle(req, &paths, root_id)?;
        let prepared = t0.elapsed();
        let started = Instant::now();
        self.helper("start", &paths).await?;
        let helper_done = started.elapsed();
        let init = InitProcess::read(&paths.init_pid())
            .ok_or_else(|| SandboxError::InitExited(self.guest_log_tail(&paths)))?;
        let guest = self.wait_for_guest(&paths, init, GUEST_DEADLINE).await?;
        tracing::debug!(
            session = %req.session_id,
            workspace = ?provided,
            prepare = ?prepared,
            helper = ?helper_done,
            total = ?started.elapsed(),
            start = ?t0.elapsed(),
            "sandbox ready"
        );
        Ok(Sandbox {
            guest,
            init_pid: init.pid as u32,
        })
    }

    /// Poll the guest's socket until `Health` answers: every millisecond at first (a
    /// healthy guest is up within a few), then every 10 ms.
    async fn wait_for_guest(
        &self,
        paths: &SessionPaths,
        init: InitProcess,
        deadline: Duration,
    ) -> Result<Guest, SandboxError> {
        let start = Instant::now();
        let sock = paths.guest_sock_short();
        {
            // Bounded: the loop below still watches the init and the deadline. Only the
            // answer is awaited: closing an inotify instance waits for an SRCU grace
            // period (measured ~14 ms), which the blocking thread pays afterwards.
            let sock = sock.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            drop(tokio::task::spawn_blocking(move || {
                wait_for_path(&sock, SOCKET_WAIT, |found| {
                    let _ = tx.send(found);
                })
            }));
            let _ = rx.await;
        }
        let mut attempt = 0u32;
        loop {
            if sock.exists() {
                // A wedged guest must not hang the caller: bound each attempt.
                let attempt = async {
                    let mut guest = berth_guest::client::connect_unix(&sock).await.ok()?;
                    guest.health(berth_guest::proto::Empty {}).await.ok()?;
                    Some(guest)
                };
                if let Ok(Some(guest)) = tokio::time::timeout(HEALTH_TIMEOUT, attempt).await {
                    return Ok(guest);
                }
            }
            if !init.is_alive() {
                return Err(SandboxError::InitExited(self.guest_log_tail(paths)));
            }
            if start.elapsed() > deadline {
                return Err(SandboxError::GuestTimeout(
                    deadline,
                    self.guest_log_tail(paths),
                ));
            }
            attempt += 1;
            let pause = if attempt < 100 { 1 } else { 10 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    fn guest_log_tail(&self, paths: &SessionPaths) -> String {
        let text = fs::read(paths.guest_log()).unwrap_or_default();
        let tail = &text[text.len().saturating_sub(2000)..];
        String::from_utf8_lossy(tail).trim().to_string()
    }

    fn trim_guest_log(paths: &SessionPaths) {
        crate::common::truncate_log(&paths.guest_log(), GUEST_LOG_MAX);
    }

    async fn stop_inner(&self, session_id: &str) -> Result<(), SandboxError> {
        check_session_id(session_id)?;
        let paths = self.data.session(session_id);
        if paths.dir.exists() {
            self.helper("stop", &paths).await?;
        }
        // Also when the run dir is gone: a failed `sandbox-helper start` stops itself.
        self.wait_for_workspace_release(session_id).await;
        Ok(())
    }

    /// Wait, up to [`LOOP_RELEASE_WAIT`], until no loop device is backed by the session's
    /// workspace image any more; warns if one still is, never fails. `sandbox-helper
    /// stop` unmounts the host's mount of the workspace, but the container's mount
    /// namespace held one too, and the kernel tears a dead namespace down
    /// asynchronously: the autoclear device (and the filesystem on it) can outlive
    /// `stop` for a moment, and a start right after would mount the image again while
    /// the old instance is still shutting down.
    async fn wait_for_workspace_release(&self, session_id: &str) {
        let image = self.data.workspace_image(session_id);
        let start = Instant::now();
        let mut waited = false;
        loop {
            let devices = loopdev::devices_backed_by(&image);
            if devices.is_empty() {
                if waited {
                    tracing::debug!(session = %session_id, waited = ?start.elapsed(), "workspace loop device released");
                }
                return;
            }
            waited = true;
            if start.elapsed() >= LOOP_RELEASE_WAIT {
                tracing::warn!(
                    session = %session_id,
                    image = %image.display(),
                    ?devices,
                    "the workspace image is still attached to a loop device {LOOP_RELEASE_WAIT:?} after stop"
                );
                return;
            }
            tokio::time::sleep(LOOP_RELEASE_POLL).await;
        }
    }

    fn init_of(&self, session_id: &str) -> Option<InitProcess> {
        check_session_id(session_id).ok()?;
        InitProcess::read(&self.data.session(session_id).init_pid())
    }
}

/// Wait until `path` exists, for at most `limit`, without polling: an inotify watch on
/// its directory (the guest creates its socket under a temporary name and renames it
/// into place once it listens). Tells `done` whether it exists before the inotify
/// instance is closed (closing waits for an SRCU grace period).
fn wait_for_path(path: &Path, limit: Duration, done: impl FnOnce(bool)) {
    let mut done = Some(done);
    let mut report = |found: bool| {
        if let Some(done) = done.take() {
            done(found);
        }
    };
    let inotify = watch_for_path(path, limit, &mut report);
    report(path.exists());
    drop(inotify);
}

/// The body of [`wait_for_path`]; returns the inotify instance for the caller to close.
fn watch_for_path(
    path: &Path,
    limit: Duration,
    report: &mut dyn FnMut(bool),
) -> Option<nix::sys::inotify::Inotify> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::AsFd;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return None;
    };
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).ok()?;
    if inotify
        .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        .is_err()
    {
        return Some(inotify);
    }
    // Checked after the watch exists, so a socket created in between is not missed.
    let deadline = Instant::now() + limit;
    while !path.exists() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(timeout) = PollTimeout::try_from(left) else {
            break;
        };
        if left.is_zero() {
            break;
        }
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => break,
            Ok(_) => {
                if let Ok(events) = inotify.read_events() {
                    if events.iter().any(|e| e.name.as_deref() == Some(name)) {
                        report(true);
                        break;
                    }
                }
            }
            Err(nix::Error::EINTR) => {}
            Err(_) => break,
        }
    }
    Some(inotify)
}

#[async_trait]
impl Driver for NamespaceDriver {
    fn name(&self) -> &'static str {
        "namespace"
    }

    fn validate(&self, runtime: &RuntimeSpec) -> Result<(), DriverError> {
        validate::check(runtime, &self.config.data_dir)
    }

    async fn start(&self, req: &SandboxRequest) -> Result<Sandbox, DriverError> {
        self.validate(&req.runtime)?;
        match self.start_inner(req).await {
            Ok(sandbox) => Ok(sandbox),
            Err(e) => {
                if let Err(stop) = self.stop_inner(&req.session_id).await {
                    tracing::warn!(session = %req.session_id, error = %stop, "cleanup after failed start");
                }
                Err(start_error(&req.session_id, e))
            }
        }
    }

    async fn adopt(&self, req: &SandboxRequest) -> Result<Option<Sandbox>, DriverError> {
        let session = &req.session_id;
        check_session_id(session).map_err(|e| io_error("adopt", session, e))?;
        let paths = self.data.session(session);
        if !paths.dir.exists() {
            return Ok(None);
        }
        if let Some(init) = InitProcess::read(&paths.init_pid()).filter(InitProcess::is_alive) {
            if let Ok(guest) = self.wait_for_guest(&paths, init, ADOPT_DEADLINE).await {
                return Ok(Some(Sandbox {
                    guest,
                    init_pid: init.pid as u32,
                }));
            }
        }
        self.stop_inner(session)
            .await
            .map_err(|e| io_error("adopt", session, e))?;
        Ok(None)
    }

    async fn is_alive(&self, session_id: &str) -> bool {
        let alive = self.init_of(session_id).is_some_and(|i| i.is_alive());
        if alive {
            Self::trim_guest_log(&self.data.session(session_id));
        }
        alive
    }

    async fn stop(&self, session_id: &str) -> Result<(), DriverError> {
        self.stop_inner(session_id)
            .await
            .map_err(|e| io_error("stop", session_id, e))
    }

    /// Read from the session's cgroup, which `stop` removes: call this before `stop`.
    async fn stats(&self, session_id: &str) -> Option<SandboxStats> {
        check_session_id(session_id).ok()?;
        let paths = self.data.session(session_id);
        if !paths.dir.exists() {
            return None;
        }
        SandboxCgroup::new(&paths.cgroup()).stats()
    }

    async fn workspace_bytes(&self, session_id: &str) -> u64 {
        if check_session_id(session_id).is_err() {
            return 0;
        }
        let paths = self.data.session(session_id);
        let mounted = match (fs::metadata(paths.workspace()), fs::metadata(&paths.dir)) {
            (Ok(ws), Ok(dir)) if ws.dev() != dir.dev() => Some(paths.workspace()),
            _ => None,
        };
        volume::used_bytes(&self.data.workspace_image(session_id), mounted.as_deref())
    }

    async fn delete_workspace(&self, session_id: &str) -> Result<(), DriverError> {
        let op = "delete workspace";
        check_session_id(session_id).map_err(|e| io_error(op, session_id, e))?;
        if self.data.session(session_id).dir.exists() {
            return Err(io_error(op, session_id, SandboxError::Running));
        }
        volume::delete(&self.data.workspace_image(session_id))
            .map_err(|e| io_error(op, session_id, e))
    }

    async fn leftovers(&self) -> Vec<String> {
        crate::common::session_dirs(&self.data.run())
    }

    fn workspace_image(&self, session_id: &str) -> PathBuf {
        self.data.workspace_image(session_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_under_a_closed_parent_is_unreachable() {
        let tmp = tempfile::tempdir().expect("tmp");
        let base = tmp.path().canonicalize().expect("temp dir");
        // Independent of the umask: the temp dir itself is traversable.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).expect("chmod");
        let closed = base.join("closed");
        let data_dir = closed.join("inner/data");
        fs::create_dir_all(&data_dir).expect("mkdir");
        fs::set_permissions(closed.join("inner"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).expect("chmod");
        // The data dir's own mode is the driver's business (it adds o+x).
        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        let ours = |e: &DataDirError| {
            let DataDirError::Unreachable { blocked_by, .. } = e;
            blocked_by
                .iter()
                .filter(|(dir, _)| dir.starts_with(&base))
                .cloned()
                .collect::<Vec<_>>()
        };
        let err = check_data_dir(&data_dir).expect_err("closed parent");
        assert_eq!(ours(&err), vec![(closed.clone(), 0o700)]);
        let message = err.to_string();
        assert!(
            message.contains(&format!("{} has mode 0700", closed.display()))
                && message.contains(&format!("chmod o+x {}", closed.display())),
            "{message}"
        );

        fs::set_permissions(&closed, fs::Permissions::from_mode(0o711)).expect("chmod");
        // Anything still reported lies above the temp dir (an unusual TMPDIR).
        if let Err(e) = check_data_dir(&data_dir) {
            assert_eq!(ours(&e), vec![], "{e}");
        }
    }
}

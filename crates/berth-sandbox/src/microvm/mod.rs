//! The microVM driver: one QEMU `microvm` per session, booting the guest image that
//! `berth image build` made (kernel + initramfs whose `/init` is `berth guest` + a
//! read-only rootfs), with the session's workspace image as a second disk. The guest
//! protocol runs over a virtio-serial port that QEMU exposes as a unix socket here.
//!
//! QEMU is started in its own process group and survives a server restart, which then
//! re-adopts it over the same socket. See `README.md` in this directory.

pub mod channel;
pub mod virtiofs;
pub mod vmm;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use berth_api::RuntimeSpec;
use berth_core::driver::{Driver, DriverError, Sandbox, SandboxRequest, SandboxStats};
use berth_guest::client::Guest;

use self::channel::{Channel, Link};
use self::virtiofs::{IdMap, Share};
use self::vmm::{Accel, ChannelDevice, ShareDevice, VmSpec, Vmm};
use crate::common::{io_error, start_error};
use crate::namespace::cgroup::{CgroupLimits, SandboxCgroup};
use crate::namespace::init_process::InitProcess;
use crate::namespace::paths::check_session_id;
use crate::volume;

/// Memory the VMM itself may use on top of the guest's RAM before its cgroup limit.
const VMM_OVERHEAD: u64 = 256 << 20;
/// Bound on threads of one VMM (vCPUs, I/O workers): a guest cannot fork on the host.
const VMM_PIDS: u64 = 256;
/// Smallest guest RAM accepted: the guest kernel unpacks the initramfs (a debug build's
/// `/init` is ~87 MB) into RAM while the compressed archive is still there, then keeps
/// `/init` resident; much below this it panics or cannot write the files, so runtimes
/// asking for less are refused up front.
pub const MIN_MEMORY: u64 = 256 << 20;

/// How long the KVM probe may take to boot the guest (KVM boots in well under a second).
const PROBE_DEADLINE: Duration = Duration::from_secs(20);
/// How long `adopt` gives a guest that is already up to serve a new connection.
const ADOPT_DEADLINE: Duration = Duration::from_secs(10);
/// How long `stop` waits for the VMM to exit after the guest's shutdown, then kills it.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// `console.log` is truncated when it grows past this.
const CONSOLE_LOG_MAX: u64 = 1 << 20;
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// The kernel's command line is at most 2048 bytes on x86.
const MAX_CMDLINE: usize = 2000;

/// The three artifacts a microVM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
}

/// Where built guest images are found: implemented over `berth image`'s cache by the
/// binary, so this crate does not depend on how images are built.
pub trait GuestImages: Send + Sync + 'static {
    /// The built image for a runtime's `image` (`host` or a rootfs directory), or a
    /// one-line message saying how to build it.
    fn find(&self, image: &str) -> Result<GuestImage, String>;
}

/// One known image (the KVM probe's).
struct Fixed(GuestImage);

impl GuestImages for Fixed {
    fn find(&self, _image: &str) -> Result<GuestImage, String> {
        Ok(self.0.clone())
    }
}

#[derive(Debug, Clone)]
pub struct MicroVmConfig {
    /// The server's data dir; the driver uses `workspaces/` and `vm/`.
    pub data_dir: PathBuf,
    /// How long `start` waits for the guest agent's first answer.
    pub boot_deadline: Duration,
    /// Host uids of a session's share daemons, as the namespace driver maps its
    /// sandboxes: guest root = `uid_base + uid_slot * uid_range`.
    pub uid_base: u32,
    pub uid_range: u32,
    /// The vhost-user-fs daemon serving a runtime's host directory mounts.
    pub virtiofsd: PathBuf,
    /// How the host reaches the guest agent.
    pub channel: Channel,
}

impl MicroVmConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let ns = crate::namespace::NamespaceConfig::new(PathBuf::new(), PathBuf::new());
        Self {
            data_dir: data_dir.into(),
            boot_deadline: Duration::from_secs(60),
            uid_base: ns.uid_base,
            uid_range: ns.uid_range,
            virtiofsd: PathBuf::from(virtiofs::DEFAULT_VIRTIOFSD),
            channel: Channel::Serial,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid session id")]
    SessionId(#[from] crate::namespace::paths::SessionIdError),
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workspace volume")]
    Volume(#[from] volume::VolumeError),
    #[error("cannot run {vmm}")]
    Spawn {
        vmm: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM exited during boot; console: {0}")]
    Exited(String),
    #[error("the guest agent did not answer within {0:?}; console: {1}")]
    GuestTimeout(Duration, String),
    #[error("channel socket path {0} is longer than 107 bytes: use a shorter data dir")]
    SocketPath(PathBuf),
    #[error("the session's configuration does not fit on the kernel command line ({0} bytes): use fewer or shorter env values")]
    Cmdline(usize),
    #[error("the sandbox is running")]
    Running,
    #[error("uid slot {0} is beyond the uid range")]
    UidSlot(u32),
    #[error("cannot start the vsock daemon {daemon}")]
    VsockDaemon {
        daemon: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot share {source_dir} with the VM")]
    Share {
        source_dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("background task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Everything ephemeral of one VM lives under `vm/<session>/`.
struct VmPaths {
    dir: PathBuf,
    /// The serial port's chardev socket.
    channel: PathBuf,
    /// The vhost-user vsock daemon's dir (`vu`: QEMU's socket, `hv`: ours), outside
    /// `vm/` because the daemon runs unprivileged.
    vsock_dir: PathBuf,
    cgroup: String,
}

impl VmPaths {
    fn pid(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }
    fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The VMM's own stderr (e.g. a disk it cannot open).
    fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    /// The share daemons' stderr.
    fn virtiofsd_log(&self) -> PathBuf {
        self.dir.join("virtiofsd.log")
    }
    /// The vsock daemon's stderr.
    fn vsock_log(&self) -> PathBuf {
        self.dir.join("vsock.log")
    }
    /// Which channel this VM was started with ([`Link::record`]).
    fn link_record(&self) -> PathBuf {
        self.dir.join("channel")
    }
    /// The link recorded for this VM; VMs of an older berth have none: serial.
    fn link(&self) -> Link {
        fs::read_to_string(self.link_record())
            .ok()
            .and_then(|text| Link::parse(&text, &self.channel, &self.vsock_dir.join("hv")))
            .unwrap_or_else(|| Link::Serial(self.channel.clone()))
    }
    /// The vhost-user socket of the `i`th mount: next to the channel (short paths).
    fn share_socket(&self, i: usize) -> PathBuf {
        let mut name = self.channel.clone().into_os_string();
        name.push(format!(".fs{i}"));
        PathBuf::from(name)
    }
}

pub struct MicroVmDriver {
    config: MicroVmConfig,
    vmm: Arc<dyn Vmm>,
    images: Arc<dyn GuestImages>,
    /// Fixed by the operator, or probed on the first boot (see [`Self::probe_kvm`]).
    accel: tokio::sync::OnceCell<Accel>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl MicroVmDriver {
    /// `accel: None` probes KVM on the first boot and falls back to TCG.
    pub fn new(
        config: MicroVmConfig,
        vmm: Arc<dyn Vmm>,
        images: Arc<dyn GuestImages>,
        accel: Option<Accel>,
    ) -> std::io::Result<Self> {
        let mut dirs = fs::DirBuilder::new();
        dirs.recursive(true).mode(0o700);
        dirs.create(config.data_dir.join("vm/.sock"))?;
        dirs.create(config.data_dir.join("workspaces"))?;
        Ok(Self {
            config,
            vmm,
            images,
            accel: tokio::sync::OnceCell::new_with(accel),
        })
    }

    /// The accelerator in use, once known.
    pub fn accel(&self) -> Option<Accel> {
        self.accel.get().copied()
    }

    /// Settle the accelerator from a probe the caller ran itself (`berth server --info`
    /// prints the probe's outcome), so that later starts do not boot the probe again.
    /// No-op once decided.
    pub fn remember_accel(&self, accel: Accel) {
        let _ = self.accel.set(accel);
    }

    /// KVM when it really boots the guest, else TCG (decided once, on first use).
    pub async fn resolve_accel(&self, image: &GuestImage) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                match self.probe_kvm(image).await {
                    Ok(boot) => {
                        tracing::info!(?boot, "microVMs use KVM");
                        Accel::Kvm
                    }
                    Err(why) => {
                        tracing::warn!(
                            "microVMs use TCG (software emulation, slow: for development and \
                             tests only) because KVM cannot boot the guest here: {why}"
                        );
                        Accel::Tcg
                    }
                }
            })
            .await
    }

    /// Boot `image` once under KVM with a deadline: some nested hosts expose a
    /// `/dev/kvm` that answers ioctls but fails mid-boot on Linux guests.
    pub async fn probe_kvm(&self, image: &GuestImage) -> Result<Duration, String> {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/kvm")
            .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
        let dir = self.config.data_dir.join("vm-probe");
        let _ = fs::remove_dir_all(&dir);
        let probe = MicroVmDriver::new(
            MicroVmConfig {
                data_dir: dir.clone(),
                boot_deadline: PROBE_DEADLINE,
                // The probe asks whether KVM boots the guest; its private data dir is
                // not reachable for an unprivileged vsock daemon.
                channel: match &self.config.channel {
                    Channel::VhostUserVsock { .. } => Channel::Serial,
                    other => other.clone(),
                },
                ..self.config.clone()
            },
            self.vmm.clone(),
            Arc::new(Fixed(image.clone())),
            Some(Accel::Kvm),
        )
        .map_err(|e| format!("cannot prepare {}: {e}", dir.display()))?;
        let mut runtime: RuntimeSpec =
            serde_json::from_value(serde_json::json!({"name": "kvm-probe"}))
                .map_err(|e| e.to_string())?;
        runtime.memory = 256 << 20;
        runtime.workspace_size = 0;
        let req = SandboxRequest {
            session_id: "kvm-probe".into(),
            runtime,
            uid_slot: 0,
        };
        let started = Instant::now();
        let result = probe.start_inner(&req, image, Accel::Kvm).await;
        let boot = started.elapsed();
        if let Ok(sandbox) = &result {
            let mut guest = sandbox.guest.clone();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                guest.shutdown(berth_guest::proto::Empty {}),
            )
            .await;
        }
        let _ = probe.stop_inner("kvm-probe").await;
        let _ = fs::remove_dir_all(&dir);
        result.map(|_| boot).map_err(|e| {
            let mut msg = format!("{e}");
            msg.truncate(600);
            msg
        })
    }

    pub fn vmm_name(&self) -> &'static str {
        self.vmm.name()
    }

    /// How the host reaches the guest agent.
    pub fn channel(&self) -> &Channel {
        &self.config.channel
    }

    /// The daemon that serves host directory mounts, if it is installed.
    pub fn virtiofsd(&self) -> Option<&Path> {
        Some(self.config.virtiofsd.as_path()).filter(|p| p.is_file())
    }

    fn vm_dir(&self) -> PathBuf {
        self.config.data_dir.join("vm")
    }

    fn paths(&self, session: &str) -> VmPaths {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(session.as_bytes());
        // Cgroups are host-global; the data dir's share keeps two servers apart.
        let server = sha2::Sha256::digest(self.vm_dir().as_os_str().as_encoded_bytes());
        VmPaths {
            dir: self.vm_dir().join(session),
            channel: self.vm_dir().join(".sock").join(hex(&digest[..8])),
            vsock_dir: self.config.data_dir.join("vsock").join(hex(&digest[..8])),
            cgroup: format!("/berth/{}/{session}", hex(&server[..6])),
        }
    }

    fn workspace_image(&self, session: &str) -> PathBuf {
        self.config
            .data_dir
            .join("workspaces")
            .join(format!("{session}.ext4"))
    }

    /// The guest learns its session's settings from the kernel command line (it has no
    /// other channel before its agent serves): `berth.hostname`, `berth.workspace_path`,
    /// `berth.pids` (the guest puts every command in a cgroup with that `pids.max`) and
    /// the runtime's env as `berth.env=<base64url(JSON object)>`.
    fn cmdline(
        req: &SandboxRequest,
        shares: &[Share],
        vsock: bool,
        accel: Accel,
    ) -> Result<String, VmError> {
        let rt = &req.runtime;
        // `panic=-1`: a guest kernel panic reboots, which `-no-reboot` turns into the
        // VMM exiting, so the host sees it.
        // `rootfstype=ramfs`: without `root=`, the kernel unpacks the initramfs into a
        // tmpfs capped at half the RAM it counts free, which a debug build's /init
        // overflows at 256 MiB ("Initramfs unpacking failed"); ramfs has no cap, and the
        // files are freed after the switch to the real root anyway.
        let mut line = format!(
            "console=ttyS0 panic=-1 quiet rootfstype=ramfs berth.hostname={} \
             berth.workspace_path=\"{}\" berth.pids={}",
            crate::namespace::spec::hostname(&req.session_id),
            rt.workspace_path,
            rt.pids
        );
        if !rt.env.is_empty() {
            let json = serde_json::to_vec(&rt.env).unwrap_or_default();
            let env = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
            line.push_str(&format!(" berth.env={env}"));
        }
        if vsock {
            line.push_str(&format!(" berth.channel=vsock:{}", channel::GUEST_PORT));
        }
        if !shares.is_empty() {
            let mounts: Vec<_> = shares
                .iter()
                .map(|s| {
                    serde_json::json!({"tag": s.tag, "target": s.target, "read_only": s.read_only})
                })
                .collect();
            let json = serde_json::to_vec(&mounts).unwrap_or_default();
            let mounts = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
            line.push_str(&format!(" berth.mounts={mounts}"));
        }
        if accel == Accel::Tcg {
            // Under TCG the guest's TSC calibration against the PIT fails on a loaded
            // host and, with no other clocksource on `microvm`, the boot can stall for
            // good; the guest TSC runs at the host's rate, so tell it that rate.
            // `tsc=reliable` keeps it from being marked unstable later in the boot.
            if let Some(khz) = host_tsc_khz() {
                line.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
            }
        }
        if line.len() > MAX_CMDLINE {
            return Err(VmError::Cmdline(line.len()));
        }
        Ok(line)
    }

    fn spec(
        &self,
        req: &SandboxRequest,
        image: &GuestImage,
        paths: &VmPaths,
        channel: ChannelDevice,
        shares: &[Share],
        accel: Accel,
    ) -> Result<VmSpec, VmError> {
        let rt = &req.runtime;
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let vcpus = rt
            .cpus
            .filter(|c| c.is_finite() && *c > 0.0)
            .map_or(1, |c| c.ceil() as u32)
            .clamp(1, host_cpus);
        Ok(VmSpec {
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: Self::cmdline(
                req,
                shares,
                !matches!(channel, ChannelDevice::Serial(_)),
                accel,
            )?,
            rootfs: image.rootfs.clone(),
            workspace: self.workspace_image(&req.session_id),
            channel,
            console_log: paths.console(),
            vcpus,
            memory_mib: (rt.memory >> 20).max(MIN_MEMORY >> 20),
            accel,
            shares: shares
                .iter()
                .map(|s| ShareDevice {
                    tag: s.tag.clone(),
                    socket: s.socket.clone(),
                })
                .collect(),
        })
    }

    /// The runtime's mounts as virtio-fs shares (sources are canonical directories:
    /// `image_for` checked them).
    fn shares(req: &SandboxRequest, paths: &VmPaths) -> Vec<Share> {
        req.runtime
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| Share {
                tag: format!("berth-m{i}"),
                source: Path::new(&m.source)
                    .canonicalize()
                    .unwrap_or_else(|_| PathBuf::from(&m.source)),
                target: m.target.clone(),
                read_only: m.read_only,
                socket: paths.share_socket(i),
            })
            .collect()
    }

    /// The host uid the session's guest root maps to in its helper daemons (as the
    /// namespace driver maps a sandbox of the same slot).
    fn root_id(&self, req: &SandboxRequest) -> Result<u32, VmError> {
        req.uid_slot
            .checked_mul(self.config.uid_range)
            .and_then(|off| off.checked_add(self.config.uid_base))
            .filter(|id| id.checked_add(self.config.uid_range).is_some())
            .ok_or(VmError::UidSlot(req.uid_slot))
    }

    /// The channel's device and the host's way in; starts the vsock daemon (in the VM's
    /// cgroup) when the channel needs one.
    async fn start_channel(
        &self,
        req: &SandboxRequest,
        paths: &VmPaths,
        cgroup: &SandboxCgroup,
    ) -> Result<(ChannelDevice, Link), VmError> {
        Ok(match &self.config.channel {
            Channel::Serial => (
                ChannelDevice::Serial(paths.channel.clone()),
                Link::Serial(paths.channel.clone()),
            ),
            Channel::KernelVsock => {
                let mut key = self.vm_dir().into_os_string().into_encoded_bytes();
                key.extend_from_slice(req.session_id.as_bytes());
                let cid = channel::guest_cid(&key);
                (ChannelDevice::KernelVsock { cid }, Link::Kernel { cid })
            }
            Channel::VhostUserVsock { daemon } => {
                let failed = |source| VmError::VsockDaemon {
                    daemon: daemon.clone(),
                    source,
                };
                let log = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(paths.vsock_log())
                    .map_err(failed)?;
                let pid = channel::spawn_daemon(daemon, &paths.vsock_dir, self.root_id(req)?, &log)
                    .await
                    .map_err(failed)?;
                if let Err(e) = cgroup.attach(pid) {
                    tracing::warn!(session = %req.session_id, error = %e, "cannot move the vsock daemon into the VM's cgroup");
                }
                (
                    ChannelDevice::VhostUserVsock(paths.vsock_dir.join("vu")),
                    Link::Hybrid(paths.vsock_dir.join("hv")),
                )
            }
        })
    }

    /// Start one `virtiofsd` per share, in the VM's cgroup, mapped to the session's
    /// uid range (see `virtiofs.rs`).
    fn start_shares(
        &self,
        req: &SandboxRequest,
        shares: &[Share],
        paths: &VmPaths,
        cgroup: &SandboxCgroup,
    ) -> Result<(), VmError> {
        if shares.is_empty() {
            return Ok(());
        }
        let ids = IdMap {
            root_id: self.root_id(req)?,
            count: self.config.uid_range,
        };
        let log_path = paths.virtiofsd_log();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| VmError::Prepare {
                path: log_path,
                source,
            })?;
        for share in shares {
            let pid =
                virtiofs::spawn(&self.config.virtiofsd, share, ids, &log).map_err(|source| {
                    VmError::Share {
                        source_dir: share.source.clone(),
                        source,
                    }
                })?;
            if let Err(e) = cgroup.attach(pid) {
                tracing::warn!(session = %req.session_id, error = %e, "cannot move virtiofsd into the VM's cgroup");
            }
        }
        Ok(())
    }

    async fn start_inner(
        &self,
        req: &SandboxRequest,
        image: &GuestImage,
        accel: Accel,
    ) -> Result<Sandbox, VmError> {
        let t0 = Instant::now();
        let session = &req.session_id;
        check_session_id(session)?;
        let paths = self.paths(session);
        if paths.channel.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmError::SocketPath(paths.channel));
        }
        if paths.dir.exists() {
            // A leftover of an earlier VM: the core asks to start, so it is dead.
            self.stop_inner(session).await?;
        }
        let ws = self.workspace_image(session);
        let size = req.runtime.workspace_size;
        // Root inside the VM is uid 0, so the workspace's root dir belongs to 0.
        tokio::task::spawn_blocking(move || volume::ensure_image(&ws, size, 0, None)).await??;
        let prep = |path: &Path| {
            let path = path.to_path_buf();
            move |source| VmError::Prepare { path, source }
        };
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&paths.dir)
            .map_err(prep(&paths.dir))?;
        let _ = fs::remove_file(&paths.channel);
        let shares = Self::shares(req, &paths);
        let sockets = shares
            .iter()
            .map(|s| s.socket.clone())
            .chain([paths.vsock_dir.join("vu"), paths.vsock_dir.join("hv")]);
        for socket in sockets {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(VmError::SocketPath(socket));
            }
        }
        let cgroup = SandboxCgroup::new(&paths.cgroup);
        cgroup
            .create(&CgroupLimits {
                memory_bytes: req.runtime.memory.saturating_add(VMM_OVERHEAD),
                cpus: req.runtime.cpus,
                pids: VMM_PIDS,
            })
            .map_err(prep(Path::new(&paths.cgroup)))?;
        let (device, link) = self.start_channel(req, &paths, &cgroup).await?;
        fs::write(paths.link_record(), link.record()).map_err(prep(&paths.link_record()))?;
        let spec = self.spec(req, image, &paths, device, &shares, accel)?;
        self.start_shares(req, &shares, &paths, &cgroup)?;
        let vmm_log = fs::File::create(paths.vmm_log()).map_err(prep(&paths.vmm_log()))?;
        let mut cmd = tokio::process::Command::from(self.vmm.command(&spec));
        cmd.stdin(std::process::Stdio::null())
            .stdout(vmm_log.try_clone().map_err(prep(&paths.vmm_log()))?)
            .stderr(vmm_log)
            // Its own process group: a Ctrl+C at the server's terminal must not reach
            // it, and it outlives a server restart to be adopted.
            .process_group(0);
        let child = cmd.spawn().map_err(|source| VmError::Spawn {
            vmm: self.vmm.name(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        // tokio reaps the process once it exits; liveness is read from /proc.
        drop(child);
        if let Err(e) = cgroup.attach(pid) {
            tracing::warn!(session = %session, error = %e, "cannot move the VMM into its cgroup");
        }
        let vmm = InitProcess::of(pid as i32)
            .ok_or_else(|| VmError::Exited(self.console_tail(&paths)))?;
        vmm.write(&paths.pid()).map_err(prep(&paths.pid()))?;
        let guest = self
            .wait_for_guest(&paths, &link, vmm, self.config.boot_deadline)
            .await?;
        tracing::debug!(
            session = %session,
            accel = accel.name(),
            boot = ?t0.elapsed(),
            spawn_to_health = ?fs::metadata(paths.vmm_log())
                .and_then(|m| m.created())
                .ok()
                .and_then(|t| t.elapsed().ok()),
            "microvm ready"
        );
        Ok(Sandbox {
            guest,
            init_pid: pid,
        })
    }

    /// Connect over `link` and wait for `Health`. On the serial port, bytes sent before
    /// the guest opens its port wait in QEMU, so one connection sees a booting guest come
    /// up. A connection can still fail: QEMU creates the socket a moment before it
    /// listens, and right after an earlier host hung up the guest may still be writing
    /// to that one (QEMU hands those bytes to the next host). So a failed attempt is
    /// retried on a fresh connection after [`Link::retry_pause`], which on the serial
    /// port outlasts the guest's hang-up detection. A vsock connection is refused until
    /// the guest listens, and is simply tried again.
    async fn wait_for_guest(
        &self,
        paths: &VmPaths,
        link: &Link,
        vmm: InitProcess,
        deadline: Duration,
    ) -> Result<Guest, VmError> {
        let start = Instant::now();
        let dead = || VmError::Exited(self.console_tail(paths));
        let timeout = || VmError::GuestTimeout(deadline, self.console_tail(paths));
        loop {
            if !vmm.is_alive() {
                return Err(dead());
            }
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(timeout());
            }
            // Bounded: a vsock handshake waits on the guest, which may never answer.
            let Ok(Some(guest)) = tokio::time::timeout(left, link.connect()).await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let mut probe = guest.clone();
            let health = probe.health(berth_guest::proto::Empty {});
            tokio::pin!(health);
            let answered = loop {
                let left = deadline.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return Err(timeout());
                }
                tokio::select! {
                    res = &mut health => break res.is_ok(),
                    _ = tokio::time::sleep(left.min(Duration::from_millis(50))) => {
                        if !vmm.is_alive() {
                            return Err(dead());
                        }
                    }
                }
            };
            if answered {
                return Ok(guest);
            }
            drop(guest);
            tokio::time::sleep(link.retry_pause()).await;
        }
    }

    fn console_tail(&self, paths: &VmPaths) -> String {
        let mut text = fs::read(paths.console()).unwrap_or_default();
        text.extend(fs::read(paths.vmm_log()).unwrap_or_default());
        text.extend(fs::read(paths.virtiofsd_log()).unwrap_or_default());
        text.extend(fs::read(paths.vsock_log()).unwrap_or_default());
        let tail = &text[text.len().saturating_sub(2000)..];
        String::from_utf8_lossy(tail).trim().to_string()
    }

    /// Check a runtime against what microVMs support and find its built image.
    fn image_for(&self, runtime: &RuntimeSpec) -> Result<GuestImage, DriverError> {
        crate::namespace::validate::check(runtime, &self.config.data_dir)?;
        if runtime.workspace_path.contains(['"', '\\']) {
            return Err(DriverError::InvalidRuntime {
                field: "workspace_path",
                message: "a microVM workspace path cannot contain '\"' or '\\'".into(),
            });
        }
        if runtime.memory < MIN_MEMORY {
            return Err(DriverError::InvalidRuntime {
                field: "memory",
                message: format!(
                    "a microVM needs at least {} MiB (its kernel unpacks the guest's \
                     initramfs into RAM before init runs)",
                    MIN_MEMORY >> 20
                ),
            });
        }
        if let Some(m) = runtime
            .mounts
            .iter()
            .find(|m| !Path::new(&m.source).is_dir())
        {
            return Err(DriverError::InvalidRuntime {
                field: "mounts.source",
                message: format!(
                    "{:?} is not a directory: a microVM shares host directories only \
                     (mount its parent directory, or use isolation namespace)",
                    m.source
                ),
            });
        }
        if !runtime.mounts.is_empty() && !self.config.virtiofsd.is_file() {
            return Err(DriverError::InvalidRuntime {
                field: "mounts",
                message: format!(
                    "host directory mounts in a microVM need {} (apt-get install \
                     qemu-system-common)",
                    self.config.virtiofsd.display()
                ),
            });
        }
        self.images
            .find(&runtime.image)
            .map_err(|message| DriverError::InvalidRuntime {
                field: "image",
                message,
            })
    }

    fn vmm_of(&self, session: &str) -> Option<InitProcess> {
        check_session_id(session).ok()?;
        InitProcess::read(&self.paths(session).pid())
    }

    async fn stop_inner(&self, session: &str) -> Result<(), VmError> {
        check_session_id(session)?;
        let paths = self.paths(session);
        if let Some(vmm) = InitProcess::read(&paths.pid()) {
            // The core has asked the guest to shut down; it unmounts the workspace and
            // powers off, which ends the VMM by itself.
            let waited = Instant::now();
            while vmm.is_alive() && waited.elapsed() < EXIT_GRACE {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if vmm.is_alive() {
                tracing::info!(session, "the VM did not power off; killing its VMM");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(vmm.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let cgroup = SandboxCgroup::new(&paths.cgroup);
        let left = tokio::task::spawn_blocking(move || cgroup.kill_and_remove()).await?;
        if !left.is_empty() {
            tracing::warn!(session, ?left, "cgroup directories left behind");
        }
        let _ = fs::remove_file(&paths.channel);
        for i in 0..berth_api::runtime::defaults::MAX_MOUNTS {
            let _ = fs::remove_file(paths.share_socket(i));
        }
        if paths.vsock_dir.exists() {
            let _ = fs::remove_dir_all(&paths.vsock_dir);
        }
        if paths.dir.exists() {
            fs::remove_dir_all(&paths.dir).map_err(|source| VmError::Prepare {
                path: paths.dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn trim_console(paths: &VmPaths) {
        crate::common::truncate_log(&paths.console(), CONSOLE_LOG_MAX);
    }

    /// Why a VM that is no longer alive stopped, from its console.
    fn exit_reason_of(&self, session: &str) -> &'static str {
        let paths = self.paths(session);
        let console = fs::read(paths.console()).unwrap_or_default();
        let text = String::from_utf8_lossy(&console[console.len().saturating_sub(64 << 10)..]);
        if text.contains("Kernel panic") {
            "guest_kernel_panic"
        } else if text.contains("reboot: Power down") {
            "guest_powered_off"
        } else {
            "vmm_exited"
        }
    }
}

/// The host TSC's rate in kHz (`cpu MHz` of /proc/cpuinfo: close enough for the
/// guest's early calibration).
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz")?.split(':').nth(1))?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

#[async_trait]
impl Driver for MicroVmDriver {
    fn name(&self) -> &'static str {
        "microvm"
    }

    fn validate(&self, runtime: &RuntimeSpec) -> Result<(), DriverError> {
        self.image_for(runtime).map(|_| ())
    }

    async fn preferred(&self, runtime: &RuntimeSpec) -> bool {
        match self.image_for(runtime) {
            Ok(image) => self.resolve_accel(&image).await == Accel::Kvm,
            Err(_) => false,
        }
    }

    async fn start(&self, req: &SandboxRequest) -> Result<Sandbox, DriverError> {
        let image = self.image_for(&req.runtime)?;
        let accel = self.resolve_accel(&image).await;
        match self.start_inner(req, &image, accel).await {
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
        let paths = self.paths(session);
        if !paths.dir.exists() {
            return Ok(None);
        }
        if let Some(vmm) = InitProcess::read(&paths.pid()).filter(InitProcess::is_alive) {
            let link = paths.link();
            if let Ok(guest) = self
                .wait_for_guest(&paths, &link, vmm, ADOPT_DEADLINE)
                .await
            {
                return Ok(Some(Sandbox {
                    guest,
                    init_pid: vmm.pid as u32,
                }));
            }
        }
        self.stop_inner(session)
            .await
            .map_err(|e| io_error("adopt", session, e))?;
        Ok(None)
    }

    async fn is_alive(&self, session_id: &str) -> bool {
        let alive = self.vmm_of(session_id).is_some_and(|v| v.is_alive());
        if alive {
            Self::trim_console(&self.paths(session_id));
        }
        alive
    }

    async fn exit_reason(&self, session_id: &str) -> &'static str {
        self.exit_reason_of(session_id)
    }

    async fn stop(&self, session_id: &str) -> Result<(), DriverError> {
        self.stop_inner(session_id)
            .await
            .map_err(|e| io_error("stop", session_id, e))
    }

    /// The VMM's cgroup: CPU of vCPUs and device emulation, peak host memory.
    async fn stats(&self, session_id: &str) -> Option<SandboxStats> {
        check_session_id(session_id).ok()?;
        let paths = self.paths(session_id);
        if !paths.dir.exists() {
            return None;
        }
        SandboxCgroup::new(&paths.cgroup).stats()
    }

    async fn workspace_bytes(&self, session_id: &str) -> u64 {
        if check_session_id(session_id).is_err() {
            return 0;
        }
        volume::used_bytes(&self.workspace_image(session_id), None)
    }

    async fn delete_workspace(&self, session_id: &str) -> Result<(), DriverError> {
        let op = "delete workspace";
        check_session_id(session_id).map_err(|e| io_error(op, session_id, e))?;
        if self.paths(session_id).dir.exists() {
            return Err(io_error(op, session_id, VmError::Running));
        }
        volume::delete(&self.workspace_image(session_id)).map_err(|e| io_error(op, session_id, e))
    }

    async fn leftovers(&self) -> Vec<String> {
        crate::common::session_dirs(&self.vm_dir())
    }

    fn workspace_image(&self, session_id: &str) -> PathBuf {
        MicroVmDriver::workspace_image(self, session_id)
    }
}

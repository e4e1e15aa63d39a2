//! How the host reaches a microVM's guest agent: a virtio-serial port (works with any
//! QEMU), or vsock — through the host kernel's vhost-vsock where `/dev/vhost-vsock`
//! exists, or through a vhost-user daemon (`vhost-device-vsock`) per VM. vsock gives
//! real independent connections and clean hang-ups; the serial port needs the
//! reconnect care described in `crates/berth-guest/src/agent/vm/README.md`.
//!
//! Measured on this machine (TCG, no /dev/vhost-vsock): the vhost-user daemon works
//! with QEMU 7.2 and the guest's AF_VSOCK listener, but moves bulk data several times
//! slower than the serial port, so `auto` never picks it; it is there for hosts
//! without vhost-vsock that want vsock, and so that the vsock guest path is tested here.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_guest::client::Guest;

/// The guest agent's vsock port (`berth.channel=vsock:<port>`).
pub const GUEST_PORT: u32 = 1024;
/// rust-vmm's vhost-user vsock daemon (no Debian package: `cargo install
/// vhost-device-vsock`), found on `PATH` unless configured.
pub const VHOST_USER_VSOCK_DAEMON: &str = "vhost-device-vsock";
/// How long the daemon may take to create its vhost-user socket.
const DAEMON_READY: Duration = Duration::from_secs(10);

/// The channel the operator chose (`berth server --microvm-channel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// A named virtio-serial port, QEMU's chardev unix socket on the host.
    Serial,
    /// vsock through the host kernel (`-device vhost-vsock-device,guest-cid=N`).
    KernelVsock,
    /// vsock through `daemon` (rust-vmm's `vhost-device-vsock`), one per VM, running as
    /// the session's unprivileged uid; the host connects to its "hybrid vsock" socket.
    VhostUserVsock { daemon: PathBuf },
}

impl Channel {
    /// `auto`: kernel vsock where `/dev/vhost-vsock` opens, else the serial port.
    pub fn detect() -> Channel {
        if kernel_vsock_available() {
            Channel::KernelVsock
        } else {
            Channel::Serial
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Channel::Serial => "virtio-serial",
            Channel::KernelVsock => "vsock (vhost-vsock)",
            Channel::VhostUserVsock { .. } => "vsock (vhost-user)",
        }
    }
}

pub fn kernel_vsock_available() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-vsock")
        .is_ok()
}

/// The daemon binary: `path` when given, else `vhost-device-vsock` on `PATH`.
pub fn find_daemon(path: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = path {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|dirs| {
        std::env::split_paths(&dirs)
            .map(|d| d.join(VHOST_USER_VSOCK_DAEMON))
            .find(|p| p.is_file())
    })
}

/// The channel one VM uses, as recorded in `vm/<id>/channel` so that a restarted server
/// reconnects the same way even if its own choice changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// QEMU's chardev socket of the serial port.
    Serial(PathBuf),
    /// Kernel vsock to this guest CID.
    Kernel { cid: u32 },
    /// The daemon's hybrid-vsock socket.
    Hybrid(PathBuf),
}

impl Link {
    pub fn record(&self) -> String {
        match self {
            Link::Serial(_) => "serial\n".into(),
            Link::Kernel { cid } => format!("vsock {cid}\n"),
            Link::Hybrid(_) => "vhost-user-vsock\n".into(),
        }
    }

    /// Read back a record; `serial` and `hybrid` are the sockets this VM's paths use.
    pub fn parse(text: &str, serial: &Path, hybrid: &Path) -> Option<Link> {
        let text = text.trim();
        match text.split_once(' ') {
            None if text == "serial" => Some(Link::Serial(serial.into())),
            None if text == "vhost-user-vsock" => Some(Link::Hybrid(hybrid.into())),
            Some(("vsock", cid)) => cid.parse().ok().map(|cid| Link::Kernel { cid }),
            _ => None,
        }
    }

    /// One connection attempt. `None`: not there yet (socket missing, nobody
    /// listening), try again.
    pub async fn connect(&self) -> Option<Guest> {
        match self {
            Link::Serial(path) => {
                if !path.exists() {
                    return None;
                }
                berth_guest::client::connect_unix(path).await.ok()
            }
            Link::Hybrid(path) => {
                if !path.exists() {
                    return None;
                }
                berth_guest::client::connect_hybrid_vsock(path, GUEST_PORT)
                    .await
                    .ok()
            }
            Link::Kernel { cid } => berth_guest::client::connect_vsock(*cid, GUEST_PORT)
                .await
                .ok(),
        }
    }

    /// Pause after a connection that reached the guest but failed: on the serial port
    /// longer than the guest's hang-up detection (250 ms) so the next one starts
    /// clean; vsock connections are independent.
    pub fn retry_pause(&self) -> Duration {
        match self {
            Link::Serial(_) => Duration::from_millis(300),
            _ => Duration::from_millis(50),
        }
    }
}

/// A guest CID for kernel vsock: host-wide unique while the VM runs (QEMU fails to start
/// on a taken one); 3 and up, below the reserved `u32::MAX`.
pub fn guest_cid(server_and_session: &[u8]) -> u32 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(server_and_session);
    3 + u32::from_le_bytes([d[0], d[1], d[2], d[3]]) % 0x7fff_0000
}

/// Start the vhost-user vsock daemon for one VM in `dir` (created here, owned by
/// `uid`, 0700), as `uid`/`uid` with no supplementary groups, in its own process group,
/// and wait until its vhost-user socket `dir/vu` exists. Returns its pid.
pub async fn spawn_daemon(daemon: &Path, dir: &Path, uid: u32, log: &fs::File) -> io::Result<u32> {
    if let Some(parent) = dir.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)?;
        // The daemon runs unprivileged: it must get through to its own dir.
        fs::set_permissions(parent, fs::Permissions::from_mode(0o711))?;
    }
    let _ = fs::remove_dir_all(dir);
    // Its sockets live here: only its own uid (and root: QEMU, the server) get in.
    fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
    let (vu, hv) = (dir.join("vu"), dir.join("hv"));
    let mut cmd = tokio::process::Command::new(daemon);
    cmd.arg("--guest-cid")
        .arg("3")
        .arg("--socket")
        .arg(&vu)
        .arg("--uds-path")
        .arg(&hv)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        // std drops the supplementary groups when root sets a uid.
        .uid(uid)
        .gid(uid)
        .process_group(0)
        // It logs a harmless warning per closed connection otherwise.
        .env("RUST_LOG", "error");
    let mut child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("vhost-device-vsock exited at once"))?;
    let started = Instant::now();
    while !vu.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(io::Error::other(format!(
                "vhost-device-vsock exited ({status}) before creating its socket"
            )));
        }
        if started.elapsed() > DAEMON_READY {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("vhost-device-vsock did not create {} in time", vu.display()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // tokio reaps it once it exits; the VM's cgroup is what ends it.
    drop(child);
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_round_trip_through_their_record() {
        let (s, h) = (Path::new("/s"), Path::new("/h"));
        for link in [
            Link::Serial(s.into()),
            Link::Hybrid(h.into()),
            Link::Kernel { cid: 77 },
        ] {
            assert_eq!(Link::parse(&link.record(), s, h), Some(link));
        }
        assert_eq!(Link::parse("vsock x", s, h), None);
        assert_eq!(Link::parse("", s, h), None);
    }

    #[test]
    fn guest_cids_avoid_the_reserved_ones() {
        for i in 0..1000u32 {
            let cid = guest_cid(&i.to_le_bytes());
            assert!((3..u32::MAX).contains(&cid), "{cid}");
        }
        assert_eq!(guest_cid(b"a"), guest_cid(b"a"));
    }
}

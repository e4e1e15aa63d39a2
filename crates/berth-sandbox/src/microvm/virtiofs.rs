//! A runtime's host directory mounts in a microVM: one `virtiofsd` per mount, serving
//! the directory to the guest over vhost-user (`-device vhost-user-fs-device`).
//!
//! The daemon runs in a user namespace mapped like the session's namespace sandbox
//! (guest root = host uid `root_id`, 65 536 ids), so a hostile guest gets on the host
//! exactly what that uid range may do there: files it creates belong to the mapped
//! uid, never to host root, and it cannot plant a setuid-root binary in a writable
//! share. Read-only mounts are made read-only in the daemon's own mount namespace
//! (the guest's `ro` is only a courtesy). `virtiofsd` adds its own sandbox on top
//! (pivot_root into the directory, pid and net namespaces, seccomp).
//!
//! Why a `pre_exec` hook and a helper thread: the uid map of a new user namespace can
//! only be written from outside it, by a process holding CAP_SETUID in the parent
//! namespace, after the child has unshared and before it execs. That hook is why this
//! module allows `unsafe`: every block is a raw syscall, each with its SAFETY note.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where Debian's `qemu-system-common` (bookworm) installs the daemon.
pub const DEFAULT_VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

/// The fd the listening socket is handed over as (`--fd=3`).
const LISTEN_FD: i32 = 3;

/// `struct mount_attr` of `mount_setattr(2)` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// One host directory to share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The virtio-fs tag the guest mounts it by.
    pub tag: String,
    /// The host directory (canonical).
    pub source: PathBuf,
    /// Where the guest mounts it.
    pub target: String,
    pub read_only: bool,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
}

/// The host ids guest ids 0..`count` map to.
#[derive(Debug, Clone, Copy)]
pub struct IdMap {
    pub root_id: u32,
    pub count: u32,
}

/// Start `virtiofsd` for `share`: bind its socket, then spawn the daemon in a fresh
/// user and mount namespace. Returns its pid. The socket is listening when this
/// returns, so QEMU can connect at once. Needs a tokio runtime (it reaps the daemon).
pub fn spawn(virtiofsd: &Path, share: &Share, ids: IdMap, log: &File) -> io::Result<u32> {
    let _ = std::fs::remove_file(&share.socket);
    let listener = UnixListener::bind(&share.socket)?;
    let source = c_path(&share.source)?;
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;

    let mut cmd = Command::new(virtiofsd);
    cmd.arg(format!("--fd={LISTEN_FD}"))
        .arg("-o")
        .arg(source_option(&share.source))
        // Leave RLIMIT_NOFILE alone: raising it needs privileges outside the namespace.
        .arg("--rlimit-nofile=0")
        .args(["-o", "log_level=warn"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        // Like the VMM: out of reach of a Ctrl+C at the server's terminal, and alive
        // across a server restart, which re-adopts the VM.
        .process_group(0);
    let read_only = share.read_only;
    let (listen_fd, ready_w_fd, go_r_fd) =
        (listener.as_raw_fd(), ready_w.as_raw_fd(), go_r.as_raw_fd());
    // SAFETY: between fork and exec the hook only makes raw syscalls on memory prepared
    // before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || in_child(listen_fd, ready_w_fd, go_r_fd, &source, read_only));
    }

    // tokio reaps the daemon once it exits (the driver never waits for it: the VM's
    // cgroup is what ends it).
    let mut cmd = tokio::process::Command::from(cmd);
    // `spawn` returns only once the child has exec'd, which it does only after the map
    // is written: the map is written from another thread meanwhile.
    let mapper = std::thread::spawn(move || map_ids(ready_r, go_w, ids));
    let spawned = cmd.spawn();
    // The child's ends, held by the hook: closing them lets the mapper see EOF should
    // the child have died before it asked.
    drop(cmd);
    drop((ready_w, go_r));
    let mapped = mapper
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the uid-map thread panicked")));
    let child = match (spawned, mapped) {
        (Ok(child), _) => child,
        (Err(e), Err(map)) => {
            return Err(io::Error::new(e.kind(), format!("{e} (uid map: {map})")));
        }
        (Err(e), Ok(())) => return Err(e),
    };
    // The daemon has its own copy of the socket; ours closes with `listener`.
    drop(listener);
    child
        .id()
        .ok_or_else(|| io::Error::other("virtiofsd exited at once"))
}

/// `-o source=DIR`: virtiofsd splits `-o` values on commas, which it reads back as
/// `\,` — so escape them (and backslashes).
fn source_option(source: &Path) -> String {
    let text = source.to_string_lossy();
    format!("source={}", text.replace('\\', "\\\\").replace(',', "\\,"))
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Parent side: read the child's pid, write its uid and gid maps, let it go on.
/// Dropping `go` without writing tells the child to give up.
fn map_ids(ready: OwnedFd, go: OwnedFd, ids: IdMap) -> io::Result<()> {
    let mut pid = [0u8; 4];
    File::from(ready).read_exact(&mut pid).map_err(|e| {
        io::Error::new(
            e.kind(),
            "virtiofsd's child ended before its uid map was set",
        )
    })?;
    let pid = i32::from_ne_bytes(pid);
    let map = format!("0 {} {}\n", ids.root_id, ids.count);
    std::fs::write(format!("/proc/{pid}/uid_map"), &map)?;
    std::fs::write(format!("/proc/{pid}/gid_map"), &map)?;
    File::from(go).write_all(b"g")
}

/// Child side, after fork: new user and mount namespaces, wait for the map, become
/// the namespace's root with no host groups, make a read-only share read-only, and
/// hand the socket over as fd 3.
fn in_child(
    listen_fd: i32,
    ready: i32,
    go: i32,
    source: &CString,
    read_only: bool,
) -> io::Result<()> {
    fn check(ret: libc::c_int) -> io::Result<()> {
        if ret == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    // SAFETY: raw syscalls only, with pointers to live buffers (NUL-terminated paths,
    // `pid`, `byte`, `attr`) that outlive each call.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS))?;
        let pid = libc::getpid().to_ne_bytes();
        if libc::write(ready, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
            return Err(io::Error::last_os_error());
        }
        let mut byte = 0u8;
        if libc::read(go, (&mut byte as *mut u8).cast(), 1) != 1 {
            return Err(io::Error::other("no uid map"));
        }
        // Host root's supplementary groups (gid 0 among them) must not come along.
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresgid(0, 0, 0))?;
        check(libc::setresuid(0, 0, 0))?;
        let root = c"/";
        check(libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        if read_only {
            check(libc::mount(
                source.as_ptr(),
                source.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            // Read-only on every mount of the tree, submounts included; `mount_setattr`
            // also leaves the locked flags (nosuid, nodev, …) of the original alone.
            let attr = MountAttr {
                attr_set: MOUNT_ATTR_RDONLY,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            };
            let ret = libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                source.as_ptr(),
                libc::AT_RECURSIVE as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            );
            check(ret as libc::c_int)?;
        }
        if listen_fd == LISTEN_FD {
            // dup2 onto itself would keep the close-on-exec flag.
            check(libc::fcntl(listen_fd, libc::F_SETFD, 0))?;
        } else {
            check(libc::dup2(listen_fd, LISTEN_FD))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_in_the_source_are_escaped() {
        assert_eq!(
            source_option(Path::new("/srv/a,b\\c")),
            "source=/srv/a\\,b\\\\c"
        );
    }
}

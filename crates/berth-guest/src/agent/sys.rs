//! The few raw system calls the agent needs that have no safe wrapper: bringing an
//! interface up (ioctl), starting a child in a new session or in a cgroup (pre_exec).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// What [`interface_up`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LinkChange {
    AlreadyUp,
    BroughtUp,
}

/// Set IFF_UP on the interface `name` (e.g. `lo`) with SIOCGIFFLAGS/SIOCSIFFLAGS.
pub(crate) fn interface_up(name: &str) -> io::Result<LinkChange> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: `ifreq` is a plain C struct of integers, arrays and a union of plain
    // data; all-zero bytes are a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = name.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `sock` is an open socket and `req` a valid, NUL-terminated `ifreq` that
    // lives across the call; SIOCGIFFLAGS only writes `ifr_flags` inside it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the union holds `ifru_flags`.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::IFF_UP as libc::c_short;
    if flags & up != 0 {
        return Ok(LinkChange::AlreadyUp);
    }
    req.ifr_ifru.ifru_flags = flags | up | libc::IFF_RUNNING as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(LinkChange::BroughtUp)
}

/// Make the child the leader of a new session (and so of a new process group whose id
/// is its pid): signals and kills can then address everything it starts at once.
pub(crate) fn new_session(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            Ok(())
        });
    }
}

/// Move the child into a cgroup before it execs, so that everything it starts is
/// counted there from the first fork on. `procs` is that cgroup's `cgroup.procs`, open
/// for writing and open for as long as `cmd` may be spawned; writing `0` to it moves
/// the writer.
pub(crate) fn join_cgroup(cmd: &mut Command, procs: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and only calls write(2)
    // (async-signal-safe) on an inherited descriptor with a static buffer; it allocates
    // nothing and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Start the child as the leader of a new session whose controlling terminal is its
/// stdin (the PTY slave): the line discipline then turns ^C into SIGINT for the
/// foreground process group, and closing the master hangs the session up.
pub(crate) fn pty_session(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2)
    // and ioctl(2) on fd 0, both async-signal-safe; it touches no memory shared with the
    // parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Set a terminal's window size (TIOCSWINSZ); the kernel sends SIGWINCH to its
/// foreground process group.
pub(crate) fn set_window_size(fd: &impl AsRawFd, width: u16, height: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is an open file descriptor and `size` a valid `winsize` that lives
    // across the call; TIOCSWINSZ only reads it.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Hand a PTY master (already non-blocking) to tokio's reactor.
pub(crate) fn async_pty(
    master: nix::pty::PtyMaster,
) -> io::Result<tokio::io::unix::AsyncFd<nix::pty::PtyMaster>> {
    // SAFETY: `PtyMaster` owns its descriptor, closes it only when dropped and always
    // returns the same one from `as_raw_fd`, so the fd stays open and unchanged for as
    // long as the `AsyncFd` that owns the `PtyMaster` lives.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(master) }?)
}

/// An epoll instance as tokio's reactor sees it: readable while it has events queued.
pub(crate) struct EpollFd(nix::sys::epoll::Epoll);

impl EpollFd {
    pub(crate) fn epoll(&self) -> &nix::sys::epoll::Epoll {
        &self.0
    }
}

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0 .0.as_raw_fd()
    }
}

/// Hand an epoll instance to tokio's reactor (nested epoll: ours reports edges of the
/// descriptors it watches, tokio's reports that ours has some).
pub(crate) fn async_epoll(
    epoll: nix::sys::epoll::Epoll,
) -> io::Result<tokio::io::unix::AsyncFd<EpollFd>> {
    // SAFETY: `EpollFd` owns the epoll descriptor (the `OwnedFd` in `Epoll`, which
    // nothing outside this module can reach or replace), closes it only when dropped and
    // always returns the same one from `as_raw_fd`, so the fd stays open and unchanged
    // for as long as the `AsyncFd` that owns the `EpollFd` lives.
    Ok(unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            EpollFd(epoll),
            tokio::io::Interest::READABLE,
        )
    }?)
}

//! Tools the build runs die with it: a killed `berth image build` must not leave an
//! orphaned `mkfs.ext4` writing gigabytes into a build dir the next build deletes.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Have the kernel SIGKILL the child when the thread that spawned it dies (which a
/// SIGKILL of the whole build includes).
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec, and only makes two
    // async-signal-safe system calls (prctl, getppid), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died before prctl: then nobody will signal us.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("parent died"));
            }
            Ok(())
        })
    }
}

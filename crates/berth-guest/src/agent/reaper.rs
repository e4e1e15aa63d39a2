//! The one place that waits for children.
//!
//! As PID 1 (or a child subreaper) the agent inherits every orphan in the sandbox and
//! must reap them all, so it calls `waitpid(-1)`; any other waiter (tokio::process,
//! `std::process::Child::wait`) would race it for exit statuses. Instead, children the
//! agent spawns are registered here (pid → oneshot) and this reaper dispatches their
//! statuses; unregistered pids (orphans, grandchildren) are reaped and forgotten.
//!
//! Spawning and reaping take the same lock, so a child that exits before it is
//! registered cannot be reaped until the spawner has registered it. That lock also
//! keeps the reaper away while `std::process::Command::spawn` itself waits for a child
//! whose exec failed.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitStatus {
    Code(i32),
    Signal(i32),
}

type Waiters = HashMap<i32, oneshot::Sender<ExitStatus>>;

#[derive(Debug, Default)]
pub(crate) struct Reaper {
    waiters: Mutex<Waiters>,
}

impl Reaper {
    /// Install the SIGCHLD handler and start reaping. Must run inside a tokio runtime,
    /// and at most once per process.
    pub(crate) fn start() -> io::Result<Arc<Reaper>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Reaper::default());
        let task = reaper.clone();
        tokio::spawn(async move {
            // Children that exited before the handler was installed sent no signal we
            // could see: sweep once up front.
            task.reap();
            while sigchld.recv().await.is_some() {
                task.reap();
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // A panic while holding this lock leaves the map consistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawn `cmd` and register it; the receiver yields its exit status exactly once.
    pub(crate) fn spawn(
        &self,
        cmd: &mut Command,
    ) -> io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let mut waiters = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Collect every child that has exited, without blocking.
    fn reap(&self) {
        let mut waiters = self.lock();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    tracing::warn!("waitpid failed: {err}");
                    break;
                }
                Ok(WaitStatus::Exited(pid, code)) => {
                    dispatch(&mut waiters, pid, ExitStatus::Code(code));
                }
                Ok(WaitStatus::Signaled(pid, sig, _core)) => {
                    dispatch(&mut waiters, pid, ExitStatus::Signal(sig as i32));
                }
                // Stop/continue reports need WUNTRACED/WCONTINUED, which we never ask for.
                Ok(_) => {}
            }
        }
    }
}

fn dispatch(waiters: &mut Waiters, pid: Pid, status: ExitStatus) {
    match waiters.remove(&pid.as_raw()) {
        // The exec call may be gone (cancelled); nobody to tell then.
        Some(tx) => {
            let _ = tx.send(status);
        }
        None => tracing::debug!(pid = pid.as_raw(), ?status, "reaped orphan"),
    }
}

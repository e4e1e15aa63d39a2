//! `Exec`: run one process, stream its output, report how it ended.
//!
//! Tasks per call: one pump per output pipe (stdout, stderr), one reader of the input
//! stream (stdin, signals), and the driver that waits for the exit status and the
//! timeout. All output goes through one small bounded channel, so a slow host stalls
//! the pumps, the pipes fill up and the process blocks in write(2): memory stays
//! bounded however fast the process writes.

use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures::Stream;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::reaper::ExitStatus;
use super::{check_path, sys, Agent};
use crate::proto::{exec_input, exec_output, ExecInput, ExecOutput, ExecStart, Exited, Started};

/// Bytes read from a pipe at most per output message: the pipe's whole capacity, so
/// that under backpressure the pieces grow (fewer messages, frames and wakeups per GB on
/// every hop) while a lone keystroke still leaves at once.
pub(crate) const CHUNK: usize = 256 * 1024;
/// Output pipes are enlarged to this size where the kernel allows: fewer wakeups on
/// bulk output (1 GiB through Exec: 0.75 s CPU with 64 KiB pipes, 0.69 s with 256 KiB,
/// 0.65 s with 1 MiB). Pipe pages count against the sandbox user's
/// `fs.pipe-user-pages-soft` budget (64 MiB by default), past which *every* new pipe of
/// that user shrinks to two pages; 256 KiB keeps two pipes per command well inside it.
const PIPE_SIZE: i32 = 256 * 1024;
/// Output messages queued towards the host before the pumps stop reading.
const OUTPUT_QUEUE: usize = 4;
/// How long to keep reading after the main process exited while something it started
/// in the background still holds the pipes open.
const EXIT_GRACE: Duration = Duration::from_millis(200);

pub(crate) type OutputStream = Pin<Box<dyn Stream<Item = Result<ExecOutput, Status>> + Send>>;
type Output = mpsc::Sender<Result<ExecOutput, Status>>;

/// Validate the start message, spawn the process and return its output stream.
pub(crate) async fn exec(
    agent: Arc<Agent>,
    mut input: Streaming<ExecInput>,
) -> Result<OutputStream, Status> {
    let start = match input.message().await? {
        Some(ExecInput {
            kind: Some(exec_input::Kind::Start(start)),
        }) => start,
        _ => {
            return Err(Status::invalid_argument(
                "the first exec message must be `start`",
            ))
        }
    };
    let (mut cmd, has_stdin) = command(&start)?;
    agent.confine(&mut cmd);
    let (mut child, exit) = agent.reaper.spawn(&mut cmd).map_err(|err| {
        let argv0 = &start.argv[0];
        let msg = format!("cannot run {argv0}: {err}");
        match err.kind() {
            std::io::ErrorKind::NotFound => Status::not_found(msg),
            std::io::ErrorKind::PermissionDenied => Status::permission_denied(msg),
            _ => Status::internal(msg),
        }
    })?;
    let pid = child.id() as i32;
    agent.track_group(pid);
    tracing::debug!(pid, argv = ?start.argv, "exec started");

    let pipes = (
        child.stdin.take().map(OwnedFd::from),
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    );
    // `child` is dropped without waiting: the reaper owns its exit status.
    drop(child);
    let (stdin, stdout, stderr) = match pipes {
        (stdin, Some(stdout), Some(stderr)) => (stdin.filter(|_| has_stdin), stdout, stderr),
        _ => return Err(Status::internal("child pipes missing")),
    };
    let pipes = open_pipes(stdin, stdout, stderr).map_err(|err| {
        kill_group(pid);
        Status::internal(format!("cannot set up pipes: {err}"))
    })?;

    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    let timeout = (start.timeout_ms > 0).then(|| Duration::from_millis(start.timeout_ms));
    tokio::spawn(drive(agent, pid, exit, pipes, input, tx, timeout));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

fn command(start: &ExecStart) -> Result<(Command, bool), Status> {
    let Some(argv0) = start.argv.first() else {
        return Err(Status::invalid_argument("argv must not be empty"));
    };
    let cwd = check_cwd(if start.cwd.is_empty() {
        "/"
    } else {
        start.cwd.as_str()
    })?;
    let mut cmd = Command::new(argv0);
    cmd.args(&start.argv[1..])
        .current_dir(cwd)
        .envs(&start.env)
        .stdin(if start.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    sys::new_session(&mut cmd);
    Ok((cmd, start.stdin))
}

/// A working directory must be absolute, without `..`, and an existing directory.
pub(crate) fn check_cwd(cwd: &str) -> Result<&std::path::Path, Status> {
    let cwd = check_path(cwd)?;
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => Ok(cwd),
        Ok(_) => Err(Status::invalid_argument(format!(
            "working directory {} is not a directory",
            cwd.display()
        ))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(Status::not_found(format!(
            "working directory {} does not exist",
            cwd.display()
        ))),
        Err(err) => Err(Status::failed_precondition(format!(
            "working directory {}: {err}",
            cwd.display()
        ))),
    }
}

struct Pipes {
    stdin: Option<pipe::Sender>,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    /// Size of the output pipes' buffers: what the process can have written but we not
    /// yet read when it exits.
    capacity: usize,
}

fn open_pipes(stdin: Option<OwnedFd>, stdout: OwnedFd, stderr: OwnedFd) -> std::io::Result<Pipes> {
    let mut capacity = 0;
    for fd in [&stdout, &stderr] {
        // Best effort: unprivileged users are capped by /proc/sys/fs/pipe-max-size.
        let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        let size = fcntl(fd.as_raw_fd(), FcntlArg::F_GETPIPE_SZ).unwrap_or(PIPE_SIZE);
        capacity = capacity.max(size as usize);
    }
    Ok(Pipes {
        stdin: stdin.map(pipe::Sender::from_owned_fd).transpose()?,
        stdout: pipe::Receiver::from_owned_fd(stdout)?,
        stderr: pipe::Receiver::from_owned_fd(stderr)?,
        capacity,
    })
}

/// SIGKILL a process group; it may already be gone.
pub(crate) fn kill_group(pgid: i32) {
    signal_group(pgid, Signal::SIGKILL);
}

fn signal_group(pgid: i32, sig: Signal) {
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(err) => tracing::warn!(pgid, "cannot send {sig} to process group: {err}"),
    }
}

async fn drive(
    agent: Arc<Agent>,
    pid: i32,
    mut exit: oneshot::Receiver<ExitStatus>,
    pipes: Pipes,
    input: Streaming<ExecInput>,
    tx: Output,
    timeout: Option<Duration>,
) {
    let started = exec_output::Kind::Started(Started { pid: pid as u32 });
    if tx
        .send(Ok(ExecOutput {
            kind: Some(started),
        }))
        .await
        .is_err()
    {
        tracing::debug!(pid, "exec cancelled before start was sent");
        kill_group(pid);
        return;
    }
    let (exited_tx, exited_rx) = watch::channel(None);
    let stdout = tokio::spawn(pump(
        pipes.stdout,
        exec_output::Kind::Stdout,
        tx.clone(),
        exited_rx.clone(),
        pipes.capacity,
    ));
    let stderr = tokio::spawn(pump(
        pipes.stderr,
        exec_output::Kind::Stderr,
        tx.clone(),
        exited_rx,
        pipes.capacity,
    ));
    let input = tokio::spawn(read_input(input, pipes.stdin, pid));

    let deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    let status = loop {
        tokio::select! {
            status = &mut exit => match status {
                Ok(status) => break status,
                Err(_) => {
                    // The reaper never drops a registered sender without sending.
                    tracing::error!(pid, "exit status lost");
                    input.abort();
                    return;
                }
            },
            () = sleep_until(deadline), if !timed_out => {
                tracing::debug!(pid, "exec timed out; killing its process group");
                kill_group(pid);
                timed_out = true;
            }
            () = tx.closed() => {
                tracing::debug!(pid, "exec cancelled; killing its process group");
                kill_group(pid);
                input.abort();
                stdout.abort();
                stderr.abort();
                agent.untrack_group_if_empty(pid);
                return;
            }
        }
    };
    let _ = exited_tx.send(Some(Instant::now()));
    // Pumps end at EOF, when the host is gone, or after the grace period.
    let _ = stdout.await;
    let _ = stderr.await;
    input.abort();
    agent.untrack_group_if_empty(pid);
    let (code, signal) = match status {
        ExitStatus::Code(code) => (Some(code), None),
        ExitStatus::Signal(sig) => (None, Some(sig)),
    };
    tracing::debug!(pid, ?status, timed_out, "exec exited");
    let exited = exec_output::Kind::Exited(Exited {
        code,
        signal,
        timed_out,
    });
    let _ = tx.send(Ok(ExecOutput { kind: Some(exited) })).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Copy one pipe into output messages until EOF, the host going away, or — once the
/// main process exited — the grace period running out while something else still holds
/// the pipe open.
async fn pump(
    mut pipe: pipe::Receiver,
    kind: fn(bytes::Bytes) -> exec_output::Kind,
    tx: Output,
    mut exited: watch::Receiver<Option<Instant>>,
    capacity: usize,
) {
    // Reads land in one large buffer that chunks are split off; its storage is reused
    // once the chunks sent from it have been encoded and dropped.
    let mut buf = BytesMut::with_capacity(4 * CHUNK);
    let mut exit_at: Option<Instant> = None;
    // Bytes read since the exit became known. Everything the main process wrote is
    // out of the pipe once `capacity` bytes have been read after its exit.
    let mut after_exit = 0usize;
    loop {
        if buf.capacity() < CHUNK {
            buf.reserve(CHUNK);
        }
        let read = {
            let mut limited = (&mut buf).limit(CHUNK);
            match exit_at {
                None => {
                    tokio::select! {
                        res = pipe.read_buf(&mut limited) => res,
                        changed = exited.changed() => {
                            exit_at = match changed {
                                Ok(()) => *exited.borrow_and_update(),
                                Err(_) => Some(Instant::now()),
                            };
                            continue;
                        }
                    }
                }
                Some(at) => {
                    let now = Instant::now();
                    let deadline = at + EXIT_GRACE;
                    if now >= deadline && after_exit >= capacity {
                        break;
                    }
                    // After the deadline this only takes what is already in the pipe.
                    let wait = deadline.saturating_duration_since(now);
                    match tokio::time::timeout(wait, pipe.read_buf(&mut limited)).await {
                        Ok(res) => res,
                        Err(_) => break,
                    }
                }
            }
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                if exit_at.is_some() {
                    after_exit += n;
                }
                let chunk = buf.split().freeze();
                let msg = ExecOutput {
                    kind: Some(kind(chunk)),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
            Err(err) => {
                tracing::warn!("reading process output failed: {err}");
                break;
            }
        }
    }
}

/// Apply the host's input messages. A clean end of the input stream closes stdin; an
/// error (the host cancelled the call) kills the process group.
async fn read_input(mut input: Streaming<ExecInput>, mut stdin: Option<pipe::Sender>, pid: i32) {
    loop {
        let msg = match input.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(
                    pid,
                    "exec input failed ({status}); killing its process group"
                );
                kill_group(pid);
                return;
            }
        };
        match msg.kind {
            Some(exec_input::Kind::Stdin(data)) => match stdin.as_mut() {
                Some(pipe) => {
                    if let Err(err) = pipe.write_all(&data).await {
                        // The process closed its stdin or exited; drop the rest.
                        tracing::debug!(pid, "stdin closed: {err}");
                        stdin = None;
                    }
                }
                None => tracing::debug!(pid, "stdin bytes ignored: stdin is not open"),
            },
            Some(exec_input::Kind::CloseStdin(_)) => stdin = None,
            Some(exec_input::Kind::Signal(n)) => match Signal::try_from(n) {
                Ok(sig) => signal_group(pid, sig),
                Err(_) => tracing::warn!(pid, "ignoring unknown signal number {n}"),
            },
            Some(exec_input::Kind::Start(_)) | None => {
                tracing::debug!(pid, "ignoring unexpected exec input")
            }
        }
    }
}

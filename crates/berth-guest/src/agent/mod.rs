//! The guest agent process: `berth guest --listen SOCKET`, or `/init` of a microVM.
//!
//! Runs as PID 1 of a sandbox (or as an ordinary process in development and tests) and
//! serves the guest protocol on a unix socket, or on a virtio-serial port in a VM
//! (`vm/`). See `README.md` at the crate root for the protocol decisions, exec semantics
//! and the reaper design.

mod exec;
mod files;
mod reaper;
mod shell;
mod sys;
mod tunnel;
pub mod vm;

pub use shell::{CLIENT_QUEUE, RING};

use std::collections::HashSet;
use std::ffi::OsString;
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::Stream;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::guest_server::{Guest, GuestServer};
use crate::proto::{
    Empty, ExecInput, FileInfo, HealthResponse, ListDirResponse, PathRequest, ReadFileRequest,
    ShellInfo, ShellInput, ShellKillRequest, ShellListResponse, ShellOpenRequest, TunnelInput,
    WriteFileInput, WriteFileResponse,
};
use reaper::Reaper;

/// HTTP/2 receive window per stream: large enough that stdin and file uploads are not
/// throttled by round trips, small enough to bound what one stream can make the agent
/// buffer (e.g. stdin for a process that does not read it).
const STREAM_WINDOW: u32 = 1 << 20;
/// Receive window for the whole connection: (almost) unlimited, so that a stalled stream
/// cannot block the others; memory is bounded per stream by `STREAM_WINDOW`.
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// How long `Shutdown` waits after replying before the process exits.
const SHUTDOWN_DELAY: Duration = Duration::from_millis(100);

const USAGE: &str = "usage: berth guest --listen <socket path>";

/// What `berth guest` is told on its command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    /// The unix socket to serve on.
    pub listen: PathBuf,
}

/// `berth guest --listen SOCKET`.
pub fn cli_main(args: Vec<OsString>) -> anyhow::Result<()> {
    let options = parse_args(args)?;
    init_tracing(true);
    block_on(run(&options))
}

/// Run the agent's top-level future to completion on the runtime it is designed for.
fn block_on(agent: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    // One thread: the agent's work is I/O multiplexing, a single thread measured as fast
    // as a multi-threaded runtime on the bulk-output path and saves cross-thread wakeups
    // and memory; filesystem work runs on tokio's blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(agent);
    // Blocking file tasks may still be parked on a host that went away; do not wait.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

fn parse_args(args: Vec<OsString>) -> anyhow::Result<Options> {
    let mut listen = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg_str = arg.to_string_lossy();
        let (slot, value) = match arg_str.split_once('=') {
            Some(("--listen", value)) => (&mut listen, Some(PathBuf::from(value))),
            _ if arg_str == "--listen" => (&mut listen, None),
            _ if arg_str == "--help" || arg_str == "-h" => anyhow::bail!("{USAGE}"),
            _ => anyhow::bail!("unexpected argument {arg_str:?}\n{USAGE}"),
        };
        let value = match value {
            Some(value) => value,
            None => PathBuf::from(
                args.next()
                    .with_context(|| format!("{arg_str} needs a value\n{USAGE}"))?,
            ),
        };
        *slot = Some(value);
    }
    Ok(Options {
        listen: listen.with_context(|| format!("--listen is required\n{USAGE}"))?,
    })
}

/// `ansi`: colours, unless the log goes to a VM's serial console, which the host keeps
/// as a plain text file.
fn init_tracing(ansi: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .compact()
        .try_init();
}

/// Prepare the process (network, capabilities, reaping) and serve until `Shutdown` or
/// SIGTERM.
pub async fn run(options: &Options) -> anyhow::Result<()> {
    let listen = options.listen.as_path();
    let pid = std::process::id();
    setup_process(pid == 1);
    let reaper = Reaper::start().context("cannot install the SIGCHLD handler")?;
    let listener = bind(listen)?;
    tracing::info!(pid, socket = %listen.display(), "guest agent listening");
    // A namespace sandbox's commands are already in the container's cgroup.
    serve(reaper, None, UnixListenerStream::new(listener)).await?;
    let _ = std::fs::remove_file(listen);
    Ok(())
}

/// Serve the guest protocol on each connection `incoming` yields until `Shutdown` or
/// SIGTERM (after which every command is dead and the filesystems are synced).
/// `cgroup`: `cgroup.procs` of the cgroup every command and shell must start in.
async fn serve<I, IO, IE>(
    reaper: Arc<Reaper>,
    cgroup: Option<OwnedFd>,
    incoming: I,
) -> anyhow::Result<()>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let agent = Arc::new(Agent {
        reaper,
        cgroup,
        groups: Mutex::new(HashSet::new()),
        shells: shell::Shells::new(),
        shutdown: Notify::new(),
    });
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .add_service(
            GuestServer::new(Service(agent.clone()))
                .max_decoding_message_size(8 << 20)
                .max_encoding_message_size(8 << 20),
        )
        .serve_with_incoming(incoming);
    tokio::select! {
        res = server => res.context("guest server failed")?,
        () = agent.shutdown.notified() => tracing::info!("shutting down on request"),
        _ = sigterm.recv() => {
            tracing::info!("shutting down on SIGTERM");
            agent.kill_all().await;
        }
    }
    Ok(())
}

/// Startup duties of PID 1 in a fresh network namespace. None is fatal: in a dev run
/// (not in a fresh netns, not root) they fail and the agent still serves.
fn setup_process(is_init: bool) {
    match sys::interface_up("lo") {
        Ok(change) => tracing::debug!(?change, "loopback"),
        Err(err) => tracing::warn!("cannot bring up lo: {err}"),
    }
    // Commands must not reconfigure the sandbox network: drop CAP_NET_ADMIN from every
    // set, bounding set included, so neither we nor anything we exec can regain it.
    for set in [
        caps::CapSet::Ambient,
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Bounding,
    ] {
        let held = caps::has_cap(None, set, caps::Capability::CAP_NET_ADMIN).unwrap_or(true);
        if held {
            if let Err(err) = caps::drop(None, set, caps::Capability::CAP_NET_ADMIN) {
                tracing::warn!("cannot drop CAP_NET_ADMIN from the {set:?} set: {err}");
            }
        }
    }
    if !is_init {
        // Orphaned grandchildren then come to us instead of the host's init, so the
        // reaper sees them just as it would as PID 1.
        if let Err(err) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!("cannot become a child subreaper: {err}");
        }
    }
}

/// Listen on `path`. The socket is bound under a temporary name and renamed into place
/// once it listens, so a host that waits for `path` to appear can connect at once
/// (between bind(2) and listen(2) a connect would be refused).
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            tracing::debug!(socket = %path.display(), "removed stale socket");
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}.tmp", std::process::id()));
    let temp = PathBuf::from(temp);
    let _ = std::fs::remove_file(&temp);
    // The socket is created with mode 0600: nobody but our own user may connect. The
    // umask is process-wide; nothing else creates files this early.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(&temp);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("cannot listen on {}", temp.display()))?;
    if let Err(err) = std::fs::rename(&temp, path) {
        let _ = std::fs::remove_file(&temp);
        return Err(err).with_context(|| format!("cannot move the socket to {}", path.display()));
    }
    Ok(listener)
}

/// Reject relative paths and `..` segments: every path names one place in the sandbox.
pub(crate) fn check_path(path: &str) -> Result<&Path, Status> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "path {path:?} is not absolute"
        )));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(Status::invalid_argument(format!(
            "path {path:?} contains `..`"
        )));
    }
    Ok(p)
}

/// State shared by all calls.
pub(crate) struct Agent {
    reaper: Arc<Reaper>,
    /// VM mode with a `pids` limit: `cgroup.procs` (open for writing) of the cgroup that
    /// commands and shells start in, so a fork bomb cannot take the pids the agent
    /// (PID 1, in the root cgroup) needs. `None` elsewhere.
    cgroup: Option<OwnedFd>,
    /// Process groups of every command started and maybe still alive (daemons included).
    groups: Mutex<HashSet<i32>>,
    shells: shell::Shells,
    shutdown: Notify,
}

impl Agent {
    /// Make `cmd`'s process join the commands' cgroup before it execs (VM mode).
    fn confine(&self, cmd: &mut std::process::Command) {
        if let Some(procs) = &self.cgroup {
            // The fd lives as long as the agent, which outlives every spawn.
            sys::join_cgroup(cmd, procs.as_raw_fd());
        }
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn track_group(&self, pgid: i32) {
        let mut groups = self.groups();
        // Groups left behind by daemons are only forgotten once they are empty; prune
        // now and then so the set does not grow with every daemon ever started.
        if groups.len() >= 64 {
            groups.retain(|g| kill(Pid::from_raw(-*g), None) != Err(nix::errno::Errno::ESRCH));
        }
        groups.insert(pgid);
    }

    /// Forget a group once nothing is left in it (daemons keep it alive).
    fn untrack_group_if_empty(&self, pgid: i32) {
        if kill(Pid::from_raw(-pgid), None) == Err(nix::errno::Errno::ESRCH) {
            self.groups().remove(&pgid);
        }
    }

    /// SIGKILL everything we started, then flush the filesystems.
    async fn kill_all(&self) {
        let groups: Vec<i32> = self.groups().drain().collect();
        for pgid in &groups {
            exec::kill_group(*pgid);
        }
        if std::process::id() == 1 {
            // As PID 1 of a pid namespace this reaches every other process in it (and
            // never us). Outside that it would hit all of the user's processes.
            let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        }
        tracing::info!(groups = groups.len(), "killed all commands");
        let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
    }
}

type GuestResult<T> = Result<Response<T>, Status>;

/// The gRPC face of the agent.
struct Service(Arc<Agent>);

#[tonic::async_trait]
impl Guest for Service {
    type ExecStream = exec::OutputStream;
    type ReadFileStream = files::ChunkStream;
    type ShellAttachStream = shell::OutputStream;
    type ConnectStream = tunnel::OutputStream;

    async fn exec(&self, request: Request<Streaming<ExecInput>>) -> GuestResult<Self::ExecStream> {
        exec::exec(self.0.clone(), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> GuestResult<Self::ReadFileStream> {
        let req = request.into_inner();
        files::read_file(req.path, req.tar).await.map(Response::new)
    }

    async fn write_file(
        &self,
        request: Request<Streaming<WriteFileInput>>,
    ) -> GuestResult<WriteFileResponse> {
        let bytes = files::write_file(request.into_inner()).await?;
        Ok(Response::new(WriteFileResponse { bytes }))
    }

    async fn stat(&self, request: Request<PathRequest>) -> GuestResult<FileInfo> {
        files::stat(request.into_inner().path)
            .await
            .map(Response::new)
    }

    async fn list_dir(&self, request: Request<PathRequest>) -> GuestResult<ListDirResponse> {
        let entries = files::list_dir(request.into_inner().path).await?;
        Ok(Response::new(ListDirResponse { entries }))
    }

    async fn health(&self, _: Request<Empty>) -> GuestResult<HealthResponse> {
        Ok(Response::new(HealthResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
        }))
    }

    async fn shutdown(&self, _: Request<Empty>) -> GuestResult<Empty> {
        self.0.kill_all().await;
        // Let the reply reach the host before the server goes away.
        let agent = self.0.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_DELAY).await;
            agent.shutdown.notify_one();
        });
        Ok(Response::new(Empty {}))
    }

    async fn shell_open(&self, request: Request<ShellOpenRequest>) -> GuestResult<ShellInfo> {
        let shell = shell::open(&self.0, request.into_inner())?;
        Ok(Response::new(shell.info()))
    }

    async fn shell_attach(
        &self,
        request: Request<Streaming<ShellInput>>,
    ) -> GuestResult<Self::ShellAttachStream> {
        shell::attach(self.0.clone(), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn shell_list(&self, _: Request<Empty>) -> GuestResult<ShellListResponse> {
        Ok(Response::new(ShellListResponse {
            shells: self.0.shells.list(),
        }))
    }

    async fn shell_kill(&self, request: Request<ShellKillRequest>) -> GuestResult<ShellInfo> {
        let req = request.into_inner();
        shell::kill(&self.0, &req.shell_id, req.signal)
            .await
            .map(Response::new)
    }

    async fn connect(
        &self,
        request: Request<Streaming<TunnelInput>>,
    ) -> GuestResult<Self::ConnectStream> {
        tunnel::connect(request.into_inner())
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn paths_must_be_absolute_without_dotdot() {
        assert!(check_path("/mnt/workspace/a.txt").is_ok());
        assert!(check_path("/").is_ok());
        assert!(check_path("/a/./b").is_ok());
        for bad in ["", "a", "./a", "../a", "/a/../b", "/a/.."] {
            let err = check_path(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn parses_listen() {
        let parse = |args: &[&str]| parse_args(args.iter().map(OsString::from).collect());
        let opts = |listen: &str| Options {
            listen: PathBuf::from(listen),
        };
        assert_eq!(
            parse(&["--listen", "/run/g.sock"]).unwrap(),
            opts("/run/g.sock")
        );
        assert_eq!(parse(&["--listen=/g"]).unwrap(), opts("/g"));
        assert!(parse(&[]).is_err());
        assert!(parse(&["--listen"]).is_err());
        assert!(parse(&["--listen", "/g", "--log-dir", "/tmp/l"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }
}

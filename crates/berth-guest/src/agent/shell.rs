//! Interactive shells: PTY-backed processes with an id, a ring buffer of raw output, a
//! terminal model (`vt100`) and any number of attached clients.
//!
//! One pump task per shell reads the PTY master and, under the shell's lock, appends
//! the bytes to the ring, feeds the model and offers them to every attached client's
//! queue (the host's recorder is one such client: recordings are kept by the host). Attaching takes the same lock to build the replay
//! or snapshot and register the client, so nothing is lost or duplicated between the
//! two. The pump never waits for a client: a client whose queue is over its byte budget
//! is dropped (`ResourceExhausted`) and reattaches with its offset. See README.md.

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::io::{self, Read as _, Write as _};
use std::num::NonZeroU16;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::Stream;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt, PtyMaster};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use super::exec::check_cwd;
use super::reaper::ExitStatus;
use super::{sys, Agent};
use crate::proto::{
    shell_input, shell_output, Exited, ShellAttachStart, ShellAttached, ShellData, ShellInfo,
    ShellInput, ShellNotice, ShellOpenRequest, ShellOutput, ShellSize,
};

/// Largest PTY read, and largest replayed chunk. (A PTY hands out at most a few KiB per
/// read; this only bounds the buffer.)
const CHUNK: usize = 64 * 1024;
/// Raw output kept per shell for reconnects with an offset.
pub const RING: usize = 256 * 1024;
/// Output bytes queued for one client before it is dropped as too slow. The HTTP/2
/// stream window (4 MiB on the host side) comes on top of this.
pub const CLIENT_QUEUE: usize = 1 << 20;
/// Largest width or height accepted (the model allocates width × height cells).
const MAX_DIM: u32 = 1000;
const DEFAULT_WIDTH: u16 = 80;
const DEFAULT_HEIGHT: u16 = 24;
const DEFAULT_MAX_SHELLS: u32 = 10;
const DEFAULT_TERM: &str = "xterm-256color";
/// How long `ShellKill` waits after SIGHUP before it sends SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long `ShellKill` waits for the exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Output read after the shell process exited while something it left behind still
/// holds the terminal open.
const EXIT_GRACE: Duration = Duration::from_millis(200);
/// Exited shells kept for `ShellList` / late attaches before the oldest is forgotten.
const EXITED_KEPT: usize = 16;
/// Messages queued towards the gRPC stream of one client (beyond its byte budget).
const OUTPUT_QUEUE: usize = 8;

pub(crate) type OutputStream = Pin<Box<dyn Stream<Item = Result<ShellOutput, Status>> + Send>>;

/// Every shell of the agent, by id.
pub(crate) struct Shells {
    map: Mutex<HashMap<String, Arc<Shell>>>,
}

impl Shells {
    pub(crate) fn new() -> Shells {
        Shells {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Shell>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, id: &str) -> Result<Arc<Shell>, Status> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no shell {id:?}")))
    }

    pub(crate) fn list(&self) -> Vec<ShellInfo> {
        let mut shells: Vec<Arc<Shell>> = self.map().values().cloned().collect();
        shells.sort_by(|a, b| (a.started_at_ms, &a.id).cmp(&(b.started_at_ms, &b.id)));
        shells.iter().map(|s| s.info()).collect()
    }

    fn forget(&self, shell: &Arc<Shell>) {
        let mut map = self.map();
        if map.get(&shell.id).is_some_and(|s| Arc::ptr_eq(s, shell)) {
            map.remove(&shell.id);
        }
    }
}

/// A shell id: 1–128 characters, none of `?#&/` (they would need escaping in URLs and
/// paths) and no control characters.
fn check_id(id: &str) -> Result<(), Status> {
    let len = id.chars().count();
    if !(1..=128).contains(&len) {
        return Err(Status::invalid_argument(format!(
            "shell id {id:?} must be 1 to 128 characters long"
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| matches!(c, '?' | '#' | '&' | '/') || c.is_control())
    {
        return Err(Status::invalid_argument(format!(
            "shell id {id:?} must not contain {c:?}"
        )));
    }
    Ok(())
}

fn dimension(value: u32, default: u16, what: &str) -> Result<u16, Status> {
    match value {
        0 => Ok(default),
        1..=MAX_DIM => Ok(value as u16),
        _ => Err(Status::invalid_argument(format!(
            "{what} {value} is out of range (1 to {MAX_DIM})"
        ))),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn exited_msg(status: ExitStatus) -> Exited {
    match status {
        ExitStatus::Code(code) => Exited {
            code: Some(code),
            ..Default::default()
        },
        ExitStatus::Signal(sig) => Exited {
            signal: Some(sig),
            ..Default::default()
        },
    }
}

fn out(kind: shell_output::Kind) -> ShellOutput {
    ShellOutput { kind: Some(kind) }
}

pub(crate) struct Shell {
    id: String,
    argv: Vec<String>,
    pid: i32,
    started_at_ms: i64,
    master: AsyncFd<PtyMaster>,
    state: Mutex<State>,
    exited: watch::Sender<Option<ExitStatus>>,
    next_client: AtomicU64,
}

struct State {
    /// The last `RING` bytes of output; the byte at `ring[i]` has offset
    /// `end - ring.len() + i`.
    ring: VecDeque<u8>,
    /// Offset of the next output byte (= bytes produced so far).
    end: u64,
    model: vt100::Parser,
    width: u16,
    height: u16,
    clients: Vec<Client>,
    exit: Option<ExitStatus>,
}

/// The pump's side of one attached client.
struct Client {
    id: u64,
    watch: bool,
    /// The host's recorder: not counted as a watcher, told about resizes.
    recorder: bool,
    tx: mpsc::UnboundedSender<Data>,
    /// Bytes sent to `tx` and not yet taken by the client's forwarder.
    queued: Arc<AtomicUsize>,
    /// Set when the client was dropped for falling behind.
    kicked: Arc<AtomicBool>,
}

/// What the pump queues for a client.
enum Data {
    Output {
        offset: u64,
        bytes: Bytes,
    },
    /// Recorders only.
    Resized {
        width: u16,
        height: u16,
    },
}

impl Client {
    /// Queue output for the client; false = drop it (gone, or over its budget).
    fn offer(&self, offset: u64, bytes: &Bytes) -> bool {
        let queued = self.queued.load(Ordering::Acquire);
        if queued + bytes.len() > CLIENT_QUEUE {
            tracing::debug!(
                client = self.id,
                queued,
                "dropping a client that fell behind"
            );
            self.kicked.store(true, Ordering::Release);
            return false;
        }
        self.queued.fetch_add(bytes.len(), Ordering::AcqRel);
        self.tx
            .send(Data::Output {
                offset,
                bytes: bytes.clone(),
            })
            .is_ok()
    }
}

/// Start a shell (`ShellOpen`).
pub(crate) fn open(agent: &Arc<Agent>, req: ShellOpenRequest) -> Result<Arc<Shell>, Status> {
    let id = if req.shell_id.is_empty() {
        format!("sh-{:016x}", rand::random::<u64>())
    } else {
        check_id(&req.shell_id)?;
        req.shell_id.clone()
    };
    let width = dimension(req.width, DEFAULT_WIDTH, "width")?;
    let height = dimension(req.height, DEFAULT_HEIGHT, "height")?;
    let argv = if req.argv.is_empty() {
        if std::path::Path::new("/bin/bash").exists() {
            vec!["bash".to_string(), "-l".to_string()]
        } else {
            vec!["sh".to_string(), "-l".to_string()]
        }
    } else {
        req.argv.clone()
    };
    let cwd = check_cwd(if req.cwd.is_empty() { "/" } else { &req.cwd })?;
    let max = if req.max_shells == 0 {
        DEFAULT_MAX_SHELLS
    } else {
        req.max_shells
    } as usize;

    let shells = &agent.shells;
    // Held across the spawn so that two opens cannot both pass the checks.
    let mut map = shells.map();
    if map.get(&id).is_some_and(|s| s.running()) {
        return Err(Status::already_exists(format!(
            "shell {id:?} already exists"
        )));
    }
    let running = map.values().filter(|s| s.running()).count();
    if running >= max {
        return Err(Status::resource_exhausted(format!(
            "too many shells: {running} running, at most {max} allowed"
        )));
    }

    let (master, slave) =
        open_pty().map_err(|err| Status::internal(format!("cannot open a pty: {err}")))?;
    sys::set_window_size(&master, width, height)
        .map_err(|err| Status::internal(format!("cannot size the pty: {err}")))?;
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("TERM".into(), DEFAULT_TERM.into());
    env.extend(req.env.clone());
    let mut cmd = Command::new(&argv[0]);
    let stdio = |f: &std::fs::File| f.try_clone().map(Stdio::from);
    let (stdin, stdout, stderr) =
        (|| Ok::<_, io::Error>((stdio(&slave)?, stdio(&slave)?, stdio(&slave)?)))()
            .map_err(|err| Status::internal(format!("cannot set up the pty: {err}")))?;
    cmd.args(&argv[1..])
        .current_dir(cwd)
        .envs(&env)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    sys::pty_session(&mut cmd);
    agent.confine(&mut cmd);
    let spawned = agent.reaper.spawn(&mut cmd);
    // The parent keeps no slave descriptor: the master reads EIO once every process
    // that has the terminal open is gone.
    drop(cmd);
    drop(slave);
    let (child, exit) = spawned.map_err(|err| {
        let msg = format!("cannot run {}: {err}", argv[0]);
        match err.kind() {
            io::ErrorKind::NotFound => Status::not_found(msg),
            io::ErrorKind::PermissionDenied => Status::permission_denied(msg),
            _ => Status::internal(msg),
        }
    })?;
    let pid = child.id() as i32;
    // The reaper owns the exit status.
    drop(child);
    agent.track_group(pid);

    let master = match sys::async_pty(master) {
        Ok(master) => master,
        Err(err) => {
            super::exec::kill_group(pid);
            return Err(Status::internal(format!("cannot poll the pty: {err}")));
        }
    };
    let shell = Arc::new(Shell {
        id: id.clone(),
        argv,
        pid,
        started_at_ms: now_ms(),
        master,
        state: Mutex::new(State {
            ring: VecDeque::with_capacity(RING),
            end: 0,
            model: vt100::Parser::new(
                NonZeroU16::new(height).unwrap_or(NonZeroU16::MIN),
                NonZeroU16::new(width).unwrap_or(NonZeroU16::MIN),
                0,
            ),
            width,
            height,
            clients: Vec::new(),
            exit: None,
        }),
        exited: watch::Sender::new(None),
        next_client: AtomicU64::new(0),
    });
    map.insert(id.clone(), shell.clone());
    prune_exited(&mut map);
    drop(map);
    tracing::debug!(shell = %id, pid, "shell started");
    tokio::spawn(pump(agent.clone(), shell.clone(), exit));
    Ok(shell)
}

fn prune_exited(map: &mut HashMap<String, Arc<Shell>>) {
    let mut exited: Vec<(i64, String)> = map
        .values()
        .filter(|s| !s.running())
        .map(|s| (s.started_at_ms, s.id.clone()))
        .collect();
    if exited.len() > EXITED_KEPT {
        exited.sort();
        for (_, id) in &exited[..exited.len() - EXITED_KEPT] {
            map.remove(id);
        }
    }
}

/// A new PTY pair, both ends close-on-exec (no other child inherits them), the master
/// non-blocking for tokio.
fn open_pty() -> io::Result<(PtyMaster, std::fs::File)> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(name)?;
    let flags = OFlag::from_bits_truncate(fcntl(master.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(
        master.as_raw_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    )?;
    Ok((master, slave))
}

/// Read the PTY until the terminal is closed (EIO) or, once the shell process exited,
/// the grace period ran out; then record the exit.
async fn pump(agent: Arc<Agent>, shell: Arc<Shell>, mut exit: oneshot::Receiver<ExitStatus>) {
    let mut buf = vec![0u8; CHUNK];
    let mut status = None;
    let mut deadline: Option<Instant> = None;
    loop {
        tokio::select! {
            res = shell.read(&mut buf) => match res {
                Ok(0) => break,
                Ok(n) => {
                    if shell.broadcast(&buf[..n]) {
                        // Some client is half-way to its budget: let the other tasks
                        // (its forwarder, the connection) run before reading on. On
                        // the single-threaded runtime this is what gives a client
                        // that does keep up the chance to; one that does not still
                        // overflows and is dropped. The shell is never held up.
                        tokio::task::yield_now().await;
                    }
                }
                // EIO: every process that had the terminal open is gone.
                Err(err) if err.raw_os_error() == Some(libc::EIO) => break,
                Err(err) => {
                    tracing::warn!(shell = %shell.id, "reading the pty failed: {err}");
                    break;
                }
            },
            st = &mut exit, if status.is_none() => {
                // The reaper never drops a registered sender without sending.
                status = Some(st.unwrap_or(ExitStatus::Signal(libc::SIGKILL)));
                deadline = Some(Instant::now() + EXIT_GRACE);
            }
            () = sleep_until(deadline) => break,
        }
    }
    let status = match status {
        Some(status) => status,
        None => exit.await.unwrap_or(ExitStatus::Signal(libc::SIGKILL)),
    };
    agent.untrack_group_if_empty(shell.pid);
    tracing::debug!(shell = %shell.id, ?status, "shell exited");
    shell.finish(status);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Shell {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn running(&self) -> bool {
        self.exited.borrow().is_none()
    }

    pub(crate) fn info(&self) -> ShellInfo {
        let st = self.state();
        let count = |f: fn(&Client) -> bool| st.clients.iter().filter(|c| f(c)).count() as u32;
        ShellInfo {
            shell_id: self.id.clone(),
            argv: self.argv.clone(),
            width: u32::from(st.width),
            height: u32::from(st.height),
            clients: count(|c| !c.watch),
            watchers: count(|c| c.watch && !c.recorder),
            started_at_ms: self.started_at_ms,
            pid: self.pid as u32,
            running: st.exit.is_none(),
            exited: st.exit.map(exited_msg),
            offset: st.end,
        }
    }

    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard.try_io(|fd| fd.get_ref().read(buf)) {
                Ok(res) => return res,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|fd| fd.get_ref().write(data)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Append output to the ring and the model, and offer it to every client, all under
    /// the lock that attaching takes. True if some client's queue is
    /// over half its budget.
    fn broadcast(&self, data: &[u8]) -> bool {
        let bytes = Bytes::copy_from_slice(data);
        let mut st = self.state();
        let offset = st.end;
        st.end += data.len() as u64;
        if data.len() >= RING {
            st.ring.clear();
            st.ring.extend(&data[data.len() - RING..]);
        } else {
            let excess = (st.ring.len() + data.len()).saturating_sub(RING);
            st.ring.drain(..excess);
            st.ring.extend(data);
        }
        st.model.process(data);
        st.clients.retain(|c| c.offer(offset, &bytes));
        st.clients
            .iter()
            .any(|c| c.queued.load(Ordering::Relaxed) > CLIENT_QUEUE / 2)
    }

    fn finish(&self, status: ExitStatus) {
        let mut st = self.state();
        st.exit = Some(status);
        // Dropping the senders ends each client's stream after what is queued; the
        // forwarders then send `exited`.
        st.clients.clear();
        drop(st);
        self.exited.send_replace(Some(status));
    }

    /// Resize the PTY and the model (no-op if unchanged).
    fn resize(&self, width: u16, height: u16) -> io::Result<()> {
        let mut st = self.state();
        if (st.width, st.height) == (width, height) {
            return Ok(());
        }
        sys::set_window_size(self.master.get_ref(), width, height)?;
        if let (Some(rows), Some(cols)) = (NonZeroU16::new(height), NonZeroU16::new(width)) {
            st.model.set_size(rows, cols);
        }
        st.width = width;
        st.height = height;
        // In order with the output: the pump queues under the same lock.
        for c in st.clients.iter().filter(|c| c.recorder) {
            let _ = c.tx.send(Data::Resized { width, height });
        }
        Ok(())
    }

    fn unregister(&self, client: u64) {
        self.state().clients.retain(|c| c.id != client);
    }

    async fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let mut rx = self.exited.subscribe();
        let res = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
        match res {
            Ok(Ok(status)) => *status,
            _ => None,
        }
    }
}

/// Escape sequences that redraw the model's screen on a terminal of the same size:
/// leave any alternate screen the client still shows, draw the normal screen and, if a
/// full-screen program is in the alternate screen, switch to it (`?1049h`, which also
/// saves the normal screen's cursor for the program's exit) and draw it, then the input
/// modes (keypad, cursor keys, bracketed paste, mouse).
fn snapshot(model: &vt100::Parser) -> Vec<u8> {
    let screen = model.screen();
    let mut out = Vec::with_capacity(4096);
    // Normal screen, no scroll region, default attributes.
    out.extend_from_slice(b"\x1b[?1049l\x1b[r\x1b[m");
    if screen.alternate_screen() {
        // The model only exposes the active grid: switch a copy back to the normal one.
        let (rows, cols) = screen.size();
        let mut normal = vt100::Parser::new(rows, cols, 0);
        *normal.screen_mut() = screen.clone();
        normal.process(b"\x1b[?47l");
        out.extend_from_slice(normal.screen().contents_formatted().as_bytes());
        out.extend_from_slice(b"\x1b[?1049h");
    }
    out.extend_from_slice(screen.state_formatted().as_bytes());
    out
}

/// `ShellAttach`: register a client and return its output stream.
pub(crate) async fn attach(
    agent: Arc<Agent>,
    mut input: Streaming<ShellInput>,
) -> Result<OutputStream, Status> {
    let start: ShellAttachStart = match input.message().await? {
        Some(ShellInput {
            kind: Some(shell_input::Kind::Attach(start)),
        }) => start,
        _ => {
            return Err(Status::invalid_argument(
                "the first shell input must be `attach`",
            ))
        }
    };
    let shell = agent.shells.get(&start.shell_id)?;
    // A recorder is read-only.
    let watch = start.watch || start.recorder;
    if !watch && (start.width != 0 || start.height != 0) {
        let (width, height) = {
            let st = shell.state();
            (st.width, st.height)
        };
        let width = dimension(start.width, width, "width")?;
        let height = dimension(start.height, height, "height")?;
        if shell.running() {
            shell
                .resize(width, height)
                .map_err(|err| Status::internal(format!("cannot resize the pty: {err}")))?;
        }
    }

    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let kicked = Arc::new(AtomicBool::new(false));
    let client_id = shell.next_client.fetch_add(1, Ordering::Relaxed);
    let mut initial = Vec::new();
    // Replay or snapshot and registration happen under one lock: the first live byte
    // the client gets is exactly the one after what the replay/snapshot covers.
    let next = {
        let mut st = shell.state();
        let ring_start = st.end - st.ring.len() as u64;
        let replay_from = match start.offset {
            Some(offset) if offset > st.end => {
                return Err(Status::invalid_argument(format!(
                    "offset {offset} is past the end of the shell's output ({})",
                    st.end
                )))
            }
            Some(offset) if offset >= ring_start => Some(offset),
            _ => None,
        };
        let next = replay_from.unwrap_or(st.end);
        initial.push(out(shell_output::Kind::Attached(ShellAttached {
            shell_id: shell.id.clone(),
            reconnected: start.offset.is_some(),
            width: u32::from(st.width),
            height: u32::from(st.height),
            offset: next,
            snapshot: replay_from.is_none(),
        })));
        match replay_from {
            Some(offset) => {
                let skip = (offset - ring_start) as usize;
                let bytes: Vec<u8> = st.ring.range(skip..).copied().collect();
                let mut at = offset;
                for chunk in bytes.chunks(CHUNK) {
                    initial.push(out(shell_output::Kind::Output(ShellData {
                        offset: at,
                        data: Bytes::copy_from_slice(chunk),
                    })));
                    at += chunk.len() as u64;
                }
            }
            None => initial.push(out(shell_output::Kind::Snapshot(Bytes::from(snapshot(
                &st.model,
            ))))),
        }
        if st.exit.is_none() {
            st.clients.push(Client {
                id: client_id,
                watch,
                recorder: start.recorder,
                tx,
                queued: queued.clone(),
                kicked: kicked.clone(),
            });
        }
        // (An exited shell: `tx` drops here and the stream ends with `exited`.)
        st.end
    };
    tracing::debug!(shell = %shell.id, client = client_id, watch, recorder = start.recorder, "client attached");

    let (out_tx, out_rx) = mpsc::channel(OUTPUT_QUEUE);
    let client = Forwarder {
        shell,
        id: client_id,
        watch,
        queued,
        kicked,
        next,
    };
    tokio::spawn(client.run(initial, rx, input, out_tx));
    Ok(Box::pin(ReceiverStream::new(out_rx)))
}

/// Moves one client's queued output (and replies to its inputs) into its gRPC stream.
struct Forwarder {
    shell: Arc<Shell>,
    id: u64,
    watch: bool,
    queued: Arc<AtomicUsize>,
    kicked: Arc<AtomicBool>,
    /// Offset of the next byte this client will be sent.
    next: u64,
}

type Out = mpsc::Sender<Result<ShellOutput, Status>>;

impl Forwarder {
    async fn run(
        mut self,
        initial: Vec<ShellOutput>,
        mut data: mpsc::UnboundedReceiver<Data>,
        input: Streaming<ShellInput>,
        out_tx: Out,
    ) {
        let (ctl_tx, mut ctl) = mpsc::channel(16);
        let inputs = tokio::spawn(read_input(self.shell.clone(), self.watch, input, ctl_tx));
        let mut attached = true;
        for msg in initial {
            if out_tx.send(Ok(msg)).await.is_err() {
                attached = false;
                break;
            }
        }
        while attached {
            tokio::select! {
                biased;
                () = out_tx.closed() => attached = false,
                Some(msg) = ctl.recv() => {
                    attached = out_tx.send(Ok(msg)).await.is_ok();
                }
                msg = data.recv() => match msg {
                    Some(Data::Output { offset, bytes }) => {
                        self.queued.fetch_sub(bytes.len(), Ordering::AcqRel);
                        self.next = offset + bytes.len() as u64;
                        let msg = out(shell_output::Kind::Output(ShellData { offset, data: bytes }));
                        attached = out_tx.send(Ok(msg)).await.is_ok();
                    }
                    Some(Data::Resized { width, height }) => {
                        let size = ShellSize { width: u32::from(width), height: u32::from(height) };
                        attached = out_tx.send(Ok(out(shell_output::Kind::Resized(size)))).await.is_ok();
                    }
                    None => {
                        self.end(&out_tx).await;
                        break;
                    }
                }
            }
        }
        inputs.abort();
        self.shell.unregister(self.id);
        tracing::debug!(shell = %self.shell.id, client = self.id, "client detached");
    }

    /// The pump dropped us: either we fell behind or the shell exited.
    async fn end(&self, out_tx: &Out) {
        if self.kicked.load(Ordering::Acquire) {
            let _ = out_tx
                .send(Err(Status::resource_exhausted(format!(
                    "client fell more than {CLIENT_QUEUE} bytes behind the shell's output; \
                     reattach with offset {}",
                    self.next
                ))))
                .await;
            return;
        }
        let exit = self.shell.state().exit;
        match exit {
            Some(status) => {
                let _ = out_tx
                    .send(Ok(out(shell_output::Kind::Exited(exited_msg(status)))))
                    .await;
            }
            None => {
                let _ = out_tx
                    .send(Err(Status::aborted("the shell went away")))
                    .await;
            }
        }
    }
}

fn notice(code: Code, message: impl Into<String>) -> ShellOutput {
    out(shell_output::Kind::Notice(ShellNotice {
        code: code as i32,
        message: message.into(),
    }))
}

/// Apply a client's inputs after `attach`: stdin, resizes, heartbeats.
async fn read_input(
    shell: Arc<Shell>,
    watch: bool,
    mut input: Streaming<ShellInput>,
    ctl: mpsc::Sender<ShellOutput>,
) {
    // A clean end or a failure of the input stream only stops input: the client may
    // still be reading (tonic reports a cancelled call as a clean end; the forwarder
    // notices the output side going away).
    while let Ok(Some(msg)) = input.message().await {
        let reply = match msg.kind {
            Some(shell_input::Kind::Stdin(_)) if watch => Some(notice(
                Code::PermissionDenied,
                "stdin ignored: this client is attached read-only (watch)",
            )),
            Some(shell_input::Kind::Stdin(data)) => match shell.write_all(&data).await {
                Ok(()) => None,
                Err(err) => Some(notice(
                    Code::FailedPrecondition,
                    format!("stdin not written to the shell: {err}"),
                )),
            },
            Some(shell_input::Kind::Resize(_)) if watch => Some(notice(
                Code::PermissionDenied,
                "resize ignored: this client is attached read-only (watch)",
            )),
            Some(shell_input::Kind::Resize(size)) => {
                match (
                    dimension(size.width, 0, "width"),
                    dimension(size.height, 0, "height"),
                ) {
                    (Ok(w), Ok(h)) if w > 0 && h > 0 => match shell.resize(w, h) {
                        Ok(()) => None,
                        Err(err) => Some(notice(
                            Code::FailedPrecondition,
                            format!("cannot resize the pty: {err}"),
                        )),
                    },
                    _ => Some(notice(
                        Code::InvalidArgument,
                        format!(
                            "resize ignored: {}x{} is not a size (1 to {MAX_DIM} each)",
                            size.width, size.height
                        ),
                    )),
                }
            }
            Some(shell_input::Kind::Heartbeat(e)) => Some(out(shell_output::Kind::Heartbeat(e))),
            Some(shell_input::Kind::Attach(_)) => Some(notice(
                Code::InvalidArgument,
                "already attached: `attach` is only valid as the first input",
            )),
            None => Some(notice(Code::InvalidArgument, "empty shell input ignored")),
        };
        if let Some(reply) = reply {
            if ctl.send(reply).await.is_err() {
                return;
            }
        }
    }
}

/// `ShellKill`.
pub(crate) async fn kill(agent: &Agent, id: &str, signal: i32) -> Result<ShellInfo, Status> {
    let shell = agent.shells.get(id)?;
    if !shell.running() {
        agent.shells.forget(&shell);
        return Ok(shell.info());
    }
    let pgid = Pid::from_raw(shell.pid);
    let send = |sig: Signal| match killpg(pgid, sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(err) => Err(Status::internal(format!(
            "cannot send {sig} to shell {id:?}: {err}"
        ))),
    };
    if signal != 0 {
        let sig = Signal::try_from(signal)
            .map_err(|_| Status::invalid_argument(format!("unknown signal number {signal}")))?;
        send(sig)?;
        return Ok(shell.info());
    }
    send(Signal::SIGHUP)?;
    if shell.wait_exit(KILL_GRACE).await.is_none() {
        send(Signal::SIGKILL)?;
        if shell.wait_exit(KILL_WAIT).await.is_none() {
            return Err(Status::deadline_exceeded(format!(
                "shell {id:?} did not exit after SIGKILL"
            )));
        }
    }
    Ok(shell.info())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn shell_ids() {
        for good in [
            "a",
            "sh-1",
            "my shell",
            "x".repeat(128).as_str(),
            "ünï",
            "..",
        ] {
            assert!(check_id(good).is_ok(), "{good:?}");
        }
        for bad in ["", "a/b", "a?b", "a#b", "a&b", "a\nb", &"x".repeat(129)] {
            assert_eq!(
                check_id(bad).unwrap_err().code(),
                Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn snapshot_redraws_the_alternate_screen_over_the_normal_one() {
        let mut model =
            vt100::Parser::new(NonZeroU16::new(5).unwrap(), NonZeroU16::new(20).unwrap(), 0);
        model.process(b"$ normal\r\n$ ");
        model.process(b"\x1b[?1049h\x1b[H\x1b[2Jfull screen\x1b[?1h");
        let snap = snapshot(&model);
        // Replaying the snapshot into a fresh terminal reproduces the state...
        let mut replay =
            vt100::Parser::new(NonZeroU16::new(5).unwrap(), NonZeroU16::new(20).unwrap(), 0);
        replay.process(&snap);
        assert!(replay.screen().alternate_screen());
        assert!(replay.screen().application_cursor());
        assert_eq!(replay.screen().contents(), model.screen().contents());
        assert_eq!(
            replay.screen().cursor_position(),
            model.screen().cursor_position()
        );
        // ...and leaving the alternate screen shows the normal screen as it was.
        model.process(b"\x1b[?1049l");
        replay.process(b"\x1b[?1049l");
        assert_eq!(replay.screen().contents(), model.screen().contents());
        assert!(replay.screen().contents().starts_with("$ normal\n$"));
        assert_eq!(
            replay.screen().cursor_position(),
            model.screen().cursor_position()
        );
    }
}

//! Shell recordings, kept by the host where the sandboxed agent cannot reach them.
//!
//! For every shell the core opens, a recorder task attaches to the guest shell as a
//! `recorder` (read-only, invisible in the shell's client counts, never a reason to
//! keep the session busy) and appends what it receives to
//! `<logs>/<session>/<shell>.cast`, an asciicast v2 file: a JSON header line, then
//! `[seconds, "o", text]` per output chunk, `[seconds, "r", "WxH"]` per resize and
//! `[seconds, "m", note]` where output is missing.
//!
//! Beside it, `<shell>.state` (JSON, replaced atomically) records how far the recording
//! got: the output offset of the first byte not written yet and the length of the cast
//! that holds exactly the output before it. Lines are appended through a write buffer;
//! the state follows each flush (on a short interval, after every 64 KiB of output, on
//! request and at the end). A server that was killed therefore resumes exactly: the
//! cast is cut back to the recorded length (dropping lines written after the last
//! state) and the recorder reattaches at the recorded offset, which the guest replays
//! from its ring buffer. If the ring has moved past it, or the recorder fell so far
//! behind that the guest dropped it, the gap becomes an `"m"` event and the guest's
//! screen snapshot redraws the terminal before the output goes on.
//!
//! The guest (and anything in the sandbox) only ever supplies output bytes: file names
//! come from validated shell ids, offsets are checked against what was already
//! recorded, and a recording stops growing at [`MAX_CAST_BYTES`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_guest::client::Guest;
use berth_guest::proto::{shell_output, Empty, ShellAttachStart, ShellInfo, ShellOutput};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Write buffer of a cast.
const BUFFER: usize = 64 * 1024;
/// Largest output piece encoded into one event (bounds the encoding buffer).
const PIECE: usize = 64 * 1024;
/// How often a recorder flushes its cast and state while output flows.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Output written since the last state after which the state is written early (so a
/// restart resumes well inside the guest's 256 KiB ring)…
const PERSIST_BYTES: u64 = 64 * 1024;
/// …but not more often than this.
const PERSIST_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Once a cast is this large, output is no longer written (a marker says so): the
/// agent must not be able to fill the host's disk through its terminal.
pub(crate) const MAX_CAST_BYTES: u64 = 1 << 30;
/// How long a stopping recorder keeps reading what the guest still sends.
const DRAIN: Duration = Duration::from_secs(2);
/// How long a sandbox stop waits for its recorders to finish.
const END_WAIT: Duration = Duration::from_secs(5);
/// How long a recording request waits for the recorder's flush.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// Limit on one attach (the call and its first messages).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Delays between attach attempts after failures; the recorder gives up after the
/// last one (the sandbox is then gone or its guest no longer answers).
const RETRY_DELAYS: [u64; 8] = [1, 2, 4, 8, 15, 15, 15, 15];
/// Longest file name stem before the name becomes a hash.
const MAX_STEM: usize = 200;
const CAST_SUFFIX: &str = ".cast";
const STATE_SUFFIX: &str = ".state";

/// The terminal the core asks the guest to announce to shells (and records).
pub(crate) const TERM: &str = "xterm-256color";

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The file name stem of a shell's recording. Ids made of `[A-Za-z0-9._-]` (not
/// starting with `.`) are used as they are; other bytes are percent-encoded; a stem
/// that would then be longer than [`MAX_STEM`] bytes becomes `~` and a 128-bit hash of
/// the id (the state file names the id, and is checked before a hashed file is used).
/// Shell ids never contain `/`, so no stem can leave the session's directory.
pub(crate) fn stem(shell_id: &str) -> String {
    let mut out = String::with_capacity(shell_id.len());
    for (i, b) in shell_id.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() <= MAX_STEM {
        return out;
    }
    // FNV-1a, 128 bits: stable across builds (unlike `DefaultHasher`'s contract).
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in shell_id.bytes() {
        hash ^= u128::from(b);
        hash = hash.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    format!("~{hash:032x}")
}

/// How far a recording got; `<shell>.state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    shell_id: String,
    /// The shell instance in the guest (ids are reused once a shell exited).
    started_at_ms: i64,
    pid: u32,
    /// Output offset of the first byte not in the cast yet.
    offset: u64,
    /// Length of the cast holding exactly the output before `offset`.
    cast_len: u64,
    /// Wall-clock time of second 0 of the recording, in microseconds.
    origin_us: i64,
    /// Time of the last event (events never go back in time).
    last_time: f64,
    /// The terminal size last recorded.
    width: u16,
    height: u16,
    /// The recorder ended: the shell exited, the sandbox stopped, or it gave up.
    done: bool,
}

/// An asciicast v2 file being appended to.
struct Cast {
    out: BufWriter<File>,
    /// Bytes written so far, buffered ones included.
    len: u64,
    /// The start of a UTF-8 sequence split across chunks, held until the rest arrives.
    partial: Vec<u8>,
    origin_us: i64,
    last_time: f64,
    /// Encoding buffer for one line.
    line: Vec<u8>,
}

fn open_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

impl Cast {
    /// Create (or truncate) `path` and write the header.
    fn create(
        path: &Path,
        origin_us: i64,
        width: u16,
        height: u16,
        shell: &str,
        title: &str,
    ) -> io::Result<Cast> {
        let file = open_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let mut cast = Cast::over(file, 0, origin_us, 0.0);
        let header = serde_json::json!({
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": origin_us / 1_000_000,
            "title": title,
            "env": {"TERM": TERM, "SHELL": shell},
        });
        serde_json::to_writer(&mut cast.line, &header)?;
        cast.write_line()?;
        Ok(cast)
    }

    /// Reopen a cast to go on where `state` says it ended: anything after
    /// `state.cast_len` (lines written after the state, possibly a torn one) is cut.
    /// Returns the cast and whether it was shorter than recorded (lost on a host crash).
    fn resume(path: &Path, state: &State) -> io::Result<(Cast, bool)> {
        let mut file = open_options().write(true).open(path)?;
        let len = file.metadata()?.len();
        let short = len < state.cast_len;
        let keep = if short {
            whole_lines_len(path, len)?
        } else {
            state.cast_len
        };
        file.set_len(keep)?;
        file.seek(SeekFrom::End(0))?;
        Ok((
            Cast::over(file, keep, state.origin_us, state.last_time),
            short,
        ))
    }

    fn over(file: File, len: u64, origin_us: i64, last_time: f64) -> Cast {
        Cast {
            out: BufWriter::with_capacity(BUFFER, file),
            len,
            partial: Vec::new(),
            origin_us,
            last_time,
            line: Vec::new(),
        }
    }

    /// Record output bytes. asciicast data is a JSON string, so bytes are decoded as
    /// UTF-8: a sequence split between two chunks is completed by the next one, invalid
    /// bytes become U+FFFD.
    fn output(&mut self, data: &[u8]) -> io::Result<()> {
        for piece in data.chunks(PIECE) {
            self.partial.extend_from_slice(piece);
            let complete = match std::str::from_utf8(&self.partial) {
                Ok(_) => self.partial.len(),
                // `error_len() == None`: the input ends inside a sequence that may still
                // be completed; keep it (at most 3 bytes) for the next call.
                Err(err) if err.error_len().is_none() => err.valid_up_to(),
                Err(_) => self.partial.len(),
            };
            let rest = self.partial.split_off(complete);
            let bytes = std::mem::replace(&mut self.partial, rest);
            let text = String::from_utf8_lossy(&bytes);
            if !text.is_empty() {
                self.event("o", &text)?;
            }
        }
        Ok(())
    }

    /// Write out a split sequence still held (lossily): before a marker or a snapshot,
    /// and at the end.
    fn flush_partial(&mut self) -> io::Result<()> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.partial);
        self.event("o", &String::from_utf8_lossy(&bytes))
    }

    fn resize(&mut self, width: u16, height: u16) -> io::Result<()> {
        self.event("r", &format!("{width}x{height}"))
    }

    fn marker(&mut self, note: &str) -> io::Result<()> {
        self.flush_partial()?;
        self.event("m", note)
    }

    fn event(&mut self, code: &str, data: &str) -> io::Result<()> {
        let elapsed = (now_us() - self.origin_us) as f64 / 1e6;
        let time = self.last_time.max((elapsed * 1e6).round() / 1e6);
        self.last_time = time;
        serde_json::to_writer(&mut self.line, &(time, code, data))?;
        self.write_line()
    }

    fn write_line(&mut self) -> io::Result<()> {
        self.line.push(b'\n');
        let res = self.out.write_all(&self.line);
        self.len += self.line.len() as u64;
        self.line.clear();
        if self.line.capacity() > 4 * PIECE {
            self.line = Vec::new();
        }
        res
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The length of `path`'s first `len` bytes cut back to the last complete line.
fn whole_lines_len(path: &Path, len: u64) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn write_state(path: &Path, state: &State) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = open_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec(state)?)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

fn read_state(path: &Path) -> io::Result<State> {
    let data = std::fs::read(path)?;
    serde_json::from_slice(&data).map_err(io::Error::other)
}

/// Files of one shell's recording.
struct Paths {
    cast: PathBuf,
    state: PathBuf,
}

/// A running recorder as the core sees it.
struct Handle {
    /// Tells apart a recorder and its successor for the same shell.
    serial: u64,
    /// Flush requests, answered with the cast's length once it is all on disk.
    flush: mpsc::Sender<oneshot::Sender<u64>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

type Registry = Arc<Mutex<HashMap<(String, String), Handle>>>;

/// Where recordings live, and the recorders running now.
pub(crate) struct Recordings {
    dir: Option<PathBuf>,
    running: Registry,
    serial: AtomicU64,
}

/// What a recording request gets: the file and how much of it to serve.
pub(crate) struct RecordingFile {
    pub(crate) file: File,
    pub(crate) len: u64,
}

/// Why a recording cannot be served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordingError {
    #[error("no recording")]
    NotFound,
    #[error("cannot read the recording {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn lock(registry: &Registry) -> std::sync::MutexGuard<'_, HashMap<(String, String), Handle>> {
    registry.lock().unwrap_or_else(|e| e.into_inner())
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

impl Recordings {
    pub(crate) fn new(dir: Option<PathBuf>) -> Recordings {
        Recordings {
            dir,
            running: Arc::default(),
            serial: AtomicU64::new(0),
        }
    }

    fn session_dir(&self, session: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(session))
    }

    fn paths(&self, session: &str, shell_id: &str) -> Option<Paths> {
        let dir = self.session_dir(session)?;
        let stem = stem(shell_id);
        Some(Paths {
            cast: dir.join(format!("{stem}{CAST_SUFFIX}")),
            state: dir.join(format!("{stem}{STATE_SUFFIX}")),
        })
    }

    /// Start recording a shell the guest just opened. Failures are logged: the shell
    /// then runs unrecorded.
    pub(crate) async fn start(&self, session: &str, guest: &Guest, shell: &ShellInfo) {
        let Some(paths) = self.paths(session, &shell.shell_id) else {
            return;
        };
        // A shell id is reused once its shell exited: the previous recorder finishes
        // first (it is at the end of its output), then its recording is replaced.
        self.end(|(s, id)| s == session && *id == shell.shell_id)
            .await;
        let created = (|| -> io::Result<(Cast, State)> {
            if let Some(dir) = &self.dir {
                create_private_dir(dir)?;
            }
            if let Some(parent) = paths.cast.parent() {
                create_private_dir(parent)?;
            }
            if paths
                .cast
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes()[0] == b'~')
            {
                // A hashed name: refuse to overwrite another shell's recording.
                if let Ok(other) = read_state(&paths.state) {
                    if other.shell_id != shell.shell_id {
                        return Err(io::Error::other(format!(
                            "its file name collides with the recording of shell {:?}",
                            other.shell_id
                        )));
                    }
                }
            }
            let width = u16::try_from(shell.width).unwrap_or(u16::MAX);
            let height = u16::try_from(shell.height).unwrap_or(u16::MAX);
            let origin_us = now_us();
            let program = shell.argv.first().map_or("", String::as_str);
            let mut cast = Cast::create(
                &paths.cast,
                origin_us,
                width,
                height,
                program,
                &shell.shell_id,
            )?;
            cast.flush()?;
            let state = State {
                shell_id: shell.shell_id.clone(),
                started_at_ms: shell.started_at_ms,
                pid: shell.pid,
                offset: 0,
                cast_len: cast.len,
                origin_us,
                last_time: 0.0,
                width,
                height,
                done: false,
            };
            write_state(&paths.state, &state)?;
            Ok((cast, state))
        })();
        match created {
            Ok((cast, state)) => self.spawn(session, guest, paths, cast, state),
            Err(err) => tracing::warn!(
                session, shell = %shell.shell_id, path = %paths.cast.display(),
                "cannot record the shell: {err}"
            ),
        }
    }

    /// After a server restart: go on with every recording of the session that had not
    /// ended, for the shells the adopted sandbox still has; note the end of the others.
    pub(crate) async fn resume(&self, session: &str, guest: &Guest) {
        let Some(dir) = self.session_dir(session) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut pending = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(STATE_SUFFIX)) else {
                continue;
            };
            match read_state(&entry.path()) {
                // Only a state whose name its shell id gives (it was written by us).
                Ok(state) if !state.done && self::stem(&state.shell_id) == stem => {
                    pending.push(state)
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(
                    session, path = %entry.path().display(), "unreadable recording state: {err}"
                ),
            }
        }
        if pending.is_empty() {
            return;
        }
        let mut g = guest.clone();
        let shells = match tokio::time::timeout(ATTACH_TIMEOUT, g.shell_list(Empty {})).await {
            Ok(Ok(list)) => list.into_inner().shells,
            Ok(Err(status)) => {
                tracing::warn!(
                    session,
                    "cannot list the shells to resume recording: {status}"
                );
                Vec::new()
            }
            Err(_) => {
                tracing::warn!(session, "the guest did not list its shells in time");
                Vec::new()
            }
        };
        for state in pending {
            let Some(paths) = self.paths(session, &state.shell_id) else {
                continue;
            };
            let same = shells.iter().any(|s| {
                s.shell_id == state.shell_id
                    && s.started_at_ms == state.started_at_ms
                    && s.pid == state.pid
            });
            let resumed = Cast::resume(&paths.cast, &state).and_then(|(mut cast, short)| {
                if short {
                    cast.marker("berth: the end of this recording was lost (host crash)")?;
                }
                Ok(cast)
            });
            let mut cast = match resumed {
                Ok(cast) => cast,
                Err(err) => {
                    tracing::warn!(
                        session, shell = %state.shell_id, "cannot resume the recording: {err}"
                    );
                    continue;
                }
            };
            if same {
                tracing::info!(session, shell = %state.shell_id, offset = state.offset, "resuming the shell's recording");
                self.spawn(session, guest, paths, cast, state);
            } else {
                let mut state = state;
                let note = format!(
                    "berth: the shell ended while the server was down; its output from byte {} on was not recorded",
                    state.offset
                );
                let res = cast
                    .marker(&note)
                    .and_then(|()| cast.flush())
                    .and_then(|()| {
                        state.cast_len = cast.len;
                        state.last_time = cast.last_time;
                        state.done = true;
                        write_state(&paths.state, &state)
                    });
                if let Err(err) = res {
                    tracing::warn!(session, shell = %state.shell_id, "cannot close the recording: {err}");
                }
            }
        }
    }

    fn spawn(&self, session: &str, guest: &Guest, paths: Paths, cast: Cast, state: State) {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let (flush_tx, flush_rx) = mpsc::channel(4);
        let (stop_tx, stop_rx) = watch::channel(false);
        let key = (session.to_string(), state.shell_id.clone());
        let recorder = Recorder {
            session: session.to_string(),
            guest: guest.clone(),
            next: state.offset,
            persisted_at: Instant::now(),
            unpersisted: 0,
            capped: cast.len >= MAX_CAST_BYTES,
            cast,
            state,
            paths,
            flush: flush_rx,
            stop: stop_rx,
        };
        let registry = self.running.clone();
        // Registered before it can run, so that its own removal comes after.
        let mut running = lock(&self.running);
        let task = tokio::spawn({
            let key = key.clone();
            async move {
                recorder.run().await;
                let mut running = lock(&registry);
                if running.get(&key).is_some_and(|h| h.serial == serial) {
                    running.remove(&key);
                }
            }
        });
        running.insert(
            key,
            Handle {
                serial,
                flush: flush_tx,
                stop: stop_tx,
                task,
            },
        );
    }

    /// Stop the matching recorders and wait (a bounded time) until they have written
    /// everything they received.
    async fn end(&self, which: impl Fn(&(String, String)) -> bool) {
        let handles: Vec<Handle> = {
            let mut running = lock(&self.running);
            let keys: Vec<_> = running.keys().filter(|k| which(k)).cloned().collect();
            keys.iter().filter_map(|k| running.remove(k)).collect()
        };
        if handles.is_empty() {
            return;
        }
        for h in &handles {
            let _ = h.stop.send(true);
        }
        let deadline = Instant::now() + END_WAIT;
        for mut h in handles {
            if tokio::time::timeout_at(deadline, &mut h.task)
                .await
                .is_err()
            {
                tracing::warn!("a shell recorder did not finish in time");
                h.task.abort();
            }
        }
    }

    /// The session's sandbox stopped: its recorders write what they still have and end.
    pub(crate) async fn end_session(&self, session: &str) {
        self.end(|(s, _)| s == session).await;
    }

    /// The session was deleted: remove its recordings.
    pub(crate) fn delete_session(&self, session: &str) {
        let Some(dir) = self.session_dir(session) else {
            return;
        };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(
                session, dir = %dir.display(), "cannot remove the session's recordings: {err}"
            ),
        }
    }

    /// On start: remove the recordings of sessions that no longer exist (a delete that
    /// was interrupted).
    pub(crate) fn sweep(&self, sessions: &[&str]) {
        let Some(dir) = &self.dir else { return };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if berth_api::validate::id("session", name).is_ok() && !sessions.contains(&name) {
                tracing::info!(
                    session = name,
                    "removing the recordings of a deleted session"
                );
                self.delete_session(name);
            }
        }
    }

    /// The recording of a shell, up to its last complete line (all of what its recorder
    /// received, if one runs).
    pub(crate) async fn open(
        &self,
        session: &str,
        shell_id: &str,
    ) -> Result<RecordingFile, RecordingError> {
        let paths = self
            .paths(session, shell_id)
            .ok_or(RecordingError::NotFound)?;
        let io_err = |source: io::Error| RecordingError::Io {
            path: paths.cast.clone(),
            source,
        };
        let flush = lock(&self.running)
            .get(&(session.to_string(), shell_id.to_string()))
            .map(|h| h.flush.clone());
        let mut flushed = None;
        if let Some(flush) = flush {
            let (tx, rx) = oneshot::channel();
            if flush.send(tx).await.is_ok() {
                // No answer: the recorder ended (it flushed first) or is stuck; serve
                // what is on disk.
                flushed = tokio::time::timeout(FLUSH_WAIT, rx)
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
        }
        if paths
            .cast
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes()[0] == b'~')
        {
            match read_state(&paths.state) {
                Ok(state) if state.shell_id == shell_id => {}
                _ => return Err(RecordingError::NotFound),
            }
        }
        let file = match File::open(&paths.cast) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(RecordingError::NotFound)
            }
            Err(err) => return Err(io_err(err)),
        };
        let len = match flushed {
            Some(len) => len,
            None => {
                let len = file.metadata().map_err(io_err)?.len();
                whole_lines_len(&paths.cast, len).map_err(io_err)?
            }
        };
        Ok(RecordingFile { file, len })
    }
}

/// Why an attachment ended.
enum Ended {
    Exited,
    /// The guest dropped us for falling behind: reattach at once.
    TooSlow,
    Failed(String),
    /// The sandbox is stopping.
    Stopped,
    /// The recording cannot go on (the shell is gone, a write failed).
    Over(Option<String>),
}

/// One shell's recorder task.
struct Recorder {
    session: String,
    guest: Guest,
    cast: Cast,
    /// As last written to the state file (`offset`, `cast_len` and `last_time` are
    /// updated on each persist).
    state: State,
    paths: Paths,
    /// Output offset of the next byte expected from the guest (bytes held in
    /// `cast.partial` included).
    next: u64,
    persisted_at: Instant,
    /// Output bytes taken since the last persist.
    unpersisted: u64,
    /// The cast reached [`MAX_CAST_BYTES`].
    capped: bool,
    flush: mpsc::Receiver<oneshot::Sender<u64>>,
    stop: watch::Receiver<bool>,
}

impl Recorder {
    async fn run(mut self) {
        let mut failures = 0usize;
        let last = loop {
            if *self.stop.borrow() {
                break None;
            }
            let ended = self.attach_and_record().await;
            match ended {
                Ended::Exited | Ended::Stopped => break None,
                Ended::Over(note) => break note,
                Ended::TooSlow => {
                    tracing::debug!(session = %self.session, shell = %self.state.shell_id, offset = self.next, "recorder fell behind; reattaching");
                }
                Ended::Failed(why) => {
                    let Some(delay) = RETRY_DELAYS.get(failures) else {
                        break Some(format!("berth: recording stopped: {why}"));
                    };
                    failures += 1;
                    tracing::debug!(session = %self.session, shell = %self.state.shell_id, "recorder attachment failed: {why}");
                    if !self.pause(Duration::from_secs(*delay)).await {
                        break None;
                    }
                }
            }
        };
        if let Err(err) = self.finish(last.as_deref()) {
            tracing::warn!(session = %self.session, shell = %self.state.shell_id, "cannot finish the shell's recording: {err}");
        }
    }

    /// Wait `delay`, serving flush requests; false if told to stop meanwhile.
    async fn pause(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                Some(ack) = self.flush.recv() => self.answer(ack),
                res = self.stop.changed() => if res.is_err() || *self.stop.borrow() {
                    return false;
                },
                () = tokio::time::sleep_until(until) => return true,
            }
        }
    }

    fn answer(&mut self, ack: oneshot::Sender<u64>) {
        match self.persist() {
            Ok(()) => {
                let _ = ack.send(self.cast.len);
            }
            Err(err) => {
                tracing::warn!(session = %self.session, shell = %self.state.shell_id, "cannot write the shell's recording: {err}");
            }
        }
    }

    /// Write out the cast, then the state saying how far it goes.
    fn persist(&mut self) -> io::Result<()> {
        self.cast.flush()?;
        self.state.offset = self.next - self.cast.partial.len() as u64;
        self.state.cast_len = self.cast.len;
        self.state.last_time = self.cast.last_time;
        write_state(&self.paths.state, &self.state)?;
        self.persisted_at = Instant::now();
        self.unpersisted = 0;
        Ok(())
    }

    fn finish(&mut self, note: Option<&str>) -> io::Result<()> {
        self.cast.flush_partial()?;
        if let Some(note) = note {
            self.cast.marker(note)?;
        }
        self.state.done = true;
        self.persist()
    }

    /// One attachment: attach at `next`, record until it ends.
    async fn attach_and_record(&mut self) -> Ended {
        let start = ShellAttachStart {
            shell_id: self.state.shell_id.clone(),
            watch: true,
            recorder: true,
            offset: Some(self.next),
            width: 0,
            height: 0,
        };
        let mut guest = self.guest.clone();
        let attach = async {
            let mut att = berth_guest::client::shell_attach(&mut guest, start).await?;
            let first = att.output.message().await?;
            let Some(ShellOutput {
                kind: Some(shell_output::Kind::Attached(attached)),
            }) = first
            else {
                return Err(tonic::Status::internal(
                    "shell attach began without `attached`",
                ));
            };
            let snapshot = if attached.snapshot {
                match att.output.message().await? {
                    Some(ShellOutput {
                        kind: Some(shell_output::Kind::Snapshot(bytes)),
                    }) => Some(bytes),
                    _ => return Err(tonic::Status::internal("shell attach lacks its snapshot")),
                }
            } else {
                None
            };
            Ok((att, attached, snapshot))
        };
        let mut stop = self.stop.clone();
        let attached = tokio::select! {
            res = tokio::time::timeout(ATTACH_TIMEOUT, attach) => res,
            _ = stop.wait_for(|s| *s) => return Ended::Stopped,
        };
        let (att, attached, snapshot) = match attached {
            Ok(Ok(a)) => a,
            Ok(Err(status)) => {
                return match status.code() {
                    tonic::Code::NotFound => Ended::Over(Some(
                        "berth: recording stopped: the shell no longer exists".into(),
                    )),
                    tonic::Code::InvalidArgument => Ended::Over(Some(format!(
                        "berth: recording stopped: the guest rejected offset {}: {}",
                        self.next,
                        status.message()
                    ))),
                    _ => Ended::Failed(status.to_string()),
                }
            }
            Err(_) => return Ended::Failed("the guest did not answer the attach in time".into()),
        };
        if let Err(err) = self.begin(&attached, snapshot) {
            return Ended::Over(Some(format!("berth: recording stopped: {err}")));
        }
        self.record(att).await
    }

    /// Note a gap and a size change the attachment reveals.
    fn begin(
        &mut self,
        attached: &berth_guest::proto::ShellAttached,
        snapshot: Option<Bytes>,
    ) -> io::Result<()> {
        if attached.offset > self.next {
            let lost = attached.offset - self.next;
            tracing::warn!(
                session = %self.session, shell = %self.state.shell_id, lost,
                "output was lost before it could be recorded (the guest no longer held it)"
            );
            if !self.capped {
                self.cast.marker(&format!(
                    "berth: {lost} bytes of output (offsets {} to {}) were lost before they could be recorded",
                    self.next, attached.offset
                ))?;
            }
            self.next = attached.offset;
        }
        self.size(attached.width, attached.height)?;
        if let Some(snapshot) = snapshot {
            // Redraws the screen, so that playback after the gap shows the right
            // terminal; not part of the output stream.
            if !self.capped {
                self.cast.flush_partial()?;
                self.cast.output(&snapshot)?;
                self.cast.flush_partial()?;
            }
        }
        Ok(())
    }

    fn size(&mut self, width: u32, height: u32) -> io::Result<()> {
        let (Ok(width), Ok(height)) = (u16::try_from(width), u16::try_from(height)) else {
            return Ok(());
        };
        if width == 0 || height == 0 || (width, height) == (self.state.width, self.state.height) {
            return Ok(());
        }
        self.state.width = width;
        self.state.height = height;
        if self.capped {
            return Ok(());
        }
        self.cast.resize(width, height)
    }

    /// Take output at `offset`, skipping what was recorded already.
    fn take(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset > self.next {
            // Never from a well-behaved guest within one attachment.
            if !self.capped {
                self.cast.marker(&format!(
                    "berth: {} bytes of output (offsets {} to {offset}) are missing",
                    offset - self.next,
                    self.next
                ))?;
            }
            self.next = offset;
        }
        let end = offset + data.len() as u64;
        if end <= self.next {
            return Ok(());
        }
        let fresh = &data[(self.next - offset) as usize..];
        if !self.capped {
            self.cast.output(fresh)?;
            if self.cast.len >= MAX_CAST_BYTES {
                self.capped = true;
                self.cast.marker(&format!(
                    "berth: this recording reached its limit of {MAX_CAST_BYTES} bytes; later output is not recorded"
                ))?;
            }
        }
        if self.capped {
            self.cast.partial.clear();
        }
        self.next = end;
        self.unpersisted += fresh.len() as u64;
        Ok(())
    }

    async fn record(&mut self, att: berth_guest::client::ShellAttachment) -> Ended {
        let berth_guest::client::ShellAttachment {
            input: _input,
            mut output,
        } = att;
        let mut tick = tokio::time::interval_at(Instant::now() + FLUSH_INTERVAL, FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain: Option<Instant> = self.stop.borrow().then(|| Instant::now() + DRAIN);
        let mut stop = self.stop.clone();
        loop {
            let res = tokio::select! {
                biased;
                Some(ack) = self.flush.recv() => {
                    self.answer(ack);
                    Ok(())
                }
                msg = output.message() => match msg {
                    Ok(Some(ShellOutput { kind: Some(kind) })) => match kind {
                        shell_output::Kind::Output(d) => self.take(d.offset, &d.data),
                        shell_output::Kind::Resized(size) => self.size(size.width, size.height),
                        shell_output::Kind::Exited(_) => return Ended::Exited,
                        shell_output::Kind::Attached(_)
                        | shell_output::Kind::Snapshot(_)
                        | shell_output::Kind::Heartbeat(_)
                        | shell_output::Kind::Notice(_) => Ok(()),
                    },
                    Ok(Some(ShellOutput { kind: None })) => Ok(()),
                    Ok(None) if drain.is_some() => return Ended::Stopped,
                    Ok(None) => return Ended::Failed("the shell's output ended without an exit status".into()),
                    Err(_) if drain.is_some() => return Ended::Stopped,
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => return Ended::TooSlow,
                    Err(status) => return Ended::Failed(status.to_string()),
                },
                _ = tick.tick() => {
                    if self.unpersisted > 0 || self.cast.len != self.state.cast_len {
                        self.persist()
                    } else {
                        Ok(())
                    }
                }
                res = stop.changed(), if drain.is_none() => {
                    if res.is_err() || *stop.borrow() {
                        drain = Some(Instant::now() + DRAIN);
                    }
                    Ok(())
                }
                () = sleep_until(drain) => return Ended::Stopped,
            };
            let res = res.and_then(|()| {
                if self.unpersisted >= PERSIST_BYTES
                    && self.persisted_at.elapsed() >= PERSIST_MIN_INTERVAL
                {
                    self.persist()
                } else {
                    Ok(())
                }
            });
            if let Err(err) = res {
                tracing::warn!(session = %self.session, shell = %self.state.shell_id, path = %self.paths.cast.display(), "shell recording stopped: {err}");
                return Ended::Over(None);
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Read a recording file as a stream of chunks.
pub(crate) fn stream_file(
    file: RecordingFile,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
    use tokio::io::AsyncReadExt as _;
    let reader = tokio::fs::File::from_std(file.file).take(file.len);
    futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        match reader.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(buf.freeze()), Some(reader))),
            Err(err) => Some((Err(err), None)),
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn events(path: &Path) -> (serde_json::Value, Vec<(f64, String, String)>) {
        let content = std::fs::read_to_string(path).unwrap();
        let mut lines = content.lines();
        let header = serde_json::from_str(lines.next().unwrap()).unwrap();
        let events = lines
            .map(|l| {
                let ev: (f64, String, String) = serde_json::from_str(l).unwrap();
                ev
            })
            .collect();
        (header, events)
    }

    #[test]
    fn split_utf8_and_json_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cast");
        let mut rec = Cast::create(&path, now_us(), 80, 24, "bash", "a").unwrap();
        let text = "é\u{1b}[31m\"x\"\r\n€";
        let bytes = text.as_bytes();
        // Split inside the two-byte `é` and the three-byte `€`.
        rec.output(&bytes[..1]).unwrap();
        rec.output(&bytes[1..bytes.len() - 1]).unwrap();
        rec.resize(100, 30).unwrap();
        rec.output(&bytes[bytes.len() - 1..]).unwrap();
        rec.output(b"\xff").unwrap();
        rec.flush_partial().unwrap();
        rec.flush().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), rec.len);
        let (header, events) = events(&path);
        assert_eq!(header["version"], 2);
        assert_eq!(header["width"], 80);
        assert_eq!(header["env"]["TERM"], TERM);
        assert_eq!(header["env"]["SHELL"], "bash");
        let mut out = String::new();
        let mut resizes = Vec::new();
        let mut last = 0.0;
        for (time, code, data) in events {
            assert!(time >= last);
            last = time;
            match code.as_str() {
                "o" => out.push_str(&data),
                "r" => resizes.push(data),
                other => panic!("unexpected event {other}"),
            }
        }
        assert_eq!(out, format!("{text}\u{fffd}"));
        assert_eq!(resizes, ["100x30"]);
    }

    #[test]
    fn resume_cuts_what_the_state_does_not_cover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cast");
        let origin = now_us();
        let mut rec = Cast::create(&path, origin, 80, 24, "sh", "a").unwrap();
        rec.output(b"one\n").unwrap();
        rec.flush().unwrap();
        let state = State {
            shell_id: "a".into(),
            started_at_ms: 1,
            pid: 2,
            offset: 4,
            cast_len: rec.len,
            origin_us: origin,
            last_time: rec.last_time,
            width: 80,
            height: 24,
            done: false,
        };
        // Written after the state, then a torn line: both go.
        rec.output(b"two\n").unwrap();
        rec.flush().unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"[1.0, \"o\", \"thr")
            .unwrap();
        let (mut rec, short) = Cast::resume(&path, &state).unwrap();
        assert!(!short);
        rec.output(b"two\n").unwrap();
        rec.flush().unwrap();
        let (_, events) = events(&path);
        let out: String = events.iter().map(|e| e.2.as_str()).collect();
        assert_eq!(out, "one\ntwo\n");

        // A cast shorter than its state (a host crash): whole lines are kept.
        let mut state = state;
        state.cast_len = rec.len + 100;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        (&f).write_all(b"[2.0, \"o\"").unwrap();
        let (_, short) = Cast::resume(&path, &state).unwrap();
        assert!(short);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), rec.len);
    }

    #[test]
    fn whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut data = vec![b'x'; 100_000];
        data.push(b'\n');
        data.extend_from_slice(&[b'y'; 70_000]);
        std::fs::write(&path, &data).unwrap();
        assert_eq!(whole_lines_len(&path, data.len() as u64).unwrap(), 100_001);
        assert_eq!(whole_lines_len(&path, 50).unwrap(), 0);
    }

    #[test]
    fn stems_stay_inside_the_directory_and_apart() {
        assert_eq!(stem("main"), "main");
        assert_eq!(stem("sh-0123abcd_x.y"), "sh-0123abcd_x.y");
        assert_eq!(stem(".."), "%2E.");
        assert_eq!(stem("."), "%2E");
        assert_eq!(stem("a b%"), "a%20b%25");
        assert_eq!(stem("~x"), "%7Ex");
        assert_eq!(stem("é"), "%C3%A9");
        let long = "é".repeat(128);
        let hashed = stem(&long);
        assert!(hashed.starts_with('~') && hashed.len() == 33, "{hashed}");
        assert_ne!(hashed, stem(&"è".repeat(128)));
        for id in ["main", "..", "a b", &long, &"x".repeat(128)] {
            let s = stem(id);
            assert!(!s.contains('/') && !s.starts_with('.'), "{id:?} -> {s}");
            assert!(s.len() + STATE_SUFFIX.len() + 4 <= 255, "{id:?}");
        }
    }
}

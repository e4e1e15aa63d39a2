//! Commands: one guest `Exec` call per request, mapped to API events as they arrive.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use berth_api::{validate, CommandEvent, CommandRequest};
use berth_guest::proto::{exec_input, exec_output, ExecInput, ExecStart};
use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;

use crate::sessions::{BusyGuard, Slot};
use crate::{Core, CoreError};

/// The events of one command, in order; ends after `exit` (or `error`). Dropping it
/// cancels the guest call, which kills the command's process group.
pub type CommandStream = Pin<Box<dyn Stream<Item = ExecEvent> + Send>>;

/// One event of a running command, with output as raw bytes; transports choose the
/// encoding (NDJSON with base64, or binary frames).
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    Started {
        command_id: String,
        session_id: String,
    },
    Stdout(Bytes),
    Stderr(Bytes),
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        duration_ms: u64,
    },
    Error(berth_api::ApiError),
}

impl ExecEvent {
    /// The API's JSON event (output base64-encoded).
    pub fn to_api(&self) -> CommandEvent {
        match self {
            ExecEvent::Started {
                command_id,
                session_id,
            } => CommandEvent::Started {
                command_id: command_id.clone(),
                session_id: session_id.clone(),
            },
            ExecEvent::Stdout(b) => CommandEvent::Stdout { data: b64(b) },
            ExecEvent::Stderr(b) => CommandEvent::Stderr { data: b64(b) },
            ExecEvent::Exit {
                code,
                signal,
                timed_out,
                duration_ms,
            } => CommandEvent::Exit {
                code: *code,
                signal: *signal,
                timed_out: *timed_out,
                duration_ms: *duration_ms,
            },
            ExecEvent::Error(error) => CommandEvent::Error {
                error: error.clone(),
            },
        }
    }
}

/// Longest accepted `timeout_s` (a week).
const MAX_TIMEOUT_S: f64 = 7.0 * 24.0 * 3600.0;

fn argv_of(req: &CommandRequest) -> Result<Vec<String>, CoreError> {
    match (&req.command, &req.argv) {
        (Some(_), Some(_)) => Err(CoreError::invalid(
            "command",
            "give either command or argv, not both",
        )),
        (None, None) => Err(CoreError::invalid(
            "command",
            "give command (a shell string) or argv (a list)",
        )),
        (Some(c), None) if c.is_empty() => Err(CoreError::invalid("command", "must not be empty")),
        (Some(c), None) => Ok(vec!["/bin/sh".into(), "-c".into(), c.clone()]),
        (None, Some(a)) if a.is_empty() || a[0].is_empty() => Err(CoreError::invalid(
            "argv",
            "must hold at least the program to run",
        )),
        (None, Some(a)) => Ok(a.clone()),
    }
}

fn stdin_of(req: &CommandRequest) -> Result<Option<Vec<u8>>, CoreError> {
    match (&req.stdin, &req.stdin_b64) {
        (Some(_), Some(_)) => Err(CoreError::invalid(
            "stdin",
            "give either stdin or stdin_b64, not both",
        )),
        (Some(s), None) => Ok(Some(s.clone().into_bytes())),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map(Some)
            .map_err(|e| CoreError::invalid("stdin_b64", format!("not valid base64: {e}"))),
        (None, None) => Ok(None),
    }
}

fn timeout_ms_of(req: &CommandRequest) -> Result<u64, CoreError> {
    match req.timeout_s {
        None => Ok(0),
        Some(t) if t.is_finite() && t > 0.0 && t <= MAX_TIMEOUT_S => Ok((t * 1000.0).ceil() as u64),
        Some(_) => Err(CoreError::invalid(
            "timeout_s",
            format!("must be a number of seconds in (0, {MAX_TIMEOUT_S}]"),
        )),
    }
}

/// Parse `INT`, `SIGINT`, `2`.
pub(crate) fn parse_signal(name: &str) -> Result<i32, CoreError> {
    const NAMES: &[(&str, i32)] = &[
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("KILL", 9),
        ("USR1", 10),
        ("USR2", 12),
        ("PIPE", 13),
        ("ALRM", 14),
        ("TERM", 15),
        ("CONT", 18),
        ("STOP", 19),
        ("TSTP", 20),
        ("WINCH", 28),
    ];
    if let Ok(n) = name.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    NAMES
        .iter()
        .find(|(n, _)| *n == bare)
        .map(|(_, v)| *v)
        .ok_or_else(|| CoreError::invalid("signal", format!("unknown signal {name:?}")))
}

fn new_command_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("c-{n:016x}")
}

/// Unregisters a command's signal route when the stream ends or is dropped.
struct CommandRoute {
    slot: Arc<Slot>,
    id: String,
}

impl Drop for CommandRoute {
    fn drop(&mut self) {
        #[allow(clippy::unwrap_used)]
        self.slot.commands.lock().unwrap().remove(&self.id);
    }
}

impl Core {
    /// Run a command in the session (creating and starting it as needed) and stream
    /// its events.
    pub async fn run_command(
        &self,
        session_id: &str,
        req: CommandRequest,
    ) -> Result<CommandStream, CoreError> {
        let argv = argv_of(&req)?;
        let stdin = stdin_of(&req)?;
        let timeout_ms = timeout_ms_of(&req)?;
        if let Some(cwd) = &req.cwd {
            validate::sandbox_path("cwd", cwd)?;
        }
        validate::env_names("env", req.env.keys())?;
        self.record_or_create(session_id, req.runtime.as_deref())
            .await?;
        let (slot, sandbox, runtime) = self.ensure_running(session_id).await?;
        let busy = BusyGuard::new(slot.clone());

        let (input_tx, input_rx) = mpsc::channel::<ExecInput>(8);
        let start = ExecStart {
            argv,
            cwd: req.cwd.clone().unwrap_or(runtime.workspace_path.clone()),
            env: req.env.clone().into_iter().collect(),
            timeout_ms,
            stdin: stdin.is_some(),
        };
        let send = |kind| ExecInput { kind: Some(kind) };
        // The channel has room for these three, so this never waits.
        let _ = input_tx.send(send(exec_input::Kind::Start(start))).await;
        if let Some(bytes) = stdin {
            if !bytes.is_empty() {
                let _ = input_tx
                    .send(send(exec_input::Kind::Stdin(bytes.into())))
                    .await;
            }
            let _ = input_tx
                .send(send(exec_input::Kind::CloseStdin(
                    berth_guest::proto::Empty {},
                )))
                .await;
        }

        let mut guest = sandbox.guest.clone();
        let outputs = guest
            .exec(tokio_stream::wrappers::ReceiverStream::new(input_rx))
            .await
            .map_err(|s| CoreError::guest(session_id, s))?
            .into_inner();

        let command_id = new_command_id();
        let (signal_tx, signal_rx) = mpsc::channel::<i32>(4);
        #[allow(clippy::unwrap_used)]
        slot.commands
            .lock()
            .unwrap()
            .insert(command_id.clone(), signal_tx);
        let route = CommandRoute {
            slot: slot.clone(),
            id: command_id.clone(),
        };
        // Polled directly by the HTTP body: no task or channel hop per output chunk.
        // Dropping the stream (the client went away) drops the guest call, and the guest
        // then kills the process group — even while the command is silent.
        let state = CommandState {
            outputs,
            input_tx,
            signal_rx,
            session: session_id.to_string(),
            began: Instant::now(),
            pending: Some(ExecEvent::Started {
                command_id,
                session_id: session_id.to_string(),
            }),
            done: false,
            _busy: busy,
            _route: route,
        };
        let stream: CommandStream = Box::pin(futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            if let Some(ev) = st.pending.take() {
                return Some((ev, st));
            }
            let event = st.next_event().await;
            st.done = matches!(event, ExecEvent::Exit { .. } | ExecEvent::Error(_));
            Some((event, st))
        }));
        Ok(stream)
    }

    /// Deliver a signal to a running command's process group.
    pub async fn signal_command(
        &self,
        session_id: &str,
        command_id: &str,
        signal: &str,
    ) -> Result<(), CoreError> {
        berth_api::validate::id("session_id", session_id)?;
        let sig = parse_signal(signal)?;
        self.record(session_id).await?;
        let sender = {
            #[allow(clippy::unwrap_used)]
            self.slot(session_id)
                .commands
                .lock()
                .unwrap()
                .get(command_id)
                .cloned()
        };
        let sender = sender.ok_or_else(|| CoreError::NotFound {
            what: "running command",
            id: command_id.into(),
        })?;
        sender.send(sig).await.map_err(|_| CoreError::NotFound {
            what: "running command",
            id: command_id.into(),
        })
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What a running command's event stream holds between events.
struct CommandState {
    outputs: tonic::Streaming<berth_guest::proto::ExecOutput>,
    input_tx: mpsc::Sender<ExecInput>,
    signal_rx: mpsc::Receiver<i32>,
    session: String,
    began: Instant,
    /// An event to yield before reading the guest again (`started`).
    pending: Option<ExecEvent>,
    done: bool,
    _busy: BusyGuard,
    _route: CommandRoute,
}

impl CommandState {
    /// The next event from the guest, forwarding signals meanwhile.
    async fn next_event(&mut self) -> ExecEvent {
        loop {
            let msg = tokio::select! {
                msg = self.outputs.message() => msg,
                Some(sig) = self.signal_rx.recv() => {
                    let _ = self.input_tx.send(ExecInput { kind: Some(exec_input::Kind::Signal(sig)) }).await;
                    continue;
                }
            };
            return match msg {
                Ok(Some(out)) => match out.kind {
                    Some(exec_output::Kind::Stdout(b)) => ExecEvent::Stdout(b),
                    Some(exec_output::Kind::Stderr(b)) => ExecEvent::Stderr(b),
                    Some(exec_output::Kind::Exited(x)) => ExecEvent::Exit {
                        code: x.code,
                        signal: x.signal,
                        timed_out: x.timed_out,
                        duration_ms: u64::try_from(self.began.elapsed().as_millis())
                            .unwrap_or(u64::MAX),
                    },
                    Some(exec_output::Kind::Started(_)) | None => continue,
                },
                Ok(None) => ExecEvent::Error(berth_api::ApiError::new(
                    berth_api::ErrorCode::Unavailable,
                    "the sandbox ended before the command reported its exit",
                )),
                Err(status) => ExecEvent::Error((&CoreError::guest(&self.session, status)).into()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_rules() {
        let mut req = CommandRequest {
            command: Some("echo hi".into()),
            ..Default::default()
        };
        assert_eq!(argv_of(&req).unwrap(), ["/bin/sh", "-c", "echo hi"]);
        req.argv = Some(vec!["true".into()]);
        assert!(
            matches!(argv_of(&req), Err(CoreError::Invalid { field, .. }) if field == "command")
        );
        req.command = None;
        assert_eq!(argv_of(&req).unwrap(), ["true"]);
        req.argv = Some(vec![]);
        assert!(matches!(argv_of(&req), Err(CoreError::Invalid { field, .. }) if field == "argv"));
    }

    #[test]
    fn timeouts_and_signals() {
        let req = |t| CommandRequest {
            timeout_s: Some(t),
            ..Default::default()
        };
        assert_eq!(timeout_ms_of(&req(0.5)).unwrap(), 500);
        assert!(timeout_ms_of(&req(-1.0)).is_err());
        assert!(timeout_ms_of(&req(f64::NAN)).is_err());
        assert_eq!(parse_signal("INT").unwrap(), 2);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert!(parse_signal("NOPE").is_err());
    }
}

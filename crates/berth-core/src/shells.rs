//! Interactive shells: the guest's `Shell*` calls behind the session lifecycle.
//!
//! Opening a shell creates and starts the session like a command does. Listing, killing
//! and attaching never start a sandbox: shells live in the guest and end with it, so a
//! stopped session has none. An attachment holds a [`BusyGuard`] for as long as it
//! lives, so an attached client keeps the session from idling out. Every shell is also
//! recorded by the host (`recordings.rs`): its recording outlives the sandbox, and its
//! recorder never keeps the session busy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use berth_api::shell::{exit_code, AttachMode, AttachOptions, OpenShell, ShellInfo};
use berth_api::validate;
use berth_guest::proto::{
    shell_output, Empty, ShellAttachStart, ShellInput, ShellKillRequest, ShellOpenRequest,
    ShellOutput,
};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::files::ReadStream;
use crate::recordings::{self, RecordingError};
use crate::sessions::{BusyGuard, Slot};
use crate::{now_ms, Core, CoreError, DriverError, Sandbox};

/// How the attach began: what the first status frame reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellAttached {
    pub shell_id: String,
    pub reconnected: bool,
    /// Output offset of the first byte after the snapshot (or of the replay).
    pub offset: u64,
    /// Escape sequences redrawing the screen, when the attach did not resume from an
    /// offset still in the guest's ring buffer.
    pub snapshot: Option<Bytes>,
}

/// Why the guest rejected an input; the attachment continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// Input from a read-only (watch) client.
    Forbidden,
    /// A malformed or unusable input.
    BadRequest,
}

/// What an attachment yields after [`ShellAttached`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellEvent {
    /// Output starting at `offset`.
    Output {
        offset: u64,
        data: Bytes,
    },
    Notice {
        kind: NoticeKind,
        message: String,
    },
    /// The shell exited; nothing follows.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The client fell too far behind and was dropped; reattach with `offset`.
    TooSlow {
        offset: u64,
        message: String,
    },
    /// The attachment failed (the sandbox went away); nothing follows.
    Failed(berth_api::ApiError),
}

/// The input side of an attachment. Cheap to clone.
#[derive(Clone)]
pub struct ShellInputs {
    tx: mpsc::Sender<ShellInput>,
    slot: Arc<Slot>,
}

impl ShellInputs {
    /// Keystrokes. `false` once the attachment is gone.
    pub async fn stdin(&self, data: Bytes) -> bool {
        self.tx.send(ShellInput::stdin(data)).await.is_ok()
    }

    pub async fn resize(&self, width: u16, height: u16) -> bool {
        self.tx
            .send(ShellInput::resize(u32::from(width), u32::from(height)))
            .await
            .is_ok()
    }

    /// A client heartbeat: counts as session activity.
    pub fn heartbeat(&self) {
        self.slot
            .last_activity_ms
            .fetch_max(now_ms(), Ordering::SeqCst);
    }
}

/// The output side of an attachment; dropping it detaches.
pub struct ShellEvents {
    output: tonic::Streaming<ShellOutput>,
    session: String,
    /// Offset of the next output byte.
    next: u64,
    done: bool,
    _busy: BusyGuard,
}

impl ShellEvents {
    /// The next event, or `None` after the last one (`Exited`, `TooSlow`, `Failed`).
    pub async fn next(&mut self) -> Option<ShellEvent> {
        if self.done {
            return None;
        }
        loop {
            let msg = self.output.message().await;
            let event = match msg {
                Ok(Some(ShellOutput { kind: Some(kind) })) => match kind {
                    shell_output::Kind::Output(d) => {
                        self.next = d.offset + d.data.len() as u64;
                        ShellEvent::Output {
                            offset: d.offset,
                            data: d.data,
                        }
                    }
                    shell_output::Kind::Notice(n) => ShellEvent::Notice {
                        kind: if n.code == tonic::Code::PermissionDenied as i32 {
                            NoticeKind::Forbidden
                        } else {
                            NoticeKind::BadRequest
                        },
                        message: n.message,
                    },
                    shell_output::Kind::Exited(x) => ShellEvent::Exited {
                        code: x.code,
                        signal: x.signal,
                    },
                    // Heartbeats are answered by the transport; a late snapshot or
                    // `attached` cannot happen; resizes go to recorders only.
                    shell_output::Kind::Heartbeat(_)
                    | shell_output::Kind::Snapshot(_)
                    | shell_output::Kind::Attached(_)
                    | shell_output::Kind::Resized(_) => continue,
                },
                Ok(Some(ShellOutput { kind: None })) => continue,
                Ok(None) => ShellEvent::Failed(berth_api::ApiError::new(
                    berth_api::ErrorCode::Unavailable,
                    "the shell's output ended without an exit status (the sandbox stopped?)",
                )),
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    ShellEvent::TooSlow {
                        offset: self.next,
                        message: format!(
                            "this client fell too far behind the shell's output and was dropped; reattach with offset {}",
                            self.next
                        ),
                    }
                }
                Err(status) => {
                    ShellEvent::Failed((&CoreError::guest(&self.session, status)).into())
                }
            };
            self.done = !matches!(event, ShellEvent::Output { .. } | ShellEvent::Notice { .. });
            return Some(event);
        }
    }
}

/// A live attachment: how it began, its input side and its output side.
pub struct ShellAttachment {
    pub attached: ShellAttached,
    pub inputs: ShellInputs,
    pub events: ShellEvents,
}

fn info_of(s: berth_guest::proto::ShellInfo) -> ShellInfo {
    let (code, signal) = s.exited.map_or((None, None), |x| (x.code, x.signal));
    ShellInfo {
        shell_id: s.shell_id,
        command: s.argv,
        width: u16::try_from(s.width).unwrap_or(u16::MAX),
        height: u16::try_from(s.height).unwrap_or(u16::MAX),
        clients: s.clients,
        watchers: s.watchers,
        started_at_ms: s.started_at_ms,
        running: s.running,
        exit_code: (!s.running).then(|| exit_code(code, signal)),
        signal,
    }
}

impl Core {
    /// The session's sandbox if it is running (never starts one). 404 when the session
    /// does not exist.
    async fn running_sandbox(&self, id: &str) -> Result<Option<(Arc<Slot>, Sandbox)>, CoreError> {
        validate::id("session_id", id)?;
        self.record(id).await?;
        let slot = self.slot(id);
        let live = slot.live.lock().await;
        let sandbox = live.as_ref().map(|l| l.sandbox.clone());
        drop(live);
        Ok(sandbox.map(|s| (slot, s)))
    }

    fn shell_error(&self, session: &str, shell: &str, status: tonic::Status) -> CoreError {
        match status.code() {
            tonic::Code::NotFound => CoreError::NotFound {
                what: "shell",
                id: shell.to_string(),
            },
            tonic::Code::AlreadyExists => CoreError::AlreadyExists {
                what: "shell",
                id: shell.to_string(),
            },
            _ => CoreError::guest(session, status),
        }
    }

    /// Start a shell in the session, creating and starting the session as needed.
    pub async fn open_shell(
        &self,
        session_id: &str,
        req: OpenShell,
    ) -> Result<ShellInfo, CoreError> {
        req.validate()?;
        self.record_or_create(session_id, None).await?;
        let (slot, sandbox, runtime) = self.ensure_running(session_id).await?;
        let _busy = BusyGuard::new(slot.clone());
        let request = ShellOpenRequest {
            shell_id: req.shell_id.clone().unwrap_or_default(),
            argv: req.command.unwrap_or_default(),
            // What the recording's header says.
            env: [("TERM".to_string(), recordings::TERM.to_string())].into(),
            cwd: req
                .cwd
                .clone()
                .unwrap_or_else(|| runtime.workspace_path.clone()),
            width: req.width.map_or(0, u32::from),
            height: req.height.map_or(0, u32::from),
            max_shells: u32::try_from(self.config().max_shells).unwrap_or(u32::MAX),
        };
        let mut guest = sandbox.guest.clone();
        let shell = req.shell_id.unwrap_or_default();
        match guest.shell_open(request).await {
            Ok(info) => {
                let info = info.into_inner();
                // The id names the recording's file: take it from the guest only if it
                // is a valid one, and the one asked for.
                let id_ok = berth_api::shell::validate_shell_id("shell_id", &info.shell_id)
                    .is_ok()
                    && (shell.is_empty() || info.shell_id == shell);
                // The recorder starts under the session lock, and only if the sandbox
                // is still the one the shell was opened in: a stop ends the recorders
                // it finds, so none may start behind its back.
                let live = slot.live.lock().await;
                if !id_ok {
                    tracing::warn!(session = session_id, shell = ?info.shell_id, "the guest answered with another shell id; not recording it");
                } else if live
                    .as_ref()
                    .is_some_and(|l| l.sandbox.init_pid == sandbox.init_pid)
                {
                    self.recordings()
                        .start(session_id, &sandbox.guest, &info)
                        .await;
                }
                drop(live);
                Ok(info_of(info))
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                Err(CoreError::Guest {
                    session: session_id.to_string(),
                    status: tonic::Status::resource_exhausted(format!(
                        "{}; kill one (DELETE /v1/sessions/{session_id}/shells/SHELL) or raise --max-shells",
                        status.message()
                    )),
                })
            }
            Err(status) => Err(self.shell_error(session_id, &shell, status)),
        }
    }

    /// The session's shells (running ones and recently exited ones); none when the
    /// session is stopped.
    pub async fn list_shells(&self, session_id: &str) -> Result<Vec<ShellInfo>, CoreError> {
        let Some((_, sandbox)) = self.running_sandbox(session_id).await? else {
            return Ok(Vec::new());
        };
        let mut guest = sandbox.guest.clone();
        let list = guest
            .shell_list(Empty {})
            .await
            .map_err(|s| CoreError::guest(session_id, s))?
            .into_inner();
        let mut shells: Vec<ShellInfo> = list.shells.into_iter().map(info_of).collect();
        shells.sort_by(|a, b| {
            a.started_at_ms
                .cmp(&b.started_at_ms)
                .then_with(|| a.shell_id.cmp(&b.shell_id))
        });
        Ok(shells)
    }

    fn shell_not_found(shell_id: &str) -> CoreError {
        CoreError::NotFound {
            what: "shell",
            id: shell_id.to_string(),
        }
    }

    /// Kill a shell (SIGHUP, then SIGKILL) and wait for it to exit; an exited shell is
    /// forgotten.
    pub async fn kill_shell(
        &self,
        session_id: &str,
        shell_id: &str,
    ) -> Result<ShellInfo, CoreError> {
        berth_api::shell::validate_shell_id("shell_id", shell_id)?;
        let Some((_, sandbox)) = self.running_sandbox(session_id).await? else {
            return Err(Self::shell_not_found(shell_id));
        };
        let mut guest = sandbox.guest.clone();
        guest
            .shell_kill(ShellKillRequest {
                shell_id: shell_id.to_string(),
                signal: 0,
            })
            .await
            .map(|r| info_of(r.into_inner()))
            .map_err(|s| self.shell_error(session_id, shell_id, s))
    }

    /// The shell's asciicast v2 recording so far, read from the host's logs dir: works
    /// whether or not the session is running (a stopped session's shells are over, and
    /// so are their recordings).
    pub async fn shell_recording(
        &self,
        session_id: &str,
        shell_id: &str,
    ) -> Result<ReadStream, CoreError> {
        validate::id("session_id", session_id)?;
        berth_api::shell::validate_shell_id("shell_id", shell_id)?;
        self.record(session_id).await?;
        let io_error = |source: std::io::Error| {
            CoreError::Driver(DriverError::Io {
                op: "reading a shell recording",
                session: session_id.to_string(),
                source: Box::new(source),
            })
        };
        let file = match self.recordings().open(session_id, shell_id).await {
            Ok(file) => file,
            Err(RecordingError::NotFound) => {
                return Err(CoreError::NotFound {
                    what: "recording of shell",
                    id: shell_id.to_string(),
                })
            }
            Err(err @ RecordingError::Io { .. }) => {
                return Err(io_error(std::io::Error::other(err)))
            }
        };
        let session = session_id.to_string();
        Ok(Box::pin(recordings::stream_file(file).map(move |r| {
            r.map_err(|source| {
                CoreError::Driver(DriverError::Io {
                    op: "reading a shell recording",
                    session: session.clone(),
                    source: Box::new(source),
                })
            })
        })))
    }

    /// Attach to a running shell. Fails (404) before anything is streamed when the
    /// session is not running or has no such shell, and (400) when `offset` is past the
    /// end of the shell's output.
    pub async fn attach_shell(
        &self,
        session_id: &str,
        shell_id: &str,
        opts: AttachOptions,
    ) -> Result<ShellAttachment, CoreError> {
        berth_api::shell::validate_shell_id("shell_id", shell_id)?;
        let Some((slot, sandbox)) = self.running_sandbox(session_id).await? else {
            return Err(Self::shell_not_found(shell_id));
        };
        let busy = BusyGuard::new(slot.clone());
        let mut guest = sandbox.guest.clone();
        let start = ShellAttachStart {
            shell_id: shell_id.to_string(),
            watch: opts.mode == AttachMode::Watch,
            width: opts.width.map_or(0, u32::from),
            height: opts.height.map_or(0, u32::from),
            offset: opts.offset,
            recorder: false,
        };
        let berth_guest::client::ShellAttachment { input, mut output } =
            berth_guest::client::shell_attach(&mut guest, start)
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::InvalidArgument if s.message().contains("offset") => {
                        CoreError::invalid("offset", s.message())
                    }
                    tonic::Code::InvalidArgument => CoreError::invalid("query", s.message()),
                    _ => self.shell_error(session_id, shell_id, s),
                })?;
        let unexpected = |what: &str| {
            CoreError::guest(
                session_id,
                tonic::Status::internal(format!("shell attach began with {what}")),
            )
        };
        let first = output
            .message()
            .await
            .map_err(|s| self.shell_error(session_id, shell_id, s))?;
        let Some(ShellOutput {
            kind: Some(shell_output::Kind::Attached(att)),
        }) = first
        else {
            return Err(unexpected("something other than `attached`"));
        };
        // The snapshot, when there is one, is already queued right behind `attached`.
        let snapshot = if att.snapshot {
            match output
                .message()
                .await
                .map_err(|s| CoreError::guest(session_id, s))?
            {
                Some(ShellOutput {
                    kind: Some(shell_output::Kind::Snapshot(bytes)),
                }) => Some(bytes),
                _ => return Err(unexpected("no snapshot")),
            }
        } else {
            None
        };
        Ok(ShellAttachment {
            attached: ShellAttached {
                shell_id: att.shell_id,
                reconnected: att.reconnected,
                offset: att.offset,
                snapshot,
            },
            inputs: ShellInputs { tx: input, slot },
            events: ShellEvents {
                output,
                session: session_id.to_string(),
                next: att.offset,
                done: false,
                _busy: busy,
            },
        })
    }
}

//! `berth exec --it` (attach this terminal to a remote shell) and `berth shell …`.
//!
//! The attach protocol is a WebSocket with Kubernetes `v5.channel.k8s.io` framing (see
//! the server's shells module). The CLI tracks its position in the shell's output so a
//! dropped connection resumes exactly where it stopped: nothing lost, nothing repeated.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{ExecArgs, ShellCmd};
use crate::cmd::{client, explain};
use crate::terminal::{self, write_fd, RawMode};

const CH_STDIN: u8 = 0;
const CH_STDOUT: u8 = 1;
const CH_STDERR: u8 = 2;
const CH_STATUS: u8 = 3;
const CH_RESIZE: u8 = 4;
const CH_HEARTBEAT: u8 = 5;
const CH_CLOSE: u8 = 0xff;
const SUBPROTOCOL: &str = "v5.channel.k8s.io";

/// Signal numbers the CLI reports as 128+N when they end it.
mod libc_sig {
    pub const HUP: i32 = 1;
    pub const TERM: i32 = 15;
}

/// Reconnect delays; the last one repeats until [`GIVE_UP_AFTER`].
const BACKOFF: [u64; 5] = [1, 2, 4, 8, 15];
const GIVE_UP_AFTER: Duration = Duration::from_secs(15 * 60);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(20);

/// How one attachment ended.
enum Ended {
    Exited(i32),
    Detached,
    /// The CLI itself got SIGTERM or SIGHUP: leave (restoring the terminal) with 128+N.
    Signalled(i32),
    /// The connection dropped; resume from this output offset.
    Dropped(Option<u64>, String),
}

/// Messages to stderr while the terminal may be raw need an explicit carriage return.
fn say(msg: &str) {
    let _ = write_fd(
        &std::io::stderr(),
        format!("\r\nberth: {msg}\r\n").as_bytes(),
    );
}

pub async fn interactive(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.remote)?;
    let detach = terminal::parse_keys(&args.detach_keys)
        .map_err(|e| anyhow::anyhow!("--detach-keys {e}"))?;
    let (width, height) = terminal::size().unwrap_or((80, 24));
    let session = args.session.clone();
    let shell = match &args.shell_id {
        // Attach to an existing shell, or create it with that id.
        Some(id) => {
            let body = shell_body(Some(id), &args.argv, width, height);
            match c.create_shell(&session, &body).await {
                Ok(_) => id.clone(),
                Err(berth_client::ClientError::Api(e))
                    if e.code == berth_api::ErrorCode::AlreadyExists =>
                {
                    id.clone()
                }
                Err(e) if args.watch => return Err(explain(e)),
                Err(e) => return Err(explain(e)),
            }
        }
        None => {
            let info = c
                .create_shell(&session, &shell_body(None, &args.argv, width, height))
                .await
                .map_err(explain)?;
            info["shell_id"]
                .as_str()
                .context("the server did not name the new shell")?
                .to_string()
        }
    };
    let reattach = format!("berth exec --it --session {session} --shell-id {shell}");
    eprintln!(
        "berth: session {session}, shell {shell}{} — detach with {}",
        if args.watch {
            " (watching, read-only)"
        } else {
            ""
        },
        args.detach_keys
    );

    let _raw = RawMode::enable().context("cannot put the terminal in raw mode")?;
    let keys = spawn_stdin_reader();
    let mut keys = DetachFilter::new(keys, detach);
    let mut offset: Option<u64> = None;
    let mut dropped_since: Option<Instant> = None;
    let mut attempt = 0usize;
    loop {
        let ended = attach_once(&c, &session, &shell, args.watch, offset, &mut keys).await;
        match ended {
            Ok(Ended::Exited(code)) => {
                return Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
            }
            Ok(Ended::Signalled(sig)) => {
                drop(_raw);
                eprintln!(
                    "\r\nberth: terminated; the shell keeps running. Reattach with:\n  {reattach}"
                );
                return Ok(ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)));
            }
            Ok(Ended::Detached) => {
                drop(_raw);
                eprintln!(
                    "\r\nberth: detached; the shell keeps running. Reattach with:\n  {reattach}"
                );
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Ended::Dropped(at, why)) => {
                if at.is_some() {
                    // A working attachment resets the backoff.
                    if offset != at {
                        attempt = 0;
                        dropped_since = None;
                    }
                    offset = at;
                }
                let since = *dropped_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= GIVE_UP_AFTER {
                    drop(_raw);
                    anyhow::bail!("gave up reconnecting ({why}); reattach with: {reattach}");
                }
                let delay = BACKOFF[attempt.min(BACKOFF.len() - 1)];
                attempt += 1;
                say(&format!(
                    "connection lost ({why}); reconnecting in {delay}s"
                ));
                tokio::time::sleep(Duration::from_secs(delay)).await;
            }
            Err(e) => {
                drop(_raw);
                return Err(e.context(format!("reattach with: {reattach}")));
            }
        }
    }
}

fn shell_body(id: Option<&String>, argv: &[String], width: u16, height: u16) -> serde_json::Value {
    let mut body = serde_json::json!({ "width": width, "height": height });
    if let Some(id) = id {
        body["shell_id"] = id.clone().into();
    }
    if !argv.is_empty() {
        body["command"] = argv.into();
    }
    body
}

/// Read stdin on a plain thread (a blocking read cannot be cancelled; the thread dies
/// with the process) and hand the bytes over.
fn spawn_stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Passes keys through, except the detach sequence, which it swallows and reports.
struct DetachFilter {
    rx: mpsc::Receiver<Vec<u8>>,
    seq: Vec<u8>,
    /// How much of `seq` the last keys matched.
    matched: usize,
}

enum Keys {
    Bytes(Vec<u8>),
    Detach,
    Closed,
}

impl DetachFilter {
    fn new(rx: mpsc::Receiver<Vec<u8>>, seq: Vec<u8>) -> Self {
        Self {
            rx,
            seq,
            matched: 0,
        }
    }

    async fn next(&mut self) -> Keys {
        let Some(bytes) = self.rx.recv().await else {
            return Keys::Closed;
        };
        let mut out = Vec::with_capacity(bytes.len());
        for b in bytes {
            if !self.seq.is_empty() && b == self.seq[self.matched] {
                self.matched += 1;
                if self.matched == self.seq.len() {
                    self.matched = 0;
                    return Keys::Detach;
                }
                continue;
            }
            // A partial match that broke off: those keys were meant for the shell.
            out.extend_from_slice(&self.seq[..self.matched]);
            self.matched = 0;
            out.push(b);
        }
        Keys::Bytes(out)
    }
}

fn frame(channel: u8, payload: &[u8]) -> Message {
    let mut v = Vec::with_capacity(payload.len() + 1);
    v.push(channel);
    v.extend_from_slice(payload);
    Message::Binary(v.into())
}

fn resize_frame() -> Option<Message> {
    let (w, h) = terminal::size()?;
    Some(frame(
        CH_RESIZE,
        serde_json::json!({ "width": w, "height": h })
            .to_string()
            .as_bytes(),
    ))
}

/// One WebSocket attachment, until the shell exits, the user detaches or it drops.
async fn attach_once(
    c: &berth_client::Client,
    session: &str,
    shell: &str,
    watch: bool,
    offset: Option<u64>,
    keys: &mut DetachFilter,
) -> anyhow::Result<Ended> {
    let (w, h) = terminal::size().unwrap_or((80, 24));
    let mut query = vec![("mode", if watch { "watch" } else { "rw" }.to_string())];
    if !watch {
        query.push(("width", w.to_string()));
        query.push(("height", h.to_string()));
    }
    if let Some(o) = offset {
        query.push(("offset", o.to_string()));
    }
    let mut req = c
        .shell_attach_url(session, shell, &query)
        .into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", c.token()).parse()?);
    req.headers_mut()
        .insert("sec-websocket-protocol", SUBPROTOCOL.parse()?);
    let (ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let msg = serde_json::from_str::<berth_api::ErrorBody>(&body)
                .map(|e| e.error.message)
                .unwrap_or_else(|_| format!("HTTP {}", resp.status()));
            if resp.status().is_server_error() {
                return Ok(Ended::Dropped(offset, msg));
            }
            anyhow::bail!("{msg}");
        }
        Err(e) => return Ok(Ended::Dropped(offset, e.to_string())),
    };
    let (mut tx, mut rx) = ws.split();
    use tokio::signal::unix::{signal, SignalKind};
    let mut winch = signal(SignalKind::window_change())?;
    // Without these, SIGTERM/SIGHUP would kill the CLI with the terminal still raw.
    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.tick().await;
    // Output position: known once the server's first status frame arrives.
    let mut position: Option<u64> = None;
    let mut snapshot_left = 0u64;
    loop {
        tokio::select! {
            msg = rx.next() => {
                let data = match msg {
                    Some(Ok(Message::Binary(d))) => d,
                    Some(Ok(Message::Close(_))) | None => return Ok(Ended::Dropped(position.or(offset), "closed by the server".into())),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Ok(Ended::Dropped(position.or(offset), e.to_string())),
                };
                let Some((&channel, payload)) = data.split_first() else { continue };
                match channel {
                    CH_STDOUT | CH_STDERR => {
                        let skip = snapshot_left.min(payload.len() as u64);
                        snapshot_left -= skip;
                        if let Some(p) = position.as_mut() {
                            *p += payload.len() as u64 - skip;
                        }
                        write_fd(&std::io::stdout(), payload)?;
                    }
                    CH_STATUS => {
                        let status: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
                        if let Some(meta) = status["metadata"].as_object().filter(|m| m.contains_key("shellId")) {
                            position = meta.get("offset").and_then(|v| v.as_u64());
                            snapshot_left = meta.get("snapshotBytes").and_then(|v| v.as_u64()).unwrap_or(0);
                            if !watch {
                                if let Some(m) = resize_frame() {
                                    let _ = tx.send(m).await;
                                }
                            }
                            continue;
                        }
                        if let Some(code) = exit_code(&status) {
                            let _ = tx.send(frame(CH_CLOSE, &[CH_STDIN])).await;
                            return Ok(Ended::Exited(code));
                        }
                        let message = status["message"].as_str().unwrap_or("the server reported a problem");
                        if status["reason"] == "TooSlow" {
                            return Ok(Ended::Dropped(position.or(offset), message.to_string()));
                        }
                        say(message);
                    }
                    CH_HEARTBEAT => {}
                    _ => {}
                }
            }
            key = keys.next() => match key {
                Keys::Bytes(b) if !b.is_empty() && !watch => {
                    if tx.send(frame(CH_STDIN, &b)).await.is_err() {
                        return Ok(Ended::Dropped(position.or(offset), "send failed".into()));
                    }
                }
                Keys::Bytes(_) => {}
                Keys::Detach => {
                    let _ = tx.send(frame(CH_CLOSE, &[CH_STDIN])).await;
                    let _ = tx.close().await;
                    return Ok(Ended::Detached);
                }
                // Local stdin ended (not a terminal): keep showing output.
                Keys::Closed => std::future::pending::<()>().await,
            },
            _ = term.recv() => return Ok(Ended::Signalled(libc_sig::TERM)),
            _ = hangup.recv() => return Ok(Ended::Signalled(libc_sig::HUP)),
            _ = winch.recv() => {
                if !watch {
                    if let Some(m) = resize_frame() {
                        let _ = tx.send(m).await;
                    }
                }
            }
            _ = heartbeat.tick() => {
                if tx.send(frame(CH_HEARTBEAT, b"")).await.is_err() {
                    return Ok(Ended::Dropped(position.or(offset), "heartbeat failed".into()));
                }
            }
        }
    }
}

/// The exit code in a final metav1.Status: 0 for Success, `ExitCode` cause otherwise.
fn exit_code(status: &serde_json::Value) -> Option<i32> {
    if status["status"] == "Success" {
        return Some(0);
    }
    if status["reason"] != "NonZeroExitCode" {
        return None;
    }
    let causes = status["details"]["causes"].as_array()?;
    causes
        .iter()
        .find(|c| c["reason"] == "ExitCode")
        .and_then(|c| c["message"].as_str()?.parse().ok())
        .or(Some(1))
}

pub async fn command(cmd: ShellCmd) -> anyhow::Result<()> {
    match cmd {
        ShellCmd::List { session, remote } => {
            let list = client(&remote)?
                .list_shells(&session)
                .await
                .map_err(explain)?;
            let shells = list.as_array().cloned().unwrap_or_default();
            println!(
                "{:<24} {:<9} {:>7} {:>7} {:>8}  COMMAND",
                "SHELL", "STATE", "SIZE", "CLIENTS", "WATCHERS"
            );
            for s in shells {
                let state = if s["running"].as_bool().unwrap_or(false) {
                    "running".to_string()
                } else {
                    format!("exited {}", s["exit_code"])
                };
                println!(
                    "{:<24} {:<9} {:>7} {:>7} {:>8}  {}",
                    s["shell_id"].as_str().unwrap_or("?"),
                    state,
                    format!("{}x{}", s["width"], s["height"]),
                    s["clients"],
                    s["watchers"],
                    s["command"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(" "))
                        .unwrap_or_default()
                );
            }
        }
        ShellCmd::Kill {
            session,
            shell,
            remote,
        } => {
            client(&remote)?
                .kill_shell(&session, &shell)
                .await
                .map_err(explain)?;
            eprintln!("killed shell {shell}");
        }
        ShellCmd::Record {
            session,
            shell,
            remote,
        } => {
            let mut stream = client(&remote)?
                .shell_recording(&session, &shell)
                .await
                .map_err(explain)?;
            while let Some(chunk) = stream.next().await {
                write_fd(&std::io::stdout(), &chunk.map_err(explain)?)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn detach_sequence_is_swallowed_and_broken_prefixes_pass_through() {
        let (tx, rx) = mpsc::channel(8);
        let mut f = DetachFilter::new(rx, vec![0x1d, b'd']);
        tx.send(b"ab\x1dx".to_vec()).await.unwrap();
        assert!(matches!(f.next().await, Keys::Bytes(b) if b == b"ab\x1dx"));
        tx.send(b"\x1d".to_vec()).await.unwrap();
        assert!(matches!(f.next().await, Keys::Bytes(b) if b.is_empty()));
        tx.send(b"d".to_vec()).await.unwrap();
        assert!(matches!(f.next().await, Keys::Detach));
        drop(tx);
        assert!(matches!(f.next().await, Keys::Closed));
    }

    #[test]
    fn exit_codes_from_status() {
        let ok = serde_json::json!({"kind":"Status","status":"Success"});
        assert_eq!(exit_code(&ok), Some(0));
        let failed = serde_json::json!({"status":"Failure","reason":"NonZeroExitCode",
            "details":{"causes":[{"reason":"ExitCode","message":"3"}]}});
        assert_eq!(exit_code(&failed), Some(3));
        let notice =
            serde_json::json!({"status":"Failure","reason":"Forbidden","message":"read-only"});
        assert_eq!(exit_code(&notice), None);
    }
}

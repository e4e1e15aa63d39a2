//! Interactive shells of the AgentCore SDK (`open_shell`, `connect_shell*`):
//! `GET /runtimes/{runtime}/ws/shells?[qualifier=…&]shellId=…`, a WebSocket upgrade
//! (`docs/design/agentcore-wire.md` §8).
//!
//! The session id (header, or the query parameter of presigned URLs and the OAuth mode)
//! names the runtime session as for an invoke ([`AgentCore::open_session`]: created on
//! first use, resumed after). The shell is a Berth shell of that session with the
//! client's `shellId` (`bash -l`, else `sh -l`, in the workspace): opened when it does
//! not run, attached to when it does. The agent is not started for a shell.
//!
//! The protocol is the native shells' `v5.channel.k8s.io` framing with AgentCore's
//! rules: no subprotocol (except `base64UrlBearerAuthorization` for the OAuth mode);
//! `X-Amzn-Bedrock-AgentCore-Shell-Id` and the session id on the 101; a first status
//! frame `{"metadata":{"shellId","reconnected"}}`; diagnostics on channel 2, because the
//! SDK takes any status frame without `metadata.shellId` for the end of the shell; the
//! exit status in §8's words, then close 1000.
//!
//! - **Reconnect.** Attaching replays the shell's output from its start when the
//!   guest's ring (256 KiB) still holds all of it, else sends a snapshot of the screen;
//!   `reconnected` is true when the shell ran before this client came.
//! - **Kick.** The newest client of a shell id wins: the one before it gets close 4000,
//!   and the PTY stays.
//! - **Leaving** (the SDK's `close()` only closes the socket, S12; a 0xFF frame does the
//!   same) detaches: the shell keeps running, for as long as its session lives, and
//!   the next client with the same session and shell id gets it back.
//! - An attached client keeps its session from idling out (the core's busy guard of an
//!   attachment); heartbeats (0x05) are echoed and count as activity.
//! - A client too slow for the shell's output is closed with 1013; the SDK reconnects
//!   (with a `ReconnectConfig`) and gets the replay.
//! - A shell id that names an exited shell opens a new shell with that id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::extract::ws::{rejection::WebSocketUpgradeRejection, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use berth_api::shell::{channel, frame, AttachOptions, OpenShell};
use berth_core::{CoreError, NoticeKind, ShellAttachment};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::agent::AGENT_SHELL;
use super::sessions::ws_session_id;
use super::{set_header, SESSION_HEADER};
use crate::agentcore::auth::BEARER_SUBPROTOCOL;
use crate::agentcore::request_id::new_id;
use crate::agentcore::{Ac, AgentCore, AwsError, PathParams, Query};
use crate::shells::pump::{self, Dialect};

/// `X-Amzn-Bedrock-AgentCore-Shell-Id`, on the 101.
pub const SHELL_ID_HEADER: &str = "x-amzn-bedrock-agentcore-shell-id";
/// Another client attached to the same shell id (§8); the SDK does not reconnect.
const CLOSE_KICKED: u16 = 4000;

/// `^[a-zA-Z0-9][a-zA-Z0-9_-]{0,127}$`, the SDK's rule (`shell/_validation.py`).
fn valid_shell_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && id.len() <= 128
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The `shellId` query parameter (a new uuid4 when absent, as the SDK would send).
fn shell_id(query: &HashMap<String, String>) -> Result<String, AwsError> {
    let Some(id) = query.get("shellId") else {
        return Ok(new_id());
    };
    if !valid_shell_id(id) {
        return Err(AwsError::field(
            "shellId",
            "Member must satisfy regular expression pattern: ^[a-zA-Z0-9][a-zA-Z0-9_-]{0,127}$",
        ));
    }
    if id == AGENT_SHELL {
        return Err(AwsError::field(
            "shellId",
            format!("{AGENT_SHELL} is the agent's own shell; choose another shell id"),
        ));
    }
    Ok(id.clone())
}

/// The first status frame of a connection.
fn attached_status(shell_id: &str, reconnected: bool) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {"shellId": shell_id, "reconnected": reconnected},
        "status": "Success",
    })
}

/// The shell's exit status: `Success` for 0, else `NonZeroExitCode` with the code (128 +
/// N for signal N) and the signal in `details.causes`. Empty metadata: the SDK takes it
/// for the end.
fn exit_status(code: Option<i32>, signal: Option<i32>) -> Value {
    let n = berth_api::shell::exit_code(code, signal);
    if n == 0 && signal.is_none() {
        return json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
    }
    let mut causes = vec![json!({"reason": "ExitCode", "message": n.to_string()})];
    if let Some(sig) = signal {
        causes.push(json!({"reason": "Signal", "message": sig.to_string()}));
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "reason": "NonZeroExitCode",
        "message": format!("command terminated with exit code {n}"),
        "details": {"causes": causes},
    })
}

/// A platform error that ends the connection.
fn internal_status(message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "reason": "InternalError",
        "message": message,
        "code": 500,
    })
}

fn status_frame(status: &Value) -> Vec<u8> {
    frame(channel::STATUS, status.to_string().as_bytes())
}

fn stderr_frame(message: &str) -> Vec<u8> {
    frame(channel::STDERR, format!("{message}\r\n").as_bytes())
}

/// The attached clients of AgentCore shells, per native session and shell id: the
/// newest wins, the one before it is told to leave.
#[derive(Default)]
pub(crate) struct Clients {
    next: AtomicU64,
    map: Mutex<HashMap<String, (u64, oneshot::Sender<()>)>>,
}

/// A client's place in [`Clients`]; leaving it (drop) frees the place unless a newer
/// client took it.
struct Registration {
    ac: AgentCore,
    key: String,
    id: u64,
}

impl Clients {
    /// Make the client the shell's current one; the receiver fires when a newer one comes.
    fn register(ac: &AgentCore, key: String) -> (Registration, oneshot::Receiver<()>) {
        let clients = &ac.inner.data.shell_clients;
        let id = clients.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        #[allow(clippy::unwrap_used)] // poisoned only if a holder panicked
        let older = clients.map.lock().unwrap().insert(key.clone(), (id, tx));
        if let Some((_, kick)) = older {
            let _ = kick.send(());
        }
        let reg = Registration {
            ac: ac.clone(),
            key,
            id,
        };
        (reg, rx)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        #[allow(clippy::unwrap_used)]
        let mut map = self.ac.inner.data.shell_clients.map.lock().unwrap();
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.key);
        }
    }
}

impl AgentCore {
    /// Open shell `shell_id` in the session unless it runs, and attach to it from the
    /// start of the output the guest still holds. Also says whether it ran before.
    async fn shell_attachment(
        &self,
        native: &str,
        shell_id: &str,
    ) -> Result<(ShellAttachment, bool), AwsError> {
        let core = self.core();
        // One opener at a time per shell id (two first clients must not both open it).
        let _lock = self
            .inner
            .data
            .lock(&format!("shell:{native}\n{shell_id}"))
            .await;
        let open = || async {
            let req = OpenShell {
                shell_id: Some(shell_id.to_string()),
                ..Default::default()
            };
            match core.open_shell(native, req).await {
                Ok(_) => Ok(false),
                // Opened by someone else meanwhile (the native API): attach to it.
                Err(CoreError::AlreadyExists { .. }) => Ok(true),
                Err(e) => Err(AwsError::from(e)),
            }
        };
        let existing = core
            .list_shells(native)
            .await?
            .into_iter()
            .find(|s| s.shell_id == shell_id);
        let mut reconnected = match existing {
            Some(shell) if shell.running => true,
            Some(_) => {
                // It exited: forget it and start anew under the same id.
                match core.kill_shell(native, shell_id).await {
                    Ok(_) | Err(CoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                open().await?
            }
            None => open().await?,
        };
        let opts = AttachOptions {
            offset: Some(0),
            ..Default::default()
        };
        for attempt in 0..2 {
            match core.attach_shell(native, shell_id, opts).await {
                Ok(att) => return Ok((att, reconnected)),
                // Gone between the two calls (it exited and was forgotten): open it again.
                Err(CoreError::NotFound { what: "shell", .. }) if attempt == 0 => {
                    reconnected = open().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(AwsError::internal())
    }
}

/// `GET /runtimes/{runtime}/ws/shells?[qualifier=…&]shellId=…`.
pub(crate) async fn shell(
    Ac(ac): Ac,
    PathParams(segment): PathParams<String>,
    Query(query): Query,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let sid = match ws_session_id(&headers, &query) {
        Ok(sid) => sid,
        Err(e) => return e.into_response(),
    };
    let result = async {
        let shell_id = shell_id(&query)?;
        let (ws, s) = super::ws::upgrade_session(&ac, &segment, &query, &sid, ws).await?;
        let (attachment, reconnected) = ac.shell_attachment(&s.native, &shell_id).await?;
        tracing::info!(session = %s.native, shell = %shell_id, reconnected,
            "agentcore: shell client attached");
        let key = format!("{}\n{shell_id}", s.native);
        let id = shell_id.clone();
        let mut resp = ws
            .protocols([BEARER_SUBPROTOCOL])
            .max_message_size(pump::TRANSPORT_LIMIT)
            .max_frame_size(pump::TRANSPORT_LIMIT)
            .on_upgrade(move |socket| async move {
                let (registration, kicked) = Clients::register(&ac, key);
                let first = status_frame(&attached_status(&id, reconnected));
                let kick = async move {
                    // Sent, or the sender dropped: either way a newer client took the place.
                    let _ = kicked.await;
                    tracing::info!(shell = %id, "agentcore: shell client replaced by a newer one");
                    (CLOSE_KICKED, "another client attached to this shell")
                };
                pump::serve::<AgentCoreShell>(socket, attachment, first, kick).await;
                drop(registration);
            });
        set_header(&mut resp, SHELL_ID_HEADER, &shell_id);
        Ok::<_, AwsError>(resp)
    }
    .await;
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    set_header(&mut resp, SESSION_HEADER, &sid);
    resp
}

/// AgentCore's dialect (§8): diagnostics on channel 2, because the SDK takes any status
/// frame without `metadata.shellId` for the end of the shell; bare heartbeat echoes.
struct AgentCoreShell;

impl Dialect for AgentCoreShell {
    const TOO_SLOW_CLOSE: &'static str = "client too slow; reconnect";
    const FAILED_CLOSE: &'static str = "shell attachment failed";

    fn rejected(message: String) -> Vec<u8> {
        stderr_frame(&message)
    }

    fn heartbeat(_payload: &[u8]) -> Vec<u8> {
        vec![channel::HEARTBEAT]
    }

    fn notice(_kind: NoticeKind, message: String) -> Vec<u8> {
        stderr_frame(&message)
    }

    fn exited(code: Option<i32>, signal: Option<i32>) -> Vec<u8> {
        status_frame(&exit_status(code, signal))
    }

    fn too_slow(_offset: u64, message: String) -> Vec<u8> {
        stderr_frame(&message)
    }

    fn failed(message: String) -> Vec<u8> {
        status_frame(&internal_status(&message))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn shell_ids_follow_the_sdk() {
        for ok in ["a", "dbg", "A1_b-2", &"x".repeat(128)] {
            assert!(valid_shell_id(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", "a b", "a/b", "a?b", "é", &"x".repeat(129)] {
            assert!(!valid_shell_id(bad), "{bad}");
        }
        let q = |v: &str| HashMap::from([("shellId".to_string(), v.to_string())]);
        assert_eq!(shell_id(&q("dbg")).unwrap(), "dbg");
        assert!(shell_id(&q("a b")).is_err());
        assert!(shell_id(&q(AGENT_SHELL)).is_err());
        assert_eq!(shell_id(&HashMap::new()).unwrap().len(), 36);
    }

    #[test]
    fn statuses_as_the_sdk_reads_them() {
        assert_eq!(
            attached_status("dbg", true).to_string(),
            r#"{"apiVersion":"v1","kind":"Status","metadata":{"reconnected":true,"shellId":"dbg"},"status":"Success"}"#
        );
        assert_eq!(
            exit_status(Some(0), None),
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
        );
        let failed = exit_status(Some(3), None);
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["message"], "command terminated with exit code 3");
        assert_eq!(
            failed["details"]["causes"],
            json!([{"reason": "ExitCode", "message": "3"}])
        );
        assert_eq!(failed["metadata"], json!({}));
        let killed = exit_status(None, Some(9));
        assert_eq!(killed["message"], "command terminated with exit code 137");
        assert_eq!(
            killed["details"]["causes"],
            json!([{"reason": "ExitCode", "message": "137"}, {"reason": "Signal", "message": "9"}])
        );
        let internal = internal_status("the sandbox stopped");
        assert_eq!(internal["reason"], "InternalError");
        assert_eq!(internal["code"], 500);
        assert_eq!(internal["metadata"], json!({}));
    }
}

//! `/ping` polling: while a session's agent runs, ask it how it is doing, as AgentCore
//! Runtime does (`docs/design/agentcore-wire.md` §9).
//!
//! - `{"status":"HealthyBusy"}`: the agent does background work (`@app.async_task`,
//!   `add_async_task`, a custom `@app.ping`), so the session is not idle: it is held busy
//!   ([`Core::hold_busy`]) and noted active now.
//! - `{"status":"Healthy","time_of_last_update":T}`: idle since `T`; the hold goes and the
//!   idle clock runs from the latest of the session's other activity and `T`
//!   ([`Core::note_activity`]).
//! - Anything else (no answer, not 200, not that JSON, an unknown status): logged at
//!   debug and taken as `Healthy` with no time, so the idle clock runs from the other
//!   activity (which includes the last `HealthyBusy` seen).
//!
//! The poll goes over a [`TunnelKind::HealthCheck`] tunnel, which is not activity:
//! otherwise the poller would keep every session alive for ever. One poller runs per
//! session, started when the agent has answered its readiness ping (so sessions whose
//! agent never started, such as commands-only ones, have none), or after a server
//! restart for each adopted session whose agent shell runs (`agent.rs`,
//! `AgentCore::resume_agents`); it ends when the session stops or the agent's shell
//! ends, and a new agent gets a new poller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{Method, StatusCode};
use berth_core::{BusyHold, Core, CoreError, TunnelKind};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;

use super::agent::{request, send_as, SendError, AGENT_SHELL};

/// How often a running agent is asked. An AgentCore runtime's idle timeout is at least
/// 60 s (`idleRuntimeSessionTimeout`), so background work started by an invoke is seen
/// long before the session could idle out; asking more often would buy nothing but
/// traffic. (`time_of_last_update` makes the idle clock exact whatever the interval.)
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// One ping's limit; an agent that does not answer within it counts as `Healthy`.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Most of a `/ping` body read.
const PING_BODY_LIMIT: usize = 64 * 1024;

/// What the agent's `/ping` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingStatus {
    /// Busy with background work: the session is not idle.
    HealthyBusy,
    /// Idle since `since` (`time_of_last_update`), when the agent said.
    Healthy { since: Option<SystemTime> },
}

#[derive(Deserialize)]
struct PingBody {
    status: String,
    time_of_last_update: Option<serde_json::Number>,
}

/// Parse a `/ping` answer; `Err` says why it is taken as `Healthy` with no time.
pub fn parse_ping(status: StatusCode, body: &[u8]) -> Result<PingStatus, String> {
    if status != StatusCode::OK {
        return Err(format!("answered {status}"));
    }
    let body: PingBody =
        serde_json::from_slice(body).map_err(|e| format!("answered no ping JSON: {e}"))?;
    match body.status.as_str() {
        "HealthyBusy" => Ok(PingStatus::HealthyBusy),
        "Healthy" => {
            let since = body
                .time_of_last_update
                .and_then(|n| n.as_f64())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .and_then(|d| UNIX_EPOCH.checked_add(d));
            Ok(PingStatus::Healthy { since })
        }
        other => Err(format!("answered the unknown status {other:?}")),
    }
}

/// Why a ping found no status.
enum PingError {
    /// The session stopped or went: polling is over.
    SessionGone(CoreError),
    /// Anything else (nothing listens, no answer, a bad answer).
    NoStatus(String),
}

/// One `GET /ping` on `port` over a health-check tunnel.
async fn ping(core: &Core, native: &str, port: u16) -> Result<PingStatus, PingError> {
    let req = request(Method::GET, port, "/ping")
        .body(Full::new(Bytes::new()))
        .map_err(|e| PingError::NoStatus(e.to_string()))?;
    let answer = async {
        let resp = send_as(core, native, port, TunnelKind::HealthCheck, req).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), PING_BODY_LIMIT)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, SendError>((status, body))
    };
    match tokio::time::timeout(PING_TIMEOUT, answer).await {
        Ok(Ok((status, body))) => parse_ping(status, &body).map_err(PingError::NoStatus),
        Ok(Err(SendError::Connect(e @ (CoreError::Conflict(_) | CoreError::NotFound { .. })))) => {
            Err(PingError::SessionGone(e))
        }
        Ok(Err(SendError::Connect(e))) => Err(PingError::NoStatus(e.to_string())),
        Ok(Err(SendError::Http(e))) => Err(PingError::NoStatus(e.to_string())),
        Err(_) => Err(PingError::NoStatus(format!(
            "no answer within {} s",
            PING_TIMEOUT.as_secs()
        ))),
    }
}

/// Whether the agent shell started at `started_at_ms` still runs in the session.
async fn agent_runs(core: &Core, native: &str, started_at_ms: i64) -> bool {
    match core.list_shells(native).await {
        Ok(shells) => shells.iter().any(|sh| {
            sh.shell_id == AGENT_SHELL && sh.started_at_ms == started_at_ms && sh.running
        }),
        Err(_) => false,
    }
}

/// Poll the agent shell started at `started_at_ms` until it or its session ends.
async fn poll(core: Core, native: String, port: u16, started_at_ms: i64) {
    let mut hold: Option<BusyHold> = None;
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let status = match ping(&core, &native, port).await {
            Ok(status) => status,
            Err(PingError::SessionGone(e)) => {
                tracing::debug!(session = %native, error = %e, "agentcore: session gone; /ping polling ends");
                return;
            }
            Err(PingError::NoStatus(why)) => {
                if !agent_runs(&core, &native, started_at_ms).await {
                    tracing::debug!(session = %native, "agentcore: the agent ended; /ping polling ends");
                    return;
                }
                tracing::debug!(session = %native, port, why, "agentcore: GET /ping failed; taken as Healthy");
                PingStatus::Healthy { since: None }
            }
        };
        match status {
            PingStatus::HealthyBusy => {
                if hold.is_none() {
                    match core.hold_busy(&native).await {
                        Ok(h) => hold = Some(h),
                        Err(e) => {
                            tracing::debug!(session = %native, error = %e, "agentcore: cannot hold the session busy; /ping polling ends");
                            return;
                        }
                    }
                    tracing::info!(session = %native, "agentcore: the agent reports HealthyBusy; the session is kept from idling");
                }
                note(&core, &native, SystemTime::now()).await;
            }
            PingStatus::Healthy { since } => {
                // The time first, then the hold: the idle check never sees the session
                // free without it.
                if let Some(since) = since {
                    note(&core, &native, since).await;
                }
                if hold.take().is_some() {
                    tracing::info!(session = %native, "agentcore: the agent reports Healthy; the session may idle");
                }
            }
        }
    }
}

async fn note(core: &Core, native: &str, at: SystemTime) {
    if let Err(e) = core.note_activity(native, at).await {
        tracing::debug!(session = %native, error = %e, "agentcore: cannot note the agent's activity");
    }
}

/// The running pollers, one per native session.
#[derive(Default)]
pub(crate) struct Pollers {
    running: Arc<Mutex<HashMap<String, Poller>>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Poller {
    id: u64,
    started_at_ms: i64,
    task: tokio::task::AbortHandle,
}

impl Pollers {
    /// Poll the agent shell started at `started_at_ms` on `port` of `native`, unless it
    /// is polled already; a poller of an earlier agent of the session is stopped.
    pub(crate) fn start(&self, core: &Core, native: &str, port: u16, started_at_ms: i64) {
        #[allow(clippy::unwrap_used)] // poisoned only if a holder panicked
        let mut running = self.running.lock().unwrap();
        if let Some(p) = running.get(native) {
            if p.started_at_ms == started_at_ms && !p.task.is_finished() {
                return;
            }
            p.task.abort();
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (core, key, map) = (core.clone(), native.to_string(), self.running.clone());
        let task = tokio::spawn(async move {
            poll(core, key.clone(), port, started_at_ms).await;
            #[allow(clippy::unwrap_used)]
            let mut running = map.lock().unwrap();
            if running.get(&key).is_some_and(|p| p.id == id) {
                running.remove(&key);
            }
        });
        running.insert(
            native.to_string(),
            Poller {
                id,
                started_at_ms,
                task: task.abort_handle(),
            },
        );
    }
}

impl Drop for Pollers {
    fn drop(&mut self) {
        #[allow(clippy::unwrap_used)]
        for (_, p) in self.running.lock().unwrap().drain() {
            p.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ping_answers() {
        let ok = StatusCode::OK;
        assert_eq!(
            parse_ping(
                ok,
                br#"{"status":"HealthyBusy","time_of_last_update":1700000000}"#
            ),
            Ok(PingStatus::HealthyBusy)
        );
        assert_eq!(
            parse_ping(
                ok,
                br#"{"status":"Healthy","time_of_last_update":1700000000}"#
            ),
            Ok(PingStatus::Healthy {
                since: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
            })
        );
        assert_eq!(
            parse_ping(ok, br#"{"status":"Healthy","time_of_last_update":1.5}"#),
            Ok(PingStatus::Healthy {
                since: Some(UNIX_EPOCH + Duration::from_millis(1500))
            })
        );
        // A time that is missing or not one: Healthy, no time.
        for body in [
            &br#"{"status":"Healthy"}"#[..],
            br#"{"status":"Healthy","time_of_last_update":-1}"#,
            br#"{"status":"Healthy","time_of_last_update":null}"#,
        ] {
            assert_eq!(
                parse_ping(ok, body),
                Ok(PingStatus::Healthy { since: None }),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // No status to go by.
        let err = parse_ping(ok, br#"{"status":"Sleepy"}"#).unwrap_err();
        assert!(err.contains("unknown status \"Sleepy\""), "{err}");
        assert!(parse_ping(ok, b"pong").is_err());
        assert!(parse_ping(ok, br#"{"time_of_last_update":1}"#).is_err());
        let err = parse_ping(StatusCode::NOT_FOUND, br#"{"status":"Healthy"}"#).unwrap_err();
        assert!(err.contains("404"), "{err}");
    }
}

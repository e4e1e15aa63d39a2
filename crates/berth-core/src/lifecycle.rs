//! Background lifecycle: idle timeout, max lifetime, dead sandboxes, retention, and
//! reconciliation with what a previous server process left running.

use std::sync::atomic::Ordering;

use berth_api::SessionState;

use crate::{now_ms, Core, CoreError, SandboxRequest};

impl Core {
    /// Run the periodic checks until the returned handle is aborted.
    pub fn spawn_background(&self) -> tokio::task::JoinHandle<()> {
        let core = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(core.config().tick);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_retention = 0i64;
            loop {
                tick.tick().await;
                core.check_running().await;
                if now_ms() - last_retention > 60_000 {
                    last_retention = now_ms();
                    if let Err(e) = core.apply_retention().await {
                        tracing::warn!(error = %e, "retention sweep failed");
                    }
                }
            }
        })
    }

    /// Stop sandboxes that are idle, too old, or dead.
    pub(crate) async fn check_running(&self) {
        let now = now_ms();
        for slot in self.slots() {
            let reason = {
                let Ok(live) = slot.live.try_lock() else {
                    continue;
                }; // starting/stopping
                let Some(l) = live.as_ref() else { continue };
                // Busy first: whoever stops being busy records their activity before
                // the count drops, so a count of zero read here comes with that time.
                let busy = slot.busy.load(Ordering::SeqCst) > 0;
                let idle_ms = now - slot.last_activity_ms.load(Ordering::SeqCst);
                if now - l.started_at_ms >= (l.runtime.max_lifetime_s as i64) * 1000 {
                    Some("max_lifetime")
                } else if !busy && idle_ms >= (l.runtime.idle_timeout_s as i64) * 1000 {
                    Some("idle_timeout")
                } else if !self.driver().is_alive(&slot.id).await {
                    Some(self.driver().exit_reason(&slot.id).await)
                } else {
                    None
                }
            };
            if let Some(reason) = reason {
                let mut live = slot.live.lock().await;
                if let Err(e) = self.stop_locked(&slot.id, &mut live, reason).await {
                    tracing::warn!(session = %slot.id, error = %e, "stopping sandbox failed");
                }
            }
        }
    }

    /// Delete stopped sessions whose last activity is older than the retention period.
    pub async fn apply_retention(&self) -> Result<usize, CoreError> {
        let cutoff =
            now_ms() - i64::try_from(self.config().retention.as_millis()).unwrap_or(i64::MAX);
        let mut deleted = 0;
        for rec in self.store().list_sessions().await? {
            if rec.state == SessionState::Stopped.as_str() && rec.last_activity_ms < cutoff {
                tracing::info!(session = %rec.id, "retention: deleting inactive session");
                self.delete_session(&rec.id).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// On start: adopt sandboxes that are still healthy, stop the rest, and clean up
    /// host state no record claims.
    pub(crate) async fn reconcile(&self) -> Result<(), CoreError> {
        let records = self.store().list_sessions().await?;
        for rec in &records {
            if rec.state == SessionState::Stopped.as_str() {
                continue;
            }
            let runtime = self
                .store()
                .get_runtime(&rec.runtime)
                .await?
                .map(|r| r.spec);
            let adopted = match &runtime {
                Some(runtime) => {
                    let req = SandboxRequest {
                        session_id: rec.id.clone(),
                        runtime: runtime.clone(),
                        uid_slot: rec.uid_slot,
                    };
                    self.driver().adopt(&req).await.unwrap_or_else(|e| {
                        tracing::warn!(session = %rec.id, error = %e, "cannot adopt sandbox");
                        None
                    })
                }
                None => None,
            };
            match (adopted, runtime) {
                (Some(sandbox), Some(runtime)) if rec.state == SessionState::Running.as_str() => {
                    tracing::info!(session = %rec.id, "adopted running sandbox");
                    self.install_adopted(rec, runtime, sandbox).await;
                }
                _ => {
                    let _ = self.driver().stop(&rec.id).await;
                    let mut rec = rec.clone();
                    rec.state = SessionState::Stopped.as_str().into();
                    rec.stop_reason = Some("server_restart".into());
                    rec.workspace_bytes = self.driver().workspace_bytes(&rec.id).await;
                    self.store().update_session(&rec).await?;
                    tracing::info!(session = %rec.id, "stopped sandbox left by previous server");
                }
            }
        }
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        self.recordings().sweep(&ids);
        for id in self.driver().leftovers().await {
            let owned = records
                .iter()
                .any(|r| r.id == id && r.state == SessionState::Running.as_str());
            if !owned {
                tracing::info!(session = %id, "removing leftover sandbox state");
                let _ = self.driver().stop(&id).await;
            }
        }
        Ok(())
    }

    /// Stop every running sandbox (server shutdown).
    pub async fn stop_all(&self, reason: &str) {
        for slot in self.slots() {
            let mut live = slot.live.lock().await;
            if let Err(e) = self.stop_locked(&slot.id, &mut live, reason).await {
                tracing::warn!(session = %slot.id, error = %e, "stopping sandbox failed");
            }
        }
    }
}

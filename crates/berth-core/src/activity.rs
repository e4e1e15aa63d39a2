//! Activity the core cannot see, reported by the embedding layer: a busy mark held for
//! work inside the sandbox ([`Core::hold_busy`]) and the time such work last happened
//! ([`Core::note_activity`]). The AgentCore adapter uses both for what an agent's
//! `/ping` says (`HealthyBusy`; `Healthy` since `time_of_last_update`); the core knows
//! nothing about the protocol.
//!
//! A session idles out when nothing holds it busy and its last activity is older than
//! its runtime's idle timeout. The core's own guards (commands, attached shells, port
//! tunnels) record activity when they are taken and dropped; a [`BusyHold`] records
//! none, because its holder knows better when the work ended and says so.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use berth_api::validate;

use crate::sessions::Slot;
use crate::{now_ms, Core, CoreError};

/// Keeps a running session from idling out while alive. Taking and dropping it record
/// no activity: call [`Core::note_activity`] with the time the work ended before
/// dropping it, or the session may idle out at once (its idle clock runs from its last
/// activity, however long ago). Drop it when the work is over or the session stopped.
pub struct BusyHold {
    slot: Arc<Slot>,
}

impl std::fmt::Debug for BusyHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusyHold")
            .field("session", &self.slot.id)
            .finish()
    }
}

impl Drop for BusyHold {
    fn drop(&mut self) {
        self.slot.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Core {
    /// Hold the running session busy (see [`BusyHold`]). A stopped session is
    /// `Conflict`, an unknown one `NotFound`; this never starts a session.
    pub async fn hold_busy(&self, session_id: &str) -> Result<BusyHold, CoreError> {
        validate::id("session_id", session_id)?;
        self.record(session_id).await?;
        let slot = self.slot(session_id);
        // Counted under the lock the idle check takes: it cannot stop the sandbox
        // between this check and the count.
        let live = slot.live.lock().await;
        if live.is_none() {
            return Err(CoreError::Conflict(format!(
                "session {session_id:?} is not running; only a running session can be held busy"
            )));
        }
        slot.busy.fetch_add(1, Ordering::SeqCst);
        drop(live);
        Ok(BusyHold { slot })
    }

    /// Record that the running session was active at `at` (a time after now counts as
    /// now). Its idle clock runs from its latest activity, so a time before the one
    /// recorded changes nothing. A stopped session is left alone (the next start resets
    /// its clock); an unknown one is `NotFound`.
    pub async fn note_activity(&self, session_id: &str, at: SystemTime) -> Result<(), CoreError> {
        validate::id("session_id", session_id)?;
        self.record(session_id).await?;
        let at_ms = at
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
            .min(now_ms());
        let slot = self.slot(session_id);
        let live = slot.live.lock().await;
        if live.is_some() {
            slot.last_activity_ms.fetch_max(at_ms, Ordering::SeqCst);
        }
        Ok(())
    }
}

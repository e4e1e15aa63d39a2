//! Sessions: records in the store, live sandboxes in memory, one lock per session so
//! start/stop/delete of one session are serialized while other sessions proceed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_api::{validate, CreateSession, RuntimeSpec, Session, SessionState, SessionUsage};
use berth_store::{SessionRecord, Store};
use tokio::sync::Mutex as AsyncMutex;

use crate::recordings::Recordings;
use crate::{now_ms, CoreConfig, CoreError, Driver, Sandbox, SandboxRequest};

/// The server's core. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    driver: Arc<dyn Driver>,
    config: CoreConfig,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    running: AtomicUsize,
    recordings: Recordings,
}

/// In-memory state of one session.
pub(crate) struct Slot {
    pub(crate) id: String,
    /// `Some` while a sandbox runs. Held across start/stop so they never interleave.
    pub(crate) live: AsyncMutex<Option<Live>>,
    /// Operations in flight (commands, file transfers, attached clients).
    pub(crate) busy: AtomicUsize,
    pub(crate) last_activity_ms: AtomicI64,
    /// Signal senders of running commands, by command id.
    pub(crate) commands: Mutex<HashMap<String, tokio::sync::mpsc::Sender<i32>>>,
}

pub(crate) struct Live {
    pub(crate) sandbox: Sandbox,
    pub(crate) runtime: RuntimeSpec,
    pub(crate) started_at_ms: i64,
}

/// Keeps a session from going idle while alive.
pub(crate) struct BusyGuard {
    slot: Arc<Slot>,
}

impl BusyGuard {
    pub(crate) fn new(slot: Arc<Slot>) -> Self {
        slot.busy.fetch_add(1, Ordering::SeqCst);
        slot.last_activity_ms.fetch_max(now_ms(), Ordering::SeqCst);
        Self { slot }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.slot
            .last_activity_ms
            .fetch_max(now_ms(), Ordering::SeqCst);
        self.slot.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

fn new_session_id() -> String {
    use rand::Rng;
    let suffix: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(20)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect();
    format!("s-{suffix}")
}

impl Core {
    /// Open the core over a store and a driver: ensures the `default` runtime exists and
    /// reconciles sandboxes a previous server process left behind. Call
    /// [`Core::spawn_background`] afterwards to run idle/lifetime/retention checks.
    pub async fn new(
        store: Store,
        driver: Arc<dyn Driver>,
        config: CoreConfig,
    ) -> Result<Self, CoreError> {
        let core = Self {
            inner: Arc::new(Inner {
                store,
                driver,
                recordings: Recordings::new(config.logs_dir.clone()),
                config,
                slots: Mutex::new(HashMap::new()),
                running: AtomicUsize::new(0),
            }),
        };
        core.ensure_default_runtime().await?;
        core.reconcile().await?;
        Ok(core)
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn driver(&self) -> &dyn Driver {
        self.inner.driver.as_ref()
    }

    pub(crate) fn config(&self) -> &CoreConfig {
        &self.inner.config
    }

    pub(crate) fn recordings(&self) -> &Recordings {
        &self.inner.recordings
    }

    pub fn driver_name(&self) -> &'static str {
        self.inner.driver.name()
    }

    pub fn running_sandboxes(&self) -> usize {
        self.inner.running.load(Ordering::SeqCst)
    }

    pub(crate) fn slot(&self, id: &str) -> Arc<Slot> {
        #[allow(clippy::unwrap_used)] // poisoned only if a holder panicked
        let mut slots = self.inner.slots.lock().unwrap();
        slots
            .entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    id: id.to_string(),
                    live: AsyncMutex::new(None),
                    busy: AtomicUsize::new(0),
                    last_activity_ms: AtomicI64::new(0),
                    commands: Mutex::new(HashMap::new()),
                })
            })
            .clone()
    }

    pub(crate) fn slots(&self) -> Vec<Arc<Slot>> {
        #[allow(clippy::unwrap_used)]
        self.inner.slots.lock().unwrap().values().cloned().collect()
    }

    fn forget_slot(&self, id: &str) {
        #[allow(clippy::unwrap_used)]
        self.inner.slots.lock().unwrap().remove(id);
    }

    pub(crate) async fn record(&self, id: &str) -> Result<SessionRecord, CoreError> {
        self.store()
            .get_session(id)
            .await?
            .ok_or_else(|| CoreError::NotFound {
                what: "session",
                id: id.into(),
            })
    }

    /// Create a session record and start its sandbox.
    pub async fn create_session(&self, req: CreateSession) -> Result<Session, CoreError> {
        let id = match req.id {
            Some(id) => {
                validate::id("id", &id)?;
                id
            }
            None => new_session_id(),
        };
        let runtime = req
            .runtime
            .unwrap_or_else(|| berth_api::DEFAULT_RUNTIME.to_string());
        self.insert_record(&id, &runtime).await?;
        self.ensure_running(&id).await?;
        self.get_session(&id).await
    }

    async fn insert_record(&self, id: &str, runtime: &str) -> Result<SessionRecord, CoreError> {
        validate::id("runtime", runtime)?;
        if self.store().get_runtime(runtime).await?.is_none() {
            return Err(CoreError::NotFound {
                what: "runtime",
                id: runtime.into(),
            });
        }
        let now = now_ms();
        let mut rec = SessionRecord {
            id: id.to_string(),
            runtime: runtime.to_string(),
            state: SessionState::Stopped.as_str().into(),
            uid_slot: 0,
            stop_reason: None,
            cpu_ns: 0,
            peak_memory_bytes: 0,
            workspace_bytes: 0,
            created_at_ms: now,
            last_activity_ms: now,
            started_at_ms: None,
        };
        self.store()
            .insert_session(&mut rec)
            .await
            .map_err(|e| match e {
                berth_store::StoreError::AlreadyExists { .. } => CoreError::AlreadyExists {
                    what: "session",
                    id: id.to_string(),
                },
                other => other.into(),
            })?;
        Ok(rec)
    }

    /// The session's record, creating it with `runtime` when it does not exist yet
    /// (sessions are created on first use).
    pub(crate) async fn record_or_create(
        &self,
        id: &str,
        runtime: Option<&str>,
    ) -> Result<SessionRecord, CoreError> {
        validate::id("session_id", id)?;
        if let Some(rec) = self.store().get_session(id).await? {
            return Ok(rec);
        }
        match self
            .insert_record(id, runtime.unwrap_or(berth_api::DEFAULT_RUNTIME))
            .await
        {
            Err(CoreError::AlreadyExists { .. }) => self.record(id).await, // lost a race: fine
            other => other,
        }
    }

    /// Return the session's running sandbox, starting (resuming) one if needed.
    pub(crate) async fn ensure_running(
        &self,
        id: &str,
    ) -> Result<(Arc<Slot>, Sandbox, RuntimeSpec), CoreError> {
        let slot = self.slot(id);
        let mut live = slot.live.lock().await;
        if let Some(l) = live.as_ref() {
            // A sandbox that died since the last liveness tick is replaced now rather
            // than failing this request.
            if self.driver().is_alive(id).await {
                return Ok((slot.clone(), l.sandbox.clone(), l.runtime.clone()));
            }
            let reason = self.driver().exit_reason(id).await;
            self.stop_locked(id, &mut live, reason).await?;
        }
        let mut rec = self.record(id).await?;
        let runtime = self
            .store()
            .get_runtime(&rec.runtime)
            .await?
            .ok_or_else(|| CoreError::NotFound {
                what: "runtime",
                id: rec.runtime.clone(),
            })?
            .spec;
        let limit = self.config().max_sandboxes;
        if self.inner.running.fetch_add(1, Ordering::SeqCst) >= limit {
            self.inner.running.fetch_sub(1, Ordering::SeqCst);
            return Err(CoreError::TooManySandboxes { limit });
        }
        rec.state = SessionState::Starting.as_str().into();
        rec.stop_reason = None;
        if let Err(e) = self.store().update_session(&rec).await {
            self.inner.running.fetch_sub(1, Ordering::SeqCst);
            return Err(e.into());
        }
        let req = SandboxRequest {
            session_id: id.to_string(),
            runtime: runtime.clone(),
            uid_slot: rec.uid_slot,
        };
        let sandbox = match self.driver().start(&req).await {
            Ok(s) => s,
            Err(e) => {
                self.inner.running.fetch_sub(1, Ordering::SeqCst);
                tracing::error!(session = id, error = ?e, "sandbox start failed");
                rec.state = SessionState::Stopped.as_str().into();
                rec.stop_reason = Some("start_failed".into());
                self.store().update_session(&rec).await?;
                return Err(e.into());
            }
        };
        let now = now_ms();
        rec.state = SessionState::Running.as_str().into();
        rec.started_at_ms = Some(now);
        rec.last_activity_ms = now;
        self.store().update_session(&rec).await?;
        slot.last_activity_ms.store(now, Ordering::SeqCst);
        *live = Some(Live {
            sandbox: sandbox.clone(),
            runtime: runtime.clone(),
            started_at_ms: now,
        });
        tracing::info!(session = id, "sandbox started");
        Ok((slot.clone(), sandbox, runtime))
    }

    /// Adopt an already-running sandbox found at startup.
    pub(crate) async fn install_adopted(
        &self,
        rec: &SessionRecord,
        runtime: RuntimeSpec,
        sandbox: Sandbox,
    ) {
        let slot = self.slot(&rec.id);
        let mut live = slot.live.lock().await;
        self.inner.running.fetch_add(1, Ordering::SeqCst);
        slot.last_activity_ms.store(now_ms(), Ordering::SeqCst);
        self.recordings().resume(&rec.id, &sandbox.guest).await;
        *live = Some(Live {
            sandbox,
            runtime,
            started_at_ms: rec.started_at_ms.unwrap_or_else(now_ms),
        });
    }

    /// Stop the session's sandbox (if any). The workspace stays.
    pub async fn stop_session(&self, id: &str, reason: &str) -> Result<Session, CoreError> {
        validate::id("session_id", id)?;
        self.record(id).await?;
        let slot = self.slot(id);
        let mut live = slot.live.lock().await;
        self.stop_locked(id, &mut live, reason).await?;
        drop(live);
        self.get_session(id).await
    }

    /// Stop with the session lock held: meter, shut the guest down, tear down, record.
    pub(crate) async fn stop_locked(
        &self,
        id: &str,
        live: &mut Option<Live>,
        reason: &str,
    ) -> Result<(), CoreError> {
        let Some(l) = live.take() else { return Ok(()) };
        let stats = self.driver().stats(id).await.unwrap_or_default();
        let mut guest = l.sandbox.guest.clone();
        // A graceful shutdown lets the guest sync the workspace; the driver kills
        // whatever is left either way.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            guest.shutdown(berth_guest::proto::Empty {}),
        )
        .await;
        let stopped = self.driver().stop(id).await;
        // The shells are gone: their recorders write what they received and end.
        self.recordings().end_session(id).await;
        self.inner.running.fetch_sub(1, Ordering::SeqCst);
        let mut rec = self.record(id).await?;
        rec.cpu_ns = rec.cpu_ns.saturating_add(stats.cpu_ns);
        rec.peak_memory_bytes = rec.peak_memory_bytes.max(stats.memory_peak_bytes);
        rec.workspace_bytes = self.driver().workspace_bytes(id).await;
        rec.state = SessionState::Stopped.as_str().into();
        rec.stop_reason = Some(reason.to_string());
        rec.last_activity_ms = rec
            .last_activity_ms
            .max(self.slot(id).last_activity_ms.load(Ordering::SeqCst));
        self.store().update_session(&rec).await?;
        tracing::info!(session = id, reason, "sandbox stopped");
        stopped?;
        Ok(())
    }

    /// Stop the session and delete its workspace and record.
    pub async fn delete_session(&self, id: &str) -> Result<(), CoreError> {
        validate::id("session_id", id)?;
        self.record(id).await?;
        let slot = self.slot(id);
        let mut live = slot.live.lock().await;
        self.stop_locked(id, &mut live, "deleted").await?;
        self.driver().delete_workspace(id).await?;
        self.recordings().delete_session(id);
        self.store().delete_session(id).await?;
        drop(live);
        self.forget_slot(id);
        tracing::info!(session = id, "session deleted");
        Ok(())
    }

    pub async fn get_session(&self, id: &str) -> Result<Session, CoreError> {
        validate::id("session_id", id)?;
        let rec = self.record(id).await?;
        Ok(self.describe(rec).await)
    }

    pub async fn list_sessions(&self) -> Result<Vec<Session>, CoreError> {
        let mut out = Vec::new();
        for rec in self.store().list_sessions().await? {
            out.push(self.describe(rec).await);
        }
        Ok(out)
    }

    /// Turn a record into the API view, adding the live sandbox's usage.
    async fn describe(&self, rec: SessionRecord) -> Session {
        let mut cpu_ns = rec.cpu_ns;
        let mut peak = rec.peak_memory_bytes;
        let mut workspace = rec.workspace_bytes;
        // Only a running sandbox has a cgroup to read; the driver answers `None` otherwise.
        if rec.state == SessionState::Running.as_str() {
            if let Some(stats) = self.driver().stats(&rec.id).await {
                cpu_ns = cpu_ns.saturating_add(stats.cpu_ns);
                peak = peak.max(stats.memory_peak_bytes);
            }
            workspace = self.driver().workspace_bytes(&rec.id).await;
        }
        // Listing must not create in-memory state for every session it shows.
        #[allow(clippy::unwrap_used)] // poisoned only if a holder panicked
        let live_activity = self
            .inner
            .slots
            .lock()
            .unwrap()
            .get(&rec.id)
            .map(|s| s.last_activity_ms.load(Ordering::SeqCst));
        let state = rec.state.parse().unwrap_or(SessionState::Stopped);
        Session {
            id: rec.id,
            runtime: rec.runtime,
            state,
            stop_reason: rec.stop_reason,
            usage: SessionUsage {
                cpu_seconds: cpu_ns as f64 / 1e9,
                peak_memory_bytes: peak,
                workspace_bytes: workspace,
            },
            created_at_ms: rec.created_at_ms,
            last_activity_ms: rec.last_activity_ms.max(live_activity.unwrap_or(0)),
            started_at_ms: rec.started_at_ms,
        }
    }
}

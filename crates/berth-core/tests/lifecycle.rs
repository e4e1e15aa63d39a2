#![allow(clippy::unwrap_used)]

//! Lifecycle logic (idle timeout, max lifetime, resume, metering, caps, retention)
//! against a fake driver whose "sandbox" is a real `berth guest` process on a unix
//! socket: the core and the guest are real, only the isolation is left out, so these run
//! without root.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use berth_api::{CommandEvent, CommandRequest, RuntimeSpec, SessionState};
use berth_core::{
    Core, CoreConfig, CoreError, Driver, DriverError, Sandbox, SandboxRequest, SandboxStats,
};
use futures::StreamExt;

/// The `berth` binary built for this workspace; these tests need it as the guest.
fn berth_exe() -> Option<PathBuf> {
    let exe = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/berth");
    exe.exists().then_some(exe)
}

struct ProcessDriver {
    exe: PathBuf,
    dir: tempfile::TempDir,
    children: Mutex<HashMap<String, std::process::Child>>,
    deleted: Mutex<HashSet<String>>,
}

impl Drop for ProcessDriver {
    fn drop(&mut self) {
        for (_, mut child) in self.children.lock().unwrap().drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process-fake"
    }
    fn validate(&self, runtime: &RuntimeSpec) -> Result<(), DriverError> {
        if runtime.image == "/missing" {
            return Err(DriverError::InvalidRuntime {
                field: "image",
                message: "no such directory".into(),
            });
        }
        Ok(())
    }
    async fn start(&self, req: &SandboxRequest) -> Result<Sandbox, DriverError> {
        let sock = self.dir.path().join(format!("{}.sock", req.session_id));
        let child = std::process::Command::new(&self.exe)
            .args(["guest", "--listen"])
            .arg(&sock)
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| DriverError::Start {
                session: req.session_id.clone(),
                source: Box::new(e),
            })?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap()
            .insert(req.session_id.clone(), child);
        for _ in 0..2000 {
            if let Ok(mut guest) = berth_guest::client::connect_unix(&sock).await {
                if guest.health(berth_guest::proto::Empty {}).await.is_ok() {
                    return Ok(Sandbox {
                        guest,
                        init_pid: pid,
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Err(DriverError::Start {
            session: req.session_id.clone(),
            source: "guest never answered".into(),
        })
    }
    async fn adopt(&self, _req: &SandboxRequest) -> Result<Option<Sandbox>, DriverError> {
        Ok(None)
    }
    async fn is_alive(&self, session_id: &str) -> bool {
        let mut children = self.children.lock().unwrap();
        children
            .get_mut(session_id)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
    async fn stop(&self, session_id: &str) -> Result<(), DriverError> {
        if let Some(mut child) = self.children.lock().unwrap().remove(session_id) {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }
    async fn stats(&self, session_id: &str) -> Option<SandboxStats> {
        self.children
            .lock()
            .unwrap()
            .contains_key(session_id)
            .then_some(SandboxStats {
                cpu_ns: 1_000_000,
                memory_peak_bytes: 4096,
            })
    }
    async fn workspace_bytes(&self, _session_id: &str) -> u64 {
        0
    }
    async fn delete_workspace(&self, session_id: &str) -> Result<(), DriverError> {
        self.deleted.lock().unwrap().insert(session_id.to_string());
        Ok(())
    }
    async fn leftovers(&self) -> Vec<String> {
        Vec::new()
    }
    fn workspace_image(&self, session_id: &str) -> PathBuf {
        self.dir.path().join(session_id)
    }
}

struct Fixture {
    core: Core,
    driver: Arc<ProcessDriver>,
    _db: tempfile::TempDir,
}

async fn fixture(config: CoreConfig) -> Option<Fixture> {
    let Some(exe) = berth_exe() else {
        eprintln!("skipping: target/debug/berth is not built (cargo build -p berth)");
        return None;
    };
    let db = tempfile::tempdir().unwrap();
    let store = berth_store::Store::open(&db.path().join("state.db"))
        .await
        .unwrap();
    let driver = Arc::new(ProcessDriver {
        exe,
        dir: tempfile::tempdir().unwrap(),
        children: Mutex::default(),
        deleted: Mutex::default(),
    });
    let core = Core::new(store, driver.clone(), config).await.unwrap();
    core.spawn_background();
    Some(Fixture {
        core,
        driver,
        _db: db,
    })
}

fn fast(config: CoreConfig) -> CoreConfig {
    CoreConfig {
        tick: Duration::from_millis(50),
        ..config
    }
}

async fn runtime(core: &Core, name: &str, idle_s: u64, lifetime_s: u64) {
    let mut spec = RuntimeSpec::named(name);
    spec.workspace_path = "/tmp".into();
    spec.idle_timeout_s = idle_s;
    spec.max_lifetime_s = lifetime_s;
    core.create_runtime(spec).await.unwrap();
}

/// Run a command to completion; returns (stdout, exit code).
async fn run(
    core: &Core,
    session: &str,
    runtime: Option<&str>,
    command: &str,
) -> Result<(String, Option<i32>), CoreError> {
    let req = CommandRequest {
        command: Some(command.into()),
        runtime: runtime.map(Into::into),
        ..Default::default()
    };
    let mut events = core.run_command(session, req).await?;
    let mut out = Vec::new();
    while let Some(ev) = events.next().await {
        match ev.to_api() {
            CommandEvent::Stdout { data } => {
                use base64::Engine;
                out.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .unwrap(),
                );
            }
            CommandEvent::Exit { code, .. } => {
                return Ok((String::from_utf8_lossy(&out).into(), code))
            }
            CommandEvent::Error { error } => panic!("command failed: {error}"),
            _ => {}
        }
    }
    panic!("stream ended without exit");
}

async fn wait_state(core: &Core, session: &str, state: SessionState) -> berth_api::Session {
    for _ in 0..400 {
        let s = core.get_session(session).await.unwrap();
        if s.state == state {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("session {session} never reached {state:?}");
}

#[tokio::test]
async fn idle_session_stops_and_resumes_with_metering() {
    let Some(f) = fixture(fast(CoreConfig::default())).await else {
        return;
    };
    runtime(&f.core, "quick", 1, 3600).await;
    assert_eq!(
        run(&f.core, "s1", Some("quick"), "echo one").await.unwrap(),
        ("one\n".into(), Some(0))
    );
    let stopped = wait_state(&f.core, "s1", SessionState::Stopped).await;
    assert_eq!(stopped.stop_reason.as_deref(), Some("idle_timeout"));
    assert!(!f.driver.is_alive("s1").await, "sandbox torn down");
    assert_eq!(
        run(&f.core, "s1", None, "echo two").await.unwrap().0,
        "two\n"
    );
    assert_eq!(
        f.core.get_session("s1").await.unwrap().state,
        SessionState::Running
    );
    f.core.stop_session("s1", "requested").await.unwrap();
    let s = f.core.get_session("s1").await.unwrap();
    assert_eq!(s.stop_reason.as_deref(), Some("requested"));
    // Two sandboxes of 1 ms CPU each were metered and summed; the peak is a max.
    assert!(
        (s.usage.cpu_seconds - 0.002).abs() < 1e-9,
        "{}",
        s.usage.cpu_seconds
    );
    assert_eq!(s.usage.peak_memory_bytes, 4096);
}

#[tokio::test]
async fn running_command_keeps_session_from_idling() {
    let Some(f) = fixture(fast(CoreConfig::default())).await else {
        return;
    };
    runtime(&f.core, "quick", 1, 3600).await;
    // The command outlives the idle timeout twice over; the session must stay up for it.
    assert_eq!(
        run(&f.core, "busy", Some("quick"), "sleep 2.5; echo done")
            .await
            .unwrap()
            .0,
        "done\n"
    );
    wait_state(&f.core, "busy", SessionState::Stopped).await;
}

#[tokio::test]
async fn max_lifetime_stops_even_a_busy_session() {
    let Some(f) = fixture(fast(CoreConfig::default())).await else {
        return;
    };
    runtime(&f.core, "short", 3600, 1).await;
    let req = CommandRequest {
        command: Some("sleep 30".into()),
        runtime: Some("short".into()),
        ..Default::default()
    };
    let mut events = f.core.run_command("old", req).await.unwrap();
    let s = wait_state(&f.core, "old", SessionState::Stopped).await;
    assert_eq!(s.stop_reason.as_deref(), Some("max_lifetime"));
    // The stream ends (the sandbox is gone) instead of hanging.
    while let Some(ev) = events.next().await {
        if matches!(
            ev.to_api(),
            CommandEvent::Exit { .. } | CommandEvent::Error { .. }
        ) {
            break;
        }
    }
}

#[tokio::test]
async fn sandbox_cap_is_enforced() {
    let Some(f) = fixture(fast(CoreConfig {
        max_sandboxes: 1,
        ..CoreConfig::default()
    }))
    .await
    else {
        return;
    };
    runtime(&f.core, "tmp", 3600, 3600).await;
    run(&f.core, "a", Some("tmp"), "true").await.unwrap();
    let err = run(&f.core, "b", Some("tmp"), "true").await.unwrap_err();
    assert!(
        matches!(err, CoreError::TooManySandboxes { limit: 1 }),
        "{err:?}"
    );
    assert_eq!(berth_api::ApiError::from(&err).code.http_status(), 429);
    f.core.stop_session("a", "requested").await.unwrap();
    run(&f.core, "b", None, "true").await.unwrap();
}

#[tokio::test]
async fn retention_deletes_inactive_stopped_sessions_only() {
    let Some(f) = fixture(fast(CoreConfig {
        retention: Duration::ZERO,
        ..CoreConfig::default()
    }))
    .await
    else {
        return;
    };
    runtime(&f.core, "tmp", 3600, 3600).await;
    run(&f.core, "old", Some("tmp"), "true").await.unwrap();
    run(&f.core, "live", Some("tmp"), "true").await.unwrap();
    f.core.stop_session("old", "requested").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(f.core.apply_retention().await.unwrap(), 1);
    assert!(matches!(
        f.core.get_session("old").await,
        Err(CoreError::NotFound { .. })
    ));
    assert!(f.driver.deleted.lock().unwrap().contains("old"));
    assert_eq!(
        f.core.get_session("live").await.unwrap().state,
        SessionState::Running
    );
}

#[tokio::test]
async fn bad_input_names_the_field() {
    let Some(f) = fixture(CoreConfig::default()).await else {
        return;
    };
    let field = |e: CoreError| berth_api::ApiError::from(&e).field;
    let mut spec = RuntimeSpec::named("x");
    spec.image = "/missing".into();
    assert_eq!(
        field(f.core.create_runtime(spec).await.unwrap_err()).as_deref(),
        Some("image")
    );
    let mut spec = RuntimeSpec::named("x");
    spec.mounts = (0..6)
        .map(|i| berth_api::Mount {
            source: "/tmp".into(),
            target: format!("/m{i}"),
            read_only: true,
        })
        .collect();
    assert_eq!(
        field(f.core.create_runtime(spec).await.unwrap_err()).as_deref(),
        Some("mounts")
    );
    let err = f
        .core
        .run_command(
            "../x",
            CommandRequest {
                command: Some("true".into()),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(field(err.err().unwrap()).as_deref(), Some("session_id"));
    let err = run(&f.core, "s", Some("nope"), "true").await.unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                what: "runtime",
                ..
            }
        ),
        "{err:?}"
    );
}

#![allow(clippy::unwrap_used)]

//! `Core::connect_port` (and the activity the core cannot see: busy holds, noted
//! activity, health-check tunnels) against a fake driver whose "sandbox" is a real guest agent
//! process (this test binary re-executed into `agent_process`) on a unix socket: the
//! core, the guest protocol and the agent are real, only the isolation is left out, so
//! the agent dials this host's 127.0.0.1 and these run without root.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use berth_api::{RuntimeSpec, SessionState};
use berth_core::{
    Core, CoreConfig, CoreError, Driver, DriverError, PortStream, Sandbox, SandboxRequest,
    SandboxStats, TunnelKind,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const LISTEN_ENV: &str = "BERTH_PORTS_TEST_LISTEN";

/// Not a test: the guest agent of the other tests, when re-executed with `LISTEN_ENV`.
#[test]
fn agent_process() {
    if let Some(listen) = std::env::var_os(LISTEN_ENV) {
        berth_guest::agent::cli_main(vec!["--listen".into(), listen]).unwrap();
    }
}

/// Starts each "sandbox" as a guest agent process.
struct AgentDriver {
    dir: tempfile::TempDir,
    children: Mutex<HashMap<String, std::process::Child>>,
}

impl Drop for AgentDriver {
    fn drop(&mut self) {
        for (_, mut child) in self.children.lock().unwrap().drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[async_trait]
impl Driver for AgentDriver {
    fn name(&self) -> &'static str {
        "agent-process-fake"
    }
    fn validate(&self, _runtime: &RuntimeSpec) -> Result<(), DriverError> {
        Ok(())
    }
    async fn start(&self, req: &SandboxRequest) -> Result<Sandbox, DriverError> {
        let sock = self.dir.path().join(format!("{}.sock", req.session_id));
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "agent_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(LISTEN_ENV, &sock)
            .env("BERTH_LOG", "warn")
            .stdout(std::process::Stdio::null())
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
        for _ in 0..6000 {
            if let Ok(mut guest) = berth_guest::client::connect_unix(&sock).await {
                if guest.health(berth_guest::proto::Empty {}).await.is_ok() {
                    return Ok(Sandbox {
                        guest,
                        init_pid: pid,
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(DriverError::Start {
            session: req.session_id.clone(),
            source: "the guest agent never answered".into(),
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
    async fn stats(&self, _session_id: &str) -> Option<SandboxStats> {
        None
    }
    async fn workspace_bytes(&self, _session_id: &str) -> u64 {
        0
    }
    async fn delete_workspace(&self, _session_id: &str) -> Result<(), DriverError> {
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
    _db: tempfile::TempDir,
}

/// A core with a fast lifecycle tick and a runtime `rt` whose sessions idle out after
/// `idle_s`.
async fn fixture(idle_s: u64) -> Fixture {
    let db = tempfile::tempdir().unwrap();
    let store = berth_store::Store::open(&db.path().join("state.db"))
        .await
        .unwrap();
    let driver = std::sync::Arc::new(AgentDriver {
        dir: tempfile::tempdir().unwrap(),
        children: Mutex::default(),
    });
    let config = CoreConfig {
        tick: Duration::from_millis(50),
        ..CoreConfig::default()
    };
    let core = Core::new(store, driver, config).await.unwrap();
    core.spawn_background();
    let mut spec = RuntimeSpec::named("rt");
    spec.workspace_path = "/tmp".into();
    spec.idle_timeout_s = idle_s;
    core.create_runtime(spec).await.unwrap();
    Fixture { core, _db: db }
}

async fn session(core: &Core, id: &str) {
    core.create_session(berth_api::CreateSession {
        id: Some(id.into()),
        runtime: Some("rt".into()),
    })
    .await
    .unwrap();
}

async fn wait_state(core: &Core, session: &str, state: SessionState) -> berth_api::Session {
    for _ in 0..1200 {
        let s = core.get_session(session).await.unwrap();
        if s.state == state {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("session {session} never reached {state:?}");
}

/// An HTTP/1.1 server on this host's 127.0.0.1 (which is the fake sandbox's loopback)
/// in the shape of an AgentCore agent: `GET /ping`, `POST /invocations` (echoes the
/// body), `GET /big` (4 MiB of a pattern).
async fn agent_http_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let path = req.uri().path().to_string();
                        let body = match path.as_str() {
                            "/ping" => Bytes::from_static(br#"{"status":"Healthy"}"#),
                            "/invocations" => {
                                let got = req.into_body().collect().await.unwrap().to_bytes();
                                Bytes::from([&b"echo: "[..], &got[..]].concat())
                            }
                            "/big" => Bytes::from(big_body()),
                            _ => Bytes::from_static(b"no such path"),
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(body)))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    port
}

fn big_body() -> Vec<u8> {
    (0..4u32 << 20).map(|i| (i % 251) as u8).collect()
}

fn assert_byte_stream<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(_: &T) {}

/// hyper's HTTP/1.1 client runs over a `PortStream` as over a TCP socket: several
/// requests on one keep-alive connection, a body each way, a large response.
#[tokio::test]
async fn hyper_http1_client_over_a_port_stream() {
    let f = fixture(900).await;
    session(&f.core, "http").await;
    let port = agent_http_server().await;
    let stream = f.core.connect_port("http", port).await.unwrap();
    assert_byte_stream(&stream);
    assert_eq!(stream.port(), port);
    assert_eq!(stream.session_id(), "http");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);

    let get = |path: &str| {
        Request::get(path)
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let resp = sender.send_request(get("/ping")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"status":"Healthy"}"#);

    let post = Request::post("/invocations")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"prompt":"hi"}"#)))
        .unwrap();
    let resp = sender.send_request(post).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"echo: {"prompt":"hi"}"#);

    let resp = sender.send_request(get("/big")).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body[..] == big_body()[..], "the large body differs");

    drop(sender);
    conn.await.unwrap().unwrap();
}

/// Half-close: `shutdown()` reaches the server as EOF while its answer still comes back.
#[tokio::test]
async fn shutdown_half_closes() {
    let f = fixture(900).await;
    session(&f.core, "half").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("read {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
    });
    let mut stream = f.core.connect_port("half", port).await.unwrap();
    // One write larger than a data message: accepted in pieces.
    stream.write_all(&vec![7u8; 200_000]).await.unwrap();
    stream.shutdown().await.unwrap();
    assert!(
        stream.write_all(b"x").await.is_err(),
        "write after shutdown"
    );
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "read 200000 bytes");
}

#[tokio::test]
async fn errors_name_what_is_wrong_and_nothing_is_started() {
    let f = fixture(900).await;
    let err = f.core.connect_port("nope", 8080).await.unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::NotFound {
                what: "session",
                ..
            }
        ),
        "{err:?}"
    );

    session(&f.core, "errs").await;
    let err = f.core.connect_port("errs", 0).await.unwrap_err();
    assert!(
        matches!(&err, CoreError::Invalid { field, .. } if field == "port"),
        "{err:?}"
    );

    let free = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = f.core.connect_port("errs", free).await.unwrap_err();
    let api = berth_api::ApiError::from(&err);
    assert_eq!(api.code, berth_api::ErrorCode::Unavailable, "{err:?}");
    assert_eq!(
        api.message,
        format!("nothing listens on 127.0.0.1:{free} in the sandbox")
    );

    f.core.stop_session("errs", "requested").await.unwrap();
    let err = f.core.connect_port("errs", 8080).await.unwrap_err();
    assert!(matches!(err, CoreError::Conflict(_)), "{err:?}");
    assert!(err.to_string().contains("not running"), "{err}");
    assert_eq!(
        f.core.get_session("errs").await.unwrap().state,
        SessionState::Stopped,
        "connect_port must not start the session"
    );
}

/// An open tunnel counts as activity: the session outlives its idle timeout while one
/// is open, and idles out once it is closed.
#[tokio::test]
async fn an_open_tunnel_keeps_the_session_from_idling() {
    let f = fixture(1).await;
    session(&f.core, "idle").await;
    let port = agent_http_server().await;
    let stream: PortStream = f.core.connect_port("idle", port).await.unwrap();
    // Twice the idle timeout and more, with the tunnel open and silent.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = f.core.get_session("idle").await.unwrap();
    assert_eq!(s.state, SessionState::Running, "{s:?}");
    // And it still works.
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get("/ping")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    drop(sender);
    conn.await.unwrap().unwrap();
    // The connection (and with it the stream) is gone: the session may idle now.
    let stopped = wait_state(&f.core, "idle", SessionState::Stopped).await;
    assert_eq!(stopped.stop_reason.as_deref(), Some("idle_timeout"));
}

// ---- activity the core cannot see: busy holds, noted activity, health-check tunnels ----

fn at_ms(ms: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap())
}

/// A hold keeps a session running past its idle timeout and records nothing; once it is
/// released, the session idles out counted from the time noted for it.
#[tokio::test]
async fn a_busy_hold_keeps_the_session_running_and_the_noted_time_counts() {
    let f = fixture(1).await;
    session(&f.core, "held").await;
    let started = f.core.get_session("held").await.unwrap().last_activity_ms;
    let hold = f.core.hold_busy("held").await.unwrap();
    // Twice the idle timeout and more, with nothing else going on.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = f.core.get_session("held").await.unwrap();
    assert_eq!(s.state, SessionState::Running, "{s:?}");
    assert_eq!(s.last_activity_ms, started, "taking a hold is not activity");

    // Noted: a time after the start; an earlier one changes nothing.
    let noted = started + 1500;
    f.core.note_activity("held", at_ms(noted)).await.unwrap();
    f.core.note_activity("held", at_ms(started)).await.unwrap();
    assert_eq!(
        f.core.get_session("held").await.unwrap().last_activity_ms,
        noted
    );
    drop(hold);
    let stopped = wait_state(&f.core, "held", SessionState::Stopped).await;
    assert_eq!(stopped.stop_reason.as_deref(), Some("idle_timeout"));
    assert_eq!(
        stopped.last_activity_ms, noted,
        "the idle clock ran from the noted time, not from the release"
    );

    // A time still to come counts as now.
    session(&f.core, "future").await;
    let before = std::time::SystemTime::now();
    f.core
        .note_activity("future", before + Duration::from_secs(3600))
        .await
        .unwrap();
    let after = std::time::SystemTime::now();
    let last = at_ms(f.core.get_session("future").await.unwrap().last_activity_ms);
    assert!(last <= after, "a future time was recorded as is");
    assert!(
        last + Duration::from_millis(1) >= before,
        "the clamped time is not now"
    );
}

/// Only a running session can be held busy; a stopped one is left alone by noted
/// activity; unknown sessions are not found.
#[tokio::test]
async fn holds_and_notes_need_a_running_session() {
    let f = fixture(900).await;
    let err = f.core.hold_busy("nope").await.unwrap_err();
    assert!(matches!(err, CoreError::NotFound { .. }), "{err:?}");
    let err = f
        .core
        .note_activity("nope", std::time::SystemTime::now())
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::NotFound { .. }), "{err:?}");
    let err = f.core.hold_busy("../x").await.unwrap_err();
    assert!(
        matches!(&err, CoreError::Invalid { field, .. } if field == "session_id"),
        "{err:?}"
    );

    session(&f.core, "stopped").await;
    f.core.stop_session("stopped", "requested").await.unwrap();
    let last = f
        .core
        .get_session("stopped")
        .await
        .unwrap()
        .last_activity_ms;
    let err = f.core.hold_busy("stopped").await.unwrap_err();
    assert!(matches!(err, CoreError::Conflict(_)), "{err:?}");
    assert!(err.to_string().contains("not running"), "{err}");
    f.core
        .note_activity(
            "stopped",
            std::time::SystemTime::now() + Duration::from_secs(1),
        )
        .await
        .unwrap();
    let s = f.core.get_session("stopped").await.unwrap();
    assert_eq!((s.state, s.last_activity_ms), (SessionState::Stopped, last));
}

/// A health-check tunnel is not activity: a session polled through such tunnels over
/// and over still idles out, and its last activity stays where it was.
#[tokio::test]
async fn health_check_tunnels_do_not_count_as_activity() {
    let f = fixture(1).await;
    session(&f.core, "polled").await;
    let started = f.core.get_session("polled").await.unwrap().last_activity_ms;
    let port = agent_http_server().await;
    let mut polls = 0;
    let stopped = loop {
        let s = f.core.get_session("polled").await.unwrap();
        if s.state == SessionState::Stopped {
            break s;
        }
        assert!(polls < 600, "the session never idled out: {s:?}");
        match f
            .core
            .connect_port_as("polled", port, TunnelKind::HealthCheck)
            .await
        {
            Ok(stream) => {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                let conn = tokio::spawn(conn);
                let req = Request::get("/ping")
                    .header("host", "localhost")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                // The sandbox may stop while the tunnel is open: that is allowed.
                if let Ok(resp) = sender.send_request(req).await {
                    assert_eq!(resp.status(), 200);
                    let _ = resp.into_body().collect().await;
                }
                drop(sender);
                let _ = conn.await;
            }
            Err(CoreError::Conflict(_)) => {} // it just stopped
            Err(e) => panic!("{e:?}"),
        }
        polls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(polls > 5, "polled only {polls} times");
    assert_eq!(stopped.stop_reason.as_deref(), Some("idle_timeout"));
    assert_eq!(
        stopped.last_activity_ms, started,
        "a health check was counted"
    );
}

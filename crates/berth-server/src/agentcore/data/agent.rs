//! The agent process of a runtime session: its code in the sandbox, its shell, its
//! readiness, and HTTP to it over a port tunnel.
//!
//! 1. **Code.** The unpacked code on the host is never mounted (the data dir must not
//!    reach a sandbox). It is archived once per version into `<code dir>.tar` (with a
//!    `.berth-version` entry last) and streamed through the core's file write, which the
//!    guest unpacks itself into a staging dir (its tar unpacking refuses entries that
//!    would leave the directory, and needs no `tar` program in the image); a command
//!    then swaps the staging dir in as `/var/task`. Skipped when
//!    `/var/task/.berth-version` already names this runtime and version.
//! 2. **Process.** The entry point runs as the detached shell `agentcore-agent`, so its
//!    output is recorded and an operator can watch it (`berth exec --it --session
//!    <native session> --shell-id agentcore-agent --watch`). `DOCKER_CONTAINER=1` makes
//!    `BedrockAgentCoreApp.run()` bind 0.0.0.0 (B4): harmless, the sandbox has no
//!    outside network, and the tunnel reaches its loopback either way.
//! 3. **Readiness.** `GET /ping` over `Core::connect_port` until it answers 200 (MCP and
//!    A2A servers need not serve `/ping`: any answer below 500 will do), within 120 s.
//!    Meanwhile the shell is watched: if it exits first, the request fails with
//!    RuntimeClientError (424) carrying the end of its output. A per-session lock lets
//!    one request start the agent while concurrent ones wait for it. Once ready, the
//!    agent's `/ping` is polled while it runs (`ping.rs`).
//! 4. **Restart.** A server that starts again finds the agents of the sandboxes its core
//!    adopted still running, maybe busy with background work. [`AgentCore::resume_agents`]
//!    asks each one `/ping` as the readiness probe does: one that answers is marked ready
//!    (the next invoke uses it as it is) and polled; one that does not is polled all the
//!    same, and left for the next invoke to wait for as usual.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::http::{header, Request, Response, StatusCode};
use berth_api::shell::{AttachMode, AttachOptions, OpenShell};
use berth_api::{CommandRequest, ErrorCode, SessionState};
use berth_core::{Core, CoreError, ExecEvent, ShellEvent, TunnelKind};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::runtime_client_error;
use super::sessions::RuntimeSession;
use crate::agentcore::artifacts::ManagedRuntime;
use crate::agentcore::mapping::{self, Protocol, ServerProtocol};
use crate::agentcore::{runtimes, AgentCore, AwsError, Target};

/// The agent's shell id in its session.
pub const AGENT_SHELL: &str = "agentcore-agent";
/// Where the code goes in the sandbox (as on AWS's managed runtimes).
pub const TASK_DIR: &str = "/var/task";
const STAGING_DIR: &str = "/var/.berth-task.new";
/// Names the runtime and version whose code `/var/task` holds.
const VERSION_FILE: &str = ".berth-version";
/// How long the agent has to answer `GET /ping` after it starts.
pub const READY_BUDGET: Duration = Duration::from_secs(120);
/// One readiness probe's limit.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Output kept for the error when the agent exits before it is ready.
const TAIL_BYTES: usize = 4096;
/// The helper commands' time limit (copying code in is the longest).
const HELPER_TIMEOUT_S: f64 = 300.0;
/// How many adopted sessions' agents are looked at together after a restart.
const RESUME_CONCURRENCY: usize = 8;

/// A request to the agent failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection (nothing listens, or the session is not running).
    Connect(CoreError),
    /// The connection broke before a response came.
    Http(hyper::Error),
}

/// One HTTP/1.1 request over a fresh tunnel to `port` in the session's sandbox. The
/// connection lives (on its own task, holding the tunnel and thereby keeping the
/// session busy) until the response body is read or dropped.
pub async fn send(
    core: &Core,
    native: &str,
    port: u16,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, SendError> {
    send_as(core, native, port, TunnelKind::Traffic, req).await
}

/// [`send`] over a tunnel of `kind` (a [`TunnelKind::HealthCheck`] one for the `/ping`
/// poll, which must not count as activity).
pub async fn send_as(
    core: &Core,
    native: &str,
    port: u16,
    kind: TunnelKind,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, SendError> {
    let stream = core
        .connect_port_as(native, port, kind)
        .await
        .map_err(SendError::Connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(SendError::Http)?;
    let session = native.to_string();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(session, port, error = %e, "agentcore: agent connection ended with an error");
        }
    });
    sender.send_request(req).await.map_err(SendError::Http)
}

/// Whether a connect error means "nothing listens on the port (yet)".
pub fn nothing_listens(err: &CoreError) -> bool {
    matches!(err, CoreError::Guest { .. })
        && berth_api::ApiError::from(err).code == ErrorCode::Unavailable
}

/// A request to the agent with the `Host` header HTTP/1.1 servers require.
pub fn request(method: axum::http::Method, port: u16, path: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, format!("127.0.0.1:{port}"))
}

/// `'s'`, quoted for `/bin/sh`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The agent shell's argv: `/bin/sh -c` with a script that enters `/var/task`, sets
/// `DOCKER_CONTAINER=1`, `PORT` and `PYTHONPATH`, and execs the entry point with the
/// managed runtime's interpreter. `entryPoint` is `[script]`, or `[wrapper, script]`
/// (`["opentelemetry-instrument", "main.py"]`), run as `wrapper <interpreter> script`,
/// where a wrapper vendored in the code's `bin/` runs under the interpreter itself
/// (its `#!` line names the machine that built the zip).
pub fn agent_argv(interpreter: &str, entry_point: &[String], port: u16) -> Vec<String> {
    let (i, python) = (quote(interpreter), interpreter.contains("python"));
    let run = match entry_point {
        [wrapper, script] => {
            let (w, s) = (quote(wrapper), quote(script));
            let vendored = quote(&format!("bin/{wrapper}"));
            if python {
                format!(
                    "if [ -f {vendored} ]; then exec {i} {vendored} {i} {s}; fi\nexec {w} {i} {s}"
                )
            } else {
                format!("exec {w} {i} {s}")
            }
        }
        [script, ..] => format!("exec {i} {}", quote(script)),
        [] => format!("exec {i}"),
    };
    let script = format!(
        "cd {TASK_DIR} || exit 1\n\
         export DOCKER_CONTAINER=1 PORT={port} PYTHONPATH=\"{TASK_DIR}${{PYTHONPATH:+:$PYTHONPATH}}\"\n\
         {run}\n"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

/// What `.berth-version` says for a version.
fn version_marker(target: &Target) -> String {
    format!("{} v{}\n", target.runtime_id, target.version)
}

/// `<code dir>.tar`, where a version's code archive is cached.
pub fn code_tar_path(code_dir: &Path) -> PathBuf {
    code_dir.with_extension("tar")
}

/// Archive `code_dir` (symlinks kept as links, mtimes kept so that vendored `.pyc`
/// files stay valid) with `marker` as a last `.berth-version` entry, atomically.
fn build_tar(code_dir: &Path, marker: &str, dest: &Path) -> std::io::Result<()> {
    use rand::Rng;
    let tmp = dest.with_extension(format!("tar.tmp-{:08x}", rand::thread_rng().gen::<u32>()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(file));
        b.follow_symlinks(false);
        b.append_dir_all(".", code_dir)?;
        let mut h = tar::Header::new_gnu();
        h.set_size(marker.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, VERSION_FILE, marker.as_bytes())?;
        let file = b.into_inner()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A file's bytes as a stream of chunks (for `Core::write_file`).
fn file_chunks(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold(Some(file), |file| async move {
        use tokio::io::AsyncReadExt;
        let mut file = file?;
        let mut buf = vec![0u8; 256 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// The end of an agent's output, for an error message: text, no carriage returns.
fn tail_text(tail: &[u8]) -> String {
    let text = String::from_utf8_lossy(tail).replace('\r', "");
    let text = text.trim();
    if text.is_empty() {
        "(no output)".into()
    } else {
        text.to_string()
    }
}

fn push_tail(tail: &mut Vec<u8>, data: &[u8]) {
    tail.extend_from_slice(data);
    if tail.len() > TAIL_BYTES {
        tail.drain(..tail.len() - TAIL_BYTES);
    }
}

/// What one readiness probe found.
enum Probe {
    Ready,
    NotYet,
}

impl AgentCore {
    /// Make sure the session's agent runs and has answered its ping: start it (copying
    /// the code in first) unless its shell runs already.
    pub(super) async fn ensure_agent(&self, s: &RuntimeSession) -> Result<(), AwsError> {
        let data = &self.inner.data;
        let _lock = data.lock(&s.native).await;
        let core = self.core();
        let shells = core.list_shells(&s.native).await?;
        if let Some(shell) = shells.iter().find(|sh| sh.shell_id == AGENT_SHELL) {
            if shell.running {
                if data.is_ready(&s.native, shell.started_at_ms) {
                    return Ok(());
                }
                return self.wait_ready(s, shell.started_at_ms).await;
            }
            // It exited (a crash, or a failed start): forget it, then start anew.
            match core.kill_shell(&s.native, AGENT_SHELL).await {
                Ok(_) | Err(CoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        data.set_ready(&s.native, None);
        // A container version runs its image's `Entrypoint` + `Cmd` in its `WorkingDir`
        // (the image is the sandbox's root and its `Env` the runtime's; `/` when unset,
        // and relative to `/` as Docker takes it): no code to copy, no shell wrapper (an
        // image may have no `/bin/sh`). A code version runs its entry point from
        // `/var/task`, copied in first.
        let (argv, cwd) = match self
            .container_command(&s.target.runtime_id, s.target.version)
            .await?
        {
            Some(image) => {
                let dir = image.cwd.unwrap_or_default();
                let cwd = format!("/{}", dir.trim_start_matches('/'));
                (image.argv, Some(cwd))
            }
            None => {
                let argv = self.agent_command(&s.target).await?;
                self.copy_code(s).await?;
                (argv, None)
            }
        };
        let info = core
            .open_shell(
                &s.native,
                OpenShell {
                    shell_id: Some(AGENT_SHELL.into()),
                    command: Some(argv),
                    cwd,
                    width: Some(200),
                    height: Some(50),
                },
            )
            .await?;
        tracing::info!(session = %s.native, runtime = %s.target.runtime_id,
            version = s.target.version, "agentcore: agent started");
        self.wait_ready(s, info.started_at_ms).await
    }

    /// The interpreter and argv for a version's entry point.
    async fn agent_command(&self, target: &Target) -> Result<Vec<String>, AwsError> {
        let code = target
            .spec
            .agent_runtime_artifact
            .as_ref()
            .and_then(|a| a.code_configuration.as_ref())
            .ok_or_else(|| {
                runtime_client_error(format!(
                    "version {} of agent runtime {} has no code configuration",
                    target.version, target.runtime_id
                ))
            })?;
        let runtime = code
            .runtime
            .as_deref()
            .and_then(ManagedRuntime::parse)
            .ok_or_else(|| runtime_client_error("the code configuration names no known runtime"))?;
        let image = self.inner.base_image.clone();
        let interpreter = tokio::task::spawn_blocking(move || image.interpreter(runtime))
            .await
            .map_err(|_| {
                tracing::error!("agentcore: checking the base image panicked");
                AwsError::internal()
            })?
            .map_err(runtime_client_error)?;
        let entry = code.entry_point.clone().unwrap_or_default();
        Ok(agent_argv(&interpreter, &entry, target.protocol.port))
    }

    /// The version's code archive, built on first use.
    async fn code_tar(&self, target: &Target) -> Result<PathBuf, AwsError> {
        let path = code_tar_path(&target.code_dir);
        let _lock = self
            .inner
            .data
            .lock(&format!("tar:{}", path.display()))
            .await;
        if path.is_file() {
            return Ok(path);
        }
        let (dir, dest, marker) = (
            target.code_dir.clone(),
            path.clone(),
            version_marker(target),
        );
        tokio::task::spawn_blocking(move || build_tar(&dir, &marker, &dest))
            .await
            .map_err(|_| {
                tracing::error!("agentcore: archiving code panicked");
                AwsError::internal()
            })?
            .map_err(|e| {
                tracing::error!(dir = %target.code_dir.display(), error = %e, "agentcore: cannot archive a version's code");
                AwsError::internal()
            })?;
        Ok(path)
    }

    /// Run a helper script in the session; its exit code and output.
    async fn helper(&self, native: &str, script: &str) -> Result<(i32, String), AwsError> {
        let req = CommandRequest {
            command: Some(script.to_string()),
            timeout_s: Some(HELPER_TIMEOUT_S),
            ..Default::default()
        };
        let mut events = self.core().run_command(native, req).await?;
        let mut out = Vec::new();
        while let Some(ev) = events.next().await {
            match ev {
                ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => out.extend_from_slice(&b),
                ExecEvent::Exit { code, .. } => {
                    return Ok((
                        code.unwrap_or(-1),
                        String::from_utf8_lossy(&out).into_owned(),
                    ))
                }
                ExecEvent::Error(e) => return Err(e.into()),
                ExecEvent::Started { .. } => {}
            }
        }
        Err(AwsError::internal())
    }

    /// Put the session's version's code at `/var/task` unless it is there already.
    async fn copy_code(&self, s: &RuntimeSession) -> Result<(), AwsError> {
        let marker = version_marker(&s.target);
        let check = format!(
            "if [ \"$(cat {TASK_DIR}/{VERSION_FILE} 2>/dev/null)\" = {} ]; then echo current; \
             else rm -rf {STAGING_DIR}; fi",
            quote(marker.trim_end())
        );
        let (code, out) = self.helper(&s.native, &check).await?;
        if code == 0 && out.trim() == "current" {
            return Ok(());
        }
        let tar = self.code_tar(&s.target).await?;
        let file = tokio::fs::File::open(&tar).await.map_err(|e| {
            tracing::error!(path = %tar.display(), error = %e, "agentcore: cannot open a code archive");
            AwsError::internal()
        })?;
        self.core()
            .write_file(&s.native, STAGING_DIR, true, 0, file_chunks(file))
            .await?;
        let swap = format!("rm -rf {TASK_DIR} && mv {STAGING_DIR} {TASK_DIR}");
        let (code, out) = self.helper(&s.native, &swap).await?;
        if code != 0 {
            return Err(runtime_client_error(format!(
                "cannot put the code at {TASK_DIR} in the session's sandbox: {}",
                out.trim()
            )));
        }
        tracing::info!(session = %s.native, "agentcore: code copied to {TASK_DIR}");
        Ok(())
    }

    /// One readiness probe: `GET /ping` on the protocol's port.
    async fn probe(&self, native: &str, protocol: &Protocol) -> Result<Probe, AwsError> {
        let req = request(axum::http::Method::GET, protocol.port, "/ping")
            .body(Full::new(Bytes::new()))
            .map_err(|_| AwsError::internal())?;
        let sent =
            tokio::time::timeout(PROBE_TIMEOUT, send(self.core(), native, protocol.port, req))
                .await;
        let status = match sent {
            Ok(Ok(resp)) => resp.status(),
            Ok(Err(SendError::Connect(e))) if nothing_listens(&e) => return Ok(Probe::NotYet),
            Ok(Err(SendError::Connect(e))) => return Err(e.into()),
            // Accepted but not answered (yet): still starting.
            Ok(Err(SendError::Http(_))) | Err(_) => return Ok(Probe::NotYet),
        };
        let ready = match protocol.server_protocol {
            ServerProtocol::Http | ServerProtocol::Agui => status == StatusCode::OK,
            ServerProtocol::Mcp | ServerProtocol::A2a => !status.is_server_error(),
        };
        Ok(if ready { Probe::Ready } else { Probe::NotYet })
    }

    /// After a server restart, once the core has adopted the sandboxes still running:
    /// poll the agents of the AgentCore sessions among them again. Until their next
    /// invoke nothing else would ask them, and one busy with background work
    /// (`HealthyBusy`) would idle out. Sessions are told by their native runtime
    /// (`ac.<id>.v<N>`, which gives the version and so the protocol's port).
    pub(crate) async fn resume_agents(&self) {
        let sessions = match self.core().list_sessions().await {
            Ok(sessions) => sessions,
            Err(e) => {
                tracing::warn!(error = %e, "agentcore: cannot list the adopted sessions; their agents are polled from their next invoke");
                return;
            }
        };
        let adopted = sessions.into_iter().filter_map(|s| {
            if s.state != SessionState::Running || !s.id.starts_with("ac.") {
                return None;
            }
            let (runtime_id, version) = mapping::parse_native_name(&s.runtime)?;
            Some((s.id.clone(), runtime_id.to_string(), version))
        });
        futures::stream::iter(adopted)
            .for_each_concurrent(RESUME_CONCURRENCY, |(native, runtime_id, version)| async move {
                if let Err(e) = self.resume_agent(&native, &runtime_id, version).await {
                    tracing::warn!(session = %native, error = %e, "agentcore: cannot poll an adopted session's agent; it is polled from the next invoke");
                }
            })
            .await;
    }

    /// [`Self::resume_agents`] for one session: under its agent lock (an invoke may be
    /// starting the agent meanwhile), find the running agent shell, probe it as
    /// [`Self::wait_ready`] does, mark it ready if it answers, and poll it.
    async fn resume_agent(
        &self,
        native: &str,
        runtime_id: &str,
        version: u32,
    ) -> Result<(), AwsError> {
        let Some(rec) = self
            .store()
            .agentcore()
            .get_version(runtime_id, version)
            .await?
        else {
            return Ok(());
        };
        let protocol = mapping::protocol(&runtimes::spec_of(&rec)?);
        let data = &self.inner.data;
        let _lock = data.lock(native).await;
        let core = self.core();
        let shells = core.list_shells(native).await?;
        let Some(shell) = shells
            .iter()
            .find(|sh| sh.shell_id == AGENT_SHELL && sh.running)
        else {
            return Ok(());
        };
        if data.is_ready(native, shell.started_at_ms) {
            return Ok(()); // an invoke came first
        }
        let ready = matches!(self.probe(native, &protocol).await?, Probe::Ready);
        if ready {
            data.set_ready(native, Some(shell.started_at_ms));
        }
        data.pollers
            .start(core, native, protocol.port, shell.started_at_ms);
        tracing::info!(session = %native, port = protocol.port, ready,
            "agentcore: polling an adopted session's agent again");
        Ok(())
    }

    /// Wait until the agent shell started at `started_at_ms` answers its ping, watching
    /// its output meanwhile.
    async fn wait_ready(&self, s: &RuntimeSession, started_at_ms: i64) -> Result<(), AwsError> {
        let core = self.core();
        let port = s.target.protocol.port;
        let mut tail = Vec::new();
        let opts = AttachOptions {
            mode: AttachMode::Watch,
            offset: Some(0),
            ..Default::default()
        };
        let mut events = match core.attach_shell(&s.native, AGENT_SHELL, opts).await {
            Ok(att) => {
                if let Some(snapshot) = &att.attached.snapshot {
                    push_tail(&mut tail, snapshot);
                }
                Some(att.events)
            }
            Err(CoreError::NotFound { .. }) => {
                return Err(runtime_client_error(
                    "the agent's shell ended before it could be watched",
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let deadline = Instant::now() + READY_BUDGET;
        let mut delay = Duration::from_millis(50);
        loop {
            if let Probe::Ready = self.probe(&s.native, &s.target.protocol).await? {
                self.inner.data.set_ready(&s.native, Some(started_at_ms));
                tracing::info!(session = %s.native, port, "agentcore: agent ready");
                self.inner
                    .data
                    .pollers
                    .start(core, &s.native, port, started_at_ms);
                return Ok(());
            }
            if events.is_none() {
                // Not watching any more: ask whether the shell still runs.
                let running = core
                    .list_shells(&s.native)
                    .await?
                    .iter()
                    .any(|sh| sh.shell_id == AGENT_SHELL && sh.running);
                if !running {
                    return Err(runtime_client_error(format!(
                        "the agent exited before answering GET /ping on port {port}; the end of \
                         its output:\n{}",
                        tail_text(&tail)
                    )));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let _ = core.kill_shell(&s.native, AGENT_SHELL).await;
                return Err(runtime_client_error(format!(
                    "the agent did not answer GET /ping on port {port} within {} s (it was \
                     stopped); the end of its output:\n{}",
                    READY_BUDGET.as_secs(),
                    tail_text(&tail)
                )));
            }
            let sleep = tokio::time::sleep(delay.min(deadline - now));
            tokio::pin!(sleep);
            loop {
                let Some(ev) = events.as_mut() else {
                    (&mut sleep).await;
                    break;
                };
                let event = tokio::select! {
                    () = &mut sleep => break,
                    event = ev.next() => event,
                };
                match event {
                    Some(ShellEvent::Output { data, .. }) => push_tail(&mut tail, &data),
                    Some(ShellEvent::Notice { .. }) => {}
                    Some(ShellEvent::Exited { code, signal }) => {
                        let how = match (code, signal) {
                            (_, Some(sig)) => format!("was killed by signal {sig}"),
                            (Some(c), None) => format!("exited with code {c}"),
                            (None, None) => "exited".into(),
                        };
                        return Err(runtime_client_error(format!(
                            "the agent {how} before answering GET /ping on port {port}; the \
                             end of its output:\n{}",
                            tail_text(&tail)
                        )));
                    }
                    // Watching failed (the client fell behind, or the sandbox went): the
                    // probes still tell.
                    Some(ShellEvent::TooSlow { .. } | ShellEvent::Failed(_)) | None => {
                        events = None;
                    }
                }
            }
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn argv_for_entry_points() {
        let argv = agent_argv("/usr/bin/python3.11", &["main.py".into()], 8080);
        assert_eq!(&argv[..2], ["/bin/sh", "-c"]);
        assert!(argv[2].starts_with("cd /var/task || exit 1\n"));
        assert!(argv[2].contains("export DOCKER_CONTAINER=1 PORT=8080 "));
        assert!(argv[2].ends_with("exec '/usr/bin/python3.11' 'main.py'\n"));
        let wrapped = agent_argv(
            "/usr/bin/python3.12",
            &["opentelemetry-instrument".into(), "src/app.py".into()],
            9000,
        );
        assert!(wrapped[2].contains(
            "if [ -f 'bin/opentelemetry-instrument' ]; then exec '/usr/bin/python3.12' \
             'bin/opentelemetry-instrument' '/usr/bin/python3.12' 'src/app.py'; fi\n\
             exec 'opentelemetry-instrument' '/usr/bin/python3.12' 'src/app.py'"
        ));
        assert!(wrapped[2].contains("PORT=9000"));
        let node = agent_argv("/usr/bin/node", &["it's.js".into()], 8080);
        assert!(node[2].ends_with("exec '/usr/bin/node' 'it'\\''s.js'\n"));
    }

    #[test]
    fn the_tar_holds_the_code_and_the_marker_last() {
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("1");
        std::fs::create_dir_all(code.join("pkg")).unwrap();
        std::fs::write(code.join("main.py"), "print(1)\n").unwrap();
        std::fs::write(code.join("pkg/mod.py"), "X = 1\n").unwrap();
        std::os::unix::fs::symlink("pkg/mod.py", code.join("link.py")).unwrap();
        let dest = code_tar_path(&code);
        assert_eq!(dest, dir.path().join("1.tar"));
        build_tar(&code, "a-AbCdE12345 v1\n", &dest).unwrap();
        let mut archive = tar::Archive::new(std::fs::File::open(&dest).unwrap());
        let mut names = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            if name.ends_with("link.py") {
                assert_eq!(entry.header().entry_type(), tar::EntryType::Symlink);
            }
            names.push(name);
        }
        assert!(names.iter().any(|n| n.ends_with("main.py")));
        assert!(names.iter().any(|n| n.ends_with("pkg/mod.py")));
        assert_eq!(names.last().unwrap(), VERSION_FILE);
        // Nothing but the archive is left beside the code.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 2);
    }

    #[test]
    fn tails_keep_the_end() {
        let mut tail = Vec::new();
        push_tail(&mut tail, &vec![b'a'; TAIL_BYTES]);
        push_tail(&mut tail, b"\r\nTraceback: boom\r\n");
        assert_eq!(tail.len(), TAIL_BYTES);
        assert!(tail_text(&tail).ends_with("Traceback: boom"));
        assert_eq!(tail_text(b" \r\n"), "(no output)");
    }
}

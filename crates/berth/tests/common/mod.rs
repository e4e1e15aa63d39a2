//! Harness for the real-server integration tests: every test starts its own
//! `berth server` on a fresh temp data dir and a free loopback port, and drives it
//! over HTTP (through `berth_client`) and through the `berth` CLI binary.
//!
//! The tests need root (the server creates namespaces, cgroups and loop devices);
//! when not root, `Server::start` returns `None` and the test prints why it skipped.

#![allow(dead_code)]

pub mod agentcore;
pub mod drivers;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use berth_api::{CommandEvent, CommandRequest, RuntimeSpec};
use berth_client::Client;
use futures::StreamExt;

/// Generous deadline for anything that should happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(60);

pub const BERTH: &str = env!("CARGO_BIN_EXE_berth");

/// Returns `true` (and prints why) when the test cannot run here.
pub fn skip_unless_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("skipping {test}: the Berth integration tests need root");
    true
}

/// A session or runtime id unique on this host: cgroups (`/sys/fs/cgroup/berth/<id>`)
/// are host-wide, and other tests (and other servers) run concurrently.
pub fn uniq(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{:x}", std::process::id(), nanos & 0xffff)
}

/// What a command run through the API produced.
#[derive(Default, Clone)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub command_id: Option<String>,
    /// An `error` event, if the stream carried one.
    pub error: Option<berth_api::ApiError>,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn text(b: &[u8]) -> String {
            let s = String::from_utf8_lossy(b);
            if s.len() > 2000 {
                format!("{}… ({} bytes)", &s[..s.floor_char_boundary(2000)], b.len())
            } else {
                s.into_owned()
            }
        }
        f.debug_struct("Output")
            .field("code", &self.code)
            .field("signal", &self.signal)
            .field("timed_out", &self.timed_out)
            .field("error", &self.error)
            .field("stdout", &text(&self.stdout))
            .field("stderr", &text(&self.stderr))
            .finish()
    }
}

impl Output {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// Panics with everything the command printed unless it exited 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code,
            Some(0),
            "command failed: {:?}\nstdout: {}\nstderr: {}",
            self,
            self.out(),
            self.err()
        );
        self
    }
}

pub struct Server {
    /// Parent of the data dir; also holds the server log.
    root: Option<tempfile::TempDir>,
    pub data_dir: PathBuf,
    pub port: u16,
    pub url: String,
    pub token: String,
    pub client: Client,
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl Server {
    /// Start a server with default flags, or `None` when not root.
    pub async fn start(test: &str) -> Option<Server> {
        Self::start_with(test, &[]).await
    }

    /// Start a server with extra `berth server` flags.
    pub async fn start_with(test: &str, extra: &[&str]) -> Option<Server> {
        if skip_unless_root(test) {
            return None;
        }
        let root = tempfile::Builder::new()
            .prefix("berth-it-")
            .tempdir()
            .expect("temp dir");
        // The sandboxes' mapped users must traverse it (`berth server` refuses a data dir
        // they cannot reach), whatever the umask.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        let data_dir = root.path().join("data");
        let log = root.path().join("server.log");
        let mut s = Server {
            data_dir,
            port: 0,
            url: String::new(),
            token: String::new(),
            client: Client::new("http://127.0.0.1:1", "none"),
            args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            log,
            root: Some(root),
        };
        s.port = free_port();
        s.url = format!("http://127.0.0.1:{}", s.port);
        s.spawn().await;
        Some(s)
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let child = Command::new(BERTH)
            .arg("server")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.args)
            .env_remove("BERTH_DATA_DIR")
            .env_remove("BERTH_LISTEN")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn berth server");
        self.child = Some(child);
        self.wait_healthy().await;
        let token = std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("the server writes <data-dir>/admin.token");
        self.token = token.trim().to_string();
        self.client = Client::new(&self.url, &self.token);
    }

    async fn wait_healthy(&mut self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("berth server exited early ({status}):\n{}", self.log_text());
                }
            }
            if let Ok(r) = http.get(format!("{}/healthz", self.url)).send().await {
                if r.status().is_success() && self.data_dir.join("admin.token").exists() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "server did not become healthy:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL the server and reap it; sandboxes it started may live on.
    pub fn kill_server(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
    }

    /// SIGTERM the server (it stops every sandbox) and wait for it to exit.
    /// Returns whether it exited by itself within the deadline.
    pub fn stop_server(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }

    /// SIGTERM the server without blocking the async runtime (so that streams this
    /// test still holds keep being served); returns whether it exited in time.
    pub async fn stop_server_async(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Start the server again on the same data dir and port.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the server first");
        self.spawn().await;
    }

    /// A `berth` CLI invocation pointed at this server.
    pub fn cli_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(BERTH);
        c.args(args)
            .env("BERTH_URL", &self.url)
            .env("BERTH_DATA_DIR", &self.data_dir)
            .env_remove("BERTH_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// Run the CLI to completion: (stdout, stderr, exit code or 128+signal).
    pub async fn cli(&self, args: &[&str]) -> (Vec<u8>, Vec<u8>, i32) {
        let out = self
            .cli_command(args)
            .output()
            .await
            .expect("run the berth CLI");
        use std::os::unix::process::ExitStatusExt;
        let code = out
            .status
            .code()
            .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0));
        (out.stdout, out.stderr, code)
    }

    /// Run the CLI and require exit 0; returns stdout as text.
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let (out, err, code) = self.cli(args).await;
        assert_eq!(
            code,
            0,
            "berth {args:?} failed\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Run `sh -c cmd` in a session through the API and collect everything.
    pub async fn exec(&self, session: &str, cmd: &str) -> Output {
        self.exec_req(
            session,
            CommandRequest {
                command: Some(cmd.to_string()),
                ..Default::default()
            },
        )
        .await
    }

    pub async fn exec_req(&self, session: &str, req: CommandRequest) -> Output {
        let stream = self
            .client
            .run_command(session, &req)
            .await
            .unwrap_or_else(|e| panic!("run {req:?} in {session}: {e:?}"));
        collect(stream).await
    }

    /// A runtime with small limits suitable for tests; `f` adjusts the spec.
    pub async fn runtime(&self, name: &str, f: impl FnOnce(&mut RuntimeSpec)) -> String {
        let mut spec = RuntimeSpec::named(name);
        spec.workspace_size = 64 << 20;
        f(&mut spec);
        self.client
            .create_runtime(&spec)
            .await
            .unwrap_or_else(|e| panic!("create runtime {name}: {e:?}"));
        name.to_string()
    }

    /// Create a session on `runtime` (started, ready for commands).
    pub async fn session(&self, id: &str, runtime: &str) -> String {
        self.client
            .create_session(&berth_api::CreateSession {
                id: Some(id.to_string()),
                runtime: Some(runtime.to_string()),
            })
            .await
            .unwrap_or_else(|e| panic!("create session {id}: {e:?}"));
        id.to_string()
    }

    /// A raw HTTP request builder with the admin token.
    pub fn http(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(&self.token)
    }

    /// Everything on the host that still refers to this server's data dir.
    pub fn leftovers(&self, session: Option<&str>) -> Vec<String> {
        host_leftovers(&self.data_dir, session)
    }
}

/// Drain a command event stream.
pub async fn collect(mut stream: berth_client::EventStream) -> Output {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut o = Output::default();
    while let Some(ev) = stream.next().await {
        match ev.expect("event stream") {
            CommandEvent::Started { command_id, .. } => o.command_id = Some(command_id),
            CommandEvent::Stdout { data } => o.stdout.extend(b64.decode(data).expect("base64")),
            CommandEvent::Stderr { data } => o.stderr.extend(b64.decode(data).expect("base64")),
            CommandEvent::Exit {
                code,
                signal,
                timed_out,
                ..
            } => {
                o.code = code;
                o.signal = signal;
                o.timed_out = timed_out;
            }
            CommandEvent::Error { error } => o.error = Some(error),
        }
    }
    o
}

/// Poll `f` until it returns `Some`, or panic with `what` after `DEADLINE`.
pub async fn poll<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Mount points under `dir` in this (the host's) mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape_mount))
        .filter(|mp| mp == &dir || mp.starts_with(&format!("{dir}/")))
        .collect()
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Mounts, loop devices, processes and cgroups that point at `data_dir` (or, for
/// cgroups, are named after `session`).
pub fn host_leftovers(data_dir: &Path, session: Option<&str>) -> Vec<String> {
    let mut found = Vec::new();
    let dir = data_dir.to_string_lossy().into_owned();
    for m in mounts_under(data_dir) {
        found.push(format!("mount {m}"));
    }
    // Loop devices: /sys/block/loopN/loop/backing_file (what `losetup -a` prints).
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let backing = e.path().join("loop/backing_file");
            if let Ok(file) = std::fs::read_to_string(&backing) {
                if file.trim().starts_with(&dir) {
                    found.push(format!(
                        "loop device {} -> {}",
                        e.file_name().to_string_lossy(),
                        file.trim()
                    ));
                }
            }
        }
    }
    // Processes whose root, cwd, executable or command line is inside the data dir.
    let me = std::process::id().to_string();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
                continue;
            }
            let p = e.path();
            let mut hit = Vec::new();
            for link in ["root", "cwd", "exe"] {
                if let Ok(t) = std::fs::read_link(p.join(link)) {
                    let t = t.to_string_lossy().into_owned();
                    if t.starts_with(&dir) {
                        hit.push(format!("{link}={t}"));
                    }
                }
            }
            if let Ok(cmd) = std::fs::read(p.join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(&dir) {
                    hit.push(format!("cmdline={cmd}"));
                }
            }
            if let Some(session) = session {
                let cg = std::fs::read_to_string(p.join("cgroup")).unwrap_or_default();
                if cg
                    .lines()
                    .any(|l| l.ends_with(&format!("/berth/{session}")))
                {
                    hit.push(format!("in cgroup /berth/{session}"));
                }
            }
            if !hit.is_empty() {
                found.push(format!("process {name}: {}", hit.join(", ")));
            }
        }
    }
    if let Some(session) = session {
        for c in cgroups_named(session) {
            found.push(format!("cgroup {}", c.display()));
        }
    } else {
        // The server's own cgroup parents, `/berth/<12 hex of sha256(<data dir>/run)>`
        // (namespace driver) and `…(<data dir>/vm)>` (microVM driver), go with their
        // last sandbox.
        use sha2::Digest;
        for driver_dir in ["run", "vm"] {
            let dir = data_dir.join(driver_dir);
            let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
            let server: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
            for h in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let parent = h.path().join("berth").join(&server);
                if parent.is_dir() {
                    found.push(format!("cgroup {}", parent.display()));
                }
            }
        }
        // QEMU's channel sockets and VM dirs.
        let vm = data_dir.join("vm");
        for entry in std::fs::read_dir(&vm).into_iter().flatten().flatten() {
            if entry.file_name() != ".sock" {
                found.push(format!("vm dir {}", entry.path().display()));
            }
        }
        for entry in std::fs::read_dir(vm.join(".sock"))
            .into_iter()
            .flatten()
            .flatten()
        {
            found.push(format!("socket {}", entry.path().display()));
        }
    }
    found
}

/// Cgroup directories (any hierarchy, depth ≤ 4) whose name is `name`.
pub fn cgroups_named(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: u32, out: &mut Vec<PathBuf>) {
        if depth == 0 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let p = e.path();
            if e.file_name().to_string_lossy() == name {
                out.push(p.clone());
            }
            walk(&p, name, depth - 1, out);
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 4, &mut out);
    out
}

impl Drop for Server {
    fn drop(&mut self) {
        let clean = self.stop_server();
        if std::thread::panicking() || !clean {
            eprintln!(
                "---- berth server log ({}) ----\n{}",
                self.data_dir.display(),
                self.log_text()
            );
        }
        force_cleanup(&self.data_dir);
        // Never let the recursive removal of the temp dir descend into a mount that
        // leaked (a workspace, an overlay or a bind of a host directory): detach them
        // first and keep the directory if that fails.
        for m in mounts_under(&self.data_dir).into_iter().rev() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(root) = self.root.take() {
            if mounts_under(root.path()).is_empty() {
                let _ = root.close();
            } else {
                eprintln!("leaving {} behind: mounts remain", root.path().display());
                let _ = root.keep();
            }
        }
    }
}

/// Sessions this data dir has sandbox state for (`run/<session>`) or workspaces of.
fn sessions_of(data_dir: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    for sub in ["run", "workspaces"] {
        if let Ok(entries) = std::fs::read_dir(data_dir.join(sub)) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let n = n.strip_suffix(".ext4").unwrap_or(&n).to_string();
                if !ids.contains(&n) {
                    ids.push(n);
                }
            }
        }
    }
    ids
}

/// Whatever a failed test's server left behind (it was SIGKILLed, or it leaked):
/// kill the sandboxes' processes, remove their cgroups, detach loop devices and mounts,
/// so that one failing test does not burden the others.
pub fn force_cleanup(data_dir: &Path) {
    let sessions = sessions_of(data_dir);
    let mut left = host_leftovers(data_dir, None);
    for id in &sessions {
        left.extend(
            cgroups_named(id)
                .iter()
                .map(|c| format!("cgroup {}", c.display())),
        );
    }
    if left.is_empty() {
        return;
    }
    eprintln!("harness: cleaning up after the server: {left:#?}");
    for id in &sessions {
        for _ in 0..50 {
            let mut any = false;
            for cg in cgroups_named(id) {
                let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    any = true;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if !any {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for cg in cgroups_named(id) {
            let _ = std::fs::remove_dir(&cg);
        }
    }
    for m in mounts_under(data_dir).into_iter().rev() {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    for l in host_leftovers(data_dir, None) {
        if let Some(dev) = l
            .strip_prefix("loop device ")
            .and_then(|r| r.split(' ').next())
        {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(format!("/dev/{dev}"))
                .status();
        }
    }
}

//! A `berth server` child process on a fresh temporary data dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long the server may take to answer `/healthz` after spawning.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long the server may take to stop its sandboxes after SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(120);

pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub token: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// The log as it was when the server exited.
    pub final_log: String,
    /// `None` once the directory has been kept on purpose (something still mounted in it).
    tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Spawn `berth server` on 127.0.0.1 at a free port and wait until it answers.
    /// `guest_images` and `microvm_accel` become `--guest-images` and
    /// `--microvm-accel` when given.
    pub async fn start(
        berth: &Path,
        max_sandboxes: usize,
        max_shells: usize,
        tmp_base: &Path,
        guest_images: Option<&Path>,
        microvm_accel: Option<&str>,
    ) -> Result<Self> {
        let berth = berth
            .canonicalize()
            .with_context(|| format!("cannot find the berth binary {}", berth.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix("berth-bench-")
            .tempdir_in(tmp_base)
            .with_context(|| format!("cannot create a temp dir in {}", tmp_base.display()))?;
        let data_dir = tmp.path().join("data");
        let log = tmp.path().join("server.log");
        // The port is free now; another process could take it before the server binds,
        // in which case the server exits and we report its log.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free local port")?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let log_file =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .context("cannot duplicate the log file")?;
        let mut cmd = Command::new(&berth);
        cmd.arg("server");
        if let Some(dir) = guest_images {
            cmd.arg("--guest-images").arg(dir);
        }
        if let Some(accel) = microvm_accel {
            cmd.arg("--microvm-accel").arg(accel);
        }
        let child = cmd
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(&listen)
            .arg("--max-sandboxes")
            .arg(max_sandboxes.to_string())
            .arg("--max-shells")
            .arg(max_shells.to_string())
            // `sandbox ready helper=… total=…` and `microvm ready boot=… spawn_to_health=…`
            // lines give the start-up breakdown.
            .env("RUST_LOG", "info,berth_sandbox=debug")
            .env_remove("BERTH_DATA_DIR")
            .env_remove("BERTH_LISTEN")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("cannot run {} server", berth.display()))?;
        let mut server = Self {
            child: Some(child),
            url: format!("http://{listen}"),
            token: String::new(),
            data_dir,
            log,
            final_log: String::new(),
            tmp: Some(tmp),
        };
        server.wait_ready().await?;
        Ok(server)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let http = reqwest::Client::new();
        let started = Instant::now();
        let token_path = self.data_dir.join("admin.token");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("cannot poll the server")? {
                    self.child = None;
                    bail!(
                        "berth server exited during start-up ({status}); its log:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            let healthy = http
                .get(format!("{}/healthz", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if healthy {
                if let Ok(token) = fs::read_to_string(&token_path) {
                    self.token = token.trim().to_string();
                    return Ok(());
                }
            }
            if started.elapsed() > START_DEADLINE {
                bail!(
                    "berth server did not become ready within {START_DEADLINE:?}; its log:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM the server and wait for it; then check that nothing is left mounted
    /// under the temp dir before removing it.
    pub fn shutdown(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("server pid out of range")?);
        kill(pid, Signal::SIGTERM).context("cannot SIGTERM the server")?;
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().context("cannot wait for the server")? {
                break status;
            }
            if started.elapsed() > STOP_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                bail!("berth server did not exit within {STOP_DEADLINE:?} of SIGTERM; killed it");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.final_log = self.log_text();
        if !status.success() {
            bail!(
                "berth server exited with {status} after SIGTERM; its log:\n{}",
                self.log_tail(20)
            );
        }
        self.remove_tmp()
    }

    fn remove_tmp(&mut self) -> Result<()> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        let mounts = mounts_under(tmp.path());
        if !mounts.is_empty() {
            let kept = tmp.keep();
            bail!(
                "mounts left under {} after the server stopped (kept the dir): {mounts:?}",
                kept.display()
            );
        }
        let path = tmp.path().to_path_buf();
        tmp.close()
            .with_context(|| format!("cannot remove {}", path.display()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.shutdown() {
                eprintln!("berth-bench: stopping the server: {e:#}");
            }
        }
    }
}

/// Mount points at or below `dir` in this mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

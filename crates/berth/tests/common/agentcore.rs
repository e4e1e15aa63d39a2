//! What the AgentCore tests share: a `BedrockAgentCoreApp`'s packages vendored for the
//! host's python (built once under `CARGO_TARGET_TMPDIR`), a local registry (Debian's
//! `docker-registry` on a loopback port) and the shared libraries a binary loads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const BEDROCK_AGENTCORE: &str = "bedrock-agentcore==1.25.0";
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A `/usr/bin/python3.N` of the host (what the sandbox runs), as (path, `PYTHON_3_N`).
pub fn host_python() -> Option<(PathBuf, String)> {
    (10..=14).find_map(|n| {
        let p = PathBuf::from(format!("/usr/bin/python3.{n}"));
        p.is_file().then(|| (p, format!("PYTHON_3_{n}")))
    })
}

pub fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `bedrock-agentcore` and its dependencies installed for `python` into a directory of
/// their own (built once; concurrent tests race to rename, and the loser's copy goes).
pub fn vendored(python: &Path) -> Result<PathBuf, String> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let name = python.file_name().unwrap_or_default().to_string_lossy();
    let dir = tmp.join(format!("agentcore-vendor-{name}-1.25.0"));
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    let staging = tmp.join(format!(
        "agentcore-vendor-{name}.tmp-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    run(Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-warn-script-location", "--target"])
        .arg(&staging)
        .arg(BEDROCK_AGENTCORE)
        .env("PIP_ROOT_USER_ACTION", "ignore"))?;
    std::fs::write(staging.join(".complete"), b"").map_err(|e| e.to_string())?;
    if std::fs::rename(&staging, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(dir)
}

/// The shared libraries `binary` loads, the loader included, as `ldd` resolves them
/// (paths as the host names them, such as `/lib/x86_64-linux-gnu/libc.so.6`).
pub fn ldd(binary: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(binary).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A `docker-registry serve` on a loopback port, killed on drop.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Registry {
    /// `None` (with the reason printed) when the binary is missing.
    pub async fn start() -> Option<Registry> {
        if !Path::new(REGISTRY_BIN).is_file() {
            eprintln!(
                "skipping: {REGISTRY_BIN} is missing (apt-get install docker-registry; scripts/test does)"
            );
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-registry-")
            .tempdir()
            .expect("registry dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("store").display()
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let r = Registry { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            let url = format!("http://127.0.0.1:{port}/v2/");
            if http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                return Some(r);
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start:\n{}",
                r.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many times a blob of repository `repo` was downloaded (GETs in the access log).
    pub fn blob_gets(&self, repo: &str, digest: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/{digest} ");
        self.log().matches(&needle).count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stored (uncompressed: quick to write and to unpack) zip of `main.py` and, with
/// `vendor`, the vendored packages (without `__pycache__`), cached by content.
pub fn agent_zip(python: &Path, main_py: &str, vendor: bool) -> Result<PathBuf, String> {
    let vendor = if vendor {
        vendored(python)?
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("agentcore-no-vendor")
    };
    let _ = std::fs::create_dir_all(&vendor);
    let hash = hex(&Sha256::digest(format!("{}\n{main_py}", vendor.display()))[..8]);
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let zip = tmp.join(format!("agentcore-agent-{hash}.zip"));
    if zip.is_file() {
        return Ok(zip);
    }
    let main = tmp.join(format!("agentcore-agent-{hash}.{}.py", std::process::id()));
    std::fs::write(&main, main_py).map_err(|e| e.to_string())?;
    let script = r#"
import os, sys, zipfile
vendor, main, out = sys.argv[1:4]
tmp = "%s.tmp%d" % (out, os.getpid())
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
    for root, dirs, files in os.walk(vendor):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f == ".complete":
                continue
            p = os.path.join(root, f)
            z.write(p, os.path.relpath(p, vendor))
    z.write(main, "main.py")
os.replace(tmp, out)
"#;
    let made = run(Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&vendor)
        .arg(&main)
        .arg(&zip));
    let _ = std::fs::remove_file(&main);
    made.map(|()| zip)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// [`agent_zip`] and its managed runtime, or `None` (printed) when this host cannot
/// build it (no python3.N, no pip, no PyPI).
pub async fn zip_for(test: &str, main_py: &'static str, vendor: bool) -> Option<(PathBuf, String)> {
    let Some((python, runtime)) = host_python() else {
        eprintln!("skipping {test}: the host has no /usr/bin/python3.N");
        return None;
    };
    let built = tokio::task::spawn_blocking(move || agent_zip(&python, main_py, vendor))
        .await
        .expect("zip task");
    match built {
        Ok(zip) => Some((zip, runtime)),
        Err(e) => {
            eprintln!("skipping {test}: cannot build the agent zip ({BEDROCK_AGENTCORE}): {e}");
            None
        }
    }
}

/// Percent-encode everything but unreserved characters, as botocore and the SDK send a
/// runtime ARN in one path segment.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A runtime session id (33..256 characters).
pub fn sid(tag: &str) -> String {
    format!("{:0<40}", format!("{tag}-{}-", super::uniq("s")))
}

//! InvokeAgentRuntime on a runtime made from a container image, against a real `berth
//! server`, a real registry (Debian's `docker-registry` on a loopback port) and real
//! sandboxes: an image holding a working `BedrockAgentCoreApp` agent (the host's python
//! with its standard library and shared libraries, `bedrock-agentcore` vendored under
//! `/opt/agent-deps`, the agent at `/app/main.py`) is built and pushed here, pulled by the
//! server, and invoked: its entry point runs as is (no code copied in, no shell around
//! it) in its `WorkingDir` with its `Env`, and a session keeps its agent's state.
//!
//! The image is one uncompressed tar layer (quick to build, push and unpack). It also
//! carries what Berth's in-sandbox guest agent links (`ldd berth`), which runs inside
//! the image's root.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use berth_oci::oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use berth_oci::oci_client::secrets::RegistryAuth;
use berth_oci::oci_client::{Client, Reference};
use common::agentcore::{host_python, ldd, vendored, Registry, BEDROCK_AGENTCORE};
use common::{poll, uniq, Server};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Digest;

const ROLE: &str = "arn:aws:iam::123456789012:role/AgentRole";
const SESSION_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-session-id";
const REPO: &str = "agents/py";
const DEPS: &str = "/opt/agent-deps";

/// The agent: echoes the payload with its session, counts invocations per process, and
/// reports where and how it runs.
const AGENT: &str = r#"import os
import sys

from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()
COUNT = 0


@app.entrypoint
def invoke(payload, context):
    global COUNT
    COUNT += 1
    return {
        "echo": payload,
        "session": context.session_id,
        "count": COUNT,
        "cwd": os.getcwd(),
        "docker": os.environ.get("DOCKER_CONTAINER"),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "argv": [sys.executable] + sys.argv,
        "task": os.path.exists("/var/task"),
    }


if __name__ == "__main__":
    app.run()
"#;

// ---- the image ----

fn sha256(data: &[u8]) -> String {
    let digest = sha2::Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The layer being built: a tar whose entries are host files at image paths.
struct Layer {
    tar: tar::Builder<Vec<u8>>,
    files: BTreeSet<PathBuf>,
}

impl Layer {
    fn new() -> Self {
        let mut tar = tar::Builder::new(Vec::new());
        // Symlinks are stored as the files they name (the layer need not mirror the
        // host's links, such as `/lib64` → `/usr/lib64`).
        tar.follow_symlinks(true);
        Layer {
            tar,
            files: BTreeSet::new(),
        }
    }

    /// `host` at `image` (absolute), mode and mtime kept (Python checks its `.pyc`s'
    /// sources' mtimes).
    fn file(&mut self, host: &Path, image: &Path) -> std::io::Result<()> {
        if self.files.insert(image.to_path_buf()) {
            let name = image.strip_prefix("/").unwrap_or(image);
            self.tar.append_path_with_name(host, name)?;
        }
        Ok(())
    }

    /// The tree at `host` as `image`, without the top-level names `skip` refuses and
    /// without dangling symlinks.
    fn tree(
        &mut self,
        host: &Path,
        image: &Path,
        skip: &dyn Fn(&str) -> bool,
    ) -> std::io::Result<()> {
        let name = image.strip_prefix("/").unwrap_or(image);
        self.tar.append_dir(name, host)?;
        let mut entries: Vec<_> = std::fs::read_dir(host)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if skip(&name) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(e.path()) else {
                continue;
            };
            if meta.is_dir() {
                self.tree(&e.path(), &image.join(&name), &|_| false)?;
            } else if meta.is_file() {
                self.file(&e.path(), &image.join(&name))?;
            }
        }
        Ok(())
    }

    fn finish(self) -> std::io::Result<Vec<u8>> {
        self.tar.into_inner()
    }
}

/// Every shared object under `dir`.
fn shared_objects(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => shared_objects(&path, out),
            Ok(t) if t.is_file() && path.to_string_lossy().ends_with(".so") => out.push(path),
            _ => {}
        }
    }
}

/// The agent's image layer: `python` (`/usr/bin/python3.N`) and its standard library,
/// the vendored packages at `/opt/agent-deps`, `/app/main.py`, and the shared libraries
/// (and the loader) that python, its extension modules and Berth's guest agent load.
fn agent_layer(python: &Path, deps: &Path) -> std::io::Result<Vec<u8>> {
    let version = python
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let stdlib = Path::new("/usr/lib").join(&version);
    let mut layer = Layer::new();
    layer.file(python, python)?;
    layer.tree(&stdlib, &stdlib, &|name| {
        matches!(
            name,
            "test" | "idlelib" | "tkinter" | "turtledemo" | "ensurepip" | "lib2to3"
        ) || name.starts_with("config-")
    })?;
    layer.tree(deps, Path::new(DEPS), &|name| name == ".complete")?;
    // Readable by the sandbox, which sees the image's files as `nobody`'s.
    let app = tempfile::tempdir()?;
    std::fs::set_permissions(app.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(app.path().join("main.py"), AGENT)?;
    std::fs::set_permissions(
        app.path().join("main.py"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    layer.tree(app.path(), Path::new("/app"), &|_| false)?;
    let mut binaries = vec![python.to_path_buf(), PathBuf::from(common::BERTH)];
    shared_objects(&stdlib.join("lib-dynload"), &mut binaries);
    shared_objects(deps, &mut binaries);
    let libraries: BTreeSet<PathBuf> = binaries.iter().flat_map(|b| ldd(b)).collect();
    for lib in &libraries {
        layer.file(lib, lib)?;
    }
    layer.finish()
}

/// Build and push the agent image as `<registry>/agents/py:<tag>`; `None` (printed)
/// when this host cannot build it.
async fn push_agent_image(test: &str, registry: &Registry, tag: &str) -> Option<String> {
    let Some((python, _)) = host_python() else {
        eprintln!("skipping {test}: the host has no /usr/bin/python3.N");
        return None;
    };
    let built = tokio::task::spawn_blocking(move || {
        let deps =
            vendored(&python).map_err(|e| format!("cannot vendor {BEDROCK_AGENTCORE}: {e}"))?;
        let layer =
            agent_layer(&python, &deps).map_err(|e| format!("cannot build the layer: {e}"))?;
        Ok::<_, String>((python, layer))
    })
    .await
    .expect("image task");
    let (python, layer) = match built {
        Ok(built) => built,
        Err(e) => {
            eprintln!("skipping {test}: {e}");
            return None;
        }
    };
    let config = json!({
        "architecture": berth_oci::host_arch(),
        "os": "linux",
        "config": {
            "Entrypoint": [python.to_string_lossy(), "main.py"],
            "WorkingDir": "/app",
            "Env": [format!("PYTHONPATH={DEPS}"), "DOCKER_CONTAINER=1"],
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
    });
    let uri = format!("127.0.0.1:{}/{REPO}:{tag}", registry.port);
    let reference: Reference = uri.parse().expect("reference");
    berth_oci::install_crypto_provider();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    client
        .push(
            &reference,
            &[ImageLayer::oci_v1(layer, None)],
            Config::oci_v1(serde_json::to_vec(&config).expect("config"), None),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .expect("push the agent image");
    Some(uri)
}

// ---- HTTP ----

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("request");
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body = resp.bytes().await.expect("body");
    Answer {
        status,
        headers,
        body,
    }
}

/// Percent-encode everything but unreserved characters, as botocore does for the ARN.
fn encode(s: &str) -> String {
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
fn sid(tag: &str) -> String {
    format!("{:0<40}", format!("{tag}-{}-", uniq("s")))
}

async fn invoke(s: &Server, arn: &str, session: &str, payload: Value) -> Answer {
    send(
        s.http(
            Method::POST,
            &format!("/runtimes/{}/invocations", encode(arn)),
        )
        .header("content-type", "application/json")
        .header(SESSION_HEADER, session)
        .body(payload.to_string()),
    )
    .await
}

// ---- tests ----

#[tokio::test]
async fn invoke_an_agent_from_a_container_image() {
    let test = "invoke_an_agent_from_a_container_image";
    let Some(registry) = Registry::start().await else {
        return;
    };
    let Some(mut s) = Server::start(test).await else {
        return;
    };
    let Some(uri) = push_agent_image(test, &registry, "v1").await else {
        return;
    };

    // Create from the image; READY once pulled.
    let created = send(s.http(Method::PUT, "/runtimes/").json(&json!({
        "agentRuntimeName": "container_agent",
        "roleArn": ROLE,
        "agentRuntimeArtifact": {"containerConfiguration": {"containerUri": uri}},
    })))
    .await;
    assert_eq!(created.status, 202, "{}", created.json());
    let id = created.json()["agentRuntimeId"]
        .as_str()
        .expect("id")
        .to_string();
    let got = poll("the runtime to become READY", || async {
        let v = send(s.http(Method::GET, &format!("/runtimes/{id}/")))
            .await
            .json();
        (v["status"] != "CREATING").then_some(v)
    })
    .await;
    assert_eq!(got["status"], "READY", "{got}\n{}", s.log_text());
    let arn = got["agentRuntimeArn"].as_str().expect("arn").to_string();

    // The first invoke starts the image's entry point in its working dir with its
    // environment, and gets the payload back with the session id.
    let session = sid("img");
    let payload = json!({"prompt": "hello from the host", "n": [1, 2, 3]});
    let a = invoke(&s, &arn, &session, payload.clone()).await;
    assert_eq!(
        a.status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&a.body),
        s.log_text()
    );
    assert_eq!(
        a.headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()),
        Some(session.as_str())
    );
    let v = a.json();
    assert_eq!(v["echo"], payload, "{v}");
    assert_eq!(v["session"], session.as_str());
    assert_eq!(v["count"], 1);
    assert_eq!(v["cwd"], "/app");
    assert_eq!(v["docker"], "1");
    assert_eq!(v["pythonpath"], DEPS);
    assert_eq!(v["task"], false, "code was copied into a container session");
    let (python, _) = host_python().expect("python");
    assert_eq!(v["argv"], json!([python.to_string_lossy(), "main.py"]));

    // The agent is the shell `agentcore-agent`, running the entry point itself.
    let native = format!("ac.{id}.{session}");
    let shells = send(s.http(Method::GET, &format!("/v1/sessions/{native}/shells"))).await;
    assert_eq!(shells.status, 200, "{}", shells.json());
    let agent = shells
        .json()
        .as_array()
        .into_iter()
        .flatten()
        .find(|sh| sh["shell_id"] == "agentcore-agent")
        .cloned()
        .expect("the agent shell");
    assert_eq!(
        agent["command"],
        json!([python.to_string_lossy(), "main.py"])
    );
    assert_eq!(agent["running"], true);

    // The same session reaches the same agent process; another session does not.
    let v = invoke(&s, &arn, &session, json!({"again": true}))
        .await
        .json();
    assert_eq!(v["count"], 2, "{v}");
    assert_eq!(v["echo"], json!({"again": true}));
    let other = sid("other");
    let v = invoke(&s, &arn, &other, json!({})).await.json();
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(v["session"], other.as_str());

    let deleted = send(s.http(Method::DELETE, &format!("/runtimes/{id}/"))).await;
    assert_eq!(deleted.status, 202, "{}", deleted.json());
    assert!(s.stop_server_async().await, "server stops on SIGTERM");
    assert!(s.leftovers(None).is_empty(), "{:?}", s.leftovers(None));
    drop(registry);
}

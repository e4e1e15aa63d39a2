//! AgentCore runtimes from container images, against a real `berth server` and a real
//! registry (Debian's `docker-registry`, started on a free loopback port): an image
//! built and pushed here is pulled, its layers unpacked with whiteouts into the cached
//! rootfs that the version's native runtime uses as its image; a second runtime on the
//! same image, or on an index over it, downloads nothing; an unknown tag and another
//! platform's image fail the version with a reason; a sandbox sees the image's files;
//! deleting the last runtime that uses the image removes it.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth_api::CommandRequest;
use berth_oci::oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use berth_oci::oci_client::manifest;
use berth_oci::oci_client::secrets::RegistryAuth;
use berth_oci::oci_client::{Client, Reference};
use common::agentcore::Registry;
use common::{poll, Server};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Digest;

const BUSYBOX: &str = "/bin/busybox";
/// The repository the test image is pushed to.
const REPO: &str = "agents/echo";
const ROLE: &str = "arn:aws:iam::123456789012:role/AgentRole";
const HELLO: &str = "hello from the image\n";

/// A tar layer from entries: (path, contents or a symlink target, mode).
enum Entry {
    Dir(&'static str),
    File(String, Vec<u8>, u32),
    Symlink(&'static str, &'static str),
}

fn tar_layer(entries: Vec<Entry>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).expect("dir");
            }
            Entry::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, &data[..]).expect("file");
            }
            Entry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, p, target).expect("symlink");
            }
        }
    }
    b.into_inner().expect("tar")
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&sha2::Sha256::digest(data)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The shared libraries the berth binary (the sandbox's guest agent) loads, from `ldd`:
/// an image needs them for a sandbox to start in it.
fn guest_libraries() -> Vec<PathBuf> {
    common::agentcore::ldd(Path::new(common::BERTH))
}

/// The test image: layer 1 (gzip) has busybox, the guest agent's libraries and a few
/// files; layer 2 (plain tar) deletes one, makes a directory opaque and adds a symlink.
/// Returns (layers, config) with the layer digests. `arch` is the config's.
fn build_image(arch: &str) -> (Vec<ImageLayer>, Config, Vec<String>) {
    let mut base = vec![
        Entry::Dir("bin/"),
        Entry::Dir("etc/"),
        Entry::Dir("srv/"),
        Entry::File("hello.txt".into(), HELLO.as_bytes().to_vec(), 0o644),
        Entry::File(
            "etc/gone.txt".into(),
            b"deleted by layer 2\n".to_vec(),
            0o644,
        ),
        Entry::File("opq/old.txt".into(), b"hidden by layer 2\n".to_vec(), 0o644),
    ];
    if Path::new(BUSYBOX).is_file() {
        let bytes = std::fs::read(BUSYBOX).expect("read busybox");
        base.push(Entry::File("bin/busybox".into(), bytes, 0o755));
        for lib in guest_libraries() {
            let bytes = std::fs::read(&lib).expect("read a library");
            let name = lib.to_string_lossy().trim_start_matches('/').to_string();
            base.push(Entry::File(name, bytes, 0o755));
        }
    }
    let layer1 = tar_layer(base);
    let layer2 = tar_layer(vec![
        Entry::File("etc/.wh.gone.txt".into(), vec![], 0o644),
        Entry::File("opq/.wh..wh..opq".into(), vec![], 0o644),
        Entry::File("opq/new.txt".into(), b"layer 2\n".to_vec(), 0o644),
        Entry::Symlink("hello-link", "/hello.txt"),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer1).expect("gzip");
    let layer1_gz = gz.finish().expect("gzip");
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/busybox"],
            "Cmd": ["httpd", "-f", "-p", "8080"],
            "Env": ["PATH=/bin", "GREETING=from-image"],
            "WorkingDir": "/srv",
            "User": "1000",
            "ExposedPorts": {"8080/tcp": {}},
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer1), sha256(&layer2)]},
    });
    let digests = vec![sha256(&layer1_gz), sha256(&layer2)];
    (
        vec![
            ImageLayer::oci_v1_gzip(layer1_gz, None),
            ImageLayer::oci_v1(layer2, None),
        ],
        Config::oci_v1(serde_json::to_vec(&config).expect("config"), None),
        digests,
    )
}

fn registry_client() -> Client {
    berth_oci::install_crypto_provider();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

fn reference(registry: &Registry, tag: &str) -> Reference {
    format!("127.0.0.1:{}/agents/echo:{tag}", registry.port)
        .parse()
        .expect("reference")
}

/// Push the test image for `arch` as `tag`; its layer digests.
async fn push(registry: &Registry, tag: &str, arch: &str) -> Vec<String> {
    let (layers, config, digests) = build_image(arch);
    registry_client()
        .push(
            &reference(registry, tag),
            &layers,
            config,
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .expect("push the test image");
    digests
}

/// Push an image index `tag` over the image manifests of `tags` (with their arches).
async fn push_index(registry: &Registry, tag: &str, tags: &[(&str, &str)]) {
    let client = registry_client();
    let mut manifests = Vec::new();
    for (t, arch) in tags {
        let (bytes, digest) = client
            .pull_manifest_raw(
                &reference(registry, t),
                &RegistryAuth::Anonymous,
                &[manifest::OCI_IMAGE_MEDIA_TYPE],
            )
            .await
            .expect("pull a manifest");
        manifests.push(json!({
            "mediaType": manifest::OCI_IMAGE_MEDIA_TYPE,
            "digest": digest,
            "size": bytes.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
    }
    let index: manifest::OciImageIndex = serde_json::from_value(json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
        "manifests": manifests,
    }))
    .expect("index");
    client
        .push_manifest_list(&reference(registry, tag), &RegistryAuth::Anonymous, index)
        .await
        .expect("push the index");
}

async fn call(s: &Server, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = s.http(method, path);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// CreateAgentRuntime from an image; the runtime id.
async fn create(s: &Server, name: &str, uri: &str) -> String {
    let body = json!({
        "agentRuntimeName": name,
        "roleArn": ROLE,
        "agentRuntimeArtifact": {"containerConfiguration": {"containerUri": uri}},
        "environmentVariables": {"FROM_REQUEST": "yes"},
    });
    let (status, got) = call(s, Method::PUT, "/runtimes/", Some(body)).await;
    assert_eq!(status, 202, "{got}");
    assert_eq!(got["status"], "CREATING");
    got["agentRuntimeId"].as_str().expect("id").to_string()
}

/// GetAgentRuntime once the version is no longer CREATING.
async fn settled(s: &Server, id: &str) -> Value {
    let path = format!("/runtimes/{id}/");
    poll(&format!("{id} to settle"), || async {
        let (status, got) = call(s, Method::GET, &path, None).await;
        assert_eq!(status, 200, "{got}");
        (got["status"] != "CREATING").then_some(got)
    })
    .await
}

#[tokio::test]
async fn runtimes_from_container_images() {
    let Some(registry) = Registry::start().await else {
        return;
    };
    let Some(mut s) = Server::start("runtimes_from_container_images").await else {
        return;
    };
    let host = berth_oci::host_arch();
    let other = if host == "arm64" { "amd64" } else { "arm64" };
    let layers = push(&registry, "v1", host).await;
    push(&registry, "other", other).await;
    // An index whose first entry is the other platform's.
    push_index(&registry, "multi", &[("other", other), ("v1", host)]).await;
    let uri = format!("127.0.0.1:{}/agents/echo:v1", registry.port);

    // Create → READY, the image pulled into the cache beside the data dir.
    let a = create(&s, "image_a", &uri).await;
    let got = settled(&s, &a).await;
    assert_eq!(got["status"], "READY", "{got}\n{}", s.log_text());
    assert_eq!(
        got["agentRuntimeArtifact"]["containerConfiguration"]["containerUri"],
        uri
    );
    let (status, native) = call(&s, Method::GET, &format!("/v1/runtimes/ac.{a}.v1"), None).await;
    assert_eq!(status, 200, "{native}");
    let rootfs = PathBuf::from(native["image"].as_str().expect("image"));
    let data = s.data_dir.canonicalize().expect("data dir");
    let cache = data.with_file_name("data-oci");
    assert!(
        rootfs.starts_with(&cache) && rootfs.ends_with("rootfs"),
        "{rootfs:?} is not in {cache:?}"
    );
    let key = rootfs
        .parent()
        .expect("digest dir")
        .file_name()
        .expect("key");
    assert!(key.to_string_lossy().starts_with("sha256-"), "{key:?}");
    assert_eq!(native["isolation"], "namespace");
    assert_eq!(native["env"]["GREETING"], "from-image");
    assert_eq!(native["env"]["PATH"], "/bin");
    assert_eq!(native["env"]["FROM_REQUEST"], "yes");
    assert_eq!(native["env"]["AWS_REGION"], "us-east-1");

    // The layers, applied in order with their whiteouts; the config stored beside.
    assert_eq!(
        std::fs::read_to_string(rootfs.join("hello.txt")).expect("hello"),
        HELLO
    );
    assert!(
        !rootfs.join("etc/gone.txt").exists(),
        "whiteout not applied"
    );
    assert!(!rootfs.join("etc/.wh.gone.txt").exists());
    assert!(
        !rootfs.join("opq/old.txt").exists(),
        "opaque dir not applied"
    );
    assert!(rootfs.join("opq/new.txt").is_file());
    assert!(!rootfs.join("opq/.wh..wh..opq").exists());
    assert_eq!(
        std::fs::read_link(rootfs.join("hello-link")).expect("symlink"),
        Path::new("/hello.txt")
    );
    let config: Value = serde_json::from_slice(
        &std::fs::read(rootfs.with_file_name("config.json")).expect("config.json"),
    )
    .expect("config json");
    assert_eq!(config["entrypoint"], json!(["/bin/busybox"]));
    assert_eq!(config["cmd"], json!(["httpd", "-f", "-p", "8080"]));
    assert_eq!(config["working_dir"], "/srv");
    assert_eq!(config["user"], "1000");
    assert_eq!(config["exposed_ports"], json!(["8080/tcp"]));
    // The cache is private to the server.
    let cache_mode = std::fs::metadata(&cache)
        .expect("cache")
        .permissions()
        .mode();
    assert_eq!(cache_mode & 0o777, 0o700);
    for layer in &layers {
        assert_eq!(
            registry.blob_gets(REPO, layer),
            1,
            "{layer}\n{}",
            registry.log()
        );
    }

    // A second runtime on the same image: a cache hit, nothing downloaded again.
    let inode = std::fs::metadata(&rootfs).expect("rootfs").ino();
    let b = create(&s, "image_b", &uri).await;
    let got = settled(&s, &b).await;
    assert_eq!(got["status"], "READY", "{got}");
    let (_, native_b) = call(&s, Method::GET, &format!("/v1/runtimes/ac.{b}.v1"), None).await;
    assert_eq!(native_b["image"], native["image"]);
    assert_eq!(std::fs::metadata(&rootfs).expect("rootfs").ino(), inode);
    for layer in &layers {
        assert_eq!(
            registry.blob_gets(REPO, layer),
            1,
            "{layer} downloaded again"
        );
    }

    // An image index resolves to this host's platform: the same manifest, so the same
    // cached rootfs.
    let c = create(
        &s,
        "image_c",
        &format!("127.0.0.1:{}/agents/echo:multi", registry.port),
    )
    .await;
    let got = settled(&s, &c).await;
    assert_eq!(got["status"], "READY", "{got}");
    let (_, native_c) = call(&s, Method::GET, &format!("/v1/runtimes/ac.{c}.v1"), None).await;
    assert_eq!(native_c["image"], native["image"]);
    for layer in &layers {
        assert_eq!(
            registry.blob_gets(REPO, layer),
            1,
            "{layer} downloaded again"
        );
    }
    // A single-platform image for another architecture fails, saying so.
    let wrong = create(
        &s,
        "image_wrong",
        &format!("127.0.0.1:{}/agents/echo:other", registry.port),
    )
    .await;
    let got = settled(&s, &wrong).await;
    assert_eq!(got["status"], "CREATE_FAILED", "{got}");
    let reason = got["failureReason"].as_str().expect("failureReason");
    assert!(
        reason.contains(&format!("the image is for linux/{other}")),
        "{reason}"
    );

    // An unknown tag fails the version with the reference and the registry's answer.
    let missing = format!("127.0.0.1:{}/agents/echo:nope", registry.port);
    let bad = create(&s, "image_bad", &missing).await;
    let got = settled(&s, &bad).await;
    assert_eq!(got["status"], "CREATE_FAILED", "{got}");
    let reason = got["failureReason"].as_str().expect("failureReason");
    assert!(
        reason.contains(&missing) && reason.contains("MANIFEST_UNKNOWN"),
        "{reason}"
    );
    // An unparseable reference is a ValidationException naming the member.
    let body = json!({
        "agentRuntimeName": "image_invalid",
        "roleArn": ROLE,
        "agentRuntimeArtifact": {"containerConfiguration": {"containerUri": "Not A Reference"}},
    });
    let (status, got) = call(&s, Method::PUT, "/runtimes/", Some(body)).await;
    assert_eq!(status, 400, "{got}");
    assert_eq!(
        got["fieldList"][0]["name"],
        "agentRuntimeArtifact.containerConfiguration.containerUri"
    );

    // A sandbox of the version has the image as its root.
    if Path::new(BUSYBOX).is_file() {
        let session = common::uniq("img");
        let run = |argv: &[&str]| CommandRequest {
            argv: Some(argv.iter().map(|a| a.to_string()).collect()),
            runtime: Some(format!("ac.{a}.v1")),
            ..Default::default()
        };
        let out = s
            .exec_req(&session, run(&["/bin/busybox", "cat", "/hello.txt"]))
            .await
            .ok();
        assert_eq!(out.out(), HELLO);
        let out = s
            .exec_req(
                &session,
                run(&[
                    "/bin/busybox",
                    "sh",
                    "-c",
                    "test ! -e /etc/gone.txt && ls /opq && cat /hello-link && echo $GREETING",
                ]),
            )
            .await
            .ok();
        assert_eq!(out.out(), format!("new.txt\n{HELLO}from-image\n"));
        let (status, _) = call(&s, Method::DELETE, &format!("/v1/sessions/{session}"), None).await;
        assert!(status < 300, "delete session {session}: {status}");
    } else {
        eprintln!("{BUSYBOX} is missing (apt-get install busybox-static): not starting a sandbox");
    }

    // The cached image goes with the last runtime that uses it.
    let (status, _) = call(&s, Method::DELETE, &format!("/runtimes/{a}/"), None).await;
    assert_eq!(status, 202);
    assert!(rootfs.is_dir(), "removed while runtime {b} uses it");
    let (status, _) = call(&s, Method::DELETE, &format!("/runtimes/{b}/"), None).await;
    assert_eq!(status, 202);
    assert!(rootfs.is_dir(), "removed while runtime {c} uses it");
    let (status, _) = call(&s, Method::DELETE, &format!("/runtimes/{c}/"), None).await;
    assert_eq!(status, 202);
    assert!(!rootfs.exists(), "kept after its last runtime was deleted");
    for id in [&bad, &wrong] {
        let (status, _) = call(&s, Method::DELETE, &format!("/runtimes/{id}/"), None).await;
        assert_eq!(status, 202);
    }
    let left: Vec<_> = std::fs::read_dir(&cache)
        .expect("cache")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left in the image cache: {left:?}");
    assert!(s.stop_server_async().await, "server stops on SIGTERM");
    assert!(s.leftovers(None).is_empty(), "{:?}", s.leftovers(None));
    assert!(common::mounts_under(&cache).is_empty());
}

//! Bad input: every error is `{"error":{"code","message"}}` with the right status, and
//! no id or path a client sends reaches outside its session.

mod common;

use common::{uniq, Server};
use reqwest::Method;
use serde_json::{json, Value};

/// Send a request; return (status, parsed JSON body or Null).
async fn call(rb: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = rb.send().await.expect("send");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Assert an error response: status, code, and (when given) text the message names.
#[track_caller]
fn assert_error(got: &(u16, Value), status: u16, code: &str, names: Option<&str>) {
    let (st, body) = got;
    assert_eq!(*st, status, "status for body {body}");
    let err = &body["error"];
    assert_eq!(err["code"], code, "code in {body}");
    let msg = err["message"]
        .as_str()
        .unwrap_or_else(|| panic!("message in {body}"));
    assert!(!msg.is_empty(), "empty message");
    if let Some(name) = names {
        let field = err["field"].as_str().unwrap_or_default();
        assert!(
            msg.contains(name) || field == name,
            "{body} does not name {name:?}"
        );
    }
}

#[tokio::test]
async fn unknown_things_are_404_and_bad_input_is_400_naming_the_field() {
    let Some(s) =
        Server::start("unknown_things_are_404_and_bad_input_is_400_naming_the_field").await
    else {
        return;
    };
    let get = |p: &str| s.http(Method::GET, p);
    assert_error(
        &call(get("/v1/sessions/x")).await,
        404,
        "not_found",
        Some("x"),
    );
    assert_error(
        &call(get("/v1/runtimes/nope")).await,
        404,
        "not_found",
        Some("nope"),
    );
    assert_error(
        &call(s.http(Method::DELETE, "/v1/sessions/nope")).await,
        404,
        "not_found",
        None,
    );
    assert_error(
        &call(s.http(Method::POST, "/v1/sessions/nope/stop")).await,
        404,
        "not_found",
        None,
    );
    assert_error(
        &call(s.http(Method::DELETE, "/v1/runtimes/nope")).await,
        404,
        "not_found",
        None,
    );
    assert_error(
        &call(get("/v1/no/such/route")).await,
        404,
        "not_found",
        None,
    );
    assert_error(
        &call(
            s.http(Method::POST, "/v1/sessions")
                .json(&json!({"runtime": "nope"})),
        )
        .await,
        404,
        "not_found",
        Some("nope"),
    );
    assert_error(
        &call(get("/v1/sessions/nope/files/etc/hostname")).await,
        404,
        "not_found",
        None,
    );

    // Invalid ids, in bodies and in paths.
    for bad in ["../etc", "a/b", ".hidden", "-x", "a b", ""] {
        let r = call(
            s.http(Method::POST, "/v1/sessions")
                .json(&json!({"id": bad})),
        )
        .await;
        assert_error(&r, 400, "invalid_argument", Some("id"));
        let r = call(
            s.http(Method::POST, "/v1/runtimes")
                .json(&json!({"name": bad})),
        )
        .await;
        assert_error(&r, 400, "invalid_argument", Some("name"));
    }
    let long = "x".repeat(129);
    let r = call(
        s.http(Method::POST, "/v1/sessions")
            .json(&json!({"id": long})),
    )
    .await;
    assert_error(&r, 400, "invalid_argument", Some("id"));
    // (`%2E%2E` is normalised away by the HTTP client; the raw-path test covers it.)
    for bad in ["a%20b", ".hidden", "..x", "a%2Fb", "-x"] {
        let r = call(
            s.http(Method::POST, &format!("/v1/sessions/{bad}/commands"))
                .json(&json!({"command": "true"})),
        )
        .await;
        assert_error(&r, 400, "invalid_argument", Some("session"));
    }

    // Invalid parameters.
    let session = uniq("params");
    let cmd = |body: Value| {
        s.http(Method::POST, &format!("/v1/sessions/{session}/commands"))
            .json(&body)
    };
    let cases: Vec<(Value, &str)> = vec![
        (json!({"command": "true", "timeout_s": -1}), "timeout_s"),
        (json!({"command": "true", "timeout_s": 0}), "timeout_s"),
        (json!({"command": "true", "timeout_s": "soon"}), "timeout_s"),
        (json!({"command": "true", "bogus": 1}), "bogus"),
        (json!({"command": "true", "cwd": "relative"}), "cwd"),
        (json!({"command": "true", "cwd": "/a/../etc"}), "cwd"),
        (json!({"command": "true", "env": {"A=B": "x"}}), "env"),
        (json!({"command": "true", "stdin_b64": "!!!"}), "stdin_b64"),
        (json!({"command": ""}), "command"),
        (json!({"argv": []}), "argv"),
        (json!({}), "command"),
        (json!({"command": "true", "argv": ["true"]}), "command"),
    ];
    for (body, field) in cases {
        let r = call(cmd(body.clone())).await;
        assert_error(&r, 400, "invalid_argument", Some(field));
    }
    let r = call(
        s.http(Method::POST, &format!("/v1/sessions/{session}/commands"))
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_error(&r, 400, "invalid_argument", None);

    let rt = |extra: Value| {
        let mut body = json!({"name": uniq("rt")});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        s.http(Method::POST, "/v1/runtimes").json(&body)
    };
    let cases: Vec<(Value, &str)> = vec![
        (json!({"memory": 1}), "memory"),
        (json!({"pids": 0}), "pids"),
        (json!({"cpus": -1.0}), "cpus"),
        (json!({"workspace_size": 1}), "workspace_size"),
        (json!({"workspace_path": "relative"}), "workspace_path"),
        (json!({"image": "/definitely/not/a/dir"}), "image"),
        (json!({"bogus_field": true}), "bogus_field"),
        (json!({"isolation": "teleport"}), "isolation"),
        (json!({"env": {"": "x"}}), "env"),
        (
            json!({"mounts": (0..6).map(|i| json!({"source": "/usr", "target": format!("/m{i}")})).collect::<Vec<_>>()}),
            "mounts",
        ),
        (
            json!({"mounts": [{"source": "relative", "target": "/m"}]}),
            "mounts",
        ),
    ];
    for (extra, field) in cases {
        let r = call(rt(extra.clone())).await;
        assert_error(&r, 400, "invalid_argument", Some(field));
    }
    // A taken name is a conflict, and the error is still JSON.
    let name = s.runtime(&uniq("dup"), |_| {}).await;
    let r = call(
        s.http(Method::POST, "/v1/runtimes")
            .json(&json!({"name": name})),
    )
    .await;
    assert_error(&r, 409, "already_exists", Some(&name));
    // Nothing above created a session.
    let sessions = s.client.list_sessions().await.expect("list");
    assert!(
        sessions.is_empty(),
        "bad requests created sessions: {sessions:?}"
    );
}

#[tokio::test]
async fn oversize_bodies_get_413_and_missing_or_wrong_tokens_get_401() {
    let Some(s) =
        Server::start("oversize_bodies_get_413_and_missing_or_wrong_tokens_get_401").await
    else {
        return;
    };
    let big = "x".repeat((1 << 20) + 10);
    for path in ["/v1/runtimes", "/v1/sessions", "/v1/sessions/big/commands"] {
        let r = call(
            s.http(Method::POST, path)
                .header("content-type", "application/json")
                .body(format!("{{\"command\":\"{big}\"}}")),
        )
        .await;
        assert_error(&r, 413, "payload_too_large", None);
    }
    let http = reqwest::Client::new();
    for path in ["/v1/sessions", "/v1/runtimes", "/v1/sessions/x", "/v1/info"] {
        let url = format!("{}{path}", s.url);
        assert_error(&call(http.get(&url)).await, 401, "unauthenticated", None);
        assert_error(
            &call(http.get(&url).bearer_auth("wrong")).await,
            401,
            "unauthenticated",
            None,
        );
        let r = call(
            http.get(&url)
                .header("authorization", format!("Basic {}", s.token)),
        )
        .await;
        assert_error(&r, 401, "unauthenticated", None);
    }
    let r = call(
        http.post(format!("{}/v1/sessions/x/commands", s.url))
            .json(&json!({"command": "touch /mnt/workspace/unauth"})),
    )
    .await;
    assert_error(&r, 401, "unauthenticated", None);
    assert!(s.client.list_sessions().await.expect("list").is_empty());
    // The CLI with a wrong token fails with the server's message, not a command run.
    let (_, err, code) = {
        let mut c = s.cli_command(&["exec", "-s", "x", "--", "true"]);
        c.env("BERTH_TOKEN", "wrong");
        let o = c.output().await.expect("cli");
        (o.stdout, o.stderr, o.status.code().unwrap_or(-1))
    };
    assert_ne!(code, 0);
    assert!(!err.is_empty());
    // /healthz needs no token.
    let r = http
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .expect("healthz");
    assert!(r.status().is_success());
}

#[tokio::test]
async fn too_many_running_sandboxes_get_429() {
    let Some(s) = Server::start_with(
        "too_many_running_sandboxes_get_429",
        &["--max-sandboxes", "1"],
    )
    .await
    else {
        return;
    };
    let a = uniq("first");
    let b = uniq("second");
    s.exec(&a, "true").await.ok();
    let r = call(s.http(Method::POST, "/v1/sessions").json(&json!({"id": b}))).await;
    assert_error(&r, 429, "resource_exhausted", None);
    let r = call(
        s.http(Method::POST, &format!("/v1/sessions/{b}/commands"))
            .json(&json!({"command": "true"})),
    )
    .await;
    assert_error(&r, 429, "resource_exhausted", None);
    // The CLI reports it and exits non-zero.
    let (_, err, code) = s.cli(&["exec", "-s", &b, "--", "true"]).await;
    assert_ne!(code, 0);
    assert!(!err.is_empty());
    // Once the first stops, the second runs.
    s.client.stop_session(&a).await.expect("stop");
    s.exec(&b, "true").await.ok();
}

/// Raw HTTP/1.1 GET, so that `..` and `%2e%2e` reach the server unnormalised.
async fn raw_get(s: &Server, path: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        s.token
    );
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.expect("read");
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head")
        + 4;
    let head = String::from_utf8_lossy(&resp[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let mut body = resp[head_end..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 2 + n + 2..];
        }
        body = out;
    }
    (status, body)
}

#[tokio::test]
async fn no_path_a_client_sends_reaches_outside_its_session() {
    let Some(s) = Server::start("no_path_a_client_sends_reaches_outside_its_session").await else {
        return;
    };
    let session = uniq("paths");
    let other = uniq("neighbour");
    s.exec(&other, "echo neighbour-secret > /mnt/workspace/n")
        .await
        .ok();
    let token = s.token.clone();
    let dd = s.data_dir.display().to_string();
    let host_shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    // A host-only marker file, and a host dir nothing may be written into.
    let host_dir = tempfile::Builder::new()
        .prefix("berth-it-host-")
        .tempdir()
        .expect("tmp");
    std::fs::write(host_dir.path().join("host-only"), b"host-only-content").expect("write");
    let hd = host_dir.path().display().to_string();
    s.exec(
        &session,
        &format!(
            "cd /mnt/workspace && ln -s /etc/shadow shadow && ln -s /proc/1/root/etc/shadow p1shadow \
             && ln -s '{dd}/admin.token' token && ln -s '{hd}/host-only' hostfile \
             && ln -s '{hd}' hostdir && ln -s / rootlink && mkdir d && echo inside > d/f"
        ),
    )
    .await
    .ok();

    let leaks = |body: &[u8]| -> Option<String> {
        let text = String::from_utf8_lossy(body);
        if text.contains(&token) {
            return Some("the admin token".into());
        }
        if text.contains("host-only-content") {
            return Some("a host-only file".into());
        }
        if text.contains("neighbour-secret") {
            return Some("another session's file".into());
        }
        if host_shadow.len() > 20
            && body
                .windows(host_shadow.len().min(64))
                .any(|w| w == &host_shadow[..host_shadow.len().min(64)])
        {
            return Some("the host's /etc/shadow".into());
        }
        None
    };
    let base = format!("/v1/sessions/{session}/files");
    let paths = vec![
        format!("{base}/mnt/workspace/../../..{dd}/admin.token"),
        format!("{base}/..{dd}/admin.token"),
        format!("{base}/%2e%2e/%2e%2e{dd}/admin.token"),
        format!("{base}/mnt/workspace/%2e%2e/%2e%2e/%2e%2e{dd}/admin.token"),
        format!("{base}/mnt%2f..%2f..%2f..{dd}/admin.token"),
        format!("{base}{dd}/admin.token"),
        format!("{base}{dd}/workspaces/{other}.ext4"),
        format!("{base}{hd}/host-only"),
        format!("{base}/etc/shadow"),
        format!("{base}/mnt/workspace/shadow"),
        format!("{base}/mnt/workspace/p1shadow"),
        format!("{base}/mnt/workspace/token"),
        format!("{base}/mnt/workspace/hostfile"),
        format!("{base}/mnt/workspace/hostdir/host-only"),
        format!("{base}/mnt/workspace/rootlink/etc/shadow"),
        format!("{base}/proc/1/root/etc/shadow"),
        format!("{base}/proc/1/root{dd}/admin.token"),
        format!("{base}/mnt/workspace?tar=true"),
        format!("{base}/mnt/workspace/hostdir?tar=true"),
        format!("{base}/mnt/workspace/hostdir?list=true"),
        format!("/v1/sessions/{session}/../{other}/files/mnt/workspace/n"),
        format!("/v1/sessions/{session}/%2e%2e/{other}/files/mnt/workspace/n"),
        format!("/v1/sessions/%2e%2e/files{dd}/admin.token"),
    ];
    for p in &paths {
        let (status, body) = raw_get(&s, p).await;
        if let Some(what) = leaks(&body) {
            panic!("GET {p} ({status}) revealed {what}");
        }
        if status >= 400 {
            let v: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                panic!(
                    "GET {p}: {status} without a JSON error body: {:?}",
                    String::from_utf8_lossy(&body)
                )
            });
            assert!(v["error"]["code"].is_string(), "GET {p}: {v}");
        }
    }
    // The confined view still works for honest paths.
    let (status, body) = raw_get(&s, &format!("{base}/mnt/workspace/d/f")).await;
    assert_eq!((status, body), (200, b"inside\n".to_vec()));

    // Writes through symlinks or dot-dot do not land on the host.
    for p in [
        "mnt/workspace/hostdir/written".to_string(),
        "mnt/workspace/hostfile".to_string(),
        format!("proc/1/root{hd}/written2"),
    ] {
        let r = s
            .http(Method::PUT, &format!("{base}/{p}"))
            .body("payload-from-client")
            .send()
            .await
            .expect("put");
        let _ = r.status();
    }
    // A tar whose entries climb out of the target directory.
    let staging = tempfile::tempdir().expect("tmp");
    let evil = format!("../../../../../../..{hd}/from-tar");
    let status = std::process::Command::new("tar")
        .current_dir(staging.path())
        .args(["--absolute-names", "-cf", "evil.tar", "--transform"])
        .arg(format!("s|.*|{evil}|"))
        .arg("/etc/hostname")
        .status()
        .expect("tar");
    assert!(status.success());
    let tar = std::fs::read(staging.path().join("evil.tar")).expect("tar");
    let _ = s
        .http(Method::PUT, &format!("{base}/mnt/workspace/d?tar=true"))
        .body(tar)
        .send()
        .await
        .expect("put tar");
    let mut written: Vec<String> = std::fs::read_dir(host_dir.path())
        .expect("read host dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        ["host-only"],
        "the client wrote into a host directory"
    );
    assert_eq!(
        std::fs::read(host_dir.path().join("host-only")).expect("read"),
        b"host-only-content",
        "the client overwrote a host file"
    );
    // The neighbour's workspace is untouched and unread.
    assert_eq!(
        s.exec(&other, "cat /mnt/workspace/n").await.ok().out(),
        "neighbour-secret\n"
    );
}

#[tokio::test]
async fn the_openapi_document_lists_the_v1_paths() {
    let Some(s) = Server::start("the_openapi_document_lists_the_v1_paths").await else {
        return;
    };
    let (status, doc) = call(s.http(Method::GET, "/v1/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')),
        "{doc}"
    );
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/v1/runtimes",
        "/v1/runtimes/{name}",
        "/v1/sessions",
        "/v1/sessions/{id}",
        "/v1/sessions/{id}/stop",
        "/v1/sessions/{id}/commands",
        "/v1/sessions/{id}/files/{path}",
    ] {
        assert!(
            paths.contains_key(p),
            "openapi.json lacks {p}: {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    assert!(
        paths.keys().all(|p| p.starts_with("/v1/")),
        "{:?}",
        paths.keys()
    );
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "RuntimeSpec",
        "Session",
        "CommandRequest",
        "CommandEvent",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
}

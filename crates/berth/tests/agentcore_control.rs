//! The AgentCore-compatible control plane against a real `berth server`, over HTTP with
//! the admin bearer token: runtimes from code zips in the object store, versions,
//! endpoints, deletion, AWS-style errors, and records surviving a SIGKILL.

mod common;

use std::path::Path;

use common::{poll, Server};
use reqwest::Method;
use serde_json::{json, Value};

const ROLE: &str = "arn:aws:iam::123456789012:role/AgentRole";
const EFS: &str =
    "arn:aws:elasticfilesystem:us-east-1:123456789012:access-point/fsap-0123456789abcdef0";

/// An HTTP answer: status, `X-Amzn-ErrorType`, `x-amzn-RequestId`, JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    error_type: Option<String>,
    request_id: Option<String>,
    content_type: Option<String>,
    body: Value,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("request");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (error_type, request_id, content_type) = (
        header("x-amzn-errortype"),
        header("x-amzn-requestid"),
        header("content-type"),
    );
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("body");
    Answer {
        status,
        error_type,
        request_id,
        content_type,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

async fn call(s: &Server, method: Method, path: &str, body: Option<Value>) -> Answer {
    let mut req = s.http(method, path);
    if let Some(b) = body {
        req = req.json(&b);
    }
    send(req).await
}

/// Like [`call`], but the request must succeed with `status`.
async fn ok(s: &Server, method: Method, path: &str, body: Option<Value>, status: u16) -> Value {
    let a = call(s, method.clone(), path, body).await;
    assert_eq!(a.status, status, "{method} {path}: {a:?}");
    if path.starts_with("/runtimes") {
        assert!(
            a.request_id.is_some(),
            "{method} {path}: no x-amzn-RequestId"
        );
    }
    a.body
}

/// Poll GetAgentRuntime until `version` is no longer CREATING or UPDATING.
async fn settled(s: &Server, id: &str, version: &str) -> Value {
    let path = format!("/runtimes/{id}/?version={version}");
    poll(&format!("{id} version {version} to settle"), || async {
        let got = ok(s, Method::GET, &path, None, 200).await;
        let status = got["status"].as_str().unwrap_or_default();
        (status != "CREATING" && status != "UPDATING").then_some(got)
    })
    .await
}

/// A CreateAgentRuntime / UpdateAgentRuntime body for a code zip.
fn spec(bucket: &str, key: &str, runtime: &str) -> Value {
    json!({
        "roleArn": ROLE,
        "agentRuntimeArtifact": {"codeConfiguration": {
            "code": {"s3": {"bucket": bucket, "prefix": key}},
            "runtime": runtime,
            "entryPoint": ["main.py"],
        }},
    })
}

fn create_body(name: &str, bucket: &str, key: &str, runtime: &str) -> Value {
    let mut b = spec(bucket, key, runtime);
    b["agentRuntimeName"] = json!(name);
    b
}

/// The `python3.N` this host's base image has, as a `PYTHON_3_N` runtime, and one it lacks.
fn pythons() -> (Option<String>, String) {
    let has = |n: u32| Path::new(&format!("/usr/bin/python3.{n}")).is_file();
    let present = (10..=14).find(|n| has(*n)).map(|n| format!("PYTHON_3_{n}"));
    let absent = (10..=14)
        .rev()
        .find(|n| !has(*n))
        .map(|n| format!("PYTHON_3_{n}"))
        .unwrap_or_else(|| "PYTHON_3_14".into());
    (present, absent)
}

// ---- a stored (uncompressed) zip writer, so the test needs no zip library ----

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zip of (name, contents) regular files, mode 0644.
fn zip(files: &[(&str, &[u8])]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    let u16le = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let u32le = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    for (name, data) in files {
        let offset = out.len() as u32;
        let (crc, len, nlen) = (crc32(data), data.len() as u32, name.len() as u16);
        u32le(&mut out, 0x0403_4b50);
        for x in [20, 0, 0, 0, 0x21] {
            u16le(&mut out, x);
        }
        for x in [crc, len, len] {
            u32le(&mut out, x);
        }
        u16le(&mut out, nlen);
        u16le(&mut out, 0);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        u32le(&mut central, 0x0201_4b50);
        for x in [(3 << 8) | 20, 20, 0, 0, 0, 0x21] {
            u16le(&mut central, x);
        }
        for x in [crc, len, len] {
            u32le(&mut central, x);
        }
        for x in [nlen, 0, 0, 0, 0] {
            u16le(&mut central, x);
        }
        u32le(&mut central, 0o100644 << 16);
        u32le(&mut central, offset);
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_offset, cd_len, n) = (out.len() as u32, central.len() as u32, files.len() as u16);
    out.extend_from_slice(&central);
    u32le(&mut out, 0x0605_4b50);
    for x in [0, 0, n, n] {
        u16le(&mut out, x);
    }
    u32le(&mut out, cd_len);
    u32le(&mut out, cd_offset);
    u16le(&mut out, 0);
    out
}

/// Put an agent zip at `s3://agents/<key>` in the server's default object store.
fn put_zip(s: &Server, key: &str) {
    let path = s.data_dir.join("buckets/agents").join(key);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("bucket dir");
    std::fs::write(
        &path,
        zip(&[
            ("main.py", b"print('hello from berth')\n"),
            ("lib/helper.py", b"X = 1\n"),
        ]),
    )
    .expect("write zip");
}

#[tokio::test]
async fn runtimes_versions_and_endpoints() {
    let shared = tempfile::tempdir().expect("shared dir");
    let flag = format!("{EFS}={}", shared.path().display());
    let Some(s) =
        Server::start_with("runtimes_versions_and_endpoints", &["--shared-dir", &flag]).await
    else {
        return;
    };
    let (Some(python), _) = pythons() else {
        eprintln!("skipping: the host has no /usr/bin/python3.N for a READY runtime");
        return;
    };
    put_zip(&s, "team/agent.zip");

    // Create → CREATING → READY.
    let mut body = create_body("echo_agent", "agents", "team/agent.zip", &python);
    body["description"] = json!("echoes");
    body["lifecycleConfiguration"] = json!({"idleRuntimeSessionTimeout": 300, "maxLifetime": 3600});
    body["environmentVariables"] = json!({"GREETING": "hi"});
    body["filesystemConfigurations"] = json!([
        {"sessionStorage": {"mountPath": "/mnt/data"}},
        {"efsAccessPoint": {"accessPointArn": EFS, "mountPath": "/mnt/skills"}},
    ]);
    body["protocolConfiguration"] = json!({"serverProtocol": "HTTP"});
    body["requestHeaderConfiguration"] = json!({"requestHeaderAllowlist": ["X-Tenant"]});
    let created = ok(&s, Method::PUT, "/runtimes/", Some(body), 202).await;
    assert_eq!(created["status"], "CREATING");
    assert_eq!(created["agentRuntimeVersion"], "1");
    let id = created["agentRuntimeId"].as_str().expect("id").to_string();
    assert_eq!(
        created["agentRuntimeArn"],
        format!("arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/{id}")
    );
    let got = settled(&s, &id, "1").await;
    assert_eq!(got["status"], "READY", "{got}");
    assert_eq!(got["agentRuntimeName"], "echo_agent");
    assert_eq!(got["roleArn"], ROLE);
    assert_eq!(got["description"], "echoes");
    assert_eq!(
        got["requestHeaderConfiguration"]["requestHeaderAllowlist"],
        json!(["X-Tenant"])
    );
    assert_eq!(got["lifecycleConfiguration"]["maxLifetime"], 3600);

    // The version is a native runtime carrying the mapping.
    let native = ok(
        &s,
        Method::GET,
        &format!("/v1/runtimes/ac.{id}.v1"),
        None,
        200,
    )
    .await;
    assert_eq!(native["idle_timeout_s"], 300);
    assert_eq!(native["max_lifetime_s"], 3600);
    assert_eq!(native["workspace_path"], "/mnt/data");
    assert_eq!(native["env"]["GREETING"], "hi");
    assert_eq!(native["mounts"][0]["target"], "/mnt/skills");
    assert_eq!(
        native["mounts"][0]["source"],
        shared
            .path()
            .canonicalize()
            .expect("canonical")
            .display()
            .to_string()
    );
    assert!(s
        .data_dir
        .join(format!("agentcore/code/{id}/1/lib/helper.py"))
        .is_file());

    // Update → version 2; DEFAULT follows it.
    let mut update = spec("agents", "team/agent.zip", &python);
    update["environmentVariables"] = json!({"GREETING": "hello"});
    let updated = ok(
        &s,
        Method::PUT,
        &format!("/runtimes/{id}/"),
        Some(update),
        202,
    )
    .await;
    assert_eq!(updated["agentRuntimeVersion"], "2");
    assert_eq!(updated["status"], "UPDATING");
    assert_eq!(settled(&s, &id, "2").await["status"], "READY");
    let latest = ok(&s, Method::GET, &format!("/runtimes/{id}/"), None, 200).await;
    assert_eq!(latest["agentRuntimeVersion"], "2");
    assert_eq!(latest["environmentVariables"]["GREETING"], "hello");
    let default = ok(
        &s,
        Method::GET,
        &format!("/runtimes/{id}/runtime-endpoints/DEFAULT/"),
        None,
        200,
    )
    .await;
    assert_eq!(default["liveVersion"], "2");
    assert_eq!(default["status"], "READY");

    // An endpoint pinned to version 1 keeps serving it.
    let pinned = ok(
        &s,
        Method::PUT,
        &format!("/runtimes/{id}/runtime-endpoints/"),
        Some(json!({"name": "stable", "agentRuntimeVersion": "1"})),
        202,
    )
    .await;
    assert_eq!(pinned["targetVersion"], "1");
    assert_eq!(pinned["endpointName"], "stable");
    let stable = ok(
        &s,
        Method::GET,
        &format!("/runtimes/{id}/runtime-endpoints/stable/"),
        None,
        200,
    )
    .await;
    assert_eq!(
        (stable["liveVersion"].clone(), stable["status"].clone()),
        (json!("1"), json!("READY"))
    );

    // Versions, newest first, in pages of one.
    let page1 = ok(
        &s,
        Method::POST,
        &format!("/runtimes/{id}/versions/?maxResults=1"),
        None,
        200,
    )
    .await;
    assert_eq!(page1["agentRuntimes"][0]["agentRuntimeVersion"], "2");
    let token = page1["nextToken"].as_str().expect("nextToken");
    let page2 = ok(
        &s,
        Method::POST,
        &format!("/runtimes/{id}/versions/?maxResults=1&nextToken={token}"),
        None,
        200,
    )
    .await;
    assert_eq!(page2["agentRuntimes"][0]["agentRuntimeVersion"], "1");
    assert!(page2.get("nextToken").is_none());

    // ListAgentRuntimes pages through every runtime exactly once.
    let mut others = Vec::new();
    for i in 0..3 {
        let c = ok(
            &s,
            Method::PUT,
            "/runtimes/",
            Some(create_body(
                &format!("other{i}"),
                "agents",
                "team/agent.zip",
                &python,
            )),
            202,
        )
        .await;
        others.push(c["agentRuntimeId"].as_str().expect("id").to_string());
    }
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let path = match &next {
            Some(t) => format!("/runtimes/?maxResults=2&nextToken={t}"),
            None => "/runtimes/?maxResults=2".into(),
        };
        let page = ok(&s, Method::POST, &path, None, 200).await;
        for r in page["agentRuntimes"].as_array().expect("list") {
            seen.push(r["agentRuntimeId"].as_str().expect("id").to_string());
        }
        match page["nextToken"].as_str() {
            Some(t) => next = Some(t.to_string()),
            None => break,
        }
    }
    let mut expected = others.clone();
    expected.push(id.clone());
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);

    // Version 1 is pinned: refused until the endpoint is deleted.
    let refused = call(
        &s,
        Method::DELETE,
        &format!("/runtimes/{id}/?version=1"),
        None,
    )
    .await;
    assert_eq!(
        (refused.status, refused.error_type.as_deref()),
        (409, Some("ConflictException"))
    );
    let gone = ok(
        &s,
        Method::DELETE,
        &format!("/runtimes/{id}/runtime-endpoints/stable/"),
        None,
        202,
    )
    .await;
    assert_eq!(gone["endpointName"], "stable");
    let deleted = ok(
        &s,
        Method::DELETE,
        &format!("/runtimes/{id}/?version=1"),
        None,
        202,
    )
    .await;
    assert_eq!(
        deleted,
        json!({"status": "DELETING", "agentRuntimeId": id, "agentRuntimeVersion": "1"})
    );
    let missing = call(&s, Method::GET, &format!("/v1/runtimes/ac.{id}.v1"), None).await;
    assert_eq!(missing.status, 404);

    // The whole runtime.
    let deleted = ok(&s, Method::DELETE, &format!("/runtimes/{id}/"), None, 202).await;
    assert_eq!(deleted, json!({"status": "DELETING", "agentRuntimeId": id}));
    let after = call(&s, Method::GET, &format!("/runtimes/{id}/"), None).await;
    assert_eq!(
        (after.status, after.error_type.as_deref()),
        (404, Some("ResourceNotFoundException"))
    );
    assert_eq!(
        call(&s, Method::GET, &format!("/v1/runtimes/ac.{id}.v2"), None)
            .await
            .status,
        404
    );
    assert!(!s.data_dir.join(format!("agentcore/code/{id}")).exists());
}

#[tokio::test]
async fn failed_creations_say_why() {
    let Some(s) = Server::start("failed_creations_say_why").await else {
        return;
    };
    let (_, absent) = pythons();
    put_zip(&s, "agent.zip");

    // No such object.
    let c = ok(
        &s,
        Method::PUT,
        "/runtimes/",
        Some(create_body(
            "no_zip",
            "agents",
            "missing/agent.zip",
            &absent,
        )),
        202,
    )
    .await;
    let id = c["agentRuntimeId"].as_str().expect("id");
    let got = settled(&s, id, "1").await;
    assert_eq!(got["status"], "CREATE_FAILED");
    assert_eq!(
        got["failureReason"],
        "object s3://agents/missing/agent.zip does not exist in Berth's object store"
    );

    // No such bucket.
    let c = ok(
        &s,
        Method::PUT,
        "/runtimes/",
        Some(create_body("no_bucket", "elsewhere", "agent.zip", &absent)),
        202,
    )
    .await;
    let got = settled(&s, c["agentRuntimeId"].as_str().expect("id"), "1").await;
    assert_eq!(
        got["failureReason"],
        "bucket \"elsewhere\" does not exist in Berth's object store"
    );

    // A managed runtime the base image lacks.
    let c = ok(
        &s,
        Method::PUT,
        "/runtimes/",
        Some(create_body("no_python", "agents", "agent.zip", &absent)),
        202,
    )
    .await;
    let id = c["agentRuntimeId"].as_str().expect("id").to_string();
    let got = settled(&s, &id, "1").await;
    assert_eq!(got["status"], "CREATE_FAILED");
    let reason = got["failureReason"].as_str().expect("reason");
    assert!(
        reason.starts_with(&format!(
            "{absent} is not available in the base image; it has "
        )),
        "{reason}"
    );
    // Nothing is left of it but the record.
    assert_eq!(
        call(&s, Method::GET, &format!("/v1/runtimes/ac.{id}.v1"), None)
            .await
            .status,
        404
    );
    assert!(!s.data_dir.join(format!("agentcore/code/{id}/1")).exists());

    // The entry point must be in the zip.
    let mut body = create_body("no_entry", "agents", "agent.zip", &absent);
    body["agentRuntimeArtifact"]["codeConfiguration"]["entryPoint"] = json!(["app.py"]);
    let c = ok(&s, Method::PUT, "/runtimes/", Some(body), 202).await;
    let got = settled(&s, c["agentRuntimeId"].as_str().expect("id"), "1").await;
    assert_eq!(
        got["failureReason"],
        "entryPoint app.py is not a file in the code zip s3://agents/agent.zip"
    );

    // The DEFAULT endpoint reports the failed version.
    let ep = ok(
        &s,
        Method::GET,
        &format!("/runtimes/{id}/runtime-endpoints/DEFAULT/"),
        None,
        200,
    )
    .await;
    assert_eq!(ep["status"], "CREATE_FAILED");
}

#[tokio::test]
async fn bad_requests_get_aws_errors() {
    let Some(s) = Server::start("bad_requests_get_aws_errors").await else {
        return;
    };
    put_zip(&s, "agent.zip");
    let check = |a: &Answer, status: u16, code: &str| {
        assert_eq!(a.status, status, "{a:?}");
        assert_eq!(a.error_type.as_deref(), Some(code), "{a:?}");
        assert_eq!(a.content_type.as_deref(), Some("application/json"), "{a:?}");
        assert!(a.request_id.is_some(), "{a:?}");
        assert!(a.body["message"].is_string(), "{a:?}");
    };

    // 403: no credentials, or a token this server did not issue (AWS's codes).
    let a = send(reqwest::Client::new().post(format!("{}/runtimes/", s.url))).await;
    check(&a, 403, "MissingAuthenticationTokenException");
    let a = send(
        reqwest::Client::new()
            .post(format!("{}/runtimes/", s.url))
            .bearer_auth("berth_not_a_token"),
    )
    .await;
    check(&a, 403, "UnrecognizedClientException");

    // 400 ValidationException naming the wire paths.
    let mut body = create_body("bad-name", "agents", "agent.zip", "PYTHON_2_7");
    body["lifecycleConfiguration"] = json!({"idleRuntimeSessionTimeout": 30});
    body["networkConfiguration"] = json!({"networkMode": "VPC"});
    let a = call(&s, Method::PUT, "/runtimes/", Some(body)).await;
    check(&a, 400, "ValidationException");
    assert_eq!(a.body["reason"], "FieldValidationFailed");
    let names: Vec<&str> = a.body["fieldList"]
        .as_array()
        .expect("fieldList")
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "agentRuntimeName",
            "agentRuntimeArtifact.codeConfiguration.runtime",
            "networkConfiguration.networkMode",
            "lifecycleConfiguration.idleRuntimeSessionTimeout",
        ]
    );
    let vpc = a.body["fieldList"][2]["message"].as_str().expect("message");
    assert!(vpc.starts_with("not supported by Berth"), "{vpc}");

    // 400 CannotParse.
    let a = send(
        s.http(Method::PUT, "/runtimes/")
            .header("content-type", "application/json")
            .body("{"),
    )
    .await;
    check(&a, 400, "ValidationException");
    assert_eq!(a.body["reason"], "CannotParse");

    // 400 IdempotentParameterMismatchException.
    let mut body = create_body("idem", "agents", "agent.zip", "PYTHON_3_11");
    body["clientToken"] = json!("0123456789abcdef0123456789abcdef-0");
    let first = ok(&s, Method::PUT, "/runtimes/", Some(body.clone()), 202).await;
    let again = ok(&s, Method::PUT, "/runtimes/", Some(body.clone()), 202).await;
    assert_eq!(first, again);
    body["description"] = json!("other");
    let a = call(&s, Method::PUT, "/runtimes/", Some(body)).await;
    check(&a, 400, "ValidationException");
    assert_eq!(a.body["reason"], "IdempotentParameterMismatchException");

    // 409 ConflictException: the name is taken.
    let a = call(
        &s,
        Method::PUT,
        "/runtimes/",
        Some(create_body("idem", "agents", "agent.zip", "PYTHON_3_11")),
    )
    .await;
    check(&a, 409, "ConflictException");

    // 404 ResourceNotFoundException.
    let a = call(&s, Method::GET, "/runtimes/nothing-0123456789/", None).await;
    check(&a, 404, "ResourceNotFoundException");
    let a = call(&s, Method::DELETE, "/runtimes/nothing-0123456789/", None).await;
    check(&a, 404, "ResourceNotFoundException");
    let id = first["agentRuntimeId"].as_str().expect("id");
    let a = call(
        &s,
        Method::GET,
        &format!("/runtimes/{id}/runtime-endpoints/nope/"),
        None,
    )
    .await;
    check(&a, 404, "ResourceNotFoundException");

    // Unknown operations under /runtimes are AWS errors too; /v1 keeps its own format.
    let a = call(&s, Method::GET, "/runtimes/", None).await;
    check(&a, 404, "UnknownOperationException");
    let a = call(
        &s,
        Method::POST,
        &format!("/runtimes/{id}/nothing/here"),
        None,
    )
    .await;
    check(&a, 404, "UnknownOperationException");
    let a = call(&s, Method::GET, "/v1/nothing", None).await;
    assert_eq!(a.status, 404);
    assert!(a.error_type.is_none());
    assert!(a.body["error"]["code"].is_string());
}

#[tokio::test]
async fn records_survive_a_sigkill() {
    let Some(mut s) = Server::start("records_survive_a_sigkill").await else {
        return;
    };
    let (Some(python), _) = pythons() else {
        eprintln!("skipping: the host has no /usr/bin/python3.N for a READY runtime");
        return;
    };
    put_zip(&s, "agent.zip");
    let c = ok(
        &s,
        Method::PUT,
        "/runtimes/",
        Some(create_body("durable", "agents", "agent.zip", &python)),
        202,
    )
    .await;
    let id = c["agentRuntimeId"].as_str().expect("id").to_string();
    assert_eq!(settled(&s, &id, "1").await["status"], "READY");
    ok(
        &s,
        Method::PUT,
        &format!("/runtimes/{id}/runtime-endpoints/"),
        Some(json!({"name": "prod", "description": "production"})),
        202,
    )
    .await;

    s.kill_server();
    // Leave version 2 as a server killed while preparing it would: UPDATING.
    let store = berth_store::Store::open(&s.data_dir.join("state.db"))
        .await
        .expect("open the state db");
    let v = store
        .agentcore()
        .add_version(
            &id,
            &spec("agents", "agent.zip", &python).to_string(),
            "UPDATING",
            1,
        )
        .await
        .expect("add a version");
    assert_eq!(v, 2);
    store.close().await;
    s.restart().await;

    let v1 = ok(
        &s,
        Method::GET,
        &format!("/runtimes/{id}/?version=1"),
        None,
        200,
    )
    .await;
    assert_eq!(v1["status"], "READY");
    let v2 = ok(&s, Method::GET, &format!("/runtimes/{id}/"), None, 200).await;
    assert_eq!(v2["agentRuntimeVersion"], "2");
    assert_eq!(v2["status"], "UPDATE_FAILED");
    assert_eq!(
        v2["failureReason"],
        "interrupted by a server restart; update the runtime to retry"
    );
    let prod = ok(
        &s,
        Method::GET,
        &format!("/runtimes/{id}/runtime-endpoints/prod/"),
        None,
        200,
    )
    .await;
    assert_eq!(
        (prod["liveVersion"].clone(), prod["description"].clone()),
        (json!("1"), json!("production"))
    );
    assert_eq!(
        ok(
            &s,
            Method::GET,
            &format!("/v1/runtimes/ac.{id}.v1"),
            None,
            200
        )
        .await["name"],
        format!("ac.{id}.v1")
    );
    // The retry the reason suggests works.
    let r = ok(
        &s,
        Method::PUT,
        &format!("/runtimes/{id}/"),
        Some(spec("agents", "agent.zip", &python)),
        202,
    )
    .await;
    assert_eq!(r["agentRuntimeVersion"], "3");
    assert_eq!(settled(&s, &id, "3").await["status"], "READY");
}

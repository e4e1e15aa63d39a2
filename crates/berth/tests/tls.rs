//! HTTPS on the server's one port: a real `berth server`, reached with `curl` trusting
//! the CA the server generated in `<data-dir>/tls/ca.pem`, and with plain HTTP.

mod common;

use std::path::Path;

use common::{Server, BERTH};
use serde_json::Value;

/// Run curl; (stdout, stderr, exit code).
async fn curl(args: &[&str]) -> (String, String, i32) {
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "60"])
        .args(args)
        .output()
        .await
        .expect("run curl (is it installed?)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// curl that must succeed; its stdout.
async fn curl_ok(args: &[&str]) -> String {
    let (out, err, code) = curl(args).await;
    assert_eq!(code, 0, "curl {args:?} failed: {err}\n{out}");
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[tokio::test]
async fn https_and_http_share_the_port_and_the_ca_is_kept() {
    let test = "https_and_http_share_the_port_and_the_ca_is_kept";
    let Some(mut s) = Server::start_with(test, &["--tls-san", "berth.test"]).await else {
        return;
    };
    let ca = s.data_dir.join("tls/ca.pem");
    let ca_arg = path_str(&ca).to_string();
    assert!(
        s.log_text()
            .contains(&format!("clients trust {}", ca.display())),
        "the server says where the CA is:\n{}",
        s.log_text()
    );
    let https = format!("https://127.0.0.1:{}", s.port);

    // HTTPS, verified against ca.pem, by address and by the names the cert covers.
    let body = curl_ok(&["--cacert", &ca_arg, &format!("{https}/healthz")]).await;
    assert_eq!(body, "ok\n");
    for name in ["localhost", "berth.test"] {
        let resolve = format!("{name}:{}:127.0.0.1", s.port);
        let url = format!("https://{name}:{}/healthz", s.port);
        let body = curl_ok(&["--cacert", &ca_arg, "--resolve", &resolve, &url]).await;
        assert_eq!(body, "ok\n", "as {name}");
    }
    // A name it does not cover: curl refuses it (exit 60: peer certificate not OK).
    let resolve = format!("elsewhere.test:{}:127.0.0.1", s.port);
    let url = format!("https://elsewhere.test:{}/healthz", s.port);
    let (_, err, code) = curl(&["--cacert", &ca_arg, "--resolve", &resolve, &url]).await;
    assert_ne!(
        code, 0,
        "a name outside the certificate was accepted: {err}"
    );

    // HTTP/2 when curl offers it in ALPN, HTTP/1.1 when it does not.
    let proto = |flag: &'static str| {
        let (ca_arg, url) = (ca_arg.clone(), format!("{https}/healthz"));
        async move {
            curl_ok(&[
                flag,
                "--cacert",
                &ca_arg,
                "--output",
                "/dev/null",
                "--write-out",
                "%{http_version}",
                &url,
            ])
            .await
        }
    };
    assert_eq!(proto("--http2").await, "2");
    assert_eq!(proto("--http1.1").await, "1.1");

    // The authenticated API over HTTPS.
    let auth = format!("Authorization: Bearer {}", s.token);
    let info = curl_ok(&[
        "--fail",
        "--cacert",
        &ca_arg,
        "--header",
        &auth,
        &format!("{https}/v1/info"),
    ])
    .await;
    let info: Value = serde_json::from_str(&info).expect("/v1/info is JSON");
    assert!(info.is_object(), "{info}");
    let denied = curl_ok(&[
        "--cacert",
        &ca_arg,
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code}",
        &format!("{https}/v1/info"),
    ])
    .await;
    assert_eq!(denied, "401");

    // Plain HTTP on the same port, through the harness's client and the CLI.
    let r = s
        .http(reqwest::Method::GET, "/v1/info")
        .send()
        .await
        .expect("plain HTTP");
    assert_eq!(r.status(), 200);
    s.cli_ok(&["runtime", "list"]).await;

    // A restart reuses the CA and the server certificate.
    let before = tls_files(&s.data_dir);
    assert!(s.stop_server(), "the server stops on SIGTERM");
    s.restart().await;
    assert_eq!(tls_files(&s.data_dir), before, "certificates kept");
    let body = curl_ok(&["--cacert", &ca_arg, &format!("{https}/healthz")]).await;
    assert_eq!(body, "ok\n");
}

fn tls_files(data_dir: &Path) -> Vec<Vec<u8>> {
    ["ca.pem", "ca.key", "server.pem", "server.key"]
        .iter()
        .map(|f| std::fs::read(data_dir.join("tls").join(f)).expect("tls file"))
        .collect()
}

#[tokio::test]
async fn the_operators_certificate_is_served() {
    let test = "the_operators_certificate_is_served";
    if common::skip_unless_root(test) {
        return;
    }
    // The operator's certificate: one from another server's generated CA.
    let Some(issuer) = Server::start(test).await else {
        return;
    };
    let own = tempfile::tempdir().expect("temp dir");
    for f in ["ca.pem", "server.pem", "server.key"] {
        std::fs::copy(issuer.data_dir.join("tls").join(f), own.path().join(f)).expect("copy");
    }
    drop(issuer);
    let (cert, key) = (own.path().join("server.pem"), own.path().join("server.key"));
    let Some(s) = Server::start_with(
        test,
        &["--tls-cert", path_str(&cert), "--tls-key", path_str(&key)],
    )
    .await
    else {
        return;
    };
    assert!(
        s.log_text()
            .contains(&format!("HTTPS on the same port with {}", cert.display())),
        "{}",
        s.log_text()
    );
    assert!(!s.data_dir.join("tls").exists(), "no CA generated");
    let ca = own.path().join("ca.pem");
    let url = format!("https://127.0.0.1:{}/healthz", s.port);
    assert_eq!(curl_ok(&["--cacert", path_str(&ca), &url]).await, "ok\n");
}

#[tokio::test]
async fn server_info_and_help_tell_where_the_ca_is() {
    let help = std::process::Command::new(BERTH)
        .args(["server", "--help"])
        .output()
        .expect("berth server --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for want in [
        "--tls-cert",
        "--tls-key",
        "--tls-san",
        "ca.pem",
        "AWS_CA_BUNDLE",
    ] {
        assert!(help.contains(want), "--help lacks {want}:\n{help}");
    }

    if common::skip_unless_root("server_info_and_help_tell_where_the_ca_is") {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let out = tokio::process::Command::new(BERTH)
        .arg("server")
        .arg("--info")
        .arg("--data-dir")
        .arg(&data)
        .env_remove("BERTH_DATA_DIR")
        .output()
        .await
        .expect("berth server --info");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = data.canonicalize().expect("data dir").join("tls/ca.pem");
    assert!(
        stdout.contains(&ca.display().to_string()),
        "--info names {}:\n{stdout}",
        ca.display()
    );
}

//! `berth server` refuses a data dir the sandboxes' mapped users cannot reach (an
//! ancestor without o+x), instead of failing every session's start later with
//! libcontainer's "failed to prepare rootfs"; `--info` reports it and exits 0.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{BERTH, DEADLINE};

/// `<root>/closed/data` with `closed` 0700 and `root` 0755; returns (closed, data dir).
fn closed_parent(root: &Path) -> (PathBuf, PathBuf) {
    let chmod = |dir: &Path, mode: u32| {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    let root = root.canonicalize().expect("temp dir");
    chmod(&root, 0o755);
    let closed = root.join("closed");
    std::fs::create_dir(&closed).expect("mkdir");
    chmod(&closed, 0o700);
    (closed.clone(), closed.join("data"))
}

fn server(data_dir: &Path, extra: &[&str]) -> tokio::process::Command {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut c = tokio::process::Command::new(BERTH);
    c.arg("server")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(extra)
        .env_remove("BERTH_DATA_DIR")
        .env_remove("BERTH_LISTEN")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A server that did start is killed when the timeout below drops it.
        .kill_on_drop(true);
    c
}

#[tokio::test]
async fn server_refuses_a_data_dir_sandboxes_cannot_reach() {
    let test = "server_refuses_a_data_dir_sandboxes_cannot_reach";
    if common::skip_unless_root(test) {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("berth-it-")
        .tempdir()
        .expect("temp dir");
    let (closed, data_dir) = closed_parent(tmp.path());

    let out = tokio::time::timeout(DEADLINE, server(&data_dir, &[]).output())
        .await
        .expect("berth server must exit by itself, not serve")
        .expect("run berth server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(berth::EXIT_BERTH_ERROR)),
        "{stderr}"
    );
    let want = format!(
        "berth: the data dir {} is not reachable by sandboxed users: {} has mode 0700; ",
        data_dir.display(),
        closed.display()
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with(&want) && stderr.contains(&format!("chmod o+x {}\n", closed.display())),
        "want {want:?}…chmod o+x {}, got: {stderr}",
        closed.display()
    );
    // Refused before the sandbox drivers prepared anything (or made spare images).
    assert!(!data_dir.join("run").exists(), "the driver ran");

    // `--info` describes the host, the problem included, and succeeds.
    let out = tokio::time::timeout(DEADLINE, server(&data_dir, &["--info"]).output())
        .await
        .expect("berth server --info exits")
        .expect("run berth server --info");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "data dir unusable: {}",
            want.trim_start_matches("berth: ")
        )),
        "{stdout}"
    );

    // With o+x on the parent the same data dir is accepted.
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let out = tokio::time::timeout(DEADLINE, server(&data_dir, &["--info"]).output())
        .await
        .expect("berth server --info exits")
        .expect("run berth server --info");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(!stdout.contains("data dir unusable"), "{stdout}");
}

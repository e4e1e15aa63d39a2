//! The `berth` CLI against a real server: exec, exit codes, streams, cp, session list.

mod common;

use common::{uniq, Server};

#[tokio::test]
async fn exec_works_on_a_fresh_server_with_no_other_step() {
    let Some(s) = Server::start("exec_works_on_a_fresh_server_with_no_other_step").await else {
        return;
    };
    let session = uniq("my-task");
    let (out, err, code) = s
        .cli(&["exec", "--session", &session, "--", "uname", "-a"])
        .await;
    let out = String::from_utf8_lossy(&out);
    assert_eq!(
        code,
        0,
        "stdout: {out}\nstderr: {}",
        String::from_utf8_lossy(&err)
    );
    assert!(out.starts_with("Linux "), "uname -a printed {out:?}");
    // The session was created on first use, on the default runtime.
    let sess = s
        .client
        .get_session(&session)
        .await
        .expect("session exists");
    assert_eq!(sess.runtime, "default");
}

#[tokio::test]
async fn exec_propagates_exit_codes_and_signals() {
    let Some(s) = Server::start("exec_propagates_exit_codes_and_signals").await else {
        return;
    };
    let session = uniq("codes");
    let (_, _, code) = s
        .cli(&["exec", "-s", &session, "--", "sh", "-c", "exit 7"])
        .await;
    assert_eq!(code, 7);
    let (_, _, code) = s
        .cli(&["exec", "-s", &session, "--", "sh", "-c", "kill -TERM $$"])
        .await;
    assert_eq!(code, 128 + 15, "killed by SIGTERM → 143");
    let (_, _, code) = s
        .cli(&["exec", "-s", &session, "--", "sh", "-c", "kill -KILL $$"])
        .await;
    assert_eq!(code, 128 + 9);
    let (_, _, code) = s.cli(&["exec", "-s", &session, "--", "true"]).await;
    assert_eq!(code, 0);
    // The API reports the same facts structurally.
    let o = s.exec(&session, "kill -TERM $$").await;
    assert_eq!(
        (o.code, o.signal, o.timed_out),
        (None, Some(15), false),
        "{o:?}"
    );
    let o = s.exec(&session, "exit 7").await;
    assert_eq!((o.code, o.signal), (Some(7), None), "{o:?}");
}

#[tokio::test]
async fn exec_sends_stdout_and_stderr_to_the_matching_streams() {
    let Some(s) = Server::start("exec_sends_stdout_and_stderr_to_the_matching_streams").await
    else {
        return;
    };
    let session = uniq("streams");
    let (out, err, code) = s
        .cli(&[
            "exec",
            "-s",
            &session,
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; echo more-out; echo more-err >&2",
        ])
        .await;
    assert_eq!(code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "to-out\nmore-out\n");
    assert_eq!(String::from_utf8_lossy(&err), "to-err\nmore-err\n");
    // Arguments survive unchanged (no re-splitting by a shell).
    let (out, _, code) = s
        .cli(&[
            "exec", "-s", &session, "--", "printf", "[%s]", "a b", "$HOME", "'q'",
        ])
        .await;
    assert_eq!(code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "[a b][$HOME]['q']");
    // stdin is passed with -i.
    let mut cmd = s.cli_command(&["exec", "-s", &session, "-i", "--", "wc", "-c"]);
    cmd.stdin(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&[7u8; 12345]).await.expect("write stdin");
    }
    let out = child.wait_with_output().await.expect("wait");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "12345");
}

fn write_tree(root: &std::path::Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).expect("mkdir");
    std::fs::write(root.join("a.txt"), b"alpha\n").expect("write");
    let bin: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(root.join("sub/bin.dat"), &bin).expect("write");
    std::fs::write(root.join("sub/deeper/empty"), b"").expect("write");
    std::fs::write(root.join("sub/deeper/z"), b"\0\xff\n").expect("write");
}

/// (relative path, bytes) of every regular file under `root`, sorted.
fn read_tree(root: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .expect("prefix")
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn cp_copies_files_and_directories_both_ways_byte_exact() {
    let Some(s) = Server::start("cp_copies_files_and_directories_both_ways_byte_exact").await
    else {
        return;
    };
    let rt = s.runtime(&uniq("rt"), |_| {}).await;
    let session = s.session(&uniq("cp"), &rt).await;
    let local = tempfile::tempdir().expect("tmp");

    // A file, up and down.
    let file: Vec<u8> = (0..=255u8).cycle().take(3 << 20).collect();
    let up = local.path().join("file.bin");
    std::fs::write(&up, &file).expect("write");
    s.cli_ok(&[
        "cp",
        up.to_str().expect("utf8"),
        &format!("{session}:/mnt/workspace/file.bin"),
    ])
    .await;
    let sum = s
        .exec(&session, "sha256sum /mnt/workspace/file.bin")
        .await
        .ok()
        .out();
    assert!(sum.starts_with(&sha256_hex(&file)), "inside: {sum}");
    let down = local.path().join("back.bin");
    s.cli_ok(&[
        "cp",
        &format!("{session}:/mnt/workspace/file.bin"),
        down.to_str().expect("utf8"),
    ])
    .await;
    assert!(
        std::fs::read(&down).expect("read") == file,
        "file round trip differs"
    );

    // A directory, up and down.
    let tree = local.path().join("tree");
    write_tree(&tree);
    s.cli_ok(&[
        "cp",
        tree.to_str().expect("utf8"),
        &format!("{session}:/mnt/workspace/up"),
    ])
    .await;
    let listing = s
        .exec(
            &session,
            "cd /mnt/workspace/up && find . -type f | sort && sha256sum sub/bin.dat",
        )
        .await
        .ok()
        .out();
    assert!(
        listing.contains("./a.txt") && listing.contains("./sub/deeper/z"),
        "{listing}"
    );
    // Made inside the sandbox, copied out.
    s.exec(
        &session,
        "mkdir -p /mnt/workspace/made/x && printf 'inside\\n' > /mnt/workspace/made/x/f && head -c 70000 /dev/urandom > /mnt/workspace/made/r",
    )
    .await
    .ok();
    let out_dir = local.path().join("out");
    s.cli_ok(&[
        "cp",
        &format!("{session}:/mnt/workspace/made"),
        out_dir.to_str().expect("utf8"),
    ])
    .await;
    let got = read_tree(&out_dir);
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["r", "x/f"], "downloaded tree");
    assert_eq!(got[1].1, b"inside\n");
    let inside = s
        .exec(&session, "sha256sum /mnt/workspace/made/r")
        .await
        .ok()
        .out();
    assert!(
        inside.starts_with(&sha256_hex(&got[0].1)),
        "binary file in dir differs"
    );

    // The uploaded directory comes back identical.
    let back = local.path().join("back-tree");
    s.cli_ok(&[
        "cp",
        &format!("{session}:/mnt/workspace/up"),
        back.to_str().expect("utf8"),
    ])
    .await;
    assert_eq!(
        read_tree(&back),
        read_tree(&tree),
        "directory round trip differs"
    );
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn exec_binary_output_through_the_cli_is_byte_exact() {
    let Some(s) = Server::start("exec_binary_output_through_the_cli_is_byte_exact").await else {
        return;
    };
    let session = uniq("clibin");
    // The CLI takes the binary frame stream (no base64); random bytes include every
    // byte value and the frame header's own bytes.
    let (out, err, code) = s
        .cli(&[
            "exec",
            "-s",
            &session,
            "--",
            "sh",
            "-c",
            "head -c 30M /dev/urandom | tee /mnt/workspace/r",
        ])
        .await;
    assert_eq!(code, 0, "stderr: {}", String::from_utf8_lossy(&err));
    assert_eq!(out.len(), 30 << 20);
    let inside = s
        .exec(&session, "sha256sum /mnt/workspace/r")
        .await
        .ok()
        .out();
    assert!(inside.starts_with(&sha256_hex(&out)), "inside: {inside}");
}

#[tokio::test]
async fn ctrl_c_reaches_the_remote_command_as_sigint() {
    use tokio::io::AsyncReadExt;
    let Some(s) = Server::start("ctrl_c_reaches_the_remote_command_as_sigint").await else {
        return;
    };
    let session = uniq("ctrlc");
    let mut child = s
        .cli_command(&[
            "exec",
            "-s",
            &session,
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.1; done",
        ])
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(common::DEADLINE, stdout.read(&mut buf))
            .await
            .expect("ready")
            .expect("read");
        assert!(n > 0, "CLI ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // What a terminal does on Ctrl+C: SIGINT to the CLI's process.
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("kill");
    tokio::time::timeout(common::DEADLINE, stdout.read_to_end(&mut seen))
        .await
        .expect("the CLI exits after Ctrl+C")
        .expect("read rest");
    let status = tokio::time::timeout(common::DEADLINE, child.wait())
        .await
        .expect("exit")
        .expect("wait");
    assert!(
        String::from_utf8_lossy(&seen).contains("got-int"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(
        status.code(),
        Some(7),
        "the remote trap's exit code is the CLI's"
    );
}

//! End-to-end tests of the guest agent: each test starts the agent as a separate process
//! (this test binary re-executed into `agent_process`), connects over its unix socket
//! with the real client and drives it through the protocol. No root needed.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_guest::client::Guest;
use berth_guest::proto::{
    exec_input, exec_output, write_file_input, Empty, ExecInput, ExecStart, Exited, PathRequest,
    ReadFileRequest, WriteFileInput, WriteTarget,
};
use bytes::Bytes;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use common::TestAgent;

/// Not a test: the agent process of the other tests (see `common::TestAgent`).
#[test]
fn agent_process() {
    common::agent_process_entry();
}

fn sh(script: &str) -> ExecStart {
    ExecStart {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

fn start_msg(start: ExecStart) -> ExecInput {
    ExecInput {
        kind: Some(exec_input::Kind::Start(start)),
    }
}

#[derive(Debug, Default)]
struct Run {
    pid: u32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exited: Option<Exited>,
}

async fn collect(mut out: tonic::Streaming<berth_guest::proto::ExecOutput>) -> Run {
    let mut run = Run::default();
    while let Some(msg) = out.message().await.unwrap() {
        assert!(run.exited.is_none(), "output after exited");
        match msg.kind.unwrap() {
            exec_output::Kind::Started(s) => run.pid = s.pid,
            exec_output::Kind::Stdout(b) => run.stdout.extend_from_slice(&b),
            exec_output::Kind::Stderr(b) => run.stderr.extend_from_slice(&b),
            exec_output::Kind::Exited(e) => run.exited = Some(e),
        }
    }
    assert!(run.exited.is_some(), "no exited message");
    run
}

/// Run to completion with the input stream closed right after `start`.
async fn run(guest: &mut Guest, start: ExecStart) -> Run {
    let input = tokio_stream::iter(vec![start_msg(start)]);
    collect(guest.exec(input).await.unwrap().into_inner()).await
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Wait (bounded, generously) for a pid to disappear.
async fn wait_gone(pid: i32) -> bool {
    for _ in 0..1000 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn read_pid_file(path: &Path) -> i32 {
    for _ in 0..1000 {
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(pid) = s.trim().parse() {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no pid in {}", path.display());
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn exit_code_and_output_streams() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let r = run(
        &mut guest,
        sh("echo out; echo err >&2; printf more; exit 3"),
    )
    .await;
    assert_eq!(r.stdout, b"out\nmore");
    assert_eq!(r.stderr, b"err\n");
    let e = r.exited.unwrap();
    assert_eq!((e.code, e.signal, e.timed_out), (Some(3), None, false));
    assert!(r.pid > 0);

    let r = run(&mut guest, sh("kill -TERM $$")).await;
    let e = r.exited.unwrap();
    assert_eq!((e.code, e.signal), (None, Some(15)));

    // env overlay and cwd
    let mut start = sh("echo \"$BERTH_X:$(pwd)\"; test -n \"$PATH\"");
    start.env.insert("BERTH_X".into(), "yes".into());
    start.cwd = "/tmp".into();
    let r = run(&mut guest, start).await;
    assert_eq!(r.stdout, b"yes:/tmp\n");
    assert_eq!(r.exited.unwrap().code, Some(0));

    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let health = guest.health(Empty {}).await.unwrap().into_inner();
    assert_eq!(health.pid, agent.pid());
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn exec_errors_are_clear() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;

    let mut start = sh("true");
    start.cwd = "/no/such/dir".into();
    let err = guest
        .exec(tokio_stream::iter(vec![start_msg(start)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("/no/such/dir"), "{err}");

    let mut start = sh("true");
    start.cwd = "relative".into();
    let err = guest
        .exec(tokio_stream::iter(vec![start_msg(start)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let start = ExecStart {
        argv: vec!["/no/such/binary".into()],
        ..Default::default()
    };
    let err = guest
        .exec(tokio_stream::iter(vec![start_msg(start)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("/no/such/binary"), "{err}");

    let not_start = ExecInput {
        kind: Some(exec_input::Kind::Signal(9)),
    };
    let err = guest
        .exec(tokio_stream::iter(vec![not_start]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The agent is still fine afterwards.
    assert_eq!(
        run(&mut guest, sh("exit 0")).await.exited.unwrap().code,
        Some(0)
    );
}

#[tokio::test]
async fn binary_output_is_byte_exact() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let file = agent.path("random");
    let r = run(
        &mut guest,
        sh(&format!(
            "head -c 10M /dev/urandom | tee {}",
            file.display()
        )),
    )
    .await;
    assert_eq!(r.exited.unwrap().code, Some(0));
    let expected = std::fs::read(&file).unwrap();
    assert_eq!(expected.len(), 10 << 20);
    assert!(r.stdout == expected, "stdout differs from the file");
}

#[tokio::test]
async fn stdin_signal_and_clean_end() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;

    // Bytes, then close_stdin, with the input stream still open.
    let (tx, rx) = mpsc::channel(8);
    let mut start = sh("cat; echo end");
    start.stdin = true;
    tx.send(start_msg(start)).await.unwrap();
    for part in ["hello ", "world"] {
        tx.send(ExecInput {
            kind: Some(exec_input::Kind::Stdin(Bytes::from(part))),
        })
        .await
        .unwrap();
    }
    tx.send(ExecInput {
        kind: Some(exec_input::Kind::CloseStdin(Empty {})),
    })
    .await
    .unwrap();
    let out = guest
        .exec(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = collect(out).await;
    drop(tx);
    assert_eq!(r.stdout, b"hello worldend\n");
    assert_eq!(r.exited.unwrap().code, Some(0));

    // A clean end of the input stream closes stdin and does not kill the process.
    let mut start = sh("sleep 0.3; cat; echo ok");
    start.stdin = true;
    let input = vec![
        start_msg(start),
        ExecInput {
            kind: Some(exec_input::Kind::Stdin(Bytes::from_static(b"abc"))),
        },
    ];
    let out = guest
        .exec(tokio_stream::iter(input))
        .await
        .unwrap()
        .into_inner();
    let r = collect(out).await;
    assert_eq!(r.stdout, b"abcok\n");
    assert_eq!(r.exited.unwrap().code, Some(0));

    // Signals reach the process group.
    let (tx, rx) = mpsc::channel(8);
    tx.send(start_msg(sh("sleep 1000"))).await.unwrap();
    let mut out = guest
        .exec(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = out.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(exec_output::Kind::Started(_))));
    tx.send(ExecInput {
        kind: Some(exec_input::Kind::Signal(15)),
    })
    .await
    .unwrap();
    let r = collect(out).await;
    assert_eq!(r.exited.unwrap().signal, Some(15));
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let pid_file = agent.path("grandchild.pid");
    let mut start = sh(&format!(
        "sleep 1000 & echo $! > {}; wait",
        pid_file.display()
    ));
    start.timeout_ms = 300;
    let r = run(&mut guest, start).await;
    let e = r.exited.unwrap();
    assert!(e.timed_out);
    assert_eq!(e.signal, Some(9));
    let grandchild = read_pid_file(&pid_file).await;
    assert!(wait_gone(grandchild).await, "grandchild sleep survived");
}

#[tokio::test]
async fn cancel_kills_the_process() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(start_msg(ExecStart {
        argv: vec!["sleep".into(), "1000".into()],
        ..Default::default()
    }))
    .await
    .unwrap();
    let mut out = guest
        .exec(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let pid = match out.message().await.unwrap().unwrap().kind {
        Some(exec_output::Kind::Started(s)) => s.pid as i32,
        other => panic!("unexpected {other:?}"),
    };
    assert!(alive(pid));
    drop(out);
    drop(tx);
    assert!(wait_gone(pid).await, "cancelled process survived");
}

#[tokio::test]
async fn background_daemon_survives_and_exec_returns() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let pid_file = agent.path("daemon.pid");
    let begin = Instant::now();
    // The daemon inherits stdout and stderr and keeps them open.
    let r = run(
        &mut guest,
        sh(&format!(
            "sleep 1000 & echo $! > {}; echo started",
            pid_file.display()
        )),
    )
    .await;
    eprintln!("exec with a daemon returned after {:?}", begin.elapsed());
    assert_eq!(r.stdout, b"started\n");
    assert_eq!(r.exited.unwrap().code, Some(0));
    let daemon = read_pid_file(&pid_file).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(daemon), "daemon was killed on normal exit");
    // Shutdown kills it.
    guest.shutdown(Empty {}).await.unwrap();
    assert!(wait_gone(daemon).await, "shutdown left the daemon running");
}

#[tokio::test]
async fn shutdown_exits_the_agent() {
    let mut agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(start_msg(sh("sleep 1000"))).await.unwrap();
    let mut out = guest
        .exec(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let pid = match out.message().await.unwrap().unwrap().kind {
        Some(exec_output::Kind::Started(s)) => s.pid as i32,
        other => panic!("unexpected {other:?}"),
    };
    guest.shutdown(Empty {}).await.unwrap();
    assert!(wait_gone(pid).await);
    let status = tokio::task::spawn_blocking(move || {
        let status = agent.child.wait().unwrap();
        (agent, status)
    })
    .await
    .unwrap()
    .1;
    assert!(status.success(), "{status:?}");
    drop(tx);
}

#[tokio::test]
async fn slow_reader_keeps_memory_bounded() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(start_msg(sh("cat /dev/zero"))).await.unwrap();
    let mut out = guest
        .exec(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut pid = 0;
    let mut received = 0usize;
    let mut max_rss = 0;
    for i in 0..150 {
        match out.message().await.unwrap().unwrap().kind.unwrap() {
            exec_output::Kind::Started(s) => pid = s.pid as i32,
            exec_output::Kind::Stdout(b) => received += b.len(),
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        if i % 10 == 0 {
            max_rss = max_rss.max(vm_rss_kib(agent.pid()));
        }
    }
    eprintln!("slow reader: received {received} bytes, agent max VmRSS {max_rss} KiB");
    assert!(max_rss < 64 * 1024, "agent RSS {max_rss} KiB");
    drop(out);
    drop(tx);
    assert!(wait_gone(pid).await);
}

async fn write_file(guest: &mut Guest, target: WriteTarget, data: Vec<u8>) -> u64 {
    let chunks: Vec<Bytes> = data.chunks(100_000).map(Bytes::copy_from_slice).collect();
    berth_guest::client::write_file(guest, target, tokio_stream::iter(chunks))
        .await
        .unwrap()
}

async fn read_file(guest: &mut Guest, path: &Path, tar: bool) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = guest
        .read_file(ReadFileRequest {
            path: path.to_str().unwrap().into(),
            tar,
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await? {
        assert!(chunk.data.len() <= 256 * 1024);
        data.extend_from_slice(&chunk.data);
    }
    Ok(data)
}

fn path_req(path: &Path) -> PathRequest {
    PathRequest {
        path: path.to_str().unwrap().into(),
    }
}

#[tokio::test]
async fn file_round_trip() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;

    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = agent.path("a/b/c.bin");
    let n = write_file(
        &mut guest,
        WriteTarget {
            path: file.to_str().unwrap().into(),
            tar: false,
            mode: 0o600,
        },
        data.clone(),
    )
    .await;
    assert_eq!(n, data.len() as u64);
    assert_eq!(std::fs::read(&file).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(read_file(&mut guest, &file, false).await.unwrap(), data);

    let info = guest.stat(path_req(&file)).await.unwrap().into_inner();
    assert_eq!(
        (info.name.as_str(), info.kind.as_str(), info.size, info.mode),
        ("c.bin", "file", data.len() as u64, 0o600)
    );
    assert!(info.modified_ms > 0);

    // Overwrite atomically; no temp files left behind.
    write_file(
        &mut guest,
        WriteTarget {
            path: file.to_str().unwrap().into(),
            ..Default::default()
        },
        b"short".to_vec(),
    )
    .await;
    assert_eq!(std::fs::read(&file).unwrap(), b"short");
    let names: Vec<String> = guest
        .list_dir(path_req(&agent.path("a/b")))
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["c.bin"]);

    // Without the final `end` nothing is written.
    let unfinished = agent.path("unfinished");
    let req = vec![
        WriteFileInput {
            kind: Some(write_file_input::Kind::Target(WriteTarget {
                path: unfinished.to_str().unwrap().into(),
                ..Default::default()
            })),
        },
        WriteFileInput {
            kind: Some(write_file_input::Kind::Data(Bytes::from_static(b"data"))),
        },
    ];
    let err = guest.write_file(tokio_stream::iter(req)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(!unfinished.exists());

    // Errors name the path.
    let missing = agent.path("missing");
    let err = read_file(&mut guest, &missing, false).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("missing"), "{err}");
    let err = read_file(&mut guest, &agent.path("a"), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("tar"), "{err}");
    let err = guest.stat(path_req(&missing)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn tar_round_trip_keeps_symlinks() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let src = agent.path("src/project");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("z.txt"), b"zed").unwrap();
    std::fs::write(src.join("a.txt"), b"ay").unwrap();
    std::fs::write(src.join("sub/deeper/big.bin"), vec![42u8; 700_000]).unwrap();
    std::os::unix::fs::symlink("../a.txt", src.join("sub/link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("abs-link")).unwrap();

    let names: Vec<(String, String)> = guest
        .list_dir(path_req(&src))
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| (e.name, e.kind))
        .collect();
    let expect = [
        ("a.txt", "file"),
        ("abs-link", "symlink"),
        ("sub", "dir"),
        ("z.txt", "file"),
    ];
    let expect: Vec<(String, String)> = expect
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(names, expect);

    let archive = read_file(&mut guest, &src, true).await.unwrap();
    let mut top = std::collections::BTreeSet::new();
    for entry in tar::Archive::new(archive.as_slice()).entries().unwrap() {
        let entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        top.insert(path.components().next().unwrap().as_os_str().to_owned());
    }
    assert_eq!(top.len(), 1);
    assert_eq!(top.into_iter().next().unwrap(), "project");

    let dst = agent.path("dst");
    let n = write_file(
        &mut guest,
        WriteTarget {
            path: dst.to_str().unwrap().into(),
            tar: true,
            mode: 0,
        },
        archive.clone(),
    )
    .await;
    assert_eq!(n, archive.len() as u64);
    let out = dst.join("project");
    assert_eq!(std::fs::read(out.join("z.txt")).unwrap(), b"zed");
    assert_eq!(
        std::fs::read(out.join("sub/deeper/big.bin")).unwrap(),
        vec![42u8; 700_000]
    );
    let link = out.join("sub/link");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("../a.txt"));
    assert_eq!(
        std::fs::read_link(out.join("abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );

    // A single file as tar, and a symlink as tar stays a symlink.
    let archive = read_file(&mut guest, &src.join("z.txt"), true)
        .await
        .unwrap();
    let mut ar = tar::Archive::new(archive.as_slice());
    let entry = ar.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(entry.path().unwrap(), Path::new("z.txt"));
    let archive = read_file(&mut guest, &src.join("abs-link"), true)
        .await
        .unwrap();
    let mut ar = tar::Archive::new(archive.as_slice());
    let entry = ar.entries().unwrap().next().unwrap().unwrap();
    assert!(entry.header().entry_type().is_symlink());
}

#[tokio::test]
async fn tar_unpack_refuses_escapes() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    // Hand-made header: the tar crate's builder refuses `..` itself.
    let mut header = tar::Header::new_old();
    let name = b"../escaped.txt";
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut archive = header.as_bytes().to_vec();
    archive.extend_from_slice(b"evil");
    archive.resize(archive.len() + 508 + 1024, 0);
    let dst = agent.path("into");
    let req = vec![
        WriteFileInput {
            kind: Some(write_file_input::Kind::Target(WriteTarget {
                path: dst.to_str().unwrap().into(),
                tar: true,
                mode: 0,
            })),
        },
        WriteFileInput {
            kind: Some(write_file_input::Kind::Data(archive.into())),
        },
        WriteFileInput {
            kind: Some(write_file_input::Kind::End(Empty {})),
        },
    ];
    // The tar crate skips the entry; the archive is otherwise fine.
    let _ = guest.write_file(tokio_stream::iter(req)).await;
    assert!(!agent.path("escaped.txt").exists());
    assert!(dst.is_dir());
}

#[tokio::test]
async fn relative_and_dotdot_paths_are_rejected() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    for path in ["relative/file", "", "/tmp/../etc/passwd"] {
        let req = PathRequest { path: path.into() };
        let err = guest.stat(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}");
        let err = guest.list_dir(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}");
        let err = read_file(&mut guest, Path::new(path), false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}");
        let req = vec![WriteFileInput {
            kind: Some(write_file_input::Kind::Target(WriteTarget {
                path: path.into(),
                ..Default::default()
            })),
        }];
        let err = guest.write_file(tokio_stream::iter(req)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}");
    }
}

/// `cargo test --release -p berth-guest --test agent -- --ignored --nocapture throughput`
#[tokio::test]
#[ignore = "benchmark"]
async fn throughput() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    for _ in 0..3 {
        let agent_cpu = cpu_secs(agent.pid());
        let client_cpu = cpu_secs(std::process::id());
        let begin = Instant::now();
        let input = tokio_stream::iter(vec![start_msg(sh("head -c 1G /dev/zero"))]);
        let mut out = guest.exec(input).await.unwrap().into_inner();
        let mut bytes = 0usize;
        let mut chunks = 0usize;
        while let Some(msg) = out.message().await.unwrap() {
            if let Some(exec_output::Kind::Stdout(b)) = msg.kind {
                bytes += b.len();
                chunks += 1;
            }
        }
        let secs = begin.elapsed().as_secs_f64();
        assert_eq!(bytes, 1 << 30);
        let agent_cpu = cpu_secs(agent.pid()) - agent_cpu;
        let client_cpu = cpu_secs(std::process::id()) - client_cpu;
        println!(
            "exec stdout: {bytes} bytes in {secs:.3} s = {:.2} GB/s ({chunks} chunks); \
             cpu: agent+command {agent_cpu:.2} s, client {client_cpu:.2} s",
            bytes as f64 / secs / 1e9
        );
    }
}

/// utime + stime + reaped children's, in seconds (assumes 100 ticks per second).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // Fields after the command name start at field 3 (state); utime is field 14.
    let ticks: u64 = fields[11..15]
        .iter()
        .map(|f| f.parse::<u64>().unwrap())
        .sum();
    ticks as f64 / 100.0
}

/// Streams the host is not reading must not starve the others on the same connection
/// (HTTP/2 connection-level flow control).
#[tokio::test]
async fn stalled_streams_do_not_block_others() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let (tx, rx) = mpsc::channel(8);
        tx.send(start_msg(sh("cat /dev/zero"))).await.unwrap();
        let out = guest
            .exec(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        stalled.push((tx, out));
    }
    // Give them time to fill every window they can.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let check = async {
        guest.health(Empty {}).await.unwrap();
        run(&mut guest, sh("echo alive")).await
    };
    let r = tokio::time::timeout(Duration::from_secs(30), check)
        .await
        .expect("a stalled stream blocked the connection");
    assert_eq!(r.stdout, b"alive\n");
    drop(stalled);
}

/// Orphans (re-parented to the agent) are reaped: no zombies accumulate.
#[tokio::test]
async fn orphans_are_reaped() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    for _ in 0..5 {
        // The backgrounded sleep outlives its shell and is re-parented to the agent.
        let r = run(&mut guest, sh("sleep 0.2 >/dev/null 2>&1 & exit 0")).await;
        assert_eq!(r.exited.unwrap().code, Some(0));
    }
    let agent_pid = agent.pid().to_string();
    let mut zombies = Vec::new();
    for _ in 0..500 {
        zombies = children_in_state(&agent_pid, 'Z');
        let all = children_in_state(&agent_pid, '*');
        if zombies.is_empty() && all.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(zombies.is_empty(), "zombie children: {zombies:?}");
}

/// Pids whose parent is `ppid` and whose state is `state` (`*` = any).
fn children_in_state(ppid: &str, state: char) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let s = fields[0].chars().next().unwrap_or('?');
        if fields[1] == ppid && (state == '*' || s == state) {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// The agent as PID 1 of fresh user, pid, net and mount namespaces (skipped where
/// unprivileged user namespaces are unavailable): lo comes up, CAP_NET_ADMIN is gone
/// from commands, orphans are reaped by PID 1.
#[tokio::test]
async fn pid1_in_fresh_namespaces() {
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "true"])
        .status();
    if !probe.map(|s| s.success()).unwrap_or(false) {
        eprintln!("skipped: cannot create user and network namespaces here");
        return;
    }
    let agent = TestAgent::start_with(&[
        "unshare",
        "--user",
        "--map-root-user",
        "--pid",
        "--net",
        "--mount",
        "--fork",
        "--mount-proc",
        "--kill-child",
    ]);
    let mut guest = agent.connect().await;
    assert_eq!(guest.health(Empty {}).await.unwrap().into_inner().pid, 1);

    let r = run(&mut guest, sh("grep CapBnd /proc/self/status")).await;
    let out = String::from_utf8(r.stdout).unwrap();
    let bnd = out
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    const CAP_NET_ADMIN: u64 = 12;
    assert_eq!(
        bnd & (1 << CAP_NET_ADMIN),
        0,
        "CAP_NET_ADMIN still bounded: {out}"
    );
    assert_ne!(bnd, 0, "other capabilities were dropped too: {out}");

    // lo is up: something can listen on and connect to 127.0.0.1.
    if Command::new("python3").arg("-V").output().is_ok() {
        let script = "python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\",0)); \
                      s.listen(); c=socket.create_connection(s.getsockname()); print(\"lo ok\")'";
        let r = run(&mut guest, sh(script)).await;
        assert_eq!(
            String::from_utf8_lossy(&r.stdout),
            "lo ok\n",
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
    }

    // Orphans are reaped by PID 1.
    let r = run(&mut guest, sh("sleep 0.1 & exit 0")).await;
    assert_eq!(r.exited.unwrap().code, Some(0));
    let zombies = "sleep 0.5; for p in /proc/[0-9]*; do \
                   grep -q '^State:.*Z' $p/status 2>/dev/null && echo $p; done; true";
    let r = run(&mut guest, sh(zombies)).await;
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "",
        "zombies in the sandbox"
    );

    guest.shutdown(Empty {}).await.unwrap();
}

/// An upload cut off mid-way commits nothing: no target, no temp file left behind.
#[tokio::test]
async fn interrupted_upload_commits_nothing() {
    let agent = TestAgent::start();
    let guest = agent.connect().await;
    let dir = agent.path("up");
    let target = dir.join("file.bin");
    let (tx, rx) = mpsc::channel(8);
    tx.send(WriteFileInput {
        kind: Some(write_file_input::Kind::Target(WriteTarget {
            path: target.to_str().unwrap().into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    tx.send(WriteFileInput {
        kind: Some(write_file_input::Kind::Data(Bytes::from(vec![1u8; 1000]))),
    })
    .await
    .unwrap();
    let call = tokio::spawn({
        let mut guest = guest.clone();
        async move { guest.write_file(ReceiverStream::new(rx)).await }
    });
    let entries = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut started = false;
    for _ in 0..1000 {
        if !entries(&dir).is_empty() {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started, "the upload never started");
    call.abort();
    let _ = call.await;
    let mut left = entries(&dir);
    for _ in 0..1000 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        left = entries(&dir);
    }
    assert!(left.is_empty(), "left behind: {left:?}");
    drop(tx);
}

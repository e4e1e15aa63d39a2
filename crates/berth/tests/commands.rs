//! Command execution: byte-exact output, timeouts and disconnects kill the process group.

mod common;

use std::time::Duration;

use base64::Engine;
use berth_api::{CommandEvent, CommandRequest, Isolation};
use common::drivers::{runtime_with, session};
use common::Server;
use futures::StreamExt;
use sha2::Digest;

both!(commands_stream_output_exit_codes_and_env);
async fn commands_stream_output_exit_codes_and_env(s: Server, isolation: Isolation) {
    let rt = runtime_with(&s, isolation, |r| {
        r.env
            .insert("BERTH_TEST_ENV".into(), "from the runtime".into());
    })
    .await;
    let session = s.session(&common::uniq("cmd"), &rt).await;
    let o = s
        .exec(
            &session,
            "echo out; echo err >&2; echo \"$BERTH_TEST_ENV\"; exit 7",
        )
        .await;
    assert_eq!(o.out(), "out\nfrom the runtime\n", "{o:?}");
    assert_eq!(o.err(), "err\n", "{o:?}");
    assert_eq!(o.code, Some(7), "{o:?}");
    let o = s.exec(&session, "kill -TERM $$").await;
    assert_eq!(o.signal, Some(15), "{o:?}");
    assert_eq!(o.code, None, "{o:?}");
}

both!(binary_output_of_100_mib_arrives_intact);
async fn binary_output_of_100_mib_arrives_intact(s: Server, isolation: Isolation) {
    let rt = runtime_with(&s, isolation, |r| r.workspace_size = 256 << 20).await;
    let session = s.session(&common::uniq("blob"), &rt).await;
    let mut stream = s
        .client
        .run_command(
            &session,
            &CommandRequest {
                command: Some("head -c 100M /dev/urandom | tee /mnt/workspace/blob".into()),
                ..Default::default()
            },
        )
        .await
        .expect("run");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut hash = sha2::Sha256::new();
    let mut len = 0u64;
    let mut exit = None;
    while let Some(ev) = stream.next().await {
        match ev.expect("event") {
            CommandEvent::Stdout { data } => {
                let bytes = b64.decode(data).expect("base64");
                len += bytes.len() as u64;
                hash.update(&bytes);
            }
            CommandEvent::Exit { code, .. } => exit = Some(code),
            CommandEvent::Stderr { data } => {
                panic!(
                    "stderr: {:?}",
                    String::from_utf8_lossy(&b64.decode(data).expect("b64"))
                )
            }
            CommandEvent::Error { error } => panic!("error event: {error:?}"),
            CommandEvent::Started { .. } => {}
        }
    }
    assert_eq!(exit, Some(Some(0)));
    assert_eq!(len, 100 << 20, "byte count");
    let got: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let inside = s
        .exec(&session, "sha256sum /mnt/workspace/blob")
        .await
        .ok()
        .out();
    assert_eq!(
        inside.split_whitespace().next(),
        Some(got.as_str()),
        "sha256 differs"
    );
}

both!(a_timeout_kills_the_whole_process_group);
async fn a_timeout_kills_the_whole_process_group(s: Server, isolation: Isolation) {
    let session = session(&s, isolation, "timeout").await;
    // What the command printed before the timeout arrives too.
    let o = s
        .exec_req(
            &session,
            CommandRequest {
                command: Some("cat; sleep 100 & sleep 100".into()),
                stdin: Some("piped".into()),
                timeout_s: Some(1.0),
                ..Default::default()
            },
        )
        .await;
    assert!(o.timed_out, "{o:?}");
    assert_eq!(o.out(), "piped", "{o:?}");
    assert_eq!(o.code, None, "{o:?}");
    assert!(o.signal.is_some(), "killed by a signal: {o:?}");
    // The backgrounded sleep went with the group.
    common::poll("every sleep to be gone", || async {
        let o = s.exec(&session, "pgrep -l sleep").await;
        (o.code == Some(1)).then_some(())
    })
    .await;
    // A timeout that does not fire changes nothing.
    let o = s
        .exec_req(
            &session,
            CommandRequest {
                command: Some("echo quick".into()),
                timeout_s: Some(30.0),
                ..Default::default()
            },
        )
        .await
        .ok();
    assert!(!o.timed_out);
    assert_eq!(o.out(), "quick\n");
}

both!(a_client_that_disconnects_kills_the_command);
async fn a_client_that_disconnects_kills_the_command(s: Server, isolation: Isolation) {
    let session = session(&s, isolation, "disconnect").await;
    let mut stream = s
        .client
        .run_command(
            &session,
            &CommandRequest {
                command: Some("sleep 1000.5 & echo started; sleep 1000.25".into()),
                ..Default::default()
            },
        )
        .await
        .expect("run");
    // Wait for the command to run, then hang up.
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("started") {
        match tokio::time::timeout(common::DEADLINE, stream.next()).await {
            Ok(Some(Ok(CommandEvent::Stdout { data }))) => {
                out.extend(b64.decode(data).expect("b64"))
            }
            Ok(Some(Ok(CommandEvent::Started { .. }))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let running = s.exec(&session, "pgrep -f '[s]leep 1000'").await;
    assert_eq!(
        running.code,
        Some(0),
        "the command runs before the disconnect"
    );
    drop(stream);
    common::poll(
        "the disconnected command's processes to be gone",
        || async {
            let o = s.exec(&session, "pgrep -f '[s]leep 1000'").await;
            (o.code == Some(1)).then_some(())
        },
    )
    .await;
    // The CLI: killing `berth exec` hangs up too.
    let mut child = s
        .cli_command(&[
            "exec",
            "-s",
            &session,
            "--",
            "sh",
            "-c",
            "echo cli-started; sleep 1000.75",
        ])
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 64];
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(common::DEADLINE, stdout.read(&mut buf))
        .await
        .expect("cli output")
        .expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("cli-started"));
    child.kill().await.expect("kill cli");
    common::poll("the CLI's command to be gone", || async {
        let o = s.exec(&session, "pgrep -f '[s]leep 1000.75'").await;
        (o.code == Some(1)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
}

both!(a_slow_reader_gets_everything_and_stdin_cwd_env_work);
async fn a_slow_reader_gets_everything_and_stdin_cwd_env_work(s: Server, isolation: Isolation) {
    let session = session(&s, isolation, "slow").await;
    let mut stream = s
        .client
        .run_command(
            &session,
            &CommandRequest {
                command: Some("seq 1 200000".into()),
                ..Default::default()
            },
        )
        .await
        .expect("run");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    let mut n = 0;
    let mut code = None;
    while let Some(ev) = stream.next().await {
        n += 1;
        if n % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        match ev.expect("event") {
            CommandEvent::Stdout { data } => out.extend(b64.decode(data).expect("b64")),
            CommandEvent::Exit { code: c, .. } => code = c,
            _ => {}
        }
    }
    assert_eq!(code, Some(0));
    let expected: String = (1..=200000).map(|i| format!("{i}\n")).collect();
    assert!(
        out == expected.as_bytes(),
        "seq output differs ({} bytes)",
        out.len()
    );

    let o = s
        .exec_req(
            &session,
            CommandRequest {
                argv: Some(vec![
                    "sh".into(),
                    "-c".into(),
                    "pwd; echo \"$GREETING\"; cat".into(),
                ]),
                cwd: Some("/tmp".into()),
                env: [("GREETING".to_string(), "hi there".to_string())].into(),
                stdin_b64: Some(b64.encode(b"\x00\x01binary\xff")),
                ..Default::default()
            },
        )
        .await
        .ok();
    assert_eq!(o.stdout, b"/tmp\nhi there\n\x00\x01binary\xff");
}

/// Resident memory of a process in KiB (`VmRSS`).
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

both!(server_memory_stays_bounded_when_a_client_reads_slowly);
async fn server_memory_stays_bounded_when_a_client_reads_slowly(s: Server, isolation: Isolation) {
    let session = session(&s, isolation, "stall").await;
    let pid = s.pid().expect("server pid");
    let before = rss_kib(pid);
    // An endless fast writer and a client that stops reading after the first event: if
    // anything between the pipe and the socket buffered without bound, the server's
    // memory would grow by gigabytes within seconds.
    let mut stream = s
        .client
        .run_command_raw(
            &session,
            &CommandRequest {
                command: Some("cat /dev/zero".into()),
                ..Default::default()
            },
        )
        .await
        .expect("run");
    stream.next().await.expect("first event").expect("event");
    let mut peak = before;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(pid));
    }
    // Reading resumes and output keeps flowing: the writer was paused, not broken.
    let mut got = 0usize;
    while got < 64 << 20 {
        match stream.next().await.expect("more output").expect("event") {
            berth_client::RawEvent::Stdout(b) => got += b.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(stream);
    eprintln!("server RSS {before} KiB before, {peak} KiB peak while stalled");
    assert!(
        peak < before + 256 * 1024,
        "server RSS grew from {before} KiB to {peak} KiB while the client stalled"
    );
}

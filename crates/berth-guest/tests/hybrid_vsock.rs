//! `client::connect_hybrid_vsock` against a fake hybrid-vsock daemon: a unix socket that
//! answers `CONNECT <port>\n` like `vhost-device-vsock` does and then relays bytes to the
//! agent under test. The real daemon and a VM: `through_a_real_daemon` below.

#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::path::{Path, PathBuf};

use berth_guest::client::connect_hybrid_vsock;
use berth_guest::proto::{exec_input, exec_output, Empty, ExecInput, ExecStart};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use common::TestAgent;

/// Not a test: the agent process of the other tests (see `common::TestAgent`).
#[test]
fn agent_process() {
    common::agent_process_entry();
}

/// What the fake daemon does after reading the `CONNECT` line.
#[derive(Clone, Copy)]
enum Daemon {
    /// Close without a reply, as the real one does while the guest has no listener.
    NoListener,
    /// Reply with this line.
    Reply(&'static [u8]),
    /// Connect to the agent, wait for its first bytes (HTTP/2 SETTINGS) and send them in
    /// the same write as `OK <port>\n`, then relay: a client that read past the newline
    /// would lose them and never get a working connection.
    Relay,
}

/// Serve `behaviour` on a unix socket in `dir`, for every connection; returns its path.
fn fake_daemon(dir: &Path, behaviour: Daemon, agent: Option<PathBuf>) -> PathBuf {
    let path = dir.join("hv.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let agent = agent.clone();
            tokio::spawn(async move {
                let _ = handle(stream, behaviour, agent).await;
            });
        }
    });
    path
}

async fn handle(stream: UnixStream, behaviour: Daemon, agent: Option<PathBuf>) -> io::Result<()> {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let port = line.strip_prefix("CONNECT ").unwrap().trim_end();
    assert_eq!(port, "1024", "{line:?}");
    let mut stream = stream.into_inner();
    match behaviour {
        Daemon::NoListener => Ok(()),
        Daemon::Reply(reply) => {
            stream.write_all(reply).await?;
            // Hold the connection open: the client must not wait for more.
            let _ = stream.read(&mut [0; 1]).await;
            Ok(())
        }
        Daemon::Relay => {
            let mut guest = UnixStream::connect(agent.unwrap()).await?;
            let mut first = vec![0; 4096];
            let n = guest.read(&mut first).await?;
            assert!(n > 0);
            let mut reply = format!("OK {port}\n").into_bytes();
            reply.extend_from_slice(&first[..n]);
            stream.write_all(&reply).await?;
            tokio::io::copy_bidirectional(&mut stream, &mut guest).await?;
            Ok(())
        }
    }
}

/// The `io::Error` at the bottom of a connect error's source chain.
fn io_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        source = err.source();
    }
    None
}

#[tokio::test]
async fn hands_the_stream_over_right_after_the_reply() {
    let agent = TestAgent::start();
    let dir = tempfile::tempdir().unwrap();
    let uds = fake_daemon(dir.path(), Daemon::Relay, Some(agent.socket.clone()));
    let mut guest = connect_hybrid_vsock(&uds, 1024).await.unwrap();
    guest.health(Empty {}).await.unwrap();
    let start = ExecStart {
        argv: vec!["echo".into(), "over vsock".into()],
        ..Default::default()
    };
    let input = tokio_stream::iter(vec![ExecInput {
        kind: Some(exec_input::Kind::Start(start)),
    }]);
    let mut output = guest.exec(input).await.unwrap().into_inner();
    let mut stdout = Vec::new();
    while let Some(msg) = output.message().await.unwrap() {
        if let Some(exec_output::Kind::Stdout(bytes)) = msg.kind {
            stdout.extend_from_slice(&bytes);
        }
    }
    assert_eq!(stdout, b"over vsock\n");
}

#[tokio::test]
async fn no_guest_listener_is_connection_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uds = fake_daemon(dir.path(), Daemon::NoListener, None);
    let err = connect_hybrid_vsock(&uds, 1024).await.unwrap_err();
    let io = io_error(&err).unwrap();
    assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused, "{io}");
    assert!(io.to_string().contains("not listening"), "{io}");
    assert!(err.to_string().contains("vsock port 1024 through"), "{err}");
}

#[tokio::test]
async fn a_bad_reply_is_invalid_data() {
    for reply in [&b"NOPE\n"[..], &[b'O'; 100][..]] {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_daemon(dir.path(), Daemon::Reply(reply), None);
        let err = connect_hybrid_vsock(&uds, 1024).await.unwrap_err();
        let io = io_error(&err).unwrap();
        assert_eq!(io.kind(), io::ErrorKind::InvalidData, "{io}");
    }
}

/// A real microVM behind `vhost-device-vsock`: set `BERTH_VSOCK_TEST_UDS` to the
/// daemon's `uds-path` of a VM booted by hand with `berth.channel=vsock:1024`;
/// skipped otherwise. Ends with `Shutdown`: the VM powers off.
#[tokio::test]
async fn through_a_real_daemon() {
    let Some(uds) = std::env::var_os("BERTH_VSOCK_TEST_UDS") else {
        eprintln!("skipped: BERTH_VSOCK_TEST_UDS is not set");
        return;
    };
    let uds = PathBuf::from(uds);
    let begin = std::time::Instant::now();
    let mut guest = loop {
        match connect_hybrid_vsock(&uds, 1024).await {
            Ok(guest) => break guest,
            Err(err) if begin.elapsed() < std::time::Duration::from_secs(60) => {
                eprintln!("retrying: {err}: {:?}", io_error(&err));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(err) => panic!("{err}: {:?}", io_error(&err)),
        }
    };
    eprintln!("connected after {:?}", begin.elapsed());
    let health = guest.health(Empty {}).await.unwrap().into_inner();
    eprintln!("health: {health:?}");
    let start = ExecStart {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "uname -r; cat /proc/1/cmdline | tr '\\0' ' '; echo; df -h /mnt/workspace | tail -1"
                .into(),
        ],
        ..Default::default()
    };
    let input = tokio_stream::iter(vec![ExecInput {
        kind: Some(exec_input::Kind::Start(start)),
    }]);
    let mut output = guest.exec(input).await.unwrap().into_inner();
    while let Some(msg) = output.message().await.unwrap() {
        match msg.kind.unwrap() {
            exec_output::Kind::Stdout(bytes) => eprint!("{}", String::from_utf8_lossy(&bytes)),
            other => eprintln!("{other:?}"),
        }
    }
    // Independent connections, all at once (the guest's listen backlog).
    let begin = std::time::Instant::now();
    let calls = (0..20).map(|_| async {
        let mut guest = connect_hybrid_vsock(&uds, 1024).await?;
        guest.health(Empty {}).await.map_err(|e| e.to_string())?;
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    for result in futures::future::join_all(calls).await {
        result.unwrap();
    }
    eprintln!("20 concurrent connections + health: {:?}", begin.elapsed());
    guest.shutdown(Empty {}).await.unwrap();
    eprintln!("shutdown acknowledged");
}

//! Port tunnels (`Connect`) end to end: the agent as a separate process (this test binary
//! re-executed into `agent_process`), TCP servers in this process on 127.0.0.1 (the
//! agent runs in this host's network namespace here, except in the namespace test at the
//! end). No root needed; no assertion depends on timing.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use berth_guest::client::connect_port;
use berth_guest::proto::{exec_input, tunnel_output, ExecInput, ExecStart, TunnelOutput};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use common::TestAgent;

/// Not a test: the agent process of the other tests (see `common::TestAgent`).
#[test]
fn agent_process() {
    common::agent_process_entry();
}

/// Generous bound for things that must happen (never a performance threshold).
const DEADLINE: Duration = Duration::from_secs(60);

async fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// A port nothing listens on (bound, then released).
async fn free_port() -> u16 {
    listener().await.1
}

/// The next data chunk, `None` at a clean end; asserts the 64 KiB chunk bound.
async fn next_chunk(
    out: &mut tonic::Streaming<TunnelOutput>,
) -> Result<Option<Bytes>, tonic::Status> {
    match out.message().await? {
        Some(TunnelOutput {
            kind: Some(tunnel_output::Kind::Data(data)),
        }) => {
            assert!(data.len() <= 64 * 1024, "chunk of {} bytes", data.len());
            assert!(!data.is_empty(), "empty data chunk");
            Ok(Some(data))
        }
        Some(other) => panic!("unexpected output {other:?}"),
        None => Ok(None),
    }
}

async fn read_to_end(out: &mut tonic::Streaming<TunnelOutput>) -> Result<Vec<u8>, tonic::Status> {
    let mut all = Vec::new();
    while let Some(chunk) = next_chunk(out).await? {
        all.extend_from_slice(&chunk);
    }
    Ok(all)
}

/// An input side the test feeds by hand.
fn input() -> (mpsc::Sender<Bytes>, ReceiverStream<Bytes>) {
    let (tx, rx) = mpsc::channel(4);
    (tx, ReceiverStream::new(rx))
}

/// Deterministic bytes that are not all alike.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Request → half-close → response → EOF: the peer sees our end of input as EOF (it
/// answers only then), and its close ends the output stream cleanly.
#[tokio::test]
async fn request_half_close_response_eof() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let (l, port) = listener().await;
    let server = tokio::spawn(async move {
        let (mut s, peer) = l.accept().await.unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap();
        let reply = format!("{} bytes from {}: ", request.len(), peer.ip());
        s.write_all(reply.as_bytes()).await.unwrap();
        s.write_all(&request).await.unwrap();
    });
    let parts = ["GET /ping", " HTTP/1.0\r\n", "\r\n"].map(Bytes::from);
    let mut out = connect_port(&mut guest, port, tokio_stream::iter(parts))
        .await
        .unwrap();
    let reply = read_to_end(&mut out).await.unwrap();
    assert_eq!(
        String::from_utf8(reply).unwrap(),
        "22 bytes from 127.0.0.1: GET /ping HTTP/1.0\r\n\r\n"
    );
    server.await.unwrap();
}

/// The peer closing its side ends the output, and the input still flows afterwards
/// (TCP half-close in the other direction).
#[tokio::test]
async fn peer_eof_leaves_the_input_open() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let (l, port) = listener().await;
    let (got_tx, got_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        got_tx.send(rest).unwrap();
    });
    let (tx, rx) = input();
    let mut out = connect_port(&mut guest, port, rx).await.unwrap();
    assert_eq!(read_to_end(&mut out).await.unwrap(), b"hello");
    tx.send(Bytes::from_static(b"after ")).await.unwrap();
    tx.send(Bytes::from_static(b"eof")).await.unwrap();
    drop(tx);
    let got = tokio::time::timeout(DEADLINE, got_rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"after eof");
}

#[tokio::test]
async fn a_refused_port_is_unavailable_and_says_so() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let port = free_port().await;
    let err = connect_port(&mut guest, port, tokio_stream::empty())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        err.message(),
        format!("nothing listens on 127.0.0.1:{port} in the sandbox")
    );
    // The connection to the agent is unharmed.
    guest.health(berth_guest::proto::Empty {}).await.unwrap();
}

#[tokio::test]
async fn a_bad_open_message_is_invalid() {
    use berth_guest::proto::{tunnel_input, TunnelInput, TunnelOpen};
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let open = |port| TunnelInput {
        kind: Some(tunnel_input::Kind::Open(TunnelOpen { port })),
    };
    let data = TunnelInput {
        kind: Some(tunnel_input::Kind::Data(Bytes::from_static(b"x"))),
    };
    for (first, what) in [
        (open(0), "port 0"),
        (open(65536), "port 65536"),
        (data, "`open`"),
    ] {
        let err = guest
            .connect(tokio_stream::iter([first]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(what), "{err:?}");
    }
    let err = guest.connect(tokio_stream::empty()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// 32 MiB through an echo server in both directions at once: neither direction waits for
/// the other (an echo of more than every buffer on the way holds would deadlock if it did).
#[tokio::test]
async fn bulk_echo_both_ways_at_once() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let (l, port) = listener().await;
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let data = Bytes::from(pattern(32 << 20));
    let (tx, rx) = input();
    let mut out = connect_port(&mut guest, port, rx).await.unwrap();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        // Uneven pieces, some larger than a chunk.
        let mut rest = sent;
        let mut n = 1usize;
        while !rest.is_empty() {
            let take = rest.len().min((n * 37_813) % 300_000 + 1);
            tx.send(rest.split_to(take)).await.unwrap();
            n += 1;
        }
    });
    let echoed = read_to_end(&mut out).await.unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "echoed bytes differ");
}

/// Dropping the call closes the connection entirely, not just for writing: after the
/// EOF, the peer's writes fail (a half-closed tunnel would keep accepting them).
#[tokio::test]
async fn cancelling_the_call_closes_the_connection() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let (l, port) = listener().await;
    let (closed_tx, closed_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"ready").await.unwrap();
        let mut buf = [0u8; 64];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        let chunk = vec![0u8; 64 * 1024];
        let err = loop {
            if let Err(err) = s.write_all(&chunk).await {
                break err;
            }
        };
        let _ = closed_tx.send(err.kind());
    });
    let (tx, rx) = input();
    let mut out = connect_port(&mut guest, port, rx).await.unwrap();
    assert_eq!(&next_chunk(&mut out).await.unwrap().unwrap()[..], b"ready");
    drop(out);
    drop(tx);
    let kind = tokio::time::timeout(DEADLINE, closed_rx)
        .await
        .expect("the agent kept the connection open after the call was cancelled")
        .unwrap();
    eprintln!("the peer's write failed: {kind:?}");
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A peer that writes without end to a host that reads slowly: backpressure stops the
/// agent from reading the socket, its memory stays small, and the peer blocks.
#[tokio::test]
async fn slow_reader_keeps_memory_bounded() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let (l, port) = listener().await;
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let zeros = vec![0u8; 1 << 20];
        while s.write_all(&zeros).await.is_ok() {}
    });
    let (tx, rx) = input();
    let mut out = connect_port(&mut guest, port, rx).await.unwrap();
    let mut received = 0usize;
    let mut max_rss = 0;
    for i in 0..150 {
        received += next_chunk(&mut out).await.unwrap().unwrap().len();
        tokio::time::sleep(Duration::from_millis(10)).await;
        if i % 10 == 0 {
            max_rss = max_rss.max(vm_rss_kib(agent.pid()));
        }
    }
    eprintln!("slow reader: received {received} bytes, agent max VmRSS {max_rss} KiB");
    assert!(max_rss < 64 * 1024, "agent RSS {max_rss} KiB");
    drop(out);
    drop(tx);
}

/// In fresh namespaces (as in a namespace sandbox) the agent dials its *own* loopback:
/// a server on the host's 127.0.0.1 is out of reach, one started in the sandbox on the
/// same port answers.
#[tokio::test]
async fn dials_the_loopback_of_its_own_network_namespace() {
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "true"])
        .status();
    if !probe.map(|s| s.success()).unwrap_or(false) {
        eprintln!("skipped: cannot create user and network namespaces here");
        return;
    }
    if Command::new("python3").arg("-V").output().is_err() {
        eprintln!("skipped: python3 is not installed");
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
    // A host server the sandbox must not reach.
    let (host_listener, port) = listener().await;
    let err = connect_port(&mut guest, port, tokio_stream::empty())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // A server inside, on the same port; it sends a greeting and closes.
    let script = format!(
        "python3 -c 'import socket\n\
         s = socket.socket(); s.bind((\"127.0.0.1\", {port})); s.listen()\n\
         c, _ = s.accept(); c.sendall(b\"inside\"); c.close()' >/dev/null 2>&1 &"
    );
    let start = ExecInput {
        kind: Some(exec_input::Kind::Start(ExecStart {
            argv: vec!["sh".into(), "-c".into(), script],
            ..Default::default()
        })),
    };
    let mut exec = guest
        .exec(tokio_stream::iter([start]))
        .await
        .unwrap()
        .into_inner();
    while exec.message().await.unwrap().is_some() {}
    // Retry while the server starts, as a caller of a booting agent does.
    let deadline = Instant::now() + DEADLINE;
    let mut out = loop {
        match connect_port(&mut guest, port, tokio_stream::empty()).await {
            Ok(out) => break out,
            Err(err) if err.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("{err:?}"),
        }
    };
    assert_eq!(read_to_end(&mut out).await.unwrap(), b"inside");
    drop(host_listener);
}

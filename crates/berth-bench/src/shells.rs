//! The shell benchmarks of issue 3, over the `v5.channel.k8s.io` attach WebSocket of a
//! real server (the same protocol `berth exec --it` speaks):
//!
//! 1. keystroke echo: a shell running `cat` on a raw, non-echoing terminal; one stdin
//!    byte out, time until that byte is back on channel 1 (plus the channel-5 heartbeat
//!    round trip, which never reaches the guest, as the transport's share);
//! 2. reattach: a 100 × 30 shell that printed more than 256 KiB (its whole output ring)
//!    and then a full screen of coloured text; time from starting the WebSocket connect
//!    without an offset until the snapshot (`snapshotBytes`) has arrived, and the same
//!    for a reconnect that replays the whole 256 KiB ring from an offset;
//! 3. many shells of one session attached at once, each printing `seq 1 N`; every
//!    client checks that it got exactly the bytes `seq` printed (every line once, in
//!    order) and exit status 0, reattaching from its offset if the server drops it as
//!    too slow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use berth_api::shell::{channel, reason, ShellInfo, ShellStatus, SUBPROTOCOL};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::benches::ms;
use crate::report::{num, Figure, Target};
use crate::Ctx;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Longest wait for any one message (nothing here should come close).
const DEADLINE: Duration = Duration::from_secs(60);
/// The guest's output ring (`berth_guest::agent::RING`): what a reconnect can replay.
const RING: u64 = 256 * 1024;
/// Reattach shell size, lines of 100 digits printed before the final screen (3000 ×
/// 102 bytes = 306 000 bytes > 256 KiB), and the marker printed last.
const SCREEN_W: u16 = 100;
const SCREEN_H: u16 = 30;
const FILL_LINES: u32 = 3000;
const READY: &[u8] = b"READY";

/// Where the server is; cheap to clone into spawned clients.
#[derive(Clone)]
struct Endpoint {
    ws_base: String,
    http_base: String,
    token: String,
    http: reqwest::Client,
}

impl Endpoint {
    fn of(ctx: &Ctx) -> Self {
        Self {
            ws_base: ctx.url.replacen("http://", "ws://", 1),
            http_base: ctx.url.clone(),
            token: ctx.token.clone(),
            http: ctx.http.clone(),
        }
    }

    async fn open(&self, session: &str, body: serde_json::Value) -> Result<ShellInfo> {
        let resp = self
            .http
            .post(format!("{}/v1/sessions/{session}/shells", self.http_base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .context("POST …/shells failed")?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            bail!("POST /v1/sessions/{session}/shells {body}: {status}: {text}");
        }
        resp.json().await.context("POST …/shells sent bad JSON")
    }

    async fn kill(&self, session: &str, shell: &str) -> Result<()> {
        let resp = self
            .http
            .delete(format!(
                "{}/v1/sessions/{session}/shells/{shell}",
                self.http_base
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .context("DELETE …/shells/… failed")?;
        if !resp.status().is_success() {
            bail!("DELETE shell {shell}: {}", resp.status());
        }
        Ok(())
    }

    /// Connect (Nagle off, as an interactive client would) without reading anything.
    async fn connect(&self, session: &str, shell: &str, query: &str) -> Result<Ws> {
        let url = format!(
            "{}/v1/sessions/{session}/shells/{shell}/attach?{query}",
            self.ws_base
        );
        let mut req = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("bad attach URL {url}"))?;
        let h = req.headers_mut();
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {}", self.token))
                .context("token is not a header value")?,
        );
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
            .await
            .with_context(|| format!("cannot attach to {shell}?{query}"))?;
        Ok(ws)
    }

    /// Connect, then read the first status frame and the whole snapshot.
    async fn attach(&self, session: &str, shell: &str, query: &str) -> Result<Attached> {
        let t0 = Instant::now();
        let mut ws = self.connect(session, shell, query).await?;
        let connected = t0.elapsed();
        let first = match next_frame(&mut ws).await? {
            Frame::Status(s) if s.status == "Success" && s.metadata.shell_id.is_some() => s,
            Frame::Status(s) => bail!("attach {shell}?{query}: first status {s:?}"),
            Frame::Closed(code) => bail!("attach {shell}?{query}: closed ({code:?}) at once"),
            _ => bail!("attach {shell}?{query}: the first message is not a status frame"),
        };
        let status = t0.elapsed();
        let snap = first
            .metadata
            .snapshot_bytes
            .ok_or_else(|| anyhow!("first status frame without snapshotBytes"))?
            as usize;
        let mut out = Vec::with_capacity(snap);
        while out.len() < snap {
            match next_frame(&mut ws).await? {
                Frame::Stdout(d) => out.extend_from_slice(&d),
                Frame::Closed(code) => {
                    bail!(
                        "attach {shell}: closed ({code:?}) after {} of {snap} snapshot bytes",
                        out.len()
                    )
                }
                Frame::Status(s) => bail!("attach {shell}: status {s:?} inside the snapshot"),
                Frame::Heartbeat(_) => {}
            }
        }
        let done = t0.elapsed();
        let live = out.split_off(snap);
        Ok(Attached {
            ws,
            first,
            snapshot: out,
            live,
            connected,
            status,
            done,
        })
    }
}

/// One attachment after its snapshot.
struct Attached {
    ws: Ws,
    first: ShellStatus,
    snapshot: Vec<u8>,
    /// Channel-1 bytes after the snapshot read so far.
    live: Vec<u8>,
    /// From starting the connect: upgrade done, first status frame, snapshot complete.
    connected: Duration,
    status: Duration,
    done: Duration,
}

impl Attached {
    /// Shell-output offset of the next byte not received yet.
    fn position(&self) -> u64 {
        self.first.metadata.offset.unwrap_or(0) + self.live.len() as u64
    }

    async fn send(&mut self, chan: u8, payload: &[u8]) -> Result<()> {
        self.ws
            .send(Message::Binary(
                berth_api::shell::frame(chan, payload).into(),
            ))
            .await
            .context("WebSocket send failed")
    }

    /// Read live output until `live` contains `needle`.
    async fn until_output(&mut self, needle: &[u8]) -> Result<()> {
        while !contains(&self.live, needle) && !contains(&self.snapshot, needle) {
            match next_frame(&mut self.ws).await? {
                Frame::Stdout(d) => self.live.extend_from_slice(&d),
                Frame::Status(s) => bail!(
                    "status {s:?} while waiting for {:?}",
                    String::from_utf8_lossy(needle)
                ),
                Frame::Closed(code) => bail!(
                    "closed ({code:?}) while waiting for {:?}; output {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&self.live)
                ),
                Frame::Heartbeat(_) => {}
            }
        }
        Ok(())
    }

    /// Leave (channel 0xFF) and wait for the server's close.
    async fn detach(mut self) -> Result<()> {
        self.send(channel::CLOSE, b"").await?;
        loop {
            match next_frame(&mut self.ws).await {
                Ok(Frame::Closed(_)) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
        }
    }
}

/// One message from the server.
enum Frame {
    Stdout(Vec<u8>),
    Status(ShellStatus),
    Heartbeat(Vec<u8>),
    /// The server closed (with this code) or the connection ended.
    Closed(Option<u16>),
}

async fn next_frame(ws: &mut Ws) -> Result<Frame> {
    loop {
        let msg = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .map_err(|_| anyhow!("no message from the server within {DEADLINE:?}"))?;
        let msg = match msg {
            None => return Ok(Frame::Closed(None)),
            Some(m) => m.context("WebSocket read failed")?,
        };
        match msg {
            Message::Binary(b) => {
                let (&chan, payload) = b
                    .split_first()
                    .ok_or_else(|| anyhow!("empty message from the server"))?;
                return Ok(match chan {
                    channel::STDOUT => Frame::Stdout(payload.to_vec()),
                    channel::STATUS => Frame::Status(
                        serde_json::from_slice(payload).context("status frame is not a Status")?,
                    ),
                    channel::HEARTBEAT => Frame::Heartbeat(payload.to_vec()),
                    other => bail!("message on channel {other} from the server"),
                });
            }
            Message::Close(f) => return Ok(Frame::Closed(f.map(|f| u16::from(f.code)))),
            _ => {}
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A figure whose headline is the p99 of `samples` instead of the median.
fn p99_figure(key: &str, name: &str, unit: &'static str, samples: &[f64]) -> Figure {
    let mut f = Figure::from_samples(key, name, unit, samples);
    f.value = f.summary.map_or(f64::NAN, |s| s.p99);
    f.value_is = "p99";
    f
}

pub(crate) async fn run(
    ctx: &Ctx,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let ep = Endpoint::of(ctx);
    let id = ctx.session("shells");
    echo(ctx, &ep, &id, figures, notes)
        .await
        .context("keystroke echo")?;
    reattach(ctx, &ep, &id, figures, notes)
        .await
        .context("reattach")?;
    ctx.observe_cgroup(&id);
    ctx.delete(&id).await?;
    let id = ctx.session("shells-streams");
    streams(ctx, &ep, &id, figures, notes)
        .await
        .context("streaming shells")?;
    ctx.observe_cgroup(&id);
    ctx.delete(&id).await?;
    Ok(())
}

/// Benchmark 1: keystroke echo round trip, and the heartbeat round trip beside it.
async fn echo(
    ctx: &Ctx,
    ep: &Endpoint,
    session: &str,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let shell = "echo";
    ep.open(
        session,
        json!({"shell_id": shell, "command": ["sh", "-c", "stty raw -echo && printf READY && exec cat"]}),
    )
    .await?;
    let mut a = ep.attach(session, shell, "").await?;
    a.until_output(READY).await?;
    let (warmup, runs) = (ctx.args.echo_warmup, ctx.args.echo_runs);
    let mut echo_ms = Vec::with_capacity(runs);
    let mut stray = 0usize;
    for i in 0..warmup + runs {
        let key = b'a' + (i % 26) as u8;
        let t0 = Instant::now();
        a.send(channel::STDIN, &[key]).await?;
        loop {
            match next_frame(&mut a.ws).await? {
                Frame::Stdout(d) if d == [key] => break,
                Frame::Stdout(d) if d.ends_with(&[key]) => {
                    stray += d.len() - 1;
                    break;
                }
                Frame::Stdout(d) => stray += d.len(),
                Frame::Status(s) => bail!("status {s:?} during the echo test"),
                Frame::Closed(code) => bail!("closed ({code:?}) during the echo test"),
                Frame::Heartbeat(_) => {}
            }
        }
        if i >= warmup {
            echo_ms.push(ms(t0.elapsed()));
        }
    }
    let mut beat_ms = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let payload = (i as u64).to_le_bytes();
        let t0 = Instant::now();
        a.send(channel::HEARTBEAT, &payload).await?;
        loop {
            match next_frame(&mut a.ws).await? {
                Frame::Heartbeat(p) if p == payload => break,
                Frame::Heartbeat(p) => bail!("heartbeat {p:?} answered instead of {payload:?}"),
                Frame::Stdout(d) => stray += d.len(),
                Frame::Status(s) => bail!("status {s:?} during the heartbeat test"),
                Frame::Closed(code) => bail!("closed ({code:?}) during the heartbeat test"),
            }
        }
        if i >= warmup {
            beat_ms.push(ms(t0.elapsed()));
        }
    }
    a.detach().await?;
    ep.kill(session, shell).await?;
    if stray > 0 {
        notes.push(format!(
            "keystroke echo: {stray} output bytes other than the echoed keys arrived"
        ));
    }
    let name =
        "shell keystroke echo round trip (stdin byte → same byte on channel 1, `cat` on a raw tty)";
    figures.push(
        Figure::from_samples("shells.echo_ms", name, "ms", &echo_ms)
            .target(Target::at_most(1.0))
            .note(format!("{warmup} unmeasured round trips first")),
    );
    figures.push(
        p99_figure(
            "shells.echo_p99_ms",
            &format!("{name}, p99"),
            "ms",
            &echo_ms,
        )
        .target(Target::at_most(5.0)),
    );
    figures.push(Figure::from_samples(
        "shells.heartbeat_ms",
        "↳ heartbeat round trip (channel 5, answered by the server: no guest)",
        "ms",
        &beat_ms,
    ));
    Ok(())
}

/// The reattach shell: > 256 KiB of 100-digit lines, then 29 full-width coloured rows
/// and `READY` on the last one, then `cat` on a silent terminal (it prints nothing more).
fn fill_script() -> String {
    format!(
        "seq -f '%0{SCREEN_W}g' 1 {FILL_LINES}; i=1; while [ $i -lt {SCREEN_H} ]; do \
         printf '\\033[1;3%dm%0{SCREEN_W}d\\033[m' $((i % 8)) $i; i=$((i+1)); done; \
         stty -echo && printf READY && exec cat"
    )
}

/// Benchmark 2: reattach to a full screen after a full output ring.
async fn reattach(
    ctx: &Ctx,
    ep: &Endpoint,
    session: &str,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let shell = "screen";
    ep.open(
        session,
        json!({"shell_id": shell, "command": ["sh", "-c", fill_script()],
               "width": SCREEN_W, "height": SCREEN_H}),
    )
    .await?;
    let mut a = ep.attach(session, shell, "offset=0").await?;
    a.until_output(READY).await?;
    let total = a.position();
    a.detach().await?;
    if total < RING {
        bail!("the reattach shell printed only {total} bytes, less than the {RING}-byte ring");
    }

    let runs = ctx.args.reattach_runs;
    let warmup = ctx.args.warmup;
    let (mut done, mut status, mut connected, mut sizes) = (vec![], vec![], vec![], vec![]);
    for i in 0..warmup + runs {
        let a = ep.attach(session, shell, "").await?;
        let snapshot_ok = a.first.metadata.offset == Some(total)
            && !a.snapshot.is_empty()
            && contains(&a.snapshot, READY)
            && contains(
                &a.snapshot,
                format!("{:0w$}", SCREEN_H - 1, w = SCREEN_W as usize).as_bytes(),
            );
        if !snapshot_ok {
            bail!(
                "reattach {i}: offset {:?} (expected {total}), snapshot of {} bytes: {:?}",
                a.first.metadata.offset,
                a.snapshot.len(),
                String::from_utf8_lossy(&a.snapshot)
            );
        }
        if i >= warmup {
            done.push(ms(a.done));
            status.push(ms(a.status));
            connected.push(ms(a.connected));
            sizes.push(a.snapshot.len());
        }
        a.detach().await?;
    }

    // The same, resuming from the oldest offset the ring still holds: 256 KiB replayed.
    let from = total - RING;
    let mut replay = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let t0 = Instant::now();
        let mut a = ep.attach(session, shell, &format!("offset={from}")).await?;
        if !a.snapshot.is_empty() || a.first.metadata.offset != Some(from) {
            bail!(
                "replay {i}: got a {}-byte snapshot / offset {:?} instead of a replay from {from}",
                a.snapshot.len(),
                a.first.metadata.offset
            );
        }
        while a.position() < total {
            match next_frame(&mut a.ws).await? {
                Frame::Stdout(d) => a.live.extend_from_slice(&d),
                Frame::Closed(code) => bail!("replay {i}: closed ({code:?})"),
                Frame::Status(s) => bail!("replay {i}: status {s:?}"),
                Frame::Heartbeat(_) => {}
            }
        }
        let took = t0.elapsed();
        if a.position() != total || !a.live.ends_with(READY) {
            bail!(
                "replay {i}: ended at offset {} instead of {total}",
                a.position()
            );
        }
        if i >= warmup {
            replay.push(ms(took));
        }
        a.detach().await?;
    }
    ep.kill(session, shell).await?;

    let (min, max) = (
        sizes.iter().min().copied().unwrap_or(0),
        sizes.iter().max().copied().unwrap_or(0),
    );
    notes.push(format!(
        "reattach: the shell ({SCREEN_W}×{SCREEN_H}) had printed {total} bytes ({} KiB: a full \
         {} KiB ring) ending in a screen of 29 coloured full-width rows; the snapshot is {} \
         bytes{}",
        total / 1024,
        RING / 1024,
        min,
        if min == max {
            String::new()
        } else {
            format!(" to {max}")
        }
    ));
    figures.push(
        Figure::from_samples(
            "shells.reattach_ms",
            "shell reattach, full screen after 256 KiB of output: connect → snapshot complete",
            "ms",
            &done,
        )
        .target(Target::at_most(20.0))
        .note(format!("{warmup} unmeasured reattaches first")),
    );
    figures.push(Figure::from_samples(
        "shells.reattach_status_ms",
        "↳ reattach: connect → first status frame",
        "ms",
        &status,
    ));
    figures.push(Figure::from_samples(
        "shells.reattach_upgrade_ms",
        "↳ reattach: connect → WebSocket upgrade done",
        "ms",
        &connected,
    ));
    figures.push(Figure::from_samples(
        "shells.replay_ms",
        "↳ reconnect replaying the whole 256 KiB ring from an offset → last byte",
        "ms",
        &replay,
    ));
    Ok(())
}

/// What one streaming client saw.
struct StreamRun {
    start: Instant,
    end: Instant,
    bytes: usize,
    reattaches: usize,
}

/// `READY` and what `seq 1 lines` prints on a terminal (`\n` → `\r\n`).
fn expected_stream(lines: u64) -> Vec<u8> {
    let mut out = READY.to_vec();
    for i in 1..=lines {
        out.extend_from_slice(i.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Where `got` first differs from `want`, in words (lines counted in `seq` output).
fn describe_mismatch(got: &[u8], want: &[u8]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let line = want[..at].iter().filter(|&&b| b == b'\n').count() + 1;
    let seq_lines = |b: &[u8]| {
        b.strip_prefix(READY)
            .unwrap_or(b)
            .split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .count()
    };
    let tail = &got[at..got.len().min(at + 40)];
    format!(
        "got {} bytes ({} lines), expected {} ({} lines); first difference at byte {at} (line \
         {line}): {:?}",
        got.len(),
        seq_lines(got),
        want.len(),
        seq_lines(want),
        String::from_utf8_lossy(tail)
    )
}

/// One streaming client: attach from offset 0, wait for `READY`, wait for every other
/// client, press Enter, then read everything until the exit status and the close.
async fn stream_one(
    ep: Endpoint,
    session: String,
    shell: String,
    barrier: Arc<tokio::sync::Barrier>,
    want: Arc<Vec<u8>>,
) -> Result<StreamRun> {
    let ready = async {
        let mut a = ep.attach(&session, &shell, "offset=0").await?;
        if !a.snapshot.is_empty() || a.first.metadata.offset != Some(0) {
            bail!(
                "{shell}: attach with offset=0 got a {}-byte snapshot / offset {:?}",
                a.snapshot.len(),
                a.first.metadata.offset
            );
        }
        a.until_output(READY).await?;
        Ok(a)
    }
    .await;
    // Every client reaches the barrier, failed or not, so that none waits forever.
    barrier.wait().await;
    let mut a = ready?;
    let mut out = std::mem::take(&mut a.live);
    let start = Instant::now();
    a.send(channel::STDIN, b"\r").await?;
    let mut reattaches = 0;
    let mut exit: Option<ShellStatus> = None;
    let mut end = None;
    loop {
        match next_frame(&mut a.ws).await? {
            Frame::Stdout(d) => {
                if exit.is_some() {
                    bail!("{shell}: output after the exit status");
                }
                out.extend_from_slice(&d);
            }
            Frame::Heartbeat(_) => {}
            Frame::Status(s) if s.reason.as_deref() == Some(reason::TOO_SLOW) => {
                // Dropped as too slow: reconnect exactly where we are.
                let position = out.len() as u64;
                if s.metadata.offset != Some(position) {
                    bail!(
                        "{shell}: TooSlow with offset {:?}, but {position} bytes were received",
                        s.metadata.offset
                    );
                }
                drop(a);
                a = ep
                    .attach(&session, &shell, &format!("offset={position}"))
                    .await?;
                if !a.snapshot.is_empty() || a.first.metadata.offset != Some(position) {
                    bail!(
                        "{shell}: reattach from {position} got a {}-byte snapshot / offset {:?} \
                         (output lost)",
                        a.snapshot.len(),
                        a.first.metadata.offset
                    );
                }
                out.append(&mut a.live);
                reattaches += 1;
            }
            Frame::Status(s) => {
                if exit.is_some() {
                    bail!("{shell}: a second status after the exit: {s:?}");
                }
                end = Some(Instant::now());
                exit = Some(s);
            }
            Frame::Closed(code) => {
                if exit.is_none() {
                    bail!("{shell}: closed ({code:?}) before the exit status");
                }
                break;
            }
        }
    }
    let exit = exit.ok_or_else(|| anyhow!("{shell}: no exit status"))?;
    if exit.exit_code() != Some(0) {
        bail!("{shell}: exit status {exit:?}, expected code 0");
    }
    if out != *want {
        bail!("{shell}: {}", describe_mismatch(&out, &want));
    }
    Ok(StreamRun {
        start,
        end: end.unwrap_or_else(Instant::now),
        bytes: out.len() - READY.len(),
        reattaches,
    })
}

/// Benchmark 3: many shells of one session streaming to their clients at once.
async fn streams(
    ctx: &Ctx,
    ep: &Endpoint,
    session: &str,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let n = ctx.args.shell_streams;
    let lines = ctx.args.shell_lines;
    let script = format!("stty -echo && printf READY && read go && exec seq 1 {lines}");
    let shells: Vec<String> = (0..n).map(|i| format!("stream-{i}")).collect();
    for shell in &shells {
        ep.open(
            session,
            json!({"shell_id": shell, "command": ["sh", "-c", script]}),
        )
        .await?;
    }
    let want = Arc::new(expected_stream(lines));
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = shells
        .iter()
        .map(|shell| {
            tokio::spawn(stream_one(
                ep.clone(),
                session.to_string(),
                shell.clone(),
                barrier.clone(),
                want.clone(),
            ))
        })
        .collect();
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    for task in futures::future::join_all(tasks).await {
        match task {
            Ok(Ok(r)) => runs.push(r),
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("client task failed: {e}")),
        }
    }
    let wall = match (
        runs.iter().map(|r| r.start).min(),
        runs.iter().map(|r| r.end).max(),
    ) {
        (Some(a), Some(b)) => b.duration_since(a),
        _ => Duration::ZERO,
    };
    let per_shell_ms: Vec<f64> = runs.iter().map(|r| ms(r.end - r.start)).collect();
    let mbps: Vec<f64> = runs
        .iter()
        .map(|r| r.bytes as f64 / 1e6 / (r.end - r.start).as_secs_f64())
        .collect();
    let lines_per_s: Vec<f64> = runs
        .iter()
        .map(|r| lines as f64 / (r.end - r.start).as_secs_f64())
        .collect();
    let bytes: usize = runs.iter().map(|r| r.bytes).sum();
    let reattaches: usize = runs.iter().map(|r| r.reattaches).sum();
    let what = format!("{n} shells attached at once, `seq 1 {lines}` each");
    figures.push(
        Figure::single(
            "shells.streams.errors",
            &format!("{what}: clients with loss, duplication or a wrong exit status"),
            "",
            errors.len() as f64,
            "count",
        )
        .runs(n)
        .target(Target::at_most(0.0))
        .note(format!(
            "{} of {n} clients got every byte once, in order, and exit status 0; {reattaches} \
             reattaches after TooSlow",
            runs.len()
        )),
    );
    figures.push(
        Figure::single(
            "shells.streams.wall_ms",
            &format!("{what}: wall time (first Enter sent → last exit status)"),
            "ms",
            ms(wall),
            "total",
        )
        .runs(n)
        .note(format!(
            "{:.1} MB in all, {} MB/s aggregate",
            bytes as f64 / 1e6,
            num(bytes as f64 / 1e6 / wall.as_secs_f64().max(1e-9))
        )),
    );
    figures.push(Figure::from_samples(
        "shells.streams.per_shell_ms",
        "↳ streaming: per shell, Enter → exit status",
        "ms",
        &per_shell_ms,
    ));
    figures.push(Figure::from_samples(
        "shells.streams.per_shell_mbps",
        "↳ streaming: per-shell throughput",
        "MB/s",
        &mbps,
    ));
    figures.push(Figure::from_samples(
        "shells.streams.per_shell_lines_per_s",
        "↳ streaming: per-shell lines/s",
        "lines/s",
        &lines_per_s,
    ));
    if !errors.is_empty() {
        errors.sort();
        errors.truncate(5);
        notes.push(format!("streaming shell errors (first 5): {errors:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_output() {
        assert_eq!(expected_stream(3), b"READY1\r\n2\r\n3\r\n");
        let want = expected_stream(5);
        let mut got = expected_stream(5);
        got.drain(11..14); // drop "3\r\n"
        let d = describe_mismatch(&got, &want);
        assert!(d.contains("(4 lines)"), "{d}");
        assert!(d.contains("line 3"), "{d}");
    }

    #[test]
    fn fill_is_over_the_ring() {
        assert!(u64::from(FILL_LINES) * (u64::from(SCREEN_W) + 2) > RING);
        assert!(fill_script().contains("%0100g"));
    }
}

//! The benchmarks of issue 2 (and the dispatch to those of issues 3 and 4). Each adds its figures (and component timings that explain them)
//! to the report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use berth_api::{CommandEvent, CommandRequest};
use berth_client::RawEvent;
use futures::StreamExt;

use crate::host;
use crate::report::{num, Figure, Target};
use crate::server::Server;
use crate::Ctx;

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn argv(args: &[&str]) -> CommandRequest {
    CommandRequest {
        argv: Some(args.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

/// Timings and output of one command, measured from just before the request is sent.
pub(crate) struct Timed {
    pub started: Duration,
    pub exit: Duration,
    pub stdout: Vec<u8>,
}

/// Run `req` in `session` and time the `started` and `exit` events; a non-zero exit, an
/// `error` event or a missing event is an error.
pub(crate) async fn timed(ctx: &Ctx, session: &str, req: &CommandRequest) -> Result<Timed> {
    let t0 = Instant::now();
    let mut events = ctx
        .client
        .run_command(session, req)
        .await
        .with_context(|| format!("command in session {session} failed"))?;
    let mut started = None;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let b64 = base64::engine::general_purpose::STANDARD;
    while let Some(ev) = events.next().await {
        let ev = ev.with_context(|| format!("event stream of session {session} broke"))?;
        match ev {
            CommandEvent::Started { .. } => started = Some(t0.elapsed()),
            CommandEvent::Stdout { data } => b64
                .decode_vec(data, &mut stdout)
                .context("stdout event is not base64")?,
            CommandEvent::Stderr { data } => b64
                .decode_vec(data, &mut stderr)
                .context("stderr event is not base64")?,
            CommandEvent::Exit {
                code,
                signal,
                timed_out,
                ..
            } => {
                let exit = t0.elapsed();
                let started = started
                    .ok_or_else(|| anyhow!("session {session}: exit arrived before started"))?;
                if code != Some(0) {
                    bail!(
                        "session {session}: command exited with code {code:?} signal {signal:?} \
                         timed_out {timed_out}; stderr: {}",
                        String::from_utf8_lossy(&stderr)
                    );
                }
                return Ok(Timed {
                    started,
                    exit,
                    stdout,
                });
            }
            CommandEvent::Error { error } => {
                bail!(
                    "session {session}: error event: {} ({:?})",
                    error.message,
                    error.code
                )
            }
        }
    }
    bail!("session {session}: event stream ended without an exit event")
}

/// One `sandbox ready` debug line of the server log (one sandbox start).
#[derive(Debug, Clone, PartialEq)]
struct StartLine {
    /// `Existing`, `Spare` or `Formatted` (how the workspace image was provided).
    workspace: Option<String>,
    /// Stale-run check, workspace image, bundle and plan, before the helper runs.
    prepare: Option<Duration>,
    /// The sandbox helper (container create + start).
    helper: Duration,
    /// Helper start → guest `Health`.
    total: Duration,
    /// The whole driver `start()` (prepare + total).
    start: Option<Duration>,
}

/// `sandbox ready` debug lines of the server log: session id → every sandbox start, in
/// order.
fn sandbox_ready_lines(log: &str) -> BTreeMap<String, Vec<StartLine>> {
    let mut out: BTreeMap<String, Vec<StartLine>> = BTreeMap::new();
    for line in log.lines() {
        let line = strip_ansi(line);
        if !line.contains("sandbox ready") {
            continue;
        }
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_string)
        };
        let dur = |key: &str| field(key).as_deref().and_then(parse_debug_duration);
        let (Some(session), Some(helper), Some(total)) =
            (field("session="), dur("helper="), dur("total="))
        else {
            continue;
        };
        out.entry(session).or_default().push(StartLine {
            workspace: field("workspace="),
            prepare: dur("prepare="),
            helper,
            total,
            start: dur("start="),
        });
    }
    out
}

pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parse `Duration`'s `Debug` form: `12.3ms`, `1.5s`, `950µs`, `80ns`.
pub(crate) fn parse_debug_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "µs" | "us" => n / 1e6,
        "ns" => n / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

pub(crate) async fn run_all(
    ctx: &Ctx,
    server: &Server,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<()> {
    if ctx.enabled("new") {
        eprintln!("berth-bench: new session ({} runs)", ctx.args.runs);
        new_session(ctx, server, figures)
            .await
            .context("new-session benchmark")?;
    }
    if ctx.enabled("rtt") {
        eprintln!("berth-bench: round trip ({} runs)", ctx.args.runs);
        round_trip(ctx, figures)
            .await
            .context("round-trip benchmark")?;
    }
    if ctx.enabled("resume") {
        eprintln!("berth-bench: resume ({} runs)", ctx.args.runs);
        resume(ctx, server, figures)
            .await
            .context("resume benchmark")?;
    }
    if ctx.enabled("throughput") {
        eprintln!(
            "berth-bench: throughput ({} runs)",
            ctx.args.throughput_runs
        );
        throughput(ctx, figures)
            .await
            .context("throughput benchmark")?;
    }
    if ctx.enabled("memory") {
        eprintln!(
            "berth-bench: memory ({} sandboxes)",
            ctx.args.memory_sandboxes
        );
        memory(ctx, figures, notes)
            .await
            .context("memory benchmark")?;
    }
    if ctx.enabled("concurrency") {
        eprintln!(
            "berth-bench: concurrency ({} sessions × {} commands)",
            ctx.args.concurrent_sessions, ctx.args.commands_per_session
        );
        concurrency(ctx, server, figures, notes)
            .await
            .context("concurrency benchmark")?;
    }
    if ctx.enabled("shells") {
        eprintln!(
            "berth-bench: shells (echo {} runs, reattach {} runs, {} streaming shells)",
            ctx.args.echo_runs, ctx.args.reattach_runs, ctx.args.shell_streams
        );
        crate::shells::run(ctx, figures, notes)
            .await
            .context("shells benchmark")?;
    }
    if ctx.enabled("microvm") {
        eprintln!(
            "berth-bench: microvm ({} new sessions, {} idle VMs)",
            ctx.args.vm_runs, ctx.args.vm_idle
        );
        crate::microvm::run(ctx, server, figures, notes)
            .await
            .context("microvm benchmark")?;
    }
    Ok(())
}

/// The sandbox starts of `sessions` in the server log (in order, skipping `skip` starts
/// of each).
fn starts_of(server: &Server, sessions: &[String], skip: usize) -> Vec<StartLine> {
    let lines = sandbox_ready_lines(&server.log_text());
    sessions
        .iter()
        .flat_map(|s| lines.get(s).into_iter().flatten().skip(skip).cloned())
        .collect()
}

/// How many of `starts` got their workspace each way, e.g. `Spare 61, Formatted 39`.
fn workspace_counts(starts: &[StartLine]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in starts {
        *counts
            .entry(s.workspace.as_deref().unwrap_or("unlogged"))
            .or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    parts.join(", ")
}

/// Driver start-up breakdown of `starts`.
fn driver_figures(key: &str, label: &str, starts: &[StartLine]) -> Vec<Figure> {
    if starts.is_empty() {
        return vec![];
    }
    let whole: Vec<f64> = starts
        .iter()
        .map(|s| ms(s.start.unwrap_or(s.total)))
        .collect();
    let prepare: Vec<f64> = starts.iter().filter_map(|s| s.prepare.map(ms)).collect();
    let helper: Vec<f64> = starts.iter().map(|s| ms(s.helper)).collect();
    let guest: Vec<f64> = starts.iter().map(|s| ms(s.total) - ms(s.helper)).collect();
    let mut out = vec![Figure::from_samples(
        &format!("{key}.driver_ms"),
        &format!("↳ {label}: driver `start()` (server log)"),
        "ms",
        &whole,
    )
    .note(format!("workspace image: {}", workspace_counts(starts)))];
    if !prepare.is_empty() {
        out.push(Figure::from_samples(
            &format!("{key}.prepare_ms"),
            &format!("↳ {label}: driver prepare (workspace image, bundle)"),
            "ms",
            &prepare,
        ));
    }
    out.push(Figure::from_samples(
        &format!("{key}.helper_ms"),
        &format!("↳ {label}: sandbox-helper start (container create)"),
        "ms",
        &helper,
    ));
    out.push(Figure::from_samples(
        &format!("{key}.guest_wait_ms"),
        &format!("↳ {label}: wait for guest health"),
        "ms",
        &guest,
    ));
    out
}

/// How [`new_session_runs`] runs: `warmup` unmeasured then `runs` measured first
/// commands, each on a fresh id `<prefix><tag>-<i>`.
pub(crate) struct NewRuns<'a> {
    pub tag: &'a str,
    /// Runtime of the new sessions (`None` = `default`).
    pub runtime: Option<&'a str>,
    pub warmup: usize,
    pub runs: usize,
    /// Pause before each run.
    pub gap: Duration,
    /// Keep every session until the end instead of deleting it after its run.
    pub keep: bool,
    /// Print each run's time on stderr (for slow runs).
    pub progress: bool,
}

/// The measured runs of [`new_session_runs`].
pub(crate) struct NewTimes {
    /// Session ids of the measured runs, in order (all deleted by now).
    pub ids: Vec<String>,
    /// Request sent → `started` (first output), ms.
    pub started: Vec<f64>,
    /// Request sent → `exit`, ms.
    pub exit: Vec<f64>,
}

/// First command (`true`) on brand-new session ids: each request creates the session,
/// its workspace image and its sandbox. Each id is checked to be unknown to the server
/// first; each session is deleted after its run (untimed) unless `keep`, and in any
/// case before this returns.
pub(crate) async fn new_session_runs(ctx: &Ctx, how: &NewRuns<'_>) -> Result<NewTimes> {
    let req = CommandRequest {
        runtime: how.runtime.map(str::to_string),
        ..argv(&["true"])
    };
    let mut out = NewTimes {
        ids: Vec::new(),
        started: Vec::new(),
        exit: Vec::new(),
    };
    for i in 0..how.warmup + how.runs {
        let id = ctx.session(&format!("{}-{i}", how.tag));
        match ctx.client.get_session(&id).await {
            Err(e) if e.code() == Some(berth_api::ErrorCode::NotFound) => {}
            Ok(_) => bail!("session {id} exists before its first command"),
            Err(e) => return Err(e).context(format!("cannot look up session {id}")),
        }
        if !how.gap.is_zero() {
            tokio::time::sleep(how.gap).await;
        }
        let t = timed(ctx, &id, &req).await?;
        let measured = i >= how.warmup;
        if measured {
            out.started.push(ms(t.started));
            out.exit.push(ms(t.exit));
            out.ids.push(id.clone());
        }
        if how.progress {
            eprintln!(
                "berth-bench: {} run {}/{}{}: `started` after {} ms",
                how.tag,
                i + 1,
                how.warmup + how.runs,
                if measured { "" } else { " (warm-up)" },
                num(ms(t.started))
            );
        }
        if i == 0 {
            ctx.observe_cgroup(&id);
        }
        if !how.keep {
            ctx.delete(&id).await?;
        }
    }
    if how.keep {
        let failed = ctx.delete_all().await;
        if !failed.is_empty() {
            bail!("cannot delete sessions: {failed:?}");
        }
    }
    Ok(out)
}

/// Benchmark 1: First command on a brand-new session id ([`new_session_runs`]); the
/// server log tells whether the workspace came from a spare image or from mkfs (the
/// driver keeps two spares and refills them ~50 ms after use, so back to back runs can
/// empty the pool).
async fn new_session(ctx: &Ctx, server: &Server, figures: &mut Vec<Figure>) -> Result<()> {
    let NewTimes {
        ids: measured,
        started,
        exit,
    } = new_session_runs(
        ctx,
        &NewRuns {
            tag: "new",
            runtime: None,
            warmup: ctx.args.warmup,
            runs: ctx.args.runs,
            gap: Duration::from_millis(ctx.args.new_gap_ms),
            keep: ctx.args.new_keep,
            progress: false,
        },
    )
    .await?;
    let starts = starts_of(server, &measured, 0);
    if starts.len() != measured.len() {
        bail!(
            "{} `sandbox ready` lines in the server log for {} new sessions",
            starts.len(),
            measured.len()
        );
    }
    if let Some(s) = starts
        .iter()
        .find(|s| s.workspace.as_deref() == Some("Existing"))
    {
        bail!("a new session found an existing workspace image: {s:?}");
    }
    let gap = match (ctx.args.new_gap_ms, ctx.args.new_keep) {
        (0, false) => "back to back (only the untimed delete between runs)".to_string(),
        (0, true) => "back to back, sessions kept running until the end".to_string(),
        (g, false) => format!("{g} ms pause before each run"),
        (g, true) => format!("{g} ms pause before each run, sessions kept running"),
    };
    figures.push(
        Figure::from_samples(
            "new_session.started_ms",
            "new session → `started` of `true`",
            "ms",
            &started,
        )
        .target(Target::at_most(30.0))
        .note(format!(
            "{gap}; workspace image: {}",
            workspace_counts(&starts)
        )),
    );
    figures.push(Figure::from_samples(
        "new_session.exit_ms",
        "new session → `exit` of `true`",
        "ms",
        &exit,
    ));
    for kind in ["Spare", "Formatted"] {
        let of_kind: Vec<f64> = started
            .iter()
            .zip(&starts)
            .filter(|(_, s)| s.workspace.as_deref() == Some(kind))
            .map(|(t, _)| *t)
            .collect();
        if !of_kind.is_empty() && of_kind.len() < started.len() {
            figures.push(Figure::from_samples(
                &format!("new_session.started_{}_ms", kind.to_lowercase()),
                &format!("↳ new: → `started`, runs whose workspace was {kind}"),
                "ms",
                &of_kind,
            ));
        }
    }
    figures.extend(driver_figures("new_session", "new", &starts));
    Ok(())
}

/// Benchmark 2: `true` in a running session, request sent → `exit` received.
async fn round_trip(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<()> {
    let req = argv(&["true"]);
    let id = ctx.session("rtt");
    timed(ctx, &id, &req).await?;
    let mut started = Vec::new();
    let mut exit = Vec::new();
    for i in 0..ctx.args.warmup + ctx.args.runs {
        let t = timed(ctx, &id, &req).await?;
        if i >= ctx.args.warmup {
            started.push(ms(t.started));
            exit.push(ms(t.exit));
        }
    }
    ctx.delete(&id).await?;
    figures.push(
        Figure::from_samples(
            "round_trip.exit_ms",
            "round trip of `true` (running session) → `exit`",
            "ms",
            &exit,
        )
        .target(Target::at_most(3.0)),
    );
    figures.push(Figure::from_samples(
        "round_trip.started_ms",
        "↳ round trip: request → `started`",
        "ms",
        &started,
    ));
    Ok(())
}

/// Benchmark 3: Stop the session (untimed), then time a command that resumes it.
async fn resume(ctx: &Ctx, server: &Server, figures: &mut Vec<Figure>) -> Result<()> {
    let req = argv(&["true"]);
    let id = ctx.session("resume");
    timed(ctx, &id, &req).await?;
    let mut started = Vec::new();
    let mut exit = Vec::new();
    let mut stop = Vec::new();
    for i in 0..ctx.args.warmup + ctx.args.runs {
        let t0 = Instant::now();
        ctx.client
            .stop_session(&id)
            .await
            .with_context(|| format!("cannot stop session {id}"))?;
        let stopped = t0.elapsed();
        let t = timed(ctx, &id, &req).await?;
        if i >= ctx.args.warmup {
            started.push(ms(t.started));
            exit.push(ms(t.exit));
            stop.push(ms(stopped));
        }
    }
    ctx.delete(&id).await?;
    figures.push(
        Figure::from_samples(
            "resume.started_ms",
            "resume stopped session → `started` of `true`",
            "ms",
            &started,
        )
        .target(Target::at_most(30.0)),
    );
    figures.push(Figure::from_samples(
        "resume.exit_ms",
        "resume stopped session → `exit` of `true`",
        "ms",
        &exit,
    ));
    figures.push(Figure::from_samples(
        "resume.stop_ms",
        "↳ resume: `POST …/stop` (untimed above)",
        "ms",
        &stop,
    ));
    // The session's first start and the warm-up resumes are not measured.
    let starts = starts_of(server, std::slice::from_ref(&id), 1 + ctx.args.warmup);
    figures.extend(driver_figures("resume", "resume", &starts));
    Ok(())
}

/// CPU seconds used so far by this process (the API client), the server, the sandbox
/// cgroup (guest + the command), and this process's reaped children (`berth exec`).
#[derive(Debug, Clone, Copy)]
struct Cpu {
    client: f64,
    server: f64,
    sandbox: f64,
    children: f64,
}

impl Cpu {
    fn now(ctx: &Ctx, session: &str) -> Self {
        let cpu = |pid: Option<u32>| pid.and_then(host::proc_cpu_seconds).unwrap_or(f64::NAN);
        let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        let children = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
            .map_or(f64::NAN, |u| tv(u.user_time()) + tv(u.system_time()));
        Self {
            client: cpu(Some(std::process::id())),
            server: cpu(ctx.server_pid),
            sandbox: host::sandbox_cpu_ns(session).map_or(f64::NAN, |n| n as f64 / 1e9),
            children,
        }
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            client: self.client - earlier.client,
            server: self.server - earlier.server,
            sandbox: self.sandbox - earlier.sandbox,
            children: self.children - earlier.children,
        }
    }
}

/// One streamed throughput run.
struct Stream {
    wall: Duration,
    /// Output bytes that reached the client (decoded, for NDJSON).
    payload: u64,
    /// HTTP body bytes (NDJSON only; the frame client hands out payloads).
    wire: Option<u64>,
    /// Stdout frames (frames only).
    frames: Option<u64>,
    /// CPU used by the client side: this process, or the `berth exec` process.
    client_cpu_s: f64,
    server_cpu_s: f64,
    sandbox_cpu_s: f64,
}

impl Stream {
    fn new(wall: Duration, payload: u64, cpu: Cpu, client_is_child: bool) -> Self {
        Self {
            wall,
            payload,
            wire: None,
            frames: None,
            client_cpu_s: if client_is_child {
                cpu.children
            } else {
                cpu.client
            },
            server_cpu_s: cpu.server,
            sandbox_cpu_s: cpu.sandbox,
        }
    }
}

/// True when every byte is zero (an OR reduction, which the compiler vectorises).
fn all_zero(buf: &[u8]) -> bool {
    buf.iter().fold(0u8, |acc, b| acc | b) == 0
}

fn head_zero(bytes: u64) -> CommandRequest {
    argv(&["head", "-c", &bytes.to_string(), "/dev/zero"])
}

/// The same bytes from a producer that writes 1 MiB at a time: `head` writes 4 KiB per
/// call, so this separates Berth's transport from the producer's own syscall cost.
fn dd_zero(bytes: u64) -> CommandRequest {
    let count = bytes.div_ceil(1 << 20).to_string();
    argv(&[
        "dd",
        "if=/dev/zero",
        "bs=1M",
        &format!("count={count}"),
        "status=none",
    ])
}

/// Stream `head -c N /dev/zero` over the API as NDJSON: split lines, parse each event
/// and decode its base64, as a client of the default encoding must.
async fn stream_ndjson_once(ctx: &Ctx, id: &str, bytes: u64) -> Result<Stream> {
    let req = head_zero(bytes);
    let before = Cpu::now(ctx, id);
    let t0 = Instant::now();
    let resp = ctx
        .http
        .post(format!("{}/v1/sessions/{id}/commands", ctx.url))
        .bearer_auth(&ctx.token)
        .json(&req)
        .send()
        .await
        .context("throughput request failed")?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        bail!("throughput request: HTTP {status}: {body}");
    }
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut out: Vec<u8> = Vec::with_capacity(1 << 20);
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut decoded, mut wire, mut exit_code) = (0u64, 0u64, None);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("throughput stream broke")?;
        wire += chunk.len() as u64;
        buf.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|b| *b == b'\n') {
            let line = &buf[start..start + pos];
            start += pos + 1;
            match serde_json::from_slice::<CommandEvent>(line).context("bad event line")? {
                CommandEvent::Stdout { data } => {
                    out.clear();
                    b64.decode_vec(data, &mut out)
                        .context("stdout is not base64")?;
                    if !all_zero(&out) {
                        bail!("/dev/zero produced a non-zero byte at the client");
                    }
                    decoded += out.len() as u64;
                }
                CommandEvent::Exit { code, .. } => exit_code = Some(code),
                CommandEvent::Error { error } => bail!("error event: {}", error.message),
                CommandEvent::Started { .. } | CommandEvent::Stderr { .. } => {}
            }
        }
        buf.drain(..start);
    }
    let wall = t0.elapsed();
    let cpu = Cpu::now(ctx, id).since(before);
    if exit_code != Some(Some(0)) {
        bail!("head exited with {exit_code:?}");
    }
    if decoded != bytes {
        bail!("received {decoded} bytes of {bytes}");
    }
    let mut s = Stream::new(wall, decoded, cpu, false);
    s.wire = Some(wire);
    Ok(s)
}

/// Stream `head -c N /dev/zero` as binary frames through `Client::run_command_raw`,
/// counting (and checking) the raw payload bytes.
async fn stream_frames_once(
    ctx: &Ctx,
    id: &str,
    req: CommandRequest,
    bytes: u64,
) -> Result<Stream> {
    let before = Cpu::now(ctx, id);
    let t0 = Instant::now();
    let mut events = ctx
        .client
        .run_command_raw(id, &req)
        .await
        .context("throughput request (frames) failed")?;
    let (mut payload, mut frames, mut exit_code) = (0u64, 0u64, None);
    while let Some(ev) = events.next().await {
        match ev.context("frame stream broke")? {
            RawEvent::Stdout(data) => {
                if !all_zero(&data) {
                    bail!("/dev/zero produced a non-zero byte at the client");
                }
                payload += data.len() as u64;
                frames += 1;
            }
            RawEvent::Event(CommandEvent::Exit { code, .. }) => exit_code = Some(code),
            RawEvent::Event(CommandEvent::Error { error }) => {
                bail!("error event: {}", error.message)
            }
            RawEvent::Stderr(_) | RawEvent::Event(_) => {}
        }
    }
    let wall = t0.elapsed();
    let cpu = Cpu::now(ctx, id).since(before);
    if exit_code != Some(Some(0)) {
        bail!("head exited with {exit_code:?}");
    }
    if payload != bytes {
        bail!("received {payload} bytes of {bytes}");
    }
    let mut s = Stream::new(wall, payload, cpu, false);
    s.frames = Some(frames);
    Ok(s)
}

/// `berth exec --session S -- head -c N /dev/zero > /dev/null`: wall time of the CLI
/// process (start-up, connect, frames, writes to /dev/null, exit).
async fn stream_cli_once(ctx: &Ctx, id: &str, bytes: u64) -> Result<Stream> {
    let before = Cpu::now(ctx, id);
    let t0 = Instant::now();
    let status = tokio::process::Command::new(&ctx.args.berth)
        .args(["exec", "--session", id, "--", "head", "-c"])
        .arg(bytes.to_string())
        .arg("/dev/zero")
        .env("BERTH_URL", &ctx.url)
        .env("BERTH_TOKEN", &ctx.token)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .context("cannot run berth exec")?;
    let wall = t0.elapsed();
    let cpu = Cpu::now(ctx, id).since(before);
    if !status.success() {
        bail!("berth exec … head -c {bytes} /dev/zero failed: {status}");
    }
    Ok(Stream::new(wall, bytes, cpu, true))
}

/// The figure for one throughput path, with its CPU split per GB in the note.
fn throughput_figure(key: &str, name: &str, client: &str, runs: &[Stream]) -> Figure {
    let mbps: Vec<f64> = runs
        .iter()
        .map(|r| r.payload as f64 / r.wall.as_secs_f64() / 1e6)
        .collect();
    let median = |v: Vec<f64>| crate::stats::Summary::of(&v).map_or(f64::NAN, |s| s.p50);
    let per_gb = |f: fn(&Stream) -> f64| {
        median(
            runs.iter()
                .map(|r| f(r) / (r.payload as f64 / 1e9))
                .collect(),
        )
    };
    let mut note = format!(
        "per GB of payload (medians): wall {} s, CPU: client {} s ({client}), server {} s, \
         sandbox cgroup {} s (guest + head)",
        num(per_gb(|r| r.wall.as_secs_f64())),
        num(per_gb(|r| r.client_cpu_s)),
        num(per_gb(|r| r.server_cpu_s)),
        num(per_gb(|r| r.sandbox_cpu_s)),
    );
    let wire: Vec<f64> = runs
        .iter()
        .filter_map(|r| Some(r.wire? as f64 / r.payload as f64))
        .collect();
    if !wire.is_empty() {
        let _ = write!(note, "; wire/payload bytes {}", num(median(wire)));
    }
    let frame_kib: Vec<f64> = runs
        .iter()
        .filter_map(|r| Some(r.payload as f64 / r.frames?.max(1) as f64 / 1024.0))
        .collect();
    if !frame_kib.is_empty() {
        let _ = write!(note, "; mean stdout frame {} KiB", num(median(frame_kib)));
    }
    Figure::from_samples(key, name, "MB/s", &mbps)
        .target(Target::at_least(1000.0))
        .note(note)
}

/// Benchmark 4: Output throughput of `head -c N /dev/zero` three ways: NDJSON with
/// base64 decoded by the client, binary frames through `run_command_raw`, and
/// `berth exec > /dev/null` (which uses frames). The paths take turns run by run, so
/// drifting machine load hits them alike.
async fn throughput(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<()> {
    let bytes = ctx.args.throughput_bytes;
    let id = ctx.session("tput");
    timed(ctx, &id, &argv(&["true"])).await?;
    ctx.observe_cgroup(&id);
    let (mut ndjson, mut frames, mut frames_dd, mut cli) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..ctx.args.throughput_runs {
        eprintln!("berth-bench: throughput run {}", i + 1);
        ndjson.push(stream_ndjson_once(ctx, &id, bytes).await?);
        frames.push(stream_frames_once(ctx, &id, head_zero(bytes), bytes).await?);
        let dd_bytes = bytes.div_ceil(1 << 20) << 20;
        frames_dd.push(stream_frames_once(ctx, &id, dd_zero(bytes), dd_bytes).await?);
        if !ctx.args.skip_cli {
            cli.push(stream_cli_once(ctx, &id, bytes).await?);
        }
    }
    let what = format!("`head -c {bytes} /dev/zero`, MB = 10^6 B");
    figures.push(
        throughput_figure(
            "throughput.api_mb_s",
            "output throughput, API NDJSON + base64 (decoded)",
            "HTTP + JSON parse + base64 decode",
            &ndjson,
        )
        .note_prefix(&what),
    );
    figures.push(throughput_figure(
        "throughput.frames_mb_s",
        "output throughput, API binary frames (`run_command_raw`)",
        "HTTP + frame split",
        &frames,
    ));
    figures.push(throughput_figure(
        "throughput.frames_dd_mb_s",
        "output throughput, API binary frames, `dd bs=1M` producer",
        "HTTP + frame split",
        &frames_dd,
    ));
    if !cli.is_empty() {
        figures.push(throughput_figure(
            "throughput.cli_mb_s",
            "output throughput, `berth exec > /dev/null` (frames)",
            "the `berth exec` process",
            &cli,
        ));
    }
    ctx.delete(&id).await?;
    Ok(())
}

/// Benchmark 5: Memory of idle sandboxes: RSS/PSS of every process in each sandbox cgroup, and
/// each cgroup's own accounting.
async fn memory(ctx: &Ctx, figures: &mut Vec<Figure>, notes: &mut Vec<String>) -> Result<()> {
    let n = ctx.args.memory_sandboxes;
    let ids: Vec<String> = (0..n).map(|i| ctx.session(&format!("mem-{i}"))).collect();
    for id in &ids {
        timed(ctx, id, &argv(&["true"])).await?;
        ctx.observe_cgroup(id);
    }
    tokio::time::sleep(Duration::from_secs(ctx.args.memory_settle_s)).await;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let (mut rss, mut pss, mut usage, mut anon, mut cache, mut nprocs) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut by_comm: BTreeMap<String, (u64, u64, usize)> = BTreeMap::new();
    let mut outside: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for id in &ids {
        let pids = host::sandbox_pids(id);
        if pids.is_empty() {
            bail!("no processes found in the cgroup of session {id}");
        }
        let procs: Vec<host::ProcMemory> =
            pids.iter().filter_map(|p| host::proc_memory(*p)).collect();
        rss.push(mib(procs.iter().map(|p| p.rss_bytes).sum()));
        pss.push(mib(procs.iter().map(|p| p.pss_bytes).sum()));
        nprocs.push(procs.len() as f64);
        for p in &procs {
            let e = by_comm.entry(p.comm.clone()).or_default();
            e.0 += p.rss_bytes;
            e.1 += p.pss_bytes;
            e.2 += 1;
        }
        let mem =
            host::sandbox_memory(id).ok_or_else(|| anyhow!("no memory cgroup for session {id}"))?;
        usage.push(mib(mem.usage));
        anon.push(mib(mem.anon));
        cache.push(mib(mem.cache));
        let mut exclude = pids.clone();
        exclude.extend(ctx.server_pid.map(|p| p as i32));
        for pid in host::host_side_pids(id, &exclude) {
            if let Some(p) = host::proc_memory(pid) {
                let e = outside.entry(p.comm).or_default();
                e.0 += p.pss_bytes;
                e.1 += 1;
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let per = |v: &[f64], key: &str, name: &str| {
        let mut f = Figure::from_samples(key, name, "MiB", v);
        f.value = mean(v);
        f.value_is = "mean";
        f
    };
    figures.push(
        per(
            &pss,
            "memory.pss_mib",
            "host memory per idle sandbox, PSS of its processes",
        )
        .target(Target::at_most(8.0))
        .note(format!(
            "{n} idle sandboxes; value = sum over sandboxes / {n}"
        )),
    );
    figures.push(per(
        &rss,
        "memory.rss_mib",
        "host memory per idle sandbox, RSS of its processes",
    ));
    figures.push(
        per(&usage, "memory.cgroup_usage_mib", "host memory per idle sandbox, cgroup usage")
            .note(format!(
                "memory.usage_in_bytes (v1) / memory.current (v2); of which anon mean {} MiB, page cache mean {} MiB",
                num(mean(&anon)),
                num(mean(&cache))
            )),
    );
    let comm: Vec<String> = by_comm
        .iter()
        .map(|(c, (r, p, k))| {
            format!(
                "{c} ×{} per sandbox: PSS {} MiB, RSS {} MiB",
                num(*k as f64 / n as f64),
                num(mib(*p) / n as f64),
                num(mib(*r) / n as f64)
            )
        })
        .collect();
    notes.push(format!(
        "memory: processes per idle sandbox (mean {}): {}",
        num(mean(&nprocs)),
        comm.join("; ")
    ));
    if !outside.is_empty() {
        let o: Vec<String> = outside
            .iter()
            .map(|(c, (p, k))| format!("{c} ×{k}: PSS {} MiB per sandbox", num(mib(*p) / n as f64)))
            .collect();
        notes.push(format!(
            "memory: host processes outside the sandbox cgroups naming a session (not counted above): {}",
            o.join("; ")
        ));
    }
    for id in &ids {
        ctx.delete(id).await?;
    }
    Ok(())
}

/// Benchmark 6: Many sessions at once, each running `echo hi` several times.
async fn concurrency(
    ctx: &Ctx,
    server: &Server,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let n = ctx.args.concurrent_sessions;
    let k = ctx.args.commands_per_session;
    let ids: Vec<String> = (0..n).map(|i| ctx.session(&format!("conc-{i}"))).collect();
    let req = argv(&["echo", "hi"]);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let t0 = Instant::now();
    let results: Vec<Vec<Result<Duration>>> = futures::future::join_all(ids.iter().map(|id| {
        let barrier = barrier.clone();
        let req = req.clone();
        async move {
            barrier.wait().await;
            let mut out = Vec::with_capacity(k);
            for _ in 0..k {
                let r = timed(ctx, id, &req).await.and_then(|t| {
                    if t.stdout == b"hi\n" {
                        Ok(t.exit)
                    } else {
                        Err(anyhow!(
                            "session {id}: stdout {:?}",
                            String::from_utf8_lossy(&t.stdout)
                        ))
                    }
                });
                out.push(r);
            }
            out
        }
    }))
    .await;
    let wall = t0.elapsed();
    let mut first = Vec::new();
    let mut warm = Vec::new();
    let mut errors = Vec::new();
    for per_session in &results {
        for (i, r) in per_session.iter().enumerate() {
            match r {
                Ok(d) if i == 0 => first.push(ms(*d)),
                Ok(d) => warm.push(ms(*d)),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    let all: Vec<f64> = first.iter().chain(&warm).copied().collect();
    figures.push(
        Figure::single(
            "concurrency.errors",
            &format!("{n} concurrent sessions × {k} `echo hi`: errors"),
            "",
            errors.len() as f64,
            "count",
        )
        .runs(n * k)
        .target(Target::at_most(0.0)),
    );
    figures.push(
        Figure::single(
            "concurrency.wall_s",
            &format!("{n} concurrent sessions × {k} `echo hi`: wall time"),
            "s",
            wall.as_secs_f64(),
            "total",
        )
        .runs(n * k),
    );
    figures.push(Figure::from_samples(
        "concurrency.latency_ms",
        "↳ concurrent: per-command latency, all",
        "ms",
        &all,
    ));
    figures.push(Figure::from_samples(
        "concurrency.first_ms",
        "↳ concurrent: first command (creates the sandbox)",
        "ms",
        &first,
    ));
    figures.push(Figure::from_samples(
        "concurrency.warm_ms",
        "↳ concurrent: later commands (running sandbox)",
        "ms",
        &warm,
    ));
    if let Some(id) = ids.first() {
        ctx.observe_cgroup(id);
    }
    let starts = starts_of(server, &ids, 0);
    let driver: Vec<f64> = starts
        .iter()
        .map(|s| ms(s.start.unwrap_or(s.total)))
        .collect();
    if let Some(d) = crate::stats::Summary::of(&driver) {
        notes.push(format!(
            "concurrency: {} sandbox starts (workspace image: {}); driver `start()` p50 {} ms, \
             p95 {} ms, max {} ms",
            starts.len(),
            workspace_counts(&starts),
            num(d.p50),
            num(d.p95),
            num(d.max)
        ));
    }
    if !errors.is_empty() {
        errors.sort();
        errors.dedup();
        errors.truncate(5);
        notes.push(format!("concurrency errors (first distinct): {errors:?}"));
    }
    let failed = ctx.delete_all().await;
    if !failed.is_empty() {
        bail!("cannot delete sessions: {failed:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_debug_duration("12.5ms"),
            Some(Duration::from_micros(12_500))
        );
        assert_eq!(
            parse_debug_duration("1.5s"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_debug_duration("950µs"),
            Some(Duration::from_micros(950))
        );
        assert_eq!(parse_debug_duration("ms"), None);
    }

    #[test]
    fn ready_lines() {
        let log = "2025-01-01T00:00:00Z \u{1b}[34mDEBUG\u{1b}[0m berth_sandbox::namespace: sandbox ready session=s1 workspace=Spare prepare=0.8ms helper=10.5ms total=20ms start=20.8ms\n\
                   other line\n\
                   2025-01-01T00:00:01Z DEBUG berth_sandbox::namespace: sandbox ready session=s1 helper=1ms total=2ms\n";
        let m = sandbox_ready_lines(log);
        assert_eq!(
            m["s1"],
            vec![
                StartLine {
                    workspace: Some("Spare".into()),
                    prepare: Some(Duration::from_micros(800)),
                    helper: Duration::from_micros(10_500),
                    total: Duration::from_millis(20),
                    start: Some(Duration::from_micros(20_800)),
                },
                StartLine {
                    workspace: None,
                    prepare: None,
                    helper: Duration::from_millis(1),
                    total: Duration::from_millis(2),
                    start: None,
                }
            ]
        );
        assert_eq!(workspace_counts(&m["s1"]), "Spare 1, unlogged 1");
    }

    #[test]
    fn zeros() {
        assert!(all_zero(&[0; 4097]));
        let mut v = vec![0u8; 4097];
        v[4000] = 1;
        assert!(!all_zero(&v));
    }
}

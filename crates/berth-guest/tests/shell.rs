//! End-to-end tests of interactive shells: the agent runs as a separate process (this
//! test binary re-executed into `agent_process`), the tests drive it through the guest
//! protocol with the real client, as the server will. No root needed.

#![allow(clippy::unwrap_used)]

mod common;

use std::num::NonZeroU16;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_guest::client::{shell_attach, Guest, ShellAttachment};
use berth_guest::proto::{
    shell_output, Empty, Exited, ShellAttachStart, ShellAttached, ShellInfo, ShellInput,
    ShellKillRequest, ShellOpenRequest,
};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tonic::Code;

use common::TestAgent;

/// Guard against hangs only: no test asserts how long anything takes.
const PATIENCE: Duration = Duration::from_secs(60);

/// Not a test: the agent process of the other tests (see `common::TestAgent`).
#[test]
fn agent_process() {
    common::agent_process_entry();
}

/// A predictable interactive bash: no rc files, prompt `$ `.
fn bash(id: &str) -> ShellOpenRequest {
    ShellOpenRequest {
        shell_id: id.into(),
        argv: vec![
            "bash".into(),
            "--norc".into(),
            "--noprofile".into(),
            "-i".into(),
        ],
        env: [("PS1".to_string(), "$ ".to_string())].into(),
        ..Default::default()
    }
}

async fn open(guest: &mut Guest, req: ShellOpenRequest) -> ShellInfo {
    guest.shell_open(req).await.unwrap().into_inner()
}

fn attach_req(id: &str) -> ShellAttachStart {
    ShellAttachStart {
        shell_id: id.into(),
        ..Default::default()
    }
}

/// One attached client and everything it has received.
struct Term {
    att: ShellAttachment,
    attached: ShellAttached,
    snapshot: Option<Vec<u8>>,
    /// Output bytes, starting at `attached.offset`.
    seen: Vec<u8>,
    /// Offset of the next byte expected (checked against every chunk).
    next: u64,
    notices: Vec<(i32, String)>,
    heartbeats: usize,
    exited: Option<Exited>,
    /// `resized` events (recorders only): the length of `seen` when each came, and
    /// the size.
    resizes: Vec<(usize, u32, u32)>,
}

impl Term {
    async fn attach(guest: &mut Guest, start: ShellAttachStart) -> Term {
        let mut att = shell_attach(guest, start).await.unwrap();
        let first = att.output.message().await.unwrap().unwrap();
        let Some(shell_output::Kind::Attached(attached)) = first.kind else {
            panic!("first output is not `attached`: {first:?}");
        };
        let mut term = Term {
            next: attached.offset,
            attached,
            att,
            snapshot: None,
            seen: Vec::new(),
            notices: Vec::new(),
            heartbeats: 0,
            exited: None,
            resizes: Vec::new(),
        };
        if term.attached.snapshot {
            match term.att.output.message().await.unwrap().unwrap().kind {
                Some(shell_output::Kind::Snapshot(s)) => term.snapshot = Some(s.to_vec()),
                other => panic!("expected a snapshot, got {other:?}"),
            }
        }
        term
    }

    async fn send(&self, input: ShellInput) {
        self.att.input.send(input).await.unwrap();
    }

    async fn type_str(&self, s: &str) {
        self.send(ShellInput::stdin(s.as_bytes().to_vec())).await;
    }

    /// Receive one message; false at the end of the stream.
    async fn step(&mut self) -> Result<bool, tonic::Status> {
        let Ok(msg) = tokio::time::timeout(PATIENCE, self.att.output.message()).await else {
            panic!(
                "no shell output for a long time; saw {:?}",
                String::from_utf8_lossy(&self.seen)
            );
        };
        let msg = msg?;
        let Some(msg) = msg else {
            return Ok(false);
        };
        assert!(self.exited.is_none(), "output after exited: {msg:?}");
        match msg.kind.unwrap() {
            shell_output::Kind::Output(d) => {
                assert_eq!(d.offset, self.next, "output offsets must be contiguous");
                self.next += d.data.len() as u64;
                self.seen.extend_from_slice(&d.data);
            }
            shell_output::Kind::Notice(n) => self.notices.push((n.code, n.message)),
            shell_output::Kind::Heartbeat(_) => self.heartbeats += 1,
            shell_output::Kind::Exited(e) => self.exited = Some(e),
            shell_output::Kind::Resized(size) => {
                self.resizes
                    .push((self.seen.len(), size.width, size.height))
            }
            other => panic!("unexpected output {other:?}"),
        }
        Ok(true)
    }

    /// Read until `needle` has been seen after position `from` of `seen`.
    async fn wait_for_from(&mut self, from: usize, needle: &str) {
        let mut start = from.min(self.seen.len());
        while !contains(&self.seen[start..], needle.as_bytes()) {
            // Only the new bytes (and a needle's length before them) need searching.
            start = self.seen.len().saturating_sub(needle.len()).max(start);
            assert!(
                self.step().await.unwrap(),
                "stream ended before {needle:?}; saw {:?}",
                String::from_utf8_lossy(&self.seen)
            );
        }
    }

    async fn wait_for(&mut self, needle: &str) {
        self.wait_for_from(0, needle).await;
    }

    /// Type a command and wait for a marker it prints (computed by the shell, so the
    /// echo of the typed line does not match).
    async fn run(&mut self, command: &str, marker: &str) {
        let from = self.seen.len();
        self.type_str(&format!("{command}\r")).await;
        self.wait_for_from(from, marker).await;
    }

    async fn wait_exit(&mut self) -> Exited {
        while self.step().await.unwrap() {}
        self.exited.expect("stream ended without exited")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn model(width: u16, height: u16, bytes: &[u8]) -> vt100::Parser {
    let mut p = vt100::Parser::new(
        NonZeroU16::new(height).unwrap(),
        NonZeroU16::new(width).unwrap(),
        0,
    );
    p.process(bytes);
    p
}

/// Children of `parent` whose command name is `comm`.
fn children_named(parent: u32, comm: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let ppid: u32 = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if name == comm && ppid == parent {
            found.push(pid);
        }
    }
    found
}

async fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let begin = Instant::now();
    while !cond() {
        assert!(begin.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

async fn list(guest: &mut Guest) -> Vec<ShellInfo> {
    guest
        .shell_list(Empty {})
        .await
        .unwrap()
        .into_inner()
        .shells
}

#[tokio::test]
async fn echo_heartbeat_and_default_shell() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let info = open(&mut guest, bash("one")).await;
    assert_eq!(info.shell_id, "one");
    assert!(info.running);
    assert_eq!((info.width, info.height), (80, 24));
    let mut t = Term::attach(&mut guest, attach_req("one")).await;
    assert!(!t.attached.reconnected);
    t.run("echo hi", "\rhi\r\n").await;
    t.send(ShellInput::heartbeat()).await;
    while t.heartbeats == 0 {
        assert!(t.step().await.unwrap());
    }

    // No argv and no id: a login shell (bash -l where /bin/bash exists) and an id.
    let info = open(&mut guest, ShellOpenRequest::default()).await;
    assert!(info.shell_id.starts_with("sh-"), "{}", info.shell_id);
    let expected = if Path::new("/bin/bash").exists() {
        ["bash", "-l"]
    } else {
        ["sh", "-l"]
    };
    assert_eq!(info.argv, expected);
    let mut t = Term::attach(&mut guest, attach_req(&info.shell_id)).await;
    t.run(
        "echo \"term=$TERM sum=$((2+3))\"",
        "term=xterm-256color sum=5",
    )
    .await;
}

#[tokio::test]
async fn colours_pass_through() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    open(&mut guest, bash("c")).await;
    let mut t = Term::attach(&mut guest, attach_req("c")).await;
    // A directory in ls's default colours: bold blue.
    t.run("ls --color=always -d /", "\x1b[01;34m/").await;
}

#[tokio::test]
async fn resize_changes_stty_size() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    open(
        &mut guest,
        ShellOpenRequest {
            width: 90,
            height: 20,
            ..bash("r")
        },
    )
    .await;
    let mut t = Term::attach(&mut guest, attach_req("r")).await;
    t.run("stty size", "\r20 90\r\n").await;
    t.send(ShellInput::resize(132, 43)).await;
    t.run("stty size", "\r43 132\r\n").await;
    let info = &list(&mut guest).await[0];
    assert_eq!((info.width, info.height), (132, 43));
    // A read-write client's size at attach applies too.
    drop(t);
    let mut t = Term::attach(
        &mut guest,
        ShellAttachStart {
            width: 100,
            height: 30,
            ..attach_req("r")
        },
    )
    .await;
    assert_eq!((t.attached.width, t.attached.height), (100, 30));
    t.run("stty size", "\r30 100\r\n").await;
    // Out-of-range sizes are refused with a notice, the attachment lives on.
    t.send(ShellInput::resize(0, 5)).await;
    while t.notices.is_empty() {
        assert!(t.step().await.unwrap());
    }
    assert_eq!(t.notices[0].0, Code::InvalidArgument as i32);
    t.run("stty size", "\r30 100\r\n").await;
}

#[tokio::test]
async fn ctrl_c_interrupts_the_foreground_job_and_the_shell_survives() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let info = open(&mut guest, bash("i")).await;
    let mut t = Term::attach(&mut guest, attach_req("i")).await;
    t.type_str("sleep 100; echo after-$((40+2))\r").await;
    wait_until(
        || !children_named(info.pid, "sleep").is_empty(),
        "sleep to start",
    )
    .await;
    let sleep = children_named(info.pid, "sleep")[0];
    t.send(ShellInput::stdin(vec![0x03])).await;
    wait_until(|| !alive(sleep), "sleep to die").await;
    t.run("echo alive-$((1+1))", "alive-2").await;
    // SIGINT ended `sleep` and with it the rest of the list.
    assert!(!t.text().contains("after-42"), "{}", t.text());
    assert!(list(&mut guest).await[0].running);
}

#[tokio::test]
async fn reattach_without_offset_gets_a_snapshot_of_the_screen() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    open(&mut guest, bash("s")).await;
    let mut t = Term::attach(&mut guest, attach_req("s")).await;
    t.run("printf '\\033[1;31mred-%s\\033[0m\\n' $((6*7))", "red-42")
        .await;
    t.run("echo plain-$((1+2))", "plain-3").await;
    // The next prompt, so the snapshot below is taken with the shell at rest.
    while !t.seen.ends_with(b"$ ") {
        assert!(t.step().await.unwrap(), "no prompt after plain-3");
    }
    drop(t);

    let t = Term::attach(&mut guest, attach_req("s")).await;
    assert!(t.attached.snapshot);
    let snap = t.snapshot.clone().unwrap();
    let screen = model(80, 24, &snap);
    let text = screen.screen().contents();
    assert!(text.contains("red-42"), "{text}");
    assert!(text.contains("plain-3"), "{text}");
    // Attributes are part of the redraw: the `r` of red-42 is bold red.
    let row = text.lines().position(|l| l.starts_with("red-42")).unwrap();
    let cell = screen.screen().cell(row as u16, 0).unwrap();
    assert!(cell.bold());
    assert_eq!(cell.fgcolor(), vt100::Color::Idx(1));
    // The cursor sits after the last prompt, as on the shell's own screen.
    let (crow, ccol) = screen.screen().cursor_position();
    assert_eq!(ccol, 2, "cursor after `$ `");
    assert!(text.lines().nth(crow as usize).unwrap().starts_with("$"));
}

#[tokio::test]
async fn full_screen_programs_are_redrawn_in_the_alternate_screen() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    open(&mut guest, bash("alt")).await;
    let mut t = Term::attach(&mut guest, attach_req("alt")).await;
    t.run("echo main-$((5+5))", "main-10").await;
    t.type_str(
        "printf '\\033[?1049h\\033[?1h\\033[H\\033[2Jfull-%s\\033[5;3Hbody' $((7*7)); read x; printf '\\033[?1049l'\r",
    )
    .await;
    // The echo of the typed line holds "body" too (after a literal `\033[5;3H`): wait
    // for the escape sequence itself, which only printf's output has.
    t.wait_for("\x1b[5;3Hbody").await;
    drop(t);

    let mut t = Term::attach(&mut guest, attach_req("alt")).await;
    let mut screen = model(80, 24, t.snapshot.as_ref().unwrap());
    assert!(screen.screen().alternate_screen());
    assert!(screen.screen().application_cursor());
    let text = screen.screen().contents();
    assert!(text.starts_with("full-49"), "{text}");
    assert!(!text.contains("main-10"), "{text}");
    assert_eq!(screen.screen().cursor_position(), (4, 6));
    // Leaving the full-screen program shows the normal screen, as it was.
    let from = t.seen.len();
    t.type_str("\r").await;
    t.wait_for_from(from, "\x1b[?1049l").await;
    screen.process(&t.seen);
    assert!(!screen.screen().alternate_screen());
    assert!(screen.screen().contents().contains("main-10"));
}

#[tokio::test]
async fn vim_is_redrawn_after_reattach() {
    if !Path::new("/usr/bin/vim").exists() {
        eprintln!("skipped: no vim");
        return;
    }
    let agent = TestAgent::start();
    let file = agent.path("notes.txt");
    std::fs::write(&file, "first line of notes\nsecond-line\n").unwrap();
    let mut guest = agent.connect().await;
    open(&mut guest, bash("vim")).await;
    let mut t = Term::attach(&mut guest, attach_req("vim")).await;
    t.type_str(&format!("vim -u NONE -i NONE -N -n {}\r", file.display()))
        .await;
    t.wait_for("second-line").await;
    drop(t);
    let mut t = Term::attach(&mut guest, attach_req("vim")).await;
    let screen = model(80, 24, t.snapshot.as_ref().unwrap());
    assert!(screen.screen().alternate_screen());
    let text = screen.screen().contents();
    assert!(
        text.starts_with("first line of notes\nsecond-line\n~"),
        "{text}"
    );
    assert!(text.contains("notes.txt"), "{text}");
    t.type_str("\x1b:q!\r").await;
    // (Typing on before vim is gone would feed the keys to vim.)
    t.wait_for("\x1b[?1049l").await;
    t.run("echo back-$((2*4))", "back-8").await;
}

/// Numbers of the `n<k>` lines in `text`, in order.
fn counter_lines(text: &str) -> Vec<u32> {
    text.split(['\r', '\n'])
        .filter_map(|l| l.strip_prefix('n').and_then(|n| n.parse().ok()))
        .collect()
}

#[tokio::test]
async fn reconnect_with_an_offset_loses_and_duplicates_nothing() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    open(&mut guest, bash("count")).await;
    let mut t = Term::attach(&mut guest, attach_req("count")).await;
    t.type_str(
        "i=0; while [ $i -lt 400 ]; do echo n$i; i=$((i+1)); sleep 0.01; done; echo done-$((6*7))\r",
    )
    .await;
    let mut received = Vec::new();
    for round in 0..4 {
        // Read a while, then drop the connection mid-stream.
        t.wait_for("\r\nn").await;
        for _ in 0..3 {
            t.step().await.unwrap();
        }
        received.extend_from_slice(&t.seen);
        let offset = t.next;
        drop(t);
        // Output goes on while nobody is attached.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut fresh = agent.connect().await;
        t = Term::attach(
            &mut fresh,
            ShellAttachStart {
                offset: Some(offset),
                ..attach_req("count")
            },
        )
        .await;
        assert!(t.attached.reconnected, "round {round}");
        assert!(!t.attached.snapshot, "round {round}");
        assert_eq!(t.attached.offset, offset);
    }
    t.wait_for("done-42").await;
    received.extend_from_slice(&t.seen);
    let text = String::from_utf8_lossy(&received);
    let numbers = counter_lines(&text);
    let expected: Vec<u32> = (0..400).collect();
    if numbers != expected {
        let at = numbers.iter().zip(&expected).position(|(a, b)| a != b);
        panic!(
            "counter lines differ at {at:?}: {:?}\n{text:?}",
            &numbers[at.unwrap_or(0).saturating_sub(3)..]
        );
    }

    // An offset from the future is an error (one older than the ring gets a snapshot:
    // see the slow-client test).
    let err = shell_attach(
        &mut guest,
        ShellAttachStart {
            offset: Some(u64::MAX),
            ..attach_req("count")
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn two_clients_see_identical_bytes() {
    let agent = TestAgent::start();
    let mut g1 = agent.connect().await;
    let mut g2 = agent.connect().await;
    open(&mut g1, bash("two")).await;
    let mut a = Term::attach(&mut g1, attach_req("two")).await;
    let mut b = Term::attach(&mut g2, attach_req("two")).await;
    assert_eq!(list(&mut g1).await[0].clients, 2);
    a.type_str("seq 1 3000; echo end-$((2+3))\r").await;
    a.wait_for("end-5").await;
    b.wait_for("end-5").await;
    // Compare from the later start to the earlier end.
    let start = a.attached.offset.max(b.attached.offset);
    let end = a.next.min(b.next);
    let slice = |t: &Term| {
        let from = (start - t.attached.offset) as usize;
        t.seen[from..from + (end - start) as usize].to_vec()
    };
    assert!(end - start > 10_000);
    assert_eq!(slice(&a), slice(&b));
}

#[tokio::test]
async fn watchers_cannot_type() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    open(&mut guest, bash("w")).await;
    let mut rw = Term::attach(&mut guest, attach_req("w")).await;
    let mut watch = Term::attach(
        &mut guest,
        ShellAttachStart {
            watch: true,
            width: 20,
            height: 5,
            ..attach_req("w")
        },
    )
    .await;
    // A watcher's size is not applied.
    assert_eq!((watch.attached.width, watch.attached.height), (80, 24));
    let info = &list(&mut guest).await[0];
    assert_eq!((info.clients, info.watchers), (1, 1));

    let marker = agent.path("typed-by-watcher");
    watch
        .type_str(&format!("touch {}\r", marker.display()))
        .await;
    watch.send(ShellInput::resize(10, 10)).await;
    while watch.notices.len() < 2 {
        assert!(watch.step().await.unwrap());
    }
    assert!(watch
        .notices
        .iter()
        .all(|(code, _)| *code == Code::PermissionDenied as i32));
    assert!(
        watch.notices[0].1.contains("read-only"),
        "{:?}",
        watch.notices
    );
    // The shell is unaffected and the watcher still sees output.
    rw.run("echo ok-$((3*3))", "ok-9").await;
    watch.wait_for("ok-9").await;
    assert!(!marker.exists());
    assert!(!rw.text().contains("typed-by-watcher"));
    let info = &list(&mut guest).await[0];
    assert_eq!((info.width, info.height), (80, 24));
}

#[tokio::test]
async fn a_slow_client_is_dropped_without_stalling_others() {
    let agent = TestAgent::start();
    let mut g1 = agent.connect().await;
    let mut g2 = agent.connect().await;
    open(&mut g1, bash("slow")).await;
    let mut fast = Term::attach(&mut g1, attach_req("slow")).await;
    // Attached and never read until the end.
    let mut slow = Term::attach(&mut g2, attach_req("slow")).await;
    // Far more than the slow client's queue + HTTP/2 window.
    fast.run(
        "head -c 12000000 /dev/zero | tr '\\0' x; echo; echo big-$((5*5))",
        "big-25",
    )
    .await;
    assert!(fast.seen.len() > 12_000_000);
    // The slow client gets what was queued for it, then ResourceExhausted.
    let err = loop {
        match slow.step().await {
            Ok(true) => {}
            Ok(false) => panic!("slow client's stream ended without an error"),
            Err(err) => break err,
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains(&format!("offset {}", slow.next)),
        "{err}"
    );
    // Its offset has left the ring: reattaching with it gets a snapshot.
    let again = Term::attach(
        &mut g2,
        ShellAttachStart {
            offset: Some(slow.next),
            ..attach_req("slow")
        },
    )
    .await;
    assert!(again.attached.reconnected && again.attached.snapshot);
    let info = &list(&mut g1).await[0];
    assert!(info.running);
    assert_eq!(info.clients, 2, "fast and the new attachment");
}

#[tokio::test]
async fn list_kill_and_exit_codes() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let a = open(&mut guest, bash("a")).await;
    let b = open(&mut guest, bash("b")).await;
    let shells = list(&mut guest).await;
    let ids: Vec<&str> = shells.iter().map(|s| s.shell_id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(shells.iter().all(|s| s.running && s.started_at_ms > 0));
    assert_eq!(shells[0].argv, bash("a").argv);

    // Exit code through the attachment and the list.
    let mut t = Term::attach(&mut guest, attach_req("a")).await;
    t.type_str("exit 7\r").await;
    assert_eq!(t.wait_exit().await.code, Some(7));
    wait_until(|| !alive(a.pid as i32), "shell a to go").await;
    let info = list(&mut guest).await.remove(0);
    assert!(!info.running);
    assert_eq!(info.exited.unwrap().code, Some(7));
    // Attaching to an exited shell shows the final screen, then `exited`.
    let mut t = Term::attach(&mut guest, attach_req("a")).await;
    assert!(String::from_utf8_lossy(t.snapshot.as_ref().unwrap()).contains("exit 7"));
    assert_eq!(t.wait_exit().await.code, Some(7));

    // Kill: SIGHUP ends an interactive bash; attached clients see `exited`.
    let mut t = Term::attach(&mut guest, attach_req("b")).await;
    let killed = guest
        .shell_kill(ShellKillRequest {
            shell_id: "b".into(),
            signal: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!killed.running);
    assert_eq!(killed.exited.unwrap().signal, Some(libc::SIGHUP));
    assert_eq!(t.wait_exit().await.signal, Some(libc::SIGHUP));
    wait_until(|| !alive(b.pid as i32), "shell b to go").await;
    // Killing an exited shell forgets it.
    guest
        .shell_kill(ShellKillRequest {
            shell_id: "b".into(),
            signal: 0,
        })
        .await
        .unwrap();
    let ids: Vec<String> = list(&mut guest)
        .await
        .into_iter()
        .map(|s| s.shell_id)
        .collect();
    assert_eq!(ids, ["a"]);
    for missing in ["b", "nope"] {
        let err = guest
            .shell_kill(ShellKillRequest {
                shell_id: missing.into(),
                signal: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let err = shell_attach(&mut guest, attach_req(missing))
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Code::NotFound);
    }
}

#[tokio::test]
async fn a_shell_that_ignores_sighup_is_killed_after_the_grace() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    open(
        &mut guest,
        ShellOpenRequest {
            shell_id: "stubborn".into(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "trap '' HUP; echo trapped; sleep 1000".into(),
            ],
            ..Default::default()
        },
    )
    .await;
    // Kill only once the trap is in place, or SIGHUP wins the race.
    let from_start = ShellAttachStart {
        offset: Some(0),
        ..attach_req("stubborn")
    };
    let mut t = Term::attach(&mut guest, from_start).await;
    t.wait_for("trapped").await;
    drop(t);
    let killed = guest
        .shell_kill(ShellKillRequest {
            shell_id: "stubborn".into(),
            signal: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(killed.exited.unwrap().signal, Some(libc::SIGKILL));
}

#[tokio::test]
async fn ids_and_the_shell_cap() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    for bad in ["a/b", "a?b", "x#", "&", &"y".repeat(129)] {
        let err = guest.shell_open(bash(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
    }
    let err = guest
        .shell_open(ShellOpenRequest {
            width: 5000,
            ..bash("big")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let capped = |id: &str| ShellOpenRequest {
        max_shells: 2,
        ..bash(id)
    };
    open(&mut guest, capped("1")).await;
    let err = guest.shell_open(capped("1")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    open(&mut guest, capped("2")).await;
    let err = guest.shell_open(capped("3")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("at most 2"), "{err}");
    // An exited shell no longer counts, and its id may be reused.
    guest
        .shell_kill(ShellKillRequest {
            shell_id: "2".into(),
            signal: 0,
        })
        .await
        .unwrap();
    open(&mut guest, capped("3")).await;
    open(&mut guest, bash("2")).await;
    let err = guest
        .shell_open(ShellOpenRequest {
            argv: vec!["/nonexistent/program".into()],
            ..bash("4")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn a_recorder_gets_output_and_resizes_in_order_and_is_no_watcher() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    open(&mut guest, bash("rec")).await;
    // The host's recorder: from offset 0, read-only, told about resizes.
    let mut rec = Term::attach(
        &mut guest,
        ShellAttachStart {
            offset: Some(0),
            recorder: true,
            ..attach_req("rec")
        },
    )
    .await;
    assert!(!rec.attached.snapshot);
    assert_eq!(rec.attached.offset, 0);
    let mut t = Term::attach(&mut guest, attach_req("rec")).await;
    t.run("echo héllo-$((1+1)) €", "héllo-2 €").await;
    t.send(ShellInput::resize(100, 30)).await;
    t.run("stty size", "30 100").await;
    let listed = guest.shell_list(Empty {}).await.unwrap().into_inner();
    let info = listed.shells.iter().find(|s| s.shell_id == "rec").unwrap();
    assert_eq!((info.clients, info.watchers), (1, 0), "{info:?}");

    // It cannot type.
    rec.type_str("echo typed-by-the-recorder\r").await;
    while rec.notices.is_empty() {
        assert!(rec.step().await.unwrap());
    }
    assert_eq!(rec.notices[0].0, Code::PermissionDenied as i32);

    rec.wait_for("30 100").await;
    let text = rec.text();
    let before = text.find("héllo-2 €").unwrap();
    let after = text.find("30 100").unwrap();
    assert_eq!(rec.resizes.len(), 1, "{:?}", rec.resizes);
    let (at, width, height) = rec.resizes[0];
    assert_eq!((width, height), (100, 30));
    assert!(before < at && at <= after, "{before} < {at} <= {after}");

    t.type_str("exit 3\r").await;
    assert_eq!(t.wait_exit().await.code, Some(3));
    assert_eq!(rec.wait_exit().await.code, Some(3));
    // Everything, byte for byte, from the start.
    assert_eq!(&rec.seen[t.attached.offset as usize..], &t.seen[..]);
    assert!(!rec.text().contains("typed-by-the-recorder"));
}

#[tokio::test]
async fn shutdown_kills_shells() {
    let agent = TestAgent::start();
    let mut guest = agent.connect().await;
    let info = open(&mut guest, bash("bye")).await;
    let mut t = Term::attach(&mut guest, attach_req("bye")).await;
    t.run("echo up-$((1+1))", "up-2").await;
    guest.shutdown(Empty {}).await.unwrap();
    wait_until(|| !alive(info.pid as i32), "the shell to be killed").await;
}

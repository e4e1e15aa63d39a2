//! `berth exec --it` driven in a real terminal: tmux runs the CLI, `send-keys` types,
//! `capture-pane` reads the screen. Each test uses its own tmux server (`-L`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{uniq, Server};

/// A private tmux server with one window running a command.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(s: &Server, name: &str, cmd: &str) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            eprintln!("skipping: tmux is not installed");
            return None;
        }
        let t = Tmux { socket: uniq(name) };
        let line = format!(
            "env BERTH_URL={} BERTH_DATA_DIR={} {} ; echo CLI-EXIT=$?; sleep 600",
            s.url,
            s.data_dir.display(),
            cmd
        );
        t.run(&[
            "new-session",
            "-d",
            "-s",
            "main",
            "-x",
            "100",
            "-y",
            "30",
            &line,
        ]);
        Some(t)
    }

    /// Wait until the CLI has attached (it names the detach keys when it does).
    async fn attached(self) -> Self {
        self.wait_for("detach with").await;
        self
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "main"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Type a line of text (literally) and press Enter.
    fn line(&self, text: &str) {
        self.run(&["send-keys", "-t", "main", "-l", text]);
        self.keys(&["Enter"]);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-t", "main", "-p"])
    }

    /// The screen with escape sequences (colours) kept.
    fn screen_escaped(&self) -> String {
        self.run(&["capture-pane", "-t", "main", "-p", "-e"])
    }

    /// The whole history.
    fn history(&self) -> String {
        self.run(&["capture-pane", "-t", "main", "-p", "-S", "-100000"])
    }

    async fn wait_for(&self, what: &str) -> String {
        common::poll(&format!("{what:?} on the tmux screen"), || async {
            let screen = self.history();
            screen.contains(what).then_some(screen)
        })
        .await
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

fn attach_cmd(session: &str, shell: &str, extra: &str) -> String {
    format!(
        "{} exec --it --session {session} --shell-id {shell} {extra}",
        env!("CARGO_BIN_EXE_berth")
    )
}

#[tokio::test]
async fn interactive_shell_colours_completion_ctrl_c_and_resize() {
    let Some(s) = Server::start("interactive_shell_colours_completion_ctrl_c_and_resize").await
    else {
        return;
    };
    let session = uniq("tty");
    s.exec(&session, "touch /mnt/workspace/unique-file-name.txt")
        .await
        .ok();
    let Some(t) = Tmux::start(&s, "tty", &attach_cmd(&session, "main", "")) else {
        return;
    };
    let t = t.attached().await;
    t.line("echo ready-$((6*7))");
    t.wait_for("ready-42").await;

    // Colours pass through: ls marks directories with an SGR sequence.
    t.line("ls --color=always -d /usr");
    common::poll("a coloured /usr", || async {
        t.screen_escaped().contains("\u{1b}[").then_some(())
    })
    .await;

    // Tab completion is the remote shell's.
    t.run(&["send-keys", "-t", "main", "-l", "ls unique-fi"]);
    t.keys(&["Tab"]);
    t.keys(&["Enter"]);
    t.wait_for("unique-file-name.txt\n").await;

    // Ctrl+C reaches the remote foreground process, and the shell survives.
    t.line("sleep 100");
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.keys(&["C-c"]);
    t.line("echo after-$((1+1))");
    t.wait_for("after-2").await;

    // The remote terminal follows the local window's size.
    t.run(&["resize-window", "-t", "main", "-x", "91", "-y", "27"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.line("stty size");
    t.wait_for("27 91").await;

    t.line("exit 4");
    t.wait_for("CLI-EXIT=4").await;
}

#[tokio::test]
async fn vim_is_redrawn_after_detach_and_reattach() {
    let Some(s) = Server::start("vim_is_redrawn_after_detach_and_reattach").await else {
        return;
    };
    if !std::path::Path::new("/usr/bin/vi").exists() {
        eprintln!("skipping: no vi on this host");
        return;
    }
    let session = uniq("vim");
    let Some(t) = Tmux::start(&s, "vim", &attach_cmd(&session, "ed", "")) else {
        return;
    };
    let t = t.attached().await;
    t.line("echo up");
    t.wait_for("up").await;
    t.line("vi /tmp/notes.txt");
    tokio::time::sleep(Duration::from_millis(800)).await;
    t.keys(&["i"]);
    t.run(&["send-keys", "-t", "main", "-l", "line one of the note"]);
    t.keys(&["Escape"]);
    t.wait_for("line one of the note").await;
    // Detach: Ctrl+] then d. The CLI exits 0 and says how to come back.
    t.keys(&["C-]"]);
    t.keys(&["d"]);
    let screen = t.wait_for("CLI-EXIT=0").await;
    assert!(
        screen.contains("--shell-id ed"),
        "reattach hint missing:\n{screen}"
    );
    drop(t);

    let Some(t) = Tmux::start(&s, "vim2", &attach_cmd(&session, "ed", "")) else {
        return;
    };
    let t = t.attached().await;
    let screen = t.wait_for("line one of the note").await;
    // The editor's screen, not the shell's: empty-line markers fill the rest.
    assert!(
        screen.lines().filter(|l| l.starts_with('~')).count() > 5,
        "not a vim screen:\n{screen}"
    );
    t.keys(&["Escape"]);
    t.line(":q!");
    common::poll("vim to quit", || async {
        (!t.screen().lines().any(|l| l.starts_with('~'))).then_some(())
    })
    .await;
    t.line("exit 0");
    let screen = t.wait_for("CLI-EXIT=").await;
    assert!(screen.contains("CLI-EXIT=0"), "{screen}");
}

#[tokio::test]
async fn a_dropped_connection_resumes_without_loss_or_duplication() {
    let Some(mut s) =
        Server::start("a_dropped_connection_resumes_without_loss_or_duplication").await
    else {
        return;
    };
    let session = uniq("drop");
    let Some(t) = Tmux::start(&s, "drop", &attach_cmd(&session, "ctr", "")) else {
        return;
    };
    let t = t.attached().await;
    t.line("echo go");
    t.wait_for("go").await;
    t.line("for i in $(seq 1 300); do echo n$i; sleep 0.01; done; echo counted-$((300))");
    t.wait_for("n20\n").await;
    // The server dies mid-stream and comes back on the same data dir: the sandbox and
    // its shell live on, and the CLI reconnects from the offset it had reached.
    s.kill_server();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.restart().await;
    let screen = t.wait_for("counted-300").await;
    let numbers: Vec<u32> = screen
        .lines()
        .filter_map(|l| l.trim().strip_prefix('n')?.parse().ok())
        .collect();
    assert_eq!(
        numbers,
        (1..=300).collect::<Vec<u32>>(),
        "lost or repeated output:\n{screen}"
    );
    assert!(
        screen.contains("connection lost"),
        "the CLI said nothing about the drop:\n{screen}"
    );
}

#[tokio::test]
async fn two_clients_see_the_same_output_and_a_watcher_cannot_type() {
    let Some(s) = Server::start("two_clients_see_the_same_output_and_a_watcher_cannot_type").await
    else {
        return;
    };
    let session = uniq("two");
    let Some(a) = Tmux::start(&s, "a", &attach_cmd(&session, "pair", "")) else {
        return;
    };
    let a = a.attached().await;
    a.line("echo first-$((2*3))");
    a.wait_for("first-6").await;
    let Some(w) = Tmux::start(&s, "w", &attach_cmd(&session, "pair", "--watch")) else {
        return;
    };
    let w = w.attached().await;
    w.wait_for("first-6").await;
    a.line("echo both-$((3*3))");
    a.wait_for("both-9").await;
    w.wait_for("both-9").await;
    // The watcher's keys never reach the shell.
    w.line("touch /tmp/watcher-typed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.line("ls /tmp/watcher-typed 2>&1 | tail -1; echo checked-$((4*4))");
    let screen = a.wait_for("checked-16").await;
    assert!(
        screen.contains("No such file"),
        "a watcher typed into the shell:\n{screen}"
    );
}

#[tokio::test]
async fn a_terminated_cli_restores_the_terminal_and_leaves_the_shell_running() {
    let Some(s) =
        Server::start("a_terminated_cli_restores_the_terminal_and_leaves_the_shell_running").await
    else {
        return;
    };
    let session = uniq("term");
    let shell = uniq("sh");
    let cmd = format!(
        "{}; echo RC=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon",
        attach_cmd(&session, &shell, "")
    );
    let Some(t) = Tmux::start(&s, "term", &cmd) else {
        return;
    };
    let t = t.attached().await;
    t.line("echo still-$((5+5))");
    t.wait_for("still-10").await;
    // The CLI process itself (not tmux or the shell wrapping it).
    let pids = Command::new("pgrep")
        .args(["-f", &format!("shell-id {shell}")])
        .output()
        .expect("pgrep");
    let pid: i32 = String::from_utf8_lossy(&pids.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .find(|p: &i32| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "berth")
        })
        .expect("the CLI's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let screen = t.wait_for("CLI-EXIT=").await;
    assert!(
        screen.contains("RC=143"),
        "exit code of a SIGTERMed CLI:\n{screen}"
    );
    assert!(
        screen.lines().any(|l| l.trim() == "icanon"),
        "terminal left raw:\n{screen}"
    );
    // The shell itself lives on.
    let list = s.client.list_shells(&session).await.expect("list");
    let running = list
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["shell_id"] == shell.as_str() && x["running"] == true);
    assert!(running, "{list}");
}

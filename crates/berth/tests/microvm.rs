//! Session scenarios on both drivers (namespace and microVM), plus microVM-only checks.
//!
//! Every scenario is one async fn over a server and a runtime; `both!` makes a test per
//! driver. The microVM runs boot a real guest kernel under QEMU (TCG on hosts whose KVM
//! cannot boot Linux guests): the guest image is built once per machine with
//! `berth image build --from host` into a shared dir under the target dir, and every
//! test server reads it through `--guest-images`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use berth_api::{CommandRequest, Isolation, SessionState};
use common::{uniq, Server, BERTH};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Where the shared guest image lives (`<dir>/images/host/`).
fn images_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("berth-guest-images")
}

fn qemu_available() -> bool {
    std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Build (or find cached) the `host` guest image. Concurrent tests wait on the build's
/// own lock; later calls are cache hits.
fn ensure_image() {
    let out = std::process::Command::new(BERTH)
        .args(["image", "build", "--from", "host", "--data-dir"])
        .arg(images_dir())
        .output()
        .expect("run berth image build");
    assert!(
        out.status.success(),
        "berth image build failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server able to run `isolation`, or `None` (with the reason printed) when it cannot
/// run here at all.
async fn server(test: &str, isolation: Isolation) -> Option<Server> {
    if isolation == Isolation::Microvm {
        if common::skip_unless_root(test) {
            return None;
        }
        if !qemu_available() {
            eprintln!("skipping {test}: qemu-system-x86_64 is not installed");
            return None;
        }
        tokio::task::spawn_blocking(ensure_image).await.unwrap();
        let images = images_dir().display().to_string();
        return Server::start_with(test, &["--guest-images", &images]).await;
    }
    Server::start(test).await
}

/// A runtime of `isolation` with test-sized limits.
async fn runtime(s: &Server, isolation: Isolation) -> String {
    s.runtime(&uniq("rt"), |r| {
        r.isolation = isolation;
        r.memory = 512 << 20;
        r.env
            .insert("BERTH_TEST_ENV".into(), "from the runtime".into());
    })
    .await
}

macro_rules! both {
    ($scenario:ident) => {
        mod $scenario {
            use super::*;

            #[tokio::test]
            async fn namespace() {
                let name = concat!(stringify!($scenario), "::namespace");
                if let Some(s) = server(name, Isolation::Namespace).await {
                    super::$scenario(s, Isolation::Namespace).await;
                }
            }

            #[tokio::test]
            async fn microvm() {
                let name = concat!(stringify!($scenario), "::microvm");
                if let Some(s) = server(name, Isolation::Microvm).await {
                    super::$scenario(s, Isolation::Microvm).await;
                }
            }
        }
    };
}

both!(commands_stream_output_exit_codes_and_env);
async fn commands_stream_output_exit_codes_and_env(s: Server, isolation: Isolation) {
    let rt = runtime(&s, isolation).await;
    let session = s.session(&uniq("cmd"), &rt).await;
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
    // Binary output arrives byte-exact.
    let o = s
        .exec(
            &session,
            "head -c 8388608 /dev/urandom | tee /tmp/r | sha256sum >&2; cat /tmp/r",
        )
        .await
        .ok();
    use sha2::Digest;
    let sum: String = sha2::Sha256::digest(&o.stdout)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(o.stdout.len(), 8 << 20);
    assert!(o.err().starts_with(&sum), "{} vs {sum}", o.err());
    // stdin and a timeout that kills the whole process group.
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
    assert_eq!(o.out(), "piped");
    let o = s.exec(&session, "pgrep -c -f '[s]leep 100' || true").await;
    assert_eq!(o.out().trim(), "0", "the timeout killed the group: {o:?}");
}

both!(files_copy_in_and_out);
async fn files_copy_in_and_out(s: Server, isolation: Isolation) {
    let rt = runtime(&s, isolation).await;
    let session = s.session(&uniq("files"), &rt).await;
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("tree");
    std::fs::create_dir_all(local.join("sub")).unwrap();
    std::fs::write(local.join("sub/a.txt"), b"alpha\n").unwrap();
    std::fs::write(local.join("b.bin"), [0u8, 1, 2, 255]).unwrap();
    let dst = format!("{session}:/mnt/workspace/tree");
    s.cli_ok(&["cp", local.to_str().unwrap(), &dst]).await;
    let o = s
        .exec(
            &session,
            "cat /mnt/workspace/tree/sub/a.txt; od -An -tu1 /mnt/workspace/tree/b.bin",
        )
        .await
        .ok();
    assert!(o.out().starts_with("alpha\n"), "{o:?}");
    assert!(o.out().contains("0   1   2 255"), "{o:?}");
    let back = tmp.path().join("back");
    s.cli_ok(&["cp", &dst, back.to_str().unwrap()]).await;
    assert_eq!(std::fs::read(back.join("sub/a.txt")).unwrap(), b"alpha\n");
    assert_eq!(std::fs::read(back.join("b.bin")).unwrap(), [0u8, 1, 2, 255]);
    // Host secrets are masked in either driver's root filesystem: unreadable, or empty.
    let shadow = tmp.path().join("shadow");
    let (_, err, code) = s
        .cli(&[
            "cp",
            &format!("{session}:/mnt/workspace/../../etc/shadow"),
            shadow.to_str().unwrap(),
        ])
        .await;
    let text = std::fs::read_to_string(&shadow).unwrap_or_default();
    assert!(
        !text.contains("root:"),
        "/etc/shadow is masked (cp exit {code}, {}): {text:?}",
        String::from_utf8_lossy(&err)
    );
}

/// A websocket attach to a shell; returns everything read until `needle` appeared.
async fn attach_until(s: &Server, session: &str, shell: &str, typed: &str, needle: &str) -> String {
    let url = format!(
        "ws://127.0.0.1:{}/v1/sessions/{session}/shells/{shell}/attach",
        s.port
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", s.token)).unwrap(),
    );
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("v5.channel.k8s.io"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    if !typed.is_empty() {
        let mut msg = vec![berth_api::shell::channel::STDIN];
        msg.extend_from_slice(typed.as_bytes());
        ws.send(Message::Binary(msg.into())).await.unwrap();
    }
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Binary(b) = msg {
                if b.first() == Some(&berth_api::shell::channel::STDOUT) {
                    out.extend_from_slice(&b[1..]);
                    if String::from_utf8_lossy(&out).contains(needle) {
                        return;
                    }
                }
            }
        }
    };
    tokio::time::timeout(common::DEADLINE, read)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} in {:?}", String::from_utf8_lossy(&out)));
    let _ = ws.close(None).await;
    String::from_utf8_lossy(&out).into_owned()
}

both!(shells_survive_detach_and_redraw_on_reattach);
async fn shells_survive_detach_and_redraw_on_reattach(s: Server, isolation: Isolation) {
    let rt = runtime(&s, isolation).await;
    let session = s.session(&uniq("shell"), &rt).await;
    let r = s
        .http(
            reqwest::Method::POST,
            &format!("/v1/sessions/{session}/shells"),
        )
        .json(&serde_json::json!({"shell_id": "main"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    attach_until(&s, &session, "main", "echo $((6*7))-marker\n", "42-marker").await;
    // Reattached, the screen is redrawn from the guest's terminal model.
    let screen = attach_until(&s, &session, "main", "", "42-marker").await;
    assert!(screen.contains("42-marker"), "{screen:?}");
}

both!(workspace_survives_stop_resume_and_a_server_sigkill);
async fn workspace_survives_stop_resume_and_a_server_sigkill(mut s: Server, isolation: Isolation) {
    let rt = runtime(&s, isolation).await;
    let session = s.session(&uniq("persist"), &rt).await;
    s.exec(
        &session,
        "head -c 1000000 /dev/urandom > /mnt/workspace/data && sha256sum /mnt/workspace/data > /mnt/workspace/sum && echo gone > /tmp/ephemeral",
    )
    .await
    .ok();
    s.cli_ok(&["session", "stop", &session]).await;
    let o = s
        .exec(
            &session,
            "sha256sum -c /mnt/workspace/sum && test ! -e /tmp/ephemeral && echo fresh",
        )
        .await
        .ok();
    assert!(o.out().contains("fresh"), "{o:?}");

    // SIGKILL the server: the sandbox lives on and is adopted by the next server.
    s.exec(&session, "echo before > /mnt/workspace/kill && sync")
        .await
        .ok();
    s.kill_server();
    s.restart().await;
    let o = s
        .exec(
            &session,
            "cat /mnt/workspace/kill && sha256sum -c /mnt/workspace/sum >/dev/null && echo ok",
        )
        .await
        .ok();
    assert_eq!(o.out(), "before\nok\n", "{o:?}");
    assert!(
        s.log_text().contains("adopted running sandbox"),
        "the restarted server re-adopted the sandbox:\n{}",
        s.log_text()
    );
}

both!(limits_and_metering_hold);
async fn limits_and_metering_hold(s: Server, isolation: Isolation) {
    let rt = s
        .runtime(&uniq("rt-lim"), |r| {
            r.isolation = isolation;
            r.memory = 256 << 20;
        })
        .await;
    let session = s.session(&uniq("limits"), &rt).await;
    // A memory hog dies; the session keeps answering.
    let o = s
        .exec(
            &session,
            "python3 -c 'b = bytearray(1 << 30); print(len(b))'",
        )
        .await;
    assert!(
        o.code != Some(0) || o.signal.is_some(),
        "a 1 GiB allocation in 256 MiB must fail: {o:?}"
    );
    let o = s.exec(&session, "echo alive").await.ok();
    assert_eq!(o.out(), "alive\n");
    s.exec(&session, "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
        .await
        .ok();
    s.cli_ok(&["session", "stop", &session]).await;
    let st = s.client.get_session(&session).await.unwrap();
    assert!(st.usage.cpu_seconds > 0.0, "{:?}", st.usage);
    assert!(st.usage.peak_memory_bytes > 0, "{:?}", st.usage);
}

both!(a_fork_bomb_stops_at_the_pids_limit);
async fn a_fork_bomb_stops_at_the_pids_limit(s: Server, isolation: Isolation) {
    let rt = s
        .runtime(&uniq("rt-pids"), |r| {
            r.isolation = isolation;
            r.pids = 64;
            r.memory = 512 << 20;
        })
        .await;
    let session = s.session(&uniq("pids"), &rt).await;
    // The subshell forks until fork fails (dash then gives up); the sleeps outlive it.
    // Counting and cleaning up each take one fork, which the subshell's exit frees.
    let o = s
        .exec(
            &session,
            "(for i in $(seq 200); do sleep 30 >/dev/null & done) 2>/dev/null; \
             pgrep -c -x sleep; pkill -x sleep; true",
        )
        .await;
    let count: u32 = o
        .out()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("a count of sleeps: {o:?}"));
    assert!(
        (1..=64).contains(&count),
        "the pids limit (64) stopped the bomb, after it started some: {count} sleeps, {o:?}"
    );
    let o = s.exec(&session, "echo alive").await.ok();
    assert_eq!(o.out(), "alive\n");
}

both!(delete_and_server_stop_leave_nothing_behind);
async fn delete_and_server_stop_leave_nothing_behind(mut s: Server, isolation: Isolation) {
    let rt = runtime(&s, isolation).await;
    let a = s.session(&uniq("gone"), &rt).await;
    let b = s.session(&uniq("kept"), &rt).await;
    s.exec(&a, "echo x > /mnt/workspace/x").await.ok();
    s.exec(&b, "echo y > /mnt/workspace/y").await.ok();
    s.cli_ok(&["session", "delete", &a]).await;
    // Nothing of `a` is left; `b` is untouched.
    let of_a: Vec<String> = s
        .leftovers(Some(&a))
        .into_iter()
        .filter(|l| l.contains(&a))
        .collect();
    assert!(of_a.is_empty(), "after delete: {of_a:#?}");
    let ws = s.data_dir.join("workspaces");
    assert!(!ws.join(format!("{a}.ext4")).exists());
    assert!(ws.join(format!("{b}.ext4")).exists());
    assert_eq!(s.exec(&b, "cat /mnt/workspace/y").await.ok().out(), "y\n");
    assert!(s.stop_server(), "server stops in time");
    let left = s.leftovers(None);
    assert!(left.is_empty(), "after server stop: {left:#?}");
}

// ---- microVM only ----

#[tokio::test]
async fn microvm_guest_runs_its_own_kernel_and_sees_no_host_devices() {
    let test = "microvm_guest_runs_its_own_kernel_and_sees_no_host_devices";
    let Some(s) = server(test, Isolation::Microvm).await else {
        return;
    };
    let rt = runtime(&s, Isolation::Microvm).await;
    let session = s.session(&uniq("kernel"), &rt).await;
    let host = nix::sys::utsname::uname().unwrap();
    let o = s.exec(&session, "uname -r").await.ok();
    assert_ne!(
        o.out().trim(),
        host.release().to_string_lossy(),
        "the guest runs its own kernel"
    );
    // Only the guest's two virtio disks exist; no host disk, loop device or /dev/kvm.
    let o = s
        .exec(&session, "ls /sys/block; ls /dev | tr '\\n' ' '")
        .await
        .ok();
    let mut lines = o.out().lines().map(str::to_string).collect::<Vec<_>>();
    let devs = lines.pop().unwrap_or_default();
    lines.sort();
    assert_eq!(lines, ["vda", "vdb"], "{o:?}");
    for host_only in ["kvm", "loop0", "loop-control", "sda", "nvme0"] {
        assert!(
            !devs.split_whitespace().any(|d| d == host_only),
            "/dev/{host_only} is visible in the guest: {devs}"
        );
    }
}

#[tokio::test]
async fn microvm_a_killed_vmm_is_detected_and_the_workspace_resumes() {
    let test = "microvm_a_killed_vmm_is_detected_and_the_workspace_resumes";
    let Some(s) = server(test, Isolation::Microvm).await else {
        return;
    };
    let rt = runtime(&s, Isolation::Microvm).await;
    let session = s.session(&uniq("killed"), &rt).await;
    s.exec(&session, "echo durable > /mnt/workspace/f && sync")
        .await
        .ok();
    let pid_file = s.data_dir.join("vm").join(&session).join("vmm.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = common::poll("the killed VMM to be noticed", || async {
        let st = s.client.get_session(&session).await.unwrap();
        (st.state == SessionState::Stopped).then_some(st)
    })
    .await;
    assert_eq!(st.stop_reason.as_deref(), Some("vmm_exited"), "{st:?}");
    let o = s.exec(&session, "cat /mnt/workspace/f").await.ok();
    assert_eq!(o.out(), "durable\n");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the killed VMM was reaped"
    );
}

#[tokio::test]
async fn microvm_without_an_image_is_a_clear_400() {
    let test = "microvm_without_an_image_is_a_clear_400";
    let Some(s) = Server::start(test).await else {
        return;
    };
    let mut spec = berth_api::RuntimeSpec::named(uniq("rt"));
    spec.isolation = Isolation::Microvm;
    let r = s
        .http(reqwest::Method::POST, "/v1/runtimes")
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("berth image build"),
        "the error says what to do: {body}"
    );
}

#[tokio::test]
async fn microvm_a_guest_kernel_panic_stops_the_session_with_its_reason() {
    let test = "microvm_a_guest_kernel_panic_stops_the_session_with_its_reason";
    let Some(s) = server(test, Isolation::Microvm).await else {
        return;
    };
    let rt = runtime(&s, Isolation::Microvm).await;
    let session = s.session(&uniq("panic"), &rt).await;
    s.exec(&session, "echo kept > /mnt/workspace/kept && sync")
        .await
        .ok();
    // Root in the guest may crash its own kernel; only this VM goes down.
    let _ = s.exec(&session, "echo c > /proc/sysrq-trigger").await;
    let st = common::poll("the guest panic to stop the session", || async {
        let st = s.client.get_session(&session).await.unwrap();
        (st.state == SessionState::Stopped).then_some(st)
    })
    .await;
    assert_eq!(
        st.stop_reason.as_deref(),
        Some("guest_kernel_panic"),
        "{st:?}"
    );
    let o = s.exec(&session, "cat /mnt/workspace/kept").await.ok();
    assert_eq!(o.out(), "kept\n", "the workspace survives the panic");
}

//! Session lifecycle: stop/resume, idle timeout, server SIGKILL and restart, cleanup.

mod common;

use berth_api::{CommandRequest, Isolation, SessionState};
use common::drivers::{runtime, runtime_with};
use common::{uniq, Server};
use futures::StreamExt;

both!(workspace_survives_stop_and_resume_and_the_rest_is_fresh);
async fn workspace_survives_stop_and_resume_and_the_rest_is_fresh(s: Server, isolation: Isolation) {
    let rt = runtime(&s, isolation).await;
    let session = s.session(&uniq("resume"), &rt).await;
    s.exec(
        &session,
        "mkdir -p /mnt/workspace/d && head -c 1000000 /dev/urandom > /mnt/workspace/d/data && sha256sum /mnt/workspace/d/data > /mnt/workspace/sum && echo gone > /tmp/ephemeral",
    )
    .await
    .ok();
    s.cli_ok(&["session", "stop", &session]).await;
    let st = s.client.get_session(&session).await.expect("get");
    assert_eq!(st.state, SessionState::Stopped);
    assert_eq!(st.stop_reason.as_deref(), Some("requested"));

    // The next command resumes it in a fresh sandbox with the same workspace.
    let o = s
        .exec(
            &session,
            "sha256sum -c /mnt/workspace/sum && test ! -e /tmp/ephemeral && echo fresh",
        )
        .await
        .ok();
    assert!(o.out().contains("fresh"), "{o:?}");
    let st = s.client.get_session(&session).await.expect("get");
    assert_eq!(st.state, SessionState::Running);
    // And once more, through the CLI.
    s.cli_ok(&["session", "stop", &session]).await;
    let out = s
        .cli_ok(&["exec", "-s", &session, "--", "cat", "/mnt/workspace/sum"])
        .await;
    assert!(out.contains("/mnt/workspace/d/data"));
}

both!(idle_timeout_stops_the_sandbox_and_the_next_command_resumes);
async fn idle_timeout_stops_the_sandbox_and_the_next_command_resumes(
    s: Server,
    isolation: Isolation,
) {
    let rt = runtime_with(&s, isolation, |r| r.idle_timeout_s = 2).await;
    let session = s.session(&uniq("idle"), &rt).await;
    s.exec(
        &session,
        "echo kept > /mnt/workspace/kept; head -c 3000000 /dev/zero > /mnt/workspace/big; sync",
    )
    .await
    .ok();
    let list = s.cli_ok(&["session", "list"]).await;
    let header = list.lines().next().unwrap_or_default().to_ascii_uppercase();
    for col in ["STATE", "RUNTIME", "CPU", "PEAK", "WORKSPACE"] {
        assert!(
            header.contains(col),
            "`session list` header lacks {col}:\n{list}"
        );
    }
    let row = list
        .lines()
        .find(|l| l.contains(&session))
        .unwrap_or_else(|| panic!("session missing from `session list`:\n{list}"));
    assert!(row.contains("running") && row.contains(&rt), "row: {row}");

    let st = common::poll("the idle timeout to stop the session", || async {
        let st = s.client.get_session(&session).await.expect("get");
        (st.state == SessionState::Stopped).then_some(st)
    })
    .await;
    assert_eq!(st.stop_reason.as_deref(), Some("idle_timeout"));
    assert!(
        st.usage.cpu_seconds > 0.0,
        "cpu seconds recorded: {:?}",
        st.usage
    );
    assert!(
        st.usage.peak_memory_bytes > 0,
        "peak memory recorded: {:?}",
        st.usage
    );
    assert!(
        st.usage.workspace_bytes >= 3_000_000,
        "workspace bytes recorded: {:?}",
        st.usage
    );
    let list = s.cli_ok(&["session", "list"]).await;
    let row = list
        .lines()
        .find(|l| l.contains(&session))
        .unwrap_or_default();
    assert!(row.contains("stopped"), "row: {row}");

    let o = s.exec(&session, "cat /mnt/workspace/kept").await.ok();
    assert_eq!(o.out(), "kept\n");
    let st = s.client.get_session(&session).await.expect("get");
    assert_eq!(st.state, SessionState::Running);
}

both!(a_running_command_keeps_the_session_from_idling_out);
async fn a_running_command_keeps_the_session_from_idling_out(s: Server, isolation: Isolation) {
    let rt = runtime_with(&s, isolation, |r| r.idle_timeout_s = 1).await;
    let session = s.session(&uniq("busy"), &rt).await;
    // Runs for several idle timeouts, printing now and then.
    let o = s
        .exec(&session, "for i in 1 2 3 4; do sleep 1; echo tick; done")
        .await
        .ok();
    assert_eq!(o.out(), "tick\ntick\ntick\ntick\n");
}

both!(data_and_session_survive_a_server_sigkill);
async fn data_and_session_survive_a_server_sigkill(mut s: Server, isolation: Isolation) {
    let rt = runtime(&s, isolation).await;
    let session = s.session(&uniq("durable"), &rt).await;
    let other = s.session(&uniq("stopped"), &rt).await;
    s.exec(&other, "echo stopped-data > /mnt/workspace/f")
        .await
        .ok();
    s.client.stop_session(&other).await.expect("stop");
    // No sync: a finished command's writes must survive on their own.
    let sum = s
        .exec(
            &session,
            "head -c 2000000 /dev/urandom > /mnt/workspace/blob && sha256sum /mnt/workspace/blob",
        )
        .await
        .ok()
        .out();
    s.kill_server();
    s.restart().await;

    let st = s
        .client
        .get_session(&session)
        .await
        .expect("session record survives");
    assert_eq!(st.runtime, rt);
    let o = s.exec(&session, "sha256sum /mnt/workspace/blob").await.ok();
    assert_eq!(o.out(), sum, "workspace content after SIGKILL");
    // The sandbox lived on without its server, and the next server adopted it.
    assert!(
        s.log_text().contains("adopted running sandbox"),
        "the restarted server re-adopted the sandbox:\n{}",
        s.log_text()
    );
    let o = s.exec(&other, "cat /mnt/workspace/f").await.ok();
    assert_eq!(o.out(), "stopped-data\n");
    let ids: Vec<String> = s
        .client
        .list_sessions()
        .await
        .expect("list")
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert!(ids.contains(&session) && ids.contains(&other), "{ids:?}");
    // The runtime survived too, and new sessions work.
    s.client.get_runtime(&rt).await.expect("runtime survives");
    let fresh = uniq("after");
    s.exec(&fresh, "true").await.ok();

    // After a clean stop the host holds nothing of this server.
    assert!(s.stop_server_async().await, "server stops on SIGTERM");
    let mut left = s.leftovers(Some(&session));
    left.extend(s.leftovers(Some(&other)));
    left.extend(s.leftovers(Some(&fresh)));
    assert!(
        left.is_empty(),
        "left behind after SIGKILL, restart and stop: {left:#?}"
    );
}

both!(sigkill_while_commands_run_then_restart_reconciles);
async fn sigkill_while_commands_run_then_restart_reconciles(mut s: Server, _: Isolation) {
    let session = uniq("midflight");
    s.exec(&session, "echo before > /mnt/workspace/before")
        .await
        .ok();
    // A command is running when the server dies.
    let mut st = s
        .client
        .run_command(
            &session,
            &CommandRequest {
                command: Some("echo go; sleep 1000.125".into()),
                ..Default::default()
            },
        )
        .await
        .expect("run");
    let _ = st.next().await; // started
    let _ = st.next().await; // go
    s.kill_server();
    drop(st);
    s.restart().await;
    // The session answers (re-adopted or restarted), its data is intact.
    let o = s.exec(&session, "cat /mnt/workspace/before").await.ok();
    assert_eq!(o.out(), "before\n");
    assert!(s.stop_server_async().await, "server stops on SIGTERM");
    let left = s.leftovers(Some(&session));
    assert!(left.is_empty(), "left behind: {left:#?}");
}

both!(nothing_leaks_after_session_delete_and_after_server_stop);
async fn nothing_leaks_after_session_delete_and_after_server_stop(
    mut s: Server,
    isolation: Isolation,
) {
    let rt = runtime(&s, isolation).await;
    let gone = s.session(&uniq("gone"), &rt).await;
    let kept = s.session(&uniq("kept"), &rt).await;
    for id in [&gone, &kept] {
        // A process that escapes its command's process group and session.
        s.exec(
            id,
            "setsid nohup sleep 1000.5 >/dev/null 2>&1 < /dev/null & echo x > /mnt/workspace/x",
        )
        .await
        .ok();
    }
    // Test the test: while running, the checks do see the sandbox: its cgroup and
    // processes, and for a namespace sandbox its mounts and loop device (a microVM
    // opens its workspace image itself: the host mounts nothing).
    let live = s.leftovers(Some(&gone));
    assert!(
        live.iter().any(|l| l.starts_with("cgroup")),
        "no cgroup seen: {live:#?}"
    );
    assert!(
        live.iter().any(|l| l.starts_with("process")),
        "no process seen: {live:#?}"
    );
    let host_mounts = isolation == Isolation::Namespace;
    assert_eq!(
        live.iter().any(|l| l.starts_with("mount")),
        host_mounts,
        "mounts seen: {live:#?}"
    );
    assert_eq!(
        live.iter().any(|l| l.starts_with("loop")),
        host_mounts,
        "loop devices seen: {live:#?}"
    );

    s.cli_ok(&["session", "delete", &gone]).await;
    let err = s.client.get_session(&gone).await.expect_err("deleted");
    assert_eq!(err.code(), Some(berth_api::ErrorCode::NotFound));
    let left: Vec<String> = s
        .leftovers(Some(&gone))
        .into_iter()
        .filter(|l| l.contains(&gone))
        .collect();
    assert!(
        left.is_empty(),
        "left behind by `session delete`: {left:#?}"
    );
    let ws = s.data_dir.join("workspaces");
    let images: Vec<String> = std::fs::read_dir(&ws)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !images.iter().any(|n| n.contains(&gone)),
        "workspace image kept: {images:?}"
    );
    assert!(
        images.iter().any(|n| n.contains(&kept)),
        "other workspace image gone: {images:?}"
    );
    // The other session is untouched.
    s.exec(&kept, "cat /mnt/workspace/x").await.ok();

    assert!(s.stop_server_async().await, "server stops on SIGTERM");
    let mut left = s.leftovers(Some(&kept));
    left.extend(s.leftovers(Some(&gone)));
    left.extend(s.leftovers(None));
    assert!(left.is_empty(), "left behind after server stop: {left:#?}");
    assert!(
        s.data_dir
            .join("workspaces")
            .join(format!("{kept}.ext4"))
            .exists(),
        "stop keeps workspaces"
    );
}

both!(sigterm_stops_the_server_while_a_command_streams);
async fn sigterm_stops_the_server_while_a_command_streams(mut s: Server, _: Isolation) {
    let session = uniq("streaming");
    let mut st = s
        .client
        .run_command(
            &session,
            &CommandRequest {
                command: Some("echo go; sleep 1000.375".into()),
                ..Default::default()
            },
        )
        .await
        .expect("run");
    let _ = st.next().await;
    let _ = st.next().await;
    // The stream stays open while the server is asked to stop.
    let stopped = s.stop_server_async().await;
    drop(st);
    assert!(
        stopped,
        "SIGTERM did not stop the server while a command stream was open"
    );
    let left = s.leftovers(Some(&session));
    assert!(left.is_empty(), "left behind: {left:#?}");
}

both!(a_sandbox_that_dies_is_noticed_and_the_next_command_resumes);
async fn a_sandbox_that_dies_is_noticed_and_the_next_command_resumes(
    s: Server,
    isolation: Isolation,
) {
    let session = uniq("dies");
    // Synced: a killed microVM takes its guest's page cache with it.
    s.exec(&session, "echo survived > /mnt/workspace/f && sync")
        .await
        .ok();
    // Kill every process of the sandbox from the host: the guest and its commands, or
    // the microVM's VMM.
    let cg = common::cgroups_named(&session)
        .into_iter()
        .find(|c| c.join("cgroup.procs").exists())
        .expect("session cgroup");
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).expect("procs");
    let killed: Vec<i32> = procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(!killed.is_empty(), "no process in {}", cg.display());
    for pid in &killed {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // The server notices and says why.
    let st = common::poll("the dead sandbox to be noticed", || async {
        let st = s.client.get_session(&session).await.expect("get");
        (st.state == SessionState::Stopped).then_some(st)
    })
    .await;
    let reason = match isolation {
        Isolation::Microvm => "vmm_exited",
        _ => "sandbox_exited",
    };
    assert_eq!(st.stop_reason.as_deref(), Some(reason), "{st:?}");
    // The next command resumes the session in a fresh sandbox with its workspace.
    let o = s.exec(&session, "cat /mnt/workspace/f").await.ok();
    assert_eq!(o.out(), "survived\n");
    if isolation == Isolation::Microvm {
        // The VMM is the server's own child, so the server reaps it. (A namespace
        // sandbox's init is orphaned when its helper exits: the host's init reaps it.)
        for pid in &killed {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "the killed VMM {pid} was reaped"
            );
        }
    }
}

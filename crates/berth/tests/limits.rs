//! Resource abuse stays inside the session's own cgroup limits.

mod common;

use berth_api::CommandRequest;
use common::{uniq, Server};

/// A cgroup file of the session, from whichever hierarchy holds it (v1 or v2).
fn cgroup_file(session: &str, file: &str) -> Option<String> {
    common::cgroups_named(session)
        .into_iter()
        .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
}

/// `key value` lines (pids.events, memory.events, memory.oom_control).
fn counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

const BOMB: &str = r#"exec python3 -c '
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
'"#;

#[tokio::test]
async fn a_fork_bomb_hits_the_pids_limit_and_the_session_recovers() {
    let Some(s) = Server::start("a_fork_bomb_hits_the_pids_limit_and_the_session_recovers").await
    else {
        return;
    };
    let rt = s.runtime(&uniq("rt-pids"), |r| r.pids = 64).await;
    let bomb = s.session(&uniq("bomb"), &rt).await;
    let other = s
        .session(&uniq("calm"), &s.runtime(&uniq("rt"), |_| {}).await)
        .await;
    assert_eq!(
        cgroup_file(&bomb, "pids.max").map(|v| v.trim().to_string()),
        Some("64".to_string()),
        "the session's pids cgroup carries the runtime's limit"
    );

    // The classic bomb, stopped by the command timeout (which kills the process group).
    let bomb_run = {
        let c = s.client.clone();
        let bomb = bomb.clone();
        tokio::spawn(async move {
            let st = c
                .run_command(
                    &bomb,
                    &CommandRequest {
                        // Every process forks forever and retries when fork fails, so the
                        // bomb ends only by the timeout (which kills the process group).
                        command: Some(BOMB.into()),
                        timeout_s: Some(5.0),
                        ..Default::default()
                    },
                )
                .await
                .expect("start bomb");
            common::collect(st).await
        })
    };
    // While it runs, the limit is hit and another session keeps answering.
    common::poll("the bomb to hit pids.max", || async {
        let events = cgroup_file(&bomb, "pids.events")?;
        counter(&events, "max").filter(|n| *n > 0)
    })
    .await;
    for i in 0..3 {
        let o = s.exec(&other, &format!("echo calm-{i}")).await.ok();
        assert_eq!(o.out(), format!("calm-{i}\n"));
    }
    let o = bomb_run.await.expect("bomb task");
    assert!(o.timed_out, "the bomb ends by its timeout: {o:?}");
    let current: u64 = cgroup_file(&bomb, "pids.current")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(current <= 64, "pids.current {current} above the limit");

    // Once the bomb's process group is gone, the session works again.
    let o = common::poll("the bombed session to answer again", || async {
        let o = s
            .exec(&bomb, "ps -eo args | grep -c '^python3 -c' || true")
            .await;
        (o.code == Some(0)).then_some(o)
    })
    .await;
    assert_eq!(o.out().trim(), "0", "bomb processes left over");
}

#[tokio::test]
async fn a_memory_hog_is_oom_killed_in_its_own_cgroup_while_another_session_answers() {
    let Some(s) =
        Server::start("a_memory_hog_is_oom_killed_in_its_own_cgroup_while_another_session_answers")
            .await
    else {
        return;
    };
    let rt = s.runtime(&uniq("rt-mem"), |r| r.memory = 64 << 20).await;
    let hog = s.session(&uniq("hog"), &rt).await;
    let other = s
        .session(&uniq("calm"), &s.runtime(&uniq("rt"), |_| {}).await)
        .await;
    let limit = cgroup_file(&hog, "memory.limit_in_bytes")
        .or_else(|| cgroup_file(&hog, "memory.max"))
        .map(|v| v.trim().to_string());
    assert_eq!(
        limit.as_deref(),
        Some("67108864"),
        "memory limit of the session's cgroup"
    );

    let hog_run = {
        let c = s.client.clone();
        let hog = hog.clone();
        tokio::spawn(async move {
            let st = c
                .run_command(
                    &hog,
                    &CommandRequest {
                        command: Some(
                            "exec python3 -c 'a = bytearray(512 << 20); print(len(a))'".into(),
                        ),
                        timeout_s: Some(120.0),
                        ..Default::default()
                    },
                )
                .await
                .expect("start hog");
            common::collect(st).await
        })
    };
    // Another session answers while the hog runs and after it died.
    let mut answered = 0;
    while !hog_run.is_finished() || answered < 2 {
        let o = s.exec(&other, "echo alive").await.ok();
        assert_eq!(o.out(), "alive\n");
        answered += 1;
    }
    let o = hog_run.await.expect("hog task");
    assert!(
        o.signal == Some(9) || o.code == Some(137),
        "the hog is killed by SIGKILL: {o:?} {}",
        o.err()
    );
    assert!(!o.out().contains("536870912"), "the hog got its 512 MiB");
    // The kill was the OOM killer of the session's own cgroup.
    let oom = cgroup_file(&hog, "memory.oom_control")
        .and_then(|t| counter(&t, "oom_kill"))
        .or_else(|| cgroup_file(&hog, "memory.events").and_then(|t| counter(&t, "oom_kill")));
    assert!(
        oom.unwrap_or(0) >= 1,
        "no OOM kill recorded in the session's cgroup: {oom:?}"
    );
    // The hog's own session survives its OOM kill.
    let o = common::poll("the hog's session to answer", || async {
        let o = s.exec(&hog, "echo back").await;
        (o.code == Some(0)).then_some(o)
    })
    .await;
    assert_eq!(o.out(), "back\n");
    let usage = s.client.get_session(&hog).await.expect("session").usage;
    assert!(
        usage.peak_memory_bytes <= 64 << 20,
        "peak {} above the limit",
        usage.peak_memory_bytes
    );
}

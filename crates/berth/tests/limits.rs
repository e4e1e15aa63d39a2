//! Resource abuse stays inside the session's own limits: its cgroup on the host (namespace
//! driver), or its VM's RAM and the guest's cgroup for commands (microVM driver).

mod common;

use berth_api::{CommandRequest, Isolation};
use common::drivers::{runtime, runtime_with};
use common::{uniq, Server};

/// Where a microVM's guest agent puts every command and shell: a cgroup with the
/// runtime's `pids` limit (`crates/berth-guest/src/agent/vm/boot.rs`).
const GUEST_CGROUP: &str = "/sys/fs/cgroup/sandbox";

/// The least RAM a microVM runtime may ask for (`MIN_MEMORY` in
/// `crates/berth-sandbox/src/microvm/mod.rs`); less is a 400.
const MICROVM_MIN_MEMORY: u64 = 256 << 20;

/// Memory a microVM's VMM may use on top of its guest's RAM (its host cgroup's limit).
const VMM_OVERHEAD: u64 = 256 << 20;

/// A file of the cgroup that limits the session's commands: on the host, from whichever
/// hierarchy holds it (v1 or v2); in a microVM, the guest's own (read with a single
/// command that needs no fork, so it runs even while the pids limit is hit).
async fn cgroup_file(
    s: &Server,
    isolation: Isolation,
    session: &str,
    file: &str,
) -> Option<String> {
    if isolation == Isolation::Microvm {
        let o = s.exec(session, &format!("cat {GUEST_CGROUP}/{file}")).await;
        return (o.code == Some(0)).then(|| o.out());
    }
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

both!(a_fork_bomb_hits_the_pids_limit_and_the_session_recovers);
async fn a_fork_bomb_hits_the_pids_limit_and_the_session_recovers(s: Server, isolation: Isolation) {
    let rt = runtime_with(&s, isolation, |r| r.pids = 64).await;
    let bomb = s.session(&uniq("bomb"), &rt).await;
    let other = s
        .session(&uniq("calm"), &runtime(&s, isolation).await)
        .await;
    assert_eq!(
        cgroup_file(&s, isolation, &bomb, "pids.max")
            .await
            .map(|v| v.trim().to_string()),
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
        let events = cgroup_file(&s, isolation, &bomb, "pids.events").await?;
        counter(&events, "max").filter(|n| *n > 0)
    })
    .await;
    for i in 0..3 {
        let o = s.exec(&other, &format!("echo calm-{i}")).await.ok();
        assert_eq!(o.out(), format!("calm-{i}\n"));
    }
    let o = bomb_run.await.expect("bomb task");
    assert!(o.timed_out, "the bomb ends by its timeout: {o:?}");
    let current: u64 = cgroup_file(&s, isolation, &bomb, "pids.current")
        .await
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

both!(a_memory_hog_is_oom_killed_in_its_own_cgroup_while_another_session_answers);
async fn a_memory_hog_is_oom_killed_in_its_own_cgroup_while_another_session_answers(
    s: Server,
    isolation: Isolation,
) {
    // 64 MiB, or the smallest microVM (its guest kernel needs the room to boot).
    let memory = match isolation {
        Isolation::Microvm => MICROVM_MIN_MEMORY,
        _ => 64 << 20,
    };
    let rt = runtime_with(&s, isolation, |r| r.memory = memory).await;
    let hog = s.session(&uniq("hog"), &rt).await;
    let other = s
        .session(&uniq("calm"), &runtime(&s, isolation).await)
        .await;
    if isolation == Isolation::Microvm {
        // The guest's RAM is the limit.
        let o = s.exec(&hog, "grep MemTotal /proc/meminfo").await.ok().out();
        let kib: u64 = o
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("MemTotal: {o:?}"));
        assert!(
            kib << 10 <= MICROVM_MIN_MEMORY,
            "the guest has {kib} KiB of RAM"
        );
    } else {
        let limit = match cgroup_file(&s, isolation, &hog, "memory.limit_in_bytes").await {
            Some(v) => Some(v),
            None => cgroup_file(&s, isolation, &hog, "memory.max").await,
        }
        .map(|v| v.trim().to_string());
        assert_eq!(
            limit.as_deref(),
            Some("67108864"),
            "memory limit of the session's cgroup"
        );
    }

    let hog_run = {
        let c = s.client.clone();
        let hog = hog.clone();
        tokio::spawn(async move {
            let st = c
                .run_command(
                    &hog,
                    &CommandRequest {
                        // 8 MiB at a time, each zero-filled (touched): an allocation
                        // larger than a microVM's whole RAM would just fail at once.
                        command: Some(
                            "exec python3 -c 'a = [bytearray(8 << 20) for _ in range(64)]; \
                             print(sum(map(len, a)))'"
                                .into(),
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
    // The kill was the OOM killer of the session's own cgroup (its own guest kernel's,
    // in a microVM).
    let oom = if isolation == Isolation::Microvm {
        let o = s.exec(&hog, "cat /proc/vmstat").await.ok();
        counter(&o.out(), "oom_kill")
    } else {
        match cgroup_file(&s, isolation, &hog, "memory.oom_control").await {
            Some(t) => counter(&t, "oom_kill"),
            None => cgroup_file(&s, isolation, &hog, "memory.events")
                .await
                .and_then(|t| counter(&t, "oom_kill")),
        }
    };
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
    // Metered: the sandbox's cgroup on the host, which for a microVM is its VMM's (the
    // guest's RAM and the VMM's own allowance).
    let limit = match isolation {
        Isolation::Microvm => MICROVM_MIN_MEMORY + VMM_OVERHEAD,
        _ => 64 << 20,
    };
    let usage = s.client.get_session(&hog).await.expect("session").usage;
    assert!(usage.peak_memory_bytes > 0, "{usage:?}");
    assert!(
        usage.peak_memory_bytes <= limit,
        "peak {} above the limit {limit}",
        usage.peak_memory_bytes
    );
}

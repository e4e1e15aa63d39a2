//! What one sandbox can see: not other sessions, not host secrets, not the Berth API.

mod common;

use std::time::Duration;

use berth_api::{CommandRequest, Isolation};
use common::drivers::runtime;
use common::{uniq, Output, Server};
use futures::StreamExt;

/// Start a long-running command and return once its stdout contains `ready`; the
/// returned task drains the rest of the stream (dropping it disconnects = kills).
async fn start_until(
    s: &Server,
    session: &str,
    cmd: &str,
    ready: &str,
) -> tokio::task::JoinHandle<Output> {
    let mut stream = s
        .client
        .run_command(
            session,
            &CommandRequest {
                command: Some(cmd.to_string()),
                timeout_s: Some(120.0),
                ..Default::default()
            },
        )
        .await
        .expect("start command");
    let mut seen = Output::default();
    let b64 = base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    let found = tokio::time::timeout(common::DEADLINE, async {
        while let Some(ev) = stream.next().await {
            match ev.expect("event") {
                berth_api::CommandEvent::Stdout { data } => {
                    seen.stdout.extend(b64.decode(data).expect("b64"));
                    if seen.out().contains(ready) {
                        return true;
                    }
                }
                berth_api::CommandEvent::Stderr { data } => {
                    seen.stderr.extend(b64.decode(data).expect("b64"))
                }
                berth_api::CommandEvent::Started { .. } => {}
                other => panic!(
                    "{cmd:?} ended before {ready:?}: {other:?}; {seen:?} {}",
                    seen.err()
                ),
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "{cmd:?} never printed {ready:?}: {}",
        seen.err()
    );
    tokio::spawn(async move { common::collect(stream).await })
}

const LISTENER: &str = r#"python3 -c '
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 5432))
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[1].encode() + b"\n")
    c.close()
' "#;

const CONNECT: &str = r#"python3 -c '
import socket
c = socket.create_connection(("127.0.0.1", 5432), timeout=10)
print(c.recv(100).decode().strip())
'"#;

both!(two_sessions_listen_on_the_same_port_at_the_same_time);
async fn two_sessions_listen_on_the_same_port_at_the_same_time(s: Server, isolation: Isolation) {
    let rt = runtime(&s, isolation).await;
    let a = s.session(&uniq("port-a"), &rt).await;
    let b = s.session(&uniq("port-b"), &rt).await;
    let la = start_until(&s, &a, &format!("{LISTENER} answer-from-A"), "listening").await;
    let lb = start_until(&s, &b, &format!("{LISTENER} answer-from-B"), "listening").await;
    // Both are bound to 127.0.0.1:5432 right now, and each session reaches its own.
    assert_eq!(s.exec(&a, CONNECT).await.ok().out().trim(), "answer-from-A");
    assert_eq!(s.exec(&b, CONNECT).await.ok().out().trim(), "answer-from-B");
    assert!(
        !la.is_finished() && !lb.is_finished(),
        "both listeners still run"
    );
    // Disconnect both (kills the listeners) before the server is stopped.
    la.abort();
    lb.abort();
    let _ = la.await;
    let _ = lb.await;
}

both!(a_session_sees_neither_processes_nor_files_of_another);
async fn a_session_sees_neither_processes_nor_files_of_another(s: Server, isolation: Isolation) {
    let rt = runtime(&s, isolation).await;
    let a = s.session(&uniq("see-a"), &rt).await;
    let b = s.session(&uniq("see-b"), &rt).await;
    let marker = uniq("marker");
    // B: a file in its workspace and in its /tmp, and a process with a recognisable argv.
    s.exec(
        &b,
        &format!("echo secret-of-b > /mnt/workspace/{marker}; echo x > /tmp/{marker}.tmp"),
    )
    .await
    .ok();
    let held = start_until(&s, &b, "echo started; exec sleep 4242.25", "started").await;
    // Sanity: B itself sees its process.
    common::poll("B's sleep to show up in B", || async {
        s.exec(&b, "pgrep -f 'sleep 4242.25'")
            .await
            .code
            .filter(|c| *c == 0)
    })
    .await;

    let ps = s.exec(&a, "ps -eo pid,args").await.ok().out();
    assert!(!ps.contains("4242.25"), "A sees B's process:\n{ps}");
    let procs = s
        .exec(&a, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
        .await
        .out();
    assert!(
        !procs.contains("4242.25"),
        "A sees B's process in /proc:\n{procs}"
    );
    // A's pid namespace holds only A's processes: the guest (pid 1) and this command.
    // A microVM's kernel has its own threads (kthreadd, pid 2, and its children) too.
    let count = match isolation {
        Isolation::Microvm => "ps --deselect -p 2 --ppid 2 -o pid= | wc -l",
        _ => "ls -d /proc/[0-9]* | wc -l",
    };
    let pids = s.exec(&a, count).await.ok().out();
    assert!(
        pids.trim().parse::<u32>().expect("count") < 10,
        "A sees {pids} pids"
    );

    let found = s
        .exec(
            &a,
            &format!(
                "find / \\( -path /proc -o -path /sys \\) -prune -o -name '{marker}*' -print 2>/dev/null; true"
            ),
        )
        .await
        .out();
    assert!(found.trim().is_empty(), "A finds B's files: {found}");
    let grep = s
        .exec(
            &a,
            "grep -rsl secret-of-b /mnt /tmp /run /var/tmp /root /home; true",
        )
        .await
        .out();
    assert!(grep.trim().is_empty(), "A reads B's data: {grep}");
    // Neither the data dir nor the other workspace image is reachable by path.
    let dd = s.data_dir.display().to_string();
    let o = s
        .exec(
            &a,
            &format!("ls -d '{dd}' '{dd}/workspaces/{b}.ext4' /mnt/workspace/../{b} 2>&1"),
        )
        .await;
    assert_ne!(o.code, Some(0), "data dir visible in A: {}", o.out());
    held.abort();
    let _ = held.await;
}

/// A host file under a fresh directory, removed on drop.
struct HostDir(std::path::PathBuf);
impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

both!(host_root_home_data_dir_and_shadow_are_invisible);
async fn host_root_home_data_dir_and_shadow_are_invisible(s: Server, _: Isolation) {
    let name = uniq("berth-it-host");
    let root_dir = HostDir(std::path::Path::new("/root").join(&name));
    let home_dir = HostDir(std::path::Path::new("/home").join(&name));
    for d in [&root_dir.0, &home_dir.0] {
        std::fs::create_dir_all(d).expect("mkdir");
        std::fs::write(d.join("secret.txt"), format!("host-secret-{name}\n")).expect("write");
    }
    let shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    let session = uniq("host");
    s.exec(&session, "true").await.ok();

    for d in [&root_dir.0, &home_dir.0] {
        let o = s
            .exec(
                &session,
                &format!(
                    "cat '{}/secret.txt' 2>&1; ls -la '{}' 2>&1",
                    d.display(),
                    d.display()
                ),
            )
            .await;
        assert!(
            !o.out().contains("host-secret"),
            "host file visible: {}",
            o.out()
        );
    }
    let ls = s.exec(&session, "ls -A /root /home 2>&1").await.out();
    assert!(
        !ls.contains(&name),
        "host /root or /home listed inside:\n{ls}"
    );
    let found = s
        .exec(
            &session,
            &format!("find / \\( -path /proc -o -path /sys \\) -prune -o -name '{name}' -print 2>/dev/null; true"),
        )
        .await
        .out();
    assert!(found.trim().is_empty(), "found host dirs inside: {found}");

    // /etc/shadow is masked: unreadable or empty, never the host's content.
    let o = s.exec(&session, "cat /etc/shadow").await;
    assert!(
        o.stdout.is_empty(),
        "/etc/shadow readable inside: {} bytes",
        o.stdout.len()
    );
    if !shadow.is_empty() {
        let first_user = String::from_utf8_lossy(&shadow)
            .lines()
            .next()
            .and_then(|l| l.split(':').nth(1).map(str::to_string))
            .unwrap_or_default();
        if first_user.len() > 3 {
            let g = s
                .exec(&session, &format!("grep -rsF '{first_user}' /etc; true"))
                .await
                .out();
            assert!(
                g.trim().is_empty(),
                "host password hash readable inside: {g}"
            );
        }
    }
    for f in [
        "/etc/gshadow",
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_rsa_key",
    ] {
        let o = s.exec(&session, &format!("cat {f} 2>/dev/null")).await;
        assert!(o.stdout.is_empty(), "{f} readable inside");
    }

    // The data dir (and the admin token in it) does not exist inside.
    let dd = s.data_dir.display().to_string();
    let o = s
        .exec(
            &session,
            &format!("ls -la '{dd}' 2>&1; cat '{dd}/admin.token' 2>&1"),
        )
        .await;
    assert!(!o.out().contains(&s.token), "admin token readable inside");
    let o = s.exec(&session, &format!("test -e '{dd}'")).await;
    assert_eq!(o.code, Some(1), "data dir path exists inside the sandbox");
    let token = s
        .exec(
            &session,
            "find / \\( -path /proc -o -path /sys \\) -prune -o -name admin.token -print 2>/dev/null; true",
        )
        .await
        .out();
    assert!(token.trim().is_empty(), "admin.token found inside: {token}");
}

/// The host's own (non-loopback) IPv4 addresses.
fn host_ips() -> Vec<String> {
    let out = std::process::Command::new("hostname").arg("-I").output();
    let mut ips: Vec<String> = out
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    ips.retain(|ip| {
        ip.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| !a.is_loopback())
    });
    ips
}

both!(the_sandbox_cannot_reach_the_berth_api);
async fn the_sandbox_cannot_reach_the_berth_api(s: Server, _: Isolation) {
    // A listener on every host address, to show that no host port is reachable at all.
    let any = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let any_port = any.local_addr().expect("addr").port();
    let accepted = tokio::spawn(async move { any.accept().await.is_ok() });

    let session = uniq("net");
    s.exec(&session, "true").await.ok();
    let mut targets = vec![("127.0.0.1".to_string(), s.port)];
    for ip in host_ips() {
        targets.push((ip.clone(), s.port));
        targets.push((ip, any_port));
    }
    targets.push(("127.0.0.1".to_string(), any_port));
    for (ip, port) in &targets {
        let o = s
            .exec(
                &session,
                &format!(
                    "python3 -c 'import socket; socket.create_connection((\"{ip}\", {port}), timeout=3); print(\"connected\")'"
                ),
            )
            .await;
        assert!(
            !o.out().contains("connected") && o.code != Some(0),
            "sandbox reached {ip}:{port}: {o:?}"
        );
        let o = s
            .exec(
                &session,
                &format!("curl -s -m 3 http://{ip}:{port}/healthz"),
            )
            .await;
        assert!(
            !o.out().contains("ok"),
            "sandbox reached the API at {ip}:{port}"
        );
    }
    // Only the loopback interface exists.
    let links = s.exec(&session, "ls /sys/class/net").await.ok().out();
    assert_eq!(
        links.split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "interfaces: {links}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !accepted.is_finished(),
        "the host listener accepted a connection from the sandbox"
    );
    accepted.abort();
}

both!(two_servers_on_one_host_do_not_share_sandboxes_of_the_same_session_id);
async fn two_servers_on_one_host_do_not_share_sandboxes_of_the_same_session_id(
    s1: Server,
    isolation: Isolation,
) {
    let test = "two_servers_on_one_host_do_not_share_sandboxes_of_the_same_session_id (2)";
    let Some(s2) = common::drivers::server(test, isolation).await else {
        return;
    };
    // Session ids are client-chosen, so two servers can hold the same one.
    let id = uniq("same-id");
    s1.exec(&id, "echo one > /mnt/workspace/who").await.ok();
    s2.exec(
        &id,
        "echo two > /mnt/workspace/who; setsid nohup sleep 1000.875 >/dev/null 2>&1 </dev/null &",
    )
    .await
    .ok();
    // Stopping the session on one server must not touch the other server's sandbox.
    s1.client.stop_session(&id).await.expect("stop on server 1");
    let o = s2
        .exec(&id, "cat /mnt/workspace/who; pgrep -f 'sleep 1000.875'")
        .await;
    assert_eq!(
        o.code,
        Some(0),
        "server 2's sandbox was hit by server 1's stop: {o:?}"
    );
    assert!(o.out().starts_with("two\n"), "{o:?}");
    let st = s2.client.get_session(&id).await.expect("get");
    assert_eq!(st.state, berth_api::SessionState::Running, "{st:?}");
    assert!(
        st.stop_reason.is_none() || st.started_at_ms.is_some(),
        "{st:?}"
    );
}

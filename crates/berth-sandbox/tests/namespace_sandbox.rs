//! Real sandboxes: needs root, cgroups, overlayfs, loop devices and a built
//! `target/debug/berth` (or `BERTH_EXE`). Skips with a message otherwise.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use berth_api::RuntimeSpec;
use berth_core::driver::{Driver, SandboxRequest};
use berth_guest::client::Guest;
use berth_guest::proto::{exec_input, exec_output, ExecInput, ExecStart};
use berth_sandbox::{NamespaceConfig, NamespaceDriver};
use futures::StreamExt;

fn berth_exe() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BERTH_EXE") {
        return Some(p.into());
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/berth");
    p.is_file().then(|| p.canonicalize().unwrap_or(p))
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    if berth_exe().is_none() {
        return Some(
            "target/debug/berth missing: run `cargo build -p berth` (or set BERTH_EXE)".into(),
        );
    }
    None
}

/// Stops a test's sandbox if the test panics, before its temp data dir is deleted
/// (deleting a data dir through live mounts would leak the mounts and the sandbox).
/// Declare it after the `TempDir` so it drops first.
struct StopOnDrop {
    run_dir: PathBuf,
}

impl StopOnDrop {
    fn new(data_dir: &std::path::Path, session: &str) -> Self {
        Self {
            run_dir: data_dir.join("run").join(session),
        }
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.run_dir.exists() {
            let _ = std::process::Command::new(berth_exe().expect("berth"))
                .args(["sandbox-helper", "stop"])
                .arg(&self.run_dir)
                .status();
        }
    }
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn exec(guest: &Guest, argv: &[&str]) -> Output {
    let start = ExecInput {
        kind: Some(exec_input::Kind::Start(ExecStart {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            timeout_ms: 10_000,
            ..Default::default()
        })),
    };
    let input = futures::stream::iter([start]).chain(futures::stream::pending());
    let mut stream = guest
        .clone()
        .exec(input)
        .await
        .expect("exec call")
        .into_inner();
    let mut out = Output {
        code: None,
        stdout: String::new(),
        stderr: String::new(),
    };
    while let Some(msg) = stream.next().await {
        match msg.expect("exec stream").kind {
            Some(exec_output::Kind::Stdout(b)) => out.stdout.push_str(&String::from_utf8_lossy(&b)),
            Some(exec_output::Kind::Stderr(b)) => out.stderr.push_str(&String::from_utf8_lossy(&b)),
            Some(exec_output::Kind::Exited(e)) => {
                out.code = e.code;
                break;
            }
            _ => {}
        }
    }
    out
}

fn data_dir_of(driver: &NamespaceDriver) -> PathBuf {
    driver
        .workspace_image("x")
        .parent()
        .and_then(|p| p.parent())
        .expect("data dir")
        .to_path_buf()
}

fn request(session: &str, slot: u32) -> SandboxRequest {
    let mut runtime = RuntimeSpec::named("test");
    runtime.workspace_size = 256 << 20;
    runtime.memory = 512 << 20;
    runtime.cpus = Some(1.0);
    runtime.env.insert("BERTH_TEST".into(), "yes".into());
    SandboxRequest {
        session_id: session.into(),
        runtime,
        uid_slot: slot,
    }
}

/// Nothing of the session may remain on the host after `stop`.
fn assert_no_leaks(data_dir: &std::path::Path, session: &str) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dd = data_dir.to_string_lossy();
    assert!(
        !mountinfo.lines().any(|l| l.contains(dd.as_ref())),
        "mounts left under the data dir:\n{mountinfo}"
    );
    let losetup = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .expect("losetup");
    let losetup = String::from_utf8_lossy(&losetup.stdout);
    assert!(
        !losetup.contains(dd.as_ref()),
        "loop devices left: {losetup}"
    );
    let cgroup = berth_sandbox::namespace::paths::DataDir::new(data_dir)
        .session(session)
        .cgroup();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .expect("cgroup root")
        .flatten()
    {
        let dir = hierarchy.path().join(cgroup.trim_start_matches('/'));
        assert!(!dir.exists(), "cgroup left: {}", dir.display());
    }
    assert!(!PathBuf::from("/sys/fs/cgroup")
        .join(cgroup.trim_start_matches('/'))
        .exists());
    assert!(!data_dir.join("run").join(session).exists(), "run dir left");
    let links = std::fs::read_dir(data_dir.join("run/.sock"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(links, 0, "socket links left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_lifecycle() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping namespace sandbox test: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let data_dir = tmp.path().to_path_buf();
    let config = NamespaceConfig::new(&data_dir, berth_exe().expect("berth"));
    let driver = NamespaceDriver::new(config.clone()).expect("driver");
    // Long ids exercise the short socket link and hostname truncation.
    let session = format!("it-{}-{}", std::process::id(), "x".repeat(100));
    let req = request(&session, 3);
    let _guard = StopOnDrop::new(&data_dir_of(&driver), &session);

    let t = Instant::now();
    let sandbox = driver.start(&req).await.expect("start");
    eprintln!("start (new workspace) -> health ok: {:?}", t.elapsed());
    let guest = &sandbox.guest;
    assert!(driver.is_alive(&session).await);

    let id = exec(guest, &["id"]).await;
    assert_eq!(id.code, Some(0), "{}", id.stderr);
    assert!(
        id.stdout.starts_with("uid=0(root) gid=0(root)"),
        "{}",
        id.stdout
    );
    let host = exec(guest, &["hostname"]).await;
    assert_eq!(host.stdout.trim(), &session[..63]);
    let etc = exec(
        guest,
        &[
            "sh",
            "-c",
            "cat /etc/hostname; grep -c localhost /etc/hosts",
        ],
    )
    .await;
    assert_eq!(
        etc.stdout,
        format!("{}\n2\n", &session[..63]),
        "{}",
        etc.stderr
    );
    let ls = exec(guest, &["ls", "-A", "/root", "/home"]).await;
    assert_eq!(ls.code, Some(0), "{}", ls.stderr);
    assert_eq!(
        ls.stdout.trim(),
        "/home:\n\n/root:",
        "empty /root and /home"
    );
    let shadow = exec(guest, &["cat", "/etc/shadow"]).await;
    assert_eq!(shadow.stdout, "", "shadow is masked");
    let env = exec(guest, &["sh", "-c", "echo $BERTH_TEST $HOME $TERM"]).await;
    assert_eq!(env.stdout.trim(), "yes /root xterm-256color");
    let write = exec(
        guest,
        &[
            "sh",
            "-c",
            "echo persisted > /mnt/workspace/f && touch /tmp/x /x && ls -ld /mnt/workspace",
        ],
    )
    .await;
    assert_eq!(write.code, Some(0), "{}", write.stderr);
    assert!(write.stdout.contains("root root"), "{}", write.stdout);
    let denied = exec(guest, &["unshare", "-U", "true"]).await;
    assert_ne!(denied.code, Some(0), "unshare is denied");
    let etc = exec(guest, &["touch", "/etc/x"]).await;
    assert_ne!(etc.code, Some(0), "/etc is read-only");
    let status = exec(guest, &["cat", "/proc/self/status"]).await.stdout;
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    if std::path::Path::new("/proc/timer_list").exists() {
        let masked = exec(guest, &["wc", "-c", "/proc/timer_list"]).await;
        assert_eq!(
            masked.stdout.trim(),
            "0 /proc/timer_list",
            "{}",
            masked.stderr
        );
    }
    if std::path::Path::new("/etc/ssl/private").exists() {
        let private = exec(guest, &["ls", "-A", "/etc/ssl/private"]).await;
        assert_eq!(
            (private.code, private.stdout.as_str()),
            (Some(0), ""),
            "masked dir"
        );
    }
    let ours = exec(guest, &["sh", "-c", "ls /.berth; ls /run/berth"]).await;
    // The binary and the guest's socket; nothing else (shells are recorded by the host).
    assert_eq!(ours.stdout, "berth\nguest.sock\n", "{}", ours.stderr);
    let lo = exec(guest, &["cat", "/sys/class/net/lo/operstate"]).await;
    eprintln!("lo: {} {}", lo.stdout.trim(), lo.stderr.trim());

    // The sandbox lives in its own session, so a SIGKILLed server leaves it running.
    let sid = |pid: u32| -> String {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        rest.split_whitespace().nth(3).expect("session").to_string()
    };
    assert_ne!(sid(sandbox.init_pid), sid(std::process::id()));

    // Memory exhaustion is an OOM kill inside the sandbox's own cgroup.
    if std::path::Path::new("/usr/bin/python3").exists() {
        let oom = exec(
            guest,
            &["python3", "-c", "b = bytearray(1 << 30); print(len(b))"],
        )
        .await;
        assert_eq!(oom.code, None, "killed, not exited: {}", oom.stderr);
        assert_eq!(exec(guest, &["true"]).await.code, Some(0), "guest survives");
    }

    let stats = driver.stats(&session).await.expect("stats while running");
    assert!(stats.cpu_ns > 0 && stats.memory_peak_bytes > 0, "{stats:?}");
    assert!(driver.workspace_bytes(&session).await > 0);
    assert_eq!(driver.leftovers().await, vec![session.clone()]);

    // A restarted server adopts the running sandbox.
    let restarted = NamespaceDriver::new(config.clone()).expect("driver");
    let adopted = restarted
        .adopt(&req)
        .await
        .expect("adopt")
        .expect("running");
    assert_eq!(adopted.init_pid, sandbox.init_pid);
    let again = exec(&adopted.guest, &["cat", "/mnt/workspace/f"]).await;
    assert_eq!(again.stdout.trim(), "persisted");

    driver.stop(&session).await.expect("stop");
    driver.stop(&session).await.expect("stop is idempotent");
    assert!(!driver.is_alive(&session).await);
    assert!(driver.stats(&session).await.is_none());
    assert!(restarted.adopt(&req).await.expect("adopt").is_none());
    assert_no_leaks(&data_dir, &session);
    assert!(driver.workspace_bytes(&session).await > 0, "image bytes");

    // Resume: a fresh sandbox on the same workspace.
    let t = Instant::now();
    let sandbox = driver.start(&req).await.expect("restart");
    eprintln!("start (existing workspace) -> health ok: {:?}", t.elapsed());
    let f = exec(&sandbox.guest, &["cat", "/mnt/workspace/f", "/x"]).await;
    assert_eq!(
        f.stdout.trim(),
        "persisted",
        "workspace kept, rootfs fresh: {}",
        f.stderr
    );
    assert_ne!(f.code, Some(0), "/x was in the ephemeral rootfs");
    driver.stop(&session).await.expect("stop");
    assert_no_leaks(&data_dir, &session);

    driver.delete_workspace(&session).await.expect("delete");
    assert!(!driver.workspace_image(&session).exists());
}

/// `(p50, p95)` by nearest rank.
fn percentiles(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let rank = |p: usize| times[(times.len() * p).div_ceil(100).max(1) - 1];
    (rank(50), rank(95))
}

/// `start()` latency on resume (existing workspace) and on a new session (new workspace,
/// default 10 GiB size), `BERTH_LATENCY_RUNS` times each (default 5). Run with the
/// release binary and `--release` for representative numbers (see the design doc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_latency() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping namespace sandbox test: {why}");
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let runs: usize = std::env::var("BERTH_LATENCY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let tmp = tempfile::tempdir().expect("tmp");
    let config = NamespaceConfig::new(tmp.path(), berth_exe().expect("berth"));
    let driver = NamespaceDriver::new(config).expect("driver");
    let session = format!("lat-{}", std::process::id());
    let req = request(&session, 4);
    let _guard = StopOnDrop::new(&data_dir_of(&driver), &session);
    // First start makes the workspace image; later ones measure resume.
    driver.start(&req).await.expect("start");
    driver.stop(&session).await.expect("stop");
    let mut times = vec![];
    let mut stops = vec![];
    for _ in 0..runs {
        let t = Instant::now();
        driver.start(&req).await.expect("start");
        times.push(t.elapsed());
        let t = Instant::now();
        driver.stop(&session).await.expect("stop");
        stops.push(t.elapsed());
    }
    assert_no_leaks(tmp.path(), &session);
    let (p50, p95) = percentiles(&mut times);
    let (s50, s95) = percentiles(&mut stops);
    eprintln!("resume start -> health ok ({runs} runs): p50 {p50:?} p95 {p95:?}");
    eprintln!("stop ({runs} runs): p50 {s50:?} p95 {s95:?}");
    assert!(p50 < Duration::from_secs(5));

    let mut fresh = vec![];
    for i in 0..runs {
        let id = format!("new-{}-{i}", std::process::id());
        let mut req = request(&id, 5);
        req.runtime.workspace_size = RuntimeSpec::named("x").workspace_size;
        let _guard = StopOnDrop::new(&data_dir_of(&driver), &id);
        let t = Instant::now();
        let sandbox = driver.start(&req).await.expect("start new");
        fresh.push(t.elapsed());
        if i == 0 {
            // Most likely a spare (made 50 ms after the driver started): its root dir
            // must belong to sandbox root like a freshly formatted one.
            let ls = exec(&sandbox.guest, &["stat", "-c", "%U:%G", "/mnt/workspace"]).await;
            assert_eq!(ls.stdout.trim(), "root:root", "{}", ls.stderr);
        }
        driver.stop(&id).await.expect("stop");
        assert_no_leaks(tmp.path(), &id);
        driver.delete_workspace(&id).await.expect("delete");
        // Like a client that takes a moment before its next session; lets the
        // background refill of spare images run outside the measured start.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (p50, p95) = percentiles(&mut fresh);
    eprintln!("new session start -> health ok ({runs} runs): p50 {p50:?} p95 {p95:?}");
}

/// A directory image: `/usr` is a root filesystem good enough for the guest (it holds
/// `lib64`, `lib` and `bin`), and exercises mount-target creation in a foreign tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_image() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping namespace sandbox test: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let config = NamespaceConfig::new(tmp.path(), berth_exe().expect("berth"));
    let driver = NamespaceDriver::new(config).expect("driver");
    let session = format!("dir-{}", std::process::id());
    let mut req = request(&session, 5);
    let _guard = StopOnDrop::new(&data_dir_of(&driver), &session);
    req.runtime.image = "/usr".into();
    let sandbox = driver.start(&req).await.expect("start");
    let out = exec(
        &sandbox.guest,
        &[
            "/bin/sh",
            "-c",
            "test -e /etc/passwd || echo no-host-etc; touch /mnt/workspace/a /new && echo ok",
        ],
    )
    .await;
    assert!(out.stdout.contains("ok"), "{} {}", out.stdout, out.stderr);
    assert!(out.stdout.contains("no-host-etc"), "{}", out.stdout);
    driver.stop(&session).await.expect("stop");
    assert_no_leaks(tmp.path(), &session);
}

/// A sandbox whose init died (crash, OOM of the guest) is cleaned up by `adopt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_sandbox_is_cleaned_up() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping namespace sandbox test: {why}");
        return;
    }
    // `RUST_LOG=berth_sandbox=debug` shows how long `stop` waited for the workspace's
    // loop device (the container's mount namespace goes away asynchronously).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir().expect("tmp");
    let config = NamespaceConfig::new(tmp.path(), berth_exe().expect("berth"));
    let driver = NamespaceDriver::new(config).expect("driver");
    let session = format!("dead-{}", std::process::id());
    let req = request(&session, 6);
    let _guard = StopOnDrop::new(&data_dir_of(&driver), &session);
    let sandbox = driver.start(&req).await.expect("start");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sandbox.init_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill init");
    let deadline = Instant::now() + Duration::from_secs(5);
    while driver.is_alive(&session).await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!driver.is_alive(&session).await);
    assert_eq!(driver.leftovers().await, vec![session.clone()]);
    assert!(driver.adopt(&req).await.expect("adopt").is_none());
    assert_no_leaks(tmp.path(), &session);
    assert!(driver.leftovers().await.is_empty());
}

/// `stop` returns only once the workspace's loop device is gone, even when the
/// container's mount namespace (which holds the workspace mount too) outlives the
/// host's unmount. Normally that is a moment of asynchronous teardown in the kernel;
/// here a held `/proc/<init>/ns/mnt` stretches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_waits_for_the_workspace_loop_device() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping namespace sandbox test: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let config = NamespaceConfig::new(tmp.path(), berth_exe().expect("berth"));
    let driver = NamespaceDriver::new(config).expect("driver");
    let session = format!("held-{}", std::process::id());
    let req = request(&session, 7);
    let _guard = StopOnDrop::new(&data_dir_of(&driver), &session);
    let sandbox = driver.start(&req).await.expect("start");
    let image = driver.workspace_image(&session);
    let attached = berth_sandbox::loopdev::devices_backed_by(&image);
    assert_eq!(attached.len(), 1, "{attached:?}");
    let ns = std::fs::File::open(format!("/proc/{}/ns/mnt", sandbox.init_pid)).expect("mnt ns");
    let holder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(ns);
    });
    driver.stop(&session).await.expect("stop");
    assert_eq!(
        berth_sandbox::loopdev::devices_backed_by(&image),
        Vec::<PathBuf>::new(),
        "stop returned with the workspace still attached"
    );
    holder.join().expect("holder");
    assert_no_leaks(tmp.path(), &session);
}

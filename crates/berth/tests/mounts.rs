//! A runtime's `mounts` (host directories shared into every sandbox), from both sides:
//! what the session sees and may do through a mount, and what lands on (or stays
//! out of) the host. The namespace driver bind-mounts the source; the microVM driver
//! shares it over virtio-fs, one `virtiofsd` per mount in a user namespace mapped to
//! the session's uid range.
//!
//! Every test keeps its host directories in a fresh temp dir. `tempfile` creates that
//! dir 0700 and owned by root, but a sandbox's root is an unprivileged host uid (its
//! mapped root, `--uid-base` + slot × 65536): it could not even traverse the temp dir to
//! reach the mount source, so the tests open it up to 0755 (and a directory the
//! session writes to to 0777, as it does not own it).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth_api::runtime::Mount;
use berth_api::{Isolation, SessionState};
use common::drivers::runtime_with;
use common::{uniq, Server};

/// The host uid (= gid) a session's root maps to when it is the first session of a
/// fresh server: `berth server --uid-base`'s default (the harness does not pass one)
/// plus slot 0 × 65536. Every test here runs on a server of its own and writes through
/// its first session.
const FIRST_SESSION_ROOT: u32 = 1_000_000;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A fresh temp dir the sandbox's mapped root may traverse (see the module docs).
fn host_tmp() -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix("berth-mounts-")
        .tempdir()
        .expect("temp dir");
    chmod(tmp.path(), 0o755);
    tmp
}

/// `parent/name`, created with `mode`.
fn host_dir(parent: &Path, name: &str, mode: u32) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    chmod(&dir, mode);
    dir
}

/// `dir/name` holding `content`, readable by everyone.
fn host_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, content).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    chmod(&file, 0o644);
    file
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn mount(source: &Path, target: &str, read_only: bool) -> Mount {
    Mount {
        source: source.to_string_lossy().into_owned(),
        target: target.to_string(),
        read_only,
    }
}

/// A runtime of `isolation` with these mounts.
async fn runtime_mounting(s: &Server, isolation: Isolation, mounts: Vec<Mount>) -> String {
    runtime_with(s, isolation, |r| r.mounts = mounts).await
}

/// Everything under `dir` (and `dir` itself) that a write could change: names, types,
/// modes, owners, sizes, mtimes and contents. Equal snapshots = nothing was written.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read dir {}: {e}", d.display()));
        for e in entries {
            let p = e.expect("dir entry").path();
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let what = if m.is_dir() {
                todo.push(p.clone());
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("-> {:?}", std::fs::read_link(&p).expect("readlink"))
            } else {
                format!(
                    "{:?}",
                    String::from_utf8_lossy(&std::fs::read(&p).expect("read"))
                )
            };
            out.insert(p.clone(), describe(&m, &what));
        }
    }
    let m = std::fs::metadata(dir).expect("stat");
    out.insert(dir.to_path_buf(), describe(&m, "the dir itself"));
    out
}

fn describe(m: &std::fs::Metadata, what: &str) -> String {
    format!(
        "mode {:o} owner {}:{} size {} mtime {}.{:09} {what}",
        m.mode(),
        m.uid(),
        m.gid(),
        m.len(),
        m.mtime(),
        m.mtime_nsec()
    )
}

/// The per-mount options (`rw,nosuid,nodev,…`) of the mount at `target`, as the
/// session's `/proc/self/mountinfo` lists them (the last one when stacked).
async fn mount_options(s: &Server, session: &str, target: &str) -> String {
    let info = s.exec(session, "cat /proc/self/mountinfo").await.ok().out();
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(target))
        .filter_map(|l| l.split(' ').nth(5))
        .next_back()
        .unwrap_or_else(|| panic!("no mount at {target} in the session:\n{info}"))
        .to_string()
}

both!(a_read_only_mount_shows_host_files_and_refuses_writes);
async fn a_read_only_mount_shows_host_files_and_refuses_writes(s: Server, isolation: Isolation) {
    let tmp = host_tmp();
    // Writable by everyone on the host, so that the read-only flag is the only thing
    // refusing the session's writes (else some fail on permissions first, EACCES).
    let dir = host_dir(tmp.path(), "reference", 0o777);
    let content = format!("reference data {}\n", uniq("ro"));
    chmod(&host_file(&dir, "notes.txt", &content), 0o666);
    host_dir(&dir, "sub", 0o777);
    let before = snapshot(&dir);

    let rt = runtime_mounting(&s, isolation, vec![mount(&dir, "/mnt/ref", true)]).await;
    let session = s.session(&uniq("ro"), &rt).await;
    let o = s.exec(&session, "cat /mnt/ref/notes.txt").await.ok();
    assert_eq!(o.out(), content, "the host file read in the session: {o:?}");

    let mut wrote = Vec::new();
    for cmd in [
        "echo changed > /mnt/ref/notes.txt",
        "echo more >> /mnt/ref/notes.txt",
        "touch /mnt/ref/created",
        "mkdir /mnt/ref/created-dir",
        "rm -f /mnt/ref/notes.txt",
        "rmdir /mnt/ref/sub",
        "mv /mnt/ref/notes.txt /mnt/ref/moved.txt",
        "chmod 0777 /mnt/ref/notes.txt",
        "ln -s /etc /mnt/ref/link",
    ] {
        let o = s.exec(&session, cmd).await;
        if o.code == Some(0) || !o.err().contains("Read-only file system") {
            wrote.push(format!("{cmd:?}: {o:?}"));
        }
    }
    assert!(
        wrote.is_empty(),
        "writes through a read-only mount did not fail with \"Read-only file system\":\n{}",
        wrote.join("\n")
    );
    // The sandbox's root may try to lift the read-only flag on its side (a microVM's
    // guest kernel is its own: its root can remount); the host must refuse regardless.
    let o = s
        .exec(
            &session,
            "mount -o remount,rw /mnt/ref 2>&1; echo changed > /mnt/ref/notes.txt && touch /mnt/ref/after-remount",
        )
        .await;
    assert_ne!(o.code, Some(0), "wrote after a remount attempt: {o:?}");
    assert_eq!(
        snapshot(&dir),
        before,
        "the host dir changed behind a read-only mount"
    );
    assert_eq!(read(&dir.join("notes.txt")), content);
}

both!(a_read_write_mount_shares_writes_both_ways);
async fn a_read_write_mount_shares_writes_both_ways(s: Server, isolation: Isolation) {
    let tmp = host_tmp();
    // World-writable: the session's root is its mapped uid on the host, not the owner.
    let dir = host_dir(tmp.path(), "share", 0o777);
    let rt = runtime_mounting(&s, isolation, vec![mount(&dir, "/mnt/share", false)]).await;
    let session = s.session(&uniq("rw"), &rt).await;

    let opts = mount_options(&s, &session, "/mnt/share").await;
    let opt_list: Vec<&str> = opts.split(',').collect();
    for want in ["rw", "nosuid", "nodev"] {
        assert!(
            opt_list.contains(&want),
            "/mnt/share is mounted {opts} in the session, without {want}"
        );
    }

    // Session → host.
    let marker = uniq("from-session");
    s.exec(
        &session,
        &format!("echo {marker} > /mnt/share/by-session.txt"),
    )
    .await
    .ok();
    let written = dir.join("by-session.txt");
    assert_eq!(read(&written), format!("{marker}\n"));
    let m = std::fs::metadata(&written).expect("stat");
    assert!(
        m.uid() != 0 && m.gid() != 0,
        "a file the session wrote is owned by host {}:{}",
        m.uid(),
        m.gid()
    );
    if isolation == Isolation::Namespace {
        // Test the test's idea of the mapped root: the namespace sandbox shows its map.
        let map = s.exec(&session, "cat /proc/self/uid_map").await.ok().out();
        let host_root: Option<u32> = map.split_whitespace().nth(1).and_then(|f| f.parse().ok());
        assert_eq!(host_root, Some(FIRST_SESSION_ROOT), "uid_map: {map}");
    }
    assert_eq!(
        (m.uid(), m.gid()),
        (FIRST_SESSION_ROOT, FIRST_SESSION_ROOT),
        "the session's file is owned by its mapped root on the host"
    );

    // Host → session, after the session started: a new file, and a change to the
    // session's file (polled: virtio-fs may cache a file's attributes for a moment).
    let by_host = uniq("from-host");
    host_file(&dir, "by-host.txt", &format!("{by_host}\n"));
    let o = s.exec(&session, "cat /mnt/share/by-host.txt").await.ok();
    assert_eq!(o.out(), format!("{by_host}\n"), "{o:?}");
    let appended = uniq("appended-on-host");
    std::fs::write(&written, format!("{marker}\n{appended}\n")).expect("rewrite on the host");
    let mut seen = String::new();
    let found = tokio::time::timeout(common::DEADLINE, async {
        loop {
            seen = s
                .exec(&session, "cat /mnt/share/by-session.txt")
                .await
                .ok()
                .out();
            if seen.contains(&appended) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "the host's change never showed in the session; it reads {seen:?}"
    );

    // The session's root cannot plant a setuid-root file on the host.
    let o = s
        .exec(
            &session,
            "cp /bin/sh /mnt/share/suid; chown 0:0 /mnt/share/suid; chmod 4755 /mnt/share/suid; \
             ls -ln /mnt/share/suid",
        )
        .await;
    let m = std::fs::metadata(dir.join("suid"))
        .unwrap_or_else(|e| panic!("the session's copy is on the host ({e}): {o:?}"));
    assert!(
        m.mode() & 0o4000 == 0 || m.uid() != 0,
        "setuid file owned by host root: mode {:o} owner {}; the session saw {o:?}",
        m.mode(),
        m.uid()
    );
    assert_eq!(m.uid(), FIRST_SESSION_ROOT, "suid file owner; {o:?}");
    // Nor a device node (a microVM's root may mknod in its own kernel; the host side
    // must not follow).
    let o = s
        .exec(
            &session,
            "mknod /mnt/share/mem c 1 1; mknod /mnt/share/disk b 7 0; ls -ln /mnt/share",
        )
        .await;
    for node in ["mem", "disk"] {
        if let Ok(m) = std::fs::symlink_metadata(dir.join(node)) {
            use std::os::unix::fs::FileTypeExt;
            let t = m.file_type();
            assert!(
                !t.is_char_device() && !t.is_block_device(),
                "the session made a device node {node} on the host: {m:?}; it saw {o:?}"
            );
        }
    }
}

both!(mounts_come_back_after_stop_and_resume);
async fn mounts_come_back_after_stop_and_resume(s: Server, isolation: Isolation) {
    let tmp = host_tmp();
    // World-writable: the session's root is its mapped uid on the host, not the owner.
    let dir = host_dir(tmp.path(), "share", 0o777);
    let before = uniq("before-stop");
    host_file(&dir, "before.txt", &format!("{before}\n"));
    let rt = runtime_mounting(&s, isolation, vec![mount(&dir, "/mnt/share", false)]).await;
    let session = s.session(&uniq("resume"), &rt).await;
    let o = s.exec(&session, "cat /mnt/share/before.txt").await.ok();
    assert_eq!(o.out(), format!("{before}\n"), "{o:?}");

    let st = s.client.stop_session(&session).await.expect("stop session");
    assert_eq!(st.state, SessionState::Stopped, "{st:?}");
    // Changed on the host while no sandbox ran: the resumed one shares the live dir.
    let while_stopped = uniq("while-stopped");
    host_file(&dir, "while-stopped.txt", &format!("{while_stopped}\n"));

    let after = uniq("after-resume");
    let o = s
        .exec(
            &session,
            &format!(
                "cat /mnt/share/before.txt /mnt/share/while-stopped.txt && \
                 echo {after} > /mnt/share/after-resume.txt"
            ),
        )
        .await
        .ok();
    assert_eq!(o.out(), format!("{before}\n{while_stopped}\n"), "{o:?}");
    let st = s.client.get_session(&session).await.expect("get session");
    assert_eq!(st.state, SessionState::Running, "{st:?}");
    assert_eq!(read(&dir.join("after-resume.txt")), format!("{after}\n"));
}

both!(the_sandbox_cannot_climb_out_of_a_mount);
async fn the_sandbox_cannot_climb_out_of_a_mount(s: Server, isolation: Isolation) {
    let tmp = host_tmp();
    let dir = host_dir(tmp.path(), "exported", 0o777);
    // A sibling of the shared dir, readable by everyone: were a path to climb out of
    // the mount, permissions would not hide it.
    let sibling_name = uniq("sibling");
    let sibling = host_dir(tmp.path(), &sibling_name, 0o755);
    let secret = uniq("host-only-secret");
    let secret_file = host_file(&sibling, "secret.txt", &format!("{secret}\n"));
    for (link, to) in [
        ("escape", PathBuf::from("/etc")),
        ("hostshadow", PathBuf::from("/etc/shadow")),
        ("sibling-abs", secret_file.clone()),
        (
            "sibling-rel",
            Path::new("..").join(&sibling_name).join("secret.txt"),
        ),
        ("up", PathBuf::from("..")),
    ] {
        std::os::unix::fs::symlink(&to, dir.join(link)).expect("symlink");
    }
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let shadow_first = shadow.lines().next().unwrap_or_default().to_string();

    let rt = runtime_mounting(&s, isolation, vec![mount(&dir, "/mnt/climb", false)]).await;
    let session = s.session(&uniq("climb"), &rt).await;
    // Test the test: the mount and its links are there.
    let o = s.exec(&session, "ls -A /mnt/climb").await.ok();
    for link in ["escape", "hostshadow", "sibling-abs", "sibling-rel", "up"] {
        assert!(
            o.out().lines().any(|l| l == link),
            "{link} not listed: {o:?}"
        );
    }

    let mut leaks = Vec::new();
    for cmd in [
        "cat /mnt/climb/hostshadow",
        "cat /mnt/climb/escape/shadow",
        "cat /mnt/climb/up/exported/hostshadow",
    ] {
        let o = s.exec(&session, &format!("{cmd} 2>&1")).await;
        let out = o.out();
        if (!shadow_first.is_empty() && out.contains(&shadow_first))
            || (!shadow.is_empty() && out.contains(&shadow))
        {
            leaks.push(format!("{cmd:?} printed the host's /etc/shadow: {o:?}"));
        }
    }
    for cmd in [
        "cat /mnt/climb/sibling-abs",
        "cat /mnt/climb/sibling-rel",
        "cat /mnt/climb/up/*/secret.txt",
        "cat /mnt/climb/../*/secret.txt",
        "cd /mnt/climb/.. && cat ./*/secret.txt",
        "cat /mnt/climb/../../*/secret.txt",
    ] {
        let o = s.exec(&session, &format!("{cmd} 2>&1")).await;
        if o.out().contains(&secret) {
            leaks.push(format!("{cmd:?} read a host file beside the mount: {o:?}"));
        }
    }
    // `..` of the mount is the sandbox's own parent: it holds the mount point
    // `climb` (and the workspace), never the host dir's siblings.
    for cmd in [
        "ls -a /mnt/climb/..",
        "ls -a /mnt/climb/up",
        "cd /mnt/climb && cd .. && ls -a",
        "ls -a /mnt/climb/../..",
    ] {
        let o = s.exec(&session, &format!("{cmd} 2>&1")).await;
        let out = o.out();
        if out.contains(&sibling_name) || out.lines().any(|l| l == "exported") {
            leaks.push(format!("{cmd:?} lists the host dir's parent: {o:?}"));
        }
    }
    let o = s.exec(&session, "ls -a /mnt/climb/..").await.ok();
    assert!(
        o.out().lines().any(|l| l == "climb"),
        "/mnt/climb/.. is not the sandbox's /mnt: {o:?}"
    );
    assert!(leaks.is_empty(), "out of the mount:\n{}", leaks.join("\n"));
}

both!(a_file_source_is_mounted_on_namespace_and_refused_on_microvm);
async fn a_file_source_is_mounted_on_namespace_and_refused_on_microvm(
    s: Server,
    isolation: Isolation,
) {
    let tmp = host_tmp();
    let content = format!("a single file {}\n", uniq("file"));
    let file = host_file(tmp.path(), "notes.txt", &content);
    let mounts = vec![mount(&file, "/mnt/notes.txt", true)];
    match isolation {
        Isolation::Microvm => {
            // virtio-fs shares directories only.
            let mut spec = berth_api::RuntimeSpec::named(uniq("rt"));
            spec.isolation = isolation;
            spec.memory = 512 << 20;
            spec.workspace_size = 64 << 20;
            spec.mounts = mounts;
            let resp = s
                .http(reqwest::Method::POST, "/v1/runtimes")
                .json(&spec)
                .send()
                .await
                .expect("POST /v1/runtimes");
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            assert_eq!(status, 400, "creating the runtime: {body}");
            assert_eq!(body["error"]["code"], "invalid_argument", "{body}");
            assert_eq!(body["error"]["field"], "mounts.source", "{body}");
            let err = s
                .client
                .get_runtime(&spec.name)
                .await
                .expect_err("a refused runtime is not stored");
            assert_eq!(err.code(), Some(berth_api::ErrorCode::NotFound), "{err:?}");
        }
        _ => {
            let rt = runtime_mounting(&s, isolation, mounts).await;
            let session = s.session(&uniq("file"), &rt).await;
            let o = s.exec(&session, "cat /mnt/notes.txt").await.ok();
            assert_eq!(o.out(), content, "{o:?}");
        }
    }
}

both!(a_mount_outlives_a_server_sigkill_and_nothing_of_it_is_left);
async fn a_mount_outlives_a_server_sigkill_and_nothing_of_it_is_left(
    mut s: Server,
    isolation: Isolation,
) {
    let tmp = host_tmp();
    // World-writable: the session's root is its mapped uid on the host, not the owner.
    let dir = host_dir(tmp.path(), "share", 0o777);
    let source = dir.to_string_lossy().into_owned();
    let rt = runtime_mounting(&s, isolation, vec![mount(&dir, "/mnt/share", false)]).await;
    let session = s.session(&uniq("sigkill"), &rt).await;
    s.exec(&session, "echo before > /mnt/share/before.txt")
        .await
        .ok();
    s.kill_server();
    s.restart().await;

    // The session answers (its sandbox adopted, or started again) and still shares the
    // live host dir both ways.
    let by_host = uniq("after-restart");
    host_file(&dir, "by-host.txt", &format!("{by_host}\n"));
    let o = s
        .exec(
            &session,
            "cat /mnt/share/before.txt /mnt/share/by-host.txt && echo after > /mnt/share/after.txt",
        )
        .await
        .ok();
    assert_eq!(o.out(), format!("before\n{by_host}\n"), "{o:?}");
    assert_eq!(read(&dir.join("after.txt")), "after\n");

    assert!(s.stop_server_async().await, "server stops on SIGTERM");
    let mut left = processes_mentioning(&source);
    left.extend(s.leftovers(Some(&session)));
    left.extend(s.leftovers(None));
    assert!(
        left.is_empty(),
        "left behind after SIGKILL, restart and stop: {left:#?}"
    );
}

/// Processes (but this one) whose command line contains `needle`: "pid: argv".
fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{pid}: {cmd}"));
            }
        }
    }
    found
}

/// microVM only: the namespace driver runs no process per mount.
mod virtiofsd_ends_with_its_session_and_its_server {
    #[tokio::test]
    async fn microvm() {
        crate::common::drivers::run(
            concat!(module_path!(), "::microvm"),
            berth_api::Isolation::Microvm,
            super::virtiofsd_ends_with_its_session_and_its_server,
        )
        .await;
    }
}
async fn virtiofsd_ends_with_its_session_and_its_server(mut s: Server, isolation: Isolation) {
    let tmp = host_tmp();
    let ro = host_dir(tmp.path(), "ro-share", 0o755);
    host_file(&ro, "ro.txt", "ro\n");
    // World-writable: the session's root is its mapped uid on the host, not the owner.
    let rw = host_dir(tmp.path(), "rw-share", 0o777);
    host_file(&rw, "rw.txt", "rw\n");
    let sources = [
        ro.to_string_lossy().into_owned(),
        rw.to_string_lossy().into_owned(),
    ];
    let rt = runtime_mounting(
        &s,
        isolation,
        vec![mount(&ro, "/mnt/ro", true), mount(&rw, "/mnt/rw", false)],
    )
    .await;
    let session = s.session(&uniq("vfsd"), &rt).await;
    let running = |what: &str| {
        for source in &sources {
            let procs = processes_mentioning(source);
            assert!(
                !procs.is_empty(),
                "{what}: no process (virtiofsd) names {source}"
            );
        }
    };
    let gone = |what: &str| {
        let mut left = Vec::new();
        for needle in sources.iter().chain([&session]) {
            left.extend(processes_mentioning(needle));
        }
        assert!(left.is_empty(), "{what}, still running: {left:#?}");
    };

    let o = s
        .exec(&session, "cat /mnt/ro/ro.txt /mnt/rw/rw.txt")
        .await
        .ok();
    assert_eq!(o.out(), "ro\nrw\n", "{o:?}");
    // Test the test: while the session runs, the search finds one per mount.
    running("while the session runs");
    s.client.stop_session(&session).await.expect("stop session");
    gone("after the session stopped");

    let o = s
        .exec(&session, "cat /mnt/ro/ro.txt /mnt/rw/rw.txt")
        .await
        .ok();
    assert_eq!(o.out(), "ro\nrw\n", "after resume: {o:?}");
    running("after resume");
    assert!(s.stop_server_async().await, "server stops on SIGTERM");
    gone("after the server stopped");
    let left = s.leftovers(None);
    assert!(left.is_empty(), "left behind after server stop: {left:#?}");
}

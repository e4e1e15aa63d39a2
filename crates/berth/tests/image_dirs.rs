//! Directory images whose userland the guest agent cannot use: the agent (the host's
//! dynamically linked berth binary) runs on the host's loader and libraries, mounted
//! read-only under `/.berth/`, whatever the image holds — here no libc at all (only a
//! static busybox), or a broken one — while the commands it starts use the image's own.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use berth_api::shell::channel;
use berth_api::{CommandRequest, Isolation};
use common::{uniq, Output, Server, DEADLINE};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Debian's `busybox-static` (scripts/test installs it).
const BUSYBOX: &str = "/bin/busybox";

/// A root filesystem with nothing but a static busybox and its applet links in
/// `/bin`; `None` (with the reason printed) when there is no static busybox here.
fn busybox_rootfs() -> Option<tempfile::TempDir> {
    let static_busybox = Path::new(BUSYBOX).is_file()
        && berth_image::libs::closure(Path::new(BUSYBOX))
            .is_ok_and(|c| c.interpreter.is_none() && c.libraries.is_empty());
    if !static_busybox {
        eprintln!(
            "skipping: no static {BUSYBOX} (apt-get install busybox-static; scripts/test does)"
        );
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("berth-image-dir-")
        .tempdir()
        .expect("image dir");
    let root = dir.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::create_dir(root.join("bin")).expect("bin");
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
    let list = std::process::Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if !applet.is_empty() && applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("link");
        }
    }
    Some(dir)
}

fn argv(args: &[&str]) -> CommandRequest {
    CommandRequest {
        argv: Some(args.iter().map(|a| a.to_string()).collect()),
        ..Default::default()
    }
}

async fn sh(s: &Server, session: &str, script: &str) -> Output {
    s.exec_req(session, argv(&["busybox", "sh", "-c", script]))
        .await
}

/// Open a shell with the default command (`sh -l` here: the image has no bash), type
/// `keys` and wait until the terminal shows `needle`.
async fn shell_shows(s: &Server, session: &str, keys: &str, needle: &str) {
    s.client
        .create_shell(session, &json!({"shell_id": "main"}))
        .await
        .expect("open a shell");
    let mut req = s
        .client
        .shell_attach_url(session, "main", &[])
        .into_client_request()
        .expect("attach request");
    let h = req.headers_mut();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", s.token)).expect("header"),
    );
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("v5.channel.k8s.io"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("attach to the shell");
    let mut msg = vec![channel::STDIN];
    msg.extend_from_slice(keys.as_bytes());
    ws.send(Message::Binary(msg.into())).await.expect("type");
    let mut screen = Vec::new();
    let seen = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Binary(b) = m {
                if b.first() == Some(&channel::STDOUT) {
                    screen.extend_from_slice(&b[1..]);
                    if String::from_utf8_lossy(&screen).contains(needle) {
                        return true;
                    }
                }
            }
        }
        false
    })
    .await;
    assert_eq!(
        seen,
        Ok(true),
        "the shell never showed {needle:?}: {:?}",
        String::from_utf8_lossy(&screen)
    );
}

#[tokio::test]
async fn a_libc_free_image_runs_commands_shells_and_file_copies() {
    let Some(image) = busybox_rootfs() else {
        return;
    };
    let Some(mut s) = Server::start("a_libc_free_image_runs_commands_shells_and_file_copies").await
    else {
        return;
    };
    let image_path = image.path().to_str().expect("utf8").to_string();
    let rt = s
        .runtime(&uniq("busybox"), |spec| {
            spec.isolation = Isolation::Namespace;
            spec.image = image_path.clone();
        })
        .await;
    let session = s.session(&uniq("bb"), &rt).await;

    let out = s
        .exec_req(&session, argv(&["busybox", "sh", "-c", "echo hi; ls /"]))
        .await
        .ok();
    let text = out.out();
    assert!(text.starts_with("hi\n"), "{out:?}");
    assert!(text.lines().any(|l| l == "bin"), "{out:?}");
    // No libc of its own: the agent runs on the host's, the image's programs without.
    let root = sh(&s, &session, "ls -a /").await.ok().out();
    for absent in ["lib", "lib64", "usr"] {
        assert!(!root.lines().any(|l| l == absent), "{root}");
    }

    // The agent is PID 1 through the host's loader, which is not an environment
    // variable: nothing the agent starts sees the host's libraries on a search path.
    let cmdline = sh(&s, &session, "tr '\\0' ' ' < /proc/1/cmdline")
        .await
        .ok()
        .out();
    assert!(
        cmdline.starts_with("/.berth/ld-linux-x86-64.so.2 ")
            && cmdline.contains(" --library-path /.berth/lib /.berth/berth guest --listen "),
        "{cmdline:?}"
    );
    let env = sh(&s, &session, "env").await.ok().out();
    assert!(!env.lines().any(|l| l.starts_with("LD_")), "{env}");
    // Exactly the libraries berth needs, read-only, like the agent itself.
    let libs = sh(&s, &session, "ls /.berth/lib").await.ok().out();
    let mut expected: Vec<String> = berth_image::libs::closure(Path::new(common::BERTH))
        .expect("berth's libraries")
        .libraries
        .iter()
        .filter_map(|n| n.path.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("ld-linux"))
        .collect();
    expected.sort();
    assert_eq!(libs.lines().collect::<Vec<_>>(), expected);
    assert!(expected.iter().any(|l| l == "libc.so.6"), "{expected:?}");
    let mountinfo = sh(&s, &session, "cat /proc/self/mountinfo")
        .await
        .ok()
        .out();
    let berth_mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| m.starts_with("/.berth/"))
        })
        .collect();
    assert_eq!(berth_mounts.len(), expected.len() + 2, "{mountinfo}");
    for m in berth_mounts {
        let options = m.split(' ').nth(5).unwrap_or_default();
        assert!(options.split(',').any(|o| o == "ro"), "{m}");
    }
    let tamper = sh(
        &s,
        &session,
        "for f in /.berth/berth /.berth/ld-linux-x86-64.so.2 /.berth/lib/libc.so.6; do \
           if (echo x >> $f) 2>/dev/null; then echo wrote $f; fi; done; echo done",
    )
    .await
    .ok()
    .out();
    assert_eq!(tamper, "done\n", "the guest's files must be read-only");

    shell_shows(&s, &session, "echo shell-$((6 * 7))\n", "shell-42").await;

    // Files in and out through the agent.
    let local = tempfile::Builder::new()
        .prefix("berth-image-dir-cp-")
        .tempdir()
        .expect("tmp");
    let up = local.path().join("in.txt");
    std::fs::write(&up, "copied in\n").expect("write");
    s.cli_ok(&[
        "cp",
        up.to_str().expect("utf8"),
        &format!("{session}:/mnt/workspace/in.txt"),
    ])
    .await;
    let got = sh(
        &s,
        &session,
        "cat /mnt/workspace/in.txt && busybox rev /mnt/workspace/in.txt > /mnt/workspace/out.txt",
    )
    .await
    .ok()
    .out();
    assert_eq!(got, "copied in\n");
    let down = local.path().join("out.txt");
    s.cli_ok(&[
        "cp",
        &format!("{session}:/mnt/workspace/out.txt"),
        down.to_str().expect("utf8"),
    ])
    .await;
    assert_eq!(std::fs::read_to_string(&down).expect("read"), "ni deipoc\n");

    s.client.delete_session(&session).await.expect("delete");
    assert!(s.stop_server_async().await, "server stops on SIGTERM");
    let left = s.leftovers(Some(&session));
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[tokio::test]
async fn an_image_with_an_incompatible_libc_still_starts() {
    let Some(image) = busybox_rootfs() else {
        return;
    };
    let Some(mut s) = Server::start("an_image_with_an_incompatible_libc_still_starts").await else {
        return;
    };
    // Every file the host's loader would look for, present and useless; a cache and a
    // library path pointing at them.
    let root = image.path();
    for dir in ["lib/x86_64-linux-gnu", "lib64", "etc"] {
        std::fs::create_dir_all(root.join(dir)).expect("mkdir");
    }
    for file in [
        "lib/x86_64-linux-gnu/libc.so.6",
        "lib/x86_64-linux-gnu/libm.so.6",
        "lib/x86_64-linux-gnu/libgcc_s.so.1",
        "lib/x86_64-linux-gnu/libseccomp.so.2",
        "lib64/ld-linux-x86-64.so.2",
    ] {
        std::fs::write(root.join(file), b"").expect("empty library");
    }
    std::fs::write(root.join("etc/ld.so.cache"), b"not a cache").expect("cache");
    let image_path = root.to_str().expect("utf8").to_string();
    let rt = s
        .runtime(&uniq("badlibc"), |spec| {
            spec.isolation = Isolation::Namespace;
            spec.image = image_path.clone();
            spec.env
                .insert("LD_LIBRARY_PATH".into(), "/lib/x86_64-linux-gnu".into());
        })
        .await;
    let session = s.session(&uniq("badlibc"), &rt).await;
    let out = sh(
        &s,
        &session,
        "wc -c < /lib/x86_64-linux-gnu/libc.so.6; echo \"$LD_LIBRARY_PATH\"",
    )
    .await
    .ok()
    .out();
    // The commands see the image's (empty) libc and the runtime's own variable.
    assert_eq!(out, "0\n/lib/x86_64-linux-gnu\n");
    s.client.delete_session(&session).await.expect("delete");
    assert!(s.stop_server_async().await, "server stops on SIGTERM");
    let left = s.leftovers(Some(&session));
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// `host` sandboxes keep running the agent directly on the host's own libraries.
#[tokio::test]
async fn the_host_image_runs_the_agent_directly() {
    let Some(s) = Server::start("the_host_image_runs_the_agent_directly").await else {
        return;
    };
    let rt = s
        .runtime(&uniq("host"), |spec| spec.isolation = Isolation::Namespace)
        .await;
    let session = s.session(&uniq("host"), &rt).await;
    let out = s
        .exec(&session, "tr '\\0' ' ' < /proc/1/cmdline; ls -A /.berth")
        .await
        .ok()
        .out();
    assert!(out.starts_with("/.berth/berth guest --listen "), "{out:?}");
    assert!(
        out.ends_with(" berth\n"),
        "only the agent in /.berth: {out:?}"
    );
}

//! microVM-only checks, and the file copy scenario on both drivers. The session
//! scenarios run on both drivers where they belong (`commands.rs`, `isolation.rs`,
//! `lifecycle.rs`, `limits.rs`, `shells.rs`) through `common::drivers`.

#![allow(clippy::unwrap_used)]

mod common;

use berth_api::{Isolation, SessionState};
use common::drivers::{runtime, server};
use common::{uniq, Server};

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

/// A guest kernel cannot boot in too little RAM: such a runtime is refused up front
/// instead of failing every session start.
#[tokio::test]
async fn microvm_a_runtime_too_small_to_boot_is_a_400_naming_memory() {
    let test = "microvm_a_runtime_too_small_to_boot_is_a_400_naming_memory";
    let Some(s) = server(test, Isolation::Microvm).await else {
        return;
    };
    let mut spec = berth_api::RuntimeSpec::named(uniq("rt"));
    spec.isolation = Isolation::Microvm;
    spec.memory = 128 << 20;
    let r = s
        .http(reqwest::Method::POST, "/v1/runtimes")
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["field"], "memory", "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("256 MiB"), "{body}");
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

/// `auto` isolation (a runtime that names none) follows the host: a microVM only where
/// KVM really boots the guest — what `berth server --info` reports — and
/// `--default-isolation microvm` pins microVMs even under TCG.
#[tokio::test]
async fn auto_isolation_follows_the_kvm_probe_and_a_pinned_default() {
    let test = "auto_isolation_follows_the_kvm_probe_and_a_pinned_default";
    if common::skip_unless_root(test) {
        return;
    }
    if !common::drivers::qemu_available() {
        eprintln!("skipping {test}: qemu-system-x86_64 is not installed");
        return;
    }
    tokio::task::spawn_blocking(common::drivers::ensure_image)
        .await
        .unwrap();
    let images = common::drivers::images_dir().display().to_string();
    let info_dir = tempfile::tempdir().unwrap();
    let info = std::process::Command::new(common::BERTH)
        .args(["server", "--info", "--guest-images", &images, "--data-dir"])
        .arg(info_dir.path())
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    let auto_is_microvm = if info.contains("isolation auto: microvm") {
        true
    } else {
        assert!(info.contains("isolation auto: namespace"), "{info}");
        false
    };
    let host = nix::sys::utsname::uname().unwrap();
    let host = host.release().to_string_lossy().into_owned();

    for (flags, want_microvm) in [
        (vec!["--guest-images", images.as_str()], auto_is_microvm),
        (
            vec![
                "--guest-images",
                images.as_str(),
                "--default-isolation",
                "microvm",
            ],
            true,
        ),
    ] {
        let Some(s) = Server::start_with(test, &flags).await else {
            return;
        };
        let rt = s.runtime(&uniq("rt"), |r| r.memory = 512 << 20).await;
        let stored = s.client.get_runtime(&rt).await.unwrap();
        assert_eq!(stored.spec.isolation, Isolation::Auto);
        let session = s.session(&uniq("auto"), &rt).await;
        let o = s.exec(&session, "uname -r").await.ok();
        assert_eq!(
            o.out().trim() != host,
            want_microvm,
            "server flags {flags:?}: guest kernel {:?}, host {host:?}, --info said:\n{info}",
            o.out()
        );
    }
}

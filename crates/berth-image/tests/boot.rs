//! End-to-end: fetch the real Debian cloud kernel, build an image whose `/init` is the
//! `berth-image-test-init` stand-in and whose rootfs is a small directory, boot it
//! under QEMU `microvm` (TCG) and read what the guest saw from its serial console.
//!
//! Skipped (with a message) when not root (staging needs mounts), when
//! `qemu-system-x86_64` is missing, or when the kernel package cannot be downloaded.
//! The kernel `.deb` is cached in the target dir between runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_image::{build, kernel, BuildRequest, Quiet, Source};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("berth-image-test-data")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn have_qemu() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The kernel, or None (test skipped) when apt itself fails to give it to us; any
/// other failure is ours and fails the test.
fn kernel() -> Option<kernel::Kernel> {
    let cache = data_dir().join("images/cache");
    for sub in ["debs", "kernel", "locks"] {
        fs::create_dir_all(cache.join(sub)).expect("cache dir");
    }
    let _lock = berth_image::cache::Lock::acquire(&cache.join("locks/kernel.lock"), &|| {})
        .expect("kernel lock");
    let apt_failed = |e: &kernel::KernelError| {
        matches!(
            e,
            kernel::KernelError::Failed { .. }
                | kernel::KernelError::Spawn { .. }
                | kernel::KernelError::NoKernelPackage { .. }
        )
    };
    let pkg = match kernel::resolve(kernel::META_PACKAGE, &cache) {
        Ok(p) => p,
        Err(e) if apt_failed(&e) => {
            eprintln!("skipped: cannot resolve the kernel package: {e}");
            return None;
        }
        Err(e) => panic!("resolve: {e}"),
    };
    let deb = match kernel::fetch(&pkg, &cache) {
        Ok(d) => d,
        Err(e) if apt_failed(&e) => {
            eprintln!("skipped: cannot download the kernel package: {e}");
            return None;
        }
        Err(e) => panic!("fetch: {e}"),
    };
    Some(kernel::extract(&pkg, &deb, &cache).expect("extract the kernel package"))
}

#[test]
fn real_vmlinuz_gives_an_elf_kernel_and_ordered_modules() {
    let Some(k) = kernel() else { return };
    let elf = berth_image::elf::Elf::open(&k.vmlinux).expect("vmlinux is ELF64");
    assert_eq!(elf.machine, 62, "x86-64");
    assert!(fs::metadata(&k.vmlinux).expect("size").len() > 20 << 20);
    // PVH entry, which QEMU's microvm needs to boot an ELF kernel directly.
    let notes = elf
        .section(".notes")
        .expect("notes")
        .expect("a .notes section");
    assert!(notes.windows(4).any(|w| w == b"Xen\0"), "no Xen/PVH note");
    assert!(k.release.ends_with("-cloud-amd64"), "{}", k.release);

    let names: Vec<String> = k
        .modules
        .iter()
        .map(|m| m.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    for wanted in kernel::GUEST_MODULES {
        assert!(
            names.contains(&format!("{wanted}.ko")),
            "{wanted} missing from {names:?}"
        );
    }
    let pos = |n: &str| names.iter().position(|x| x == n).expect("present");
    assert!(pos("virtio_ring.ko") < pos("virtio.ko"));
    assert!(pos("virtio.ko") < pos("virtio_mmio.ko"));
    assert!(pos("virtio.ko") < pos("virtio_blk.ko"));
    // Every module's own depends= comes before it.
    for (i, m) in k.modules.iter().enumerate() {
        let info = berth_image::modules::read_modinfo(m).expect("modinfo");
        for dep in info.depends {
            assert!(pos(&format!("{dep}.ko")) < i, "{dep} after {}", names[i]);
        }
    }
}

#[test]
fn image_boots_under_qemu_and_rebuild_is_a_no_op() {
    if !is_root() {
        eprintln!("skipped: building an image needs root");
        return;
    }
    if !have_qemu() {
        eprintln!("skipped: no qemu-system-x86_64");
        return;
    }
    if kernel().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("etc")).expect("etc");
    // /mnt exists but /mnt/workspace does not: the build must add it.
    fs::create_dir_all(root.join("mnt/other")).expect("mnt");
    fs::write(root.join("hello.txt"), "hello from the rootfs\n").expect("hello");
    fs::write(root.join("etc/os-release"), "ID=berth-test\n").expect("os-release");
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).expect("bin");

    let name = format!("boot-test-{}", std::process::id());
    let mut req = BuildRequest::new(
        data_dir(),
        name.clone(),
        Source::Dir(root.clone()),
        PathBuf::from(env!("CARGO_BIN_EXE_berth-image-test-init")),
    );
    req.excludes = vec!["/mnt/other".into()];
    let first = build(&req, &Quiet).expect("build");
    assert!(!first.cached);
    let image = first.image;
    let m = &image.manifest;
    assert_eq!(m.artifacts.initramfs.path, "initramfs.cpio.lz4");
    assert_eq!(m.artifacts.initramfs.format, "cpio-newc-lz4");
    assert_eq!(m.source.excluded, ["/mnt/other"]);
    assert!(m
        .init
        .libraries
        .iter()
        .any(|l| l == Path::new("/lib64/ld-linux-x86-64.so.2")));
    let listing = cpio_list(&image.initramfs, tmp.path());
    for want in [
        "init",
        "dev/console",
        "newroot",
        "etc/berth/kernel-release",
        "lib/modules/berth/order",
        "lib/modules/berth/virtio_blk.ko",
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libc.so.6",
    ] {
        assert!(
            listing.iter().any(|l| l == want),
            "{want} not in the initramfs"
        );
    }

    // Same inputs: nothing is rebuilt.
    let rootfs_mtime = fs::metadata(&image.rootfs)
        .and_then(|m| m.modified())
        .expect("mtime");
    let again = build(&req, &Quiet).expect("rebuild");
    assert!(again.cached, "unchanged inputs must be a cache hit");
    assert_eq!(again.image.manifest, *m);
    assert_eq!(
        fs::metadata(&image.rootfs)
            .and_then(|m| m.modified())
            .expect("mtime"),
        rootfs_mtime
    );
    // A changed source is not.
    fs::write(root.join("hello.txt"), "hello again\n").expect("hello");
    let changed = build(&req, &Quiet).expect("rebuild after a change");
    assert!(!changed.cached);
    // Only the rootfs: the kernel and the initramfs are the previous files.
    assert!(changed.made.rootfs && !changed.made.initramfs && !changed.made.vmlinux);
    assert_ne!(
        changed.image.manifest.artifacts.rootfs.input_sha256,
        m.artifacts.rootfs.input_sha256
    );
    assert_eq!(
        changed.image.manifest.artifacts.initramfs,
        m.artifacts.initramfs
    );

    let started = Instant::now();
    let console = boot(&changed.image, tmp.path());
    eprintln!(
        "booted and powered off in {:?}; console:\n{console}",
        started.elapsed()
    );
    let line = |key: &str| {
        console
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("berth-test: {key}=")))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {key} in the console output:\n{console}"))
    };
    assert!(
        console.contains("berth-test: ok"),
        "guest failed:\n{console}"
    );
    assert_eq!(line("uname-r"), changed.image.manifest.kernel.release);
    assert_eq!(
        line("kernel-release-file"),
        changed.image.manifest.kernel.release
    );
    assert_eq!(line("hello"), "hello again");
    assert_eq!(line("rw-remount"), "refused");
    let loaded = line("modules");
    assert!(loaded.starts_with("virtio_ring,virtio,"), "{loaded}");

    fs::remove_dir_all(data_dir().join("images").join(&name)).expect("clean up");
}

/// The names in the initramfs, by `cpio -t` on the archive out of its lz4 frame.
fn cpio_list(initramfs: &Path, scratch: &Path) -> Vec<String> {
    let frame = fs::read(initramfs).expect("read the initramfs");
    let cpio = scratch.join("initramfs.cpio");
    fs::write(
        &cpio,
        kernel::lz4_legacy_decompress(&frame).expect("an lz4 legacy frame"),
    )
    .expect("write the archive");
    let out = Command::new("cpio")
        .args(["-t", "--quiet", "-F"])
        .arg(&cpio)
        .output()
        .expect("run cpio -t");
    assert!(out.status.success(), "cpio -t failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Under TCG the guest's TSC runs at the host's rate, and on a busy host the kernel's
/// PIT calibration fails, the TSC is marked unstable and the boot can stall for good
/// (microvm has no HPET or PM timer to fall back on). Telling the guest the rate skips
/// that calibration; the host's "cpu MHz" is close enough for a test.
fn host_tsc_khz() -> u64 {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("cpu MHz")?
                    .split(':')
                    .nth(1)?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

/// Boot the image the way the microVM driver will (TCG here) and return the console.
fn boot(image: &berth_image::Image, scratch: &Path) -> String {
    let console = scratch.join("console.log");
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,accel=tcg,acpi=on", "-m", "256", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&image.vmlinux)
        .arg("-initrd")
        .arg(&image.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 reboot=t tsc_early_khz={}",
            host_tsc_khz()
        ))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            image.rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root,serial=berth-root"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the guest did not power off within 120 s; console:\n{}",
                fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    fs::read_to_string(&console).expect("console log")
}

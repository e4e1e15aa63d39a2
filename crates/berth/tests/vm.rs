//! The guest agent as `/init` of a QEMU `microvm` (TCG): boot, serve the guest protocol
//! over virtio-serial, survive host reconnects, shut down cleanly, keep the workspace.
//!
//! Builds its own guest image from Debian's cloud kernel (downloaded once into the
//! target dir with `apt-get download`, never installed), this test binary's `berth` as
//! `/init`, and a root filesystem of a few host programs. Needs root-free tools only:
//! `qemu-system-x86_64`, `cpio`, `mkfs.ext4`, `apt-get`, `dpkg-deb`, `objcopy`. Skips
//! itself when QEMU is missing.
//!
//!     cargo test --release -p berth --test vm -- --nocapture

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use berth_guest::client::{connect_unix, Guest};
use berth_guest::proto::{
    exec_input, exec_output, Empty, ExecInput, ExecStart, Exited, ShellOpenRequest,
};
use futures::StreamExt;

const BERTH: &str = env!("CARGO_BIN_EXE_berth");
/// Deadline for anything that should happen "soon" under TCG on a loaded machine; only
/// there so that a broken guest fails the test instead of hanging it.
const DEADLINE: Duration = Duration::from_secs(180);
/// Modules the guest needs (none of them has dependencies beyond the previous ones).
const MODULES: [&str; 6] = [
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_mmio",
    "drivers/block/virtio_blk",
    "drivers/char/virtio_console",
    "fs/overlayfs/overlay",
];
/// Programs copied (with their libraries) into the test's root filesystem.
const PROGRAMS: [&str; 7] = ["sh", "bash", "cat", "head", "uname", "sleep", "ls"];
/// How long a host waits after its connection to a VM closed before it opens the next
/// one: longer than the guest's grace for a hang-up (250 ms), so the old connection is
/// over and nothing it still had to write can reach the new one.
const RECONNECT_PAUSE: Duration = Duration::from_millis(300);
/// Set for the re-executed test binary that plays a host which gets SIGKILLed.
const HOST_SOCKET_ENV: &str = "BERTH_VM_TEST_SOCKET";

#[tokio::test]
async fn microvm_boots_serves_reconnects_and_keeps_the_workspace() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!(
            "skipping: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
        );
        return;
    }
    let kernel = tokio::task::spawn_blocking(fetch_kernel).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let initrd = build_initramfs(&kernel, dir.path());
    let rootfs = build_rootfs(dir.path());
    let workspace = dir.path().join("ws.ext4");
    mkfs(&workspace, None);

    // First VM: work, reconnect, shut down.
    let mut vm = Vm::boot(&kernel, &initrd, &rootfs, &workspace, dir.path(), "");
    let booted = Instant::now();
    let mut guest = vm.connect().await;
    let health = timeout(guest.health(Empty {})).await.unwrap().into_inner();
    eprintln!("boot to Health: {:.2?} under TCG", booted.elapsed());
    assert_eq!(health.pid, 1, "the agent is the VM's init");

    let (out, exited) = run(&mut guest, &["uname", "-r"]).await;
    assert_eq!(exited.code, Some(0));
    let guest_release = String::from_utf8(out).unwrap();
    let host_release =
        String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    assert_eq!(guest_release.trim(), kernel.release);
    assert_ne!(
        guest_release, host_release,
        "commands run in the guest kernel"
    );

    let (out, _) = run(&mut guest, &["uname", "-n"]).await;
    assert_eq!(out, b"vm-test\n");
    let (out, _) = run(&mut guest, &["sh", "-c", "echo \"$GREETING\" $HOME"]).await;
    assert_eq!(out, b"hello world /root\n", "berth.env reaches commands");
    let (_, exited) = run(
        &mut guest,
        &[
            "sh",
            "-c",
            "echo kept > /mnt/workspace/note.txt && echo gone > /tmp/scratch",
        ],
    )
    .await;
    assert_eq!(exited.code, Some(0));

    // Throughput of command output through virtio-serial, reported, not asserted.
    let size = 100 << 20;
    let started = Instant::now();
    let (bytes, exited) = count(&mut guest, &["head", "-c", &size.to_string(), "/dev/zero"]).await;
    let elapsed = started.elapsed();
    assert_eq!((bytes, exited.code), (size, Some(0)));
    eprintln!(
        "100 MiB of stdout through virtio-serial: {:.2?} = {:.1} MiB/s",
        elapsed,
        100.0 / elapsed.as_secs_f64()
    );

    // What must survive a host reconnect: a daemon and a shell.
    let (out, _) = run(
        &mut guest,
        &[
            "sh",
            "-c",
            "sleep 1000 </dev/null >/dev/null 2>&1 & echo $!",
        ],
    )
    .await;
    let daemon = String::from_utf8(out).unwrap().trim().to_string();
    timeout(guest.shell_open(ShellOpenRequest {
        shell_id: "keep".into(),
        ..Default::default()
    }))
    .await
    .unwrap();

    // Reconnect 1: an idle client replaced by a new one at once.
    drop(guest);
    drop(reconnect(&mut vm).await);
    // What a host should do before it connects again (the helper below does not retry).
    tokio::time::sleep(RECONNECT_PAUSE).await;

    // Reconnect 2: a host process SIGKILLed while the guest streams output to it, as
    // when the berth server crashes; a new one connects right after.
    let mut host = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "host_that_streams_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(HOST_SOCKET_ENV, &vm.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(host.stdout.take().unwrap()));
    let streaming =
        tokio::task::spawn_blocking(move || lines.any(|l| l.is_ok_and(|l| l == "streaming")));
    assert!(
        timeout(streaming).await.unwrap(),
        "the host process never streamed"
    );
    host.kill().unwrap();
    host.wait().unwrap();
    let mut guest = reconnect(&mut vm).await;
    let (_, exited) = run(&mut guest, &["sh", "-c", &format!("kill -0 {daemon}")]).await;
    assert_eq!(exited.code, Some(0), "the daemon survived the reconnects");
    let shells = timeout(guest.shell_list(Empty {}))
        .await
        .unwrap()
        .into_inner();
    assert!(
        shells
            .shells
            .iter()
            .any(|s| s.shell_id == "keep" && s.running),
        "the shell survived the reconnects: {shells:?}"
    );
    let (out, _) = run(&mut guest, &["cat", "/tmp/scratch"]).await;
    assert_eq!(out, b"gone\n");

    timeout(guest.shutdown(Empty {})).await.unwrap();
    let status = vm.wait().await;
    assert!(
        status.success(),
        "QEMU exits by itself after Shutdown: {status}"
    );
    let console = vm.console();
    assert!(console.contains("workspace unmounted"), "{console}");
    assert!(
        !dumpe2fs(&workspace).contains("needs_recovery"),
        "the workspace was unmounted cleanly"
    );
    drop(vm);

    // Second VM on the same workspace: the file is there, the scratch file is not.
    let mut vm = Vm::boot(&kernel, &initrd, &rootfs, &workspace, dir.path(), "");
    let mut guest = vm.connect().await;
    let (out, _) = run(&mut guest, &["cat", "/mnt/workspace/note.txt"]).await;
    assert_eq!(out, b"kept\n");
    let (_, exited) = run(&mut guest, &["ls", "/tmp/scratch"]).await;
    assert_ne!(
        exited.code,
        Some(0),
        "writes outside the workspace are per VM"
    );
    timeout(guest.shutdown(Empty {})).await.unwrap();
    assert!(vm.wait().await.success());
    drop(vm);

    // A VM that cannot boot says why on the console and powers off by itself.
    let mut vm = Vm::boot(
        &kernel,
        &initrd,
        &rootfs,
        &workspace,
        dir.path(),
        "berth.workspace_path=relative",
    );
    assert!(vm.wait().await.success());
    let console = vm.console();
    assert!(
        console.contains("berth: fatal: bad kernel command line: berth.workspace_path"),
        "{console}"
    );
}

/// Not a test of its own: the host process the microVM test SIGKILLs mid-stream.
#[test]
#[ignore = "run by microvm_boots_serves_reconnects_and_keeps_the_workspace"]
fn host_that_streams_until_killed() {
    let Some(socket) = std::env::var_os(HOST_SOCKET_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut guest = timeout(connect_unix(Path::new(&socket))).await.unwrap();
        let mut stream = exec(&mut guest, &["cat", "/dev/zero"]).await;
        let mut seen = 0;
        let mut told = false;
        while let Some(output) = stream.next().await {
            if let Some(exec_output::Kind::Stdout(data)) = output.unwrap().kind {
                seen += data.len();
            }
            if seen >= 1 << 20 && !told {
                println!("streaming");
                told = true;
            }
        }
    });
}

/// A new host connection, checked with Health, made at once (no `RECONNECT_PAUSE`).
/// When the previous connection closed only an instant before, bytes the guest wrote
/// for it can reach this one and break it (`agent/vm/README.md` in berth-guest); then,
/// as the berth server should, connect again after a pause.
async fn reconnect(vm: &mut Vm) -> Guest {
    for attempt in 1.. {
        let mut guest = vm.connect().await;
        match timeout(guest.health(Empty {})).await {
            Ok(_) => return guest,
            Err(status) if attempt < 5 => {
                eprintln!("reconnect attempt {attempt} failed, retrying: {status}");
                tokio::time::sleep(RECONNECT_PAUSE * attempt).await;
            }
            Err(status) => panic!("cannot reconnect to the guest: {status}"),
        }
    }
    unreachable!()
}

async fn timeout<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("the guest did not answer before the deadline")
}

async fn exec(
    guest: &mut Guest,
    argv: &[&str],
) -> impl futures::Stream<Item = Result<berth_guest::proto::ExecOutput, String>> + Unpin {
    let start = ExecInput {
        kind: Some(exec_input::Kind::Start(ExecStart {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            cwd: "/".into(),
            ..Default::default()
        })),
    };
    // The end of the input only closes the command's stdin.
    let input = futures::stream::iter([start]);
    let output = timeout(guest.exec(input)).await.unwrap().into_inner();
    output.map(|item| item.map_err(|status| status.to_string()))
}

/// Run a command to completion: its stdout and how it exited.
async fn run(guest: &mut Guest, argv: &[&str]) -> (Vec<u8>, Exited) {
    let mut stream = exec(guest, argv).await;
    let mut out = Vec::new();
    loop {
        match timeout(stream.next()).await.unwrap().unwrap().kind {
            Some(exec_output::Kind::Stdout(data)) => out.extend_from_slice(&data),
            Some(exec_output::Kind::Exited(exited)) => return (out, exited),
            _ => {}
        }
    }
}

/// Run a command to completion, counting its stdout.
async fn count(guest: &mut Guest, argv: &[&str]) -> (usize, Exited) {
    let mut stream = exec(guest, argv).await;
    let mut bytes = 0;
    loop {
        match timeout(stream.next()).await.unwrap().unwrap().kind {
            Some(exec_output::Kind::Stdout(data)) => bytes += data.len(),
            Some(exec_output::Kind::Exited(exited)) => return (bytes, exited),
            _ => {}
        }
    }
}

/// A running QEMU `microvm`, killed if the test ends before it exits.
struct Vm {
    child: Child,
    socket: PathBuf,
    console: PathBuf,
}

impl Vm {
    /// `extra`: more kernel command line (later `berth.*` keys win).
    fn boot(
        kernel: &Kernel,
        initrd: &Path,
        rootfs: &Path,
        workspace: &Path,
        dir: &Path,
        extra: &str,
    ) -> Vm {
        let socket = dir.join("channel.sock");
        let console = dir.join("console.log");
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&console);
        let path = |p: &Path| p.to_str().unwrap().to_string();
        let child = Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,accel=tcg,acpi=on", "-m", "512", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-kernel", &path(&kernel.vmlinux), "-initrd", &path(initrd)])
            .args([
                "-append",
                &format!(
                    // The TSC frequency: see `host_tsc_khz`.
                    "console=ttyS0 panic=-1 quiet tsc_early_khz={} tsc=reliable \
                     berth.workspace_path=\"/mnt/workspace\" berth.hostname=vm-test \
                     berth.env={} {extra}",
                    kernel.tsc_khz,
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(r#"{"GREETING":"hello world"}"#),
                ),
            ])
            .args(["-chardev", &format!("file,id=con,path={}", path(&console))])
            .args(["-serial", "chardev:con"])
            .args(["-device", "virtio-serial-device"])
            .args([
                "-chardev",
                &format!("socket,id=ch0,path={},server=on,wait=off", path(&socket)),
            ])
            .args(["-device", "virtserialport,chardev=ch0,name=berth.0"])
            .args([
                "-drive",
                &format!(
                    "id=root,file={},format=raw,if=none,readonly=on",
                    path(rootfs)
                ),
            ])
            .args(["-device", "virtio-blk-device,drive=root,serial=berth-root"])
            .args([
                "-drive",
                &format!("id=ws,file={},format=raw,if=none", path(workspace)),
            ])
            .args(["-device", "virtio-blk-device,drive=ws,serial=berth-ws"])
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start qemu-system-x86_64");
        Vm {
            child,
            socket,
            console,
        }
    }

    /// Connect to QEMU's chardev socket as the berth server does. QEMU accepts at once;
    /// calls wait until the guest's agent serves the port. QEMU binds the socket before
    /// it listens, so a connect just after the file appeared may be refused.
    async fn connect(&mut self) -> Guest {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self.socket.exists() {
                match connect_unix(&self.socket).await {
                    Ok(guest) => return guest,
                    Err(err) if Instant::now() < deadline => {
                        eprintln!("connect: {err:?}, retrying");
                    }
                    Err(err) => panic!("cannot connect to QEMU: {err:?}"),
                }
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "QEMU exited early: {}",
                self.console()
            );
            assert!(Instant::now() < deadline, "QEMU made no socket");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU did not exit: {}",
                self.console()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            eprintln!("guest console:\n{}", self.console());
        }
    }
}

struct Kernel {
    vmlinux: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    modules: PathBuf,
    release: String,
    tsc_khz: u64,
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's cloud kernel: the concrete package `linux-image-cloud-amd64` depends on,
/// downloaded and unpacked once into the target dir, `vmlinux` decompressed from the
/// bzImage's lz4 payload (microvm boots an ELF kernel directly).
fn fetch_kernel() -> Kernel {
    let deps = sh(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
    let package = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .expect("linux-image-cloud-amd64 depends on no kernel package")
        .to_string();
    let release = package.trim_start_matches("linux-image-").to_string();
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("vm-kernel")
        .join(&package);
    let kernel = Kernel {
        vmlinux: cache.join("vmlinux"),
        modules: cache.join("root/lib/modules").join(&release),
        release,
        tsc_khz: host_tsc_khz(),
    };
    if kernel.vmlinux.exists() {
        return kernel;
    }
    let tmp = cache.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    sh(Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(&tmp));
    let deb = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap();
    sh(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(tmp.join("root")));
    std::fs::remove_file(&deb).unwrap();
    let bzimage = std::fs::read(tmp.join(format!("root/boot/vmlinuz-{}", kernel.release))).unwrap();
    std::fs::write(tmp.join("vmlinux"), vmlinux_from_bzimage(&bzimage)).unwrap();
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::rename(&tmp, &cache).unwrap();
    kernel
}

/// Under TCG the guest's TSC is the host's. Told nothing, the guest kernel calibrates it
/// against the emulated PIT, which fails when the host is busy ("Unable to calibrate
/// against PIT", "Marking TSC unstable") and the boot then hangs for good (about half
/// the boots at a load of 3–5 on 2 cores); `tsc_early_khz` skips the calibration.
fn host_tsc_khz() -> u64 {
    #[allow(unsafe_code)]
    fn rdtsc() -> u64 {
        // SAFETY: RDTSC only reads the time-stamp counter, which every x86-64 CPU has;
        // it touches no memory.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(200));
    let (t1, c1) = (Instant::now(), rdtsc());
    ((c1 - c0) as f64 / (t1 - t0).as_secs_f64() / 1000.0) as u64
}

/// The bzImage's payload is an lz4 legacy frame (magic 02 21 4c 18): independent blocks
/// of at most 8 MiB output, each preceded by its compressed size; the frame ends where
/// a size no longer fits (the kernel appends the uncompressed length after it).
fn vmlinux_from_bzimage(bzimage: &[u8]) -> Vec<u8> {
    const MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
    let start = bzimage
        .windows(4)
        .position(|w| w == MAGIC)
        .expect("no lz4 payload in the bzImage");
    let data = &bzimage[start + 4..];
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= data.len() {
        let size = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        if size == 0 || size > (8 << 20) + (8 << 20) / 255 + 16 || at + 4 + size > data.len() {
            break;
        }
        lz4_block(&data[at + 4..at + 4 + size], &mut out);
        at += 4 + size;
    }
    assert_eq!(
        &out[..4],
        b"\x7fELF",
        "the lz4 payload is not an ELF kernel"
    );
    out
}

/// Decode one lz4 block, appending to `out`.
fn lz4_block(src: &[u8], out: &mut Vec<u8>) {
    let length = |i: &mut usize, mut n: usize| {
        if n == 15 {
            loop {
                let b = src[*i];
                *i += 1;
                n += usize::from(b);
                if b != 255 {
                    break;
                }
            }
        }
        n
    };
    let mut i = 0;
    loop {
        let token = src[i];
        i += 1;
        let literals = length(&mut i, usize::from(token >> 4));
        out.extend_from_slice(&src[i..i + literals]);
        i += literals;
        if i == src.len() {
            return;
        }
        let offset = usize::from(u16::from_le_bytes([src[i], src[i + 1]]));
        i += 2;
        let len = length(&mut i, usize::from(token & 15)) + 4;
        let from = out.len() - offset;
        // Matches may overlap their own output (runs): copy byte by byte.
        for k in 0..len {
            out.push(out[from + k]);
        }
    }
}

/// The shared libraries `ldd` lists for `program`.
fn libraries(program: &Path) -> Vec<PathBuf> {
    sh(Command::new("ldd").arg(program))
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// Copy `file` (following symlinks) to the same absolute path under `root`.
fn copy_in(root: &Path, file: &Path, to: &Path) {
    let dest = root.join(to.strip_prefix("/").unwrap());
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(file, &dest).unwrap();
}

fn mkdirs(root: &Path, dirs: &[&str]) {
    for d in dirs {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
}

/// The image-build contract: `/init` = berth (debug info stripped: initramfs files live
/// in RAM and the running binary's stay there), its libraries, the modules and their
/// order, the kernel release, empty mount points.
fn build_initramfs(kernel: &Kernel, dir: &Path) -> PathBuf {
    let root = dir.join("initramfs");
    mkdirs(
        &root,
        &[
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "newroot",
            "lib/modules/berth",
            "etc/berth",
        ],
    );
    sh(Command::new("objcopy")
        .args(["--strip-debug", BERTH])
        .arg(root.join("init")));
    for lib in libraries(Path::new(BERTH)) {
        copy_in(&root, &lib, &lib);
    }
    let mut order = String::new();
    for module in MODULES {
        let name = format!(
            "{}.ko",
            Path::new(module).file_name().unwrap().to_str().unwrap()
        );
        std::fs::copy(
            kernel.modules.join("kernel").join(format!("{module}.ko")),
            root.join("lib/modules/berth").join(&name),
        )
        .unwrap();
        order += &format!("{name}\n");
    }
    std::fs::write(root.join("lib/modules/berth/order"), order).unwrap();
    std::fs::write(
        root.join("etc/berth/kernel-release"),
        format!("{}\n", kernel.release),
    )
    .unwrap();
    let cpio = dir.join("initramfs.cpio");
    sh(Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet > '{}'",
            cpio.display()
        ))
        .current_dir(&root));
    cpio
}

/// A read-only root: a few host programs with their libraries, `/mnt/workspace`.
fn build_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    mkdirs(
        &root,
        &[
            "bin",
            "etc",
            "tmp",
            "dev",
            "proc",
            "sys",
            "run",
            "root",
            "mnt/workspace",
        ],
    );
    std::fs::set_permissions(
        root.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    for program in PROGRAMS {
        let path = PathBuf::from(
            sh(Command::new("sh").args(["-c", &format!("command -v {program}")])).trim(),
        );
        copy_in(&root, &path, &Path::new("/bin").join(program));
        for lib in libraries(&path) {
            copy_in(&root, &lib, &lib);
        }
    }
    let image = dir.join("rootfs.ext4");
    mkfs(&image, Some(&root));
    image
}

fn mkfs(image: &Path, from: Option<&Path>) {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F"]);
    if let Some(from) = from {
        cmd.arg("-d").arg(from);
    }
    sh(cmd.arg(image).arg("128M"));
}

fn dumpe2fs(image: &Path) -> String {
    sh(Command::new("dumpe2fs").arg("-h").arg(image))
}

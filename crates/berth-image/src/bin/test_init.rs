//! Stand-in for `berth guest` in the boot test (`tests/boot.rs`): run as `/init`, it
//! checks the initramfs contract from inside the guest — load the modules listed in
//! `/lib/modules/berth/order`, find the virtio disk whose serial is `berth-root`, mount
//! it read-only at `/newroot` — prints what it found to the console, and powers off.
//! Not part of berth.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

fn main() {
    let result = run();
    match &result {
        Ok(()) => println!("berth-test: ok"),
        Err(e) => println!("berth-test: error: {e}"),
    }
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Returning from PID 1 panics the kernel, which with panic=-1 also ends the VM.
}

fn run() -> Result<(), String> {
    let fs_mount = |src: &str, at: &str, fstype: &str| {
        mount(Some(src), at, Some(fstype), MsFlags::empty(), None::<&str>)
            .map_err(|e| format!("mount {fstype} at {at}: {e}"))
    };
    fs_mount("devtmpfs", "/dev", "devtmpfs")?;
    fs_mount("proc", "/proc", "proc")?;
    fs_mount("sysfs", "/sys", "sysfs")?;

    let order =
        fs::read_to_string("/lib/modules/berth/order").map_err(|e| format!("order: {e}"))?;
    let mut loaded = Vec::new();
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = Path::new("/lib/modules/berth").join(name);
        let file = fs::File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::Error::EEXIST) => loaded.push(name.trim_end_matches(".ko")),
            Err(e) => return Err(format!("load {name}: {e}")),
        }
    }
    println!("berth-test: modules={}", loaded.join(","));

    let deadline = Instant::now() + Duration::from_secs(20);
    let disk = loop {
        let found = fs::read_dir("/sys/block")
            .map_err(|e| format!("/sys/block: {e}"))?
            .flatten()
            .find(|e| {
                fs::read_to_string(e.path().join("serial")).is_ok_and(|s| s.trim() == "berth-root")
            })
            .map(|e| e.file_name().to_string_lossy().into_owned());
        if let Some(disk) = found {
            break disk;
        }
        if Instant::now() > deadline {
            return Err("no virtio disk with serial berth-root".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dev = format!("/dev/{disk}");
    mount(
        Some(dev.as_str()),
        "/newroot",
        Some("ext4"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| format!("mount {dev} read-only: {e}"))?;
    // The image carries the ext4 read-only feature: a read-write mount must fail.
    let rw = mount(
        None::<&str>,
        "/newroot",
        None::<&str>,
        MsFlags::MS_REMOUNT,
        None::<&str>,
    );
    println!(
        "berth-test: rw-remount={}",
        if rw.is_ok() { "allowed" } else { "refused" }
    );

    let release = fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|e| e.to_string())?;
    let packed = fs::read_to_string("/etc/berth/kernel-release").map_err(|e| e.to_string())?;
    let hello = fs::read_to_string("/newroot/hello.txt").map_err(|e| format!("hello.txt: {e}"))?;
    println!("berth-test: disk={disk}");
    println!("berth-test: uname-r={}", release.trim());
    println!("berth-test: kernel-release-file={}", packed.trim());
    println!("berth-test: hello={}", hello.trim());
    for dir in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "mnt/workspace",
        "var/tmp",
        "root",
        "home",
    ] {
        if !Path::new("/newroot").join(dir).is_dir() {
            return Err(format!("rootfs lacks /{dir}"));
        }
    }
    Ok(())
}

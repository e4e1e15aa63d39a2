//! The OCI runtime config (`bundle/config.json`) of one sandbox, as pure data.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::guest::{self, HostLoader};
use super::seccomp;

pub use super::guest::GUEST_EXE;
/// Where the per-session socket dir appears inside every sandbox.
pub const GUEST_SOCK_DIR: &str = "/run/berth";
pub const GUEST_SOCK: &str = "/run/berth/guest.sock";
const CPU_PERIOD_US: u64 = 100_000;

/// Docker's default capability set minus `NET_RAW`, `MKNOD`, `AUDIT_WRITE` and
/// `SETFCAP`, plus `NET_ADMIN` so the guest can bring `lo` up (it drops it afterwards).
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_NET_ADMIN",
];

/// Kernel interfaces hidden as Docker hides them.
pub const MASKED_KERNEL_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

pub const READONLY_KERNEL_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Character devices a sandbox may use (major, minor; `None` = any minor).
const ALLOWED_DEVICES: &[(i64, Option<i64>)] = &[
    (1, Some(3)), // null
    (1, Some(5)), // zero
    (1, Some(7)), // full
    (1, Some(8)), // random
    (1, Some(9)), // urandom
    (5, Some(0)), // tty
    (5, Some(1)), // console
    (5, Some(2)), // ptmx
    (136, None),  // pts
];

/// An extra bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Everything the config depends on; built by the driver from a `SandboxRequest`.
#[derive(Debug, Clone)]
pub struct SpecInput {
    pub session: String,
    /// The overlay mount point.
    pub rootfs: PathBuf,
    /// Host uid (= gid) that sandbox root maps to, and the size of the range.
    pub host_id: u32,
    pub id_range: u32,
    pub cgroup: String,
    /// Host directories bind-mounted read-only at the same path (`/usr`, `/etc`…);
    /// empty for directory images.
    pub host_dirs: Vec<PathBuf>,
    /// Secrets under the host dirs to hide (`/etc/shadow`…).
    pub masked: Vec<String>,
    pub berth_exe: PathBuf,
    /// Run the agent on the host's loader and libraries (directory images; `None`
    /// for `host` and for a static agent), see [`guest`].
    pub host_loader: Option<HostLoader>,
    pub sock_dir: PathBuf,
    pub workspace_source: PathBuf,
    /// Per-session `/etc/hosts` and `/etc/hostname` (the host's name the sandbox's).
    pub etc_dir: PathBuf,
    pub workspace_path: String,
    pub mounts: Vec<BindMount>,
    pub env: BTreeMap<String, String>,
    pub cpus: Option<f64>,
    pub memory: u64,
    pub pids: u64,
}

/// `/etc/hosts` naming the sandbox so tools that resolve their own hostname work.
pub fn etc_hosts(session: &str) -> String {
    let name = hostname(session);
    format!("127.0.0.1\tlocalhost {name}\n::1\tlocalhost ip6-localhost ip6-loopback {name}\n")
}

/// Linux limits `hostname` to 64 bytes; keep 63 like `HOST_NAME_MAX` users expect.
pub fn hostname(session: &str) -> String {
    session.chars().take(63).collect()
}

fn env_list(input: &SpecInput) -> Vec<String> {
    let mut env: BTreeMap<&str, &str> = BTreeMap::from([
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOME", "/root"),
        ("TERM", "xterm-256color"),
    ]);
    for (k, v) in &input.env {
        env.insert(k, v);
    }
    env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn bind(source: &std::path::Path, target: &str, read_only: bool, extra: &[&str]) -> Value {
    let mut options = vec![
        "rbind",
        if read_only { "ro" } else { "rw" },
        "nosuid",
        "nodev",
    ];
    options.extend_from_slice(extra);
    json!({"destination": target, "type": "bind", "source": source, "options": options})
}

fn tmpfs(target: &str, mode: &str, extra: &[&str]) -> Value {
    let mode = format!("mode={mode}");
    let mut options = vec!["nosuid", "nodev", mode.as_str()];
    options.extend_from_slice(extra);
    json!({"destination": target, "type": "tmpfs", "source": "tmpfs", "options": options})
}

fn mounts(input: &SpecInput) -> Vec<Value> {
    let mut m = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    for dir in &input.host_dirs {
        m.push(bind(dir, &dir.to_string_lossy(), true, &[]));
    }
    for file in ["hosts", "hostname"] {
        let target = format!("/etc/{file}");
        m.push(
            json!({"destination": target, "type": "bind", "source": input.etc_dir.join(file),
                      "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}),
        );
    }
    m.push(tmpfs("/tmp", "1777", &[]));
    m.push(tmpfs("/var/tmp", "1777", &[]));
    m.push(tmpfs("/root", "700", &[]));
    m.push(tmpfs("/run", "755", &[]));
    // After the /run tmpfs, or it would hide the socket dir.
    m.push(bind(&input.sock_dir, GUEST_SOCK_DIR, false, &["noexec"]));
    m.push(
        json!({"destination": GUEST_EXE, "type": "bind", "source": input.berth_exe,
                  "options": ["bind", "ro", "nosuid", "nodev"]}),
    );
    for file in input.host_loader.iter().flat_map(HostLoader::files) {
        m.push(
            json!({"destination": file.target, "type": "bind", "source": file.source,
                      "options": ["bind", "ro", "nosuid", "nodev"]}),
        );
    }
    m.push(bind(
        &input.workspace_source,
        &input.workspace_path,
        false,
        &[],
    ));
    for extra in &input.mounts {
        m.push(bind(&extra.source, &extra.target, extra.read_only, &[]));
    }
    m
}

fn resources(input: &SpecInput) -> Value {
    let mut devices = vec![json!({"allow": false, "access": "rwm"})];
    for (major, minor) in ALLOWED_DEVICES {
        let mut rule = json!({"allow": true, "type": "c", "major": major, "access": "rwm"});
        if let Some(minor) = minor {
            rule["minor"] = json!(minor);
        }
        devices.push(rule);
    }
    let memory = i64::try_from(input.memory).unwrap_or(i64::MAX);
    let mut res = json!({
        "devices": devices,
        // swap limited to the memory limit: v1 memsw counts memory+swap, so no swap
        // is used and the OOM killer acts inside this cgroup.
        "memory": {"limit": memory, "swap": memory},
        "pids": {"limit": i64::try_from(input.pids).unwrap_or(i64::MAX)},
    });
    if let Some(cpus) = input.cpus {
        let quota = (cpus * CPU_PERIOD_US as f64).round().max(1000.0) as i64;
        res["cpu"] = json!({"quota": quota, "period": CPU_PERIOD_US});
    }
    res
}

/// The full OCI config as JSON.
pub fn config(input: &SpecInput) -> Value {
    let id_map = json!([{"containerID": 0, "hostID": input.host_id, "size": input.id_range}]);
    let mut masked: Vec<String> = MASKED_KERNEL_PATHS.iter().map(|s| s.to_string()).collect();
    masked.extend(input.masked.iter().cloned());
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": input.rootfs, "readonly": false},
        "hostname": hostname(&input.session),
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": guest::argv(input.host_loader.as_ref(), GUEST_SOCK),
            "env": env_list(input),
            "cwd": "/",
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "permitted": CAPABILITIES,
            },
            "noNewPrivileges": true,
        },
        "mounts": mounts(input),
        "linux": {
            "uidMappings": id_map,
            "gidMappings": id_map,
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "user"}, {"type": "cgroup"},
            ],
            "cgroupsPath": input.cgroup,
            "resources": resources(input),
            "maskedPaths": masked,
            "readonlyPaths": READONLY_KERNEL_PATHS,
            "seccomp": seccomp::profile(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::Spec;

    fn input() -> SpecInput {
        SpecInput {
            session: "s".repeat(70),
            rootfs: "/d/run/s/rootfs".into(),
            host_id: 1_065_536,
            id_range: 65536,
            cgroup: "/berth/s".into(),
            host_dirs: vec!["/usr".into(), "/etc".into()],
            masked: vec!["/etc/shadow".into()],
            berth_exe: "/opt/berth".into(),
            host_loader: None,
            sock_dir: "/d/run/s/sock".into(),
            workspace_source: "/d/run/s/workspace".into(),
            etc_dir: "/d/run/s/etc".into(),
            workspace_path: "/mnt/workspace".into(),
            mounts: vec![BindMount {
                source: "/srv/skills".into(),
                target: "/skills".into(),
                read_only: true,
            }],
            env: BTreeMap::from([("FOO".into(), "bar".into()), ("TERM".into(), "dumb".into())]),
            cpus: Some(1.5),
            memory: 1 << 30,
            pids: 100,
        }
    }

    #[test]
    fn config_is_a_valid_oci_spec() {
        let spec: Spec = serde_json::from_value(config(&input())).expect("valid OCI");
        assert_eq!(spec.hostname().as_deref(), Some("s".repeat(63).as_str()));
        let process = spec.process().as_ref().expect("process");
        assert_eq!(process.no_new_privileges(), Some(true));
        let env = process.env().as_ref().expect("env");
        assert!(env.contains(&"FOO=bar".to_string()));
        assert!(env.contains(&"TERM=dumb".to_string()), "runtime env wins");
        assert!(env.contains(&"HOME=/root".to_string()));
        let linux = spec.linux().as_ref().expect("linux");
        let maps = linux.uid_mappings().as_ref().expect("uid maps");
        assert_eq!(maps[0].host_id(), 1_065_536);
        assert_eq!(maps[0].container_id(), 0);
        let cpu = linux
            .resources()
            .as_ref()
            .and_then(|r| r.cpu().clone())
            .expect("cpu");
        assert_eq!(cpu.quota(), Some(150_000));
        assert_eq!(cpu.period(), Some(100_000));
        let masked = linux.masked_paths().as_ref().expect("masked");
        assert!(masked.contains(&"/etc/shadow".to_string()));
        assert!(masked.contains(&"/proc/kcore".to_string()));
    }

    #[test]
    fn mount_order_puts_socket_after_run_tmpfs() {
        let spec: Spec = serde_json::from_value(config(&input())).expect("valid OCI");
        let dests: Vec<String> = spec
            .mounts()
            .as_ref()
            .expect("mounts")
            .iter()
            .map(|m| m.destination().to_string_lossy().into_owned())
            .collect();
        let pos = |d: &str| dests.iter().position(|x| x == d).expect(d);
        assert!(pos("/run") < pos(GUEST_SOCK_DIR));
        assert!(pos("/usr") < pos("/tmp"));
        assert!(pos("/etc") < pos("/etc/hosts"));
        assert!(pos("/mnt/workspace") < pos("/skills"));
        assert_eq!(pos("/proc"), 0);
    }

    #[test]
    fn a_host_loader_is_mounted_read_only_and_runs_the_agent() {
        let mut i = input();
        let ld = "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
        i.host_loader = Some(HostLoader {
            loader: guest::GuestFile {
                host: "/lib64/ld-linux-x86-64.so.2".into(),
                source: ld.into(),
                target: "/.berth/ld-linux-x86-64.so.2".into(),
            },
            libraries: vec![guest::GuestFile {
                host: "/lib/x86_64-linux-gnu/libc.so.6".into(),
                source: "/lib/x86_64-linux-gnu/libc.so.6".into(),
                target: "/.berth/lib/libc.so.6".into(),
            }],
        });
        let spec: Spec = serde_json::from_value(config(&i)).expect("valid OCI");
        let args = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .expect("args");
        assert_eq!(args[0], "/.berth/ld-linux-x86-64.so.2");
        assert_eq!(&args[4..6], [GUEST_EXE, "guest"]);
        let mounts = spec.mounts().as_ref().expect("mounts");
        for (target, source) in [
            ("/.berth/ld-linux-x86-64.so.2", ld),
            ("/.berth/lib/libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
        ] {
            let m = mounts
                .iter()
                .find(|m| m.destination() == std::path::Path::new(target))
                .expect(target);
            assert_eq!(m.source().as_deref(), Some(std::path::Path::new(source)));
            let options = m.options().as_ref().expect("options");
            assert!(options.contains(&"ro".to_string()), "{options:?}");
        }
        let plain = config(&input());
        assert_eq!(plain["process"]["args"][0], GUEST_EXE);
        assert_eq!(
            plain["mounts"].as_array().map(Vec::len),
            Some(mounts.len() - 2)
        );
    }

    #[test]
    fn no_cpu_limit_without_cpus() {
        let mut i = input();
        i.cpus = None;
        let v = config(&i);
        assert!(v["linux"]["resources"].get("cpu").is_none());
        assert_eq!(v["linux"]["resources"]["memory"]["swap"], json!(1i64 << 30));
    }
}

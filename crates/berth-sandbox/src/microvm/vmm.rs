//! The virtual machine monitor behind the microVM driver. QEMU's `microvm` machine is
//! the one Debian ships; Firecracker or Cloud Hypervisor fit behind [`Vmm`] where their
//! binaries exist (both boot the same `vmlinux` + initramfs and take virtio-blk disks;
//! their host↔guest channel is vsock, which the guest serves with
//! `berth.channel=vsock:<port>`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// How the guest's vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation: the production mode.
    Kvm,
    /// Software emulation: slow (seconds to boot), for development and tests only.
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// One VM to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Shared read-only root filesystem image (guest finds it by serial `berth-root`).
    pub rootfs: PathBuf,
    /// The session's workspace image (serial `berth-ws`).
    pub workspace: PathBuf,
    /// The device carrying the guest protocol.
    pub channel: ChannelDevice,
    /// Where the guest console (kernel messages, agent log) is appended.
    pub console_log: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    /// Host directories served by vhost-user-fs daemons, by guest tag.
    pub shares: Vec<ShareDevice>,
}

/// The guest protocol's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelDevice {
    /// A virtio-serial port named [`CHANNEL_NAME`]; the VMM listens on this unix socket.
    Serial(PathBuf),
    /// vhost-vsock in the host kernel, with this guest CID.
    KernelVsock { cid: u32 },
    /// A vhost-user vsock device whose daemon listens on this unix socket.
    VhostUserVsock(PathBuf),
}

/// One virtio-fs device: the guest mounts `tag`; the daemon listens on `socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDevice {
    pub tag: String,
    pub socket: PathBuf,
}

/// Serial numbers the guest uses to tell its disks apart (`/sys/block/vd*/serial`).
pub const ROOT_SERIAL: &str = "berth-root";
pub const WORKSPACE_SERIAL: &str = "berth-ws";
/// Name of the virtio-serial port carrying the guest protocol.
pub const CHANNEL_NAME: &str = "berth.0";

pub trait Vmm: Send + Sync + 'static {
    /// Short name for logs and `server --info`.
    fn name(&self) -> &'static str;
    /// The command that boots `spec` in the foreground (the driver detaches it).
    fn command(&self, spec: &VmSpec) -> Command;
}

/// QEMU's `microvm` machine (`qemu-system-x86_64`).
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
}

impl Default for Qemu {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
        }
    }
}

impl Qemu {
    /// Whether the binary can be run at all (`--version`).
    pub fn available(&self) -> bool {
        Command::new(&self.binary)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

fn arg(path: &Path) -> String {
    // QEMU option values are comma-separated; a comma in a path is written twice.
    path.to_string_lossy().replace(',', ",,")
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu-microvm"
    }

    fn command(&self, spec: &VmSpec) -> Command {
        let mut cmd = Command::new(&self.binary);
        let memory_mib = spec.memory_mib.max(128);
        // A vhost-user daemon maps the guest's RAM itself, so with shares the RAM is a
        // shared memfd (otherwise plain anonymous memory, as before).
        let shared_ram =
            !spec.shares.is_empty() || matches!(spec.channel, ChannelDevice::VhostUserVsock(_));
        // `acpi=on`: this kernel finds virtio-mmio devices only through ACPI (it lacks
        // CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES); see ../shared/notes/microvm-facts.md.
        cmd.args([
            "-M",
            &format!(
                "microvm,accel={},acpi=on{}",
                spec.accel.name(),
                if shared_ram {
                    ",memory-backend=ram"
                } else {
                    ""
                }
            ),
        ])
        .args([
            "-cpu",
            if spec.accel == Accel::Kvm {
                "host"
            } else {
                "max"
            },
        ])
        .args(["-smp", &spec.vcpus.max(1).to_string()])
        .args(["-m", &format!("{memory_mib}M")])
        // virtio 1.0 ("modern") virtio-mmio instead of microvm's legacy default:
        // vhost-user devices (virtio-fs) refuse legacy transports.
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        // No QEMU monitor on stdio, no network device: loopback only inside.
        .args(["-monitor", "none", "-nic", "none"])
        // QEMU's own seccomp filter: should a guest escape into the VMM, it cannot
        // run obsolete syscalls, gain privileges, spawn processes or change limits.
        .args([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ])
        .args(["-kernel", &arg(&spec.kernel)])
        .args(["-initrd", &arg(&spec.initrd)])
        .args(["-append", &spec.cmdline])
        .args([
            "-chardev",
            &format!("file,id=con,path={},append=on", arg(&spec.console_log)),
            "-serial",
            "chardev:con",
        ])
        .args([
            "-drive",
            &format!(
                "id=root,file={},format=raw,if=none,readonly=on",
                arg(&spec.rootfs)
            ),
            "-device",
            &format!("virtio-blk-device,drive=root,serial={ROOT_SERIAL}"),
        ])
        .args([
            "-drive",
            &format!("id=ws,file={},format=raw,if=none", arg(&spec.workspace)),
            "-device",
            &format!("virtio-blk-device,drive=ws,serial={WORKSPACE_SERIAL}"),
        ]);
        match &spec.channel {
            ChannelDevice::Serial(socket) => cmd.args([
                "-device",
                "virtio-serial-device",
                "-chardev",
                &format!("socket,id=ch0,path={},server=on,wait=off", arg(socket)),
                "-device",
                &format!("virtserialport,chardev=ch0,name={CHANNEL_NAME}"),
            ]),
            ChannelDevice::KernelVsock { cid } => {
                cmd.args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
            }
            ChannelDevice::VhostUserVsock(socket) => cmd.args([
                "-chardev",
                &format!("socket,id=ch0,path={}", arg(socket)),
                "-device",
                "vhost-user-vsock-device,chardev=ch0",
            ]),
        };
        if shared_ram {
            cmd.args([
                "-object",
                &format!("memory-backend-memfd,id=ram,size={memory_mib}M,share=on"),
            ]);
        }
        for (i, share) in spec.shares.iter().enumerate() {
            cmd.args([
                "-chardev",
                &format!("socket,id=fs{i},path={}", arg(&share.socket)),
                "-device",
                &format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag),
            ]);
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec with placeholder paths, 1 vCPU and 256 MiB under KVM; tests change what
    /// they look at.
    fn spec(channel: ChannelDevice) -> VmSpec {
        VmSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: String::new(),
            rootfs: "/r".into(),
            workspace: "/w".into(),
            channel,
            console_log: "/l".into(),
            vcpus: 1,
            memory_mib: 256,
            accel: Accel::Kvm,
            shares: vec![],
        }
    }

    fn args(spec: &VmSpec) -> Vec<String> {
        Qemu::default()
            .command(spec)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn qemu_command_line() {
        let spec = VmSpec {
            kernel: "/d/images/x/vmlinux".into(),
            initrd: "/d/images/x/initramfs.cpio.lz4".into(),
            cmdline: "console=ttyS0 quiet".into(),
            rootfs: "/d/images/x/rootfs.ext4".into(),
            workspace: "/d/work,spaces/s.ext4".into(),
            vcpus: 2,
            memory_mib: 512,
            accel: Accel::Tcg,
            ..spec(ChannelDevice::Serial("/d/vm/.sock/ab".into()))
        };
        let args = args(&spec);
        let joined = args.join(" ");
        assert!(joined.contains("-M microvm,accel=tcg,acpi=on"), "{joined}");
        assert!(joined.contains("-smp 2 -m 512M"), "{joined}");
        assert!(
            joined.contains("file=/d/work,,spaces/s.ext4"),
            "commas doubled"
        );
        assert!(joined.contains("serial=berth-root") && joined.contains("serial=berth-ws"));
        assert!(joined.contains("readonly=on"));
        assert!(joined.contains("name=berth.0"));
        assert!(joined.contains("-sandbox on,"), "{joined}");
        let append = args.iter().position(|a| a == "-append").expect("append");
        assert_eq!(args[append + 1], "console=ttyS0 quiet");
        assert!(!joined.contains("memory-backend"), "{joined}");
        assert!(!joined.contains("vhost-user-fs"), "{joined}");
    }

    #[test]
    fn kernel_vsock_names_the_guest_cid_and_needs_no_shared_ram() {
        let joined = args(&spec(ChannelDevice::KernelVsock { cid: 4242 })).join(" ");
        assert!(
            joined.contains("-device vhost-vsock-device,guest-cid=4242"),
            "{joined}"
        );
        assert!(!joined.contains("virtio-serial"), "{joined}");
        assert!(!joined.contains("memory-backend"), "{joined}");
    }

    #[test]
    fn shares_put_the_ram_in_a_shared_memfd() {
        let spec = VmSpec {
            memory_mib: 300,
            shares: vec![
                ShareDevice {
                    tag: "berth-m0".into(),
                    socket: "/s/a,b".into(),
                },
                ShareDevice {
                    tag: "berth-m1".into(),
                    socket: "/s/c".into(),
                },
            ],
            ..spec(ChannelDevice::VhostUserVsock("/v/vu".into()))
        };
        let joined = args(&spec).join(" ");
        assert!(
            joined.contains("-M microvm,accel=kvm,acpi=on,memory-backend=ram"),
            "{joined}"
        );
        assert!(
            joined.contains("memory-backend-memfd,id=ram,size=300M,share=on"),
            "{joined}"
        );
        assert!(joined.contains("-m 300M"), "{joined}");
        assert!(joined.contains("socket,id=fs0,path=/s/a,,b"), "{joined}");
        assert!(
            joined.contains("vhost-user-fs-device,chardev=fs1,tag=berth-m1"),
            "{joined}"
        );
        assert!(
            joined.contains("socket,id=ch0,path=/v/vu -device vhost-user-vsock-device,chardev=ch0"),
            "{joined}"
        );
        assert!(!joined.contains("virtio-serial"), "{joined}");
    }
}

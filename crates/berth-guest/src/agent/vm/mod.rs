//! VM mode: `berth` started by the kernel as `/init` of a microVM's initramfs. It
//! assembles the sandbox's root, then serves the guest protocol on a virtio-serial port
//! or a vsock listener (`berth.channel`) exactly like `berth guest` does on a unix
//! socket, and powers the VM off at the end. See `README.md` in this directory.

mod boot;
mod cmdline;
mod port;
mod vsock;

use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::reaper::Reaper;
use cmdline::{Channel, VmOptions};

/// `name=` of the virtserialport the host attaches to QEMU's chardev socket.
const PORT_NAME: &str = "berth.0";
/// The environment commands start from (then `berth.env`), as in the namespace
/// sandbox's spec; the kernel hands init `HOME=/ TERM=linux`, which is wrong for them.
const ENVIRONMENT: [(&str, &str); 3] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("TERM", "xterm-256color"),
];

/// Whether this process is `/init` started by the kernel, i.e. should run in VM mode.
pub fn is_vm_init(argv0: &std::ffi::OsStr) -> bool {
    std::process::id() == 1 && argv0 == "/init"
}

/// Boot the sandbox and serve until `Shutdown`, then power off. Never returns: QEMU
/// exiting is how the host learns the VM is done (or failed: the reason is the last
/// line on the console).
pub fn main() -> ! {
    let result = boot_and_serve();
    match &result {
        Ok(()) => eprintln!("berth: powering off"),
        Err(err) => eprintln!("berth: fatal: {err:#}; powering off"),
    }
    power_off()
}

fn boot_and_serve() -> anyhow::Result<()> {
    let options = boot::boot()?;
    let cgroup = boot::sandbox_cgroup(options.pids)?;
    let workspace = options.workspace_path.clone();
    let served = super::block_on(async {
        super::setup_process(true);
        let reaper = Reaper::start().context("cannot install the SIGCHLD handler")?;
        match options.channel {
            Channel::Serial => {
                let path = wait_for_port().await?;
                let port = port::Port::open(&path).with_context(|| {
                    format!("cannot open the virtio-serial port {}", path.display())
                })?;
                tracing::info!(port = %path.display(), "guest agent serving on virtio-serial");
                super::serve(reaper, cgroup, port::incoming(port)).await
            }
            Channel::Vsock { port } => {
                let listener = vsock::listen(port).await?;
                super::serve(reaper, cgroup, vsock::incoming(listener)).await
            }
        }
    });
    boot::unmount_workspace(&workspace);
    served
}

/// Logging and the commands' environment, from the kernel command line.
fn prepare_environment(options: &VmOptions) {
    // Single-threaded still (the runtime starts later), so changing the environment
    // races with nothing.
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    for (key, value) in ENVIRONMENT {
        std::env::set_var(key, value);
    }
    for (key, value) in &options.env {
        std::env::set_var(key, value);
    }
    if let Some(filter) = &options.log {
        std::env::set_var("BERTH_LOG", filter);
    }
    super::init_tracing(false);
    // BERTH_LOG is for us, not for commands.
    std::env::remove_var("BERTH_LOG");
    for key in &options.unknown {
        tracing::warn!("ignoring unknown kernel option berth.{key}");
    }
}

/// The port's name arrives from QEMU in a control message after the driver loaded, so
/// it may show up a little later than the device.
async fn wait_for_port() -> anyhow::Result<std::path::PathBuf> {
    let deadline = Instant::now() + boot::DEVICE_TIMEOUT;
    loop {
        if let Some(path) = port::find(PORT_NAME) {
            return Ok(path);
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "no virtio-serial port named {PORT_NAME} after {:?}",
                boot::DEVICE_TIMEOUT
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn power_off() -> ! {
    nix::unistd::sync();
    let Err(err) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("berth: cannot power off: {err}");
    // PID 1 exiting panics the kernel, which with `panic=-1` and QEMU's `-no-reboot`
    // ends the VM too.
    std::process::exit(1)
}

//! The server's sandbox drivers: namespace always, microVM where QEMU is installed.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use berth_sandbox::microvm::channel::{self, Channel};
use berth_sandbox::microvm::vmm::{Accel, Qemu};
use berth_sandbox::{Drivers, MicroVmConfig, MicroVmDriver, NamespaceConfig, NamespaceDriver};

use crate::cli::{AccelArg, ChannelArg, ServerArgs};
use crate::images::BuiltImages;

pub struct ServerDrivers {
    pub drivers: Arc<Drivers>,
    pub microvm: Option<Arc<MicroVmDriver>>,
    /// Why there is no microVM driver.
    pub microvm_missing: Option<String>,
    pub images: Arc<BuiltImages>,
}

pub fn build(args: &ServerArgs, data_dir: &Path) -> anyhow::Result<ServerDrivers> {
    let berth_exe = std::env::current_exe().context("cannot find the berth binary")?;
    let mut ns = NamespaceConfig::new(data_dir, berth_exe);
    ns.uid_base = args.uid_base;
    let namespace =
        NamespaceDriver::new(ns).context("the namespace sandbox driver cannot run on this host")?;
    let images = Arc::new(BuiltImages::new(
        args.guest_images
            .clone()
            .unwrap_or_else(|| data_dir.to_path_buf()),
    ));
    let qemu = Qemu::default();
    // `available` runs `qemu-system-x86_64 --version`: ask once.
    let qemu_available = qemu.available();
    if qemu_available {
        images.warm_up();
    }
    let (microvm, microvm_missing) = if qemu_available {
        let accel = match args.microvm_accel {
            AccelArg::Auto => None,
            AccelArg::Kvm => Some(Accel::Kvm),
            AccelArg::Tcg => Some(Accel::Tcg),
        };
        let mut config = MicroVmConfig::new(data_dir);
        // A session's helper daemons (shares, vsock) run as the same host uids a
        // namespace sandbox of the same slot would.
        config.uid_base = args.uid_base;
        config.channel = channel(args)?;
        let driver = MicroVmDriver::new(config, Arc::new(qemu), images.clone(), accel)
            .context("cannot prepare the microVM driver's directories")?;
        (Some(Arc::new(driver)), None)
    } else {
        let why = "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)";
        (None, Some(why.to_string()))
    };
    let drivers = Arc::new(
        Drivers::new(
            Arc::new(namespace),
            microvm
                .clone()
                .map(|d| d as Arc<dyn berth_core::driver::Driver>)
                .ok_or_else(|| microvm_missing.clone().unwrap_or_default()),
        )
        .with_default(args.default_isolation.into()),
    );
    Ok(ServerDrivers {
        drivers,
        microvm,
        microvm_missing,
        images,
    })
}

/// The microVM channel `--microvm-channel` asks for, if this host has it.
fn channel(args: &ServerArgs) -> anyhow::Result<Channel> {
    Ok(match args.microvm_channel {
        ChannelArg::Auto => Channel::detect(),
        ChannelArg::Serial => Channel::Serial,
        ChannelArg::Vsock => {
            if !channel::kernel_vsock_available() {
                anyhow::bail!(
                    "--microvm-channel vsock needs /dev/vhost-vsock (modprobe vhost_vsock), \
                     which this host lacks; use auto, serial or vhost-user-vsock"
                );
            }
            Channel::KernelVsock
        }
        ChannelArg::VhostUserVsock => {
            let daemon = channel::find_daemon(args.vhost_device_vsock.as_deref()).context(
                "--microvm-channel vhost-user-vsock needs vhost-device-vsock (cargo install \
                     vhost-device-vsock, or give --vhost-device-vsock PATH)",
            )?;
            Channel::VhostUserVsock { daemon }
        }
    })
}

/// Decide what `auto` isolation means now, at server start, so the KVM probe's boot
/// (and its WARN when it falls back to TCG) happens before the first session waits on it.
pub fn probe_in_background(d: &ServerDrivers) {
    if d.microvm.is_none() {
        return;
    }
    let drivers = d.drivers.clone();
    tokio::spawn(async move {
        let isolation = drivers
            .resolve(&berth_api::RuntimeSpec::named("auto-probe"))
            .await;
        tracing::info!("runtimes with isolation auto run as {}", isolation.name());
    });
}

/// `berth server --info`: what this host supports. Probes KVM when a `host` guest
/// image is built (booting it once).
pub async fn print_info(d: &ServerDrivers, data_dir: &Path) {
    println!("berth {}", env!("CARGO_PKG_VERSION"));
    println!("data dir: {}", data_dir.display());
    println!("driver namespace: yes (youki libcontainer)");
    print_microvm_info(d).await;
    let auto = d
        .drivers
        .resolve(&berth_api::RuntimeSpec::named("auto-probe"))
        .await;
    println!(
        "isolation auto: {} (pin it with --default-isolation)",
        auto.name()
    );
}

async fn print_microvm_info(d: &ServerDrivers) {
    use berth_sandbox::GuestImages;
    let Some(vm) = &d.microvm else {
        println!(
            "driver microvm: no ({})",
            d.microvm_missing.as_deref().unwrap_or("unavailable")
        );
        return;
    };
    println!(
        "driver microvm: yes ({}, guest channel {})",
        vm.vmm_name(),
        vm.channel().name()
    );
    match vm.virtiofsd() {
        Some(path) => println!("microvm mounts: yes (virtio-fs, {})", path.display()),
        None => println!(
            "microvm mounts: no (runtimes with --mount run as namespace sandboxes): \
             virtiofsd is missing (apt-get install qemu-system-common)"
        ),
    }
    match d.images.find(berth_api::runtime::defaults::IMAGE_HOST) {
        Err(why) => println!("microvm accel: unknown until a guest image exists: {why}"),
        Ok(image) => match vm.accel() {
            Some(accel) => println!("microvm accel: {} (fixed by --microvm-accel)", accel.name()),
            None => match vm.probe_kvm(&image).await {
                Ok(boot) => {
                    vm.remember_accel(Accel::Kvm);
                    println!("microvm accel: kvm (guest booted in {boot:?})")
                }
                Err(why) => {
                    vm.remember_accel(Accel::Tcg);
                    println!(
                        "microvm accel: tcg — WARNING: software emulation, for development \
                         and tests only; KVM cannot boot the guest here: {why}"
                    )
                }
            },
        },
    }
}

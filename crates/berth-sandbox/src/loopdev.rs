//! Attaching an image file to a loop device through the kernel interface
//! (`/dev/loop-control` `LOOP_CTL_GET_FREE`, then `LOOP_CONFIGURE` on the device), so a
//! workspace mount is two ioctls and one `mount(2)` instead of a `mount(8)` process
//! (which also scans every loop device for an existing attachment of the same file).
//!
//! The device gets `LO_FLAGS_AUTOCLEAR`: it detaches itself when its last user goes,
//! i.e. when the filesystem mounted from it is unmounted, or when the returned
//! [`LoopDevice`] is dropped without a mount having been made.
//!
//! `libc` has no loop definitions, so the structures of `<linux/loop.h>` are mirrored
//! here; this is the only module of the crate with `unsafe` (the two ioctls).
#![allow(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `LOOP_CTL_GET_FREE` (`<linux/loop.h>`).
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
/// `LOOP_CONFIGURE` (Linux 5.8+): set the backing fd and the status in one call.
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
/// Another process may take the device `LOOP_CTL_GET_FREE` returned before we configure
/// it (`EBUSY`); then ask again.
const ATTEMPTS: usize = 16;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no free loop device")]
    GetFree(#[source] io::Error),
    #[error("cannot attach {image} to {device}")]
    Configure {
        image: PathBuf,
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("every free loop device was taken by someone else {ATTEMPTS} times in a row")]
    Contended,
}

impl LoopError {
    /// The kernel has no `LOOP_CONFIGURE` (before 5.8) or no loop control device:
    /// the caller may fall back to `mount(8)`.
    pub fn unsupported(&self) -> bool {
        let errno = match self {
            Self::Configure { source, .. } | Self::GetFree(source) => source.raw_os_error(),
            Self::Open { source, .. } => source.raw_os_error(),
            Self::Contended => None,
        };
        matches!(
            errno,
            Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENOENT) | Some(libc::ENODEV)
        )
    }
}

/// A configured, autoclearing loop device. Keep it open until the filesystem on it is
/// mounted; dropping it then leaves the mount as the device's only user.
#[derive(Debug)]
pub struct LoopDevice {
    /// Held open only to keep the device attached until the mount takes over.
    _device: File,
    path: PathBuf,
}

impl LoopDevice {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Attach `image` (read-write) to a free loop device with `LO_FLAGS_AUTOCLEAR`.
pub fn attach(image: &Path) -> Result<LoopDevice, LoopError> {
    let open = |path: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| LoopError::Open {
                path: path.into(),
                source,
            })
    };
    let backing = open(image)?;
    let control = open(Path::new("/dev/loop-control"))?;
    let mut config = LoopConfig {
        fd: u32::try_from(backing.as_raw_fd()).unwrap_or(u32::MAX),
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // Informational only (`losetup` shows it); truncated like util-linux does.
    let name = image.as_os_str().as_bytes();
    let n = name.len().min(LO_NAME_SIZE - 1);
    config.info.lo_file_name[..n].copy_from_slice(&name[..n]);

    for _ in 0..ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or
        // -1; `control` is an open descriptor of /dev/loop-control for the whole call.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if number < 0 {
            return Err(LoopError::GetFree(io::Error::last_os_error()));
        }
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let device = open(&path)?;
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `LoopConfig`
        // mirrors field for field (sizes asserted above); the pointer is valid and the
        // struct outlives the call, and the kernel does not keep the pointer.
        let rc = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                LOOP_CONFIGURE as _,
                std::ptr::from_ref(&config),
            )
        };
        if rc == 0 {
            // The device holds its own reference to the backing file now.
            drop(backing);
            return Ok(LoopDevice {
                _device: device,
                path,
            });
        }
        let source = io::Error::last_os_error();
        if source.raw_os_error() != Some(libc::EBUSY) {
            return Err(LoopError::Configure {
                image: image.into(),
                device: path,
                source,
            });
        }
    }
    Err(LoopError::Contended)
}

/// The file attached to a loop device (from sysfs); `None` once it is detached.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let text = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end()))
}

/// The loop devices attached to `image` (from sysfs, like `losetup -j`), sorted. A
/// device stays listed until its autoclear has finished, which can be a moment after the
/// last unmount of the filesystem on it.
pub fn devices_backed_by(image: &Path) -> Vec<PathBuf> {
    // sysfs names the backing file by its real path, with " (deleted)" once unlinked.
    let wanted = fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return vec![];
    };
    let mut devices: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().as_bytes().starts_with(b"loop"))
        .map(|e| Path::new("/dev").join(e.file_name()))
        .filter(|device| {
            backing_file(device).is_some_and(|file| {
                let file = file.as_os_str().as_bytes();
                let file = file.strip_suffix(b" (deleted)").unwrap_or(file);
                file == wanted.as_os_str().as_bytes()
            })
        })
        .collect();
    devices.sort();
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_and_autoclear() {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists() {
            eprintln!("skipping: needs root and /dev/loop-control");
            return;
        }
        let tmp = tempfile::tempdir().expect("tmp");
        let img = tmp.path().join("img");
        File::create(&img)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        let dev = match attach(&img) {
            Ok(dev) => dev,
            Err(e) if e.unsupported() => {
                eprintln!("skipping: {e}");
                return;
            }
            Err(e) => panic!("attach: {e:#?}"),
        };
        assert_eq!(backing_file(dev.path()).as_deref(), Some(img.as_path()));
        assert_eq!(devices_backed_by(&img), vec![dev.path().to_path_buf()]);
        // An unlinked image is still found (sysfs appends " (deleted)").
        fs::remove_file(&img).expect("unlink image");
        assert_eq!(devices_backed_by(&img), vec![dev.path().to_path_buf()]);
        let path = dev.path().to_path_buf();
        drop(dev);
        assert_eq!(devices_backed_by(&img), Vec::<PathBuf>::new());
        // Autoclear runs on the last close.
        assert_eq!(
            backing_file(&path),
            None,
            "{} still attached",
            path.display()
        );
    }
}

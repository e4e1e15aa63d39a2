//! The initramfs: `/init` (the berth binary, or for tests any program), the shared
//! libraries it needs, the guest's kernel modules with their load order, and the
//! empty directories the guest mounts over. A `newc` cpio in a legacy lz4 frame
//! ([`Lz4LegacyWriter`]; `CONFIG_RD_LZ4` in Debian's cloud kernel). The kernel keeps
//! the initrd's pages reserved until it has unpacked it into rootfs, a tmpfs capped at
//! half the RAM left after that reservation, and QEMU keeps the file mapped for the
//! VM's life: compressed, a debug berth's 92 MB archive (39 MB) gets 86 MiB of room
//! instead of 61 MiB in a 256 MiB guest, and each VM maps ~21 MiB less (release). It
//! costs the guest 0.1–0.2 s of unpacking under TCG; the figures are in
//! `docs/design/microvm-image.md` ("initramfs.cpio.lz4").

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cpio::CpioWriter;
use crate::kernel::{Kernel, Lz4LegacyWriter};
use crate::libs::{self, LibsError, Needed};

/// Bumped whenever the archive changes for the same inputs (kernel, `/init`, its
/// libraries, the strip option). v2: lz4-compressed.
pub const LAYOUT: &str = "initramfs-v2";
/// The manifest's `format` for this archive.
pub const FORMAT: &str = "cpio-newc-lz4";
/// Directories of the initramfs (mode), created empty.
pub const DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("newroot", 0o755),
    ("etc/berth", 0o755),
    ("lib/modules/berth", 0o755),
];
pub const MODULES_DIR: &str = "lib/modules/berth";
pub const KERNEL_RELEASE_FILE: &str = "etc/berth/kernel-release";

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot find the libraries {init} needs")]
    Libs {
        init: PathBuf,
        #[source]
        source: LibsError,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`objcopy --strip-debug {init}` failed: {tail}")]
    Strip { init: PathBuf, tail: String },
}

/// What went into an initramfs.
#[derive(Debug, Clone)]
pub struct Contents {
    /// Whether `/init` had its debug sections removed.
    pub stripped: bool,
    pub libraries: Vec<Needed>,
    /// Module file names in load order (the `order` file).
    pub modules: Vec<String>,
}

/// Write the initramfs for `init` and `kernel` to `out`, compressed as it is written
/// (one 8 MiB block in memory, never the whole archive). With `strip`, `/init` is a
/// copy without debug sections (a debug berth is 390 MB, 85 MB stripped); `objcopy`
/// missing means no stripping.
pub fn write(
    out: &Path,
    init: &Path,
    strip: bool,
    kernel: &Kernel,
) -> Result<Contents, InitramfsError> {
    let libraries = libs::needed(init).map_err(|source| InitramfsError::Libs {
        init: init.into(),
        source,
    })?;
    let werr = |source| InitramfsError::Write {
        path: out.into(),
        source,
    };
    let stripped_path = out.with_extension("init.tmp");
    let (init_file, stripped) = if strip {
        match strip_debug(init, &stripped_path)? {
            true => (stripped_path.clone(), true),
            false => (init.to_path_buf(), false),
        }
    } else {
        (init.to_path_buf(), false)
    };

    let file = File::create(out).map_err(werr)?;
    let lz4 = Lz4LegacyWriter::new(BufWriter::with_capacity(1 << 20, file)).map_err(werr)?;
    let mut w = CpioWriter::new(lz4);
    for (dir, mode) in DIRS {
        w.dir(Path::new(dir), *mode).map_err(werr)?;
    }
    // The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    w.char_device(Path::new("dev/console"), 0o600, 5, 1)
        .map_err(werr)?;
    w.bytes(
        Path::new(KERNEL_RELEASE_FILE),
        0o644,
        format!("{}\n", kernel.release).as_bytes(),
    )
    .map_err(werr)?;
    let mut names = Vec::new();
    for module in &kernel.modules {
        let name = module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        add_file(
            &mut w,
            module,
            &Path::new(MODULES_DIR).join(&name),
            0o644,
            out,
        )?;
        names.push(name);
    }
    let mut order = names.join("\n");
    order.push('\n');
    w.bytes(
        &Path::new(MODULES_DIR).join("order"),
        0o644,
        order.as_bytes(),
    )
    .map_err(werr)?;
    for lib in &libraries {
        add_file(&mut w, &lib.source, &lib.path, 0o755, out)?;
    }
    add_file(&mut w, &init_file, Path::new("init"), 0o755, out)?;
    let buf = w.finish().map_err(werr)?.finish().map_err(werr)?;
    let file = buf.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all().map_err(werr)?;
    if stripped {
        let _ = fs::remove_file(&stripped_path);
    }
    Ok(Contents {
        stripped,
        libraries,
        modules: names,
    })
}

fn add_file(
    w: &mut CpioWriter<Lz4LegacyWriter<BufWriter<File>>>,
    src: &Path,
    at: &Path,
    mode: u32,
    out: &Path,
) -> Result<(), InitramfsError> {
    let rerr = |source| InitramfsError::Read {
        path: src.into(),
        source,
    };
    let mut f = File::open(src).map_err(rerr)?;
    let size = f.metadata().map_err(rerr)?.len();
    w.file(at, mode, size, &mut f)
        .map_err(|source| InitramfsError::Write {
            path: out.into(),
            source,
        })
}

/// `objcopy --strip-debug`; false when objcopy is not installed.
fn strip_debug(src: &Path, dest: &Path) -> Result<bool, InitramfsError> {
    let result = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(src)
        .arg(dest)
        .stdin(Stdio::null())
        .output();
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(InitramfsError::Read {
            path: src.into(),
            source,
        }),
        Ok(out) if out.status.success() => Ok(true),
        Ok(out) => Err(InitramfsError::Strip {
            init: src.into(),
            tail: crate::kernel::tail(&out.stderr),
        }),
    }
}

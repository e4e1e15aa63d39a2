//! The guest kernel: Debian's cloud kernel package, downloaded with `apt-get download`
//! and unpacked with `dpkg-deb -x` (never installed on the host); `vmlinux` is
//! decompressed out of the bzImage, the guest's modules are picked with their
//! dependencies.
//!
//! Cache (under `<data-dir>/images/cache/`):
//! `apt-resolve.json` (which package and version the meta package means, valid while
//! apt's lists are unchanged), `debs/<sha256>.deb`, and
//! `kernel/<deb sha256>-<layout>/{vmlinux, kernel.json, modules/<name>.ko}`; [`prune`]
//! drops the kernels no image uses any more.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::cache::{scratch_name, sha256_file, sha256_hex, write_atomic};
use crate::modules::{read_modinfo, ModuleTree, ModulesError};

/// The meta package whose dependency is the kernel we use.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the guest needs, when they are not built in: virtio-mmio transport (found
/// through ACPI on `microvm`), the root and workspace disks, the host channel
/// (virtio-serial, or vsock over virtio where the host supports it), overlayfs for a
/// writable root over the read-only image, and virtio-fs (with FUSE) for a runtime's
/// host directory mounts.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "overlay",
    "fuse",
    "virtiofs",
];

/// Bumped whenever what is extracted from a `.deb` changes.
pub const LAYOUT: &str = "kernel-v1";
/// The legacy lz4 frame magic (`0x184C2102` little-endian), also repeated between
/// concatenated frames.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// The most one block decompresses to (the kernel's decoder has room for no more).
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("`{command}` could not be run ({hint})")]
    Spawn {
        command: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed: {tail}")]
    Failed { command: String, tail: String },
    #[error("apt knows no kernel package that {meta} depends on; run `apt-get update` (and check that Debian's main archive is in the apt sources)")]
    NoKernelPackage { meta: String },
    #[error("apt has no {field} for {package}; run `apt-get update`")]
    AptField {
        package: String,
        field: &'static str,
    },
    #[error("the downloaded {package} has SHA-256 {got}, apt's index says {want}; run `apt-get update` and try again")]
    Checksum {
        package: String,
        got: String,
        want: String,
    },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the kernel package has {found} boot/vmlinuz-* files, expected one")]
    Vmlinuz { found: usize },
    #[error("the kernel package has no lib/modules/{release}")]
    NoModules { release: String },
    #[error("cannot decompress vmlinuz: {0}")]
    BzImage(String),
    #[error("cannot pick the guest's kernel modules")]
    Modules(#[from] ModulesError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> KernelError + 'a {
    move |source| KernelError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// One concrete kernel package version, as apt's index describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPackage {
    pub package: String,
    pub version: String,
    /// SHA-256 of the `.deb`, from apt's (signed) index.
    pub sha256: String,
}

/// The extracted kernel, ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub package: KernelPackage,
    /// `uname -r` of the guest.
    pub release: String,
    pub vmlinux: PathBuf,
    /// Uncompressed module files, dependencies first.
    pub modules: Vec<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
struct KernelJson {
    release: String,
    /// Module names in load order; files are `modules/<name>.ko`.
    order: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct AptMemo {
    stamp: String,
    meta: String,
    package: KernelPackage,
}

/// Run a command, returning stdout; a failure carries the tail of stderr.
fn run(cmd: &mut Command, hint: &'static str) -> Result<String, KernelError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = crate::child::die_with_parent(cmd)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| KernelError::Spawn {
            command: shown.clone(),
            hint,
            source,
        })?;
    if !out.status.success() {
        return Err(KernelError::Failed {
            command: shown,
            tail: tail(&out.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last meaningful lines of a tool's stderr, on one line.
pub(crate) fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("W: Download is performed unsandboxed"))
        .collect();
    let start = lines.len().saturating_sub(3);
    let joined = lines[start..].join(" / ");
    if joined.is_empty() {
        "no error output".into()
    } else {
        joined
    }
}

/// Which package and version `meta` stands for now. `apt-cache` parses all of apt's
/// lists (over a second here), so the answer is memoized until those lists or the
/// apt sources change.
pub fn resolve(meta: &str, cache: &Path) -> Result<KernelPackage, KernelError> {
    let memo_path = cache.join("apt-resolve.json");
    let stamp = apt_stamp();
    if let Some(memo) = fs::read(&memo_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<AptMemo>(&b).ok())
    {
        if memo.stamp == stamp && memo.meta == meta {
            return Ok(memo.package);
        }
    }
    const HINT: &str = "is apt installed?";
    let depends = run(
        Command::new("apt-cache").args(["depends", "--important", meta]),
        HINT,
    )?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .ok_or_else(|| KernelError::NoKernelPackage { meta: meta.into() })?
        .to_owned();
    let show = run(
        Command::new("apt-cache").args(["show", "--no-all-versions", &package]),
        HINT,
    )?;
    let field = |name: &'static str| {
        show.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| KernelError::AptField {
                package: package.clone(),
                field: name,
            })
    };
    let resolved = KernelPackage {
        version: field("Version")?,
        sha256: field("SHA256")?.to_ascii_lowercase(),
        package: package.clone(),
    };
    if let Ok(json) = serde_json::to_vec_pretty(&AptMemo {
        stamp,
        meta: meta.into(),
        package: resolved.clone(),
    }) {
        let _ = write_atomic(&memo_path, &json);
    }
    Ok(resolved)
}

/// Names, sizes and mtimes of apt's lists and sources: `apt-get update` and source
/// edits change it, nothing else can change what `apt-cache` answers.
fn apt_stamp() -> String {
    let mut listing = String::new();
    for dir in [
        "/var/lib/apt/lists",
        "/etc/apt",
        "/etc/apt/sources.list.d",
        "/etc/apt/preferences.d",
    ] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        let mut rows: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file().then(|| {
                    use std::os::unix::fs::MetadataExt;
                    format!(
                        "{}/{} {} {}.{}\n",
                        dir,
                        e.file_name().to_string_lossy(),
                        m.len(),
                        m.mtime(),
                        m.mtime_nsec()
                    )
                })
            })
            .collect();
        rows.sort();
        listing.extend(rows);
    }
    sha256_hex(listing.as_bytes())
}

/// The `.deb` of `pkg` in `cache/debs/<sha256>.deb`, downloaded if missing.
pub fn fetch(pkg: &KernelPackage, cache: &Path) -> Result<PathBuf, KernelError> {
    let debs = cache.join("debs");
    let deb = debs.join(format!("{}.deb", pkg.sha256));
    if deb.is_file() {
        return Ok(deb);
    }
    let tmp = scratch_name(&debs, ".download");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
    let result = (|| {
        run(
            Command::new("apt-get")
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .arg(format!("{}={}", pkg.package, pkg.version))
                .current_dir(&tmp),
            "is apt installed?",
        )?;
        let file = fs::read_dir(&tmp)
            .map_err(io_err("list", &tmp))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| KernelError::Failed {
                command: format!("apt-get download {}={}", pkg.package, pkg.version),
                tail: "it left no .deb file".into(),
            })?;
        let got = sha256_file(&file).map_err(io_err("read", &file))?;
        if got != pkg.sha256 {
            return Err(KernelError::Checksum {
                package: pkg.package.clone(),
                got,
                want: pkg.sha256.clone(),
            });
        }
        // Another download of the same file may have landed first: either will do.
        fs::rename(&file, &deb).map_err(io_err("store", &deb))
    })();
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| deb)
}

/// Unpack `deb` (of `pkg`) into the kernel cache, once.
pub fn extract(pkg: &KernelPackage, deb: &Path, cache: &Path) -> Result<Kernel, KernelError> {
    let kernels = cache.join("kernel");
    let dir = extracted_dir(cache, pkg);
    if let Some(kernel) = load(pkg, &dir) {
        return Ok(kernel);
    }
    let tmp = scratch_name(&kernels, ".extract");
    let _ = fs::remove_dir_all(&tmp);
    let tree = tmp.join("tree");
    let out = tmp.join("out");
    fs::create_dir_all(&tree).map_err(io_err("create", &tree))?;
    fs::create_dir_all(out.join("modules")).map_err(io_err("create", &out))?;
    let result = (|| {
        run(
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree),
            "is dpkg installed?",
        )?;
        let boot = tree.join("boot");
        let vmlinuz: Vec<PathBuf> = fs::read_dir(&boot)
            .map_err(io_err("list", &boot))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .collect();
        let [vmlinuz] = vmlinuz.as_slice() else {
            return Err(KernelError::Vmlinuz {
                found: vmlinuz.len(),
            });
        };
        let release = vmlinuz
            .file_name()
            .map(|n| n.to_string_lossy()["vmlinuz-".len()..].to_owned())
            .unwrap_or_default();
        let bz = fs::read(vmlinuz).map_err(io_err("read", vmlinuz))?;
        let elf = vmlinux_from_bzimage(&bz)?;
        let vmlinux = out.join("vmlinux");
        fs::write(&vmlinux, elf).map_err(io_err("write", &vmlinux))?;

        let moddir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| tree.join(d).join(&release))
            .find(|d| d.is_dir())
            .ok_or_else(|| KernelError::NoModules {
                release: release.clone(),
            })?;
        let modules = ModuleTree::scan(&moddir)?;
        let mut order_err = None;
        let order = modules.load_order(GUEST_MODULES, &mut |file: &Path| {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let stem = name.split(".ko").next().unwrap_or_default();
            let dest = out
                .join("modules")
                .join(format!("{}.ko", crate::modules::normalize(stem)));
            if let Err(e) = decompress_module(file, &dest) {
                order_err = Some(e);
                return Err(ModulesError::Missing { name: name.clone() });
            }
            read_modinfo(&dest)
        });
        let order = match (order, order_err) {
            (_, Some(e)) => return Err(e),
            (r, None) => r?,
        };
        let json = serde_json::to_vec_pretty(&KernelJson { release, order })
            .map_err(|e| io_err("encode", &out)(io::Error::other(e)))?;
        fs::write(out.join("kernel.json"), json).map_err(io_err("write", &out))?;
        // Another build may have finished the same extraction meanwhile: keep either.
        match fs::rename(&out, &dir) {
            Ok(()) => Ok(()),
            Err(_) if dir.join("kernel.json").is_file() => Ok(()),
            Err(e) => Err(io_err("store", &dir)(e)),
        }
    })();
    let _ = fs::remove_dir_all(&tmp);
    result?;
    load(pkg, &dir).ok_or_else(|| KernelError::Io {
        what: "read back",
        path: dir.clone(),
        source: io::Error::other("incomplete kernel cache entry"),
    })
}

/// Where [`extract`] keeps `pkg`'s kernel: `kernel/<deb sha256>-<layout>/` under
/// `cache`, `<layout>` naming what is extracted and which modules.
pub fn extracted_dir(cache: &Path, pkg: &KernelPackage) -> PathBuf {
    cache
        .join("kernel")
        .join(format!("{}-{}", pkg.sha256, layout_tag()))
}

fn layout_tag() -> String {
    sha256_hex(format!("{LAYOUT} {}", GUEST_MODULES.join(",")).as_bytes())[..12].to_owned()
}

/// Remove the cached kernels whose `.deb` SHA-256 is not in `keep` (`debs/<sha>.deb`,
/// `kernel/<sha>-<layout>/`), extractions of another layout, and what killed
/// downloads and extractions left behind.
/// Call under `locks/kernel.lock`: [`fetch`] and [`extract`] run under it, so no
/// scratch dir found here is in use. Best effort: what cannot be removed stays.
pub fn prune(cache: &Path, keep: &std::collections::BTreeSet<String>) {
    let layout = layout_tag();
    let stale = |file: &str, suffix: &str| {
        if file.starts_with(".download.") || file.starts_with(".extract.") {
            return true;
        }
        let (sha, other_layout) = match suffix {
            "" => match file.split_once('-') {
                Some((sha, tag)) => (sha, tag != layout),
                None => return false,
            },
            _ => match file.strip_suffix(suffix) {
                Some(sha) => (sha, false),
                None => return false,
            },
        };
        sha.len() == 64 && (other_layout || !keep.contains(sha))
    };
    for (sub, suffix) in [("debs", ".deb"), ("kernel", "")] {
        let dir = cache.join(sub);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if !stale(&file, suffix) {
                continue;
            }
            let path = entry.path();
            let _ = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
        }
    }
}

fn load(pkg: &KernelPackage, dir: &Path) -> Option<Kernel> {
    let json: KernelJson = serde_json::from_slice(&fs::read(dir.join("kernel.json")).ok()?).ok()?;
    let modules: Vec<PathBuf> = json
        .order
        .iter()
        .map(|n| dir.join("modules").join(format!("{n}.ko")))
        .collect();
    let vmlinux = dir.join("vmlinux");
    (vmlinux.is_file() && modules.iter().all(|m| m.is_file())).then(|| Kernel {
        package: pkg.clone(),
        release: json.release,
        vmlinux,
        modules,
    })
}

/// Copy a module, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` with the usual tools.
fn decompress_module(src: &Path, dest: &Path) -> Result<(), KernelError> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some(("xz", "install xz-utils"))
    } else if name.ends_with(".ko.zst") {
        Some(("zstd", "install zstd"))
    } else if name.ends_with(".ko.gz") {
        Some(("gzip", "install gzip"))
    } else {
        None
    };
    match tool {
        None => fs::copy(src, dest).map(drop).map_err(io_err("copy", src)),
        Some((tool, hint)) => {
            let out = fs::File::create(dest).map_err(io_err("create", dest))?;
            let status = Command::new(tool)
                .arg("-dc")
                .arg(src)
                .stdout(out)
                .stderr(Stdio::piped())
                .output()
                .map_err(|source| KernelError::Spawn {
                    command: format!("{tool} -dc"),
                    hint,
                    source,
                })?;
            if status.status.success() {
                Ok(())
            } else {
                Err(KernelError::Failed {
                    command: format!("{tool} -dc {name}"),
                    tail: tail(&status.stderr),
                })
            }
        }
    }
}

/// The ELF kernel inside an x86 bzImage whose payload is a legacy lz4 frame.
///
/// The boot protocol header gives the payload's place: the protected-mode code starts
/// after `setup_sects + 1` sectors (0x1f1; 0 means 4), and `payload_offset`/
/// `payload_length` (0x248/0x24c, protocol ≥ 2.08) locate the compressed kernel inside
/// it. The kernel's build appends the uncompressed size (4 bytes) after the frame.
pub fn vmlinux_from_bzimage(bz: &[u8]) -> Result<Vec<u8>, KernelError> {
    let bad = |why: String| KernelError::BzImage(why);
    let get = |off: usize, len: usize| {
        bz.get(off..off + len)
            .ok_or_else(|| bad(format!("file too short for the header field at {off:#x}")))
    };
    if get(0x202, 4)? != b"HdrS" {
        return Err(bad("not a bzImage (no HdrS boot header)".into()));
    }
    let version = u16::from_le_bytes([bz[0x206], bz[0x207]]);
    if version < 0x208 {
        return Err(bad(format!(
            "boot protocol {version:#x} has no payload fields"
        )));
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let le32 = |off: usize| -> Result<usize, KernelError> {
        let b = get(off, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let start = (setup_sects + 1) * 512 + le32(0x248)?;
    let payload = get(start, le32(0x24c)?)?;
    if payload.len() < 4 || payload[..4] != LZ4_LEGACY_MAGIC {
        let magic: Vec<String> = payload.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(bad(format!(
            "the payload is not a legacy lz4 frame (magic {}); only lz4-compressed kernels are supported",
            magic.join(" ")
        )));
    }
    let out = lz4_legacy_decompress(payload)?;
    if !out.starts_with(b"\x7fELF") {
        return Err(bad("the decompressed payload is not an ELF file".into()));
    }
    Ok(out)
}

/// Decode a legacy lz4 frame: magic, then blocks of (u32 LE compressed size, data),
/// each decompressing to at most 8 MiB on its own. A repeated magic starts another
/// frame; a last lone u32 is the kernel's appended size.
pub fn lz4_legacy_decompress(data: &[u8]) -> Result<Vec<u8>, KernelError> {
    let bad = |why: String| KernelError::BzImage(why);
    let mut out: Vec<u8> = Vec::new();
    let mut pos = 4;
    while pos + 4 <= data.len() {
        let word = [data[pos], data[pos + 1], data[pos + 2], data[pos + 3]];
        if word == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        let size = u32::from_le_bytes(word) as usize;
        let rest = data.len() - pos - 4;
        if size > rest {
            if rest == 0 {
                // The appended uncompressed size.
                if size != out.len() {
                    return Err(bad(format!(
                        "decompressed {} bytes, the trailer says {size}",
                        out.len()
                    )));
                }
                break;
            }
            return Err(bad(format!("block at {pos} runs past the payload")));
        }
        let block = &data[pos + 4..pos + 4 + size];
        let at = out.len();
        out.resize(at + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[at..])
            .map_err(|e| bad(format!("block at {pos}: {e}")))?;
        out.truncate(at + n);
        pos += 4 + size;
    }
    Ok(out)
}

/// Writes a legacy lz4 frame, the format [`lz4_legacy_decompress`] reads, `lz4 -l`
/// writes and the kernel unpacks as a compressed initramfs (`CONFIG_RD_LZ4`): the
/// magic, then each 8 MiB of input as one block (u32 LE compressed size, data), the
/// last one shorter. No trailer: the kernel reads blocks until the initrd ends and
/// would take an appended size for one more block. Holds one block of input and one
/// of output, whatever the total.
pub struct Lz4LegacyWriter<W: Write> {
    inner: W,
    /// Input not yet compressed: less than a block, except while being written out.
    block: Vec<u8>,
    compressed: Vec<u8>,
}

impl<W: Write> Lz4LegacyWriter<W> {
    /// Writes the magic to `inner`.
    pub fn new(mut inner: W) -> io::Result<Self> {
        inner.write_all(&LZ4_LEGACY_MAGIC)?;
        Ok(Self {
            inner,
            block: Vec::with_capacity(LZ4_LEGACY_BLOCK),
            compressed: Vec::new(),
        })
    }

    /// Compress what is left into the last block, flush, and return the sink.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.block.is_empty() {
            self.write_block()?;
        }
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn write_block(&mut self) -> io::Result<()> {
        self.compressed.resize(
            lz4_flex::block::get_maximum_output_size(self.block.len()),
            0,
        );
        let n = lz4_flex::block::compress_into(&self.block, &mut self.compressed)
            .map_err(io::Error::other)?;
        // At most ~9 MiB (8 MiB plus lz4's worst-case growth), far from u32::MAX.
        let size = u32::try_from(n).map_err(io::Error::other)?;
        self.inner.write_all(&size.to_le_bytes())?;
        self.inner.write_all(&self.compressed[..n])?;
        self.block.clear();
        Ok(())
    }
}

impl<W: Write> Write for Lz4LegacyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(LZ4_LEGACY_BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == LZ4_LEGACY_BLOCK {
            self.write_block()?;
        }
        Ok(n)
    }

    /// Flushes the sink only: a block is written when full or at [`Self::finish`], as
    /// a short block anywhere but last would only cost space.
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `data` as a legacy lz4 frame, with the uncompressed size appended the way the
    /// kernel's build appends it to a bzImage's payload when `trailer`.
    fn legacy_frame(data: &[u8], trailer: bool) -> Vec<u8> {
        let mut w = Lz4LegacyWriter::new(Vec::new()).expect("magic");
        w.write_all(data).expect("compress");
        let mut frame = w.finish().expect("last block");
        if trailer {
            frame.extend_from_slice(&(data.len() as u32).to_le_bytes());
        }
        frame
    }

    /// The blocks of a frame `legacy_frame` made: (compressed, decompressed) sizes.
    fn blocks(frame: &[u8]) -> Vec<(usize, usize)> {
        assert_eq!(frame[..4], LZ4_LEGACY_MAGIC);
        let mut pos = 4;
        let mut out = Vec::new();
        while pos < frame.len() {
            let size = u32::from_le_bytes(frame[pos..pos + 4].try_into().expect("4")) as usize;
            let block = &frame[pos + 4..pos + 4 + size];
            let mut buf = vec![0; LZ4_LEGACY_BLOCK];
            let n = lz4_flex::block::decompress_into(block, &mut buf).expect("a block");
            out.push((size, n));
            pos += 4 + size;
        }
        out
    }

    #[test]
    fn legacy_frame_blocks_and_trailer() {
        let a: Vec<u8> = (0..LZ4_LEGACY_BLOCK).map(|i| (i % 251) as u8).collect();
        let b = b"\x7fELF and the rest".to_vec();
        let frame = legacy_frame(&[&a[..], &b].concat(), true);
        let out = lz4_legacy_decompress(&frame).expect("decompress");
        assert_eq!(out.len(), a.len() + b.len());
        assert_eq!(&out[..a.len()], &a[..]);
        assert_eq!(&out[a.len()..], &b[..]);
        assert!(lz4_legacy_decompress(&legacy_frame(&b, false)).is_ok());
        let mut short = legacy_frame(&a, false);
        short.truncate(short.len() - 10);
        assert!(lz4_legacy_decompress(&short).is_err());
    }

    /// Compressible and incompressible bytes (xorshift), 2.5 blocks.
    fn sample() -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..LZ4_LEGACY_BLOCK * 5 / 2)
            .map(|i| {
                if (i / 65536) % 2 == 0 {
                    (i % 251) as u8
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn writer_cuts_8_mib_blocks_whatever_the_writes() {
        let data = sample();
        let mut w = Lz4LegacyWriter::new(Vec::new()).expect("magic");
        for chunk in data.chunks(1_000_003) {
            w.write_all(chunk).expect("write");
            w.flush().expect("flush");
        }
        let frame = w.finish().expect("finish");
        let sizes: Vec<usize> = blocks(&frame).iter().map(|b| b.1).collect();
        assert_eq!(
            sizes,
            [LZ4_LEGACY_BLOCK, LZ4_LEGACY_BLOCK, LZ4_LEGACY_BLOCK / 2]
        );
        assert!(frame.len() < data.len(), "half the sample compresses");
        assert!(lz4_legacy_decompress(&frame).expect("decompress") == data);

        let empty = Lz4LegacyWriter::new(Vec::new()).expect("magic").finish();
        assert_eq!(empty.expect("finish"), LZ4_LEGACY_MAGIC);
    }

    /// The reference decoder agrees (skipped without the `lz4` command).
    #[test]
    fn lz4_command_reads_what_the_writer_wrote() {
        let data = sample();
        let frame = legacy_frame(&data, false);
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("x.lz4");
        fs::write(&path, &frame).expect("write");
        let out = match Command::new("lz4").arg("-dc").arg(&path).output() {
            Ok(out) => out,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                eprintln!("skipped: no lz4 command");
                return;
            }
            Err(e) => panic!("lz4 -dc: {e}"),
        };
        assert!(out.status.success(), "lz4 -dc: {}", tail(&out.stderr));
        assert!(out.stdout == data, "lz4 -dc gave other bytes");
    }

    #[test]
    fn bzimage_header_is_checked() {
        let mut bz = vec![0u8; 0x1000];
        assert!(matches!(
            vmlinux_from_bzimage(&bz),
            Err(KernelError::BzImage(_))
        ));
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206] = 0x0f;
        bz[0x207] = 0x02;
        bz[0x1f1] = 1; // protected-mode code at 1024
        let frame = legacy_frame(b"\x7fELF-ish kernel image", true);
        bz[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        bz[1024 + 16..1024 + 16 + frame.len()].copy_from_slice(&frame);
        assert_eq!(
            vmlinux_from_bzimage(&bz).expect("vmlinux"),
            b"\x7fELF-ish kernel image"
        );
        bz[1024 + 16] = 0x1f; // gzip, say
        assert!(vmlinux_from_bzimage(&bz).is_err());
    }

    #[test]
    fn prune_keeps_only_kernels_in_use() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cache = tmp.path();
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let tag = layout_tag();
        for dir in [
            format!("kernel/{a}-{tag}/modules"),
            format!("kernel/{b}-{tag}/modules"),
            format!("kernel/{a}-0123456789ab"),
            "kernel/.extract.1.0/tree".into(),
            "debs/.download.1.0".into(),
        ] {
            fs::create_dir_all(cache.join(dir)).expect("mkdir");
        }
        for file in [
            format!("debs/{a}.deb"),
            format!("debs/{b}.deb"),
            "debs/notes.txt".into(),
        ] {
            fs::write(cache.join(file), "x").expect("write");
        }
        prune(cache, &[a.clone()].into());
        let list = |sub: &str| {
            let mut names: Vec<String> = fs::read_dir(cache.join(sub))
                .expect("list")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(list("kernel"), [format!("{a}-{tag}")]);
        assert_eq!(list("debs"), [format!("{a}.deb"), "notes.txt".into()]);
    }

    #[test]
    fn stderr_tail_is_one_line() {
        assert_eq!(
            tail(
                b"W: Download is performed unsandboxed as root\nE: Unable to locate package x\n\n"
            ),
            "E: Unable to locate package x"
        );
        assert_eq!(tail(b""), "no error output");
    }
}

//! `images/<name>/manifest.json`: what an image is made of, written last, so an
//! image dir without it (or with missing files) is never taken as valid.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const MANIFEST: &str = "manifest.json";
pub const VMLINUX: &str = "vmlinux";
pub const INITRAMFS: &str = "initramfs.cpio";
pub const ROOTFS: &str = "rootfs.ext4";
/// The version of this layout; readers refuse other values.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    /// SHA-256 over every input (see `docs/design/microvm-image.md`); equal inputs →
    /// the build is skipped.
    pub input_sha256: String,
    pub created_unix: u64,
    pub kernel: KernelInfo,
    pub init: InitInfo,
    pub source: SourceInfo,
    pub artifacts: Artifacts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub package: String,
    pub version: String,
    pub deb_sha256: String,
    /// `uname -r` in the guest; also `/etc/berth/kernel-release` in the initramfs.
    pub release: String,
    /// Module files under `/lib/modules/berth/` in load order (= the `order` file).
    pub modules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitInfo {
    /// The program copied to `/init` (the berth binary that ran the build).
    pub source: PathBuf,
    pub sha256: String,
    /// Whether debug sections were removed from the copy.
    pub stripped: bool,
    /// Shared libraries copied into the initramfs, at these paths.
    pub libraries: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// `host` or `dir`.
    pub kind: String,
    /// `/` for host, else the directory.
    pub path: PathBuf,
    pub excluded: Vec<String>,
    pub masked: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifacts {
    pub vmlinux: Artifact,
    pub initramfs: Artifact,
    pub rootfs: Artifact,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Relative to the manifest's directory.
    pub path: String,
    pub sha256: String,
    pub size: u64,
    /// `elf` (vmlinux), `cpio-newc` (uncompressed initramfs), `ext4` (rootfs).
    pub format: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("no image at {dir} (build it with `berth image build`)")]
    Missing { dir: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid image manifest (rebuild it with `berth image build`)")]
    Invalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has format {found}, this berth reads {FORMAT} (rebuild it with `berth image build`)")]
    Format { path: PathBuf, found: u32 },
    #[error("image {dir} is incomplete: {file} is missing or has the wrong size (rebuild it with `berth image build`)")]
    Incomplete { dir: PathBuf, file: String },
}

/// A built image: its manifest and the absolute paths of its artifacts.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

impl Image {
    /// Open `<data_dir>/images/<name>`, checking that every artifact is there with
    /// its recorded size (hashes are not re-read: that would read gigabytes).
    pub fn open(data_dir: &Path, name: &str) -> Result<Self, ManifestError> {
        Self::open_dir(&data_dir.join("images").join(name))
    }

    pub fn open_dir(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(MANIFEST);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing { dir: dir.into() })
            }
            Err(source) => return Err(ManifestError::Read { path, source }),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| ManifestError::Invalid {
                path: path.clone(),
                source,
            })?;
        if manifest.format != FORMAT {
            return Err(ManifestError::Format {
                path,
                found: manifest.format,
            });
        }
        let a = &manifest.artifacts;
        for art in [&a.vmlinux, &a.initramfs, &a.rootfs] {
            let ok = !art.path.contains('/')
                && fs::metadata(dir.join(&art.path))
                    .is_ok_and(|m| m.is_file() && m.len() == art.size);
            if !ok {
                return Err(ManifestError::Incomplete {
                    dir: dir.into(),
                    file: art.path.clone(),
                });
            }
        }
        Ok(Self {
            dir: dir.into(),
            vmlinux: dir.join(&a.vmlinux.path),
            initramfs: dir.join(&a.initramfs.path),
            rootfs: dir.join(&a.rootfs.path),
            manifest,
        })
    }
}

//! `images/<name>/manifest.json`: what an image is made of, written last, so an
//! image dir without it (or with missing files) is never taken as valid. Each
//! artifact records the hash of its own inputs, so a build remakes only the artifacts
//! whose inputs changed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const MANIFEST: &str = "manifest.json";
pub const VMLINUX: &str = "vmlinux";
/// lz4-compressed since `initramfs::LAYOUT` v2. A format-2 image from before names
/// `initramfs.cpio` (uncompressed) in its manifest: it still opens, and the next build
/// remakes only that artifact, as its input hash no longer matches.
pub const INITRAMFS: &str = "initramfs.cpio.lz4";
pub const ROOTFS: &str = "rootfs.ext4";
/// The version of this layout; readers refuse other values. 2: an input hash per
/// artifact (1 had one for the whole image).
pub const FORMAT: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    /// When this manifest was written (an artifact may be older: see
    /// [`Artifact::input_sha256`]).
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
    /// SHA-256 over this artifact's inputs (see `docs/design/microvm-image.md`): a
    /// build whose inputs for it hash the same keeps this very file (a hard link into
    /// the new image) instead of making it again.
    pub input_sha256: String,
    /// SHA-256 of the file.
    pub sha256: String,
    pub size: u64,
    /// `elf` (vmlinux), `cpio-newc-lz4` (the initramfs: a newc cpio in a legacy lz4
    /// frame; `cpio-newc`, uncompressed, before `initramfs::LAYOUT` v2), `ext4`
    /// (rootfs).
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
        // The version first: another format's fields are not this one's.
        #[derive(Deserialize)]
        struct Versioned {
            format: u32,
        }
        let invalid = |source| ManifestError::Invalid {
            path: path.clone(),
            source,
        };
        let found = serde_json::from_slice::<Versioned>(&bytes)
            .map_err(invalid)?
            .format;
        if found != FORMAT {
            return Err(ManifestError::Format { path, found });
        }
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(invalid)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest as berth wrote it before artifacts had their own input hashes.
    const FORMAT_1: &str = r#"{
      "format": 1, "name": "host", "input_sha256": "ab", "created_unix": 1,
      "kernel": { "package": "p", "version": "v", "deb_sha256": "d", "release": "r",
                  "modules": [] },
      "init": { "source": "/b", "sha256": "s", "stripped": true, "libraries": [] },
      "source": { "kind": "host", "path": "/", "excluded": [], "masked": [] },
      "artifacts": {
        "vmlinux": { "path": "vmlinux", "sha256": "x", "size": 1, "format": "elf" },
        "initramfs": { "path": "initramfs.cpio", "sha256": "x", "size": 1, "format": "cpio-newc" },
        "rootfs": { "path": "rootfs.ext4", "sha256": "x", "size": 1, "format": "ext4" }
      }
    }"#;

    #[test]
    fn older_format_asks_for_a_rebuild() {
        let tmp = tempfile::tempdir().expect("tmp");
        fs::write(tmp.path().join(MANIFEST), FORMAT_1).expect("write");
        for f in [VMLINUX, INITRAMFS, ROOTFS] {
            fs::write(tmp.path().join(f), "x").expect("write");
        }
        let err = Image::open_dir(tmp.path()).expect_err("format 1 must be refused");
        assert!(
            matches!(err, ManifestError::Format { found: 1, .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("rebuild it with `berth image build`"),
            "{text}"
        );
    }

    #[test]
    fn garbage_is_invalid_not_a_panic() {
        let tmp = tempfile::tempdir().expect("tmp");
        for bad in ["", "{", r#"{"format": "two"}"#, r#"{"format": 2}"#] {
            fs::write(tmp.path().join(MANIFEST), bad).expect("write");
            let err = Image::open_dir(tmp.path()).expect_err("invalid");
            assert!(
                matches!(err, ManifestError::Invalid { .. }),
                "{bad}: {err:?}"
            );
        }
    }
}

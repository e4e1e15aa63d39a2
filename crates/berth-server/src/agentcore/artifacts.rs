//! Code-zip artifacts (`agentRuntimeArtifact.codeConfiguration`): fetch the zip from
//! S3-compatible object storage, unpack it safely, and check that the base image has the
//! requested managed runtime.
//!
//! The object store is the `object_store` crate's local-filesystem backend, one directory
//! per bucket: `s3://<bucket>/<key>` is the file `<object-store-dir>/<bucket>/<key>`
//! (`berth server --object-store DIR`, default `<data-dir>/buckets`). A version's code is
//! unpacked into `<data-dir>/agentcore/code/<agentRuntimeId>/<version>/`.
//!
//! Unpacking refuses absolute names, names that climb out with `..`, symbolic links whose
//! target leaves the code directory (links are created after every file, so no entry is
//! ever written through one), and archives over [`Limits`]; modes keep only the
//! executable bit.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::ObjectStoreExt;

use super::model::CodeConfiguration;

/// AWS's limits for direct code deployment: 250 MB zipped, 750 MB unzipped.
pub const MAX_ZIP_BYTES: u64 = 250 << 20;
pub const MAX_UNPACKED_BYTES: u64 = 750 << 20;
pub const MAX_ENTRIES: usize = 100_000;
/// Longest symbolic link target read from an archive.
const MAX_LINK_TARGET: u64 = 4096;
/// How long `node --version` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub zip_bytes: u64,
    pub unpacked_bytes: u64,
    pub entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            zip_bytes: MAX_ZIP_BYTES,
            unpacked_bytes: MAX_UNPACKED_BYTES,
            entries: MAX_ENTRIES,
        }
    }
}

/// Why a code artifact could not be prepared. The `Display` text (with its sources) is
/// the version's `failureReason`, except for local I/O failures, which are logged.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("bucket {bucket:?} does not exist in Berth's object store")]
    NoBucket { bucket: String },
    #[error("object s3://{bucket}/{key} does not exist in Berth's object store")]
    NoObject { bucket: String, key: String },
    #[error("s3://{bucket}/{key} is not a valid object key")]
    InvalidKey { bucket: String, key: String },
    #[error("cannot read s3://{bucket}/{key}")]
    Read {
        bucket: String,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("s3://{bucket}/{key} is larger than {limit} bytes, the limit for a code zip")]
    ZipTooLarge {
        bucket: String,
        key: String,
        limit: u64,
    },
    #[error("the code zip is not a valid zip archive")]
    BadZip(#[source] zip::result::ZipError),
    #[error("the code zip has more than {limit} entries")]
    TooManyEntries { limit: usize },
    #[error("the code zip unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the code zip entry {name:?} {why}")]
    UnsafeEntry { name: String, why: &'static str },
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ArtifactError {
    /// The text for `failureReason`: the error and its causes; local I/O failures are
    /// logged and reported without host paths.
    pub fn reason(&self) -> String {
        if let ArtifactError::Io { .. } = self {
            tracing::error!(error = ?self, "agentcore: preparing a code artifact failed");
            return "the server could not store the unpacked code; see the Berth server log"
                .to_string();
        }
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError {
    let path = path.to_path_buf();
    move |source| ArtifactError::Io { op, path, source }
}

/// The local-directory object store.
#[derive(Debug, Clone)]
pub struct ObjectSource {
    root: PathBuf,
}

impl ObjectSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Copy `s3://bucket/key` to the file `dest`; returns its size. `bucket` matches the
    /// model's bucket pattern, so it names one directory under the root.
    pub async fn download(
        &self,
        bucket: &str,
        key: &str,
        dest: &Path,
        limit: u64,
    ) -> Result<u64, ArtifactError> {
        let dir = self.root.join(bucket);
        if bucket.contains('/') || bucket.starts_with('.') || !dir.is_dir() {
            return Err(ArtifactError::NoBucket {
                bucket: bucket.into(),
            });
        }
        let read_err = |source| ArtifactError::Read {
            bucket: bucket.into(),
            key: key.into(),
            source,
        };
        let store = LocalFileSystem::new_with_prefix(&dir).map_err(read_err)?;
        let location =
            object_store::path::Path::parse(key).map_err(|_| ArtifactError::InvalidKey {
                bucket: bucket.into(),
                key: key.into(),
            })?;
        let got = match store.get(&location).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ArtifactError::NoObject {
                    bucket: bucket.into(),
                    key: key.into(),
                })
            }
            Err(e) => return Err(read_err(e)),
        };
        let too_large = || ArtifactError::ZipTooLarge {
            bucket: bucket.into(),
            key: key.into(),
            limit,
        };
        if got.meta.size > limit {
            return Err(too_large());
        }
        let mut out = tokio::fs::File::create(dest)
            .await
            .map_err(io("create", dest))?;
        let mut stream = got.into_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(read_err)?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(too_large());
            }
            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk)
                .await
                .map_err(io("write", dest))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut out)
            .await
            .map_err(io("write", dest))?;
        Ok(total)
    }
}

/// A relative path with `.` dropped and `..` resolved, or `None` when it is absolute,
/// empty of components, contains NUL, or climbs above its start.
fn clean_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => {
                if s.as_encoded_bytes().contains(&0) {
                    return None;
                }
                out.push(s);
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// What [`unpack`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    pub files: usize,
    pub bytes: u64,
}

/// Unpack the zip at `zip_path` into the new directory `dest` (blocking).
pub fn unpack(zip_path: &Path, dest: &Path, limits: Limits) -> Result<Unpacked, ArtifactError> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::File::open(zip_path).map_err(io("open", zip_path))?;
    let mut archive = zip::ZipArchive::new(file).map_err(ArtifactError::BadZip)?;
    if archive.len() > limits.entries {
        return Err(ArtifactError::TooManyEntries {
            limit: limits.entries,
        });
    }
    std::fs::create_dir_all(dest).map_err(io("create", dest))?;
    let mut done = Unpacked { files: 0, bytes: 0 };
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(ArtifactError::BadZip)?;
        let name = entry.name().map_err(ArtifactError::BadZip)?.into_owned();
        let unsafe_entry = |why| ArtifactError::UnsafeEntry {
            name: name.clone(),
            why,
        };
        if name.starts_with('/') || name.starts_with('\\') {
            return Err(unsafe_entry("has an absolute path"));
        }
        let rel = clean_relative(Path::new(&name))
            .ok_or_else(|| unsafe_entry("leaves the code directory"))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(&rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&target).map_err(io("create", &target))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        }
        if entry.is_symlink() {
            let mut raw = Vec::new();
            (&mut entry)
                .take(MAX_LINK_TARGET + 1)
                .read_to_end(&mut raw)
                .map_err(|e| ArtifactError::BadZip(e.into()))?;
            let link = PathBuf::from(String::from_utf8_lossy(&raw).into_owned());
            let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
            if raw.len() as u64 > MAX_LINK_TARGET
                || link.is_absolute()
                || clean_relative(&parent.join(&link)).is_none()
            {
                return Err(unsafe_entry(
                    "is a symbolic link that points outside the code directory",
                ));
            }
            links.push((target, link));
            continue;
        }
        let remaining = limits.unpacked_bytes - done.bytes;
        let mut out = std::fs::File::create(&target).map_err(io("create", &target))?;
        let n = std::io::copy(&mut (&mut entry).take(remaining + 1), &mut out).map_err(|e| {
            // A read error is a corrupt archive; a write error is ours.
            if e.kind() == std::io::ErrorKind::InvalidData
                || e.kind() == std::io::ErrorKind::UnexpectedEof
            {
                ArtifactError::BadZip(e.into())
            } else {
                ArtifactError::Io {
                    op: "write",
                    path: target.clone(),
                    source: e,
                }
            }
        })?;
        out.flush().map_err(io("write", &target))?;
        done.bytes += n;
        if done.bytes > limits.unpacked_bytes {
            return Err(ArtifactError::TooLarge {
                limit: limits.unpacked_bytes,
            });
        }
        let executable = entry.unix_mode().is_some_and(|m| m & 0o111 != 0);
        let mode = if executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
            .map_err(io("chmod", &target))?;
        done.files += 1;
    }
    for (at, link) in links {
        if at.symlink_metadata().is_ok() {
            std::fs::remove_file(&at).map_err(io("replace", &at))?;
        }
        std::os::unix::fs::symlink(&link, &at).map_err(io("symlink", &at))?;
    }
    Ok(done)
}

/// `codeConfiguration.runtime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagedRuntime {
    Python { minor: u8 },
    Node22,
}

impl ManagedRuntime {
    pub fn parse(s: &str) -> Option<Self> {
        if s == "NODE_22" {
            return Some(Self::Node22);
        }
        let minor = s.strip_prefix("PYTHON_3_")?.parse().ok()?;
        Some(Self::Python { minor })
    }

    pub fn name(self) -> String {
        match self {
            Self::Python { minor } => format!("PYTHON_3_{minor}"),
            Self::Node22 => "NODE_22".into(),
        }
    }
}

/// What a runtime's sandboxes run on: where the managed runtimes come from.
pub trait BaseImage: Send + Sync {
    /// The interpreter for `runtime`, as a path inside the sandbox, or a failure reason
    /// saying what the image has instead (blocking: may run the interpreter).
    fn interpreter(&self, runtime: ManagedRuntime) -> Result<String, String>;
}

/// The `host` image: the host's `/usr`, which namespace sandboxes see read-only.
#[derive(Debug, Clone)]
pub struct HostImage {
    root: PathBuf,
}

impl Default for HostImage {
    fn default() -> Self {
        Self::at("/")
    }
}

impl HostImage {
    /// An image rooted at `root` (tests use a fake tree).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn host(&self, sandbox_path: &str) -> PathBuf {
        self.root.join(sandbox_path.trim_start_matches('/'))
    }

    /// The `python3.N` in `/usr/bin`, sorted by N.
    fn pythons(&self) -> Vec<String> {
        let mut found: Vec<(u32, String)> = std::fs::read_dir(self.host("/usr/bin"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let minor: u32 = name.strip_prefix("python3.")?.parse().ok()?;
                Some((minor, name))
            })
            .collect();
        found.sort();
        found.into_iter().map(|(_, n)| n).collect()
    }
}

impl BaseImage for HostImage {
    fn interpreter(&self, runtime: ManagedRuntime) -> Result<String, String> {
        match runtime {
            ManagedRuntime::Python { minor } => {
                let path = format!("/usr/bin/python3.{minor}");
                if self.host(&path).is_file() {
                    return Ok(path);
                }
                let has = self.pythons();
                let has = if has.is_empty() {
                    "no python3.x".to_string()
                } else {
                    has.join(", ")
                };
                Err(format!(
                    "{} is not available in the base image; it has {has}",
                    runtime.name()
                ))
            }
            ManagedRuntime::Node22 => {
                let mut seen = Vec::new();
                for path in ["/usr/bin/node", "/usr/local/bin/node"] {
                    let host = self.host(path);
                    if !host.is_file() {
                        continue;
                    }
                    let out = std::process::Command::new(&host)
                        .arg("--version")
                        .stdin(std::process::Stdio::null())
                        .output();
                    let version = match out {
                        Ok(o) if o.status.success() => {
                            String::from_utf8_lossy(&o.stdout).trim().to_string()
                        }
                        _ => "that does not run".to_string(),
                    };
                    if version.starts_with("v22.") {
                        return Ok(path.to_string());
                    }
                    seen.push(format!("node {version} ({path})"));
                }
                let has = if seen.is_empty() {
                    "no node".to_string()
                } else {
                    seen.join(", ")
                };
                Err(format!(
                    "NODE_22 is not available in the base image; it has {has}"
                ))
            }
        }
    }
}

/// Where version `version` of runtime `runtime_id` keeps its unpacked code.
pub fn code_dir(data_dir: &Path, runtime_id: &str, version: u32) -> PathBuf {
    runtime_code_root(data_dir, runtime_id).join(version.to_string())
}

/// The directory holding every version's code of a runtime.
pub fn runtime_code_root(data_dir: &Path, runtime_id: &str) -> PathBuf {
    data_dir.join("agentcore").join("code").join(runtime_id)
}

/// A prepared code artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedCode {
    /// The unpacked code on the host.
    pub dir: PathBuf,
    /// The managed runtime's interpreter inside the sandbox.
    pub interpreter: String,
}

/// Fetch, unpack and check a version's code; on failure, the `failureReason`.
pub async fn prepare(
    objects: &ObjectSource,
    image: Arc<dyn BaseImage>,
    data_dir: &Path,
    runtime_id: &str,
    version: u32,
    code: &CodeConfiguration,
    limits: Limits,
) -> Result<PreparedCode, String> {
    let s3 = code.code.as_ref().and_then(|c| c.s3.as_ref());
    let (Some(bucket), Some(key)) = (
        s3.and_then(|s| s.bucket.as_deref()),
        s3.and_then(|s| s.prefix.as_deref()),
    ) else {
        return Err("the code configuration names no S3 object".into());
    };
    let runtime = code
        .runtime
        .as_deref()
        .and_then(ManagedRuntime::parse)
        .ok_or("the code configuration names no known runtime")?;
    let root = runtime_code_root(data_dir, runtime_id);
    let zip = root.join(format!(".v{version}.zip"));
    let tmp = root.join(format!(".v{version}.tmp"));
    let dir = code_dir(data_dir, runtime_id, version);
    let result = async {
        std::fs::create_dir_all(&root)
            .map_err(io("create", &root))
            .map_err(|e| e.reason())?;
        remove_all(&tmp);
        remove_all(&dir);
        objects
            .download(bucket, key, &zip, limits.zip_bytes)
            .await
            .map_err(|e| e.reason())?;
        let (zip2, tmp2) = (zip.clone(), tmp.clone());
        tokio::task::spawn_blocking(move || unpack(&zip2, &tmp2, limits))
            .await
            .map_err(|_| "unpacking the code zip panicked; see the Berth server log".to_string())?
            .map_err(|e| e.reason())?;
        if let Some(file) = code.entry_point.iter().flatten().last().filter(|f| {
            [".py", ".js", ".mjs", ".cjs"]
                .iter()
                .any(|x| f.ends_with(x))
        }) {
            let found = clean_relative(Path::new(file)).is_some_and(|rel| tmp.join(rel).is_file());
            if !found {
                return Err(format!(
                    "entryPoint {file} is not a file in the code zip s3://{bucket}/{key}"
                ));
            }
        }
        let probe = tokio::task::spawn_blocking(move || image.interpreter(runtime));
        let interpreter = tokio::time::timeout(PROBE_TIMEOUT, probe)
            .await
            .map_err(|_| format!("checking the base image for {} timed out", runtime.name()))?
            .map_err(|_| {
                "checking the base image panicked; see the Berth server log".to_string()
            })??;
        std::fs::rename(&tmp, &dir)
            .map_err(io("rename", &tmp))
            .map_err(|e| e.reason())?;
        Ok(PreparedCode {
            dir: dir.clone(),
            interpreter,
        })
    }
    .await;
    let _ = std::fs::remove_file(&zip);
    if result.is_err() {
        remove_all(&tmp);
    }
    result
}

/// Remove a file or directory tree if it exists.
pub fn remove_all(path: &Path) {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => {
            if let Err(e) = std::fs::remove_dir_all(path) {
                tracing::warn!(path = %path.display(), error = %e, "agentcore: cannot remove");
            }
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use zip::write::SimpleFileOptions;

    /// A zip of (name, contents, unix mode) entries; `None` contents make a symlink whose
    /// target is the mode string.
    pub(crate) fn zip_bytes(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, data, mode) in entries {
            let opts = SimpleFileOptions::default().unix_permissions(*mode);
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn write_zip(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("code.zip");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn unpacks_files_and_keeps_the_executable_bit() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let z = write_zip(
            tmp.path(),
            &zip_bytes(&[
                ("main.py", b"print('hi')\n", 0o644),
                ("bin/tool", b"#!/bin/sh\n", 0o4755),
                ("./pkg/./mod.py", b"x = 1\n", 0o600),
            ]),
        );
        let dest = tmp.path().join("out");
        let done = unpack(&z, &dest, Limits::default()).unwrap();
        assert_eq!(done.files, 3);
        assert_eq!(
            std::fs::read_to_string(dest.join("main.py")).unwrap(),
            "print('hi')\n"
        );
        let mode = |p: &str| {
            std::fs::metadata(dest.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("bin/tool"), 0o755);
        assert_eq!(mode("pkg/mod.py"), 0o644);
    }

    #[test]
    fn refuses_names_that_leave_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        for name in ["../evil.py", "a/../../evil.py", "/etc/evil"] {
            let z = write_zip(tmp.path(), &zip_bytes(&[(name, b"x", 0o644)]));
            let dest = tmp.path().join("out");
            remove_all(&dest);
            let err = unpack(&z, &dest, Limits::default()).unwrap_err();
            assert!(
                matches!(err, ArtifactError::UnsafeEntry { .. }),
                "{name}: {err:?}"
            );
        }
        assert!(!tmp.path().join("evil.py").exists());
    }

    #[test]
    fn symlinks_must_stay_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let link = |name: &str, target: &str| {
            let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
            w.start_file("lib/real.py", SimpleFileOptions::default())
                .unwrap();
            w.write_all(b"x").unwrap();
            w.add_symlink(name, target, SimpleFileOptions::default())
                .unwrap();
            w.finish().unwrap().into_inner()
        };
        let z = write_zip(tmp.path(), &link("lib/alias.py", "real.py"));
        let dest = tmp.path().join("ok");
        unpack(&z, &dest, Limits::default()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("lib/alias.py")).unwrap(),
            "x"
        );
        for target in ["/etc/passwd", "../../outside", "../.."] {
            let z = write_zip(tmp.path(), &link("lib/bad", target));
            let dest = tmp.path().join("bad");
            remove_all(&dest);
            let err = unpack(&z, &dest, Limits::default()).unwrap_err();
            assert!(matches!(err, ArtifactError::UnsafeEntry { .. }), "{target}");
        }
    }

    #[test]
    fn caps_size_and_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let big = vec![0u8; 10_000];
        let z = write_zip(
            tmp.path(),
            &zip_bytes(&[("a", &big, 0o644), ("b", &big, 0o644)]),
        );
        let limits = Limits {
            unpacked_bytes: 15_000,
            ..Limits::default()
        };
        let err = unpack(&z, &tmp.path().join("o1"), limits).unwrap_err();
        assert!(matches!(err, ArtifactError::TooLarge { limit: 15_000 }));
        let limits = Limits {
            entries: 1,
            ..Limits::default()
        };
        let err = unpack(&z, &tmp.path().join("o2"), limits).unwrap_err();
        assert!(matches!(err, ArtifactError::TooManyEntries { .. }));
        let not_zip = write_zip(tmp.path(), b"not a zip");
        let err = unpack(&not_zip, &tmp.path().join("o3"), Limits::default()).unwrap_err();
        assert!(err
            .reason()
            .starts_with("the code zip is not a valid zip archive: "));
    }

    #[tokio::test]
    async fn downloads_from_a_bucket_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let objects = ObjectSource::new(tmp.path().join("buckets"));
        std::fs::create_dir_all(tmp.path().join("buckets/agents/team")).unwrap();
        std::fs::write(tmp.path().join("buckets/agents/team/a.zip"), b"zipbytes").unwrap();
        let dest = tmp.path().join("dl");
        let n = objects
            .download("agents", "team/a.zip", &dest, 100)
            .await
            .unwrap();
        assert_eq!(n, 8);
        assert_eq!(std::fs::read(&dest).unwrap(), b"zipbytes");
        let err = objects
            .download("agents", "team/missing.zip", &dest, 100)
            .await
            .unwrap_err();
        assert_eq!(
            err.reason(),
            "object s3://agents/team/missing.zip does not exist in Berth's object store"
        );
        let err = objects
            .download("nope", "a.zip", &dest, 100)
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::NoBucket { .. }));
        let err = objects
            .download("agents", "team/a.zip", &dest, 4)
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::ZipTooLarge { .. }));
        let err = objects
            .download("agents", "team/../../x", &dest, 100)
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::InvalidKey { .. }));
    }

    #[test]
    fn managed_runtimes_come_from_the_base_image() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("python3.11"), b"").unwrap();
        std::fs::write(bin.join("python3.9"), b"").unwrap();
        let image = HostImage::at(tmp.path());
        assert_eq!(
            image.interpreter(ManagedRuntime::parse("PYTHON_3_11").unwrap()),
            Ok("/usr/bin/python3.11".into())
        );
        assert_eq!(
            image.interpreter(ManagedRuntime::parse("PYTHON_3_13").unwrap()),
            Err(
                "PYTHON_3_13 is not available in the base image; it has python3.9, python3.11"
                    .into()
            )
        );
        assert_eq!(
            image.interpreter(ManagedRuntime::Node22),
            Err("NODE_22 is not available in the base image; it has no node".into())
        );
        let node = bin.join("node");
        std::fs::write(&node, "#!/bin/sh\necho v20.1.0\n").unwrap();
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = image.interpreter(ManagedRuntime::Node22).unwrap_err();
        assert!(err.contains("it has node v20.1.0"), "{err}");
        std::fs::write(&node, "#!/bin/sh\necho v22.11.0\n").unwrap();
        assert_eq!(
            image.interpreter(ManagedRuntime::Node22),
            Ok("/usr/bin/node".into())
        );
        assert_eq!(ManagedRuntime::parse("PYTHON_2"), None);
    }

    /// Answers every runtime with a fixed interpreter.
    pub(crate) struct AnyImage;

    impl BaseImage for AnyImage {
        fn interpreter(&self, _: ManagedRuntime) -> Result<String, String> {
            Ok("/usr/bin/python3".into())
        }
    }

    #[tokio::test]
    async fn prepare_checks_the_entry_point_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let objects = ObjectSource::new(tmp.path().join("buckets"));
        std::fs::create_dir_all(tmp.path().join("buckets/b")).unwrap();
        std::fs::write(
            tmp.path().join("buckets/b/agent.zip"),
            zip_bytes(&[("main.py", b"print(1)\n", 0o644)]),
        )
        .unwrap();
        let code = |entry: &str| -> CodeConfiguration {
            serde_json::from_value(serde_json::json!({
                "code": {"s3": {"bucket": "b", "prefix": "agent.zip"}},
                "runtime": "PYTHON_3_11",
                "entryPoint": [entry],
            }))
            .unwrap()
        };
        let got = prepare(
            &objects,
            Arc::new(AnyImage),
            &data,
            "a-0123456789",
            1,
            &code("main.py"),
            Limits::default(),
        )
        .await
        .unwrap();
        assert_eq!(got.dir, code_dir(&data, "a-0123456789", 1));
        assert!(got.dir.join("main.py").is_file());
        let err = prepare(
            &objects,
            Arc::new(AnyImage),
            &data,
            "a-0123456789",
            2,
            &code("app.py"),
            Limits::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err,
            "entryPoint app.py is not a file in the code zip s3://b/agent.zip"
        );
        // Nothing is left of the failed version: only version 1's directory.
        let left: Vec<String> = std::fs::read_dir(runtime_code_root(&data, "a-0123456789"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["1"]);
    }
}

//! Applying image layers, in order, to one rootfs directory (the "naive" applier of the
//! OCI image spec's `layer.md`, as containerd's and Docker's are).
//!
//! - **Paths.** An entry's name must be relative and must not contain `..`: anything else
//!   fails the whole image. Every directory on the way to an entry is resolved inside the
//!   rootfs: a symlink there is followed as the sandbox would follow it (an absolute
//!   target starts again at the rootfs, `..` stops at it), never as the host would, so no
//!   entry is ever written outside the rootfs. The entry's own last component is never
//!   followed: whatever is there is replaced.
//! - **Whiteouts.** `.wh.<name>` removes `<name>` of a lower layer; `.wh..wh..opq` empties
//!   its directory of everything lower layers put there. Both only act on lower layers:
//!   what this layer itself wrote (and the directories leading to it) stays, whatever the
//!   order of the entries in the tar.
//! - **Links.** A hard link's target is an entry path, under the same rules, and must
//!   already exist (and not be a directory). A symlink is stored as it is: an absolute
//!   target is resolved by the sandbox inside its own root; a relative one whose `..`s
//!   climb above the rootfs is refused.
//! - **Metadata.** Permission bits are kept except setuid/setgid (the sandbox mounts the
//!   image `nosuid` anyway, and the cache must hold no set-id files on the host); file
//!   mtimes are kept (Python compares them with its `.pyc`s). Owners and xattrs are not:
//!   everything belongs to the server's user. Directory modes are applied at the end, so a
//!   read-only directory of one layer can still receive the next layer's files. Device
//!   nodes and FIFOs are skipped (sandboxes mount their own `/dev`).
//! - **Limits.** Entries and unpacked bytes are counted while reading, against [`Limits`].

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

/// Whiteout prefix and the opaque-directory marker (OCI image spec, `layer.md`).
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// Symlinks followed while resolving one path (Linux's `MAXSYMLINKS`).
const MAX_HOPS: u32 = 40;

/// What one image may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content over all layers.
    pub max_bytes: u64,
    /// Tar entries over all layers.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 32 << 30,
            max_entries: 2_000_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot read the layer")]
    Read(#[source] io::Error),
    #[error("entry {0:?} has an absolute path")]
    Absolute(PathBuf),
    #[error("entry {0:?} contains '..'")]
    DotDot(PathBuf),
    #[error("hard link {path:?} points outside the rootfs ({target:?})")]
    LinkEscape { path: PathBuf, target: PathBuf },
    #[error("hard link {path:?} points to {target:?}, which is missing or a directory")]
    LinkTarget { path: PathBuf, target: PathBuf },
    #[error("symlink {path:?} -> {target:?} climbs above the rootfs")]
    SymlinkEscape { path: PathBuf, target: PathBuf },
    #[error("too many levels of symbolic links in {0:?}")]
    SymlinkLoop(PathBuf),
    #[error("{0:?} is not a directory but an entry is below it")]
    NotADirectory(PathBuf),
    #[error("the image unpacks to more than {0} bytes")]
    TooLarge(u64),
    #[error("the image has more than {0} entries")]
    TooManyEntries(u64),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UnpackError {
    let path = path.to_path_buf();
    move |source| UnpackError::Io { what, path, source }
}

/// A layer's bytes as a tar stream: gzip and zstd are recognised by their magic numbers
/// (media types are not trusted: Docker's say gzip for every layer), anything else is
/// read as a plain tar.
pub fn decompress<'a>(mut layer: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match layer.read(&mut magic[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let head = io::Cursor::new(magic[..n].to_vec());
    let whole = head.chain(layer);
    Ok(match magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            ruzstd::decoding::StreamingDecoder::new(whole)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?,
        ),
        _ => Box::new(whole),
    })
}

/// The components of an entry name; `None` for the rootfs itself (`./`).
fn clean(name: &Path) -> Result<Option<Vec<OsString>>, UnpackError> {
    let mut out = Vec::new();
    for c in name.components() {
        match c {
            Component::Normal(s) => out.push(s.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => return Err(UnpackError::DotDot(name.to_path_buf())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::Absolute(name.to_path_buf()))
            }
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

fn rel_of(parts: &[OsString]) -> PathBuf {
    parts.iter().collect()
}

/// Unpacks layers into one rootfs; call [`Unpacker::apply`] per layer, lowest first, then
/// [`Unpacker::finish`].
#[derive(Debug)]
pub struct Unpacker {
    root: PathBuf,
    limits: Limits,
    /// Directory modes to apply at the end, by path relative to the root.
    dir_modes: BTreeMap<PathBuf, u32>,
    entries: u64,
    bytes: u64,
}

/// How a path resolved.
enum Resolved {
    /// An existing (or just created) directory, relative to the root, symlink-free.
    Dir(PathBuf),
    /// Some component does not exist (only when not creating).
    Missing,
}

impl Unpacker {
    /// Unpack into `root`, an existing empty directory.
    pub fn new(root: impl Into<PathBuf>, limits: Limits) -> Self {
        Self {
            root: root.into(),
            limits,
            dir_modes: BTreeMap::new(),
            entries: 0,
            bytes: 0,
        }
    }

    /// Bytes of file content unpacked so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Apply one layer (an uncompressed tar stream; see [`decompress`]).
    pub fn apply(&mut self, layer: impl Read) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(layer);
        // What this layer wrote, with every directory leading to it: whiteouts spare them.
        let mut ours: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries().map_err(UnpackError::Read)? {
            let mut entry = entry.map_err(UnpackError::Read)?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(UnpackError::TooManyEntries(self.limits.max_entries));
            }
            let name = entry.path().map_err(UnpackError::Read)?.into_owned();
            let Some(mut parts) = clean(&name)? else {
                continue;
            };
            let Some(file) = parts.pop() else { continue };
            let base = file.to_string_lossy();
            if let Some(hidden) = base.strip_prefix(WHITEOUT) {
                let Resolved::Dir(dir) = self.resolve_dir(&parts, false, &mut ours)? else {
                    continue;
                };
                if base == OPAQUE {
                    self.prune(&dir, &ours)?;
                } else {
                    let victim = dir.join(hidden);
                    if !ours.contains(&victim) {
                        self.remove(&victim)?;
                    }
                }
                continue;
            }
            let Resolved::Dir(dir) = self.resolve_dir(&parts, true, &mut ours)? else {
                continue;
            };
            let rel = dir.join(&file);
            let host = self.root.join(&rel);
            let header = entry.header();
            let mode = header.mode().unwrap_or(0o644);
            let mtime = header.mtime().ok();
            match header.entry_type() {
                tar::EntryType::Directory => {
                    match fs::symlink_metadata(&host) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            self.remove(&rel)?;
                            mkdir(&host)?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => mkdir(&host)?,
                        Err(e) => return Err(io_err("inspect", &host)(e)),
                    }
                    self.dir_modes.insert(rel.clone(), mode & 0o1777);
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    self.remove(&rel)?;
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&host)
                        .map_err(io_err("create", &host))?;
                    let budget = self.limits.max_bytes.saturating_sub(self.bytes);
                    let n = io::copy(&mut (&mut entry).take(budget.saturating_add(1)), &mut f)
                        .map_err(UnpackError::Read)?;
                    if n > budget {
                        return Err(UnpackError::TooLarge(self.limits.max_bytes));
                    }
                    self.bytes += n;
                    f.set_permissions(fs::Permissions::from_mode(mode & 0o777))
                        .map_err(io_err("chmod", &host))?;
                    if let Some(t) = mtime {
                        f.set_modified(UNIX_EPOCH + Duration::from_secs(t))
                            .map_err(io_err("set the mtime of", &host))?;
                    }
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(UnpackError::Read)?
                        .unwrap_or_default()
                        .into_owned();
                    check_symlink(&rel, &target)?;
                    self.remove(&rel)?;
                    std::os::unix::fs::symlink(&target, &host)
                        .map_err(io_err("create the symlink", &host))?;
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()
                        .map_err(UnpackError::Read)?
                        .unwrap_or_default()
                        .into_owned();
                    let source = self.link_source(&rel, &target, &mut ours)?;
                    if source == rel {
                        continue;
                    }
                    self.remove(&rel)?;
                    fs::hard_link(self.root.join(&source), &host)
                        .map_err(io_err("create the hard link", &host))?;
                }
                other => {
                    tracing::debug!(path = %rel.display(), kind = ?other, "skipping a layer entry");
                    continue;
                }
            }
            mark(&mut ours, &rel);
        }
        Ok(())
    }

    /// Apply the directory modes; the rootfs itself is 0755.
    pub fn finish(self) -> Result<(), UnpackError> {
        for (rel, mode) in &self.dir_modes {
            let host = self.root.join(rel);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => {
                    fs::set_permissions(&host, fs::Permissions::from_mode(*mode))
                        .map_err(io_err("chmod", &host))?
                }
                _ => {}
            }
        }
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod", &self.root))
    }

    /// Resolve the directories `parts` inside the root (see the module docs), creating
    /// missing ones when `create`.
    fn resolve_dir(
        &self,
        parts: &[OsString],
        create: bool,
        ours: &mut HashSet<PathBuf>,
    ) -> Result<Resolved, UnpackError> {
        let mut out: Vec<OsString> = Vec::new();
        let mut queue: VecDeque<OsString> = parts.iter().cloned().collect();
        let mut hops = 0;
        while let Some(c) = queue.pop_front() {
            if c == ".." {
                out.pop();
                continue;
            }
            out.push(c);
            let rel = rel_of(&out);
            let host = self.root.join(&rel);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(UnpackError::SymlinkLoop(rel_of(parts)));
                    }
                    let target = fs::read_link(&host).map_err(io_err("read the symlink", &host))?;
                    out.pop();
                    if target.is_absolute() {
                        out.clear();
                    }
                    for c in target.components().rev() {
                        match c {
                            Component::Normal(s) => queue.push_front(s.to_os_string()),
                            Component::ParentDir => queue.push_front("..".into()),
                            _ => {}
                        }
                    }
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(UnpackError::NotADirectory(rel)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(Resolved::Missing);
                    }
                    mkdir(&host)?;
                    mark(ours, &rel);
                }
                Err(e) => return Err(io_err("inspect", &host)(e)),
            }
        }
        Ok(Resolved::Dir(rel_of(&out)))
    }

    /// The existing entry a hard link at `rel` names.
    fn link_source(
        &self,
        rel: &Path,
        target: &Path,
        ours: &mut HashSet<PathBuf>,
    ) -> Result<PathBuf, UnpackError> {
        let escape = || UnpackError::LinkEscape {
            path: rel.to_path_buf(),
            target: target.to_path_buf(),
        };
        let mut parts = match clean(target) {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => return Err(escape()),
        };
        let Some(file) = parts.pop() else {
            return Err(escape());
        };
        let missing = || UnpackError::LinkTarget {
            path: rel.to_path_buf(),
            target: target.to_path_buf(),
        };
        let Resolved::Dir(dir) = self.resolve_dir(&parts, false, ours)? else {
            return Err(missing());
        };
        let source = dir.join(file);
        match fs::symlink_metadata(self.root.join(&source)) {
            Ok(m) if !m.is_dir() => Ok(source),
            _ => Err(missing()),
        }
    }

    /// Remove `rel` (a file, link or whole directory) if it exists; never follows it.
    fn remove(&mut self, rel: &Path) -> Result<(), UnpackError> {
        let host = self.root.join(rel);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(&host).map_err(io_err("remove", &host))?;
                self.dir_modes.retain(|p, _| !p.starts_with(rel));
                Ok(())
            }
            Ok(_) => fs::remove_file(&host).map_err(io_err("remove", &host)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("inspect", &host)(e)),
        }
    }

    /// Empty `dir` of what lower layers put there (an opaque whiteout).
    fn prune(&mut self, dir: &Path, ours: &HashSet<PathBuf>) -> Result<(), UnpackError> {
        let host = self.root.join(dir);
        let mut children: Vec<OsString> = fs::read_dir(&host)
            .map_err(io_err("list", &host))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("list", &host))?;
        children.sort();
        for name in children {
            let rel = dir.join(&name);
            if !ours.contains(&rel) {
                self.remove(&rel)?;
                continue;
            }
            let is_dir = fs::symlink_metadata(self.root.join(&rel))
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if is_dir {
                self.prune(&rel, ours)?;
            }
        }
        Ok(())
    }
}

/// Record `rel` and every directory above it as written by this layer.
fn mark(ours: &mut HashSet<PathBuf>, rel: &Path) {
    for a in rel.ancestors() {
        if a.as_os_str().is_empty() || !ours.insert(a.to_path_buf()) {
            break;
        }
    }
}

fn mkdir(host: &Path) -> Result<(), UnpackError> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(host)
        .map_err(io_err("create", host))
}

/// A relative symlink target must not climb above the rootfs from where the link is.
fn check_symlink(rel: &Path, target: &Path) -> Result<(), UnpackError> {
    if target.as_os_str().is_empty() {
        return Err(UnpackError::SymlinkEscape {
            path: rel.to_path_buf(),
            target: target.to_path_buf(),
        });
    }
    if target.is_absolute() {
        return Ok(());
    }
    let mut depth = rel.components().count().saturating_sub(1);
    for c in target.components() {
        match c {
            Component::ParentDir if depth == 0 => {
                return Err(UnpackError::SymlinkEscape {
                    path: rel.to_path_buf(),
                    target: target.to_path_buf(),
                })
            }
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    Ok(())
}

/// Whether a name is a whiteout marker (for callers listing a layer).
pub fn is_whiteout(name: &OsStr) -> bool {
    name.to_string_lossy().starts_with(WHITEOUT)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A tar layer from (path, kind) entries.
    enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a str, u32),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Fifo(&'a str),
    }

    fn layer(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            match e {
                E::Dir(p, mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                E::File(p, body, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(body.len() as u64);
                    b.append_data(&mut h, p, body.as_bytes()).unwrap();
                }
                E::Sym(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, p, target).unwrap();
                }
                E::Hard(p, target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, p, target).unwrap();
                }
                E::Fifo(p) => {
                    h.set_entry_type(tar::EntryType::Fifo);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    /// Write raw names the tar builder would refuse (absolute, `..`).
    fn raw_layer(name: &str, kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
        let mut h = tar::Header::new_old();
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                old.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn unpack(layers: &[Vec<u8>]) -> (tempfile::TempDir, Result<(), UnpackError>) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        let mut u = Unpacker::new(&root, Limits::default());
        for l in layers {
            if let Err(e) = u.apply(&l[..]) {
                return (tmp, Err(e));
            }
        }
        let r = u.finish();
        (tmp, r)
    }

    fn read(tmp: &tempfile::TempDir, rel: &str) -> Option<String> {
        fs::read_to_string(tmp.path().join("rootfs").join(rel)).ok()
    }

    fn exists(tmp: &tempfile::TempDir, rel: &str) -> bool {
        fs::symlink_metadata(tmp.path().join("rootfs").join(rel)).is_ok()
    }

    #[test]
    fn later_layers_win_and_modes_are_kept() {
        let l1 = layer(&[
            E::Dir("etc/", 0o755),
            E::File("etc/motd", "one", 0o644),
            E::File("bin/tool", "#!x", 0o4755),
            E::Dir("ro/", 0o555),
        ]);
        let l2 = layer(&[
            E::File("etc/motd", "two", 0o600),
            E::File("ro/added", "later", 0o644),
        ]);
        let (tmp, r) = unpack(&[l1, l2]);
        r.unwrap();
        assert_eq!(read(&tmp, "etc/motd").as_deref(), Some("two"));
        let root = tmp.path().join("rootfs");
        let mode = |p: &str| fs::metadata(root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("etc/motd"), 0o600);
        // setuid is dropped; the read-only directory still took layer 2's file.
        assert_eq!(mode("bin/tool"), 0o755);
        assert_eq!(mode("ro"), 0o555);
        assert_eq!(read(&tmp, "ro/added").as_deref(), Some("later"));
        assert_eq!(mode(""), 0o755);
        let mtime = fs::metadata(root.join("etc/motd")).unwrap().mtime();
        assert_eq!(mtime, 1_700_000_000);
    }

    #[test]
    fn whiteouts_remove_lower_entries() {
        let l1 = layer(&[
            E::File("a/keep", "k", 0o644),
            E::File("a/gone", "g", 0o644),
            E::File("dir/x/y", "deep", 0o644),
            E::Fifo("a/fifo"),
        ]);
        let l2 = layer(&[
            E::File("a/.wh.gone", "", 0o644),
            E::File(".wh.dir", "", 0o644),
        ]);
        let (tmp, r) = unpack(&[l1, l2]);
        r.unwrap();
        assert!(exists(&tmp, "a/keep"));
        assert!(!exists(&tmp, "a/gone"));
        assert!(!exists(&tmp, "a/.wh.gone"));
        assert!(!exists(&tmp, "dir"));
        assert!(!exists(&tmp, "a/fifo"), "FIFOs are skipped");
        // A whiteout of something missing is fine.
        let l3 = layer(&[E::File("nothere/.wh.x", "", 0o644)]);
        let (_tmp, r) = unpack(&[l3]);
        r.unwrap();
    }

    #[test]
    fn a_whiteout_spares_what_its_own_layer_wrote() {
        let l1 = layer(&[E::File("d/f", "lower", 0o644)]);
        // Same layer: the new file first, then the whiteout of the same name.
        let l2 = layer(&[
            E::File("d/f", "upper", 0o644),
            E::File("d/.wh.f", "", 0o644),
        ]);
        let (tmp, r) = unpack(&[l1, l2]);
        r.unwrap();
        assert_eq!(read(&tmp, "d/f").as_deref(), Some("upper"));
    }

    #[test]
    fn opaque_directories_hide_lower_content_only() {
        let l1 = layer(&[
            E::File("opq/old", "o", 0o644),
            E::File("opq/sub/old", "o", 0o644),
            E::File("other/stay", "s", 0o644),
        ]);
        // The marker comes after this layer's own files in the same directory.
        let l2 = layer(&[
            E::File("opq/new", "n", 0o644),
            E::File("opq/sub/new", "n", 0o644),
            E::File("opq/.wh..wh..opq", "", 0o644),
        ]);
        let (tmp, r) = unpack(&[l1, l2]);
        r.unwrap();
        assert!(!exists(&tmp, "opq/old"));
        assert!(!exists(&tmp, "opq/sub/old"));
        assert_eq!(read(&tmp, "opq/new").as_deref(), Some("n"));
        assert_eq!(read(&tmp, "opq/sub/new").as_deref(), Some("n"));
        assert!(!exists(&tmp, "opq/.wh..wh..opq"));
        assert!(exists(&tmp, "other/stay"));
        // An opaque marker first, then new content: only the new content.
        let l3 = layer(&[
            E::Dir("other/", 0o755),
            E::File("other/.wh..wh..opq", "", 0o644),
        ]);
        let l4 = layer(&[E::File("other/fresh", "f", 0o644)]);
        let (tmp, r) = unpack(&[layer(&[E::File("other/stay", "s", 0o644)]), l3, l4]);
        r.unwrap();
        assert!(!exists(&tmp, "other/stay"));
        assert!(exists(&tmp, "other/fresh"));
    }

    #[test]
    fn type_changes_replace_the_lower_entry() {
        let l1 = layer(&[E::File("x/inner", "i", 0o644), E::File("f", "file", 0o644)]);
        let l2 = layer(&[E::File("x", "now a file", 0o644), E::Dir("f/", 0o700)]);
        let (tmp, r) = unpack(&[l1, l2]);
        r.unwrap();
        assert_eq!(read(&tmp, "x").as_deref(), Some("now a file"));
        assert!(tmp.path().join("rootfs/f").is_dir());
    }

    #[test]
    fn symlinks_are_followed_inside_the_rootfs_only() {
        let outside = tempfile::tempdir().unwrap();
        let out = outside.path().to_str().unwrap().to_string();
        // An absolute symlink to a host directory, then a file through it.
        let l1 = layer(&[
            E::Dir("usr/lib/", 0o755),
            E::Sym("lib", "/usr/lib"),
            E::Sym("evil", &out),
            E::Sym("up", "../../../.."),
        ]);
        let l2 = layer(&[
            E::File("lib/libx.so", "x", 0o644),
            E::File("evil/pwned", "p", 0o644),
        ]);
        let (tmp, r) = unpack(&[l1, l2]);
        // "up" climbs above the rootfs: refused.
        assert!(matches!(r, Err(UnpackError::SymlinkEscape { .. })), "{r:?}");
        let l1 = layer(&[
            E::Dir("usr/lib/", 0o755),
            E::Sym("lib", "/usr/lib"),
            E::Sym("evil", &out),
            E::Sym("rel", "usr/../usr/lib"),
        ]);
        let l2 = layer(&[
            E::File("lib/libx.so", "x", 0o644),
            E::File("evil/pwned", "p", 0o644),
            E::File("rel/librel.so", "r", 0o644),
        ]);
        let (tmp2, r) = unpack(&[l1, l2]);
        r.unwrap();
        drop(tmp);
        assert_eq!(read(&tmp2, "usr/lib/libx.so").as_deref(), Some("x"));
        assert_eq!(read(&tmp2, "usr/lib/librel.so").as_deref(), Some("r"));
        // The host directory was not touched; the file landed inside the rootfs.
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none());
        assert_eq!(
            read(&tmp2, &format!("{}/pwned", out.trim_start_matches('/'))).as_deref(),
            Some("p")
        );
        // The links themselves are kept as they were.
        assert_eq!(
            fs::read_link(tmp2.path().join("rootfs/lib")).unwrap(),
            Path::new("/usr/lib")
        );
    }

    #[test]
    fn symlink_loops_fail() {
        let l = layer(&[
            E::Sym("a", "b"),
            E::Sym("b", "a"),
            E::File("a/x", "x", 0o644),
        ]);
        let (_tmp, r) = unpack(&[l]);
        assert!(matches!(r, Err(UnpackError::SymlinkLoop(_))), "{r:?}");
    }

    #[test]
    fn whiteouts_through_symlinks_stay_inside() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), "v").unwrap();
        let out = outside.path().to_str().unwrap().to_string();
        let l1 = layer(&[E::Sym("h", &out)]);
        let l2 = layer(&[E::File("h/.wh.victim", "", 0o644)]);
        let (_tmp, r) = unpack(&[l1, l2]);
        r.unwrap();
        assert!(outside.path().join("victim").exists());
    }

    #[test]
    fn absolute_and_dotdot_names_are_refused() {
        let (_t, r) = unpack(&[raw_layer("/etc/passwd", tar::EntryType::Regular, None)]);
        assert!(matches!(r, Err(UnpackError::Absolute(_))), "{r:?}");
        let (_t, r) = unpack(&[raw_layer("a/../../x", tar::EntryType::Regular, None)]);
        assert!(matches!(r, Err(UnpackError::DotDot(_))), "{r:?}");
        let (_t, r) = unpack(&[raw_layer("l", tar::EntryType::Link, Some("../etc/passwd"))]);
        assert!(matches!(r, Err(UnpackError::LinkEscape { .. })), "{r:?}");
        let (_t, r) = unpack(&[raw_layer("l", tar::EntryType::Link, Some("/etc/passwd"))]);
        assert!(matches!(r, Err(UnpackError::LinkEscape { .. })), "{r:?}");
    }

    #[test]
    fn hard_links_point_at_earlier_entries() {
        let l1 = layer(&[E::File("bin/a", "same", 0o755)]);
        let l2 = layer(&[E::Hard("bin/b", "bin/a")]);
        let (tmp, r) = unpack(&[l1, l2]);
        r.unwrap();
        let root = tmp.path().join("rootfs");
        assert_eq!(
            fs::metadata(root.join("bin/a")).unwrap().ino(),
            fs::metadata(root.join("bin/b")).unwrap().ino()
        );
        let (_t, r) = unpack(&[layer(&[E::Hard("x", "missing")])]);
        assert!(matches!(r, Err(UnpackError::LinkTarget { .. })), "{r:?}");
        // A hard link to a host file through a symlink resolves inside the rootfs.
        let (_t, r) = unpack(&[layer(&[E::Sym("h", "/etc"), E::Hard("x", "h/passwd")])]);
        assert!(matches!(r, Err(UnpackError::LinkTarget { .. })), "{r:?}");
    }

    #[test]
    fn files_below_files_fail() {
        let (_t, r) = unpack(&[layer(&[
            E::File("f", "x", 0o644),
            E::File("f/g", "y", 0o644),
        ])]);
        assert!(matches!(r, Err(UnpackError::NotADirectory(_))), "{r:?}");
    }

    #[test]
    fn limits_are_counted_while_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let l = layer(&[E::File("a", "12345", 0o644), E::File("b", "67890", 0o644)]);
        let limits = Limits {
            max_bytes: 8,
            max_entries: 10,
        };
        let mut u = Unpacker::new(tmp.path(), limits);
        assert!(matches!(u.apply(&l[..]), Err(UnpackError::TooLarge(8))));
        let tmp = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_bytes: 100,
            max_entries: 1,
        };
        let mut u = Unpacker::new(tmp.path(), limits);
        assert!(matches!(
            u.apply(&l[..]),
            Err(UnpackError::TooManyEntries(1))
        ));
    }

    #[test]
    fn gzip_zstd_and_plain_layers_are_recognised() {
        use std::io::Write;
        let plain = layer(&[E::File("z", "zipped", 0o644)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = ruzstd::encoding::compress_to_vec(
            &plain[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert_eq!(&zst[..4], [0x28, 0xb5, 0x2f, 0xfd]);
        for bytes in [plain.clone(), gz, zst] {
            let tmp = tempfile::tempdir().unwrap();
            let mut u = Unpacker::new(tmp.path(), Limits::default());
            u.apply(decompress(&bytes[..]).unwrap()).unwrap();
            assert_eq!(fs::read_to_string(tmp.path().join("z")).unwrap(), "zipped");
        }
        assert!(is_whiteout(OsStr::new(".wh.x")));
        assert!(!is_whiteout(OsStr::new("x")));
    }
}

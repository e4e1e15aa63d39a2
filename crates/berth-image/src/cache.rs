//! Content hashes, a memo that spares rehashing unchanged files, atomic writes and
//! build locks.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// What identifies a file's version without reading it: replacing or rewriting a file
/// changes its inode or its ctime, which nothing but the kernel can set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Memoized {
    stamp: Stamp,
    sha256: String,
}

/// `cache/hashes.json`: path → (stamp, sha256), so a cached build does not read a
/// 250 MB debug binary again just to find that nothing changed.
pub struct HashMemo {
    path: PathBuf,
    entries: BTreeMap<PathBuf, Memoized>,
    dirty: bool,
}

impl HashMemo {
    pub fn load(path: &Path) -> Self {
        let entries = fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path: path.into(),
            entries,
            dirty: false,
        }
    }

    pub fn sha256(&mut self, file: &Path) -> io::Result<String> {
        let stamp = Stamp::of(&fs::metadata(file)?);
        if let Some(m) = self.entries.get(file) {
            if m.stamp == stamp {
                return Ok(m.sha256.clone());
            }
        }
        let sha256 = sha256_file(file)?;
        // A file that changed while being read gets hashed again next time.
        if Stamp::of(&fs::metadata(file)?) == stamp {
            self.entries.insert(
                file.into(),
                Memoized {
                    stamp,
                    sha256: sha256.clone(),
                },
            );
            self.dirty = true;
        }
        Ok(sha256)
    }

    /// Best effort: a memo that cannot be saved only costs time.
    pub fn save(&mut self) {
        if !self.dirty {
            return;
        }
        self.entries.retain(|p, _| p.exists());
        if let Ok(json) = serde_json::to_vec_pretty(&self.entries) {
            if write_atomic(&self.path, &json).is_ok() {
                self.dirty = false;
            }
        }
    }
}

/// A fresh name `<prefix>.<pid>.<n>` in `dir` for a scratch file or dir: unique within
/// this process (threads included) and across live processes.
pub fn scratch_name(dir: &Path, prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        "{prefix}.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Write `data` to `path` through a temp file in the same dir, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = scratch_name(dir, &format!(".{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)
}

/// An exclusive `flock` held until drop.
pub struct Lock {
    _lock: nix::fcntl::Flock<File>,
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

impl Lock {
    /// Take the lock at `path` (created if needed); `on_wait` is called once if another
    /// process holds it.
    pub fn acquire(path: &Path, on_wait: &dyn Fn()) -> io::Result<Self> {
        use nix::fcntl::{Flock, FlockArg};
        match Flock::lock(open_lock_file(path)?, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err((file, nix::Error::EWOULDBLOCK)) => {
                on_wait();
                Flock::lock(file, FlockArg::LockExclusive)
                    .map(|lock| Self { _lock: lock })
                    .map_err(|(_, e)| io::Error::from(e))
            }
            Err((_, e)) => Err(io::Error::from(e)),
        }
    }

    /// Take the lock at `path` if nobody holds it; None if somebody does.
    pub fn try_acquire(path: &Path) -> io::Result<Option<Self>> {
        use nix::fcntl::{Flock, FlockArg};
        match Flock::lock(open_lock_file(path)?, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(Self { _lock: lock })),
            Err((_, nix::Error::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io::Error::from(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_rehashes_only_changed_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let f = tmp.path().join("f");
        fs::write(&f, "one").expect("write");
        let memo_path = tmp.path().join("memo.json");
        let mut memo = HashMemo::load(&memo_path);
        let first = memo.sha256(&f).expect("hash");
        assert_eq!(first, sha256_hex(b"one"));
        memo.save();
        let mut memo = HashMemo::load(&memo_path);
        assert_eq!(memo.sha256(&f).expect("hash"), first);
        assert!(!memo.dirty, "unchanged file must come from the memo");
        fs::write(&f, "two").expect("write");
        assert_eq!(memo.sha256(&f).expect("hash"), sha256_hex(b"two"));
    }

    #[test]
    fn lock_is_exclusive() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("l");
        let held = Lock::acquire(&path, &|| panic!("free lock")).expect("lock");
        let waited = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                Lock::acquire(&path, &|| {
                    waited.store(true, std::sync::atomic::Ordering::SeqCst)
                })
                .expect("second")
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(held);
            drop(t.join().expect("join"));
        });
        assert!(waited.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn try_lock_does_not_wait() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("l");
        let held = Lock::try_acquire(&path).expect("lock").expect("free");
        assert!(Lock::try_acquire(&path).expect("lock").is_none());
        drop(held);
        assert!(Lock::try_acquire(&path).expect("lock").is_some());
    }
}

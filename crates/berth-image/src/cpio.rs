//! A `newc` (SVR4, no CRC) cpio writer, the format the kernel unpacks as initramfs.
//! Entries get mtime 0, uid/gid 0 and sequential inode numbers, so the same inputs
//! give the same bytes. Parent directories are emitted before their contents.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<PathBuf>,
}

struct Entry<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// A directory (missing parents get mode 0755).
    pub fn dir(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        let path = archive_path(path)?;
        self.parents_of(&path)?;
        if self.dirs.insert(path.clone()) {
            self.entry(&path, S_IFDIR | (mode & 0o7777), 2, 0, (0, 0))?;
        }
        Ok(())
    }

    /// A regular file of exactly `size` bytes read from `data`.
    pub fn file(
        &mut self,
        path: &Path,
        mode: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let path = archive_path(path)?;
        self.parents_of(&path)?;
        let size32 = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is over 4 GiB, more than newc can hold", path.display()),
            )
        })?;
        self.entry(&path, S_IFREG | (mode & 0o7777), 1, size32, (0, 0))?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        self.written += copied;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while being archived", path.display()),
            ));
        }
        self.pad()
    }

    /// A regular file from memory.
    pub fn bytes(&mut self, path: &Path, mode: u32, data: &[u8]) -> io::Result<()> {
        self.file(path, mode, data.len() as u64, &mut &data[..])
    }

    /// A character device node, e.g. `dev/console` = 5:1.
    pub fn char_device(
        &mut self,
        path: &Path,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let path = archive_path(path)?;
        self.parents_of(&path)?;
        self.entry(&path, S_IFCHR | (mode & 0o7777), 1, 0, (major, minor))
    }

    /// Write the trailer and return the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(
            &Entry {
                name: "TRAILER!!!",
                mode: 0,
                nlink: 1,
                size: 0,
                rdev: (0, 0),
            },
            0,
        )?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents_of(&mut self, path: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut at = path.parent();
        while let Some(dir) = at.filter(|d| !d.as_os_str().is_empty()) {
            if self.dirs.contains(dir) {
                break;
            }
            missing.push(dir.to_path_buf());
            at = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            self.dirs.insert(dir.clone());
            self.entry(&dir, S_IFDIR | 0o755, 2, 0, (0, 0))?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        path: &Path,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let name = path.to_str().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "archive paths must be UTF-8")
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(
            &Entry {
                name,
                mode,
                nlink,
                size,
                rdev,
            },
            ino,
        )
    }

    fn header(&mut self, e: &Entry<'_>, ino: u32) -> io::Result<()> {
        let namesize = e.name.len() + 1;
        let head = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            mode = e.mode,
            uid = 0,
            gid = 0,
            nlink = e.nlink,
            mtime = 0,
            size = e.size,
            maj = 0,
            min = 0,
            rmaj = e.rdev.0,
            rmin = e.rdev.1,
            check = 0,
        );
        self.out.write_all(head.as_bytes())?;
        self.out.write_all(e.name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (head.len() + namesize) as u64;
        self.pad()
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = ((4 - self.written % 4) % 4) as usize;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += pad as u64;
        Ok(())
    }
}

/// `/a/b` → `a/b`; refuses `..` and the root itself.
fn archive_path(path: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not a plain archive path", path.display()),
                ))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty archive path",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn archive() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir(Path::new("/dev"), 0o755).expect("dir");
        w.char_device(Path::new("/dev/console"), 0o600, 5, 1)
            .expect("console");
        w.bytes(
            Path::new("/lib/modules/berth/order"),
            0o644,
            b"a.ko\nb.ko\n",
        )
        .expect("order");
        w.bytes(Path::new("/init"), 0o755, b"odd").expect("init");
        w.dir(Path::new("/tmp"), 0o1777).expect("tmp");
        w.finish().expect("finish")
    }

    #[test]
    fn deterministic_and_aligned() {
        let a = archive();
        assert_eq!(a, archive());
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
    }

    /// GNU cpio lists and extracts what we wrote (skipped when cpio is not installed).
    #[test]
    fn cpio_tool_round_trip() {
        let Ok(mut child) = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        else {
            eprintln!("skipped: no cpio");
            return;
        };
        let data = archive();
        let mut stdin = child.stdin.take().expect("stdin");
        let writer = std::thread::spawn(move || stdin.write_all(&data));
        let out = child.wait_with_output().expect("cpio");
        writer.join().expect("join").expect("write");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "lib",
                "lib/modules",
                "lib/modules/berth",
                "lib/modules/berth/order",
                "init",
                "tmp"
            ]
        );
        assert!(text
            .lines()
            .any(|l| l.starts_with("crw-------") && l.contains("5,")));
        assert!(text
            .lines()
            .any(|l| l.starts_with("drwxrwxrwt") && l.ends_with("tmp")));

        let tmp = tempfile::tempdir().expect("tmp");
        let mut child = Command::new("cpio")
            .args([
                "-i",
                "-d",
                "--quiet",
                "--no-absolute-filenames",
                "--nonmatching",
                "dev/console",
            ])
            .current_dir(tmp.path())
            .stdin(Stdio::piped())
            .spawn()
            .expect("cpio -i");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&archive())
            .expect("write");
        assert!(child.wait().expect("wait").success());
        assert_eq!(
            std::fs::read(tmp.path().join("lib/modules/berth/order")).expect("order"),
            b"a.ko\nb.ko\n"
        );
        assert_eq!(
            std::fs::read(tmp.path().join("init")).expect("init"),
            b"odd"
        );
    }
}

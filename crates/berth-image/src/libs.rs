//! Which shared libraries a program needs, found the way the dynamic loader finds
//! them (run path, `/etc/ld.so.conf`, the multiarch defaults) without running it.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::elf::{Elf, ElfError};

/// Searched after `/etc/ld.so.conf`; the first two are glibc's multiarch system dirs,
/// which the loader inside the initramfs (no `ld.so.cache` there) searches too.
const DEFAULT_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

#[derive(Debug, thiserror::Error)]
pub enum LibsError {
    #[error("cannot inspect a program or library")]
    Elf(#[from] ElfError),
    #[error("{program} needs {library}, which is in none of {searched}")]
    NotFound {
        program: PathBuf,
        library: String,
        searched: String,
    },
}

/// One file the program needs at run time: where the loader will look for it (the
/// path to use inside the image) and the real file to copy there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Needed {
    pub path: PathBuf,
    pub source: PathBuf,
}

/// What the dynamic loader loads for a program: its interpreter (`PT_INTERP`) and the
/// transitive closure of its `DT_NEEDED` libraries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closure {
    /// `None` for a static program.
    pub interpreter: Option<Needed>,
    /// Sorted by path; one entry per library name (the first place it is found).
    pub libraries: Vec<Needed>,
}

/// The interpreter and the transitive closure of `DT_NEEDED` of `program`, sorted by
/// path. A static program needs nothing.
pub fn needed(program: &Path) -> Result<Vec<Needed>, LibsError> {
    let closure = closure(program)?;
    // The interpreter may also be listed as needed under another spelling; one copy
    // per path is what matters.
    let mut out: BTreeSet<Needed> = closure.libraries.into_iter().collect();
    out.extend(closure.interpreter);
    Ok(out.into_iter().collect())
}

/// [`needed`], with the interpreter apart: what a sandbox needs to run `program` on
/// the host's loader whatever its own userland (the namespace driver's directory images).
pub fn closure(program: &Path) -> Result<Closure, LibsError> {
    let search = search_dirs();
    let mut out: BTreeSet<Needed> = BTreeSet::new();
    let mut seen_names: BTreeSet<String> = BTreeSet::new();
    let mut queue: Vec<PathBuf> = vec![program.to_path_buf()];
    let root = Elf::open(program)?;
    let machine = root.machine;
    let interpreter = root.dynamic()?.interpreter.map(|interp| {
        let interp = PathBuf::from(interp);
        Needed {
            source: real(&interp),
            path: interp,
        }
    });
    while let Some(object) = queue.pop() {
        let dynamic = Elf::open(&object)?.dynamic()?;
        let origin = object.parent().unwrap_or(Path::new("/")).to_path_buf();
        let runpath: Vec<PathBuf> = dynamic
            .runpath
            .iter()
            .map(|p| PathBuf::from(p.replace("$ORIGIN", &origin.to_string_lossy())))
            .collect();
        for name in dynamic.needed {
            if !seen_names.insert(name.clone()) {
                continue;
            }
            let found = if name.contains('/') {
                Some(PathBuf::from(&name))
            } else {
                runpath
                    .iter()
                    .chain(search.iter())
                    .map(|dir| dir.join(&name))
                    .find(|candidate| matches_machine(candidate, machine))
            };
            let Some(path) = found else {
                return Err(LibsError::NotFound {
                    program: program.into(),
                    library: name,
                    searched: runpath
                        .iter()
                        .chain(search.iter())
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            queue.push(path.clone());
            out.insert(Needed {
                source: real(&path),
                path,
            });
        }
    }
    Ok(Closure {
        interpreter,
        libraries: out.into_iter().collect(),
    })
}

fn real(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn matches_machine(candidate: &Path, machine: u16) -> bool {
    Elf::open(candidate).is_ok_and(|elf| elf.machine == machine)
}

/// `/etc/ld.so.conf` (with its `include` globs of the `DIR/*.conf` kind), then the
/// defaults, without duplicates.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    conf_dirs(Path::new("/etc/ld.so.conf"), 0, &mut dirs);
    for d in DEFAULT_DIRS {
        dirs.push(PathBuf::from(d));
    }
    let mut seen = BTreeSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

fn conf_dirs(conf: &Path, depth: u32, dirs: &mut Vec<PathBuf>) {
    let Ok(text) = fs::read_to_string(conf) else {
        return;
    };
    if depth > 4 {
        return;
    }
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include") {
            for file in glob_files(pattern.trim()) {
                conf_dirs(&file, depth + 1, dirs);
            }
        } else if line.starts_with('/') {
            dirs.push(PathBuf::from(line));
        }
    }
}

/// Expand `DIR/PREFIX*SUFFIX` (one `*`, in the file name only), sorted.
fn glob_files(pattern: &str) -> Vec<PathBuf> {
    let path = Path::new(pattern);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return vec![];
    };
    let name = name.to_string_lossy();
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![path.to_path_buf()];
    };
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix)
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our resolution agrees with `ldd` on this test binary (which links libc like berth).
    #[test]
    fn agrees_with_ldd() {
        let exe = std::env::current_exe().expect("exe");
        let ours: BTreeSet<String> = needed(&exe)
            .expect("needed")
            .into_iter()
            .map(|n| {
                n.path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let Ok(out) = std::process::Command::new("ldd").arg(&exe).output() else {
            return; // no ldd: nothing to compare with
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let theirs: BTreeSet<String> = text
            .lines()
            .filter(|l| !l.contains("linux-vdso"))
            .filter_map(|l| {
                let path = match l.split_once("=>") {
                    Some((_, right)) => right.split_whitespace().next()?,
                    None => l.split_whitespace().next()?,
                };
                Path::new(path)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .collect();
        assert_eq!(ours, theirs);
        let interp = needed(&exe).expect("needed");
        assert!(interp
            .iter()
            .any(|n| n.path == Path::new("/lib64/ld-linux-x86-64.so.2")
                && !fs::symlink_metadata(&n.source)
                    .expect("source")
                    .file_type()
                    .is_symlink()));
    }

    #[test]
    fn closure_keeps_the_interpreter_apart() {
        let exe = std::env::current_exe().expect("exe");
        let closure = closure(&exe).expect("closure");
        let interp = closure.interpreter.clone().expect("a dynamic test binary");
        assert!(closure
            .libraries
            .iter()
            .any(|n| n.path.file_name() == Some(std::ffi::OsStr::new("libc.so.6"))));
        let mut all = closure.libraries.clone();
        all.push(interp);
        all.sort();
        all.dedup();
        assert_eq!(all, needed(&exe).expect("needed"));
    }

    #[test]
    fn glob_matches_prefix_and_suffix() {
        let tmp = tempfile::tempdir().expect("tmp");
        for n in ["a.conf", "b.conf", "c.txt"] {
            fs::write(tmp.path().join(n), "").expect("write");
        }
        let got = glob_files(&format!("{}/*.conf", tmp.path().display()));
        assert_eq!(
            got,
            vec![tmp.path().join("a.conf"), tmp.path().join("b.conf")]
        );
    }
}

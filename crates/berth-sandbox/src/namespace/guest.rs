//! How the guest agent gets into a sandbox and is started as its PID 1.
//!
//! The agent is the host's `berth` binary, bind-mounted read-only at [`GUEST_EXE`]. It
//! is dynamically linked against the host's glibc (and libseccomp, libgcc_s, libm).
//! In a `host` sandbox those are the host's own `/usr` and `/lib*`, so PID 1 is the
//! binary itself. A directory image brings its own userland — musl, distroless, an
//! older glibc, or no libc at all — which the agent must not depend on: there the
//! sandbox also gets the host's loader at `/.berth/<its file name>` and exactly the
//! libraries the binary needs at [`GUEST_LIB_DIR`] (found the way the microVM
//! initramfs finds them, [`berth_image::libs`]), each a read-only bind of the host
//! file, and PID 1 is
//!
//! ```text
//! /.berth/ld-linux-x86-64.so.2 --inhibit-cache --library-path /.berth/lib /.berth/berth guest --listen …
//! ```
//!
//! The loader's options are not environment variables (unlike `LD_LIBRARY_PATH`), so
//! nothing the agent starts inherits them: commands and shells run on the image's own
//! loader and libraries. `--inhibit-cache` keeps the image's `/etc/ld.so.cache` out
//! of the agent's library search. The agent never re-executes itself, so its
//! `/proc/self/exe` being the loader does not matter.

use std::path::{Path, PathBuf};

use berth_image::libs::{self, LibsError, Needed};

/// Where the guest agent binary appears inside every sandbox.
pub const GUEST_EXE: &str = "/.berth/berth";
/// The host libraries of a directory image's guest agent.
pub const GUEST_LIB_DIR: &str = "/.berth/lib";
/// Where the loader goes: `/.berth/<its file name>`.
const GUEST_DIR: &str = "/.berth";

/// One host file bind-mounted read-only into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    /// Where the host's loader finds it (often a symlink: `libseccomp.so.2`).
    pub host: PathBuf,
    /// The real file on the host (symlinks resolved), the bind mount's source.
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: String,
}

/// The host's loader and the libraries the guest binary needs, as a directory image's
/// sandbox sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLoader {
    pub loader: GuestFile,
    pub libraries: Vec<GuestFile>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostLoaderError {
    #[error("cannot find the shared libraries of {exe}")]
    Libs {
        exe: PathBuf,
        #[source]
        source: LibsError,
    },
    #[error("{needed} (for {exe}) has no file name")]
    NoFileName { exe: PathBuf, needed: PathBuf },
    #[error("{0} is not readable (the loader: executable) by sandbox uids")]
    Unreachable(PathBuf),
}

impl HostLoader {
    /// The loader and libraries of `exe`, or `None` for a static binary (it runs as
    /// is). `reachable(path, executed)` tells whether a sandbox uid can read (and, for
    /// the loader, execute) a host file, as a bind mount's source must be.
    pub fn resolve(
        exe: &Path,
        reachable: impl Fn(&Path, bool) -> bool,
    ) -> Result<Option<Self>, HostLoaderError> {
        let closure = libs::closure(exe).map_err(|source| HostLoaderError::Libs {
            exe: exe.into(),
            source,
        })?;
        let Some(interpreter) = closure.interpreter else {
            return Ok(None);
        };
        let file = |needed: &Needed, dir: &str, executed: bool| {
            let name = needed
                .path
                .file_name()
                .ok_or_else(|| HostLoaderError::NoFileName {
                    exe: exe.into(),
                    needed: needed.path.clone(),
                })?;
            if !reachable(&needed.source, executed) {
                return Err(HostLoaderError::Unreachable(needed.source.clone()));
            }
            Ok(GuestFile {
                host: needed.path.clone(),
                source: needed.source.clone(),
                target: format!("{dir}/{}", name.to_string_lossy()),
            })
        };
        let loader = file(&interpreter, GUEST_DIR, true)?;
        let mut libraries = Vec::new();
        for lib in &closure.libraries {
            // libc needs the loader by its soname; the running loader answers to it.
            if lib.path.file_name() == interpreter.path.file_name() {
                continue;
            }
            libraries.push(file(lib, GUEST_LIB_DIR, false)?);
        }
        Ok(Some(Self { loader, libraries }))
    }

    /// The same files with their symlinks resolved again: a package upgrade on a
    /// long-running host replaces `libseccomp.so.2.5.4` by `….2.5.5` behind the
    /// `libseccomp.so.2` link (a few `realpath`s per directory-image start).
    pub fn current(&self) -> Self {
        let again = |f: &GuestFile| GuestFile {
            source: std::fs::canonicalize(&f.host).unwrap_or_else(|_| f.source.clone()),
            ..f.clone()
        };
        Self {
            loader: again(&self.loader),
            libraries: self.libraries.iter().map(again).collect(),
        }
    }

    /// Every file to bind-mount: the loader, then the libraries.
    pub fn files(&self) -> impl Iterator<Item = &GuestFile> {
        std::iter::once(&self.loader).chain(&self.libraries)
    }
}

/// The argv of the sandbox's PID 1: the agent, through `loader` when there is one.
pub fn argv(loader: Option<&HostLoader>, listen: &str) -> Vec<String> {
    let mut argv: Vec<String> = match loader {
        Some(l) => vec![
            l.loader.target.clone(),
            "--inhibit-cache".into(),
            "--library-path".into(),
            GUEST_LIB_DIR.into(),
        ],
        None => vec![],
    };
    argv.extend([
        GUEST_EXE.into(),
        "guest".into(),
        "--listen".into(),
        listen.into(),
    ]);
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unit-test binary links libc like berth.
    #[test]
    fn resolves_the_loader_and_exactly_the_needed_libraries() {
        let exe = std::env::current_exe().expect("exe");
        let l = HostLoader::resolve(&exe, |_, _| true)
            .expect("resolve")
            .expect("a dynamic binary");
        assert!(
            l.loader.target.starts_with("/.berth/ld-") && !l.loader.target.contains("/lib/"),
            "{:?}",
            l.loader
        );
        assert!(l.loader.source.is_file());
        let names: Vec<&str> = l.libraries.iter().map(|f| f.target.as_str()).collect();
        assert!(names.contains(&"/.berth/lib/libc.so.6"), "{names:?}");
        assert!(
            !names.iter().any(|n| n.contains("ld-linux")),
            "the loader is not a library: {names:?}"
        );
        for f in l.files() {
            assert!(
                !std::fs::symlink_metadata(&f.source)
                    .expect("source")
                    .file_type()
                    .is_symlink(),
                "{f:?}"
            );
        }
        let expected: Vec<String> = libs::closure(&exe)
            .expect("closure")
            .libraries
            .iter()
            .filter_map(|n| n.path.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("ld-linux"))
            .map(|n| format!("/.berth/lib/{n}"))
            .collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn current_follows_a_retargeted_link() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (old, new, link) = (
            tmp.path().join("libx.so.1.0"),
            tmp.path().join("libx.so.1.1"),
            tmp.path().join("libx.so.1"),
        );
        std::fs::write(&new, b"").expect("new");
        std::os::unix::fs::symlink(&new, &link).expect("link");
        let file = GuestFile {
            host: link,
            source: old.clone(),
            target: "/.berth/lib/libx.so.1".into(),
        };
        let l = HostLoader {
            loader: GuestFile {
                host: tmp.path().join("gone"),
                ..file.clone()
            },
            libraries: vec![file],
        };
        let now = l.current();
        assert_eq!(now.libraries[0].source, new);
        assert_eq!(now.loader.source, old, "kept when the link is gone");
    }

    #[test]
    fn unreachable_libraries_are_refused() {
        let exe = std::env::current_exe().expect("exe");
        assert!(matches!(
            HostLoader::resolve(&exe, |p, _| !p.to_string_lossy().contains("libc.so")),
            Err(HostLoaderError::Unreachable(_))
        ));
    }

    #[test]
    fn argv_runs_the_agent_through_the_loader() {
        assert_eq!(
            argv(None, "/run/berth/guest.sock"),
            [
                "/.berth/berth",
                "guest",
                "--listen",
                "/run/berth/guest.sock"
            ]
        );
        let l = HostLoader {
            loader: GuestFile {
                host: "/lib64/ld-linux-x86-64.so.2".into(),
                source: "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".into(),
                target: "/.berth/ld-linux-x86-64.so.2".into(),
            },
            libraries: vec![],
        };
        assert_eq!(
            argv(Some(&l), "/s"),
            [
                "/.berth/ld-linux-x86-64.so.2",
                "--inhibit-cache",
                "--library-path",
                "/.berth/lib",
                "/.berth/berth",
                "guest",
                "--listen",
                "/s"
            ]
        );
    }
}

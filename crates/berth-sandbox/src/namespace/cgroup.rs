//! Reading a sandbox's cgroup (stats) and removing it when libcontainer's state is gone.
//! Supports cgroup v1 (separate or co-mounted controllers) and v2.

use std::fs;
use std::path::{Path, PathBuf};

use berth_core::driver::SandboxStats;

const ROOT: &str = "/sys/fs/cgroup";

/// Cgroup files of one sandbox (`cgroup` is the absolute path given to libcontainer).
#[derive(Debug, Clone)]
pub struct SandboxCgroup {
    root: PathBuf,
    cgroup: String,
}

impl SandboxCgroup {
    pub fn new(cgroup: &str) -> Self {
        Self::with_root(Path::new(ROOT), cgroup)
    }

    pub fn with_root(root: &Path, cgroup: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            cgroup: cgroup.trim_start_matches('/').to_string(),
        }
    }

    fn unified(&self) -> bool {
        self.root.join("cgroup.controllers").exists()
    }

    /// Directory of this cgroup in the v1 hierarchy holding `controller` (or in v2).
    fn dir(&self, controller: &str) -> PathBuf {
        if self.unified() {
            return self.root.join(&self.cgroup);
        }
        // v1: controllers may be co-mounted (`cpu,cpuacct`); the plain name is either
        // the mount or a symlink to it.
        self.root.join(controller).join(&self.cgroup)
    }

    /// Create the cgroup (and its parents) with these limits, for a process the driver
    /// starts itself (the microVM's VMM; libcontainer creates namespace sandboxes' own).
    /// v1: in the `cpu`, `cpuacct`, `memory` and `pids` hierarchies; v2: one directory
    /// with the `cpu`, `memory` and `pids` controllers enabled down to it.
    pub fn create(&self, limits: &CgroupLimits) -> std::io::Result<()> {
        if self.unified() {
            let mut dir = self.root.clone();
            for part in Path::new(&self.cgroup).components() {
                // Controllers must be enabled in every ancestor for the leaf to get them.
                let _ = fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory +pids");
                dir.push(part);
                create_dir(&dir)?;
            }
            fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
            if let Some(quota) = limits.cpu_quota_us() {
                fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
            }
            fs::write(dir.join("pids.max"), limits.pids.to_string())?;
            return Ok(());
        }
        for controller in ["cpu", "cpuacct", "memory", "pids"] {
            let dir = self.dir(controller);
            fs::create_dir_all(&dir)?;
        }
        let memory = self.dir("memory");
        fs::write(
            memory.join("memory.limit_in_bytes"),
            limits.memory_bytes.to_string(),
        )?;
        if let Some(quota) = limits.cpu_quota_us() {
            let cpu = self.dir("cpu");
            fs::write(cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
            fs::write(cpu.join("cpu.cfs_quota_us"), quota.to_string())?;
        }
        fs::write(self.dir("pids").join("pids.max"), limits.pids.to_string())?;
        Ok(())
    }

    /// Move `pid` into every hierarchy of this cgroup.
    pub fn attach(&self, pid: u32) -> std::io::Result<()> {
        for dir in self.dirs() {
            fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// CPU time and peak memory; `None` when the cgroup does not exist.
    pub fn stats(&self) -> Option<SandboxStats> {
        if self.unified() {
            let dir = self.root.join(&self.cgroup);
            let cpu_stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
            let usage_us = cpu_stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let peak = read_u64(&dir.join("memory.peak"))
                .or_else(|| read_u64(&dir.join("memory.current")))
                .unwrap_or(0);
            return Some(SandboxStats {
                cpu_ns: usage_us.saturating_mul(1000),
                memory_peak_bytes: peak,
            });
        }
        let cpu = read_u64(&self.dir("cpuacct").join("cpuacct.usage"));
        let mem = read_u64(&self.dir("memory").join("memory.max_usage_in_bytes"));
        if cpu.is_none() && mem.is_none() {
            return None;
        }
        Some(SandboxStats {
            cpu_ns: cpu.unwrap_or(0),
            memory_peak_bytes: mem.unwrap_or(0),
        })
    }

    /// Every directory this cgroup has (one per v1 hierarchy, or one in v2).
    pub fn dirs(&self) -> Vec<PathBuf> {
        if self.unified() {
            let dir = self.root.join(&self.cgroup);
            return if dir.is_dir() { vec![dir] } else { vec![] };
        }
        let Ok(entries) = fs::read_dir(&self.root) else {
            return vec![];
        };
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            // Skip the `cpu -> cpu,cpuacct` style symlinks: their target is listed too.
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path().join(&self.cgroup))
            .filter(|d| d.is_dir())
            .collect();
        dirs.sort();
        dirs
    }

    /// Pids of every process in the cgroup (any hierarchy).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs()
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILL everything in the cgroup and remove its directories (children first).
    /// Best effort; returns the directories that could not be removed.
    pub fn kill_and_remove(&self) -> Vec<PathBuf> {
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut left = vec![];
        for dir in self.dirs() {
            if !remove_tree(&dir) {
                left.push(dir);
            }
        }
        self.remove_empty_parent();
        left
    }

    /// rmdir the per-server parent (`/berth/<server>`) in every hierarchy. It goes with
    /// its last session; while other sessions run it is not empty and rmdir refuses, as
    /// intended. Runs even when libcontainer already removed the session's own dirs.
    fn remove_empty_parent(&self) {
        let Some(parent) = Path::new(&self.cgroup)
            .parent()
            .filter(|p| p.components().count() >= 2)
        else {
            return;
        };
        let parent = parent.strip_prefix("/").unwrap_or(parent);
        if self.unified() {
            let _ = fs::remove_dir(self.root.join(parent));
            return;
        }
        for entry in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = fs::remove_dir(entry.path().join(parent));
            }
        }
    }
}

const CPU_PERIOD_US: u64 = 100_000;

/// Limits for [`SandboxCgroup::create`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    /// CPU cores; `None` = unlimited.
    pub cpus: Option<f64>,
    pub pids: u64,
}

impl CgroupLimits {
    fn cpu_quota_us(&self) -> Option<u64> {
        self.cpus
            .filter(|c| c.is_finite() && *c > 0.0)
            .map(|c| ((c * CPU_PERIOD_US as f64) as u64).max(1000))
    }
}

fn create_dir(dir: &Path) -> std::io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// rmdir a cgroup and its children, retrying while the last tasks exit.
fn remove_tree(dir: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    false
}

/// Whether some cgroup hierarchy is mounted with `favordynmods`. Without it, moving a
/// process into a cgroup waits for an RCU grace period (`synchronize_rcu()` under the
/// global `cgroup_threadgroup_rwsem`): ~5–15 ms of every sandbox start on a quiet host,
/// the largest single step left (see `docs/design/namespace-sandbox.md`).
pub fn favors_dynmods() -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| mountinfo_favors_dynmods(&info))
}

fn mountinfo_favors_dynmods(info: &str) -> bool {
    info.lines().any(|line| {
        let Some((_, fs_part)) = line.split_once(" - ") else {
            return false;
        };
        let mut fields = fs_part.split(' ');
        let fstype = fields.next().unwrap_or("");
        let super_opts = fields.nth(1).unwrap_or("");
        fstype.starts_with("cgroup") && super_opts.split(',').any(|o| o == "favordynmods")
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_stats() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cpu = tmp.path().join("cpuacct/berth/s");
        let mem = tmp.path().join("memory/berth/s");
        fs::create_dir_all(&cpu).expect("cpu");
        fs::create_dir_all(&mem).expect("mem");
        fs::write(cpu.join("cpuacct.usage"), "12345\n").expect("w");
        fs::write(mem.join("memory.max_usage_in_bytes"), "4096\n").expect("w");
        let cg = SandboxCgroup::with_root(tmp.path(), "/berth/s");
        assert_eq!(
            cg.stats(),
            Some(SandboxStats {
                cpu_ns: 12345,
                memory_peak_bytes: 4096
            })
        );
        assert_eq!(cg.dirs().len(), 2);
        assert!(SandboxCgroup::with_root(tmp.path(), "/berth/other")
            .stats()
            .is_none());
    }

    #[test]
    fn favordynmods_from_mountinfo() {
        let plain = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        let favor = "67 27 0:41 / /x rw,relatime - cgroup cgroup rw,favordynmods,name=b\n";
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n";
        assert!(!mountinfo_favors_dynmods(plain));
        assert!(mountinfo_favors_dynmods(&format!("{plain}{favor}")));
        assert!(mountinfo_favors_dynmods(v2));
        assert!(!mountinfo_favors_dynmods(
            "1 2 0:1 / /favordynmods rw - tmpfs favordynmods rw\n"
        ));
    }

    #[test]
    fn v2_stats() {
        let tmp = tempfile::tempdir().expect("tmp");
        fs::write(tmp.path().join("cgroup.controllers"), "cpu memory pids").expect("w");
        let dir = tmp.path().join("berth/s");
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").expect("w");
        fs::write(dir.join("memory.peak"), "8192\n").expect("w");
        let cg = SandboxCgroup::with_root(tmp.path(), "/berth/s");
        assert_eq!(
            cg.stats(),
            Some(SandboxStats {
                cpu_ns: 7000,
                memory_peak_bytes: 8192
            })
        );
    }

    #[test]
    fn removing_the_last_session_removes_the_server_parent() {
        let tmp = tempfile::tempdir().unwrap();
        for h in ["memory", "pids"] {
            fs::create_dir_all(tmp.path().join(h).join("berth/srv/a")).unwrap();
            fs::create_dir_all(tmp.path().join(h).join("berth/srv/b")).unwrap();
        }
        SandboxCgroup::with_root(tmp.path(), "/berth/srv/a").kill_and_remove();
        assert!(
            tmp.path().join("memory/berth/srv/b").is_dir(),
            "a sibling keeps the parent"
        );
        SandboxCgroup::with_root(tmp.path(), "/berth/srv/b").kill_and_remove();
        for h in ["memory", "pids"] {
            assert!(
                !tmp.path().join(h).join("berth/srv").exists(),
                "{h}: parent left behind"
            );
            assert!(tmp.path().join(h).join("berth").is_dir());
        }
    }
}

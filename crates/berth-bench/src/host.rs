//! Reading the host: a sandbox's cgroup (`/berth/<server>/<session id>`, as
//! `berth-sandbox`'s `SessionPaths::cgroup` names it, where `<server>` is 12 hex digits
//! derived from the server's run dir; `/berth/<session id>` before that), process memory
//! and CPU time, machine facts.

use std::fs;
use std::path::PathBuf;

use serde::Serialize;

const ROOT: &str = "/sys/fs/cgroup";

fn unified() -> bool {
    PathBuf::from(ROOT).join("cgroup.controllers").exists()
}

/// `berth/` in the hierarchy holding `controller` (v1) or in v2.
fn berth_root(controller: &str) -> PathBuf {
    if unified() {
        PathBuf::from(ROOT).join("berth")
    } else {
        PathBuf::from(ROOT).join(controller).join("berth")
    }
}

/// The session's cgroup directory in the hierarchy holding `controller` (v1) or in v2:
/// `berth/*/<session>`, or the older `berth/<session>`. Session ids of one bench run
/// carry its pid, so the first match is ours.
fn cgroup_dir(controller: &str, session: &str) -> Option<PathBuf> {
    let root = berth_root(controller);
    let legacy = root.join(session);
    if legacy.join("cgroup.procs").exists() {
        return Some(legacy);
    }
    fs::read_dir(&root)
        .ok()?
        .flatten()
        .map(|e| e.path().join(session))
        .find(|p| p.join("cgroup.procs").exists())
}

/// The per-server parent of the session's cgroup (`/berth/<server>`), relative to a
/// hierarchy root; `None` when the session has no cgroup or uses the older layout.
pub fn cgroup_parent(session: &str) -> Option<String> {
    let controller = if unified() { "" } else { "pids" };
    let dir = cgroup_dir(controller, session)?;
    let parent = dir.parent()?;
    if parent == berth_root(controller) {
        return None;
    }
    Some(format!("berth/{}", parent.file_name()?.to_string_lossy()))
}

/// Directories named `rel` (relative to a hierarchy root) in any hierarchy.
pub fn cgroup_dirs_named(rel: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::iter::once(PathBuf::from(ROOT).join(rel))
        .chain(
            fs::read_dir(ROOT)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join(rel)),
        )
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Cgroup directories whose name starts with `prefix`, at `berth/<name>` or
/// `berth/*/<name>` in any hierarchy.
pub fn cgroups_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for root in cgroup_dirs_named("berth") {
        for e in fs::read_dir(&root).into_iter().flatten().flatten() {
            let path = e.path();
            if e.file_name().to_string_lossy().starts_with(prefix) {
                left.push(path);
            } else if path.is_dir() {
                for inner in fs::read_dir(&path).into_iter().flatten().flatten() {
                    if inner.file_name().to_string_lossy().starts_with(prefix) {
                        left.push(inner.path());
                    }
                }
            }
        }
    }
    left.sort();
    left
}

fn read_u64(path: PathBuf) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Every pid in the session's cgroup (the `pids` hierarchy on v1, which every
/// sandbox joins; the memory hierarchy as a fallback).
pub fn sandbox_pids(session: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for controller in ["pids", "memory"] {
        let Some(dir) = cgroup_dir(controller, session) else {
            continue;
        };
        if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            break;
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// CPU time used by the session's cgroup, in nanoseconds.
pub fn sandbox_cpu_ns(session: &str) -> Option<u64> {
    if unified() {
        let stat = fs::read_to_string(cgroup_dir("", session)?.join("cpu.stat")).ok()?;
        let us: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))?
            .trim()
            .parse()
            .ok()?;
        return Some(us * 1000);
    }
    read_u64(cgroup_dir("cpuacct", session)?.join("cpuacct.usage"))
}

/// The cgroup's memory figures, in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CgroupMemory {
    /// `memory.usage_in_bytes` (v1) or `memory.current` (v2).
    pub usage: u64,
    /// Anonymous memory (`total_rss` / `anon` in memory.stat).
    pub anon: u64,
    /// Page cache (`total_cache` / `file`).
    pub cache: u64,
}

pub fn sandbox_memory(session: &str) -> Option<CgroupMemory> {
    let dir = cgroup_dir("memory", session)?;
    let (usage_file, anon_key, cache_key) = if unified() {
        ("memory.current", "anon", "file")
    } else {
        ("memory.usage_in_bytes", "total_rss", "total_cache")
    };
    let usage = read_u64(dir.join(usage_file))?;
    let stat = fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    let field = |key: &str| {
        stat.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Some(CgroupMemory {
        usage,
        anon: field(anon_key),
        cache: field(cache_key),
    })
}

/// One process's resident memory.
#[derive(Debug, Clone, Serialize)]
pub struct ProcMemory {
    pub pid: i32,
    pub comm: String,
    pub rss_bytes: u64,
    pub pss_bytes: u64,
}

/// `Rss` and `Pss` from `/proc/PID/smaps_rollup`; `None` when the process is gone.
pub fn proc_memory(pid: i32) -> Option<ProcMemory> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kb = |key: &str| -> u64 {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string();
    Some(ProcMemory {
        pid,
        comm,
        rss_bytes: kb("Rss:"),
        pss_bytes: kb("Pss:"),
    })
}

/// One mapping of `/proc/PID/smaps`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    /// `rw-p`, `r-xp`, …
    pub perms: String,
    /// The file, `[heap]`, `[stack]`, … or empty.
    pub path: String,
    /// Anonymous memory: no inode, and no name or an `[anon:…]` one.
    pub anon: bool,
    pub size: u64,
    pub rss: u64,
    pub pss: u64,
    /// Resident anonymous pages (private copies included: a written private file
    /// mapping has some).
    pub anonymous: u64,
}

/// Parse `/proc/PID/smaps`: a header line per mapping (`start-end perms offset dev inode
/// [path]`) followed by `Key: N kB` lines.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        let is_header = first.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty()
                && a.chars().all(|c| c.is_ascii_hexdigit())
                && b.chars().all(|c| c.is_ascii_hexdigit())
        });
        if is_header {
            let perms = words.next().unwrap_or_default().to_string();
            let _offset = words.next();
            let _dev = words.next();
            let inode = words.next().unwrap_or_default();
            let path = words.collect::<Vec<_>>().join(" ");
            out.push(Mapping {
                anon: inode == "0" && (path.is_empty() || path.starts_with("[anon")),
                perms,
                path,
                size: 0,
                rss: 0,
                pss: 0,
                anonymous: 0,
            });
            continue;
        }
        let Some(m) = out.last_mut() else {
            continue;
        };
        let kb = |v: Option<&str>| v.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        match first {
            "Size:" => m.size = kb(words.next()),
            "Rss:" => m.rss = kb(words.next()),
            "Pss:" => m.pss = kb(words.next()),
            "Anonymous:" => m.anonymous = kb(words.next()),
            _ => {}
        }
    }
    out
}

/// The mappings of a process; `None` when it is gone.
pub fn smaps(pid: i32) -> Option<Vec<Mapping>> {
    fs::read_to_string(format!("/proc/{pid}/smaps"))
        .ok()
        .map(|t| parse_smaps(&t))
}

/// User + system CPU time of a process (threads included), in seconds.
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may itself contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some((utime + stime) as f64 / hz)
}

/// Processes on the host that are not in a sandbox cgroup but name the session in their
/// command line (per-sandbox helpers outside the container, if any).
pub fn host_side_pids(session: &str, exclude: &[i32]) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return vec![];
    };
    let me = std::process::id() as i32;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me && !exclude.contains(pid))
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0).any(|arg| {
                    arg.ends_with(format!("/{session}").as_bytes()) || arg == session.as_bytes()
                })
            })
        })
        .collect()
}

/// Facts about this machine for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_gib: f64,
    pub kernel: String,
    pub cgroup: &'static str,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kb: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            mem_total_gib: mem_kb / (1024.0 * 1024.0),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            cgroup: if unified() { "v2" } else { "v1" },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_mappings() {
        let text = "\
55d0c0a00000-55d0c0c00000 r-xp 00000000 fe:01 1234   /usr/bin/qemu-system-x86_64
Size:               2048 kB
KernelPageSize:        4 kB
Rss:                1024 kB
Pss:                 512 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0020000000 rw-p 00000000 00:00 0 
Size:             524288 kB
Rss:              102400 kB
Pss:              102400 kB
Anonymous:        102400 kB
THPeligible:    1
7f0100000000-7f0100001000 rw-p 00000000 00:00 0    [anon:guard]
Size:                  4 kB
Rss:                   0 kB
Pss:                   0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0    [stack]
Size:                132 kB
Rss:                  16 kB
Pss:                  16 kB
";
        let maps = parse_smaps(text);
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[0].path, "/usr/bin/qemu-system-x86_64");
        assert!(!maps[0].anon);
        assert_eq!(
            (maps[0].size, maps[0].rss, maps[0].pss),
            (2 << 20, 1 << 20, 512 << 10)
        );
        assert!(maps[1].anon && maps[1].path.is_empty());
        assert_eq!((maps[1].size, maps[1].rss), (512 << 20, 100 << 20));
        assert_eq!((maps[0].anonymous, maps[1].anonymous), (0, 100 << 20));
        assert!(maps[2].anon);
        assert!(!maps[3].anon);
        assert_eq!(maps[3].path, "[stack]");
    }

    #[test]
    fn own_smaps() {
        let maps = smaps(std::process::id() as i32).expect("own smaps");
        assert!(maps.iter().any(|m| m.rss > 0));
    }
}

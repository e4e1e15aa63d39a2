//! The container init's identity on the host: pid plus kernel start time, so a reused
//! pid is never mistaken for the sandbox.

use std::fs;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitProcess {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot).
    pub start_time: u64,
}

/// (state, start time) from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some((state, start_time))
}

impl InitProcess {
    pub fn of(pid: i32) -> Option<Self> {
        stat(pid).map(|(_, start_time)| Self { pid, start_time })
    }

    pub fn read(path: &Path) -> Option<Self> {
        let text = fs::read_to_string(path).ok()?;
        let mut parts = text.split_whitespace();
        Some(Self {
            pid: parts.next()?.parse().ok()?,
            start_time: parts.next()?.parse().ok()?,
        })
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        fs::write(path, format!("{} {}\n", self.pid, self.start_time))
    }

    /// Running (not a zombie) and still the same process.
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_round_trips() {
        let me = InitProcess::of(std::process::id() as i32).expect("self");
        assert!(me.is_alive());
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join("init.pid");
        me.write(&file).expect("write");
        assert_eq!(InitProcess::read(&file), Some(me));
        let other = InitProcess {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive(), "pid reuse is detected");
    }
}

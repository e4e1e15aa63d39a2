//! The local terminal: raw mode that is always restored, and its size.

use std::os::fd::AsFd;

use rustix::termios::{self, OptionalActions, Termios};

/// Puts stdin's terminal in raw mode until dropped (also on early returns and panics
/// that unwind): every key, Ctrl+C included, goes to the remote shell.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// `None` when stdin is not a terminal (nothing to restore then).
    pub fn enable() -> std::io::Result<Option<Self>> {
        let stdin = std::io::stdin();
        if !termios::isatty(stdin.as_fd()) {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        raw.make_raw();
        // Drain, not Flush: keys typed before the shell was attached are kept for it.
        termios::tcsetattr(stdin.as_fd(), OptionalActions::Drain, &raw)?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(
            std::io::stdin().as_fd(),
            OptionalActions::Flush,
            &self.saved,
        );
    }
}

/// Columns and rows of the terminal on stdout (or stdin), if there is one.
pub fn size() -> Option<(u16, u16)> {
    let ws = termios::tcgetwinsize(std::io::stdout().as_fd())
        .or_else(|_| termios::tcgetwinsize(std::io::stdin().as_fd()))
        .ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Write straight to the file descriptor: no line buffering to scan binary output for
/// newlines, no hop through tokio's blocking pool per chunk. Blocking here is what a
/// terminal or pipe reader expects of a CLI anyway (it is the backpressure).
pub fn write_fd(fd: &impl AsFd, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Parse detach keys such as `ctrl-],d` into the bytes a terminal sends.
pub fn parse_keys(spec: &str) -> Result<Vec<u8>, String> {
    spec.split(',')
        .map(|k| {
            let k = k.trim();
            if let Some(c) = k.strip_prefix("ctrl-") {
                let c = c.chars().next().filter(|_| c.chars().count() == 1);
                match c {
                    Some(c @ ('@'..='_' | 'a'..='z')) => Ok((c.to_ascii_uppercase() as u8) & 0x1f),
                    _ => Err(format!("{k:?}: use ctrl-a … ctrl-z, ctrl-@, ctrl-[, ctrl-\\\\, ctrl-], ctrl-^ or ctrl-_")),
                }
            } else if k.len() == 1 && k.is_ascii() {
                Ok(k.as_bytes()[0])
            } else {
                Err(format!("{k:?}: a key is `ctrl-X` or one character"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys() {
        assert_eq!(parse_keys("ctrl-],d").unwrap(), vec![0x1d, b'd']);
        assert_eq!(parse_keys("ctrl-p,ctrl-q").unwrap(), vec![0x10, 0x11]);
        assert!(parse_keys("ctrl-1").is_err());
        assert!(parse_keys("dd").is_err());
    }
}

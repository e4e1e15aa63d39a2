//! asciicast v2 recordings of shells: a JSON header line, then one `[seconds, code,
//! data]` line per event (`"o"` output, `"r"` resize as `"WxH"`). Appended to a file as
//! output arrives, through a write buffer, so memory does not grow with the recording.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Write buffer of a recording: flushed when full, on `flush` and when the shell exits.
const BUFFER: usize = 64 * 1024;

pub(crate) struct Recording {
    path: PathBuf,
    out: BufWriter<File>,
    started: Instant,
    /// The start of a UTF-8 sequence split across reads, held until the rest arrives.
    partial: Vec<u8>,
    /// The first write error; the recording stops there (the shell does not).
    failed: bool,
}

impl Recording {
    /// Create (or truncate) `path` and write the header.
    pub(crate) fn create(
        path: &Path,
        width: u16,
        height: u16,
        term: &str,
        shell: &str,
    ) -> io::Result<Recording> {
        let file = File::create(path)?;
        let mut out = BufWriter::with_capacity(BUFFER, file);
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = serde_json::json!({
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": timestamp,
            "env": {"TERM": term, "SHELL": shell},
        });
        writeln!(out, "{header}")?;
        Ok(Recording {
            path: path.to_path_buf(),
            out,
            started: Instant::now(),
            partial: Vec::new(),
            failed: false,
        })
    }

    /// Record output bytes. asciicast data is a JSON string, so bytes are decoded as
    /// UTF-8: a sequence split between two reads is completed by the next one, invalid
    /// bytes become U+FFFD.
    pub(crate) fn output(&mut self, data: &[u8]) {
        if self.failed {
            return;
        }
        self.partial.extend_from_slice(data);
        let complete = match std::str::from_utf8(&self.partial) {
            Ok(_) => self.partial.len(),
            // `error_len() == None`: the input ends inside a sequence that may still be
            // completed; keep it (at most 3 bytes) for the next call.
            Err(err) if err.error_len().is_none() => err.valid_up_to(),
            Err(_) => self.partial.len(),
        };
        let rest = self.partial.split_off(complete);
        let text = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial = rest;
        if !text.is_empty() {
            self.event("o", &text);
        }
    }

    pub(crate) fn resize(&mut self, width: u16, height: u16) {
        if !self.failed {
            self.event("r", &format!("{width}x{height}"));
        }
    }

    fn event(&mut self, code: &str, data: &str) {
        let time = self.started.elapsed().as_secs_f64();
        let line = serde_json::json!([(time * 1e6).round() / 1e6, code, data]);
        if let Err(err) = writeln!(self.out, "{line}") {
            self.fail(&err);
        }
    }

    /// Write out what is buffered (and a split sequence left at the end, lossily).
    pub(crate) fn flush(&mut self, finished: bool) {
        if finished && !self.partial.is_empty() && !self.failed {
            let text = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            self.event("o", &text);
        }
        if let Err(err) = self.out.flush() {
            self.fail(&err);
        }
    }

    fn fail(&mut self, err: &io::Error) {
        if !self.failed {
            tracing::warn!(path = %self.path.display(), "shell recording stopped: {err}");
            self.failed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn split_utf8_and_json_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cast");
        let mut rec = Recording::create(&path, 80, 24, "xterm-256color", "bash").unwrap();
        let text = "é\u{1b}[31m\"x\"\r\n€";
        let bytes = text.as_bytes();
        // Split inside the two-byte `é` and the three-byte `€`.
        rec.output(&bytes[..1]);
        rec.output(&bytes[1..bytes.len() - 1]);
        rec.resize(100, 30);
        rec.output(&bytes[bytes.len() - 1..]);
        rec.output(b"\xff");
        rec.flush(true);
        let content = std::fs::read_to_string(&path).unwrap();
        let mut lines = content.lines();
        let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(header["version"], 2);
        assert_eq!(header["width"], 80);
        assert_eq!(header["env"]["TERM"], "xterm-256color");
        let mut out = String::new();
        let mut resizes = Vec::new();
        for line in lines {
            let ev: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(ev[0].as_f64().unwrap() >= 0.0);
            match ev[1].as_str().unwrap() {
                "o" => out.push_str(ev[2].as_str().unwrap()),
                "r" => resizes.push(ev[2].as_str().unwrap().to_string()),
                other => panic!("unexpected event {other}"),
            }
        }
        assert_eq!(out, format!("{text}\u{fffd}"));
        assert_eq!(resizes, ["100x30"]);
    }
}

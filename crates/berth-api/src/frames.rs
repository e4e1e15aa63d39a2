//! The binary alternative to NDJSON for command output.
//!
//! A client that sends `Accept: application/vnd.berth.frames` to
//! `POST /v1/sessions/{id}/commands` gets a sequence of frames instead of JSON lines:
//! `kind: u8`, `len: u32` big-endian, then `len` payload bytes. Output bytes travel as
//! they are (no base64), which is what lets the CLI stream at memory speed.
//!
//! | kind | payload |
//! |---|---|
//! | 0 | one [`CommandEvent`] as JSON (`started`, `exit`, `error`) |
//! | 1 | stdout bytes |
//! | 2 | stderr bytes |

use crate::CommandEvent;

pub const CONTENT_TYPE: &str = "application/vnd.berth.frames";
pub const HEADER_LEN: usize = 5;

pub const KIND_EVENT: u8 = 0;
pub const KIND_STDOUT: u8 = 1;
pub const KIND_STDERR: u8 = 2;

/// The 5-byte header of a frame.
pub fn header(kind: u8, len: usize) -> [u8; HEADER_LEN] {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    [kind, len[0], len[1], len[2], len[3]]
}

/// A decoded frame, borrowing its payload.
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    Event(CommandEvent),
    Stdout(&'a [u8]),
    Stderr(&'a [u8]),
}

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    UnknownKind(u8),
    BadEvent(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::BadEvent(e) => write!(f, "bad event frame: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Decode the frame at the start of `buf`. `Ok(None)` means more bytes are needed;
/// otherwise returns the frame and how many bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let frame = match buf[0] {
        KIND_EVENT => Frame::Event(
            serde_json::from_slice(payload).map_err(|e| FrameError::BadEvent(e.to_string()))?,
        ),
        KIND_STDOUT => Frame::Stdout(payload),
        KIND_STDERR => Frame::Stderr(payload),
        other => return Err(FrameError::UnknownKind(other)),
    };
    Ok(Some((frame, HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        buf.extend(header(KIND_STDOUT, 3));
        buf.extend(b"\x00\xffz");
        let ev = serde_json::to_vec(&CommandEvent::Exit {
            code: Some(0),
            signal: None,
            timed_out: false,
            duration_ms: 1,
        })
        .unwrap();
        buf.extend(header(KIND_EVENT, ev.len()));
        buf.extend(&ev);
        let (f, used) = decode(&buf).unwrap().unwrap();
        assert_eq!((f, used), (Frame::Stdout(b"\x00\xffz"), 8));
        let (f, used2) = decode(&buf[used..]).unwrap().unwrap();
        assert!(matches!(
            f,
            Frame::Event(CommandEvent::Exit { code: Some(0), .. })
        ));
        assert_eq!(used + used2, buf.len());
        assert_eq!(
            decode(&buf[..used - 1]).unwrap(),
            None,
            "partial frame waits for more"
        );
        assert_eq!(
            decode(&[9, 0, 0, 0, 0]).unwrap_err(),
            FrameError::UnknownKind(9)
        );
    }
}

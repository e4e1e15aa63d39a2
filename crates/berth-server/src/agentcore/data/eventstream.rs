//! The AWS event-stream encoding of InvokeAgentRuntimeCommand's output
//! (`docs/design/agentcore-wire.md` §4.2, §6), and the UTF-8 care its string members need.
//!
//! Every message is a `chunk` event whose payload is one `ResponseChunk` member as JSON
//! (`{"contentStart":{}}`, `{"contentDelta":{"stdout":"…"}}`,
//! `{"contentStop":{"exitCode":N,"status":"…"}}`); an error after the stream started is
//! an `exception` message named by the union's **member** name (`runtimeClientError`,
//! lowerCamel), which botocore raises as `EventStreamError` with that code (S5).

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::agentcore::{AwsError, ErrorShape};

/// The HTTP `Content-Type` of an event-stream response.
pub const CONTENT_TYPE: &str = "application/vnd.amazon.eventstream";

fn header(name: &'static str, value: &'static str) -> Header {
    Header::new(name, HeaderValue::String(value.into()))
}

fn encode(message: &Message) -> Bytes {
    let mut out = Vec::with_capacity(message.payload().len() + 96);
    // Fails only for headers or payloads over the format's limits (128 KiB of headers,
    // 24 MiB of payload): ours are a few fixed headers and bounded output chunks.
    if let Err(e) = write_message_to(message, &mut out) {
        tracing::error!(error = %e, "agentcore: cannot encode an event-stream message");
        return Bytes::new();
    }
    Bytes::from(out)
}

/// A `chunk` event carrying one `ResponseChunk` member.
pub fn chunk(member: Value) -> Bytes {
    let payload = serde_json::to_vec(&member).unwrap_or_default();
    encode(
        &Message::new(payload)
            .add_header(header(":event-type", "chunk"))
            .add_header(header(":content-type", "application/json"))
            .add_header(header(":message-type", "event")),
    )
}

pub fn content_start() -> Bytes {
    chunk(json!({"contentStart": {}}))
}

pub fn content_delta(stdout: Option<&str>, stderr: Option<&str>) -> Bytes {
    let mut delta = serde_json::Map::new();
    if let Some(s) = stdout {
        delta.insert("stdout".into(), s.into());
    }
    if let Some(s) = stderr {
        delta.insert("stderr".into(), s.into());
    }
    chunk(json!({ "contentDelta": delta }))
}

pub fn content_stop(exit_code: i32, timed_out: bool) -> Bytes {
    let status = if timed_out { "TIMED_OUT" } else { "COMPLETED" };
    chunk(json!({"contentStop": {"exitCode": exit_code, "status": status}}))
}

/// The stream union's member for an error shape (the shapes the union lacks, such as
/// `ConflictException`, become `runtimeClientError`).
pub fn exception_member(shape: ErrorShape) -> &'static str {
    match shape {
        ErrorShape::Validation => "validationException",
        ErrorShape::AccessDenied | ErrorShape::UnrecognizedClient => "accessDeniedException",
        ErrorShape::ResourceNotFound => "resourceNotFoundException",
        ErrorShape::ServiceQuotaExceeded => "serviceQuotaExceededException",
        ErrorShape::Throttling => "throttlingException",
        ErrorShape::InternalServer => "internalServerException",
        ErrorShape::Conflict | ErrorShape::UnknownOperation | ErrorShape::Other { .. } => {
            "runtimeClientError"
        }
    }
}

/// An `exception` message for an error met after the stream began.
pub fn exception(err: &AwsError) -> Bytes {
    let mut body = json!({"message": err.message});
    if let Some(reason) = err.reason {
        body["reason"] = serde_json::to_value(reason).unwrap_or(Value::Null);
    }
    let payload = serde_json::to_vec(&body).unwrap_or_default();
    encode(
        &Message::new(payload)
            .add_header(header(":exception-type", exception_member(err.shape)))
            .add_header(header(":content-type", "application/json"))
            .add_header(header(":message-type", "exception")),
    )
}

/// Turns output bytes into strings without ever splitting a UTF-8 sequence between two
/// deltas: an incomplete sequence at the end of a chunk waits for the next one; bytes
/// that can never be UTF-8 become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    /// The text of `bytes` (after what was carried), keeping an incomplete tail back.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::with_capacity(self.pending.len());
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is UTF-8 by the error's own account.
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        // An incomplete sequence at the end: carry it.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// Whatever is still carried (the output ended inside a sequence), lossily.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use aws_smithy_eventstream::frame::read_message_from;

    /// The 125-byte example of the wire contract (§6), which botocore decodes.
    #[test]
    fn matches_the_contracts_byte_example() {
        let got = content_delta(Some("hi\n"), None);
        let want = hex::decode(
            "0000007d0000004b856e630f0b3a6576656e742d747970650700056368756e6b0d3a636f6e74656e742d\
             747970650700106170706c69636174696f6e2f6a736f6e0d3a6d6573736167652d747970650700056576\
             656e747b22636f6e74656e7444656c7461223a7b227374646f7574223a2268695c6e227d7d5049088b",
        )
        .unwrap();
        assert_eq!(got.as_ref(), want.as_slice());
    }

    fn decode(bytes: Bytes) -> (Vec<(String, String)>, Value) {
        let msg = read_message_from(bytes).unwrap();
        let headers = msg
            .headers()
            .iter()
            .map(|h| {
                (
                    h.name().as_str().to_string(),
                    h.value().as_string().unwrap().as_str().to_string(),
                )
            })
            .collect();
        (headers, serde_json::from_slice(msg.payload()).unwrap())
    }

    #[test]
    fn start_stop_and_exceptions() {
        let (_, start) = decode(content_start());
        assert_eq!(start, json!({"contentStart": {}}));
        let (_, stop) = decode(content_stop(124, true));
        assert_eq!(
            stop,
            json!({"contentStop": {"exitCode": 124, "status": "TIMED_OUT"}})
        );
        let (_, both) = decode(content_delta(Some("o"), Some("e")));
        assert_eq!(
            both,
            json!({"contentDelta": {"stdout": "o", "stderr": "e"}})
        );
        let err = AwsError::new(
            ErrorShape::Other {
                status: 424,
                code: "RuntimeClientError",
            },
            "the sandbox stopped",
        );
        let (headers, body) = decode(exception(&err));
        assert!(headers.contains(&(":exception-type".into(), "runtimeClientError".into())));
        assert!(headers.contains(&(":message-type".into(), "exception".into())));
        assert_eq!(body, json!({"message": "the sandbox stopped"}));
        let (headers, body) = decode(exception(&AwsError::cannot_parse("bad")));
        assert!(headers.contains(&(":exception-type".into(), "validationException".into())));
        assert_eq!(body["reason"], "CannotParse");
    }

    #[test]
    fn utf8_sequences_are_never_split() {
        let euro = "€".as_bytes(); // 3 bytes
        let mut c = Utf8Carry::default();
        assert_eq!(c.push(&[b'a', euro[0]]), "a");
        assert_eq!(c.push(&euro[1..2]), "");
        assert_eq!(c.push(&[euro[2], b'b']), "€b");
        // Invalid bytes are replaced, not carried.
        assert_eq!(c.push(&[0xff, b'c']), "\u{fffd}c");
        assert_eq!(c.push(&[b'd', 0xc3]), "d");
        // The output ended inside a sequence.
        assert_eq!(c.finish(), "\u{fffd}");
        assert_eq!(c.finish(), "");
        // An invalid byte after an incomplete-looking lead byte.
        assert_eq!(c.push(&[0xe2, b'x']), "\u{fffd}x");
    }
}

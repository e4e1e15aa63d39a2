//! InvokeAgentRuntimeCommand (`POST /runtimes/{runtime}/commands`): `/bin/sh -c
//! <command>` in the runtime session (created or resumed; the agent need not run), its
//! output streamed as AWS event-stream `chunk` events (§4.2): `contentStart`, then
//! `contentDelta` per output chunk (`stdout` or `stderr`, whole UTF-8 characters only),
//! then `contentStop` with the exit code (128 + N for signal N) and `COMPLETED` or
//! `TIMED_OUT`. Errors before the stream starts are ordinary AWS errors; after it, an
//! `exception` message (S5). Dropping the response (the client went away) kills the
//! command.

use std::convert::Infallible;

use axum::body::Body as AxumBody;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_api::CommandRequest;
use berth_core::{CommandStream, ExecEvent};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::Value;

use super::eventstream::{self, Utf8Carry};
use super::sessions::session_id;
use super::{address, echo_trace_headers, set_header, SESSION_HEADER};
use crate::agentcore::validate::Checker;
use crate::agentcore::{Ac, AwsError, Body, PathParams, Query};

/// `timeout` when the body has none, and its bounds (the model's documentation).
pub const DEFAULT_TIMEOUT_S: i64 = 300;
const MIN_TIMEOUT_S: i64 = 1;
const MAX_TIMEOUT_S: i64 = 3600;
const MAX_COMMAND_LEN: usize = 65_536;

/// The body's members, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct CommandBody {
    pub command: String,
    pub timeout_s: i64,
}

pub fn parse_body(body: &serde_json::Map<String, Value>) -> Result<CommandBody, AwsError> {
    let mut c = Checker::new();
    let mut command = None;
    let mut timeout_s = DEFAULT_TIMEOUT_S;
    for (key, value) in body {
        match (key.as_str(), value) {
            ("command", Value::String(s)) => {
                if c.len("command", s, 1, MAX_COMMAND_LEN) {
                    command = Some(s.clone());
                }
            }
            ("command", _) => c.fail("command", "must be a string"),
            ("timeout", Value::Number(n)) => match n.as_i64() {
                Some(t) if c.range("timeout", t, MIN_TIMEOUT_S, MAX_TIMEOUT_S) => timeout_s = t,
                Some(_) => {}
                None => c.fail("timeout", "must be an integer"),
            },
            ("timeout", _) => c.fail("timeout", "must be an integer"),
            (other, _) => c.fail(
                other,
                "is not a member of InvokeAgentRuntimeCommandRequestBody",
            ),
        }
    }
    if !body.contains_key("command") {
        c.fail("command", "is required");
    }
    c.finish()?;
    Ok(CommandBody {
        command: command.unwrap_or_default(),
        timeout_s,
    })
}

/// What the encoder holds between command events.
struct Encoder {
    events: CommandStream,
    stdout: Utf8Carry,
    stderr: Utf8Carry,
    started: bool,
    done: bool,
}

impl Encoder {
    /// The bytes for the next command event (several messages at the end).
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            return Some(eventstream::content_start());
        }
        loop {
            let Some(event) = self.events.next().await else {
                self.done = true;
                return Some(eventstream::exception(&super::runtime_client_error(
                    "the command's output ended without an exit status",
                )));
            };
            match event {
                ExecEvent::Started { .. } => {}
                ExecEvent::Stdout(b) => {
                    let text = self.stdout.push(&b);
                    if !text.is_empty() {
                        return Some(eventstream::content_delta(Some(&text), None));
                    }
                }
                ExecEvent::Stderr(b) => {
                    let text = self.stderr.push(&b);
                    if !text.is_empty() {
                        return Some(eventstream::content_delta(None, Some(&text)));
                    }
                }
                ExecEvent::Exit {
                    code,
                    signal,
                    timed_out,
                    ..
                } => {
                    self.done = true;
                    let mut out = self.flush();
                    let exit = code.unwrap_or_else(|| signal.map_or(-1, |s| 128 + s));
                    out.extend_from_slice(&eventstream::content_stop(exit, timed_out));
                    return Some(out.freeze());
                }
                ExecEvent::Error(api) => {
                    self.done = true;
                    let mut out = self.flush();
                    out.extend_from_slice(&eventstream::exception(&AwsError::from(api)));
                    return Some(out.freeze());
                }
            }
        }
    }

    /// Deltas for output carried at the end (an incomplete UTF-8 sequence).
    fn flush(&mut self) -> BytesMut {
        let mut out = BytesMut::new();
        let (o, e) = (self.stdout.finish(), self.stderr.finish());
        if !o.is_empty() {
            out.extend_from_slice(&eventstream::content_delta(Some(&o), None));
        }
        if !e.is_empty() {
            out.extend_from_slice(&eventstream::content_delta(None, Some(&e)));
        }
        out
    }
}

/// `POST /runtimes/{runtime}/commands`.
pub(crate) async fn command(
    Ac(ac): Ac,
    PathParams(segment): PathParams<String>,
    Query(query): Query,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let sid = match session_id(&headers, true) {
        Ok(sid) => sid,
        Err(e) => return e.into_response(),
    };
    let result = async {
        let addr = address::parse(ac.config(), &segment, &query)?;
        let req = parse_body(&body)?;
        let target = ac
            .resolve(&addr.runtime_id, addr.qualifier.as_deref())
            .await?;
        let s = ac.open_session(target, &sid).await?;
        let events = ac
            .core()
            .run_command(
                &s.native,
                CommandRequest {
                    command: Some(req.command),
                    timeout_s: Some(req.timeout_s as f64),
                    runtime: Some(s.target.native_runtime.clone()),
                    ..Default::default()
                },
            )
            .await?;
        let encoder = Encoder {
            events,
            stdout: Utf8Carry::default(),
            stderr: Utf8Carry::default(),
            started: false,
            done: false,
        };
        let stream = futures::stream::unfold(encoder, |mut enc| async move {
            let bytes = enc.next().await?;
            Some((Ok::<_, Infallible>(bytes), enc))
        });
        let mut resp = (StatusCode::OK, AxumBody::from_stream(stream)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(eventstream::CONTENT_TYPE),
        );
        Ok::<_, AwsError>(resp)
    }
    .await;
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    set_header(&mut resp, SESSION_HEADER, &sid);
    echo_trace_headers(&mut resp, &headers);
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use aws_smithy_eventstream::frame::read_message_from;
    use serde_json::json;

    fn body(v: Value) -> serde_json::Map<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn bodies() {
        assert_eq!(
            parse_body(&body(json!({"command": "ls"}))).unwrap(),
            CommandBody {
                command: "ls".into(),
                timeout_s: 300
            }
        );
        assert_eq!(
            parse_body(&body(json!({"command": "ls", "timeout": 5})))
                .unwrap()
                .timeout_s,
            5
        );
        for bad in [
            json!({}),
            json!({"command": ""}),
            json!({"command": 1}),
            json!({"command": "ls", "timeout": 0}),
            json!({"command": "ls", "timeout": 3601}),
            json!({"command": "ls", "timeout": 1.5}),
            json!({"command": "ls", "extra": true}),
        ] {
            assert!(parse_body(&body(bad.clone())).is_err(), "{bad}");
        }
    }

    fn payloads(mut bytes: Bytes) -> Vec<Value> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            let msg = read_message_from(bytes.split_to(len)).unwrap();
            out.push(serde_json::from_slice(msg.payload()).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn events_become_chunks_in_order() {
        let euro = "€".as_bytes();
        let events: CommandStream = Box::pin(futures::stream::iter([
            ExecEvent::Started {
                command_id: "c".into(),
                session_id: "s".into(),
            },
            ExecEvent::Stdout(Bytes::from_static(b"hi\n")),
            ExecEvent::Stderr(Bytes::copy_from_slice(&euro[..2])),
            ExecEvent::Stderr(Bytes::copy_from_slice(&euro[2..])),
            ExecEvent::Stdout(Bytes::copy_from_slice(&euro[..1])),
            ExecEvent::Exit {
                code: None,
                signal: Some(9),
                timed_out: true,
                duration_ms: 1,
            },
        ]));
        let mut enc = Encoder {
            events,
            stdout: Utf8Carry::default(),
            stderr: Utf8Carry::default(),
            started: false,
            done: false,
        };
        let mut all = Vec::new();
        while let Some(b) = enc.next().await {
            all.extend(payloads(b));
        }
        assert_eq!(
            all,
            [
                json!({"contentStart": {}}),
                json!({"contentDelta": {"stdout": "hi\n"}}),
                json!({"contentDelta": {"stderr": "€"}}),
                json!({"contentDelta": {"stdout": "\u{fffd}"}}),
                json!({"contentStop": {"exitCode": 137, "status": "TIMED_OUT"}}),
            ]
        );
    }
}

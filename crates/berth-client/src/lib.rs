//! A typed client for Berth's native `/v1` API.

use std::pin::Pin;

use berth_api::{
    ApiError, CommandEvent, CommandRequest, CreateSession, ErrorBody, ErrorCode, Runtime,
    RuntimeSpec, Session,
};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an API error.
    #[error("{}", .0.message)]
    Api(ApiError),
    #[error("cannot reach the Berth server at {url}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("request to the Berth server failed")]
    Transport(#[source] reqwest::Error),
    #[error("the server sent something this client cannot read: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

pub use berth_api::FileInfo;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<CommandEvent, ClientError>> + Send>>;
pub type RawEventStream = Pin<Box<dyn Stream<Item = Result<RawEvent, ClientError>> + Send>>;

/// A command event from the binary frame stream: output as raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum RawEvent {
    /// `started`, `exit` or `error`.
    Event(CommandEvent),
    Stdout(Bytes),
    Stderr(Bytes),
}
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, ClientError>> + Send>>;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(base_url: &str, token: &str) -> Self {
        Self {
            http: reqwest::Client::builder().build().unwrap_or_default(),
            base: base_url.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
    }

    async fn send(&self, rb: RequestBuilder) -> Result<Response, ClientError> {
        let resp = rb.send().await.map_err(|e| {
            if e.is_connect() {
                ClientError::Connect {
                    url: self.base.clone(),
                    source: e,
                }
            } else {
                ClientError::Transport(e)
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.bytes().await.map_err(ClientError::Transport)?;
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => Err(ClientError::Api(e.error)),
            Err(_) => Err(ClientError::Protocol(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ))),
        }
    }

    async fn json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T, ClientError> {
        let resp = self.send(rb).await?;
        let body = resp.bytes().await.map_err(ClientError::Transport)?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn create_runtime(&self, spec: &RuntimeSpec) -> Result<Runtime, ClientError> {
        self.json(self.req(Method::POST, "/v1/runtimes").json(spec))
            .await
    }
    pub async fn list_runtimes(&self) -> Result<Vec<Runtime>, ClientError> {
        self.json(self.req(Method::GET, "/v1/runtimes")).await
    }
    pub async fn get_runtime(&self, name: &str) -> Result<Runtime, ClientError> {
        self.json(self.req(Method::GET, &format!("/v1/runtimes/{}", enc(name))))
            .await
    }
    pub async fn delete_runtime(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.req(Method::DELETE, &format!("/v1/runtimes/{}", enc(name))))
            .await
            .map(drop)
    }

    pub async fn create_session(&self, req: &CreateSession) -> Result<Session, ClientError> {
        self.json(self.req(Method::POST, "/v1/sessions").json(req))
            .await
    }
    pub async fn list_sessions(&self) -> Result<Vec<Session>, ClientError> {
        self.json(self.req(Method::GET, "/v1/sessions")).await
    }
    pub async fn get_session(&self, id: &str) -> Result<Session, ClientError> {
        self.json(self.req(Method::GET, &format!("/v1/sessions/{}", enc(id))))
            .await
    }
    pub async fn stop_session(&self, id: &str) -> Result<Session, ClientError> {
        self.json(self.req(Method::POST, &format!("/v1/sessions/{}/stop", enc(id))))
            .await
    }
    pub async fn delete_session(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.req(Method::DELETE, &format!("/v1/sessions/{}", enc(id))))
            .await
            .map(drop)
    }

    /// Create an access key for SigV4 clients; the answer holds its secret (admin only).
    pub async fn create_access_key(
        &self,
        req: &berth_api::CreateAccessKey,
    ) -> Result<berth_api::CreatedAccessKey, ClientError> {
        self.json(self.req(Method::POST, "/v1/access-keys").json(req))
            .await
    }
    pub async fn list_access_keys(&self) -> Result<Vec<berth_api::AccessKey>, ClientError> {
        self.json(self.req(Method::GET, "/v1/access-keys")).await
    }
    pub async fn delete_access_key(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.req(Method::DELETE, &format!("/v1/access-keys/{}", enc(id))))
            .await
            .map(drop)
    }

    /// Run a command; events arrive as the process produces output.
    pub async fn run_command(
        &self,
        session: &str,
        req: &CommandRequest,
    ) -> Result<EventStream, ClientError> {
        let resp = self
            .send(
                self.req(
                    Method::POST,
                    &format!("/v1/sessions/{}/commands", enc(session)),
                )
                .json(req),
            )
            .await?;
        Ok(ndjson(resp))
    }

    /// Run a command and receive its output as raw bytes (binary frames, no base64):
    /// the fast path for large output.
    pub async fn run_command_raw(
        &self,
        session: &str,
        req: &CommandRequest,
    ) -> Result<RawEventStream, ClientError> {
        let rb = self
            .req(
                Method::POST,
                &format!("/v1/sessions/{}/commands", enc(session)),
            )
            .header(reqwest::header::ACCEPT, berth_api::frames::CONTENT_TYPE)
            .json(req);
        Ok(frames(self.send(rb).await?))
    }

    pub async fn signal_command(
        &self,
        session: &str,
        command_id: &str,
        signal: &str,
    ) -> Result<(), ClientError> {
        let path = format!(
            "/v1/sessions/{}/commands/{}/signal",
            enc(session),
            enc(command_id)
        );
        self.send(
            self.req(Method::POST, &path)
                .json(&berth_api::SignalRequest {
                    signal: signal.into(),
                }),
        )
        .await
        .map(drop)
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Create a shell (`body`: `shell_id`, `command`, `width`, `height`); returns its
    /// `ShellInfo` as JSON.
    pub async fn create_shell(
        &self,
        session: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.json(
            self.req(
                Method::POST,
                &format!("/v1/sessions/{}/shells", enc(session)),
            )
            .json(body),
        )
        .await
    }

    pub async fn list_shells(&self, session: &str) -> Result<serde_json::Value, ClientError> {
        self.json(self.req(
            Method::GET,
            &format!("/v1/sessions/{}/shells", enc(session)),
        ))
        .await
    }

    pub async fn kill_shell(&self, session: &str, shell: &str) -> Result<(), ClientError> {
        let path = format!("/v1/sessions/{}/shells/{}", enc(session), enc(shell));
        self.send(self.req(Method::DELETE, &path)).await.map(drop)
    }

    /// The shell's asciicast v2 recording.
    pub async fn shell_recording(
        &self,
        session: &str,
        shell: &str,
    ) -> Result<ByteStream, ClientError> {
        let path = format!(
            "/v1/sessions/{}/shells/{}/recording",
            enc(session),
            enc(shell)
        );
        let resp = self.send(self.req(Method::GET, &path)).await?;
        Ok(Box::pin(
            resp.bytes_stream()
                .map(|r| r.map_err(ClientError::Transport)),
        ))
    }

    /// The `ws://` URL that attaches to a shell (see the shells API).
    pub fn shell_attach_url(&self, session: &str, shell: &str, query: &[(&str, String)]) -> String {
        let base = self
            .base
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        let mut url = format!(
            "{base}/v1/sessions/{}/shells/{}/attach",
            enc(session),
            enc(shell)
        );
        for (i, (k, v)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(k);
            url.push('=');
            url.push_str(&enc(v));
        }
        url
    }

    /// Stream a file (or, with `tar`, a tar archive of a file or directory).
    pub async fn read_file(
        &self,
        session: &str,
        path: &str,
        tar: bool,
    ) -> Result<ByteStream, ClientError> {
        let url = format!(
            "/v1/sessions/{}/files/{}",
            enc(session),
            path.trim_start_matches('/')
        );
        let resp = self
            .send(self.req(Method::GET, &url).query(&[("tar", tar)]))
            .await?;
        Ok(Box::pin(
            resp.bytes_stream()
                .map(|r| r.map_err(ClientError::Transport)),
        ))
    }

    pub async fn stat_file(&self, session: &str, path: &str) -> Result<FileInfo, ClientError> {
        let url = format!(
            "/v1/sessions/{}/files/{}",
            enc(session),
            path.trim_start_matches('/')
        );
        self.json(self.req(Method::GET, &url).query(&[("stat", true)]))
            .await
    }

    /// Upload a file, or with `tar` a tar archive unpacked into the directory `path`.
    pub async fn write_file(
        &self,
        session: &str,
        path: &str,
        tar: bool,
        body: reqwest::Body,
    ) -> Result<u64, ClientError> {
        #[derive(serde::Deserialize)]
        struct Written {
            bytes: u64,
        }
        let url = format!(
            "/v1/sessions/{}/files/{}",
            enc(session),
            path.trim_start_matches('/')
        );
        let w: Written = self
            .json(
                self.req(Method::PUT, &url)
                    .query(&[("tar", tar)])
                    .body(body),
            )
            .await?;
        Ok(w.bytes)
    }
}

/// Percent-encode one path segment.
fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Split a streamed response into JSON lines.
fn ndjson(resp: Response) -> EventStream {
    decoded(resp, |buf| {
        let Some(pos) = buf.iter().position(|b| *b == b'\n') else {
            return Ok(None);
        };
        let line = buf.split_to(pos + 1);
        serde_json::from_slice::<CommandEvent>(&line[..pos])
            .map(Some)
            .map_err(|e| ClientError::Protocol(format!("bad event line: {e}")))
    })
}

/// Split a binary frame response into events. Output is handed on as slices of the
/// received chunks, never copied: a frame whose payload spans several chunks arrives as
/// several `Stdout`/`Stderr` pieces (frame boundaries carry no meaning).
fn frames(resp: Response) -> RawEventStream {
    frame_events(Box::pin(resp.bytes_stream()))
}

type BodyStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

fn frame_events(body: BodyStream) -> RawEventStream {
    let state = FrameReader {
        body,
        chunk: Bytes::new(),
        head: BytesMut::new(),
        output: None,
        event: None,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut reader| async move {
        let item = reader.next_event().await?;
        if item.is_err() {
            reader.done = true;
        }
        Some((item, reader))
    }))
}

/// Incremental decoder state of [`frames`].
struct FrameReader {
    body: BodyStream,
    /// The unconsumed rest of the last chunk received.
    chunk: Bytes,
    /// A frame header being collected (headers may straddle chunks).
    head: BytesMut,
    /// Inside an output frame: its kind and the payload bytes still to come.
    output: Option<(u8, usize)>,
    /// Inside an event frame: the JSON collected so far and its full length.
    event: Option<(BytesMut, usize)>,
    done: bool,
}

impl FrameReader {
    async fn next_event(&mut self) -> Option<Result<RawEvent, ClientError>> {
        use berth_api::frames::{KIND_EVENT, KIND_STDERR, KIND_STDOUT};
        if self.done {
            return None;
        }
        loop {
            if self.chunk.is_empty() {
                match self.body.next().await {
                    Some(Ok(chunk)) => {
                        self.chunk = chunk;
                        continue;
                    }
                    Some(Err(e)) => return Some(Err(ClientError::Transport(e))),
                    None if self.head.is_empty()
                        && self.output.is_none()
                        && self.event.is_none() =>
                    {
                        return None
                    }
                    None => {
                        let err = ClientError::Protocol("stream ended inside an event".into());
                        return Some(Err(err));
                    }
                }
            }
            if let Some((kind, remaining)) = self.output {
                let piece = self.chunk.split_to(remaining.min(self.chunk.len()));
                let left = remaining - piece.len();
                self.output = (left > 0).then_some((kind, left));
                return Some(Ok(if kind == KIND_STDOUT {
                    RawEvent::Stdout(piece)
                } else {
                    RawEvent::Stderr(piece)
                }));
            }
            if let Some((json, len)) = self.event.as_mut() {
                let want = (*len - json.len()).min(self.chunk.len());
                json.extend_from_slice(&self.chunk.split_to(want));
                if json.len() < *len {
                    continue;
                }
                let (json, _) = self.event.take().unwrap_or_default();
                return Some(
                    serde_json::from_slice::<CommandEvent>(&json)
                        .map(RawEvent::Event)
                        .map_err(|e| ClientError::Protocol(format!("bad event frame: {e}"))),
                );
            }
            let want = (berth_api::frames::HEADER_LEN - self.head.len()).min(self.chunk.len());
            self.head.extend_from_slice(&self.chunk.split_to(want));
            if self.head.len() < berth_api::frames::HEADER_LEN {
                continue;
            }
            let head = self.head.split();
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            match head[0] {
                KIND_STDOUT | KIND_STDERR if len == 0 => {}
                kind @ (KIND_STDOUT | KIND_STDERR) => self.output = Some((kind, len)),
                KIND_EVENT => self.event = Some((BytesMut::with_capacity(len), len)),
                other => {
                    let e = berth_api::frames::FrameError::UnknownKind(other);
                    return Some(Err(ClientError::Protocol(e.to_string())));
                }
            }
        }
    }
}

/// Turn a streamed body into items with `next`, which takes one complete item off the
/// front of the buffer (`Ok(None)`: needs more bytes). A decode error ends the stream.
fn decoded<T, F>(
    resp: Response,
    next: F,
) -> Pin<Box<dyn Stream<Item = Result<T, ClientError>> + Send>>
where
    T: Send + 'static,
    F: FnMut(&mut BytesMut) -> Result<Option<T>, ClientError> + Send + 'static,
{
    let state = (resp.bytes_stream(), BytesMut::new(), next, false);
    Box::pin(futures::stream::unfold(
        state,
        |(mut body, mut buf, mut next, done)| async move {
            if done {
                return None;
            }
            loop {
                match next(&mut buf) {
                    Ok(Some(item)) => return Some((Ok(item), (body, buf, next, false))),
                    Ok(None) => {}
                    Err(e) => return Some((Err(e), (body, buf, next, true))),
                }
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        return Some((Err(ClientError::Transport(e)), (body, buf, next, true)))
                    }
                    None if buf.is_empty() => return None,
                    None => {
                        let err = ClientError::Protocol("stream ended inside an event".into());
                        return Some((Err(err), (body, buf, next, true)));
                    }
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use berth_api::frames::{header, KIND_EVENT, KIND_STDERR, KIND_STDOUT};

    fn stream_of(wire: &[u8], piece: usize) -> BodyStream {
        let chunks: Vec<reqwest::Result<Bytes>> = wire
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Box::pin(futures::stream::iter(chunks))
    }

    fn wire() -> Vec<u8> {
        let started = serde_json::to_vec(&CommandEvent::Started {
            command_id: "c".into(),
            session_id: "s".into(),
        })
        .unwrap();
        let mut out = Vec::new();
        out.extend(header(KIND_EVENT, started.len()));
        out.extend(&started);
        out.extend(header(KIND_STDOUT, 1000));
        out.extend((0..1000u32).map(|i| (i % 251) as u8));
        out.extend(header(KIND_STDOUT, 0));
        out.extend(header(KIND_STDERR, 3));
        out.extend(b"err");
        out
    }

    #[tokio::test]
    async fn frames_decode_the_same_whatever_the_chunking() {
        for piece in [1, 2, 5, 6, 7, 64, 999, 100_000] {
            let mut events = frame_events(stream_of(&wire(), piece));
            let (mut stdout, mut stderr, mut started) = (Vec::new(), Vec::new(), 0);
            while let Some(ev) = events.next().await {
                match ev.unwrap() {
                    RawEvent::Stdout(b) => stdout.extend_from_slice(&b),
                    RawEvent::Stderr(b) => stderr.extend_from_slice(&b),
                    RawEvent::Event(CommandEvent::Started { .. }) => started += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
            let want: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
            assert_eq!(stdout, want, "chunks of {piece}");
            assert_eq!(stderr, b"err", "chunks of {piece}");
            assert_eq!(started, 1, "chunks of {piece}");
        }
    }

    #[tokio::test]
    async fn truncated_or_unknown_frames_are_errors() {
        let mut wire = wire();
        wire.truncate(wire.len() - 1);
        let results: Vec<_> = frame_events(stream_of(&wire, 7)).collect().await;
        assert!(matches!(
            results.last(),
            Some(Err(ClientError::Protocol(_)))
        ));

        let results: Vec<_> = frame_events(stream_of(&header(9, 0), 5)).collect().await;
        assert_eq!(results.len(), 1);
        assert!(matches!(&results[0], Err(ClientError::Protocol(m)) if m.contains("kind 9")));
    }
}

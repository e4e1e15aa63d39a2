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

/// Split a binary frame response into events.
fn frames(resp: Response) -> RawEventStream {
    use berth_api::frames::{decode, Frame, HEADER_LEN};
    decoded(resp, |buf| {
        let (frame, used) = match decode(buf) {
            Ok(Some(found)) => found,
            Ok(None) => return Ok(None),
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        };
        // Output payloads are split off the buffer, not copied.
        let payload = |buf: &mut BytesMut| {
            let mut frame = buf.split_to(used);
            bytes::Buf::advance(&mut frame, HEADER_LEN);
            frame.freeze()
        };
        Ok(Some(match frame {
            Frame::Event(ev) => {
                let _ = buf.split_to(used);
                RawEvent::Event(ev)
            }
            Frame::Stdout(_) => RawEvent::Stdout(payload(buf)),
            Frame::Stderr(_) => RawEvent::Stderr(payload(buf)),
        }))
    })
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

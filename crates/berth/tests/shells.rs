//! Interactive shells through the real server: the REST routes and the
//! `v5.channel.k8s.io` attach WebSocket, driven with a plain tokio-tungstenite client.
//! No assertion depends on timing: waits poll until `common::DEADLINE`.

mod common;

use std::time::{Duration, Instant};

use berth_api::shell::{channel, ShellInfo};
use berth_api::{Isolation, SessionState};
use common::drivers::runtime_with;
use common::{uniq, Server, DEADLINE};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One attached client and everything it has received.
struct Term {
    ws: Ws,
    /// The first status frame.
    first: Value,
    /// Every channel-1 byte, snapshot included.
    out: Vec<u8>,
    /// Status frames after the first.
    statuses: Vec<Value>,
    heartbeats: Vec<Vec<u8>>,
    /// The close code, once the server closed.
    closed: Option<u16>,
    response_headers: tokio_tungstenite::tungstenite::http::HeaderMap,
}

impl Term {
    fn offset(&self) -> u64 {
        self.first["metadata"]["offset"].as_u64().expect("offset")
    }
    fn snapshot_bytes(&self) -> usize {
        self.first["metadata"]["snapshotBytes"]
            .as_u64()
            .expect("snapshotBytes") as usize
    }
    /// Output after the snapshot.
    fn live(&self) -> &[u8] {
        &self.out[self.snapshot_bytes()..]
    }
    /// The offset of the next byte this client has not seen.
    fn position(&self) -> u64 {
        self.offset() + self.live().len() as u64
    }
    /// The last 2000 characters of the output (for failure messages: a flood is 40 MB).
    fn tail(&self) -> String {
        let text = self.text();
        let start = text.floor_char_boundary(text.len().saturating_sub(2000));
        text[start..].to_string()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(self.live()).into_owned()
    }

    async fn send(&mut self, chan: u8, payload: &[u8]) {
        let mut msg = vec![chan];
        msg.extend_from_slice(payload);
        self.ws
            .send(Message::Binary(msg.into()))
            .await
            .expect("send to the shell");
    }

    async fn type_(&mut self, keys: &str) {
        self.send(channel::STDIN, keys.as_bytes()).await;
    }

    /// Read one message; `false` once the connection is over.
    async fn pump(&mut self) -> bool {
        let msg = match self.ws.next().await {
            Some(Ok(m)) => m,
            _ => return false,
        };
        match msg {
            Message::Binary(b) => {
                assert!(
                    b.len() <= berth_api::shell::MAX_MESSAGE,
                    "message of {} bytes",
                    b.len()
                );
                assert!(!b.is_empty(), "empty message from the server");
                match b[0] {
                    channel::STDOUT => self.out.extend_from_slice(&b[1..]),
                    channel::STATUS => self
                        .statuses
                        .push(serde_json::from_slice(&b[1..]).expect("status JSON")),
                    channel::HEARTBEAT => self.heartbeats.push(b[1..].to_vec()),
                    other => panic!("message on channel {other} from the server"),
                }
            }
            Message::Close(frame) => {
                self.closed = Some(frame.map_or(1005, |f| u16::from(f.code)));
            }
            _ => {}
        }
        true
    }

    /// Read until `done(self)` holds. Fails after DEADLINE with no message at all, or
    /// after ten DEADLINEs in all: a 40 MB flood on a loaded machine can take longer
    /// than one DEADLINE while it keeps arriving.
    async fn until(&mut self, what: &str, done: impl Fn(&Term) -> bool) {
        let overall = Instant::now() + DEADLINE * 10;
        while !done(self) {
            let left = DEADLINE.min(overall.saturating_duration_since(Instant::now()));
            match tokio::time::timeout(left, self.pump()).await {
                Ok(true) => {}
                Ok(false) => {
                    assert!(
                        done(self),
                        "connection ended while waiting for {what}; output ends: {:?}; statuses: {:?}",
                        self.tail(),
                        self.statuses
                    );
                    return;
                }
                Err(_) => panic!(
                    "timed out waiting for {what}; output ends: {:?}; statuses: {:?}",
                    self.tail(),
                    self.statuses
                ),
            }
        }
    }

    async fn until_output(&mut self, needle: &str) {
        self.until(&format!("output {needle:?}"), |t| t.text().contains(needle))
            .await;
    }

    async fn until_status(&mut self, n: usize) -> Value {
        self.until(&format!("{n} status frames"), |t| t.statuses.len() >= n)
            .await;
        self.statuses[n - 1].clone()
    }
}

fn attach_request(
    s: &Server,
    session: &str,
    shell: &str,
    query: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let url = format!(
        "ws://127.0.0.1:{}/v1/sessions/{session}/shells/{shell}/attach?{query}",
        s.port
    );
    let mut req = url.into_client_request().expect("request");
    let h = req.headers_mut();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", s.token)).expect("header"),
    );
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("v5.channel.k8s.io"),
    );
    req
}

/// Attach and read the first status frame and the snapshot.
async fn attach(s: &Server, session: &str, shell: &str, query: &str) -> Term {
    let (ws, resp) = tokio_tungstenite::connect_async(attach_request(s, session, shell, query))
        .await
        .unwrap_or_else(|e| panic!("attach {shell}?{query}: {e:?}"));
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("v5.channel.k8s.io")
    );
    let mut t = Term {
        ws,
        first: Value::Null,
        out: Vec::new(),
        statuses: Vec::new(),
        heartbeats: Vec::new(),
        closed: None,
        response_headers: resp.headers().clone(),
    };
    t.until("the first status frame", |t| !t.statuses.is_empty())
        .await;
    t.first = t.statuses.remove(0);
    assert_eq!(t.first["kind"], "Status", "{}", t.first);
    assert_eq!(t.first["status"], "Success", "{}", t.first);
    assert_eq!(t.first["metadata"]["shellId"], shell, "{}", t.first);
    let snap = t.snapshot_bytes();
    t.until("the snapshot", |t| t.out.len() >= snap).await;
    t
}

async fn open_shell(s: &Server, session: &str, body: Value) -> reqwest::Response {
    s.http(
        reqwest::Method::POST,
        &format!("/v1/sessions/{session}/shells"),
    )
    .json(&body)
    .send()
    .await
    .expect("POST shells")
}

async fn open_ok(s: &Server, session: &str, body: Value) -> ShellInfo {
    let r = open_shell(s, session, body).await;
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    assert_eq!(status, 201, "open shell: {text}");
    serde_json::from_str(&text).expect("ShellInfo")
}

async fn list(s: &Server, session: &str) -> Vec<ShellInfo> {
    s.http(
        reqwest::Method::GET,
        &format!("/v1/sessions/{session}/shells"),
    )
    .send()
    .await
    .expect("GET shells")
    .json()
    .await
    .expect("shell list")
}

async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("JSON error body");
    (status, body)
}

/// Check that `cast` is asciicast v2 (a header object, then `[time, code, data]` arrays
/// with times that never go back) and return the header and the events.
fn parse_cast(cast: &str) -> (Value, Vec<(f64, String, String)>) {
    let mut lines = cast.lines();
    let header: Value = serde_json::from_str(lines.next().expect("a header line"))
        .unwrap_or_else(|e| panic!("header JSON: {e}\n{cast}"));
    assert_eq!(header["version"], 2, "{header}");
    assert!(header["width"].as_u64().is_some(), "{header}");
    assert!(header["height"].as_u64().is_some(), "{header}");
    assert!(
        header["timestamp"].as_u64().unwrap_or(0) > 1_600_000_000,
        "{header}"
    );
    assert_eq!(header["env"]["TERM"], "xterm-256color", "{header}");
    let mut events = Vec::new();
    let mut last = 0.0;
    for l in lines {
        let ev: (f64, String, String) =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("event {l:?}: {e}"));
        assert!(ev.0 >= last, "time goes back at {l}");
        last = ev.0;
        assert!(["o", "r", "m"].contains(&ev.1.as_str()), "{l}");
        events.push(ev);
    }
    (header, events)
}

/// The text of a recording's output events.
fn cast_output(events: &[(f64, String, String)]) -> String {
    events
        .iter()
        .filter(|e| e.1 == "o")
        .map(|e| e.2.as_str())
        .collect()
}

async fn fetch_recording(s: &Server, session: &str, shell: &str) -> String {
    let r = s
        .http(
            reqwest::Method::GET,
            &format!("/v1/sessions/{session}/shells/{shell}/recording"),
        )
        .send()
        .await
        .expect("GET recording");
    let status = r.status();
    let text = r.text().await.expect("recording body");
    assert_eq!(status, 200, "{text}");
    text
}

/// Fetch the recording until its output contains `needle`; returns that output.
async fn recording_until(s: &Server, session: &str, shell: &str, needle: &str) -> String {
    common::poll(
        &format!("{needle:?} in the recording of {shell}"),
        || async {
            let (_, events) = parse_cast(&fetch_recording(s, session, shell).await);
            let out = cast_output(&events);
            out.contains(needle).then_some(out)
        },
    )
    .await
}

/// The numbers of the complete output lines that are exactly `<prefix><number>`.
fn numbered(text: &str, prefix: &str) -> Vec<u32> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .split(['\r', '\n'])
        .filter_map(|l| l.strip_prefix(prefix)?.parse().ok())
        .collect()
}

both!(typing_resize_heartbeat_several_clients_and_watchers);
async fn typing_resize_heartbeat_several_clients_and_watchers(s: Server, _: Isolation) {
    let session = uniq("sh");
    // The session is created on first use.
    let info = open_ok(
        &s,
        &session,
        json!({"shell_id": "main", "width": 100, "height": 30}),
    )
    .await;
    assert_eq!(info.shell_id, "main");
    assert_eq!((info.width, info.height), (100, 30));
    assert!(info.running);

    let mut a = attach(&s, &session, "main", "").await;
    assert_eq!(a.first["metadata"]["reconnected"], false);
    assert_eq!(
        a.response_headers
            .get("x-berth-shell-id")
            .and_then(|v| v.to_str().ok()),
        Some("main")
    );
    a.type_("echo hi\r").await;
    a.until("hi on a line of its own", |t| {
        t.text().split(['\r', '\n']).any(|l| l == "hi")
    })
    .await;

    a.send(channel::RESIZE, br#"{"width":123,"height":45}"#)
        .await;
    a.type_("stty size\r").await;
    a.until_output("45 123").await;

    a.send(channel::HEARTBEAT, b"beat-1").await;
    a.until("the heartbeat echo", |t| !t.heartbeats.is_empty())
        .await;
    assert_eq!(a.heartbeats[0], b"beat-1");

    // A second read-write client and a watcher see the same bytes at the same offsets.
    let mut b = attach(&s, &session, "main", "width=123&height=45").await;
    let mut w = attach(&s, &session, "main", "mode=watch").await;
    let listed = list(&s, &session).await;
    let main = listed.iter().find(|i| i.shell_id == "main").expect("main");
    assert_eq!((main.clients, main.watchers), (2, 1), "{listed:?}");
    a.type_("for i in 1 2 3; do echo line$i; done; echo END$((6*7))\r")
        .await;
    for t in [&mut a, &mut b, &mut w] {
        t.until_output("END42").await;
    }
    let end = a.position().min(b.position()).min(w.position());
    let from = b.offset().max(w.offset());
    let slice = |t: &Term| {
        let start = (from - t.offset()) as usize;
        let stop = (end - t.offset()) as usize;
        t.live()[start..stop].to_vec()
    };
    assert_eq!(slice(&a), slice(&b));
    assert_eq!(slice(&a), slice(&w));
    assert!(String::from_utf8_lossy(&slice(&w)).contains("line3"));

    // The watcher cannot type: a Forbidden status, and the command does not run.
    w.type_("touch /tmp/watched\r").await;
    let st = w.until_status(1).await;
    assert_eq!(st["status"], "Failure", "{st}");
    assert_eq!(st["reason"], "Forbidden", "{st}");
    a.type_("test -e /tmp/watched && echo YES$((1+1)) || echo NO$((1+1))\r")
        .await;
    a.until_output("NO2").await;
    assert!(!a.text().contains("YES2"));

    // Leaving with the close channel keeps the shell running.
    b.send(channel::CLOSE, b"").await;
    b.until("the server's close", |t| t.closed.is_some()).await;
    assert_eq!(b.closed, Some(1000));
    a.type_("echo still$((1+1))\r").await;
    a.until_output("still2").await;
}

both!(reattach_with_the_offset_loses_and_duplicates_nothing);
async fn reattach_with_the_offset_loses_and_duplicates_nothing(s: Server, _: Isolation) {
    let session = uniq("sh-re");
    open_ok(&s, &session, json!({"shell_id": "counter"})).await;
    let mut t = attach(&s, &session, "counter", "").await;
    let mut seen: Vec<u8> = Vec::new();
    t.type_("for i in $(seq 1 300); do echo $i; sleep 0.01; done; echo DONE$((1+1))\r")
        .await;
    let mut reattaches = 0;
    loop {
        // Read a little, then cut the connection without a goodbye.
        let target = t.live().len() + 300;
        t.until("more counter output", |t| {
            t.live().len() >= target || t.text().contains("DONE2")
        })
        .await;
        let finished = t.text().contains("DONE2");
        seen.extend_from_slice(t.live());
        if finished {
            break;
        }
        let pos = t.position();
        drop(t);
        reattaches += 1;
        t = attach(&s, &session, "counter", &format!("offset={pos}")).await;
        assert_eq!(t.first["metadata"]["reconnected"], true, "{}", t.first);
        assert_eq!(t.snapshot_bytes(), 0, "{}", t.first);
        assert_eq!(t.offset(), pos, "{}", t.first);
    }
    let text = String::from_utf8_lossy(&seen);
    let numbers: Vec<u32> = text
        .split(['\r', '\n'])
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(
        numbers,
        (1..=300).collect::<Vec<u32>>(),
        "after {reattaches} reattaches: {text:?}"
    );
    assert!(reattaches > 0, "the loop ended before any reattach");
}

both!(shells_survive_detach_and_redraw_on_reattach);
async fn shells_survive_detach_and_redraw_on_reattach(s: Server, _: Isolation) {
    let session = uniq("sh-redraw");
    open_ok(&s, &session, json!({"shell_id": "main"})).await;
    let mut t = attach(&s, &session, "main", "").await;
    t.type_("echo $((6*7))-marker\r").await;
    t.until_output("42-marker").await;
    drop(t);
    // Reattached without an offset, the screen is redrawn from the guest's terminal
    // model: the snapshot shows what was there.
    let t = attach(&s, &session, "main", "").await;
    let screen = String::from_utf8_lossy(&t.out[..t.snapshot_bytes()]);
    assert!(screen.contains("42-marker"), "{screen:?}");
}

// Namespace only: the attach protocol's parsing and status frames are the server's, the same for every driver.
#[tokio::test]
async fn exit_status_malformed_frames_and_missing_shells() {
    let Some(s) = Server::start("exit_status_malformed_frames_and_missing_shells").await else {
        return;
    };
    let session = uniq("sh-bad");
    open_ok(&s, &session, json!({"shell_id": "x"})).await;

    // Attaching to a missing shell or session: a JSON 404 before any upgrade.
    for (sess, shell) in [(session.as_str(), "nope"), ("no-such-session", "x")] {
        match tokio_tungstenite::connect_async(attach_request(&s, sess, shell, "")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 404);
                let body: Value =
                    serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                        .expect("JSON body");
                assert_eq!(body["error"]["code"], "not_found", "{body}");
            }
            other => panic!("attach to {sess}/{shell}: {:?}", other.map(|_| ())),
        }
    }
    let (code, body) = error_of(
        s.http(
            reqwest::Method::GET,
            &format!("/v1/sessions/{session}/shells/x/attach?mode=sideways"),
        )
        .send()
        .await
        .expect("GET"),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(body["error"]["field"], "mode", "{body}");
    let (code, body) = error_of(
        s.http(
            reqwest::Method::GET,
            &format!("/v1/sessions/{session}/shells/x/attach?offset=999999999"),
        )
        .send()
        .await
        .expect("GET"),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["field"], "offset", "{body}");

    let mut t = attach(&s, &session, "x", "").await;
    let mut n = 0;
    for (msg, what) in [
        (vec![9u8, 1, 2], "unknown channel"),
        (b"\x04{\"width\":".to_vec(), "resize"),
        (b"\x04{\"width\":0,\"height\":10}".to_vec(), "resize"),
        (vec![], "empty"),
    ] {
        t.ws.send(Message::Binary(msg.into())).await.expect("send");
        n += 1;
        let st = t.until_status(n).await;
        assert_eq!(st["status"], "Failure", "{st}");
        assert_eq!(st["reason"], "BadRequest", "{st}");
        let message = st["message"].as_str().unwrap_or_default();
        assert!(message.contains(what), "{what}: {st}");
    }
    t.ws.send(Message::Text("hello".into()))
        .await
        .expect("send");
    n += 1;
    assert_eq!(t.until_status(n).await["reason"], "BadRequest");
    // Still attached and working.
    t.type_("echo alive$((2+3))\r").await;
    t.until_output("alive5").await;

    // An oversize message: BadRequest, then close 1009.
    let mut big = vec![channel::STDIN];
    big.extend(std::iter::repeat_n(b'a', berth_api::shell::MAX_MESSAGE));
    t.ws.send(Message::Binary(big.into())).await.expect("send");
    t.until("the close after an oversize message", |t| {
        t.closed.is_some()
    })
    .await;
    assert_eq!(t.closed, Some(1009));
    assert_eq!(t.statuses[n]["reason"], "BadRequest", "{:?}", t.statuses);
    assert!(t.statuses[n]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("larger than"));

    // The server and the shell are unharmed.
    let mut t = attach(&s, &session, "x", "").await;
    t.type_("echo again$((2+3))\r").await;
    t.until_output("again5").await;

    // Exit with a code: a NonZeroExitCode status carrying it, then close 1000.
    t.type_("exit 3\r").await;
    t.until("the close after exit", |t| t.closed.is_some())
        .await;
    assert_eq!(t.closed, Some(1000));
    let st = t.statuses.last().expect("exit status").clone();
    assert_eq!(st["status"], "Failure", "{st}");
    assert_eq!(st["reason"], "NonZeroExitCode", "{st}");
    assert_eq!(
        st["details"]["causes"],
        json!([{"reason": "ExitCode", "message": "3"}]),
        "{st}"
    );
    let info = list(&s, &session).await;
    let x = info.iter().find(|i| i.shell_id == "x").expect("x listed");
    assert!(!x.running);
    assert_eq!(x.exit_code, Some(3));

    // Exit 0 is Success; a killed shell reports the signal.
    open_ok(
        &s,
        &session,
        json!({"shell_id": "ok", "command": ["sh", "-c", "read x; exit 0"]}),
    )
    .await;
    let mut ok = attach(&s, &session, "ok", "").await;
    ok.type_("go\r").await;
    ok.until("close", |t| t.closed.is_some()).await;
    assert_eq!(
        ok.statuses.last().expect("status"),
        &json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Success"})
    );
    open_ok(
        &s,
        &session,
        json!({"shell_id": "k", "command": ["sleep", "1000"]}),
    )
    .await;
    let mut k = attach(&s, &session, "k", "").await;
    let r = s
        .http(
            reqwest::Method::DELETE,
            &format!("/v1/sessions/{session}/shells/k"),
        )
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), 204);
    k.until("close", |t| t.closed.is_some()).await;
    let st = k.statuses.last().expect("status");
    assert_eq!(st["reason"], "NonZeroExitCode", "{st}");
    let causes = st["details"]["causes"].as_array().expect("causes");
    assert!(
        causes.contains(&json!({"reason":"Signal","message":"1"})),
        "{st}"
    );
    assert!(
        causes.contains(&json!({"reason":"ExitCode","message":"129"})),
        "{st}"
    );
}

// Namespace only: REST validation, the shell cap and the recording format are the server's, the same for every driver.
#[tokio::test]
async fn rest_routes_cap_list_delete_and_recording() {
    let Some(s) = Server::start("rest_routes_cap_list_delete_and_recording").await else {
        return;
    };
    let session = uniq("sh-rest");
    for (body, field) in [
        (json!({"shell_id": "a/b"}), "shell_id"),
        (json!({"shell_id": "a?b"}), "shell_id"),
        (json!({"shell_id": ""}), "shell_id"),
        (json!({"shell_id": "x".repeat(129)}), "shell_id"),
        (json!({"width": 0}), "width"),
        (json!({"command": []}), "command"),
    ] {
        let (code, err) = error_of(open_shell(&s, &session, body.clone()).await).await;
        assert_eq!(code, 400, "{body}: {err}");
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
    }
    let first = open_ok(&s, &session, json!({})).await;
    assert!(first.shell_id.starts_with("sh-"), "{first:?}");
    let (code, err) =
        error_of(open_shell(&s, &session, json!({"shell_id": first.shell_id})).await).await;
    assert_eq!(code, 409, "{err}");
    assert_eq!(err["error"]["code"], "already_exists");
    for i in 1..10 {
        open_ok(
            &s,
            &session,
            json!({"shell_id": format!("s{i}"), "command": ["sleep", "1000"]}),
        )
        .await;
    }
    let (code, err) =
        error_of(open_shell(&s, &session, json!({"shell_id": "eleventh"})).await).await;
    assert_eq!(code, 429, "{err}");
    assert_eq!(err["error"]["code"], "resource_exhausted");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--max-shells"),
        "{err}"
    );

    let shells = list(&s, &session).await;
    assert_eq!(shells.len(), 10, "{shells:?}");
    assert!(shells.iter().all(|i| i.running));
    let s5 = shells.iter().find(|i| i.shell_id == "s5").expect("s5");
    assert_eq!(s5.command, ["sleep", "1000"]);

    let delete = |id: &str| {
        s.http(
            reqwest::Method::DELETE,
            &format!("/v1/sessions/{session}/shells/{id}"),
        )
        .send()
    };
    assert_eq!(delete("s5").await.expect("DELETE").status(), 204);
    let after = list(&s, &session).await;
    assert!(
        after.iter().all(|i| i.shell_id != "s5" || !i.running),
        "{after:?}"
    );
    // Room again for one more.
    open_ok(
        &s,
        &session,
        json!({"shell_id": "eleventh", "command": ["sleep", "1000"]}),
    )
    .await;
    let (code, err) = error_of(delete("never-was").await.expect("DELETE")).await;
    assert_eq!(code, 404, "{err}");
    assert_eq!(err["error"]["code"], "not_found");

    assert_eq!(delete("eleventh").await.expect("DELETE").status(), 204);

    // A recording of what a shell printed, as asciicast v2.
    open_ok(&s, &session, json!({"shell_id": "rec", "command": ["sh", "-c", "echo recorded-line; sleep 1000"], "width": 90, "height": 20})).await;
    let mut t = attach(&s, &session, "rec", "").await;
    t.until("recorded-line", |t| {
        String::from_utf8_lossy(&t.out).contains("recorded-line")
    })
    .await;
    let r = s
        .http(
            reqwest::Method::GET,
            &format!("/v1/sessions/{session}/shells/rec/recording"),
        )
        .send()
        .await
        .expect("GET recording");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-asciicast")
    );
    let (header, _) = parse_cast(&r.text().await.expect("recording"));
    assert_eq!(header["width"], 90, "{header}");
    assert_eq!(header["height"], 20, "{header}");
    assert_eq!(header["env"]["SHELL"], "sh", "{header}");
    // The recorder runs beside the client: its file catches up.
    let text = recording_until(&s, &session, "rec", "recorded-line").await;
    assert!(text.contains("recorded-line"), "{text}");
    for (shell, code, field) in [("none", 404, "shell_id"), ("a%3Fb", 400, "shell_id")] {
        let (status, body) = error_of(
            s.http(
                reqwest::Method::GET,
                &format!("/v1/sessions/{session}/shells/{shell}/recording"),
            )
            .send()
            .await
            .expect("GET"),
        )
        .await;
        assert_eq!(status, code, "{shell}: {body}");
        assert_eq!(body["error"]["field"], field, "{shell}: {body}");
    }
    let (status, body) = error_of(
        s.http(
            reqwest::Method::GET,
            "/v1/sessions/no-such-session/shells/rec/recording",
        )
        .send()
        .await
        .expect("GET"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");

    // The OpenAPI document lists the routes.
    let doc: Value = s
        .http(reqwest::Method::GET, "/v1/openapi.json")
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("JSON");
    for p in [
        "/v1/sessions/{id}/shells",
        "/v1/sessions/{id}/shells/{shell}",
        "/v1/sessions/{id}/shells/{shell}/recording",
        "/v1/sessions/{id}/shells/{shell}/attach",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing from the OpenAPI");
    }
}

both!(an_attached_client_keeps_the_session_from_idling_out);
async fn an_attached_client_keeps_the_session_from_idling_out(s: Server, isolation: Isolation) {
    let rt = runtime_with(&s, isolation, |r| r.idle_timeout_s = 2).await;
    let session = s.session(&uniq("sh-idle"), &rt).await;
    open_ok(&s, &session, json!({"shell_id": "idle"})).await;
    let t = attach(&s, &session, "idle", "").await;
    // Twice the idle timeout with a silent client attached: still running.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let st = s.client.get_session(&session).await.expect("get");
        assert_eq!(st.state, SessionState::Running, "{st:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(t);
    let st = common::poll("the idle timeout after detaching", || async {
        let st = s.client.get_session(&session).await.expect("get");
        (st.state == SessionState::Stopped).then_some(st)
    })
    .await;
    assert_eq!(st.stop_reason.as_deref(), Some("idle_timeout"));
    // Shells end with the sandbox.
    assert!(list(&s, &session).await.is_empty());
}

both!(the_recorder_does_not_keep_the_session_busy);
async fn the_recorder_does_not_keep_the_session_busy(s: Server, isolation: Isolation) {
    let rt = runtime_with(&s, isolation, |r| r.idle_timeout_s = 2).await;
    let session = s.session(&uniq("rec-idle"), &rt).await;
    // A shell that keeps printing, with no client: only its recorder is attached.
    open_ok(
        &s,
        &session,
        json!({"shell_id": "ticker", "command": ["sh", "-c", "i=0; while :; do i=$((i+1)); echo tick-$i; sleep 0.2; done"]}),
    )
    .await;
    let st = common::poll(
        "the idle timeout with only the recorder attached",
        || async {
            let st = s.client.get_session(&session).await.expect("get");
            (st.state == SessionState::Stopped).then_some(st)
        },
    )
    .await;
    assert_eq!(st.stop_reason.as_deref(), Some("idle_timeout"));
    // What it printed until then is recorded, every line once and in order.
    let (_, events) = parse_cast(&fetch_recording(&s, &session, "ticker").await);
    let ticks = numbered(&cast_output(&events), "tick-");
    assert!(!ticks.is_empty(), "{events:?}");
    assert_eq!(ticks, (1..=ticks.len() as u32).collect::<Vec<_>>());
}

// Namespace only: under TCG a guest's terminal passes ~80 KB/s, and this floods 40 MB.
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_with_the_offset_to_resume_from() {
    let Some(s) =
        Server::start("a_client_that_stops_reading_is_dropped_with_the_offset_to_resume_from")
            .await
    else {
        return;
    };
    let session = uniq("sh-slow");
    open_ok(&s, &session, json!({"shell_id": "flood"})).await;
    let mut t = attach(&s, &session, "flood", "").await;
    t.type_("yes | head -c 40000000; echo FLOOD$((2*5))\r")
        .await;
    // Read nothing until the guest has dropped this client (it no longer counts).
    common::poll(
        "the guest to drop the client that does not read",
        || async {
            let shells = list(&s, &session).await;
            let f = shells
                .iter()
                .find(|i| i.shell_id == "flood")
                .expect("flood");
            (f.clients == 0).then_some(())
        },
    )
    .await;
    // Everything queued before the drop arrives, then TooSlow with the offset, then close.
    t.until("the close after TooSlow", |t| t.closed.is_some())
        .await;
    let st = t.statuses.last().expect("TooSlow status").clone();
    assert_eq!(st["status"], "Failure", "{st}");
    assert_eq!(st["reason"], "TooSlow", "{st}");
    assert_eq!(
        st["metadata"]["offset"].as_u64(),
        Some(t.position()),
        "{st}"
    );
    assert!(
        st["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&t.position().to_string()),
        "{st}"
    );
    assert_eq!(t.closed, Some(1013));
    // Reattaching with that offset works (a snapshot if it left the ring buffer) and
    // the shell is still there. (A client reading while the flood goes on may be
    // dropped again, the shell's recorder competing for the CPU: it reattaches with
    // the offset it is given, as the CLI does.)
    let mut pos = t.position();
    drop(t);
    let flood_ended = |t: &Term| {
        let tail = &t.out[t.out.len().saturating_sub(64 * 1024)..];
        String::from_utf8_lossy(tail).contains("FLOOD10")
    };
    loop {
        let mut t = attach(&s, &session, "flood", &format!("offset={pos}")).await;
        assert_eq!(t.first["metadata"]["reconnected"], true);
        // (The flood may have ended already, its end then being in the snapshot.)
        t.until("the end of the flood, or another drop", |t| {
            flood_ended(t) || t.closed.is_some()
        })
        .await;
        if flood_ended(&t) {
            break;
        }
        let st = t.statuses.last().expect("a final status");
        assert_eq!(st["reason"], "TooSlow", "{st}");
        pos = st["metadata"]["offset"].as_u64().expect("offset");
    }
}

both!(stopping_the_session_ends_its_shells_and_closes_attached_clients);
async fn stopping_the_session_ends_its_shells_and_closes_attached_clients(s: Server, _: Isolation) {
    let session = uniq("sh-stop");
    open_ok(&s, &session, json!({"shell_id": "main"})).await;
    let mut t = attach(&s, &session, "main", "").await;
    s.client
        .stop_session(&session)
        .await
        .expect("stop the session");
    t.until("the close after the session stopped", |t| {
        t.closed.is_some()
    })
    .await;
    let st = t.statuses.last().expect("a final status");
    assert_eq!(st["status"], "Failure", "{st}");
    assert!(list(&s, &session).await.is_empty());
    let (code, _) = error_of(
        s.http(
            reqwest::Method::GET,
            &format!("/v1/sessions/{session}/shells/main/attach"),
        )
        .send()
        .await
        .expect("GET"),
    )
    .await;
    assert_eq!(code, 404);
    // A new shell resumes the session.
    open_ok(&s, &session, json!({"shell_id": "main"})).await;
    let mut t = attach(&s, &session, "main", "").await;
    t.type_("echo back$((1+1))\r").await;
    t.until_output("back2").await;
}

both!(recordings_outlive_the_sandbox_and_the_agent_cannot_reach_them);
async fn recordings_outlive_the_sandbox_and_the_agent_cannot_reach_them(s: Server, _: Isolation) {
    let session = uniq("rec-stop");
    open_ok(&s, &session, json!({"shell_id": "main"})).await;
    let mut t = attach(&s, &session, "main", "").await;
    t.type_("echo rec-$((6*7))\r").await;
    t.until_output("rec-42").await;
    t.send(channel::RESIZE, br#"{"width":123,"height":45}"#)
        .await;
    t.type_("stty size\r").await;
    t.until_output("45 123").await;

    // Nothing in the sandbox is a recording, and the host's logs dir is not there.
    let logs = s.data_dir.join("logs").join(&session);
    assert!(logs.join("main.cast").is_file(), "{}", logs.display());
    let look = s
        .exec(
            &session,
            &format!(
                "find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -name '*.cast' -print; \
                 test -e '{}' && echo HOST-LOGS-VISIBLE; \
                 mkdir -p /run/berth/log && echo '[0.1, \"o\", \"forged\"]' >> /run/berth/log/shell-main.cast; \
                 echo '[0.1, \"o\", \"forged\"]' >> /mnt/workspace/main.cast; true",
                logs.display()
            ),
        )
        .await
        .ok();
    assert_eq!(look.out(), "", "{look:?}");

    // Stopping the session ends the shell; its recording stays readable.
    s.client.stop_session(&session).await.expect("stop");
    let cast = fetch_recording(&s, &session, "main").await;
    let (header, events) = parse_cast(&cast);
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(80), Some(24))
    );
    assert_eq!(header["env"]["SHELL"], "bash", "{header}");
    let out = cast_output(&events);
    assert!(out.contains("rec-42"), "{cast}");
    assert!(out.contains("45 123"), "{cast}");
    assert!(!cast.contains("forged"), "{cast}");
    let resizes: Vec<&str> = events
        .iter()
        .filter(|e| e.1 == "r")
        .map(|e| e.2.as_str())
        .collect();
    assert_eq!(resizes, ["123x45"], "{cast}");
    assert!(events.iter().all(|e| e.1 != "m"), "no gap expected: {cast}");

    // The CLI prints the same file.
    let cli = s.cli_ok(&["shell", "record", &session, "main"]).await;
    assert_eq!(cli, cast);
    let (_, err, code) = s.cli(&["shell", "record", &session, "nope"]).await;
    assert_ne!(code, 0);
    assert!(
        String::from_utf8_lossy(&err).contains("not found"),
        "{}",
        String::from_utf8_lossy(&err)
    );
    let (status, body) = error_of(
        s.http(
            reqwest::Method::GET,
            &format!("/v1/sessions/{session}/shells/nope/recording"),
        )
        .send()
        .await
        .expect("GET"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    assert_eq!(body["error"]["field"], "shell_id", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nope"),
        "{body}"
    );

    // Owner-only on the host.
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&s.data_dir.join("logs")), 0o700);
    assert_eq!(mode(&logs), 0o700);
    assert_eq!(mode(&logs.join("main.cast")), 0o600);

    // Deleting the session deletes its recordings.
    s.client.delete_session(&session).await.expect("delete");
    assert!(!logs.exists(), "{} left behind", logs.display());
    let (status, _) = error_of(
        s.http(
            reqwest::Method::GET,
            &format!("/v1/sessions/{session}/shells/main/recording"),
        )
        .send()
        .await
        .expect("GET"),
    )
    .await;
    assert_eq!(status, 404);
}

both!(a_recording_goes_on_after_a_server_sigkill_without_loss_or_duplication);
async fn a_recording_goes_on_after_a_server_sigkill_without_loss_or_duplication(
    mut s: Server,
    _: Isolation,
) {
    let session = uniq("rec-kill");
    open_ok(&s, &session, json!({"shell_id": "num"})).await;
    let mut t = attach(&s, &session, "num", "").await;
    t.type_("for i in $(seq 1 50); do echo n-$i; done\r").await;
    t.until_output("n-50").await;
    // Some of it is in the recording (and its state) before the kill.
    recording_until(&s, &session, "num", "n-50").await;
    // More while the server runs, more while it is dead or restarting, and the rest
    // only once it is back.
    t.type_(
        "for i in $(seq 51 100); do echo n-$i; done; sleep 1; \
         for i in $(seq 101 150); do echo n-$i; done; read go; \
         for i in $(seq 151 200); do echo n-$i; done\r",
    )
    .await;
    t.until_output("n-100").await;
    let pos = t.position();
    drop(t);
    s.kill_server();
    s.restart().await;

    let mut t = attach(&s, &session, "num", &format!("offset={pos}")).await;
    t.until_output("n-150").await;
    t.type_("go\r").await;
    t.until_output("n-200").await;
    let out = recording_until(&s, &session, "num", "n-200").await;
    assert_eq!(
        numbered(&out, "n-"),
        (1..=200).collect::<Vec<u32>>(),
        "every line exactly once: {out:?}"
    );
    // One header: every later line is an event.
    let (_, events) = parse_cast(&fetch_recording(&s, &session, "num").await);
    assert!(
        events.iter().all(|e| e.1 != "m"),
        "no gap expected: {events:?}"
    );
}

// Namespace only: the host triggers the flood through the sandbox's /run/berth, a host directory only there.
#[tokio::test]
async fn output_lost_while_the_server_was_down_is_marked_in_the_recording() {
    let Some(mut s) =
        Server::start("output_lost_while_the_server_was_down_is_marked_in_the_recording").await
    else {
        return;
    };
    let session = uniq("rec-gap");
    open_ok(&s, &session, json!({"shell_id": "gap"})).await;
    let mut t = attach(&s, &session, "gap", "").await;
    // More output than the guest's 256 KiB ring, printed only once the server is dead
    // (`/run/berth` in the sandbox is the host's `run/<session>/sock`).
    t.type_(
        "while [ ! -e /run/berth/go ]; do sleep 0.05; done; \
         head -c 600000 /dev/zero | tr '\\0' x; echo; echo AFTER-$((1+1)); \
         touch /run/berth/done\r",
    )
    .await;
    recording_until(&s, &session, "gap", "/run/berth/done").await;
    drop(t);
    s.kill_server();
    let sock = s.data_dir.join("run").join(&session).join("sock");
    std::fs::write(sock.join("go"), "").expect("create go");
    common::poll("the flood to end while the server is down", || async {
        sock.join("done").exists().then_some(())
    })
    .await;
    s.restart().await;

    recording_until(&s, &session, "gap", "AFTER-2").await;
    let (_, events) = parse_cast(&fetch_recording(&s, &session, "gap").await);
    let marker = events
        .iter()
        .position(|e| e.1 == "m")
        .unwrap_or_else(|| panic!("no gap marker: {:?}", &events[..events.len().min(20)]));
    assert!(events[marker].2.contains("lost"), "{:?}", events[marker]);
    let after = events
        .iter()
        .position(|e| e.1 == "o" && e.2.contains("AFTER-2"))
        .expect("AFTER-2");
    assert!(
        marker < after,
        "the marker comes before what follows the gap"
    );
    let xs = cast_output(&events).matches('x').count();
    assert!(xs < 600_000, "{xs} x recorded although some were lost");
}

#![allow(clippy::unwrap_used)]

//! Test vectors: AWS's SigV4 test suite (service `service`, region `us-east-1`, key
//! `AKIDEXAMPLE`, time `20150830T123600Z`) and requests signed by real botocore.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use super::*;

const SUITE_KEY: &str = "AKIDEXAMPLE";
const SUITE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const SUITE_TIME: i64 = 1_440_938_160; // 20150830T123600Z

const BOTO_KEY: &str = "BKIAIOSFODNN7EXAMPLE";
const BOTO_SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const BOTO_TIME: i64 = 1_768_472_430; // 20260115T102030Z
const AGENTCORE: &[&str] = &["bedrock-agentcore"];

fn at(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs as u64)
}

fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v.as_bytes()).unwrap(),
        );
    }
    map
}

/// A request with owned parts, so tests can alter one part at a time.
#[derive(Clone)]
struct Owned {
    method: String,
    path: String,
    query: String,
    headers: HeaderMap,
    payload: String,
}

impl Owned {
    fn new(method: &str, target: &str, pairs: &[(&str, &str)], body: &str) -> Self {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Self {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            headers: header_map(pairs),
            payload: hex::encode(Sha256::digest(body.as_bytes())),
        }
    }

    fn req(&self) -> Request<'_> {
        Request {
            method: &self.method,
            path: &self.path,
            query: &self.query,
            headers: &self.headers,
            authority: None,
            payload_sha256: &self.payload,
        }
    }

    fn verify(
        &self,
        key: &str,
        secret: &str,
        services: &[&str],
        now: i64,
    ) -> Result<Verified, SigV4Error> {
        verify(&self.req(), services, at(now), |id| {
            (id == key).then(|| SecretKey::new(secret))
        })
    }

    fn set_header(&mut self, name: &'static str, value: &str) {
        self.headers
            .insert(name, HeaderValue::from_str(value).unwrap());
    }
}

/// A request of the AWS test suite with its `Authorization` header.
fn suite(
    method: &str,
    target: &str,
    extra: &[(&str, &str)],
    body: &str,
    signed: &str,
    signature: &str,
) -> Owned {
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders={signed}, Signature={signature}"
    );
    let mut pairs = vec![
        ("Host", "example.amazonaws.com"),
        ("X-Amz-Date", "20150830T123600Z"),
    ];
    pairs.extend_from_slice(extra);
    pairs.push(("Authorization", &auth));
    Owned::new(method, target, &pairs, body)
}

#[track_caller]
fn suite_ok(o: &Owned) -> Verified {
    o.verify(SUITE_KEY, SUITE_SECRET, &["service"], SUITE_TIME)
        .unwrap_or_else(|e| panic!("{} {}?{}: {e}", o.method, o.path, o.query))
}

#[track_caller]
fn suite_err(o: &Owned, now: i64) -> SigV4Error {
    o.verify(SUITE_KEY, SUITE_SECRET, &["service"], now)
        .expect_err("must be rejected")
}

const VANILLA: &str = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";

fn vanilla() -> Owned {
    suite("GET", "/", &[], "", "host;x-amz-date", VANILLA)
}

#[test]
fn aws_suite_header_vectors() {
    // get-vanilla, post-vanilla
    let v = suite_ok(&vanilla());
    assert_eq!(
        v.credential,
        Credential {
            access_key_id: SUITE_KEY.into(),
            date: "20150830".into(),
            region: "us-east-1".into(),
            service: "service".into(),
        }
    );
    assert_eq!(v.request_time, SUITE_TIME);
    assert!(!v.presigned && v.payload_signed && v.security_token.is_none());
    suite_ok(&suite(
        "POST",
        "/",
        &[],
        "",
        "host;x-amz-date",
        "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
    ));
    // get-vanilla-query-order-key-case
    suite_ok(&suite(
        "GET",
        "/?Param2=value2&Param1=value1",
        &[],
        "",
        "host;x-amz-date",
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    ));
    // get-vanilla-query-unreserved
    let unreserved = "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    suite_ok(&suite(
        "GET",
        &format!("/?{unreserved}={unreserved}"),
        &[],
        "",
        "host;x-amz-date",
        "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
    ));
    // post-x-www-form-urlencoded: the body is signed
    let form = suite(
        "POST",
        "/",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "Param1=value1",
        "content-type;host;x-amz-date",
        "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
    );
    assert!(suite_ok(&form).payload_signed);
    let mut other_body = form.clone();
    other_body.payload = hex::encode(Sha256::digest(b"Param1=value2"));
    assert_eq!(
        suite_err(&other_body, SUITE_TIME).kind(),
        ErrorKind::SignatureMismatch
    );
    // get-header-value-trim
    suite_ok(&suite(
        "GET",
        "/",
        &[("My-Header1", "value1"), ("My-Header2", "\"a   b   c\"")],
        "",
        "host;my-header1;my-header2;x-amz-date",
        "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
    ));
    // post-header-value-case
    suite_ok(&suite(
        "POST",
        "/",
        &[("My-Header1", "VALUE1")],
        "",
        "host;my-header1;x-amz-date",
        "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
    ));
    // post-sts-header-before: the session token is signed, and recorded
    let token = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";
    let sts = suite(
        "POST",
        "/",
        &[("X-Amz-Security-Token", token)],
        "",
        "host;x-amz-date;x-amz-security-token",
        "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
    );
    assert_eq!(suite_ok(&sts).security_token.as_deref(), Some(token));
}

#[test]
fn aws_suite_normalized_paths() {
    // The `-normalized` variants: non-S3 services sign the normalized path.
    for path in ["/./", "/example1/example2/../..", "/example/.."] {
        suite_ok(&suite("GET", path, &[], "", "host;x-amz-date", VANILLA));
    }
    suite_ok(&suite(
        "GET",
        "//example//",
        &[],
        "",
        "host;x-amz-date",
        "9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84",
    ));
    suite_ok(&suite(
        "GET",
        "/example space/",
        &[],
        "",
        "host;x-amz-date",
        "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
    ));
    suite_ok(&suite(
        "GET",
        "/\u{1234}",
        &[],
        "",
        "host;x-amz-date",
        "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
    ));
}

#[test]
fn aws_suite_presigned_vectors() {
    // The query-signed forms of the suite (as in awslabs/aws-c-auth's copy:
    // X-Amz-Expires=3600, payload = hash of the empty body). X-Amz-Date is also sent as
    // a header but not signed.
    let trim = Owned::new(
        "GET",
        "/?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-SignedHeaders=host%3Bmy-header1%3Bmy-header2&X-Amz-Expires=3600&X-Amz-Signature=e7bb0fd515e125e1aec2ecc4c0c17484fb06f6846b927c35e46005dd3df3acd4",
        &[
            ("Host", "example.amazonaws.com"),
            ("My-Header1", "value1"),
            ("My-Header2", "\"a   b   c\""),
            ("X-Amz-Date", "20150830T123600Z"),
        ],
        "",
    );
    let v = trim
        .verify(SUITE_KEY, SUITE_SECRET, &["service"], SUITE_TIME + 3600)
        .unwrap();
    assert!(v.presigned);
    assert_eq!(v.signed_headers, ["host", "my-header1", "my-header2"]);
    let order = Owned::new(
        "GET",
        "/?Param2=value2&Param1=value1&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-SignedHeaders=host&X-Amz-Expires=3600&X-Amz-Signature=86012e2c9ad4d77369f5d81c11f75158aae4f895a085212cc6d3f923d300bed5",
        &[
            ("Host", "example.amazonaws.com"),
            ("X-Amz-Date", "20150830T123600Z"),
        ],
        "",
    );
    order
        .verify(SUITE_KEY, SUITE_SECRET, &["service"], SUITE_TIME - 60)
        .unwrap();
    let err = suite_err(&order, SUITE_TIME + 3601);
    assert_eq!(err.kind(), ErrorKind::Expired, "{err}");
    assert!(err.to_string().contains("20150830T133600Z"), "{err}");
    let err = suite_err(&order, SUITE_TIME - 16 * 60);
    assert_eq!(err.kind(), ErrorKind::Expired, "not yet valid: {err}");
}

/// A request as botocore 1.44.5 sent it, plus the `Host` header its HTTP client adds.
/// `User-Agent` is shortened (it is never signed).
struct Vector {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    query: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
}

impl Vector {
    fn owned(&self) -> Owned {
        let target = if self.query.is_empty() {
            self.path.to_string()
        } else {
            format!("{}?{}", self.path, self.query)
        };
        Owned::new(self.method, &target, self.headers, self.body)
    }
}

// Made with this script in a venv (`python3 -m venv /tmp/sigvenv &&
// /tmp/sigvenv/bin/pip install botocore==1.44.5`); its output, one JSON object per
// request, was turned into the literals below.
//
// # Sign requests with botocore 1.44.5 at a frozen clock and print them as test vectors.
// import datetime, hashlib, json
// from unittest import mock
// import botocore.auth, botocore.session
// from botocore.auth import SigV4Auth, SigV4QueryAuth
// from botocore.awsrequest import AWSRequest, AWSResponse
// from botocore.credentials import Credentials
//
// NOW = datetime.datetime(2026, 1, 15, 10, 20, 30)
// AK, SK = "BKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
// ARN = "arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/agent-abc1234567"
// out = []
//
// def dump(name, method, url, headers, body):
//     out.append(dict(name=name, method=method, url=url, headers=list(headers),
//                     body=body.decode() if isinstance(body, bytes) else (body or ""),
//                     sha256=hashlib.sha256(body or b"").hexdigest()))
//
// def client_call(name, service, op, token=None, **kw):
//     s = botocore.session.get_session()
//     c = s.create_client(service, region_name="us-east-1", endpoint_url="http://127.0.0.1:7878",
//                         aws_access_key_id=AK, aws_secret_access_key=SK, aws_session_token=token)
//     def capture(request, **_):
//         body = request.body if isinstance(request.body, bytes) else (request.body or b"")
//         if isinstance(body, str): body = body.encode()
//         dump(name, request.method, request.url, [(k, v if isinstance(v, str) else v.decode()) for k, v in request.headers.items()], body)
//         return AWSResponse(request.url, 200, {}, mock.Mock(stream=lambda: iter([b"{}"]), content=b"{}"))
//     c.meta.events.register("before-send", capture)
//     try:
//         getattr(c, op)(**kw)
//     except Exception as e:  # the fake response may not parse; the request is what counts
//         import sys; print(name, repr(e), file=sys.stderr)
//
// with mock.patch("botocore.auth.get_current_datetime", return_value=NOW):
//     client_call("invoke_agent_runtime", "bedrock-agentcore", "invoke_agent_runtime",
//                 agentRuntimeArn=ARN, qualifier="DEFAULT",
//                 runtimeSessionId="0f5c3a9e-6b1d-4c8e-9f2a-7d3b1e5c8a40-sess",
//                 contentType="application/json", accept="application/json",
//                 payload=b'{"prompt": "Hello, agent!"}')
//     client_call("invoke_agent_runtime_session_token", "bedrock-agentcore", "invoke_agent_runtime",
//                 token="IQoJb3JpZ2luX2VjEXAMPLETOKEN+/=",
//                 agentRuntimeArn=ARN, runtimeSessionId="0f5c3a9e-6b1d-4c8e-9f2a-7d3b1e5c8a40-sess",
//                 payload=b'{"prompt":"x"}')
//     client_call("get_memory_record", "bedrock-agentcore", "get_memory_record",
//                 memoryId="memory-000001", memoryRecordId="mem-0123456789abcdef0123456789abcdef01234567", namespace="/actors/alice smith/sessions")
//     client_call("list_gateways", "bedrock-agentcore-control", "list_gateways",
//                 maxResults=10, nextToken="a+b/c=d")
//     # SigV4Auth directly: repeated keys, unreserved/reserved characters, a multi-value header.
//     req = AWSRequest(method="GET",
//                      url="https://bedrock-agentcore.us-east-1.amazonaws.com/runtimes/" + ARN.replace(":", "%3A").replace("/", "%2F") + "/invocations/.well-known/agent-card.json?qualifier=DEFAULT&b=2&a=%C3%A9t%C3%A9&b=1&empty=",
//                      headers={"X-Custom": "  one   two  ", "Content-Type": "application/json"})
//     req.headers.add_header("X-Multi", "first")
//     req.headers.add_header("X-Multi", "second")
//     SigV4Auth(Credentials(AK, SK), "bedrock-agentcore", "eu-west-1").add_auth(req)
//     dump("raw_get_query", req.method, req.url, req.headers.items(), b"")
//     # SigV4QueryAuth: a presigned WebSocket URL as the AgentCore SDK makes one.
//     req = AWSRequest(method="GET",
//                      url="https://bedrock-agentcore.us-east-1.amazonaws.com/runtimes/" + ARN.replace(":", "%3A").replace("/", "%2F") + "/ws?qualifier=DEFAULT&X-Amzn-Bedrock-AgentCore-Runtime-Session-Id=0f5c3a9e-6b1d-4c8e-9f2a-7d3b1e5c8a40-sess")
//     SigV4QueryAuth(Credentials(AK, SK, "IQoJb3JpZ2luX2VjEXAMPLETOKEN+/="), "bedrock-agentcore", "us-east-1", expires=300).add_auth(req)
//     dump("presigned_ws", req.method, req.url, req.headers.items(), b"")
//
//     # A request that already has a Date header: botocore signs with Date, not X-Amz-Date.
//     req = AWSRequest(method="GET", url="http://127.0.0.1:7878/runtimes/", headers={"Date": "x"})
//     SigV4Auth(Credentials(AK, SK), "bedrock-agentcore", "us-east-1").add_auth(req)
//     dump("raw_date_header", req.method, req.url, req.headers.items(), b"")
//     # Payload signing disabled (https): x-amz-content-sha256: UNSIGNED-PAYLOAD.
//     req = AWSRequest(method="POST", url="https://bedrock-agentcore.us-east-1.amazonaws.com/runtimes/x/invocations", data=b'{"a":1}')
//     req.context["payload_signing_enabled"] = False
//     SigV4Auth(Credentials(AK, SK), "bedrock-agentcore", "us-east-1").add_auth(req)
//     dump("raw_unsigned_payload", req.method, req.url, req.headers.items(), b'{"a":1}')
//
// print(json.dumps(out, indent=1))
const BOTOCORE: &[Vector] = &[
    Vector {
        name: "invoke_agent_runtime",
        method: "POST",
        path: "/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A123456789012%3Aruntime%2Fagent-abc1234567/invocations",
        query: "qualifier=DEFAULT",
        headers: &[
            ("Host", "127.0.0.1:7878"),
            ("X-Amzn-Bedrock-AgentCore-Runtime-Session-Id", "0f5c3a9e-6b1d-4c8e-9f2a-7d3b1e5c8a40-sess"),
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            ("User-Agent", "Botocore/1.44.5 ua/2.1 os/linux md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython m/Z,E,b,e,N cfg/retry-mode#standard"),
            ("X-Amz-Date", "20260115T102030Z"),
            ("Authorization", "AWS4-HMAC-SHA256 Credential=BKIAIOSFODNN7EXAMPLE/20260115/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=accept;content-type;host;x-amz-date;x-amzn-bedrock-agentcore-runtime-session-id, Signature=5051070ae59eed316035173d8d4b46bdede6980ba171bb30bd19a341ccd5804e"),
            ("amz-sdk-request", "attempt=1; max=3"),
            ("Content-Length", "27"),
        ],
        body: "{\"prompt\": \"Hello, agent!\"}",
    },
    Vector {
        name: "invoke_agent_runtime_session_token",
        method: "POST",
        path: "/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A123456789012%3Aruntime%2Fagent-abc1234567/invocations",
        query: "",
        headers: &[
            ("Host", "127.0.0.1:7878"),
            ("X-Amzn-Bedrock-AgentCore-Runtime-Session-Id", "0f5c3a9e-6b1d-4c8e-9f2a-7d3b1e5c8a40-sess"),
            ("User-Agent", "Botocore/1.44.5 ua/2.1 os/linux md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython m/Z,E,b,e,N cfg/retry-mode#standard"),
            ("X-Amz-Date", "20260115T102030Z"),
            ("X-Amz-Security-Token", "IQoJb3JpZ2luX2VjEXAMPLETOKEN+/="),
            ("Authorization", "AWS4-HMAC-SHA256 Credential=BKIAIOSFODNN7EXAMPLE/20260115/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token;x-amzn-bedrock-agentcore-runtime-session-id, Signature=14d64a979bd7b6775f2ff3489f1b463ff71403dc67b6fe80b54740ca233b88f1"),
            ("amz-sdk-request", "attempt=1; max=3"),
            ("Content-Length", "14"),
        ],
        body: "{\"prompt\":\"x\"}",
    },
    Vector {
        name: "get_memory_record",
        method: "GET",
        path: "/memories/memory-000001/memoryRecord/mem-0123456789abcdef0123456789abcdef01234567",
        query: "namespace=%2Factors%2Falice%20smith%2Fsessions",
        headers: &[
            ("Host", "127.0.0.1:7878"),
            ("User-Agent", "Botocore/1.44.5 ua/2.1 os/linux md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython m/Z,E,b,e,N cfg/retry-mode#standard"),
            ("X-Amz-Date", "20260115T102030Z"),
            ("Authorization", "AWS4-HMAC-SHA256 Credential=BKIAIOSFODNN7EXAMPLE/20260115/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=host;x-amz-date, Signature=91a690c0c6f7e81d37e38aa5e2c6bb6279670dd3f53c1a3e33df7e5193568ba2"),
            ("amz-sdk-request", "attempt=1; max=3"),
        ],
        body: "",
    },
    Vector {
        name: "list_gateways",
        method: "GET",
        path: "/gateways/",
        query: "maxResults=10&nextToken=a%2Bb%2Fc%3Dd",
        headers: &[
            ("Host", "127.0.0.1:7878"),
            ("User-Agent", "Botocore/1.44.5 ua/2.1 os/linux md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython m/Z,E,b,e,N cfg/retry-mode#standard"),
            ("X-Amz-Date", "20260115T102030Z"),
            ("Authorization", "AWS4-HMAC-SHA256 Credential=BKIAIOSFODNN7EXAMPLE/20260115/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=host;x-amz-date, Signature=b6b1daf0530306da151c4fd066e5e961138c2d20fba3ea41dcfb95c7367a8cab"),
            ("amz-sdk-request", "attempt=1; max=3"),
        ],
        body: "",
    },
    Vector {
        name: "raw_get_query",
        method: "GET",
        path: "/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A123456789012%3Aruntime%2Fagent-abc1234567/invocations/.well-known/agent-card.json",
        query: "qualifier=DEFAULT&b=2&a=%C3%A9t%C3%A9&b=1&empty=",
        headers: &[
            ("Host", "bedrock-agentcore.us-east-1.amazonaws.com"),
            ("X-Custom", "  one   two  "),
            ("Content-Type", "application/json"),
            ("X-Multi", "first"),
            ("X-Multi", "second"),
            ("X-Amz-Date", "20260115T102030Z"),
            ("Authorization", "AWS4-HMAC-SHA256 Credential=BKIAIOSFODNN7EXAMPLE/20260115/eu-west-1/bedrock-agentcore/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-custom;x-multi, Signature=60f231161e945060ab9f6546dd54d5a655701eb9279e46886f38347a538dd901"),
        ],
        body: "",
    },
    Vector {
        name: "presigned_ws",
        method: "GET",
        path: "/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A123456789012%3Aruntime%2Fagent-abc1234567/ws",
        query: "qualifier=DEFAULT&X-Amzn-Bedrock-AgentCore-Runtime-Session-Id=0f5c3a9e-6b1d-4c8e-9f2a-7d3b1e5c8a40-sess&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=BKIAIOSFODNN7EXAMPLE%2F20260115%2Fus-east-1%2Fbedrock-agentcore%2Faws4_request&X-Amz-Date=20260115T102030Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEXAMPLETOKEN%2B%2F%3D&X-Amz-Signature=aab151ad8997d98dcc435c5ede44e3b6dacafd80d4bbdc42741ff7aa5ec2f6dc",
        headers: &[
            ("Host", "bedrock-agentcore.us-east-1.amazonaws.com"),
        ],
        body: "",
    },
    Vector {
        name: "raw_date_header",
        method: "GET",
        path: "/runtimes/",
        query: "",
        headers: &[
            ("Host", "127.0.0.1:7878"),
            ("Date", "Thu, 15 Jan 2026 10:20:30 -0000"),
            ("Authorization", "AWS4-HMAC-SHA256 Credential=BKIAIOSFODNN7EXAMPLE/20260115/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=date;host, Signature=79045eca3f1a5d9b6accfa5945dae7488571c9d63be9f0dee731f129d070c8d8"),
        ],
        body: "",
    },
    Vector {
        name: "raw_unsigned_payload",
        method: "POST",
        path: "/runtimes/x/invocations",
        query: "",
        headers: &[
            ("Host", "bedrock-agentcore.us-east-1.amazonaws.com"),
            ("X-Amz-Date", "20260115T102030Z"),
            ("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD"),
            ("Authorization", "AWS4-HMAC-SHA256 Credential=BKIAIOSFODNN7EXAMPLE/20260115/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=1079bb478815f762a72ebaf3de28460eddbb30397c96c0f5a734596f88b143ef"),
        ],
        body: "{\"a\":1}",
    },
];

#[test]
fn botocore_vectors_verify() {
    for v in BOTOCORE {
        let o = v.owned();
        let got = o
            .verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME + 30)
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert_eq!(got.credential.access_key_id, BOTO_KEY, "{}", v.name);
        assert_eq!(got.request_time, BOTO_TIME, "{}", v.name);
        let region = if v.name == "raw_get_query" {
            "eu-west-1"
        } else {
            "us-east-1"
        };
        assert_eq!(got.credential.region, region, "{}", v.name);
        assert_eq!(got.presigned, v.name == "presigned_ws", "{}", v.name);
        assert_eq!(
            got.payload_signed,
            v.name != "raw_unsigned_payload",
            "{}",
            v.name
        );
        let token = v.name.contains("token") || v.name == "presigned_ws";
        assert_eq!(
            got.security_token.as_deref(),
            token.then_some("IQoJb3JpZ2luX2VjEXAMPLETOKEN+/="),
            "{}",
            v.name
        );
    }
}

#[test]
fn arn_paths_are_signed_double_encoded() {
    // botocore sends the ARN encoded once and signs it encoded twice; a verifier that
    // decodes the path first (or encodes it only once) rejects every InvokeAgentRuntime.
    let signed = parse(&BOTOCORE[0].owned().req()).unwrap();
    let head = String::from_utf8(signed.canonical_head.clone()).unwrap();
    assert!(
        head.starts_with("POST\n/runtimes/arn%253Aaws%253Abedrock-agentcore%253Aus-east-1%253A123456789012%253Aruntime%252Fagent-abc1234567/invocations\nqualifier=DEFAULT\n"),
        "{head}"
    );
    let mut decoded = BOTOCORE[0].owned();
    decoded.path = "/runtimes/arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/agent-abc1234567/invocations".into();
    let err = decoded
        .verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SignatureMismatch);
}

#[test]
fn tampering_is_a_signature_mismatch() {
    let invoke = BOTOCORE[0].owned();
    invoke
        .verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
        .unwrap();
    let mismatch = |o: &Owned, secret: &str| {
        let err = o
            .verify(BOTO_KEY, secret, AGENTCORE, BOTO_TIME)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::SignatureMismatch, "{err}");
        err
    };
    let err = mismatch(&invoke, SUITE_SECRET);
    assert!(err.to_string().contains("check the secret access key"));
    assert!(
        !err.to_string().contains("5051070a"),
        "no signature in {err}"
    );

    let mut o = invoke.clone();
    o.payload = hex::encode(Sha256::digest(b"{\"prompt\": \"rm -rf /\"}"));
    mismatch(&o, BOTO_SECRET);
    let mut o = invoke.clone();
    o.query = "qualifier=PROD".into();
    mismatch(&o, BOTO_SECRET);
    let mut o = invoke.clone();
    o.path = o.path.replace("abc", "abd");
    mismatch(&o, BOTO_SECRET);
    let mut o = invoke.clone();
    o.method = "PUT".into();
    mismatch(&o, BOTO_SECRET);
    let mut o = invoke.clone();
    o.set_header(
        "x-amzn-bedrock-agentcore-runtime-session-id",
        "another-session-0000000000000000000000",
    );
    mismatch(&o, BOTO_SECRET);
    let mut o = invoke.clone();
    o.set_header("host", "evil.example:7878");
    mismatch(&o, BOTO_SECRET);
    // Unsigned headers may change.
    let mut o = invoke.clone();
    o.set_header("user-agent", "curl/8");
    o.set_header("x-unsigned", "anything");
    o.verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
        .unwrap();
    // A presigned URL's other parameters are signed too.
    let ws = BOTOCORE.iter().find(|v| v.name == "presigned_ws").unwrap();
    let mut o = ws.owned();
    o.query = o.query.replace("qualifier=DEFAULT", "qualifier=OTHER");
    mismatch(&o, BOTO_SECRET);
}

#[test]
fn http2_requests_use_the_authority_as_host() {
    let mut o = BOTOCORE[0].owned();
    o.headers.remove("host");
    let err = o
        .verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Malformed);
    assert!(err.to_string().contains("\"host\""), "{err}");
    let mut req = o.req();
    req.authority = Some("127.0.0.1:7878");
    verify(&req, AGENTCORE, at(BOTO_TIME), |_| {
        Some(SecretKey::new(BOTO_SECRET))
    })
    .unwrap();
}

#[test]
fn clock_skew_is_fifteen_minutes() {
    let o = vanilla();
    suite_ok(&o);
    for ok in [SUITE_TIME - 15 * 60, SUITE_TIME + 15 * 60] {
        o.verify(SUITE_KEY, SUITE_SECRET, &["service"], ok).unwrap();
    }
    for late in [
        SUITE_TIME - 15 * 60 - 1,
        SUITE_TIME + 15 * 60 + 1,
        BOTO_TIME,
    ] {
        let err = suite_err(&o, late);
        assert_eq!(err.kind(), ErrorKind::Expired, "{err}");
        assert!(err.to_string().contains("20150830T123600Z"), "{err}");
    }
}

#[test]
fn presigned_urls_expire_and_live_at_most_a_week() {
    let ws = BOTOCORE.iter().find(|v| v.name == "presigned_ws").unwrap();
    let o = ws.owned();
    o.verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME + 300)
        .unwrap();
    let err = o
        .verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME + 301)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Expired, "{err}");
    let mut week = o.clone();
    week.query = week
        .query
        .replace("X-Amz-Expires=300", "X-Amz-Expires=604801");
    let err = week
        .verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Malformed);
    assert!(err.to_string().contains("X-Amz-Expires"), "{err}");
    // An S3-style presigner signs UNSIGNED-PAYLOAD; that form is accepted too.
    let signed = parse(&o.req()).unwrap();
    assert_eq!(
        signed.payload_candidates,
        [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            UNSIGNED_PAYLOAD
        ]
    );
}

#[test]
fn scope_service_and_date_are_checked() {
    let o = BOTOCORE[0].owned();
    let err = o
        .verify(
            BOTO_KEY,
            BOTO_SECRET,
            &["bedrock-agentcore-control"],
            BOTO_TIME,
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidScope);
    assert!(err.to_string().contains("\"bedrock-agentcore\""), "{err}");
    // Several names may be accepted.
    o.verify(
        BOTO_KEY,
        BOTO_SECRET,
        &["other", "bedrock-agentcore"],
        BOTO_TIME,
    )
    .unwrap();
    let mut o = vanilla();
    let auth = o.headers["authorization"]
        .to_str()
        .unwrap()
        .replace("/20150830/", "/20150831/");
    o.set_header("authorization", &auth);
    let err = suite_err(&o, SUITE_TIME);
    assert_eq!(err.kind(), ErrorKind::InvalidScope, "{err}");
}

#[test]
fn unknown_keys_are_reported_by_id() {
    let o = BOTOCORE[0].owned();
    let err = o
        .verify("BKIAOTHER", BOTO_SECRET, AGENTCORE, BOTO_TIME)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownAccessKey);
    assert!(err.to_string().contains(BOTO_KEY), "{err}");
}

#[test]
fn requests_without_sigv4_are_missing_not_malformed() {
    let plain = Owned::new("GET", "/", &[("Host", "h")], "");
    assert_eq!(parse(&plain.req()).unwrap_err(), SigV4Error::Missing);
    let bearer = Owned::new(
        "GET",
        "/",
        &[("Host", "h"), ("Authorization", "Bearer berth_abc")],
        "",
    );
    assert_eq!(parse(&bearer.req()).unwrap_err().kind(), ErrorKind::Missing);
}

#[test]
fn malformed_requests_say_what_is_wrong() {
    let base = "Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
    for (auth, names) in [
        (format!("AWS4-ECDSA-P256-SHA256 {base}"), "SigV4a"),
        (format!("AWS {base}"), "unsupported signing algorithm"),
        (
            "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=00".into(),
            "Credential= is missing",
        ),
        (
            format!(
                "AWS4-HMAC-SHA256 {}",
                base.replace("SignedHeaders=host;x-amz-date", "SignedHeaders=x-amz-date")
            ),
            "must include host",
        ),
        (
            format!(
                "AWS4-HMAC-SHA256 {}",
                base.replace("Signature=5fa0", "Signature=zz")
            ),
            "64 hexadecimal",
        ),
        (
            format!(
                "AWS4-HMAC-SHA256 {}",
                base.replace("/aws4_request", "/aws5_request")
            ),
            "aws4_request",
        ),
        (
            format!("AWS4-HMAC-SHA256 {}", base.replace("AKIDEXAMPLE/", "")),
            "ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request",
        ),
        (
            format!(
                "AWS4-HMAC-SHA256 {}",
                base.replace("host;x-amz-date", "Host;x-amz-date")
            ),
            "lower-case",
        ),
        (
            format!(
                "AWS4-HMAC-SHA256 {}",
                base.replace("host;x-amz-date", "host;x-amz-date;x-missing")
            ),
            "\"x-missing\"",
        ),
        (
            format!("AWS4-HMAC-SHA256 {base}, Extra=1"),
            "unknown component",
        ),
        (
            format!("AWS4-HMAC-SHA256 {base}, Signature=00"),
            "Signature given twice",
        ),
    ] {
        let o = Owned::new(
            "GET",
            "/",
            &[
                ("Host", "example.amazonaws.com"),
                ("X-Amz-Date", "20150830T123600Z"),
                ("Authorization", &auth),
            ],
            "",
        );
        let err = suite_err(&o, SUITE_TIME);
        assert_eq!(err.kind(), ErrorKind::Malformed, "{auth}: {err}");
        assert!(err.to_string().contains(names), "{auth}: {err}");
    }
    let mut o = vanilla();
    o.set_header("x-amz-date", "2015-08-30T12:36:00Z");
    assert!(suite_err(&o, SUITE_TIME).to_string().contains("X-Amz-Date"));
    o.headers.remove("x-amz-date");
    assert!(suite_err(&o, SUITE_TIME).to_string().contains("neither"));
    let mut both = vanilla();
    both.query = "X-Amz-Algorithm=AWS4-HMAC-SHA256".into();
    assert!(suite_err(&both, SUITE_TIME).to_string().contains("both"));
    let presigned = Owned::new(
        "GET",
        "/?X-Amz-Algorithm=AWS4-HMAC-SHA256",
        &[("Host", "h")],
        "",
    );
    assert!(suite_err(&presigned, SUITE_TIME)
        .to_string()
        .contains("X-Amz-Credential is missing"));
}

#[test]
fn content_sha256_header_must_match_the_body() {
    let unsigned = BOTOCORE
        .iter()
        .find(|v| v.name == "raw_unsigned_payload")
        .unwrap();
    // UNSIGNED-PAYLOAD: any body verifies, and the caller is told.
    let mut o = unsigned.owned();
    o.payload = hex::encode(Sha256::digest(b"something else"));
    assert!(
        !o.verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
            .unwrap()
            .payload_signed
    );
    // A hash that is not the body's.
    let mut o = vanilla();
    o.set_header(
        "x-amz-content-sha256",
        "0000000000000000000000000000000000000000000000000000000000000000",
    );
    assert_eq!(
        suite_err(&o, SUITE_TIME).kind(),
        ErrorKind::PayloadHashMismatch
    );
    o.set_header("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER");
    assert_eq!(suite_err(&o, SUITE_TIME).kind(), ErrorKind::Malformed);
}

#[test]
fn secrets_do_not_show_in_debug() {
    let s = SecretKey::new("wJalrXUtnFEMI");
    assert!(!format!("{s:?}").contains("wJal"));
    assert_eq!(s.expose(), "wJalrXUtnFEMI");
}

#[test]
fn a_host_header_sent_twice_with_one_value_counts_once() {
    // The SDK's shell client signs `host` once and sends `Host` twice (B3).
    let mut o = BOTOCORE[0].owned();
    o.headers
        .append("host", HeaderValue::from_static("127.0.0.1:7878"));
    assert_eq!(o.headers.get_all("host").iter().count(), 2);
    o.verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
        .unwrap();
    // Two different hosts are not one host.
    let mut o = BOTOCORE[0].owned();
    o.headers
        .append("host", HeaderValue::from_static("evil.example:7878"));
    let err = o
        .verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SignatureMismatch);
}

#[test]
fn presigned_urls_sign_the_hostname_without_the_port() {
    // `_presign` signs `host` = urlparse(url).hostname; the client then sends `Host`
    // with the port (S13).
    let ws = BOTOCORE.iter().find(|v| v.name == "presigned_ws").unwrap();
    for host in [
        "bedrock-agentcore.us-east-1.amazonaws.com:8443",
        "Bedrock-AgentCore.us-east-1.amazonaws.com:443",
    ] {
        let mut o = ws.owned();
        o.set_header("host", host);
        o.verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        // Sent twice, as a WebSocket client with extra headers may.
        o.headers
            .append("host", HeaderValue::from_str(host).unwrap());
        o.verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
            .unwrap_or_else(|e| panic!("{host} twice: {e}"));
    }
    // The host name itself is still signed.
    let mut o = ws.owned();
    o.set_header("host", "other.us-east-1.amazonaws.com:8443");
    let err = o
        .verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SignatureMismatch);
    // Header-signed requests sign the host with its port (netloc): no second try.
    let mut o = BOTOCORE[0].owned();
    o.set_header("host", "127.0.0.1");
    let err = o
        .verify(BOTO_KEY, BOTO_SECRET, AGENTCORE, BOTO_TIME)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SignatureMismatch);
}

#[test]
fn hostnames_as_python_urlparse_gives_them() {
    assert_eq!(
        hostname_of("example.com:8443").as_deref(),
        Some("example.com")
    );
    assert_eq!(hostname_of("Example.COM").as_deref(), Some("example.com"));
    assert_eq!(hostname_of("[::1]:8443").as_deref(), Some("::1"));
    assert_eq!(hostname_of("example.com"), None);
    assert_eq!(hostname_of(":8443"), None);
}

//! AWS Signature Version 4 verification, for the AgentCore-compatible API that boto3 and
//! the AgentCore SDKs call unmodified. Design: `docs/design/sigv4.md`.
//!
//! Pure functions over a request as received: nothing here does I/O or reads the clock.
//! Two ways in:
//!
//! - [`verify`] with a synchronous lookup from access key id to secret;
//! - [`parse`], then [`Signed::check`] and [`Signed::verify`], when the secret comes from
//!   somewhere async (the database): `berth_server::AccessKeys::authenticate` does that.
//!
//! ```
//! use berth_server::sigv4::{self, Request, SecretKey};
//! # let headers = axum::http::HeaderMap::new();
//! let req = Request {
//!     method: "POST",
//!     path: "/runtimes/arn%3Aaws%3A…/invocations", // raw, as received
//!     query: "qualifier=DEFAULT",                  // raw, without '?'
//!     headers: &headers,
//!     authority: None,
//!     payload_sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
//! };
//! let result = sigv4::verify(&req, &["bedrock-agentcore"], std::time::SystemTime::now(), |_id| {
//!     Some(SecretKey::new("the secret"))
//! });
//! assert_eq!(result.unwrap_err().kind(), sigv4::ErrorKind::Missing);
//! ```
//!
//! Both forms are accepted: the `Authorization: AWS4-HMAC-SHA256 Credential=…,
//! SignedHeaders=…, Signature=…` header, and a presigned URL (`X-Amz-Algorithm`,
//! `X-Amz-Credential`, `X-Amz-Date`, `X-Amz-Expires`, `X-Amz-SignedHeaders`,
//! `X-Amz-Signature`, optionally `X-Amz-Security-Token`).

mod canonical;
#[cfg(test)]
mod tests;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use canonical::{
    canonical_header_value, canonical_path, canonical_query, format_amz_date, parse_amz_date,
    parse_http_date, parse_query, QueryParam,
};

/// The only signing algorithm accepted (SigV4a, `AWS4-ECDSA-P256-SHA256`, is not).
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The payload hash a client sends when it does not sign the body.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// How far the request time may be from the server's clock (AWS allows 15 minutes).
pub const MAX_CLOCK_SKEW_SECS: i64 = 15 * 60;
/// Longest lifetime of a presigned URL, `X-Amz-Expires` (7 days, as AWS).
pub const MAX_PRESIGNED_EXPIRES_SECS: i64 = 7 * 24 * 3600;

const TERMINATOR: &str = "aws4_request";
const SIGNATURE_PARAM: &[u8] = b"X-Amz-Signature";

type HmacSha256 = Hmac<Sha256>;

/// A secret access key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// A request as the server received it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The HTTP method, e.g. `POST`.
    pub method: &'a str,
    /// The path exactly as received, still percent-encoded (`uri.path()`), never decoded.
    pub path: &'a str,
    /// The raw query string without `?` (`uri.query().unwrap_or("")`).
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    /// The URI's authority, used as the `host` header when the request has none
    /// (HTTP/2 carries it as `:authority`); `None` for HTTP/1.1.
    pub authority: Option<&'a str>,
    /// Lower-case hex SHA-256 of the request body as received (of nothing for an empty body).
    pub payload_sha256: &'a str,
}

/// The `Credential=` of a request: who signed it and for which scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub access_key_id: String,
    /// `YYYYMMDD`.
    pub date: String,
    /// Any region is accepted; it is recorded here.
    pub region: String,
    pub service: String,
}

/// A request whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub credential: Credential,
    /// When the client signed it, unix seconds.
    pub request_time: i64,
    /// `X-Amz-Security-Token` (header or query), if the client sent one. Berth's own
    /// access keys have no session token; the caller decides what to make of one.
    pub security_token: Option<String>,
    /// Signed as a presigned URL (query parameters) rather than an `Authorization` header.
    pub presigned: bool,
    /// `false` when the client sent `UNSIGNED-PAYLOAD`: the body is not covered by the
    /// signature and may have been altered in transit.
    pub payload_signed: bool,
    /// The headers the signature covers, lower-case.
    pub signed_headers: Vec<String>,
}

/// What went wrong, coarse enough to map onto AWS error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not a SigV4 request at all (no `Authorization: AWS4-…` header, no `X-Amz-Algorithm`
    /// parameter): the caller may try another scheme, else AWS says
    /// `MissingAuthenticationTokenException` (403).
    Missing,
    /// The signature parts cannot be read, or a required one is absent or out of range:
    /// `IncompleteSignatureException` (400).
    Malformed,
    /// The access key id is not known: `UnrecognizedClientException` (403).
    UnknownAccessKey,
    /// The credential scope names another service, or a date that is not the request's:
    /// `InvalidSignatureException` (403).
    InvalidScope,
    /// The request time is too far from the server's clock, or the presigned URL has
    /// expired: `InvalidSignatureException` (403; AWS: "Signature expired").
    Expired,
    /// `x-amz-content-sha256` is not the hash of the body: `InvalidSignatureException` (400 in S3).
    PayloadHashMismatch,
    /// The signature is not the one the secret gives: `InvalidSignatureException` (403).
    SignatureMismatch,
}

/// Why a request was not accepted. Messages tell the client what to fix and never
/// include the signature the server expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    #[error("the request is not signed: send an Authorization: AWS4-HMAC-SHA256 header or use a presigned URL")]
    Missing,
    #[error("{0}")]
    Malformed(String),
    #[error("the access key id {id:?} is not known to this server; create one with `berth access-key create`")]
    UnknownAccessKey { id: String },
    #[error("credential should be scoped to a valid service: {accepted} (the request is signed for {service:?})")]
    ServiceNotAccepted { service: String, accepted: String },
    #[error("the date in the credential scope, {scope_date}, is not the day of the request time {request_time}")]
    ScopeDateMismatch {
        scope_date: String,
        request_time: String,
    },
    #[error("signature expired or not yet current: the request time {request_time} is more than 15 minutes from the server time {server_time}; check the client's clock")]
    Skewed {
        request_time: String,
        server_time: String,
    },
    #[error("the presigned URL expired at {expired_at} (server time {server_time})")]
    PresignedExpired {
        expired_at: String,
        server_time: String,
    },
    #[error("x-amz-content-sha256 is not the SHA-256 of the request body")]
    PayloadHashMismatch,
    #[error("the request signature we calculated does not match the signature you provided; check the secret access key and the signing method")]
    SignatureMismatch,
}

impl SigV4Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SigV4Error::Missing => ErrorKind::Missing,
            SigV4Error::Malformed(_) => ErrorKind::Malformed,
            SigV4Error::UnknownAccessKey { .. } => ErrorKind::UnknownAccessKey,
            SigV4Error::ServiceNotAccepted { .. } | SigV4Error::ScopeDateMismatch { .. } => {
                ErrorKind::InvalidScope
            }
            SigV4Error::Skewed { .. } | SigV4Error::PresignedExpired { .. } => ErrorKind::Expired,
            SigV4Error::PayloadHashMismatch => ErrorKind::PayloadHashMismatch,
            SigV4Error::SignatureMismatch => ErrorKind::SignatureMismatch,
        }
    }
}

fn malformed(what: impl Into<String>) -> SigV4Error {
    SigV4Error::Malformed(what.into())
}

/// A parsed SigV4 request: its credential, time and canonical request. It holds
/// everything needed to check the signature once the secret is known.
#[derive(Debug, Clone)]
pub struct Signed {
    credential: Credential,
    request_time: i64,
    /// `X-Amz-Expires` of a presigned URL; `None` for the header form.
    expires: Option<i64>,
    security_token: Option<String>,
    signed_headers: Vec<String>,
    signature: [u8; 32],
    /// The canonical request up to and including the signed-headers line and its `\n`.
    canonical_head: Vec<u8>,
    /// A presigned URL's canonical head with the `host` the way botocore's
    /// `SigV4QueryAuth` signs it (the URL's hostname, no port: S13), when the `Host`
    /// header the request arrived with differs from that.
    hostname_head: Option<Vec<u8>>,
    /// Payload hashes to try, in order; more than one only for presigned URLs.
    payload_candidates: Vec<String>,
}

/// Verify a request's SigV4 signature: parse, [`Signed::check`] the scope and time
/// against `services` and `now`, look up the secret, [`Signed::verify`].
pub fn verify(
    req: &Request<'_>,
    services: &[&str],
    now: SystemTime,
    lookup: impl FnOnce(&str) -> Option<SecretKey>,
) -> Result<Verified, SigV4Error> {
    let signed = parse(req)?;
    signed.check(services, now)?;
    let secret = lookup(signed.access_key_id()).ok_or_else(|| SigV4Error::UnknownAccessKey {
        id: signed.access_key_id().to_string(),
    })?;
    signed.verify(&secret)
}

/// Read the SigV4 parts of a request (header or presigned form) and build its canonical
/// request. Needs no secret and no clock.
pub fn parse(req: &Request<'_>) -> Result<Signed, SigV4Error> {
    let params = parse_query(req.query);
    let presigned = params.iter().any(|p| p.key == b"X-Amz-Algorithm");
    let auth = authorization(req.headers)?;
    match (auth, presigned) {
        (Some(_), true) => Err(malformed(
            "the request carries both an Authorization header and X-Amz-Algorithm query parameter; use one",
        )),
        (None, false) => Err(SigV4Error::Missing),
        (Some(auth), false) => parse_header_form(req, &params, auth),
        (None, true) => parse_presigned(req, &params),
    }
}

impl Signed {
    pub fn access_key_id(&self) -> &str {
        &self.credential.access_key_id
    }

    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// Check the credential scope (service among `services`, date the request's day)
    /// and the request time against `now`: within 15 minutes for a signed header, not
    /// expired for a presigned URL.
    pub fn check(&self, services: &[&str], now: SystemTime) -> Result<(), SigV4Error> {
        if !services.contains(&self.credential.service.as_str()) {
            return Err(SigV4Error::ServiceNotAccepted {
                service: self.credential.service.clone(),
                accepted: services
                    .iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(" or "),
            });
        }
        let request_time = format_amz_date(self.request_time);
        if request_time[..8] != self.credential.date {
            return Err(SigV4Error::ScopeDateMismatch {
                scope_date: self.credential.date.clone(),
                request_time,
            });
        }
        let now = unix_now(now);
        let too_early = self.request_time - MAX_CLOCK_SKEW_SECS > now;
        match self.expires {
            None if too_early || now - self.request_time > MAX_CLOCK_SKEW_SECS => {
                Err(SigV4Error::Skewed {
                    request_time,
                    server_time: format_amz_date(now),
                })
            }
            Some(_) if too_early => Err(SigV4Error::Skewed {
                request_time,
                server_time: format_amz_date(now),
            }),
            Some(expires) if now > self.request_time + expires => {
                Err(SigV4Error::PresignedExpired {
                    expired_at: format_amz_date(self.request_time + expires),
                    server_time: format_amz_date(now),
                })
            }
            _ => Ok(()),
        }
    }

    /// Check the signature against `secret`, in constant time. Does not check the scope
    /// or the time: call [`Signed::check`] too.
    pub fn verify(&self, secret: &SecretKey) -> Result<Verified, SigV4Error> {
        let key = signing_key(secret, &self.credential);
        let scope = format!(
            "{}/{}/{}/{TERMINATOR}",
            self.credential.date, self.credential.region, self.credential.service
        );
        let time = format_amz_date(self.request_time);
        let heads = std::iter::once(&self.canonical_head).chain(self.hostname_head.as_ref());
        for (head, payload) in
            heads.flat_map(|h| self.payload_candidates.iter().map(move |p| (h, p)))
        {
            let mut canonical = Sha256::new();
            canonical.update(head);
            canonical.update(payload.as_bytes());
            let string_to_sign = format!(
                "{ALGORITHM}\n{time}\n{scope}\n{}",
                hex::encode(canonical.finalize())
            );
            let mut mac = hmac_sha256(&key);
            mac.update(string_to_sign.as_bytes());
            if mac.verify_slice(&self.signature).is_ok() {
                return Ok(Verified {
                    credential: self.credential.clone(),
                    request_time: self.request_time,
                    security_token: self.security_token.clone(),
                    presigned: self.expires.is_some(),
                    payload_signed: payload != UNSIGNED_PAYLOAD,
                    signed_headers: self.signed_headers.clone(),
                });
            }
        }
        Err(SigV4Error::SignatureMismatch)
    }
}

fn unix_now(now: SystemTime) -> i64 {
    match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes keys of any length")
}

fn hmac(key: &[u8], msg: &str) -> [u8; 32] {
    let mut mac = hmac_sha256(key);
    mac.update(msg.as_bytes());
    mac.finalize().into_bytes().into()
}

/// `kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")`.
fn signing_key(secret: &SecretKey, c: &Credential) -> [u8; 32] {
    let k_date = hmac(format!("AWS4{}", secret.expose()).as_bytes(), &c.date);
    let k_region = hmac(&k_date, &c.region);
    let k_service = hmac(&k_region, &c.service);
    hmac(&k_service, TERMINATOR)
}

/// The `Authorization` header if it is a SigV4 one; `None` when absent or another scheme
/// (a bearer token), so that the caller can fall back.
fn authorization(headers: &HeaderMap) -> Result<Option<&str>, SigV4Error> {
    let mut values = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| malformed("the Authorization header is not ASCII text"))?;
    if !value.starts_with("AWS") {
        return Ok(None);
    }
    if values.next().is_some() {
        return Err(malformed(
            "the request carries more than one Authorization header",
        ));
    }
    Ok(Some(value))
}

fn parse_header_form(
    req: &Request<'_>,
    params: &[QueryParam],
    auth: &str,
) -> Result<Signed, SigV4Error> {
    let (algorithm, rest) = auth.split_once(' ').unwrap_or((auth, ""));
    check_algorithm(algorithm)?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').ok_or_else(|| {
            malformed(format!(
                "Authorization header: {part:?} is not NAME=VALUE; expected Credential=…, SignedHeaders=…, Signature=…"
            ))
        })?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            other => {
                return Err(malformed(format!(
                    "Authorization header: unknown component {other:?}; expected Credential, SignedHeaders and Signature"
                )))
            }
        };
        if slot.replace(value).is_some() {
            return Err(malformed(format!(
                "Authorization header: {name} given twice"
            )));
        }
    }
    let missing = |name: &str| malformed(format!("Authorization header: {name}= is missing"));
    let credential = parse_credential(
        credential.ok_or_else(|| missing("Credential"))?,
        "Authorization header: Credential",
    )?;
    let signed_headers = parse_signed_headers(
        signed_headers.ok_or_else(|| missing("SignedHeaders"))?,
        "Authorization header: SignedHeaders",
    )?;
    let signature = parse_signature(
        signature.ok_or_else(|| missing("Signature"))?,
        "Authorization header: Signature",
    )?;

    let request_time = header_time(req.headers)?;
    let security_token = header_str(req.headers, "x-amz-security-token")?;
    let payload = match header_str(req.headers, "x-amz-content-sha256")? {
        None => req.payload_sha256.to_ascii_lowercase(),
        Some(v) if v == UNSIGNED_PAYLOAD => v,
        Some(v) if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
            if !v.eq_ignore_ascii_case(req.payload_sha256) {
                return Err(SigV4Error::PayloadHashMismatch);
            }
            v
        }
        Some(v) => {
            return Err(malformed(format!(
                "x-amz-content-sha256 {v:?} is not supported; send the hex SHA-256 of the body or UNSIGNED-PAYLOAD"
            )))
        }
    };
    let canonical_head = canonical_head(req, canonical_query(params, None), &signed_headers)?;
    Ok(Signed {
        credential,
        request_time,
        expires: None,
        security_token,
        signed_headers,
        signature,
        canonical_head,
        hostname_head: None,
        payload_candidates: vec![payload],
    })
}

fn parse_presigned(req: &Request<'_>, params: &[QueryParam]) -> Result<Signed, SigV4Error> {
    let get = |name: &str| -> Result<Option<String>, SigV4Error> {
        let mut found = params.iter().filter(|p| p.key == name.as_bytes());
        let Some(first) = found.next() else {
            return Ok(None);
        };
        if found.next().is_some() {
            return Err(malformed(format!("query parameter {name} given twice")));
        }
        String::from_utf8(first.value.clone())
            .map(Some)
            .map_err(|_| malformed(format!("query parameter {name} is not UTF-8")))
    };
    let need = |name: &str| {
        get(name)?
            .ok_or_else(|| malformed(format!("presigned URL: query parameter {name} is missing")))
    };
    check_algorithm(&need("X-Amz-Algorithm")?)?;
    let credential = parse_credential(&need("X-Amz-Credential")?, "X-Amz-Credential")?;
    let date = need("X-Amz-Date")?;
    let request_time = parse_amz_date(&date).ok_or_else(|| {
        malformed(format!(
            "X-Amz-Date {date:?} is not a time like 20150830T123600Z"
        ))
    })?;
    let expires_raw = need("X-Amz-Expires")?;
    let expires = expires_raw
        .parse::<i64>()
        .ok()
        .filter(|e| *e >= 0 && expires_raw.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            malformed(format!(
                "X-Amz-Expires {expires_raw:?} is not a number of seconds"
            ))
        })?;
    if expires > MAX_PRESIGNED_EXPIRES_SECS {
        return Err(malformed(format!(
            "X-Amz-Expires must be at most {MAX_PRESIGNED_EXPIRES_SECS} seconds (7 days); it is {expires}"
        )));
    }
    let signed_headers =
        parse_signed_headers(&need("X-Amz-SignedHeaders")?, "X-Amz-SignedHeaders")?;
    let signature = parse_signature(&need("X-Amz-Signature")?, "X-Amz-Signature")?;
    let security_token = get("X-Amz-Security-Token")?;
    // A presigned URL says nothing about a body: botocore's SigV4QueryAuth signs the hash
    // of the (empty) body, S3-style presigners sign UNSIGNED-PAYLOAD. Accept either,
    // unless the client named one in x-amz-content-sha256.
    let payload_candidates = match header_str(req.headers, "x-amz-content-sha256")? {
        Some(v) if v == UNSIGNED_PAYLOAD => vec![v],
        Some(v) if v.eq_ignore_ascii_case(req.payload_sha256) => vec![v],
        Some(_) => return Err(SigV4Error::PayloadHashMismatch),
        None => vec![
            req.payload_sha256.to_ascii_lowercase(),
            UNSIGNED_PAYLOAD.to_string(),
        ],
    };
    let query = canonical_query(params, Some(SIGNATURE_PARAM));
    let head = canonical_head(req, query.clone(), &signed_headers)?;
    // The AgentCore SDK presigns with `host` = the URL's hostname, without the port the
    // client then puts in `Host` (S13). The port is not part of what was signed, so a
    // URL signed that way is accepted too (the host name itself still is).
    let hostname_head = match request_host(req).and_then(hostname_of) {
        Some(hostname) => {
            let headers = with_host(req.headers, &hostname)?;
            let alt = Request {
                headers: &headers,
                ..*req
            };
            Some(canonical_head(&alt, query, &signed_headers)?).filter(|h| *h != head)
        }
        None => None,
    };
    Ok(Signed {
        credential,
        request_time,
        expires: Some(expires),
        security_token,
        signed_headers,
        signature,
        canonical_head: head,
        hostname_head,
        payload_candidates,
    })
}

fn check_algorithm(algorithm: &str) -> Result<(), SigV4Error> {
    if algorithm == ALGORITHM {
        return Ok(());
    }
    Err(malformed(format!(
        "unsupported signing algorithm {algorithm:?}; this server accepts {ALGORITHM} (SigV4a is not supported)"
    )))
}

/// `AKID/20150830/us-east-1/service/aws4_request`.
fn parse_credential(value: &str, what: &str) -> Result<Credential, SigV4Error> {
    let parts: Vec<&str> = value.split('/').collect();
    let shape = || {
        malformed(format!(
            "{what} must be ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request; it is {value:?}"
        ))
    };
    let [id, date, region, service, terminator] = parts.as_slice() else {
        return Err(shape());
    };
    if id.is_empty()
        || region.is_empty()
        || service.is_empty()
        || date.len() != 8
        || !date.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(shape());
    }
    if *terminator != TERMINATOR {
        return Err(malformed(format!(
            "{what}: the credential scope must end with {TERMINATOR}, not {terminator:?}"
        )));
    }
    Ok(Credential {
        access_key_id: id.to_string(),
        date: date.to_string(),
        region: region.to_string(),
        service: service.to_string(),
    })
}

fn parse_signed_headers(value: &str, what: &str) -> Result<Vec<String>, SigV4Error> {
    let names: Vec<String> = value.split(';').map(str::to_string).collect();
    if names.iter().any(|n| {
        n.is_empty()
            || n.bytes()
                .any(|b| b.is_ascii_uppercase() || b.is_ascii_whitespace() || b.is_ascii_control())
    }) {
        return Err(malformed(format!(
            "{what} must be lower-case header names separated by ';'; it is {value:?}"
        )));
    }
    if !names.iter().any(|n| n == "host") {
        return Err(malformed(format!(
            "{what} must include host; it is {value:?}"
        )));
    }
    Ok(names)
}

fn parse_signature(value: &str, what: &str) -> Result<[u8; 32], SigV4Error> {
    let mut out = [0u8; 32];
    if value.len() != 64 || hex::decode_to_slice(value, &mut out).is_err() {
        return Err(malformed(format!(
            "{what} must be 64 hexadecimal characters"
        )));
    }
    Ok(out)
}

fn header_str(headers: &HeaderMap, name: &str) -> Result<Option<String>, SigV4Error> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(malformed(format!("the {name} header is given twice")));
    }
    v.to_str()
        .map(|s| Some(s.trim().to_string()))
        .map_err(|_| malformed(format!("the {name} header is not ASCII text")))
}

/// The signing time of a signed-header request: `X-Amz-Date`, else `Date` (botocore
/// signs with `Date` when the request already has one).
fn header_time(headers: &HeaderMap) -> Result<i64, SigV4Error> {
    if let Some(v) = header_str(headers, "x-amz-date")? {
        return parse_amz_date(&v).ok_or_else(|| {
            malformed(format!(
                "X-Amz-Date {v:?} is not a time like 20150830T123600Z"
            ))
        });
    }
    if let Some(v) = header_str(headers, "date")? {
        return parse_http_date(&v).ok_or_else(|| {
            malformed(format!(
                "the Date header {v:?} is not a time like \"Sun, 30 Aug 2015 12:36:00 GMT\""
            ))
        });
    }
    Err(malformed(
        "the request has neither an X-Amz-Date nor a Date header to say when it was signed",
    ))
}

/// The request's host as received: the `Host` header (sent twice, both the same), else
/// the URI's authority. `None` for two different `Host` headers.
fn request_host<'a>(req: &Request<'a>) -> Option<&'a str> {
    let mut values = req.headers.get_all(axum::http::header::HOST).iter();
    match values.next() {
        Some(first) if values.all(|v| v == first) => first.to_str().ok(),
        Some(_) => None,
        None => req.authority,
    }
}

/// What Python's `urlparse(url).hostname` gives for a `host[:port]`: the port and the
/// brackets of an IPv6 literal dropped, lower-cased. `None` when that is the host as is.
fn hostname_of(host: &str) -> Option<String> {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(addr, _)| addr)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = name.to_ascii_lowercase();
    (name != host && !name.is_empty()).then_some(name)
}

/// `headers` with `Host` replaced by `host`.
fn with_host(headers: &HeaderMap, host: &str) -> Result<HeaderMap, SigV4Error> {
    let mut headers = headers.clone();
    let value = axum::http::HeaderValue::from_str(host)
        .map_err(|_| malformed("the Host header is not a valid host name"))?;
    headers.insert(axum::http::header::HOST, value);
    Ok(headers)
}

/// Method, path, query, canonical headers, blank line, signed headers, each followed by
/// `\n`; the payload hash comes last.
///
/// A `Host` header sent twice with the same value counts once: the AgentCore SDK's
/// shell client signs one `host` and then sends it both from its WebSocket library and
/// from its own headers (B3). Two different values stay joined, and fail to verify.
fn canonical_head(
    req: &Request<'_>,
    query: String,
    signed_headers: &[String],
) -> Result<Vec<u8>, SigV4Error> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method.to_ascii_uppercase().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_path(req.path).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(query.as_bytes());
    out.push(b'\n');
    for name in signed_headers {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        let values = req.headers.get_all(name.as_str());
        let mut iter = values.iter();
        if let (true, Some(first)) = (name == "host", iter.next()) {
            if iter.all(|v| v == first) {
                canonical_header_value(std::iter::once(first.as_bytes()), &mut out);
            } else {
                canonical_header_value(values.iter().map(|v| v.as_bytes()), &mut out);
            }
        } else if values.iter().next().is_some() {
            canonical_header_value(values.iter().map(|v| v.as_bytes()), &mut out);
        } else if let (true, Some(authority)) = (name == "host", req.authority) {
            canonical_header_value(std::iter::once(authority.as_bytes()), &mut out);
        } else {
            return Err(malformed(format!(
                "the signed header {name:?} is not in the request"
            )));
        }
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(signed_headers.join(";").as_bytes());
    out.push(b'\n');
    Ok(out)
}

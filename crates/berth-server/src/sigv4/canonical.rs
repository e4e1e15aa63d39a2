//! The canonical request, exactly as botocore's `SigV4Auth` builds it for rest-json
//! services (`botocore/auth.py`, botocore 1.44.5), and the SigV4 time formats.
//!
//! The client signs the URL it sends, so everything here starts from the request as
//! received: the raw path and raw query string, never a decoded form of them.

/// RFC 3986 unreserved characters: the only bytes SigV4 leaves unencoded.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// Percent-encode every byte outside the unreserved set (and `/` when `keep_slash`),
/// with upper-case hex, as Python's `urllib.parse.quote` does.
pub(crate) fn uri_encode(bytes: &[u8], keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
}

/// Decode `%XX` escapes; anything else (a `+`, a stray `%`) stays as it is.
pub(crate) fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hi = (bytes[i + 1] as char).to_digit(16);
            let lo = (bytes[i + 2] as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The canonical URI of a non-S3 service: dot segments and empty segments removed
/// (botocore's `remove_dot_segments`), then every byte outside the unreserved set and
/// `/` percent-encoded *again*. A path the client already encoded is encoded twice:
/// botocore sends `/runtimes/arn%3Aaws…` and signs `/runtimes/arn%253Aaws…`.
pub(crate) fn canonical_path(raw: &str) -> String {
    let normalized = remove_dot_segments(raw);
    let mut out = String::with_capacity(normalized.len() + 16);
    uri_encode(normalized.as_bytes(), true, &mut out);
    out
}

/// botocore `utils.remove_dot_segments` (RFC 3986 5.2.4 plus AWS's collapsing of
/// consecutive slashes); an empty path is `/`.
fn remove_dot_segments(path: &str) -> String {
    if path.is_empty() {
        return "/".to_string();
    }
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    if path.starts_with('/') {
        out.push('/');
    }
    out.push_str(&segments.join("/"));
    if path.ends_with('/') && !segments.is_empty() {
        out.push('/');
    }
    out
}

/// One query parameter, decoded.
pub(crate) struct QueryParam {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Split a raw query string the way botocore does (`&`, then the first `=`); a
/// parameter without `=` has an empty value. Keys and values are percent-decoded.
pub(crate) fn parse_query(raw: &str) -> Vec<QueryParam> {
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            QueryParam {
                key: percent_decode(k),
                value: percent_decode(v),
            }
        })
        .collect()
}

/// The canonical query string: every parameter re-encoded with the SigV4 rules, sorted
/// by encoded key and then encoded value, `key=value` joined with `&`. `skip` names a
/// parameter left out (`X-Amz-Signature` of a presigned URL).
///
/// botocore signs the query exactly as it put it on the URL, which is already encoded
/// with these rules, so decoding and re-encoding gives back its very bytes; it also
/// gives the canonical form for a client that encoded differently (`%3a`, raw `:`).
pub(crate) fn canonical_query(params: &[QueryParam], skip: Option<&[u8]>) -> String {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .filter(|p| Some(p.key.as_slice()) != skip)
        .map(|p| {
            let mut k = String::new();
            let mut v = String::new();
            uri_encode(&p.key, false, &mut k);
            uri_encode(&p.value, false, &mut v);
            (k, v)
        })
        .collect();
    pairs.sort();
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// A header's canonical value: each occurrence with surrounding whitespace removed and
/// inner runs of whitespace collapsed to one space (botocore: `' '.join(v.split())`),
/// occurrences joined with `,` in the order received.
pub(crate) fn canonical_header_value<'v>(
    values: impl Iterator<Item = &'v [u8]>,
    out: &mut Vec<u8>,
) {
    for (i, value) in values.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let mut first = true;
        for word in value
            .split(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
            .filter(|w| !w.is_empty())
        {
            if !first {
                out.push(b' ');
            }
            out.extend_from_slice(word);
            first = false;
        }
    }
}

// ---- time ----

/// `20150830T123600Z` (the SigV4 timestamp) as unix seconds.
pub(crate) fn parse_amz_date(s: &str) -> Option<i64> {
    // chrono would also take shorter fields and signs; the layout is fixed.
    let b = s.as_bytes();
    let digits_at = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' || !digits_at(0..8) || !digits_at(9..15) {
        return None;
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%M%SZ")
        .ok()
        .map(|t| t.and_utc().timestamp())
}

/// Unix seconds as a SigV4 timestamp, `20150830T123600Z`.
pub(crate) fn format_amz_date(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("%Y%m%dT%H%M%SZ")
        .to_string()
}

/// An HTTP `Date` header (`Sun, 30 Aug 2015 12:36:00 GMT`, or `-0000`/`+0000` as Python's
/// `email.utils.formatdate` writes it, which botocore uses when a request has a `Date`).
/// Only UTC is accepted, as AWS does.
pub(crate) fn parse_http_date(s: &str) -> Option<i64> {
    let t = chrono::DateTime::parse_from_rfc2822(s.trim()).ok()?;
    (t.offset().local_minus_utc() == 0).then(|| t.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_then_encoded_again() {
        for (raw, want) in [
            ("", "/"),
            ("/", "/"),
            ("/./", "/"),
            ("/example1/example2/../..", "/"),
            ("/example/..", "/"),
            ("//example//", "/example/"),
            ("/example space/", "/example%20space/"),
            ("/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"),
            ("/\u{1234}", "/%E1%88%B4"),
            (
                "/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A123456789012%3Aruntime%2Fagent-abc1234567/invocations",
                "/runtimes/arn%253Aaws%253Abedrock-agentcore%253Aus-east-1%253A123456789012%253Aruntime%252Fagent-abc1234567/invocations",
            ),
        ] {
            assert_eq!(canonical_path(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn query_is_decoded_reencoded_and_sorted() {
        let q = |raw: &str| canonical_query(&parse_query(raw), None);
        assert_eq!(q(""), "");
        assert_eq!(
            q("Param2=value2&Param1=value1"),
            "Param1=value1&Param2=value2"
        );
        assert_eq!(q("b=2&a=1&b=1&B=0"), "B=0&a=1&b=1&b=2");
        assert_eq!(q("flag&empty="), "empty=&flag=");
        assert_eq!(q("a=%3a%2F&c=x y+z:"), "a=%3A%2F&c=x%20y%2Bz%3A");
        assert_eq!(q("a=%zz%4"), "a=%25zz%254");
        let skip = canonical_query(
            &parse_query("X-Amz-Signature=abc&X-Amz-Date=1"),
            Some(b"X-Amz-Signature"),
        );
        assert_eq!(skip, "X-Amz-Date=1");
    }

    #[test]
    fn header_values_are_trimmed_and_joined() {
        let mut out = Vec::new();
        canonical_header_value(
            [&b"  a   b\t c  "[..], b"second", b""].into_iter(),
            &mut out,
        );
        assert_eq!(out, b"a b c,second,");
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
        assert_eq!(format_amz_date(1_440_938_160), "20150830T123600Z");
        assert_eq!(format_amz_date(0), "19700101T000000Z");
        assert_eq!(parse_amz_date("20240229T000000Z"), Some(1_709_164_800));
        for bad in [
            "20150830T123600",
            "2015-08-30T12:36:00Z",
            "20150230T123600Z",
            "20151330T123600Z",
            "20150830T243600Z",
            "2015083OT123600Z",
            "+0150830T123600Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
        assert_eq!(
            parse_http_date("Sun, 30 Aug 2015 12:36:00 GMT"),
            Some(1_440_938_160)
        );
        assert_eq!(
            parse_http_date("Sun, 30 Aug 2015 12:36:00 -0000"),
            Some(1_440_938_160)
        );
        assert_eq!(parse_http_date("Sun, 30 Aug 2015 12:36:00 +0200"), None);
    }
}

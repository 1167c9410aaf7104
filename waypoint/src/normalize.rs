//! One canonical form of the request line, decided before routing and authorization, and sent on
//! upstream: what a policy matched is exactly what the backend receives.
//!
//! - Methods: a standard method in any case (`get`) becomes its canonical form (`GET`), so a rule
//!   on `GET` cannot be sidestepped by a backend that reads methods case-insensitively. Other
//!   (extension) methods pass unchanged.
//! - Paths: percent-encoded unreserved characters and `/` are decoded (`%2F` and `%2f` become `/`,
//!   `%61` becomes `a`), runs of `/` merge, `.` and `..` segments are removed; an encoded
//!   backslash, NUL or malformed escape is refused, and so is a `;` (path parameters, which some
//!   backends strip and others keep). Other escapes are kept with upper-case hex. Paths are
//!   case-sensitive, as in Istio. Raw non-ASCII bytes are percent-encoded (a policy names them
//!   encoded, as `/caf%C3%A9`). The query string is left as sent.
//! - Host: one `Host` header at most, agreeing with the request target's authority (HTTP/2
//!   `:authority`, HTTP/1.1 absolute form) when both are present; no user info. The canonical form
//!   is lower case without a trailing dot (`Hello.Demo.` is `hello.demo`), and it is what the
//!   backend receives.

use http::Method;

/// Why a request line was refused (answered `400`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The path does not start with `/` (and is not `*`).
    #[error("path does not start with '/'")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("malformed percent-encoding in the path")]
    BadEscape,
    /// An encoded backslash or NUL, which backends disagree on.
    #[error("encoded backslash or NUL in the path")]
    Forbidden,
    /// A `;`: path parameters, which backends disagree on.
    #[error("path parameters (';') in the path")]
    Parameters,
    /// More than one `Host` header.
    #[error("more than one Host header")]
    SeveralHosts,
    /// `Host` and the request target name different hosts.
    #[error("the Host header and the request target's authority differ")]
    ConflictingHosts,
    /// A host that is not a valid authority (or carries user info).
    #[error("the host is not a valid authority")]
    BadHost,
}

/// The canonical form of a host (`host[:port]`): lower case, no trailing dot on the name. The
/// name must be a DNS name (letters, digits, `-`, `_`, `.`), an IPv4 address or a bracketed IPv6
/// address, and a port a number: the authority parser alone accepts more than that.
fn canonical_host(raw: &str) -> Result<String, Refused> {
    let authority: http::uri::Authority = raw.parse().map_err(|_| Refused::BadHost)?;
    let text = authority.as_str();
    if text.contains('@') {
        return Err(Refused::BadHost);
    }
    let name = authority.host().to_ascii_lowercase();
    let name = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => {
            v6.parse::<std::net::Ipv6Addr>().map_err(|_| Refused::BadHost)?;
            name.as_str()
        }
        None => {
            let dns = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            let trimmed = name.trim_end_matches('.');
            if trimmed.is_empty() || !trimmed.chars().all(dns) {
                return Err(Refused::BadHost);
            }
            trimmed
        }
    };
    // Whatever follows the name must be a port.
    let rest = &text[authority.host().len()..];
    match (rest.strip_prefix(':'), authority.port_u16()) {
        (None, _) if rest.is_empty() => Ok(name.to_owned()),
        (Some(_), Some(port)) => Ok(format!("{name}:{port}")),
        _ => Err(Refused::BadHost),
    }
}

/// The request's host in canonical form (empty when it names none), or why it is refused.
pub fn host(headers: &http::HeaderMap, uri: &http::Uri) -> Result<String, Refused> {
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let header = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(Refused::SeveralHosts),
        (Some(h), None) => Some(canonical_host(h.to_str().map_err(|_| Refused::BadHost)?)?),
        (None, _) => None,
    };
    let target = uri.authority().map(|a| canonical_host(a.as_str())).transpose()?;
    match (header, target) {
        (Some(h), Some(t)) if h != t => Err(Refused::ConflictingHosts),
        (Some(h), _) | (None, Some(h)) => Ok(h),
        (None, None) => Ok(String::new()),
    }
}

/// The canonical form of `method`.
pub fn method(method: &Method) -> Method {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ];
    STANDARD.into_iter().find(|m| m.as_str().eq_ignore_ascii_case(method.as_str())).unwrap_or_else(|| method.clone())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The canonical form of a path (without its query).
pub fn path(raw: &str) -> Result<String, Refused> {
    if raw == "*" {
        return Ok(raw.to_owned());
    }
    if !raw.starts_with('/') {
        return Err(Refused::NotAbsolute);
    }
    // Decode what may be decoded; keep other escapes in one spelling.
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b';' {
            return Err(Refused::Parameters);
        }
        // Raw non-ASCII bytes (HTTP/1.1 lets them through as obs-text) take their encoded form,
        // the one an encoded request already has: one spelling for policies and backends.
        if !b.is_ascii() {
            decoded.push_str(&format!("%{b:02X}"));
            i += 1;
            continue;
        }
        if b != b'%' {
            decoded.push(char::from(b));
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        else {
            return Err(Refused::BadEscape);
        };
        let v = h * 16 + l;
        match v {
            b'/' => decoded.push('/'),
            b'\\' | 0 => return Err(Refused::Forbidden),
            v if unreserved(v) => decoded.push(char::from(v)),
            v => decoded.push_str(&format!("%{v:02X}")),
        }
        i += 3;
    }
    // Merge slashes and resolve dot segments.
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        match segment {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn methods_in_any_case_become_canonical() {
        assert_eq!(method(&Method::from_bytes(b"get").unwrap()), Method::GET);
        assert_eq!(method(&Method::from_bytes(b"pOsT").unwrap()), Method::POST);
        assert_eq!(method(&Method::from_bytes(b"PURGE").unwrap()).as_str(), "PURGE");
    }

    #[test]
    fn encodings_and_dot_segments_cannot_hide_a_path() {
        for (raw, want) in [
            ("/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/api%2Fadmin", "/api/admin"),
            ("/api%2fadmin", "/api/admin"),
            ("//api///admin", "/api/admin"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/./admin/.", "/admin/"),
            ("/../../admin", "/admin"),
            ("/", "/"),
            ("/a/", "/a/"),
            ("/caf%c3%a9", "/caf%C3%A9"),
        ] {
            assert_eq!(path(raw).unwrap(), want, "{raw}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(path("admin"), Err(Refused::NotAbsolute));
        assert_eq!(path("/a%2"), Err(Refused::BadEscape));
        assert_eq!(path("/a%zz"), Err(Refused::BadEscape));
        assert_eq!(path("/a%5Cb"), Err(Refused::Forbidden));
        assert_eq!(path("/a%00b"), Err(Refused::Forbidden));
        assert_eq!(path("/admin;jsessionid=1"), Err(Refused::Parameters));
        assert_eq!(path("/admin;/x"), Err(Refused::Parameters));
        // An encoded ';' is data, not a separator: kept encoded.
        assert_eq!(path("/a%3bb"), Ok("/a%3Bb".into()));
        // Raw non-ASCII bytes take the encoded spelling (fuzzer find: they were re-read as Latin-1
        // characters, so the canonical form was not canonical).
        assert_eq!(path("/caf\u{e9}"), path("/caf%C3%A9"));
        assert_eq!(path("/.\u{73a}"), Ok("/.%DC%BA".into()));
        assert_eq!(path("/.%dc%ba"), Ok("/.%DC%BA".into()));
    }

    #[test]
    fn one_host_in_one_spelling() {
        use http::{HeaderMap, HeaderValue, Uri};
        let h = |hosts: &[&str], uri: &str| {
            let mut m = HeaderMap::new();
            for v in hosts {
                m.append(http::header::HOST, HeaderValue::from_str(v).unwrap());
            }
            host(&m, &uri.parse::<Uri>().unwrap())
        };
        assert_eq!(h(&["Hello.Demo.svc.cluster.local."], "/"), Ok("hello.demo.svc.cluster.local".into()));
        assert_eq!(h(&["HELLO:80"], "/"), Ok("hello:80".into()));
        assert_eq!(h(&[], "http://Hello./x"), Ok("hello".into()));
        assert_eq!(h(&["hello"], "http://HELLO./x"), Ok("hello".into()));
        assert_eq!(h(&[], "/"), Ok(String::new()));
        assert_eq!(h(&["[::1]:80"], "/"), Ok("[::1]:80".into()));
        assert_eq!(h(&["a", "b"], "/"), Err(Refused::SeveralHosts));
        assert_eq!(h(&["a", "a"], "/"), Err(Refused::SeveralHosts));
        assert_eq!(h(&["public"], "http://admin/x"), Err(Refused::ConflictingHosts));
        assert_eq!(h(&["user@admin"], "/"), Err(Refused::BadHost));
        assert_eq!(h(&["a b"], "/"), Err(Refused::BadHost));
        // Fuzzer find: the authority parser took this, and its "host" was `Q[`.
        assert_eq!(h(&["Q[:&0]..0:00(30"], "/"), Err(Refused::BadHost));
        assert_eq!(h(&["a:http"], "/"), Err(Refused::BadHost));
        assert_eq!(h(&["[fe80::1"], "/"), Err(Refused::BadHost));
        assert_eq!(h(&["."], "/"), Err(Refused::BadHost));
    }
}

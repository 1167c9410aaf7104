//! One canonical form of the request line, decided before routing and authorization, and sent on
//! upstream: what a policy matched is exactly what the backend receives.
//!
//! - Methods: a standard method in any case (`get`) becomes its canonical form (`GET`), so a rule
//!   on `GET` cannot be sidestepped by a backend that reads methods case-insensitively. Other
//!   (extension) methods pass unchanged.
//! - Paths: percent-encoded unreserved characters and `/` are decoded (`%2F` and `%2f` become `/`,
//!   `%61` becomes `a`), runs of `/` merge, `.` and `..` segments are removed; an encoded
//!   backslash, NUL or malformed escape is refused. Other escapes are kept with upper-case hex.
//!   The query string is left as sent.

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
    }
}

//! What the waypoint changes in the headers and paths of what it forwards: hop-by-hop headers
//! dropped, forwarding headers made trustworthy, a route's header modifiers, path rewrites and
//! redirects, and which upgrades are passed on.

use std::net::IpAddr;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use proto::api::ambient::waypoint::v1::{self as pb, path_modifier};

/// Hop-by-hop headers, never forwarded.
const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "proxy-authorization"];

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// What a client says about where a request came from is passed on only behind what the
/// waypoint saw itself, as Envoy does by default: `x-forwarded-for` gets the client's address
/// appended (the last entry is the one a server can trust), and `x-forwarded-client-cert`, which
/// only a proxy that terminated the client's TLS may set, is removed (Envoy's `SANITIZE`).
pub(crate) fn sanitize_forwarding(headers: &mut HeaderMap, client: Option<IpAddr>) {
    headers.remove("x-forwarded-client-cert");
    let Some(client) = client else { return };
    let mut chain: Vec<String> =
        headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).map(str::to_owned).collect();
    chain.push(client.to_string());
    if let Ok(v) = HeaderValue::from_str(&chain.join(", ")) {
        headers.insert("x-forwarded-for", v);
    }
}

pub(crate) fn modify_headers(headers: &mut HeaderMap, m: &pb::HeaderModifier) {
    let pair =
        |h: &pb::Header| Some((HeaderName::from_bytes(h.name.as_bytes()).ok()?, HeaderValue::from_str(&h.value).ok()?));
    for (name, value) in m.set.iter().filter_map(pair) {
        headers.insert(name, value);
    }
    for (name, value) in m.add.iter().filter_map(pair) {
        headers.append(name, value);
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

pub(crate) fn rewrite_path(path: &str, m: &pb::PathModifier, matched_prefix: Option<&str>) -> String {
    match &m.kind {
        Some(path_modifier::Kind::ReplaceFullPath(p)) => p.clone(),
        Some(path_modifier::Kind::ReplacePrefixMatch(p)) => {
            // `rest` is empty or starts with `/` (prefixes match whole segments).
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let base = p.trim_end_matches('/');
            match (base.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_owned(),
                (_, true) => base.to_owned(),
                _ => format!("{base}{rest}"),
            }
        }
        None => path.to_owned(),
    }
}

/// The prefix a rule matched `path` with, if it was a prefix match.
pub(crate) fn matched_prefix<'a>(rule: &'a pb::RouteRule, path: &str) -> Option<&'a str> {
    rule.matches.iter().filter_map(|m| m.path.as_ref()).find_map(|p| {
        (p.kind == pb::path_match::Kind::Prefix as i32 && path.starts_with(p.value.trim_end_matches('/')))
            .then_some(p.value.as_str())
    })
}

/// Where a redirect sends the client: its status (Envoy's redirect codes; unset or any other:
/// `302`, as in the Gateway API) and `Location`.
pub(crate) fn redirect(r: &pb::Redirect, req_host: &str, path: &str, prefix: Option<&str>) -> (StatusCode, String) {
    let scheme = if r.scheme.is_empty() { "http" } else { &r.scheme };
    let host = if r.hostname.is_empty() { req_host.split(':').next().unwrap_or(req_host) } else { &r.hostname };
    let port = if r.port == 0 { String::new() } else { format!(":{}", r.port) };
    let path = r.path.as_ref().map_or_else(|| path.to_owned(), |m| rewrite_path(path, m, prefix));
    let status = match r.status_code {
        301 | 303 | 307 | 308 => StatusCode::from_u16(r.status_code as u16).unwrap_or(StatusCode::FOUND),
        _ => StatusCode::FOUND,
    };
    (status, format!("{scheme}://{host}{port}{path}"))
}

/// The protocol of an HTTP/1.1 upgrade the request asks for (`Upgrade` with `Connection:
/// upgrade`), if it is one the waypoint passes on. An upgrade to h2c never is (the request goes
/// on as HTTP/1.1, as with Envoy): behind it the backend would take HTTP/2 requests that no
/// policy looked at.
pub(crate) fn upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    headers.get(header::UPGRADE).cloned().filter(|proto| {
        let h2c = proto.to_str().map_or(true, |p| p.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")));
        !h2c && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites_keep_the_rest_of_the_path() {
        let m = pb::PathModifier { kind: Some(path_modifier::Kind::ReplacePrefixMatch("/v2".into())) };
        assert_eq!(rewrite_path("/api/users", &m, Some("/api")), "/v2/users");
        assert_eq!(rewrite_path("/api", &m, Some("/api")), "/v2");
        let full = pb::PathModifier { kind: Some(path_modifier::Kind::ReplaceFullPath("/x".into())) };
        assert_eq!(rewrite_path("/api/users", &full, None), "/x");
    }

    #[test]
    fn forwarding_headers_are_appended_or_removed() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("127.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-client-cert", HeaderValue::from_static("By=spiffe://cluster.local/ns/x/sa/admin"));
        sanitize_forwarding(&mut h, Some("10.20.1.5".parse().unwrap()));
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1, 1.2.3.4, 10.20.1.5");
        assert!(!h.contains_key("x-forwarded-client-cert"));
        let mut fresh = HeaderMap::new();
        sanitize_forwarding(&mut fresh, Some("10.20.1.5".parse().unwrap()));
        assert_eq!(fresh["x-forwarded-for"], "10.20.1.5");
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}

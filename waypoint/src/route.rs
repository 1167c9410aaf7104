//! Choosing the rule for a request, with Gateway API's precedence.
//!
//! Every match of every rule of every route for the service (and port) is tried; among those that
//! match, the most specific wins: an exact path over a regular expression over a prefix (the
//! longest prefix first), then a method match, then the most header matches, then the most query
//! matches; remaining ties go to the route and rule listed first. A rule with no matches matches
//! every request as a `/` prefix.
//!
//! Ordered routes (a VirtualService's) come first: their rules are tried in order and the first
//! that matches wins; precedence applies only among the other routes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use http::HeaderMap;
use proto::api::ambient::waypoint::v1::{self as pb, path_match, value_match};
use rand::Rng;
use regex::Regex;

/// What routing looks at.
#[derive(Debug)]
pub struct RouteInput<'a> {
    /// Canonical method.
    pub method: &'a str,
    /// Canonical path (no query).
    pub path: &'a str,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The service port the request was sent to.
    pub port: u16,
}

/// Compiled regular expressions, shared by every request (patterns come from the control plane;
/// one that does not compile never matches).
#[derive(Debug, Default)]
pub struct Regexes(RwLock<HashMap<String, Option<Arc<Regex>>>>);

impl Regexes {
    /// Whether `value` matches `pattern` as a whole.
    pub fn full_match(&self, pattern: &str, value: &str) -> bool {
        if let Some(found) = self.0.read().unwrap_or_else(|p| p.into_inner()).get(pattern) {
            return found.as_ref().is_some_and(|r| r.is_match(value));
        }
        let compiled =
            regex::RegexBuilder::new(&format!("^(?:{pattern})$")).size_limit(1 << 20).build().ok().map(Arc::new);
        let hit = compiled.as_ref().is_some_and(|r| r.is_match(value));
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.clear();
        }
        map.insert(pattern.to_owned(), compiled);
        hit
    }
}

/// The value of query parameter `name` (first occurrence, not decoded beyond `+`-less raw form).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).find(|(k, _)| *k == name).map(|(_, v)| v)
}

fn value_matches(m: &pb::ValueMatch, value: Option<&str>, regexes: &Regexes) -> bool {
    let Some(value) = value else { return false };
    match value_match::Kind::try_from(m.kind).unwrap_or(value_match::Kind::Exact) {
        value_match::Kind::Exact => value == m.value,
        value_match::Kind::Regex => regexes.full_match(&m.value, value),
    }
}

/// Whether a prefix matches on segment boundaries (`/foo` matches `/foo` and `/foo/bar`, not
/// `/foobar`).
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty() || path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// Specificity of a match that matched, compared lexicographically (greater wins).
type Rank = (u8, usize, bool, usize, usize);

fn rank_if_matches(m: &pb::RouteMatch, input: &RouteInput<'_>, regexes: &Regexes) -> Option<Rank> {
    let (kind, len) = match &m.path {
        None => (1, 1),
        Some(p) => {
            let kind = path_match::Kind::try_from(p.kind).unwrap_or(path_match::Kind::Prefix);
            let ok = match kind {
                path_match::Kind::Exact => input.path == p.value,
                path_match::Kind::Prefix => prefix_matches(&p.value, input.path),
                path_match::Kind::Regex => regexes.full_match(&p.value, input.path),
            };
            if !ok {
                return None;
            }
            match kind {
                path_match::Kind::Exact => (3, p.value.len()),
                path_match::Kind::Regex => (2, p.value.len()),
                path_match::Kind::Prefix => (1, p.value.len()),
            }
        }
    };
    if !m.method.is_empty() && m.method != input.method {
        return None;
    }
    for h in &m.headers {
        let value = input.headers.get(h.name.as_str()).and_then(|v| v.to_str().ok());
        if !value_matches(h, value, regexes) {
            return None;
        }
    }
    for q in &m.query_params {
        if !value_matches(q, query_param(input.query, &q.name), regexes) {
            return None;
        }
    }
    Some((kind, len, !m.method.is_empty(), m.headers.len(), m.query_params.len()))
}

/// The rule chosen for a request.
#[derive(Debug, Clone, Copy)]
pub struct Chosen<'a> {
    /// The route (`namespace/name`).
    pub route: &'a pb::Route,
    /// Its rule.
    pub rule: &'a pb::RouteRule,
}

/// Whether any of the service's routes applies to `port`.
pub fn serves_port(routes: &pb::ServiceRoutes, port: u16) -> bool {
    routes.routes.iter().any(|r| r.ports.is_empty() || r.ports.contains(&u32::from(port)))
}

/// The rule for `input` among `routes`, if any matches.
pub fn select<'a>(routes: &'a pb::ServiceRoutes, input: &RouteInput<'_>, regexes: &Regexes) -> Option<Chosen<'a>> {
    select_among(&routes.routes.iter(), input, regexes)
}

/// The rule for `input` among `routes` (a service's, or those bound to a gateway's host): the
/// first match of the ordered routes (VirtualServices), else the most specific match of the others
/// (HTTPRoutes).
pub fn select_among<'a, I>(routes: &I, input: &RouteInput<'_>, regexes: &Regexes) -> Option<Chosen<'a>>
where
    I: Iterator<Item = &'a pb::Route> + Clone,
{
    let applicable = || routes.clone().filter(|r| r.ports.is_empty() || r.ports.contains(&u32::from(input.port)));
    for route in applicable().filter(|r| r.ordered) {
        for rule in &route.rules {
            if rule.matches.is_empty() || rule.matches.iter().any(|m| rank_if_matches(m, input, regexes).is_some()) {
                return Some(Chosen { route, rule });
            }
        }
    }
    let mut best: Option<(Rank, Chosen<'a>)> = None;
    for route in applicable().filter(|r| !r.ordered) {
        for rule in &route.rules {
            let rank = if rule.matches.is_empty() {
                Some((1, 1, false, 0, 0))
            } else {
                rule.matches.iter().filter_map(|m| rank_if_matches(m, input, regexes)).max()
            };
            if let Some(rank) = rank
                && best.as_ref().is_none_or(|(b, _)| rank > *b)
            {
                best = Some((rank, Chosen { route, rule }));
            }
        }
    }
    best.map(|(_, c)| c)
}

/// A backend by weight (weight 0 never chosen; `None` when every weight is 0 or there are none).
pub fn pick_backend<'a>(backends: &'a [pb::Backend], rng: &mut impl Rng) -> Option<&'a pb::Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = rng.random_range(0..total);
    for b in backends {
        let w = u64::from(b.weight);
        if point < w {
            return Some(b);
        }
        point -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn path(kind: path_match::Kind, value: &str) -> Option<pb::PathMatch> {
        Some(pb::PathMatch { kind: kind as i32, value: value.into() })
    }

    fn rule(name: &str, matches: Vec<pb::RouteMatch>) -> pb::RouteRule {
        pb::RouteRule { name: name.into(), matches, ..Default::default() }
    }

    fn routes(rules: Vec<pb::RouteRule>) -> pb::ServiceRoutes {
        pb::ServiceRoutes {
            namespace: "demo".into(),
            hostname: "hello.demo.svc.cluster.local".into(),
            routes: vec![pb::Route { name: "demo/hello".into(), ports: vec![], rules, ordered: false }],
        }
    }

    fn chosen(r: &pb::ServiceRoutes, method: &str, p: &str, headers: &[(&str, &str)], query: Option<&str>) -> String {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let input = RouteInput { method, path: p, query, headers: &map, port: 80 };
        select(r, &input, &Regexes::default()).map(|c| c.rule.name.clone()).unwrap_or_default()
    }

    #[test]
    fn the_most_specific_match_wins() {
        let header = |v: &str| pb::ValueMatch { kind: 0, name: "version".into(), value: v.into() };
        let r = routes(vec![
            rule("catch-all", vec![]),
            rule(
                "prefix-api",
                vec![pb::RouteMatch { path: path(path_match::Kind::Prefix, "/api"), ..Default::default() }],
            ),
            rule(
                "exact",
                vec![pb::RouteMatch { path: path(path_match::Kind::Exact, "/api/v1"), ..Default::default() }],
            ),
            rule("header-new", vec![pb::RouteMatch { headers: vec![header("new")], ..Default::default() }]),
            rule(
                "regex",
                vec![pb::RouteMatch { path: path(path_match::Kind::Regex, "/api/[0-9]+"), ..Default::default() }],
            ),
            rule(
                "post-api",
                vec![pb::RouteMatch {
                    path: path(path_match::Kind::Prefix, "/api"),
                    method: "POST".into(),
                    ..Default::default()
                }],
            ),
        ]);
        assert_eq!(chosen(&r, "GET", "/", &[], None), "catch-all");
        assert_eq!(chosen(&r, "GET", "/api/x", &[], None), "prefix-api");
        assert_eq!(chosen(&r, "GET", "/apix", &[], None), "catch-all", "prefixes match whole segments");
        assert_eq!(chosen(&r, "GET", "/api/v1", &[], None), "exact");
        assert_eq!(chosen(&r, "GET", "/api/42", &[], None), "regex");
        assert_eq!(chosen(&r, "POST", "/api/x", &[], None), "post-api");
        assert_eq!(chosen(&r, "GET", "/other", &[("version", "new")], None), "header-new");
        assert_eq!(chosen(&r, "GET", "/other", &[("version", "old")], None), "catch-all");
    }

    #[test]
    fn query_matches_and_ports() {
        let mut r = routes(vec![rule(
            "q",
            vec![pb::RouteMatch {
                query_params: vec![pb::ValueMatch { kind: 1, name: "id".into(), value: "[0-9]+".into() }],
                ..Default::default()
            }],
        )]);
        assert_eq!(chosen(&r, "GET", "/", &[], Some("a=1&id=77")), "q");
        assert_eq!(chosen(&r, "GET", "/", &[], Some("id=x7")), "");
        assert_eq!(chosen(&r, "GET", "/", &[], None), "");
        r.routes[0].ports = vec![8080];
        assert_eq!(chosen(&r, "GET", "/", &[], Some("id=1")), "", "route bound to another port");
    }

    #[test]
    fn weights_split_in_proportion() {
        use rand::SeedableRng;
        let backends = vec![
            pb::Backend { service: "a".into(), port: 80, weight: 70, ..Default::default() },
            pb::Backend { service: "b".into(), port: 80, weight: 30, ..Default::default() },
            pb::Backend { service: "never".into(), port: 80, weight: 0, ..Default::default() },
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut a = 0;
        for _ in 0..10_000 {
            match pick_backend(&backends, &mut rng).unwrap().service.as_str() {
                "a" => a += 1,
                "b" => {}
                other => panic!("picked {other}"),
            }
        }
        assert!((6_700..7_300).contains(&a), "a chosen {a} times of 10000");
        assert!(pick_backend(&backends[2..], &mut rng).is_none());
    }
}

//! SPIFFE identities of mesh workloads.
//!
//! The mesh names every workload `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. The
//! parser is deliberately strict: this string is what authorization decisions are made on, so two
//! spellings of the same identity must never both be accepted. Anything that is not exactly that
//! shape, with a valid SPIFFE trust domain and Kubernetes names, is rejected with the reason.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The default trust domain of a mesh.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";
/// SPIFFE caps a SPIFFE ID at 2048 bytes.
const MAX_ID_LEN: usize = 2048;
/// SPIFFE caps a trust domain at 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Kubernetes namespaces are DNS-1123 labels.
const MAX_NAMESPACE_LEN: usize = 63;
/// Kubernetes service accounts are DNS-1123 subdomains.
const MAX_SERVICE_ACCOUNT_LEN: usize = 253;

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Cloning is cheap (one reference count), so identities can be used freely as map keys.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole URI; the parts are slices of it.
    uri: Arc<str>,
    // Offsets into `uri` (at most `MAX_ID_LEN`): 16-bit, so an identity is 24 bytes. Every live
    // connection's record holds one or two.
    td_end: u16,
    ns: (u16, u16),
    sa_start: u16,
}

const _: () = assert!(MAX_ID_LEN <= u16::MAX as usize, "SpiffeId's offsets are 16-bit");

/// Why a string is not a mesh SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input does not start with `spiffe://`.
    #[error("{input:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    Scheme {
        /// The rejected input (truncated).
        input: String,
    },
    /// The input is longer than SPIFFE allows.
    #[error("SPIFFE ID is {len} bytes long, the limit is {MAX_ID_LEN}")]
    TooLong {
        /// Length of the input.
        len: usize,
    },
    /// The trust domain is empty or has characters SPIFFE forbids.
    #[error("invalid trust domain {trust_domain:?}: {reason}")]
    TrustDomain {
        /// The rejected trust domain (truncated).
        trust_domain: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("invalid path {path:?}: a mesh identity has the path /ns/<namespace>/sa/<service-account>")]
    Path {
        /// The rejected path (truncated).
        path: String,
    },
    /// The namespace is not a valid Kubernetes namespace name.
    #[error("invalid namespace {namespace:?}: {reason}")]
    Namespace {
        /// The rejected namespace (truncated).
        namespace: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The service account is not a valid Kubernetes name.
    #[error("invalid service account {service_account:?}: {reason}")]
    ServiceAccount {
        /// The rejected service account (truncated).
        service_account: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Error messages quote the input; keep them bounded when the input is hostile.
fn excerpt(s: &str) -> String {
    const MAX: usize = 96;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, SpiffeIdError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..usize::from(self.td_end)]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[usize::from(self.ns.0)..usize::from(self.ns.1)]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.sa_start)..]
    }

    /// The full URI, as it appears in a certificate's URI SAN.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    fn parse_str(input: &str) -> Result<Self, SpiffeIdError> {
        if input.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: input.len() });
        }
        let rest = input.strip_prefix(SCHEME).ok_or_else(|| SpiffeIdError::Scheme { input: excerpt(input) })?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;

        let bad_path = || SpiffeIdError::Path { path: excerpt(path) };
        let mut segments = path.strip_prefix('/').ok_or_else(bad_path)?.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) =
            (segments.next(), segments.next(), segments.next(), segments.next(), segments.next())
        else {
            return Err(bad_path());
        };
        validate_namespace(ns)?;
        validate_service_account(sa)?;

        // Each offset is within `input`, which is at most MAX_ID_LEN (checked above) and so fits.
        let offset = |i: usize| i as u16;
        let td_end = SCHEME.len() + td.len();
        let ns_start = td_end + "/ns/".len();
        let ns_end = ns_start + ns.len();
        Ok(SpiffeId {
            uri: Arc::from(input),
            td_end: offset(td_end),
            ns: (offset(ns_start), offset(ns_end)),
            sa_start: offset(ns_end + "/sa/".len()),
        })
    }
}

/// SPIFFE: lowercase letters, digits, `.`, `-` and `_`; no port, no userinfo.
fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let err = |reason| SpiffeIdError::TrustDomain { trust_domain: excerpt(td), reason };
    if td.is_empty() {
        return Err(err("it is empty"));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(err("it is longer than 255 bytes"));
    }
    if !td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')) {
        return Err(err("only lowercase letters, digits, '.', '-' and '_' are allowed"));
    }
    Ok(())
}

/// A DNS-1123 label: lowercase alphanumerics and `-`, starting and ending alphanumeric.
fn dns1123_label(s: &str, max: usize) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.len() > max {
        return Err("it is too long");
    }
    if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err("only lowercase letters, digits and '-' are allowed");
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

fn validate_namespace(ns: &str) -> Result<(), SpiffeIdError> {
    dns1123_label(ns, MAX_NAMESPACE_LEN).map_err(|reason| SpiffeIdError::Namespace { namespace: excerpt(ns), reason })
}

/// Service accounts are DNS-1123 subdomains: dot-separated labels.
fn validate_service_account(sa: &str) -> Result<(), SpiffeIdError> {
    let err = |reason| SpiffeIdError::ServiceAccount { service_account: excerpt(sa), reason };
    if sa.len() > MAX_SERVICE_ACCOUNT_LEN {
        return Err(err("it is longer than 253 bytes"));
    }
    if sa.is_empty() {
        return Err(err("it is empty"));
    }
    sa.split('.').try_for_each(|label| dns1123_label(label, 63)).map_err(err)
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_str(s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse_str(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.uri)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_a_mesh_identity() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(SpiffeId::new("cluster.local", "default", "sleep").unwrap(), id);
    }

    #[test]
    fn accepts_dotted_service_accounts_and_underscored_trust_domains() {
        let id: SpiffeId = "spiffe://my_td.example-1/ns/a-1/sa/sa.with.dots".parse().unwrap();
        assert_eq!(id.trust_domain(), "my_td.example-1");
        assert_eq!(id.namespace(), "a-1");
        assert_eq!(id.service_account(), "sa.with.dots");
    }

    #[test]
    fn rejects_malformed_ids_with_the_reason() {
        type Check = fn(&SpiffeIdError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, SpiffeIdError::Scheme { .. })),
            ("http://cluster.local/ns/a/sa/b", |e| matches!(e, SpiffeIdError::Scheme { .. })),
            ("SPIFFE://cluster.local/ns/a/sa/b", |e| matches!(e, SpiffeIdError::Scheme { .. })),
            ("spiffe://", |e| matches!(e, SpiffeIdError::TrustDomain { .. })),
            ("spiffe:///ns/a/sa/b", |e| matches!(e, SpiffeIdError::TrustDomain { .. })),
            ("spiffe://Cluster.local/ns/a/sa/b", |e| matches!(e, SpiffeIdError::TrustDomain { .. })),
            ("spiffe://td:8080/ns/a/sa/b", |e| matches!(e, SpiffeIdError::TrustDomain { .. })),
            ("spiffe://user@td/ns/a/sa/b", |e| matches!(e, SpiffeIdError::TrustDomain { .. })),
            ("spiffe://td", |e| matches!(e, SpiffeIdError::Path { .. })),
            ("spiffe://td/", |e| matches!(e, SpiffeIdError::Path { .. })),
            ("spiffe://td/ns/a", |e| matches!(e, SpiffeIdError::Path { .. })),
            ("spiffe://td/ns/a/sa", |e| matches!(e, SpiffeIdError::Path { .. })),
            ("spiffe://td/ns/a/sa/b/", |e| matches!(e, SpiffeIdError::Path { .. })),
            ("spiffe://td/ns/a/sa/b/extra", |e| matches!(e, SpiffeIdError::Path { .. })),
            ("spiffe://td/sa/b/ns/a", |e| matches!(e, SpiffeIdError::Path { .. })),
            ("spiffe://td//ns/a/sa/b", |e| matches!(e, SpiffeIdError::Path { .. })),
            ("spiffe://td/ns//sa/b", |e| matches!(e, SpiffeIdError::Namespace { .. })),
            ("spiffe://td/ns/A/sa/b", |e| matches!(e, SpiffeIdError::Namespace { .. })),
            ("spiffe://td/ns/-a/sa/b", |e| matches!(e, SpiffeIdError::Namespace { .. })),
            ("spiffe://td/ns/a%2F/sa/b", |e| matches!(e, SpiffeIdError::Namespace { .. })),
            ("spiffe://td/ns/a.b/sa/c", |e| matches!(e, SpiffeIdError::Namespace { .. })),
            ("spiffe://td/ns/a/sa/", |e| matches!(e, SpiffeIdError::ServiceAccount { .. })),
            ("spiffe://td/ns/a/sa/b?x=1", |e| matches!(e, SpiffeIdError::ServiceAccount { .. })),
            ("spiffe://td/ns/a/sa/b#frag", |e| matches!(e, SpiffeIdError::ServiceAccount { .. })),
            ("spiffe://td/ns/a/sa/..", |e| matches!(e, SpiffeIdError::ServiceAccount { .. })),
            ("spiffe://td/ns/a/sa/b..c", |e| matches!(e, SpiffeIdError::ServiceAccount { .. })),
            ("spiffe://td/ns/a/sa/b\u{e9}", |e| matches!(e, SpiffeIdError::ServiceAccount { .. })),
        ];
        for (input, expected) in cases {
            let err = input.parse::<SpiffeId>().expect_err(input);
            assert!(expected(&err), "{input:?} gave the wrong error: {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn enforces_length_limits() {
        let long_ns = "a".repeat(64);
        assert!(matches!(
            SpiffeId::new("td", &long_ns, "b"),
            Err(SpiffeIdError::Namespace { reason: "it is too long", .. })
        ));
        assert!(SpiffeId::new("td", &"a".repeat(63), "b").is_ok());
        let huge = format!("spiffe://td/ns/a/sa/{}", "b".repeat(4000));
        assert_eq!(huge.parse::<SpiffeId>(), Err(SpiffeIdError::TooLong { len: huge.len() }));
    }

    #[test]
    fn the_longest_valid_identity_keeps_its_parts_in_24_bytes() {
        let (td, ns) = (format!("{}.local", "t".repeat(249)), "n".repeat(63));
        let sa = ["s".repeat(63), "s".repeat(63), "s".repeat(63), "s".repeat(61)].join(".");
        assert_eq!((td.len(), sa.len()), (MAX_TRUST_DOMAIN_LEN, MAX_SERVICE_ACCOUNT_LEN));
        let id = SpiffeId::new(&td, &ns, &sa).unwrap();
        assert_eq!((id.trust_domain(), id.namespace(), id.service_account()), (td.as_str(), ns.as_str(), sa.as_str()));
        assert_eq!(std::mem::size_of::<SpiffeId>(), 24);
    }

    #[test]
    fn error_messages_truncate_hostile_input() {
        let input = format!("http://{}", "x".repeat(1000));
        let msg = input.parse::<SpiffeId>().unwrap_err().to_string();
        assert!(msg.len() < 200, "message too long: {}", msg.len());
    }

    /// Seeded (a failure reproduces): identities built from plausible and hostile pieces, some
    /// bytes then mutated. Whatever parses is exactly its input and is rebuilt from its parts; the
    /// generator must produce plenty of both outcomes, or it tests nothing.
    #[test]
    fn whatever_parses_is_its_input_and_its_parts() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x1d_5eed);
        let usual = ["cluster.local", "td", "a", "a-b", "ns", "sa", "0", "default"];
        let hostile =
            ["", "x_y", "A", "-a", "a.", "..", "\u{e9}", "%41", "a/b", "spiffe:", "a b", "?", "#", "@", ":80"];
        let alphabet = b"spife:/nsa.-_Az0%?#@ ";
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..50_000 {
            let mut pick = || match rng.random_bool(0.9) {
                true => usual[rng.random_range(0..usual.len())],
                false => hostile[rng.random_range(0..hostile.len())],
            };
            let (td, ns, sa) = (pick(), pick(), pick());
            let mut bytes = format!("spiffe://{td}/ns/{ns}/sa/{sa}").into_bytes();
            let mutations = if rng.random_bool(0.5) { 0 } else { rng.random_range(1..3) };
            for _ in 0..mutations {
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = alphabet[rng.random_range(0..alphabet.len())],
                    1 => bytes.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                    _ => drop(bytes.remove(at)),
                }
            }
            let input = String::from_utf8_lossy(&bytes);
            match input.parse::<SpiffeId>() {
                Ok(id) => {
                    accepted += 1;
                    assert_eq!(id.as_str(), input, "parsed into something else");
                    for part in [id.trust_domain(), id.namespace(), id.service_account()] {
                        assert!(!part.is_empty() && !part.contains('/'), "{input}: part {part:?}");
                    }
                    let rebuilt = SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account());
                    assert_eq!(rebuilt.as_ref(), Ok(&id), "{input}");
                }
                Err(_) => refused += 1,
            }
        }
        assert!(accepted > 5_000 && refused > 5_000, "{accepted} accepted, {refused} refused: a lopsided generator");
    }
}

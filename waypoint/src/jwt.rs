//! Request authentication: the JWT a request carries, checked against the RequestAuthentication
//! rules that apply to its destination (Istio's semantics).
//!
//! - A request without a token is anonymous: it passes here, and AuthorizationPolicy decides
//!   (`requestPrincipals: ["*"]` requires a valid token).
//! - A token is looked for where each rule says (`fromHeaders` with their prefix, `fromParams`,
//!   `fromCookies`; by default `Authorization: Bearer <token>` and `access_token`). A token that is
//!   found must be valid for a rule with its issuer that looks in that place, or the request is
//!   refused (401). Two different tokens in one request are refused: which one is the caller?
//! - Valid means: an asymmetric signature (RS, PS, ES, EdDSA; never HMAC or `none`) by a key of the
//!   rule's JWKS (by `kid` when the token names one), `iss` equal to the rule's issuer, `aud`
//!   among the rule's audiences when it lists any, `exp` and `nbf` (when present) within 60 s of
//!   the clock. A rule the control plane marked unusable refuses every token it would check.
//! - The request principal is `<iss>/<sub>`; claims, audiences and `azp` (presenter) are kept for
//!   `request.auth.*` conditions.
//! - Headers the rules write (`outputPayloadToHeader`, `outputClaimToHeaders`) are removed from
//!   every incoming request first, so a client cannot forge them; a verified token's header is
//!   removed unless `forwardOriginalToken` (tokens in parameters and cookies are left in place).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use proto::api::ambient::waypoint::v1 as pb;
use serde_json::Value;

/// Clock skew allowed on `exp` and `nbf`, seconds (Envoy's default).
const CLOCK_SKEW_S: u64 = 60;

const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The verified caller of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestPrincipal {
    /// `<iss>/<sub>`.
    pub principal: String,
    /// `aud`, as a list.
    pub audiences: Vec<String>,
    /// `azp`, if present.
    pub presenter: Option<String>,
    /// All claims.
    pub claims: serde_json::Map<String, Value>,
}

impl RequestPrincipal {
    /// The values of a claim at `path` (nested names): a string, or each string of a list; numbers
    /// and booleans in their JSON form. `None` when absent.
    pub fn claim(&self, path: &[&str]) -> Option<Vec<String>> {
        let (first, rest) = path.split_first()?;
        let mut value = self.claims.get(*first)?;
        for name in rest {
            value = value.as_object()?.get(*name)?;
        }
        Some(match value {
            Value::Array(items) => items.iter().filter_map(scalar).collect(),
            other => scalar(other).into_iter().collect(),
        })
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        _ => None,
    }
}

/// What authentication concluded.
#[derive(Debug)]
pub enum Authn {
    /// No token anywhere a rule looks.
    Anonymous,
    /// A valid token.
    Verified(RequestPrincipal),
    /// A token that is not valid here, with why (for the log; the client only learns 401).
    Refused(Refusal),
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// More than one token in one request.
    #[error("{0} different tokens in one request")]
    SeveralTokens(usize),
    /// Not a JWT.
    #[error("the token cannot be read")]
    Unreadable(#[source] jsonwebtoken::errors::Error),
    /// No `iss` claim.
    #[error("the token has no issuer (iss)")]
    NoIssuer,
    /// The rule for the token's issuer could not be set up by the control plane (its message).
    #[error("the rule for this token cannot be used: {0}")]
    BrokenRule(String),
    /// No rule where the token was found accepts its issuer.
    #[error("issuer {0:?} is not accepted where the token was sent")]
    IssuerNotAccepted(String),
    /// The token's header is not readable.
    #[error("the token header cannot be read")]
    Header(#[source] jsonwebtoken::errors::Error),
    /// A symmetric (or unknown) algorithm.
    #[error("algorithm {0:?} is not accepted (only asymmetric signatures are)")]
    Algorithm(Algorithm),
    /// The issuer's keys are unusable.
    #[error("issuer {issuer}")]
    Keys {
        /// The issuer.
        issuer: String,
        /// What is wrong with its keys.
        source: KeysError,
    },
    /// No key with the token's `kid`.
    #[error("no key {kid:?} in the JWKS of issuer {issuer}")]
    NoKey {
        /// The token's key id.
        kid: Option<String>,
        /// The issuer.
        issuer: String,
    },
    /// No key for the token's algorithm.
    #[error("no {alg:?} key in the JWKS of issuer {issuer}")]
    NoKeyFor {
        /// The token's algorithm.
        alg: Algorithm,
        /// The issuer.
        issuer: String,
    },
    /// The signature or a claim does not check out (expired, wrong audience, ...).
    #[error("the token does not verify")]
    Invalid(#[source] jsonwebtoken::errors::Error),
}

/// Why a JWKS document gives no keys.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// Not JSON of a JWKS.
    #[error("the keys are not a JWKS document")]
    NotJwks(#[source] serde_json::Error),
    /// Only symmetric or unreadable keys.
    #[error("the JWKS holds no usable public key")]
    NoPublicKey,
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    Header(HeaderName),
    Param(String),
    Cookie(String),
}

/// The decoding keys of JWKS documents, parsed once per document.
#[derive(Debug, Default)]
pub struct KeyCache {
    parsed: Mutex<HashMap<Arc<str>, Arc<Keys>>>,
}

/// Most keys a token without `kid` is checked against.
const MAX_KEYS_TRIED: usize = 4;

/// Most JWKS documents kept parsed (one per rule is typical).
const MAX_CACHED: usize = 256;

#[derive(Debug)]
struct Keys {
    keys: Vec<(Option<String>, DecodingKey)>,
}

impl KeyCache {
    fn keys(&self, jwks: &str) -> Result<Arc<Keys>, KeysError> {
        let mut parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = parsed.get(jwks) {
            return Ok(k.clone());
        }
        let set: JwkSet = serde_json::from_str(jwks).map_err(KeysError::NotJwks)?;
        let keys: Vec<_> = set
            .keys
            .iter()
            .filter(|k| !matches!(k.algorithm, AlgorithmParameters::OctetKey(_)))
            .filter_map(|k| Some((k.common.key_id.clone(), DecodingKey::from_jwk(k).ok()?)))
            .collect();
        if keys.is_empty() {
            return Err(KeysError::NoPublicKey);
        }
        if parsed.len() >= MAX_CACHED {
            parsed.clear();
        }
        let keys = Arc::new(Keys { keys });
        parsed.insert(Arc::from(jwks), keys.clone());
        Ok(keys)
    }
}

/// The places a rule looks for its token.
fn places(rule: &pb::JwtRule) -> Vec<(Place, &str)> {
    if rule.from_headers.is_empty() && rule.from_params.is_empty() && rule.from_cookies.is_empty() {
        return vec![(Place::Header(header::AUTHORIZATION), "Bearer "), (Place::Param("access_token".into()), "")];
    }
    let headers = rule
        .from_headers
        .iter()
        .filter_map(|h| Some((Place::Header(HeaderName::from_bytes(h.name.as_bytes()).ok()?), h.prefix.as_str())));
    let params = rule.from_params.iter().map(|p| (Place::Param(p.clone()), ""));
    let cookies = rule.from_cookies.iter().map(|c| (Place::Cookie(c.clone()), ""));
    headers.chain(params).chain(cookies).collect()
}

/// The tokens at `place` (a header may be sent more than once).
fn tokens_at(place: &Place, prefix: &str, headers: &HeaderMap, query: Option<&str>) -> Vec<String> {
    match place {
        Place::Header(name) => headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| {
                let head = v.get(..prefix.len())?;
                head.eq_ignore_ascii_case(prefix).then(|| v[prefix.len()..].trim().to_owned())
            })
            .filter(|t| !t.is_empty())
            .collect(),
        Place::Param(name) => query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|pair| pair.split_once('=').filter(|(k, _)| k == name).map(|(_, v)| v))
            .map(|v| percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned())
            .filter(|t| !t.is_empty())
            .collect(),
        Place::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('=').filter(|(k, _)| k == name).map(|(_, v)| v.trim().to_owned()))
            .filter(|t| !t.is_empty())
            .collect(),
    }
}

/// Authenticates a request against `rules` (all the rules that apply to its destination),
/// rewriting its headers as they say. `query` is the request's query string.
pub fn authenticate(rules: &[&pb::JwtRule], headers: &mut HeaderMap, query: Option<&str>, cache: &KeyCache) -> Authn {
    // Headers the waypoint writes are never taken from the client.
    for rule in rules {
        let outputs = std::iter::once(rule.output_payload_to_header.as_str())
            .chain(rule.output_claim_to_headers.iter().map(|c| c.header.as_str()));
        for name in outputs.filter(|n| !n.is_empty()) {
            headers.remove(name);
        }
    }
    // Every token, with the rules that found it and where.
    let mut found: Vec<(String, Vec<(usize, Place)>)> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        for (place, prefix) in places(rule) {
            for token in tokens_at(&place, prefix, headers, query) {
                match found.iter_mut().find(|(t, _)| *t == token) {
                    Some((_, by)) => by.push((i, place.clone())),
                    None => found.push((token, vec![(i, place.clone())])),
                }
            }
        }
    }
    let (token, by) = match found.len() {
        0 => return Authn::Anonymous,
        1 => found.remove(0),
        n => return Authn::Refused(Refusal::SeveralTokens(n)),
    };
    let issuer = match jsonwebtoken::dangerous::insecure_decode_claims::<Value>(&token) {
        Ok(claims) => claims.get("iss").and_then(Value::as_str).map(str::to_owned),
        Err(e) => return Authn::Refused(Refusal::Unreadable(e)),
    };
    let Some(issuer) = issuer else { return Authn::Refused(Refusal::NoIssuer) };
    // A rule that cannot be used refuses what it would check, whatever another rule says.
    if let Some(broken) =
        by.iter().map(|(i, _)| rules[*i]).find(|r| !r.error.is_empty() && (r.issuer.is_empty() || r.issuer == issuer))
    {
        return Authn::Refused(Refusal::BrokenRule(broken.error.clone()));
    }
    let mut why = None;
    for (i, place) in &by {
        let rule = rules[*i];
        if rule.issuer != issuer {
            continue;
        }
        match verify(rule, &token, cache) {
            Ok(principal) => {
                apply_outputs(rule, &token, &principal, place, headers);
                return Authn::Verified(principal);
            }
            Err(e) => why = Some(e),
        }
    }
    Authn::Refused(why.unwrap_or(Refusal::IssuerNotAccepted(issuer)))
}

fn verify(rule: &pb::JwtRule, token: &str, cache: &KeyCache) -> Result<RequestPrincipal, Refusal> {
    let header = jsonwebtoken::decode_header(token).map_err(Refusal::Header)?;
    if !ASYMMETRIC.contains(&header.alg) {
        return Err(Refusal::Algorithm(header.alg));
    }
    let keys = cache.keys(&rule.jwks).map_err(|source| Refusal::Keys { issuer: rule.issuer.clone(), source })?;
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[&rule.issuer]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
    }
    validation.required_spec_claims.clear();
    // The issuer check passes a token whose `iss` is absent or not a string unless it is required.
    validation.required_spec_claims.insert("iss".into());
    if !rule.audiences.is_empty() {
        // A token without `aud` would otherwise pass the audience check.
        validation.required_spec_claims.insert("aud".into());
    }
    validation.validate_nbf = true;
    validation.leeway = CLOCK_SKEW_S;
    // A token without `kid` is tried against the keys of its algorithm's family, at most
    // MAX_KEYS_TRIED of them: a JWKS with many keys cannot make one request cost many signature
    // checks.
    let candidates: Vec<&DecodingKey> = match &header.kid {
        Some(kid) => keys
            .keys
            .iter()
            .filter(|(k, _)| k.as_deref() == Some(kid))
            .map(|(_, key)| key)
            .take(MAX_KEYS_TRIED)
            .collect(),
        None => keys
            .keys
            .iter()
            .map(|(_, key)| key)
            .filter(|key| key.family() == header.alg.family())
            .take(MAX_KEYS_TRIED)
            .collect(),
    };
    let mut last = Refusal::NoKey { kid: header.kid.clone(), issuer: rule.issuer.clone() };
    for key in candidates {
        if key.family() != header.alg.family() {
            last = Refusal::NoKeyFor { alg: header.alg, issuer: rule.issuer.clone() };
            continue;
        }
        match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &validation) {
            Ok(data) => return Ok(principal(data.claims)),
            Err(e) => last = Refusal::Invalid(e),
        }
    }
    Err(last)
}

fn principal(claims: serde_json::Map<String, Value>) -> RequestPrincipal {
    let text = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
    let audiences = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list.iter().filter_map(|a| a.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    RequestPrincipal {
        principal: format!("{}/{}", text("iss").unwrap_or_default(), text("sub").unwrap_or_default()),
        audiences,
        presenter: text("azp"),
        claims,
    }
}

fn apply_outputs(rule: &pb::JwtRule, token: &str, p: &RequestPrincipal, place: &Place, headers: &mut HeaderMap) {
    if !rule.forward_original_token
        && let Place::Header(name) = place
    {
        headers.remove(name);
    }
    let mut set = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.insert(n, v);
        }
    };
    if !rule.output_payload_to_header.is_empty()
        && let Some(payload) = token.split('.').nth(1)
    {
        set(&rule.output_payload_to_header, payload);
    }
    for c in &rule.output_claim_to_headers {
        let path: Vec<&str> = c.claim.split('.').collect();
        if let Some(values) = p.claim(&path).filter(|v| !v.is_empty()) {
            set(&c.header, &values.join(","));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    struct Issuer {
        key: EncodingKey,
        jwks: String,
        alg: Algorithm,
        kid: &'static str,
    }

    fn issuer(kid: &'static str) -> Issuer {
        let der = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_der();
        let key = EncodingKey::from_ec_der(&der);
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.into());
        let jwks = serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap();
        Issuer { key, jwks, alg: Algorithm::ES256, kid }
    }

    impl Issuer {
        #[allow(clippy::needless_pass_by_value, reason = "callers build the claims in place")]
        fn token(&self, claims: Value) -> String {
            let mut h = Header::new(self.alg);
            h.kid = Some(self.kid.into());
            encode(&h, &claims, &self.key).unwrap()
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn rule(iss: &str, jwks: &str) -> pb::JwtRule {
        pb::JwtRule { issuer: iss.into(), jwks: jwks.into(), ..Default::default() }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        h
    }

    fn run(rules: &[pb::JwtRule], headers: &mut HeaderMap, query: Option<&str>) -> Authn {
        let refs: Vec<&pb::JwtRule> = rules.iter().collect();
        authenticate(&refs, headers, query, &KeyCache::default())
    }

    #[test]
    fn a_valid_token_names_the_principal_and_is_removed() {
        let i = issuer("k1");
        let token = i.token(serde_json::json!({"iss": "https://idp", "sub": "alice", "aud": ["shop", "x"],
            "azp": "web", "exp": now() + 300, "groups": ["admin", "dev"], "org": {"team": "core"}}));
        let mut r = rule("https://idp", &i.jwks);
        r.audiences = vec!["shop".into()];
        r.output_payload_to_header = "x-jwt".into();
        r.output_claim_to_headers = vec![pb::ClaimToHeader { header: "x-team".into(), claim: "org.team".into() }];
        let mut headers = bearer(&token);
        let Authn::Verified(p) = run(&[r], &mut headers, None) else { panic!("not verified") };
        assert_eq!(p.principal, "https://idp/alice");
        assert_eq!(p.audiences, ["shop", "x"]);
        assert_eq!(p.presenter.as_deref(), Some("web"));
        assert_eq!(p.claim(&["groups"]), Some(vec!["admin".to_owned(), "dev".to_owned()]));
        assert_eq!(p.claim(&["org", "team"]), Some(vec!["core".to_owned()]));
        assert!(headers.get(header::AUTHORIZATION).is_none(), "the token was forwarded");
        assert_eq!(headers["x-jwt"], token.split('.').nth(1).unwrap());
        assert_eq!(headers["x-team"], "core");
    }

    #[test]
    fn missing_is_anonymous_and_forged_outputs_are_removed() {
        let i = issuer("k1");
        let mut r = rule("https://idp", &i.jwks);
        r.output_payload_to_header = "x-jwt".into();
        let mut headers = HeaderMap::new();
        headers.insert("x-jwt", HeaderValue::from_static("eyJzdWIiOiJhZG1pbiJ9"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwdw=="));
        assert!(matches!(run(&[r], &mut headers, None), Authn::Anonymous));
        assert!(headers.get("x-jwt").is_none());
        assert!(headers.get(header::AUTHORIZATION).is_some(), "a header that holds no token is left alone");
    }

    #[test]
    fn invalid_tokens_are_refused() {
        let i = issuer("k1");
        let other = issuer("k1");
        let r = || rule("https://idp", &i.jwks);
        let claims = |extra: Value| {
            let mut c = serde_json::json!({"iss": "https://idp", "sub": "a", "exp": now() + 300});
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            c
        };
        let cases: Vec<(&str, String, pb::JwtRule)> = vec![
            ("expired", i.token(claims(serde_json::json!({"exp": now() - 120}))), r()),
            ("not yet valid", i.token(claims(serde_json::json!({"nbf": now() + 600}))), r()),
            ("other key", other.token(claims(serde_json::json!({}))), r()),
            ("wrong issuer", i.token(claims(serde_json::json!({"iss": "https://evil"}))), r()),
            ("wrong audience", i.token(claims(serde_json::json!({"aud": "other"}))), {
                let mut x = r();
                x.audiences = vec!["shop".into()];
                x
            }),
            ("no audience", i.token(claims(serde_json::json!({}))), {
                let mut x = r();
                x.audiences = vec!["shop".into()];
                x
            }),
            ("rule marked unusable", i.token(claims(serde_json::json!({}))), {
                let mut x = r();
                x.error = "keys could not be fetched".into();
                x
            }),
            ("garbage", "not.a.jwt".into(), r()),
            (
                "unsigned",
                {
                    let t = i.token(claims(serde_json::json!({})));
                    let mut parts: Vec<&str> = t.split('.').collect();
                    parts[2] = "";
                    parts.join(".")
                },
                r(),
            ),
            (
                "HMAC",
                {
                    let h = Header::new(Algorithm::HS256);
                    encode(&h, &claims(serde_json::json!({})), &EncodingKey::from_secret(b"secret")).unwrap()
                },
                r(),
            ),
            (
                "tampered",
                {
                    let t = i.token(claims(serde_json::json!({})));
                    let evil = i.token(claims(serde_json::json!({"sub": "admin"})));
                    let mut parts: Vec<&str> = t.split('.').collect();
                    parts[1] = evil.split('.').nth(1).unwrap();
                    parts.join(".")
                },
                r(),
            ),
        ];
        for (what, token, rule) in cases {
            let mut headers = bearer(&token);
            let got = run(&[rule], &mut headers, None);
            assert!(matches!(got, Authn::Refused(_)), "{what}: {got:?}");
        }
    }

    #[test]
    fn alg_none_is_refused() {
        let i = issuer("k1");
        let payload = i.token(serde_json::json!({"iss": "https://idp", "sub": "a"}));
        let body = payload.split('.').nth(1).unwrap();
        let token = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{body}.");
        let got = run(&[rule("https://idp", &i.jwks)], &mut bearer(&token), None);
        assert!(matches!(got, Authn::Refused(_)), "{got:?}");
    }

    #[test]
    fn places_params_cookies_and_two_tokens() {
        let i = issuer("k1");
        let t1 = i.token(serde_json::json!({"iss": "https://idp", "sub": "a"}));
        let t2 = i.token(serde_json::json!({"iss": "https://idp", "sub": "b"}));
        // Default places: the access_token parameter.
        let got = run(&[rule("https://idp", &i.jwks)], &mut HeaderMap::new(), Some(&format!("x=1&access_token={t1}")));
        assert!(matches!(got, Authn::Verified(ref p) if p.principal == "https://idp/a"), "{got:?}");
        // A custom header with its prefix; the default places are then not looked at.
        let mut r = rule("https://idp", &i.jwks);
        r.from_headers = vec![pb::JwtHeader { name: "x-token".into(), prefix: "Tok ".into() }];
        let mut headers = HeaderMap::new();
        headers.insert("x-token", HeaderValue::from_str(&format!("Tok {t1}")).unwrap());
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {t2}")).unwrap());
        let got = run(std::slice::from_ref(&r), &mut headers, None);
        assert!(matches!(got, Authn::Verified(ref p) if p.principal == "https://idp/a"), "{got:?}");
        // A cookie.
        let mut r = rule("https://idp", &i.jwks);
        r.from_cookies = vec!["session".into()];
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(&format!("a=b; session={t2}")).unwrap());
        let got = run(&[r], &mut headers, None);
        assert!(matches!(got, Authn::Verified(ref p) if p.principal == "https://idp/b"), "{got:?}");
        // Two different tokens: refused, even though both are valid.
        let got = run(&[rule("https://idp", &i.jwks)], &mut bearer(&t1), Some(&format!("access_token={t2}")));
        assert!(matches!(got, Authn::Refused(Refusal::SeveralTokens(2))), "{got:?}");
        // The same token twice is one token.
        let got = run(&[rule("https://idp", &i.jwks)], &mut bearer(&t1), Some(&format!("access_token={t1}")));
        assert!(matches!(got, Authn::Verified(_)), "{got:?}");
    }

    #[test]
    fn a_token_without_kid_is_checked_against_the_keys_of_its_family() {
        let a = issuer("ka");
        let b = issuer("kb");
        let set = |i: &Issuer| serde_json::from_str::<JwkSet>(&i.jwks).unwrap().keys;
        let both = serde_json::to_string(&JwkSet { keys: [set(&a), set(&b)].concat() }).unwrap();
        let h = Header::new(Algorithm::ES256);
        let token = encode(&h, &serde_json::json!({"iss": "https://idp", "sub": "x"}), &b.key).unwrap();
        let got = run(&[rule("https://idp", &both)], &mut bearer(&token), None);
        assert!(matches!(got, Authn::Verified(ref p) if p.principal == "https://idp/x"), "{got:?}");
        // Named by a kid the JWKS does not have: refused.
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("kz".into());
        let token = encode(&h, &serde_json::json!({"iss": "https://idp", "sub": "x"}), &b.key).unwrap();
        let got = run(&[rule("https://idp", &both)], &mut bearer(&token), None);
        assert!(matches!(got, Authn::Refused(Refusal::NoKey { .. })), "{got:?}");
    }

    #[test]
    fn the_issuer_picks_the_rule() {
        let a = issuer("ka");
        let b = issuer("kb");
        let rules = [rule("https://a", &a.jwks), rule("https://b", &b.jwks)];
        let tb = b.token(serde_json::json!({"iss": "https://b", "sub": "x"}));
        let got = run(&rules, &mut bearer(&tb), None);
        assert!(matches!(got, Authn::Verified(ref p) if p.principal == "https://b/x"), "{got:?}");
        // Signed by a's key but claiming b's issuer.
        let forged = a.token(serde_json::json!({"iss": "https://b", "sub": "x"}));
        let got = run(&rules, &mut bearer(&forged), None);
        assert!(matches!(got, Authn::Refused(_)), "{got:?}");
        // An unreadable policy (rule without issuer, marked) refuses every token.
        let broken = pb::JwtRule { error: "unreadable".into(), ..Default::default() };
        let got = run(&[rules[1].clone(), broken], &mut bearer(&tb), None);
        assert!(matches!(got, Authn::Refused(_)), "{got:?}");
    }
}

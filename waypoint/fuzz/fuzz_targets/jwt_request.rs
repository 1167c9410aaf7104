//! Untrusted input of the waypoint's request authentication: the headers and query string of a
//! request that may carry a JWT. Never panics, and never verifies a token: the fuzzer holds no
//! private key of the JWKS, so any `Verified` is a forgery the checks let through.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use proto::api::ambient::waypoint::v1 as pb;
use waypoint::jwt::{authenticate, Authn, KeyCache};

/// An EC P-256 public key (RFC 7515 appendix A.3); its private half is not used anywhere here.
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"k1"}]}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (query, rest) = text.split_once('\n').unwrap_or((text, ""));
    let mut headers = HeaderMap::new();
    for line in rest.split('\n') {
        if let Some((n, v)) = line.split_once(':')
            && let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v.trim_start()))
        {
            headers.append(n, v);
        }
    }
    let default = pb::JwtRule {
        issuer: "https://idp".into(),
        jwks: JWKS.into(),
        output_payload_to_header: "x-jwt".into(),
        ..Default::default()
    };
    let custom = pb::JwtRule {
        issuer: "other".into(),
        audiences: vec!["a".into()],
        jwks: JWKS.into(),
        from_headers: vec![pb::JwtHeader { name: "x-token".into(), prefix: "T ".into() }],
        from_params: vec!["t".into()],
        from_cookies: vec!["c".into()],
        ..Default::default()
    };
    let got = authenticate(&[&default, &custom], &mut headers, Some(query), &KeyCache::default());
    assert!(!matches!(got, Authn::Verified(_)), "a token was verified without the private key: {got:?}");
    assert!(headers.get("x-jwt").is_none(), "a client-supplied output header survived");
});

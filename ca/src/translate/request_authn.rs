//! RequestAuthentication → the JWT rules waypoints enforce.
//!
//! In ambient mode JWTs are checked by waypoints, so a RequestAuthentication applies through its
//! `targetRefs` (a waypoint Gateway, or a Service whose traffic goes through one). A rule the
//! control plane cannot use as written (an unknown field, keys that do not parse, a `jwksUri` that
//! is not HTTPS) is still sent, marked with its error: the waypoint then refuses every token that
//! rule would have checked. Tokens are never let through unchecked, and the problem is reported at
//! `/debug/config_errors`.
//!
//! Keys given by `jwksUri` are fetched by the control plane ([`crate::jwks`]), which fills them
//! in before the rules are served, as istiod does.

use std::collections::{BTreeMap, BTreeSet};

use http::HeaderName;
use proto::api::ambient::waypoint::v1 as pb;

use crate::k8s::{self, JwtRule, ObjectRef};
use crate::mesh::Service;
use crate::objects::{ConfigError, Objects};

/// The waypoint rules, by `namespace/name`, with the problems found (as config errors) and the
/// policies that apply to no waypoint (as warnings).
#[derive(Debug, Default)]
pub struct Translated {
    /// The rules served to waypoints.
    pub rules: BTreeMap<String, pb::RequestAuthn>,
    /// Problems that make (part of) a policy refuse tokens.
    pub errors: Vec<ConfigError>,
    /// Policies that are not enforced anywhere.
    pub warnings: Vec<String>,
}

/// Translates every RequestAuthentication.
pub fn translate(objects: &Objects, services: &BTreeMap<String, Service>, root_namespace: &str) -> Translated {
    let mut out = Translated::default();
    for ra in objects.request_authentications() {
        let (ns, name) = k8s::ns_name(&ra.metadata);
        let source = format!("RequestAuthentication {ns}/{name}");
        let spec = &ra.spec;
        let refs: Vec<&ObjectRef> = spec.target_ref.iter().chain(&spec.target_refs).collect();
        let (targets, unsupported) = super::waypoint::policy_targets(&refs, ns, services, root_namespace);
        out.errors.extend(unsupported.into_iter().map(|message| ConfigError { source: source.clone(), message }));
        if targets.is_empty() {
            out.warnings.push(format!(
                "{source}: has no targetRefs to a Gateway (waypoint) or Service, so no waypoint checks its \
                 tokens (in ambient mode JWTs are validated at waypoints only)"
            ));
            continue;
        }
        let mut report = |message: String| out.errors.push(ConfigError { source: source.clone(), message });
        let mut policy_problems = Vec::new();
        if let Some(reason) = &spec.unreadable {
            policy_problems.push(format!("the spec cannot be read: {reason}"));
        }
        policy_problems.extend(spec.unknown.keys().map(|k| format!("field {k:?} is not one this mesh reads")));
        let jwt_rules = if policy_problems.is_empty() {
            spec.jwt_rules
                .iter()
                .enumerate()
                .map(|(i, rule)| {
                    let problems = rule_problems(rule);
                    for p in &problems {
                        report(format!("jwtRules[{i}]: {p}"));
                    }
                    translate_rule(rule, problems.join("; "))
                })
                .collect()
        } else {
            // Nothing of it can be trusted: one rule that matches every token and refuses it.
            let why = policy_problems.join("; ");
            for p in policy_problems {
                report(p);
            }
            vec![pb::JwtRule { error: format!("RequestAuthentication {ns}/{name}: {why}"), ..Default::default() }]
        };
        out.rules.insert(
            format!("{ns}/{name}"),
            pb::RequestAuthn { name: name.to_owned(), namespace: ns.to_owned(), targets, jwt_rules },
        );
    }
    out
}

fn translate_rule(rule: &JwtRule, error: String) -> pb::JwtRule {
    pb::JwtRule {
        issuer: rule.issuer.clone(),
        audiences: rule.audiences.clone(),
        jwks: rule.jwks.clone().unwrap_or_default(),
        jwks_uri: if rule.jwks.is_some() { String::new() } else { rule.jwks_uri.clone().unwrap_or_default() },
        from_headers: rule
            .from_headers
            .iter()
            .map(|h| pb::JwtHeader { name: h.name.to_ascii_lowercase(), prefix: h.prefix.clone() })
            .collect(),
        from_params: rule.from_params.clone(),
        from_cookies: rule.from_cookies.clone(),
        output_payload_to_header: rule.output_payload_to_header.clone().unwrap_or_default().to_ascii_lowercase(),
        forward_original_token: rule.forward_original_token,
        output_claim_to_headers: rule
            .output_claim_to_headers
            .iter()
            .map(|c| pb::ClaimToHeader { header: c.header.to_ascii_lowercase(), claim: c.claim.clone() })
            .collect(),
        error,
    }
}

/// What makes a rule unusable as written.
fn rule_problems(rule: &JwtRule) -> Vec<String> {
    let mut out: Vec<String> = rule.unknown.keys().map(|k| format!("field {k:?} is not one this mesh reads")).collect();
    if rule.issuer.is_empty() {
        out.push("issuer is required".into());
    }
    match (&rule.jwks, &rule.jwks_uri) {
        (Some(jwks), _) => {
            if let Err(e) = crate::validate::jwks(jwks) {
                out.push(format!("jwks: {e}"));
            }
        }
        (None, Some(uri)) => {
            if let Err(e) = crate::validate::jwks_uri(uri) {
                out.push(format!("jwksUri: {e}"));
            }
        }
        (None, None) => out.push("neither jwks nor jwksUri is set: there are no keys to verify tokens with".into()),
    }
    let header = |what: &str, name: &str, out: &mut Vec<String>| {
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            out.push(format!("{what}: {name:?} is not a valid header name"));
        }
    };
    for (j, h) in rule.from_headers.iter().enumerate() {
        out.extend(h.unknown.keys().map(|k| format!("fromHeaders[{j}]: field {k:?} is not one this mesh reads")));
        header(&format!("fromHeaders[{j}].name"), &h.name, &mut out);
    }
    for (j, p) in rule.from_params.iter().enumerate() {
        if p.is_empty() {
            out.push(format!("fromParams[{j}]: empty parameter name"));
        }
    }
    for (j, c) in rule.from_cookies.iter().enumerate() {
        if c.is_empty() || c.contains([';', '=', ' ']) {
            out.push(format!("fromCookies[{j}]: {c:?} is not a cookie name"));
        }
    }
    if let Some(h) = &rule.output_payload_to_header {
        header("outputPayloadToHeader", h, &mut out);
    }
    for (j, c) in rule.output_claim_to_headers.iter().enumerate() {
        out.extend(
            c.unknown.keys().map(|k| format!("outputClaimToHeaders[{j}]: field {k:?} is not one this mesh reads")),
        );
        header(&format!("outputClaimToHeaders[{j}].header"), &c.header, &mut out);
        if c.claim.is_empty() {
            out.push(format!("outputClaimToHeaders[{j}].claim: empty claim name"));
        }
    }
    if let Some(t) = &rule.timeout
        && let Err(e) = proto::duration::parse(t)
    {
        out.push(format!("timeout: {e}"));
    }
    out
}

/// The `jwksUri`s of the rules that still need their keys.
pub fn jwks_uris(rules: &BTreeMap<String, pb::RequestAuthn>) -> BTreeSet<String> {
    rules
        .values()
        .flat_map(|r| &r.jwt_rules)
        .filter(|r| r.jwks.is_empty() && r.error.is_empty() && !r.jwks_uri.is_empty())
        .map(|r| r.jwks_uri.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(yaml: &str) -> Objects {
        Objects::from_yaml(yaml)
    }

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"k1"}]}"#;

    fn ra(rules: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\n\
             spec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n{rules}"
        )
    }

    #[test]
    fn a_rule_becomes_the_waypoint_rule() {
        let yaml = ra(&format!(
            "  jwtRules:\n  - issuer: https://issuer.example\n    audiences: [shop]\n    jwks: '{JWKS}'\n    \
             fromHeaders: [{{name: X-Token, prefix: 'T '}}]\n    outputPayloadToHeader: X-Jwt\n    \
             outputClaimToHeaders: [{{header: X-Group, claim: groups}}]\n"
        ));
        let t = translate(&objects(&yaml), &BTreeMap::new(), "istio-system");
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let r = &t.rules["shop/jwt"];
        assert_eq!(r.targets[0].name, "waypoint");
        let rule = &r.jwt_rules[0];
        assert_eq!(rule.issuer, "https://issuer.example");
        assert_eq!(rule.audiences, ["shop"]);
        assert_eq!(rule.jwks, JWKS);
        assert_eq!(rule.from_headers, [pb::JwtHeader { name: "x-token".into(), prefix: "T ".into() }]);
        assert_eq!(rule.output_payload_to_header, "x-jwt");
        assert_eq!(rule.output_claim_to_headers[0].header, "x-group");
        assert!(rule.error.is_empty());
        assert!(jwks_uris(&t.rules).is_empty());
    }

    #[test]
    fn unusable_rules_are_sent_marked_and_reported() {
        let yaml = ra("  jwtRules:\n  - issuer: a\n    jwksUri: http://keys.example/jwks\n  - issuer: b\n    \
             jwks: '{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}]}'\n  - issuer: c\n  - issuer: d\n    \
             jwksUri: https://keys.example/jwks\n    fromHeader: [{name: x}]\n  - issuer: e\n    \
             jwksUri: https://keys.example/e\n");
        let t = translate(&objects(&yaml), &BTreeMap::new(), "istio-system");
        let rules = &t.rules["shop/jwt"].jwt_rules;
        assert!(rules[0].error.contains("HTTPS only"), "{}", rules[0].error);
        assert!(rules[1].error.contains("public key"), "{}", rules[1].error);
        assert!(rules[2].error.contains("neither jwks nor jwksUri"), "{}", rules[2].error);
        assert!(rules[3].error.contains("\"fromHeader\""), "{}", rules[3].error);
        assert!(rules[4].error.is_empty());
        let messages: Vec<&str> = t.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages.len(), 4, "{messages:?}");
        assert!(messages[0].starts_with("jwtRules[0]: jwksUri:"), "{messages:?}");
        assert!(t.errors.iter().all(|e| e.source == "RequestAuthentication shop/jwt"));
        // Only the usable rule's keys are fetched.
        assert_eq!(jwks_uris(&t.rules), BTreeSet::from(["https://keys.example/e".to_owned()]));
    }

    #[test]
    fn an_unreadable_policy_refuses_every_token() {
        for spec in ["  jwtRule:\n  - issuer: a\n", "  jwtRules: 7\n"] {
            let t = translate(&objects(&ra(spec)), &BTreeMap::new(), "istio-system");
            let rules = &t.rules["shop/jwt"].jwt_rules;
            assert_eq!(rules.len(), 1, "{spec}");
            assert!(rules[0].issuer.is_empty() && !rules[0].error.is_empty(), "{spec}: {rules:?}");
            assert_eq!(t.errors.len(), 1, "{spec}");
        }
    }

    #[test]
    fn a_policy_without_targets_is_a_warning() {
        let yaml = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: \
                    shop}\nspec:\n  jwtRules: [{issuer: a, jwksUri: 'https://k/j'}]\n";
        let t = translate(&objects(yaml), &BTreeMap::new(), "istio-system");
        assert!(t.rules.is_empty());
        assert_eq!(t.warnings.len(), 1);
        assert!(t.warnings[0].contains("no targetRefs"), "{:?}", t.warnings);
    }
}

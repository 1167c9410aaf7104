//! Untrusted input of the control plane: an AuthorizationPolicy document (JSON, as both sources
//! hand it over). Decoding, review and both translations must never panic, and what cannot be
//! evaluated must fail closed: an ALLOW policy the review finds a problem with never keeps a rule
//! that matches everything.
#![no_main]

use ca::objects::Object;
use ca::translate::authz::{self, Translated};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let doc = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": spec,
    });
    for object in Object::from_value(doc) {
        let Ok(Object::AuthorizationPolicy(policy)) = object else { continue };
        let review = authz::review(&policy);
        let _ = review.messages();
        if let Translated::Policy(p) = authz::translate(&policy, "istio-system") {
            if p.action == ca::mesh::Action::Allow && !review.policy_ok() {
                assert!(p.rules.is_empty(), "an unreadable ALLOW kept rules: {p:?}");
            }
        }
        let mut objects = ca::objects::Objects::default();
        objects.insert(Object::AuthorizationPolicy(policy));
        let _ = ca::translate::waypoint::l7_policies(&objects);
    }
});

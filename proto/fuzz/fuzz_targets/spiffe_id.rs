//! The SPIFFE ID parser on arbitrary input: never panics, and whatever it accepts formats back to
//! exactly the input and re-parses to the same identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(id) = s.parse::<SpiffeId>() {
        assert_eq!(id.as_str(), s);
        assert!(!id.trust_domain().is_empty() && !id.namespace().is_empty() && !id.service_account().is_empty());
        let again = SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account()).expect("parts re-validate");
        assert_eq!(again, id);
    }
});

//! Untrusted input of the waypoint: a request's target and Host headers. The canonical form must
//! never panic, must be a fixed point (canonicalizing it again changes nothing: what policy saw is
//! what the backend gets), and never contains what it refuses (`;`, dot segments, `//`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use waypoint::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (target, hosts) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok(uri) = target.parse::<http::Uri>() {
        if let Ok(path) = normalize::path(uri.path()) {
            assert_eq!(normalize::path(&path).as_deref(), Ok(path.as_str()), "not a fixed point: {target:?}");
            assert!(!path.contains(';') && !path.contains("//") && !path.contains("/../"), "{path:?}");
        }
        let mut headers = http::HeaderMap::new();
        for h in hosts.split('\n').filter(|h| !h.is_empty()) {
            if let Ok(v) = http::HeaderValue::from_str(h) {
                headers.append(http::header::HOST, v);
            }
        }
        if let Ok(host) = normalize::host(&headers, &uri) {
            assert_eq!(host, host.to_ascii_lowercase(), "{host:?}");
            // Canonical hosts are fixed points too.
            if !host.is_empty() {
                let mut again = http::HeaderMap::new();
                again.append(http::header::HOST, http::HeaderValue::from_str(&host).unwrap());
                assert_eq!(normalize::host(&again, &"/".parse().unwrap()).as_deref(), Ok(host.as_str()));
            }
        }
    }
});

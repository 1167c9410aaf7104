//! The HBONE request parsers on arbitrary input: `:authority`, `forwarded`, `baggage` and
//! `traceparent`. Never panics; accepted values round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::hbone::{parse_forwarded_for, parse_target, Baggage, Target, TraceParent};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(target) = parse_target(&s) {
        assert_eq!(parse_target(&target.to_string()), Ok(target.clone()));
        assert_ne!(target.port(), 0);
        if let Target::Service { host, .. } = &target {
            assert!(host.parse::<std::net::IpAddr>().is_err(), "an address passed as a name: {s:?}");
        }
    }
    let _ = parse_forwarded_for(&s);
    let baggage = Baggage::parse(&s);
    assert_eq!(Baggage::parse(&baggage.to_header()), baggage);
    if let Some(trace) = TraceParent::parse(&s) {
        assert_eq!(TraceParent::parse(&trace.to_string()), Some(trace));
    }
});

//! The HBONE request parsers on arbitrary input: `:authority`, `forwarded`, `baggage` and
//! `traceparent`. Never panics; accepted values round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::hbone::{parse_authority, parse_forwarded_for, Baggage, TraceParent};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(addr) = parse_authority(&s) {
        assert_eq!(parse_authority(&addr.to_string()), Ok(addr));
        assert_ne!(addr.port(), 0);
    }
    let _ = parse_forwarded_for(&s);
    let baggage = Baggage::parse(&s);
    assert_eq!(Baggage::parse(&baggage.to_header()), baggage);
    if let Some(trace) = TraceParent::parse(&s) {
        assert_eq!(TraceParent::parse(&trace.to_string()), Some(trace));
    }
});

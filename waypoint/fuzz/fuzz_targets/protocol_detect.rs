//! Untrusted input of the waypoint's protocol detection: a tunnel's first bytes, read in pieces of
//! any size. Never panics, and a decision once taken never changes as more bytes arrive (the
//! verdict cannot depend on how the peer split its writes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use waypoint::tcp::classify;

fuzz_target!(|data: &[u8]| {
    let mut decided = None;
    for end in 1..=data.len() {
        let now = classify(&data[..end]);
        match (decided, now) {
            (None, now) => decided = now,
            (Some(before), now) => assert_eq!(now, Some(before), "verdict changed at byte {end}: {data:?}"),
        }
    }
});

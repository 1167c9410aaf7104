//! Untrusted input of ztunnel's ZDS socket: one datagram from whatever connects as the node agent,
//! with no descriptor or with one that is not a network namespace. Never panics; nothing but an
//! `Add` accepts a descriptor, and an `Add` is never accepted without a network namespace.
#![no_main]

use std::os::fd::OwnedFd;

use libfuzzer_sys::fuzz_target;
use ztunnel::zds::{parse, ZdsEvent};

fuzz_target!(|data: &[u8]| {
    match parse(data, &mut Vec::new()) {
        Ok(ZdsEvent::Add { .. }) => panic!("an AddWorkload was accepted without a descriptor"),
        Ok(ZdsEvent::Keep { uid } | ZdsEvent::Del { uid }) => assert!(!uid.is_empty()),
        Ok(_) | Err(_) => {}
    }
    let not_a_netns: OwnedFd = std::fs::File::open("/dev/null").expect("/dev/null").into();
    if let Ok(event) = parse(data, &mut vec![not_a_netns]) {
        panic!("accepted with a descriptor that is not a network namespace: {event:?}");
    }
});

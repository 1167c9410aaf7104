//! Untrusted input of ztunnel's DNS proxy: one message from a pod, over UDP or TCP. Never panics;
//! an answer is a DNS response with the query's id, within 512 bytes over UDP unless the query
//! asked for more with EDNS; a forward happens only for a message that parses as a query.
#![no_main]

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use proto::api::istio::workload as pb;
use proto::state::{MeshState, Service};
use ztunnel::dns::{respond, Reply};

fn state() -> MeshState {
    let mut s = MeshState::default();
    for (ns, host, vip) in [
        ("demo", "hello.demo.svc.cluster.local", [10, 96, 0, 1]),
        ("demo", "api.example.com", [240, 240, 0, 10]),
        ("other", "api.example.com", [240, 240, 0, 11]),
    ] {
        let svc = pb::Service {
            name: host.split('.').next().unwrap_or_default().into(),
            namespace: ns.into(),
            hostname: host.into(),
            addresses: vec![pb::NetworkAddress { network: String::new(), address: vip.to_vec(), length: None }],
            ..Default::default()
        };
        s.insert_service(Service::from_pb(svc).expect("a valid service"));
    }
    s
}

fuzz_target!(|data: &[u8]| {
    let s = state();
    for udp in [true, false] {
        match respond(&s, "demo", "cluster.local", data, udp) {
            Reply::Answer(bytes) => {
                let m = Message::from_vec(&bytes).expect("an answer that does not parse");
                assert_eq!(m.metadata.message_type, MessageType::Response);
                assert_eq!(m.metadata.id.to_be_bytes(), [data[0], data[1]]);
                let asked = Message::from_vec(data).ok().and_then(|q| q.edns.map(|e| usize::from(e.max_payload())));
                if udp {
                    assert!(bytes.len() <= asked.unwrap_or(512).max(512), "{} bytes over UDP", bytes.len());
                }
            }
            Reply::Forward => {
                let q = Message::from_vec(data).expect("forwarded a message that does not parse");
                assert_eq!(q.metadata.message_type, MessageType::Query);
            }
            Reply::Drop => {}
        }
    }
});

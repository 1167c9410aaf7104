//! ztunnel's DNS proxy, with real queries from inside an enrolled pod (`getent` through the pod's
//! resolv.conf, `dig` over UDP and TCP) to a nameserver address that does not exist: the capture
//! rules send them to ztunnel, which answers Kubernetes services and ServiceEntry hosts from the
//! mesh state (search-list expansions included) and forwards the rest to an upstream resolver
//! outside the nodes (a test server here). Malformed packets get FORMERR or nothing, and the proxy
//! keeps answering.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use e2e::mesh::{Mesh, MeshOptions, PodSpec, metric_sum};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// The nameserver pods are configured with: no such server exists, capture answers for it.
const NAMESERVER: &str = "10.96.0.10";
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 203);

/// The resolv.conf a kubelet would give a pod of `namespace` (ClusterFirst), naming a nameserver
/// that does not exist: capture answers for it.
fn resolv_conf(namespace: &str) -> String {
    format!(
        "nameserver {NAMESERVER}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
    )
}

/// Runs `args` in `netns` (its own resolv.conf mounted over /etc/resolv.conf); its stdout.
fn in_pod(netns: &e2e::topology::NamedNetns, args: &[&str]) -> String {
    String::from_utf8_lossy(&netns.exec(args).unwrap().stdout).trim().to_owned()
}

/// An upstream resolver outside the nodes: `outside.example` is 10.10.0.202, anything else
/// NXDOMAIN; UDP and TCP on port 53.
fn upstream(netns: &e2e::topology::NamedNetns) {
    fn answer(query: &[u8]) -> Option<Vec<u8>> {
        let q = Message::from_vec(query).ok()?;
        let question = q.queries.first()?.clone();
        let mut m = Message::response(q.metadata.id, OpCode::Query);
        m.metadata.recursion_available = true;
        m.add_query(question.clone());
        if question.name().to_ascii().eq_ignore_ascii_case("outside.example.") && question.query_type() == RecordType::A
        {
            m.add_answer(Record::from_rdata(question.name().clone(), 60, RData::A(A(Ipv4Addr::new(10, 10, 0, 202)))));
        } else {
            m.metadata.response_code = ResponseCode::NXDomain;
        }
        m.to_vec().ok()
    }
    let addr = SocketAddr::from((UPSTREAM, 53));
    let udp = netns.ns.udp_socket(addr).unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            if let Some(a) = answer(&buf[..n]) {
                let _ = udp.send_to(&a, from).await;
            }
        }
    });
    let tcp = netns.ns.tcp_listener(addr).unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                while let Ok(len) = s.read_u16().await {
                    let mut q = vec![0; usize::from(len)];
                    if s.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    let Some(a) = answer(&q) else { return };
                    let _ = s.write_all(&(a.len() as u16).to_be_bytes()).await;
                    let _ = s.write_all(&a).await;
                }
            });
        }
    });
}

const ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: demo}
spec:
  hosts: [api.partner.example]
  addresses: [240.240.0.10]
  resolution: DNS
  ports: [{number: 443, name: https, protocol: TLS}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_resolve_mesh_names_from_ztunnel_and_the_rest_upstream() {
    let options =
        MeshOptions { ztunnel_args: vec!["--dns-upstream".into(), UPSTREAM.to_string()], ..MeshOptions::default() };
    let mut mesh = Mesh::start(options).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let _hello = mesh.pod(PodSpec::new("hello-0", "demo", 2).label("app", "hello")).await.unwrap();
    mesh.service("hello", "demo", Ipv4Addr::new(10, 96, 0, 40), 80, "hello", 8080).unwrap();
    mesh.apply("entry", ENTRY).unwrap();
    let resolver = mesh.outside_client(3).unwrap();
    upstream(&resolver);
    mesh.wait_for_service(1, "10.96.0.40".parse().unwrap()).await.unwrap();
    mesh.wait_for_service(1, "240.240.0.10".parse().unwrap()).await.unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    let pod = &client.netns;
    pod.etc_file("resolv.conf", &resolv_conf("demo")).unwrap();

    // getent through the pod's resolv.conf: short names expand through the search list; the
    // ServiceEntry host is answered for its search-list expansion too (no NXDOMAIN walk).
    let first = |s: String| s.split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(first(in_pod(pod, &["getent", "ahostsv4", "hello"])), "10.96.0.40");
    assert_eq!(first(in_pod(pod, &["getent", "ahostsv4", "hello.demo"])), "10.96.0.40");
    assert_eq!(first(in_pod(pod, &["getent", "ahostsv4", "api.partner.example"])), "240.240.0.10");
    // Upstream: a name the mesh does not know.
    assert_eq!(first(in_pod(pod, &["getent", "ahostsv4", "outside.example"])), "10.10.0.202");
    assert_eq!(in_pod(pod, &["getent", "ahostsv4", "nowhere.example"]), "");

    // dig, UDP and TCP, straight at the (non-existent) nameserver.
    let dig = |extra: &[&str], name: &str, qtype: &str| {
        let mut args = vec!["dig", "+short", "+time=3", "+tries=1"];
        args.extend_from_slice(extra);
        let server = format!("@{NAMESERVER}");
        args.extend([server.as_str(), name, qtype]);
        in_pod(pod, &args)
    };
    for transport in [&[][..], &["+tcp"][..]] {
        assert_eq!(dig(transport, "hello.demo.svc.cluster.local.", "A"), "10.96.0.40", "{transport:?}");
        assert_eq!(dig(transport, "api.partner.example.", "A"), "240.240.0.10", "{transport:?}");
        assert_eq!(dig(transport, "hello.demo.svc.cluster.local.", "AAAA"), "", "NODATA, {transport:?}");
        assert_eq!(dig(transport, "outside.example.", "A"), "10.10.0.202", "{transport:?}");
    }
    let status = in_pod(pod, &["dig", "+time=3", "+tries=1", &format!("@{NAMESERVER}"), "nowhere.example.", "A"]);
    assert!(status.contains("status: NXDOMAIN"), "{status}");

    // Malformed packets from the pod: a header with garbage after it gets FORMERR with its id, a
    // runt is dropped; the proxy keeps answering.
    let sock = client.netns.ns.udp_socket(SocketAddr::from(([0, 0, 0, 0], 0))).unwrap();
    let to: SocketAddr = format!("{NAMESERVER}:53").parse().unwrap();
    sock.send_to(&[0xab, 0xcd, 0x01], to).await.unwrap();
    let mut garbage = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xff; 40]);
    sock.send_to(&garbage, to).await.unwrap();
    let mut buf = vec![0; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf)).await.unwrap().unwrap();
    let reply = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(
        (reply.metadata.id, reply.metadata.message_type, reply.metadata.response_code),
        (0x1234, MessageType::Response, ResponseCode::FormErr),
        "the runt got no answer, the garbage got FORMERR"
    );
    assert_eq!(dig(&[], "hello.demo.svc.cluster.local.", "A"), "10.96.0.40");

    // Counted by who answered.
    let m = mesh.metrics(1).await.unwrap();
    let answered = |by: &str| metric_sum(&m, "istio_dns_requests_total{", &[&format!("answered=\"{by}\"")]);
    assert!(answered("mesh") >= 10.0 && answered("upstream") >= 4.0, "{m}");
    assert_eq!(answered("failed"), 0.0);
}

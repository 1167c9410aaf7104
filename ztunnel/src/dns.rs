//! ztunnel's DNS proxy (Istio ambient's DNS capture).
//!
//! The capture rules send an enrolled pod's DNS queries (UDP and TCP to port 53 of any address but
//! loopback) to `127.0.0.1:15053` inside the pod, where ztunnel listens for that pod. A query for a
//! name the mesh knows is answered from the mesh state: a Kubernetes service's hostname or a
//! ServiceEntry host gets the service's VIPs (a headless service: its ready endpoints' addresses),
//! A for IPv4 and AAAA for IPv6, with a 30 s TTL. A name the pod's resolver built from a search
//! domain (`api.example.com.<ns>.svc.<domain>`, as resolv.conf's `search` makes it) is answered for
//! the host it was built from, saving the NXDOMAIN round trips of the search walk. Everything else
//! (other names, other types, other classes) is forwarded, as it came, to the upstream resolvers
//! (`--dns-upstream`, else ztunnel's own resolv.conf) and the answer relayed.
//!
//! A name under `<ns>.svc.<domain>` is only ever answered with a service of namespace `<ns>`: a
//! ServiceEntry in another namespace cannot take over a Kubernetes service's name. Messages are
//! parsed with `hickory-proto`; one that does not parse gets FORMERR when its header can be read
//! and is dropped otherwise, never a panic (fuzz target `dns_query`). A pod has at most 256 queries
//! (and TCP connections) in progress; more are dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use proto::state::MeshState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::context::Context;
use crate::pod::Pod;

/// The port ztunnel listens on for a pod's captured DNS (Istio's).
pub const DNS_PORT: u16 = 15053;
/// TTL of the answers made from the mesh state (Istio's).
const TTL: u32 = 30;
/// How long an upstream resolver has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TCP client has to send its query.
const TCP_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest UDP answer without EDNS (RFC 1035).
const PLAIN_UDP_LIMIT: usize = 512;
/// Queries (UDP) and connections (TCP) one pod may have in progress at once; beyond, new ones are
/// dropped (counted `answered="dropped"`): a pod cannot make ztunnel hold unbounded work or
/// sockets for it.
const PER_POD_IN_FLIGHT: usize = 256;

/// Settings of the DNS proxy.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Resolvers that answer what the mesh does not know.
    pub upstreams: Vec<SocketAddr>,
    /// The cluster's DNS domain (`cluster.local`): services are `<name>.<ns>.svc.<domain>`.
    pub domain: String,
}

impl DnsConfig {
    /// The nameservers of a resolv.conf (port 53), in order.
    pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
        text.lines()
            .filter_map(|l| l.split('#').next()?.trim().strip_prefix("nameserver"))
            .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect()
    }
}

/// What to do with one message from a pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// Not for the mesh to answer: forward the query as it came.
    Forward,
    /// Not a query (or unreadable even as a header): drop it.
    Drop,
}

/// The addresses the mesh gives `name` (lower case, no trailing dot), asked by a pod of
/// `namespace`; `None` when the mesh does not know the name.
fn lookup(state: &MeshState, namespace: &str, domain: &str, name: &str) -> Option<Vec<IpAddr>> {
    let cluster = format!(".svc.{domain}");
    let search = [format!(".{namespace}.svc.{domain}"), cluster.clone(), format!(".{domain}")];
    let stripped = search.iter().filter_map(|s| name.strip_suffix(s.as_str())).filter(|n| !n.is_empty());
    for candidate in std::iter::once(name).chain(stripped) {
        // `<service>.<ns>.svc.<domain>`: only namespace `<ns>`'s service answers for it.
        let owner = candidate.strip_suffix(cluster.as_str()).and_then(|rest| rest.rsplit_once('.')).map(|(_, ns)| ns);
        let mut services: Vec<_> =
            state.services_by_hostname(candidate).filter(|s| owner.is_none_or(|ns| s.namespace == ns)).collect();
        // The pod's own namespace first (two namespaces may name the same ServiceEntry host).
        services.sort_by_key(|s| s.namespace != namespace);
        for service in services {
            let addresses: Vec<IpAddr> = if service.vips.is_empty() {
                state.endpoints(&service.key).filter(|w| w.healthy).filter_map(|w| w.primary_address()).collect()
            } else {
                service.vips.clone()
            };
            if !addresses.is_empty() {
                return Some(addresses);
            }
        }
    }
    None
}

fn encode(message: &Message) -> Reply {
    match message.to_vec() {
        Ok(bytes) => Reply::Answer(bytes),
        Err(e) => {
            warn!(error = %e, "could not encode a DNS answer");
            Reply::Drop
        }
    }
}

/// Decides what to do with `query` (one DNS message) from a pod of `namespace`; `udp` limits the
/// answer's size (512 bytes, or the client's EDNS payload size; above it, a truncated answer
/// tells the client to ask again over TCP).
pub fn respond(state: &MeshState, namespace: &str, domain: &str, query: &[u8], udp: bool) -> Reply {
    let Some(id) = query.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else { return Reply::Drop };
    if query.len() < 12 {
        return Reply::Drop;
    }
    let message = match Message::from_vec(query) {
        Ok(m) => m,
        Err(e) => {
            debug!(error = %e, "malformed DNS message");
            return encode(&Message::error_msg(id, OpCode::Query, ResponseCode::FormErr));
        }
    };
    if message.metadata.message_type != MessageType::Query {
        return Reply::Drop;
    }
    if message.metadata.op_code != OpCode::Query {
        return encode(&Message::error_msg(id, message.metadata.op_code, ResponseCode::NotImp));
    }
    let [question] = message.queries.as_slice() else {
        return encode(&Message::error_msg(id, OpCode::Query, ResponseCode::FormErr));
    };
    let qtype = question.query_type();
    if question.query_class() != DNSClass::IN || !matches!(qtype, RecordType::A | RecordType::AAAA) {
        return Reply::Forward;
    }
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    let Some(addresses) = lookup(state, namespace, domain, name) else { return Reply::Forward };

    let mut answer = Message::response(id, OpCode::Query);
    answer.metadata.authoritative = true;
    answer.metadata.recursion_desired = message.metadata.recursion_desired;
    answer.metadata.recursion_available = true;
    answer.add_query(question.clone());
    let owner = question.name().clone();
    for ip in addresses {
        let rdata = match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
            // The name has addresses, none of this family: an empty answer (NODATA).
            _ => continue,
        };
        answer.add_answer(Record::from_rdata(owner.clone(), TTL, rdata));
    }
    let limit = match &message.edns {
        Some(edns) => {
            answer.set_edns(Edns::new());
            usize::from(edns.max_payload()).max(PLAIN_UDP_LIMIT)
        }
        None => PLAIN_UDP_LIMIT,
    };
    match encode(&answer) {
        Reply::Answer(bytes) if udp && bytes.len() > limit => encode(&answer.truncate()),
        other => other,
    }
}

/// Sends `query` to the upstream resolvers in turn, over UDP or TCP as the client asked; the first
/// answer with the query's id is returned.
async fn forward(upstreams: &[SocketAddr], query: &[u8], tcp: bool) -> Result<Vec<u8>, String> {
    let mut last = "no upstream resolver is configured".to_owned();
    for upstream in upstreams {
        let attempt = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            if tcp { forward_tcp(*upstream, query).await } else { forward_udp(*upstream, query).await }
        })
        .await;
        match attempt {
            Ok(Ok(answer)) if answer.get(..2) == query.get(..2) => return Ok(answer),
            Ok(Ok(_)) => last = format!("{upstream} answered another query id"),
            Ok(Err(e)) => last = format!("{upstream}: {e}"),
            Err(_) => last = format!("{upstream} did not answer within {UPSTREAM_TIMEOUT:?}"),
        }
    }
    Err(last)
}

async fn forward_udp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0; 65_535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Another id is a stray or a spoof: keep waiting for ours.
        if buf.get(..2) == query.get(..2) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len()).map_err(|_| std::io::Error::other("query too long"))?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(query).await?;
    read_framed(&mut stream).await
}

/// One length-prefixed DNS message from a TCP stream.
async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut buf = vec![0; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Counts one query by who answered it.
fn count(ctx: &Context, answered: &'static str) {
    ctx.metrics.dns_requests.get_or_create(&crate::telemetry::DnsLabels { answered }).inc();
}

/// The answer to one query: from the mesh, from upstream, or SERVFAIL when upstream fails.
async fn answer(ctx: &Context, pod: &Pod, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let reply = ctx.view.read(|s| respond(s, &pod.namespace, &ctx.dns.domain, query, !tcp));
    match reply {
        Reply::Answer(bytes) => {
            count(ctx, "mesh");
            Some(bytes)
        }
        Reply::Drop => None,
        Reply::Forward => match forward(&ctx.dns.upstreams, query, tcp).await {
            Ok(bytes) => {
                count(ctx, "upstream");
                Some(bytes)
            }
            Err(reason) => {
                count(ctx, "failed");
                warn!(pod = %pod.name, reason, "DNS query not answered upstream; SERVFAIL");
                let id = u16::from_be_bytes([query[0], query[1]]);
                let message = Message::error_msg(id, OpCode::Query, ResponseCode::ServFail);
                message.to_vec().ok()
            }
        },
    }
}

/// Answers the pod's captured UDP queries until `stop`.
pub async fn serve_udp(
    ctx: Arc<Context>,
    pod: Arc<Pod>,
    socket: UdpSocket,
    stop: impl std::future::Future<Output = ()>,
) {
    let socket = Arc::new(socket);
    let in_flight = Arc::new(Semaphore::new(PER_POD_IN_FLIGHT));
    let mut buf = vec![0; 65_535];
    let mut stop = std::pin::pin!(stop);
    loop {
        let (n, client) = tokio::select! {
            () = &mut stop => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "DNS receive failed");
                    continue;
                }
            },
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            count(&ctx, "dropped");
            debug!(pod = %pod.name, %client, "DNS query dropped: too many in progress for this pod");
            continue;
        };
        let query = buf[..n].to_vec();
        let (ctx, pod, socket) = (ctx.clone(), pod.clone(), socket.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(bytes) = answer(&ctx, &pod, &query, false).await
                && let Err(e) = socket.send_to(&bytes, client).await
            {
                debug!(%client, error = %e, "DNS answer not sent");
            }
        });
    }
}

/// Answers the pod's captured TCP queries (several per connection) until `stop`.
pub async fn serve_tcp(
    ctx: Arc<Context>,
    pod: Arc<Pod>,
    listener: TcpListener,
    stop: impl std::future::Future<Output = ()>,
) {
    let in_flight = Arc::new(Semaphore::new(PER_POD_IN_FLIGHT));
    let mut stop = std::pin::pin!(stop);
    loop {
        let (mut stream, client) = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "DNS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            count(&ctx, "dropped");
            debug!(pod = %pod.name, %client, "DNS connection closed: too many in progress for this pod");
            continue;
        };
        let (ctx, pod) = (ctx.clone(), pod.clone());
        tokio::spawn(async move {
            let _permit = permit;
            while let Ok(Ok(query)) = tokio::time::timeout(TCP_READ_TIMEOUT, read_framed(&mut stream)).await {
                let Some(bytes) = answer(&ctx, &pod, &query, true).await else { break };
                let Ok(len) = u16::try_from(bytes.len()) else { break };
                if stream.write_all(&len.to_be_bytes()).await.is_err() || stream.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            debug!(%client, "DNS TCP connection closed");
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use proto::api::istio::workload as pb;

    use super::*;

    fn service(ns: &str, hostname: &str, vips: &[IpAddr]) -> proto::state::Service {
        proto::state::Service::from_pb(pb::Service {
            name: hostname.split('.').next().unwrap().into(),
            namespace: ns.into(),
            hostname: hostname.into(),
            addresses: vips
                .iter()
                .map(|ip| pb::NetworkAddress {
                    network: String::new(),
                    address: match ip {
                        IpAddr::V4(v4) => v4.octets().to_vec(),
                        IpAddr::V6(v6) => v6.octets().to_vec(),
                    },
                    length: None,
                })
                .collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn state() -> MeshState {
        let mut s = MeshState::default();
        s.insert_service(service("demo", "hello.demo.svc.cluster.local", &["10.96.0.1".parse().unwrap()]));
        s.insert_service(service(
            "demo",
            "api.example.com",
            &["240.240.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
        ));
        // Another namespace's entry for the same host, and one claiming demo's service name.
        s.insert_service(service("other", "api.example.com", &["240.240.0.99".parse().unwrap()]));
        s.insert_service(service("evil", "hello.demo.svc.cluster.local", &["240.240.6.6".parse().unwrap()]));
        s
    }

    fn query(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn answers(reply: Reply) -> (ResponseCode, Vec<IpAddr>) {
        let Reply::Answer(bytes) = reply else { panic!("{reply:?}") };
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        let ips = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                other => panic!("{other:?}"),
            })
            .collect();
        (m.metadata.response_code, ips)
    }

    fn ask(from_ns: &str, name: &str, qtype: RecordType) -> Reply {
        respond(&state(), from_ns, "cluster.local", &query(name, qtype, false), true)
    }

    #[test]
    fn mesh_names_are_answered_from_the_state() {
        let ok =
            |ips: &[&str]| (ResponseCode::NoError, ips.iter().map(|i| i.parse().unwrap()).collect::<Vec<IpAddr>>());
        assert_eq!(answers(ask("demo", "hello.demo.svc.cluster.local.", RecordType::A)), ok(&["10.96.0.1"]));
        assert_eq!(answers(ask("demo", "HELLO.demo.svc.cluster.local", RecordType::A)), ok(&["10.96.0.1"]));
        // A ServiceEntry host: the pod's namespace's entry first; AAAA gets the IPv6 VIP.
        assert_eq!(answers(ask("demo", "api.example.com.", RecordType::A)), ok(&["240.240.0.10"]));
        assert_eq!(answers(ask("other", "api.example.com.", RecordType::A)), ok(&["240.240.0.99"]));
        assert_eq!(answers(ask("demo", "api.example.com.", RecordType::AAAA)), ok(&["fd00::10"]));
        // A service without IPv6: NODATA, not a forward that could leak the name.
        assert_eq!(answers(ask("demo", "hello.demo.svc.cluster.local.", RecordType::AAAA)), ok(&[]));
        // What a resolv.conf search list builds from `api.example.com`.
        for expanded in [
            "api.example.com.demo.svc.cluster.local.",
            "api.example.com.svc.cluster.local.",
            "api.example.com.cluster.local.",
        ] {
            assert_eq!(answers(ask("demo", expanded, RecordType::A)), ok(&["240.240.0.10"]), "{expanded}");
        }
        // A name under demo's service domain is demo's alone: the `evil` entry never answers it.
        let (_, ips) = answers(ask("evil", "hello.demo.svc.cluster.local.", RecordType::A));
        assert_eq!(ips, ["10.96.0.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn other_names_types_and_classes_are_forwarded() {
        assert_eq!(ask("demo", "example.org.", RecordType::A), Reply::Forward);
        assert_eq!(ask("demo", "nothere.demo.svc.cluster.local.", RecordType::A), Reply::Forward);
        assert_eq!(ask("demo", "api.example.com.", RecordType::MX), Reply::Forward);
        assert_eq!(ask("demo", "api.example.com.", RecordType::TXT), Reply::Forward);
        // The `evil` entry claims demo's name; through its own namespace's search list it gets
        // nothing either (that expansion is not its hostname).
        assert_eq!(ask("evil", "hello.evil.svc.cluster.local.", RecordType::A), Reply::Forward);
    }

    #[test]
    fn malformed_messages_get_formerr_or_are_dropped() {
        let s = state();
        assert_eq!(respond(&s, "demo", "cluster.local", &[], true), Reply::Drop);
        assert_eq!(respond(&s, "demo", "cluster.local", &[1, 2, 3], true), Reply::Drop);
        // A header then garbage: FORMERR with the query's id.
        let mut bad = query("hello.demo.svc.cluster.local.", RecordType::A, false);
        bad.truncate(20);
        let Reply::Answer(bytes) = respond(&s, "demo", "cluster.local", &bad, true) else { panic!() };
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code), (4242, ResponseCode::FormErr));
        // A response sent to the proxy is dropped (no loops).
        let mut response = Message::from_vec(&query("x.", RecordType::A, false)).unwrap();
        response.metadata.message_type = MessageType::Response;
        assert_eq!(respond(&s, "demo", "cluster.local", &response.to_vec().unwrap(), true), Reply::Drop);
        // Two questions: FORMERR.
        let mut two = Message::from_vec(&query("a.", RecordType::A, false)).unwrap();
        two.add_query(Query::query(Name::from_ascii("b.").unwrap(), RecordType::A));
        let (code, _) = answers(respond(&s, "demo", "cluster.local", &two.to_vec().unwrap(), true));
        assert_eq!(code, ResponseCode::FormErr);
    }

    #[test]
    fn a_big_answer_over_udp_is_truncated_and_whole_over_tcp() {
        let mut s = MeshState::default();
        let vips: Vec<IpAddr> = (1..=60).map(|i| IpAddr::from([10, 96, 1, i])).collect();
        s.insert_service(service("demo", "big.demo.svc.cluster.local", &vips));
        let q = query("big.demo.svc.cluster.local.", RecordType::A, false);
        let Reply::Answer(udp) = respond(&s, "demo", "cluster.local", &q, true) else { panic!() };
        let m = Message::from_vec(&udp).unwrap();
        assert!(m.metadata.truncation && m.answers.is_empty() && udp.len() <= 512);
        let (_, ips) = answers(respond(&s, "demo", "cluster.local", &q, false));
        assert_eq!(ips, vips);
        // With EDNS (the client takes 1232+ bytes): whole over UDP too.
        let q = query("big.demo.svc.cluster.local.", RecordType::A, true);
        let (_, ips) = answers(respond(&s, "demo", "cluster.local", &q, true));
        assert_eq!(ips.len(), 60);
    }

    #[test]
    fn resolv_conf_nameservers_are_the_default_upstreams() {
        let conf = "# generated\nsearch demo.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a # v6\noptions ndots:5\nnameserver bogus\n";
        assert_eq!(
            DnsConfig::upstreams_from_resolv_conf(conf),
            ["10.96.0.10:53".parse::<SocketAddr>().unwrap(), "[fd00::a]:53".parse().unwrap()]
        );
    }
}

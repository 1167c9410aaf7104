//! TLS passthrough at the ingress gateway: Istio Gateway servers with `protocol: TLS` and
//! `tls.mode: PASSTHROUGH`.
//!
//! On a TLS port the gateway reads the ClientHello (parsed by rustls, nothing answered) and takes
//! the server whose hosts admit its SNI most specifically among that port's terminating and
//! passthrough servers. A passthrough server's stream is never opened: the `tls:` rules of the
//! VirtualServices bound to the Gateway pick a destination by SNI (and port), a weighted backend is
//! chosen, and the bytes (the ClientHello first) are carried to an endpoint of the service: over
//! HBONE with the gateway's identity to a mesh pod, through the service's waypoint when it has one.
//! No rule for the SNI, no healthy endpoint, a connection limit reached: the connection is closed,
//! counted (`istio_tcp_connections_*`, `response_flags` `NR`, `UH`, `UO`, `UF`) and logged.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use proto::api::ambient::waypoint::v1::{self as pb, gateway_server::Protocol, gateway_tls::Mode};
use proto::metrics::Hashed;
use proto::state::MeshState;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::Context;
use crate::ingress::{IngressConfig, best_server, host_matches, selected};
use crate::metrics::{Parties, TcpLabels};
use crate::target::{self, Backend};

/// A server whose TLS streams the gateway routes by SNI without opening them.
pub(crate) fn passes_through(server: &pb::GatewayServer) -> bool {
    server.protocol() == Protocol::Tls && server.tls.as_ref().is_some_and(|t| t.mode() == Mode::Passthrough)
}

/// The most a ClientHello may take before the gateway gives up on it.
const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Reads `tcp` up to the end of the ClientHello: the bytes read, and its SNI. An unreadable
/// hello is an error (the caller closes the connection; nothing is sent back).
pub(crate) async fn read_client_hello(tcp: &mut TcpStream) -> Result<(Vec<u8>, Option<String>), String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut read = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tcp.read(&mut chunk).await.map_err(|e| format!("reading the ClientHello: {e}"))?;
        if n == 0 {
            return Err("the client closed before its ClientHello ended".to_owned());
        }
        read.extend_from_slice(&chunk[..n]);
        // rustls takes what its buffer holds per call: feed the whole chunk.
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            match acceptor.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(format!("reading the ClientHello: {e}")),
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_ascii_lowercase);
                return Ok((read, sni));
            }
            Ok(None) if read.len() < MAX_CLIENT_HELLO => {}
            Ok(None) => return Err(format!("no ClientHello within {MAX_CLIENT_HELLO} bytes")),
            Err((e, _alert)) => return Err(format!("not a TLS ClientHello: {e}")),
        }
    }
}

/// Whether a ClientHello for `sni` on `port` goes to a passthrough server: the most specific
/// server for it among the port's TLS servers (terminating or not) passes through.
pub(crate) fn is_passthrough(
    state: &MeshState,
    labels: &std::collections::BTreeMap<String, String>,
    port: u16,
    sni: Option<&str>,
) -> bool {
    let gateways = selected(state, labels);
    let candidates = gateways
        .iter()
        .flat_map(|g| &g.servers)
        .filter(|s| s.port == u32::from(port) && (passes_through(s) || crate::edge_tls::terminates(s)));
    best_server(candidates, sni).is_some_and(passes_through)
}

/// Where a passthrough stream for `sni` on `port` goes: the route's name and the backend, or the
/// flag and reason it is refused with.
pub(crate) fn plan(
    state: &MeshState,
    labels: &std::collections::BTreeMap<String, String>,
    port: u16,
    sni: Option<&str>,
    own_ip: std::net::IpAddr,
    rng: &mut impl Rng,
) -> Result<(String, Backend), (&'static str, String)> {
    if let Some(reason) = crate::ingress::own_pod_refusal(state, own_ip) {
        return Err(("RBAC", reason));
    }
    let sni = sni.ok_or(("NR", "no SNI: a passthrough server routes by it".to_owned()))?;
    let gateways = selected(state, labels);
    let rule = gateways
        .iter()
        .flat_map(|g| &g.routes)
        .filter(|r| r.ports.is_empty() || r.ports.contains(&u32::from(port)))
        .flat_map(|r| r.tls_rules.iter().map(move |t| (r, t)))
        .find(|(_, t)| (t.port == 0 || t.port == u32::from(port)) && t.sni_hosts.iter().any(|p| host_matches(p, sni)));
    let Some((route, rule)) = rule else { return Err(("NR", "no tls route matches the SNI".to_owned())) };
    let name = route.route.as_ref().map(|r| r.name.clone()).unwrap_or_default();
    let chosen =
        crate::route::pick_backend(&rule.backends, rng).ok_or(("NR", "the tls route has no backend".to_owned()))?;
    let service = state.service(&chosen.service).ok_or(("UH", "the route's service does not exist".to_owned()))?;
    // A destination without a port: the service's only one (Istio's rule), else the gateway's.
    let service_port = match u16::try_from(chosen.port) {
        Ok(p) if p != 0 => p,
        _ => match service.ports.as_slice() {
            [only] => only.service_port,
            _ => port,
        },
    };
    let subset = (!chosen.subset.is_empty()).then_some((chosen.subset.as_str(), chosen.workloads.as_slice()));
    let backend = Backend::service(state, &service.key, service_port, subset);
    if service.waypoint.is_some() {
        // Through the destination's waypoint, never around it.
        let through = target::waypoint_of(state, service).and_then(|w| backend.through_waypoint(service, w));
        return through.map(|b| (name, b)).ok_or(("UH", "the destination's waypoint has no pod to take it".to_owned()));
    }
    Ok((name, backend))
}

/// Bytes already read (the ClientHello), then the rest of the stream.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed { prefix, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Carries one passthrough connection (its ClientHello already read into `hello`) to an endpoint
/// of the destination its SNI routes to, until either side closes.
pub(crate) async fn forward(
    ctx: Arc<Context>,
    gw: Arc<IngressConfig>,
    mut tcp: TcpStream,
    (hello, sni): (Vec<u8>, Option<String>),
    (port, client): (u16, SocketAddr),
) {
    let start = Instant::now();
    let planned = ctx.view.read(|s| plan(s, &gw.labels, port, sni.as_deref(), gw.pod_ip, &mut rand::rng()));
    let unknown = || "unknown".to_owned();
    let destination = planned.as_ref().ok().and_then(|(_, b)| {
        let key = b.key.split('#').next()?;
        ctx.view.read(|s| s.service(key).cloned())
    });
    let mut labels = TcpLabels::new(Parties {
        source_workload: ctx.name.clone(),
        source_workload_namespace: ctx.namespace.clone(),
        source_principal: ctx.identity.as_str().to_owned(),
        destination_service: destination.as_ref().map_or_else(unknown, |s| s.hostname.clone()),
        destination_service_name: destination.as_ref().map_or_else(unknown, |s| s.name.clone()),
        destination_service_namespace: destination.as_ref().map_or_else(unknown, |s| s.namespace.clone()),
        destination_workload: unknown(),
        destination_workload_namespace: unknown(),
        destination_principal: unknown(),
    });
    labels.reporter = "source";
    let sni_text = sni.as_deref().unwrap_or("-");
    let log = |labels: &TcpLabels, endpoint: &str, bytes: (u64, u64), reason: &str| {
        info!(
            target: "access",
            %client,
            port,
            sni = sni_text,
            service = %labels.parties.destination_service,
            endpoint,
            flags = labels.response_flags,
            from_client = bytes.0,
            to_client = bytes.1,
            duration_ms = start.elapsed().as_millis() as u64,
            reason,
            "passthrough"
        );
    };
    let backend = match planned {
        Ok((_, backend)) => backend,
        Err((flags, reason)) => {
            labels.response_flags = flags;
            let labels = Hashed::new(labels);
            ctx.metrics.tcp_refused(&labels);
            log(labels.labels(), "-", (0, 0), &reason);
            return;
        }
    };
    let state = ctx.destinations.state(&backend.key, backend.policy());
    let Some(_slot) = state.admit().await else {
        labels.response_flags = "UO";
        let labels = Hashed::new(labels);
        ctx.metrics.tcp_refused(&labels);
        log(labels.labels(), "-", (0, 0), "connection limit reached");
        return;
    };
    let Some(endpoint) = state.pick(&backend.endpoints, backend.policy(), &[]).cloned() else {
        labels.response_flags = "UH";
        let labels = Hashed::new(labels);
        ctx.metrics.tcp_refused(&labels);
        log(labels.labels(), "-", (0, 0), "no healthy endpoint");
        return;
    };
    let _in_flight = state.start(&endpoint.workload.uid);
    labels.parties.set_endpoint(&endpoint.workload);
    let outlier = backend.policy().and_then(|p| p.outlier_detection);
    let connector = ctx.connector.for_client(Some(client.ip()));
    let upstream = match (endpoint.address.or_else(|| endpoint.workload.primary_address()), &endpoint.workload.hostname)
    {
        (Some(ip), _) => connector.connect(ip, endpoint.port).await.map_err(|e| proto::error_chain(&e)),
        (None, Some(host)) => {
            connector.resolve_and_connect(host, endpoint.port).await.map_err(|e| proto::error_chain(&e))
        }
        (None, None) => Err("the endpoint has no address".to_owned()),
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(error) => {
            state.record(&endpoint.workload.uid, 0, outlier.as_ref(), backend.endpoints.len());
            labels.response_flags = "UF";
            let labels = Hashed::new(labels);
            ctx.metrics.tcp_refused(&labels);
            warn!(endpoint = %endpoint.workload.name, %error, "passthrough: upstream connection failed");
            log(labels.labels(), &endpoint.workload.name, (0, 0), "upstream connection failed");
            return;
        }
    };
    state.record(&endpoint.workload.uid, 200, outlier.as_ref(), backend.endpoints.len());
    let labels = Hashed::new(labels);
    ctx.metrics.tcp_opened(&labels);
    let copied = async {
        upstream.write_all(&hello).await?;
        let (up, down) = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await?;
        Ok::<_, io::Error>((up + hello.len() as u64, down))
    }
    .await;
    let (bytes, reason) = match copied {
        Ok(b) => (b, "closed".to_owned()),
        Err(e) => {
            upstream.reset();
            ((0, 0), format!("ended with an error: {e}"))
        }
    };
    ctx.metrics.tcp_closed(&labels, bytes.0, bytes.1);
    log(labels.labels(), &endpoint.workload.name, bytes, &reason);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::net::IpAddr;

    use proto::api::ambient::waypoint::v1::GatewayTls;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::fixture::{self, GATEWAY_IP, KEY, gateway_labels as labels, gateway_pod};

    /// A Gateway with a PASSTHROUGH server for `secure.example` on 443 and a `tls:` rule sending
    /// that SNI to the fixture's service (no port named: its only one), plus the gateway's pod.
    fn state() -> MeshState {
        let mut s = fixture::state();
        let server = pb::GatewayServer {
            name: "tls".into(),
            port: 443,
            protocol: Protocol::Tls as i32,
            hosts: vec!["secure.example".into(), "*.wild.example".into()],
            tls: Some(GatewayTls { mode: Mode::Passthrough as i32, ..Default::default() }),
        };
        let rule = pb::TlsRule {
            sni_hosts: vec!["secure.example".into()],
            port: 443,
            backends: vec![pb::Backend { service: KEY.into(), weight: 100, ..Default::default() }],
        };
        let gateway = pb::IngressGateway {
            namespace: "shop".into(),
            name: "edge".into(),
            selector: labels().into_iter().collect(),
            servers: vec![server],
            routes: vec![pb::GatewayRoute {
                hosts: vec!["secure.example".into()],
                ports: vec![443],
                route: Some(pb::Route { name: "shop/secure".into(), ..Default::default() }),
                tls_rules: vec![rule],
            }],
        };
        s.ingress_gateways.insert("shop/edge".into(), Arc::new(gateway));
        s.insert_workload(proto::state::Workload::from_pb(gateway_pod(&[])).unwrap());
        s
    }

    fn planned(s: &MeshState, port: u16, sni: Option<&str>) -> Result<(String, Backend), (&'static str, String)> {
        plan(s, &labels(), port, sni, IpAddr::from(GATEWAY_IP), &mut StdRng::seed_from_u64(7))
    }

    #[test]
    fn the_sni_picks_the_passthrough_server_and_its_tls_rule() {
        let s = state();
        assert!(is_passthrough(&s, &labels(), 443, Some("secure.example")));
        assert!(is_passthrough(&s, &labels(), 443, Some("a.wild.example")));
        assert!(!is_passthrough(&s, &labels(), 443, Some("other.example")));
        assert!(!is_passthrough(&s, &labels(), 8443, Some("secure.example")));
        assert!(!is_passthrough(&s, &labels(), 443, None), "no SNI: no server without `*`");

        let (route, backend) = planned(&s, 443, Some("secure.example")).unwrap();
        assert_eq!((route.as_str(), backend.key.as_str()), ("shop/secure", KEY));
        // The service's only port (80), served by the pods on 8080.
        assert!(!backend.endpoints.is_empty() && backend.endpoints.iter().all(|e| e.port == 8080));
        // A server admits it, no rule routes it: refused, not guessed.
        let (flags, _) = planned(&s, 443, Some("a.wild.example")).unwrap_err();
        assert_eq!(flags, "NR");
        assert_eq!(planned(&s, 443, None).unwrap_err().0, "NR");
    }

    #[test]
    fn a_gateway_whose_own_workload_is_unknown_refuses_passthrough_too() {
        let mut s = state();
        s.remove_address("Kubernetes//Pod/istio-system/ingress");
        assert_eq!(planned(&s, 443, Some("secure.example")).unwrap_err().0, "RBAC");
    }

    #[tokio::test]
    async fn the_client_hello_is_read_whole_and_replayed_first() {
        use tokio_rustls::rustls;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut roots = rustls::RootCertStore::empty();
            roots.add(proto::testing::TestCa::new().root().clone()).unwrap();
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("secure.example").unwrap();
            // The handshake never completes (nobody answers); only the hello matters.
            let _ = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await;
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        let (hello, sni) = read_client_hello(&mut tcp).await.unwrap();
        assert_eq!(sni.as_deref(), Some("secure.example"));
        assert_eq!(hello[0], 0x16, "a TLS handshake record");
        let mut replayed = Prefixed::new(hello.clone(), tokio::io::empty());
        let mut again = Vec::new();
        replayed.read_to_end(&mut again).await.unwrap();
        assert_eq!(again, hello);
    }

    #[tokio::test]
    async fn plaintext_is_not_a_client_hello() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: secure.example\r\n\r\n").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        let err = read_client_hello(&mut tcp).await.unwrap_err();
        assert!(err.starts_with("not a TLS ClientHello"), "{err}");
    }
}

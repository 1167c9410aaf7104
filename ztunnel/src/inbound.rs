//! Inbound: connections to a pod on this node.
//!
//! **HBONE (15008)**: the HBONE server has already completed mTLS (presenting the pod's
//! certificate) and validated the request (authority is the IP the connection landed on, not one of
//! our ports; or a service hostname). Here:
//! 0. a `hostname:port` authority (Istio's cross-network form) is resolved as Istio's ztunnel
//!    does: to a service of that hostname the pod is an endpoint of, preferring the pod's own
//!    namespace, and the port the pod serves that service port on; or `400` (`503` when it
//!    resolves to one of our own ports);
//! 1. the destination must be a workload the control plane knows at that IP, or `400`;
//! 2. L4 authorization with the peer's identity from the handshake, or `401`;
//! 3. connect to the app from inside the pod, as the client: the TCP peer's address, or the one
//!    in `forwarded` only when the peer is the destination's waypoint (proven by TLS); or `503`;
//! 4. `200` and bytes both ways until both sides close, or until a policy change revokes it.
//!
//! **Plaintext (15006)**: a connection redirected by the capture rules (a client outside the mesh).
//! It is authorized with no identity (a `STRICT` PeerAuthentication denies exactly that), then
//! relayed the same way.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use proto::drain::DrainWatcher;
use proto::hbone::server::{Handler, InboundConnect, StatusCode};
use proto::hbone::{MESH_PORTS, Target, copy};
use proto::state::Workload;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::pod::{Pod, connect};
use crate::rbac::{self, Connection, Decision};
use crate::telemetry::{ConnectionInfo, ConnectionRecord, Outcome, Peer, Reporter};
use crate::tracker::{Registration, Revocation};
use crate::xds::MeshState;

/// How long a dial to the app may take before the tunnel is answered `503`.
pub const APP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The HBONE handler of one pod.
#[derive(Debug)]
pub struct Inbound {
    ctx: Arc<Context>,
    pod: Arc<Pod>,
}

impl Inbound {
    /// Serves `pod`.
    pub fn new(ctx: Arc<Context>, pod: Arc<Pod>) -> Arc<Self> {
        Arc::new(Inbound { ctx, pod })
    }
}

/// What the state says about an inbound connection.
struct Admission {
    info: ConnectionInfo,
    decision: Decision,
    /// The state's generation the decision was made at (see `Tracker::register`).
    generation: u64,
    /// The client's address, as the app will see it.
    client: SocketAddr,
}

/// The client's address: the TCP peer's, unless the peer is a waypoint of the destination (its
/// identity from TLS), which speaks for the client it proxies in `forwarded`. Anyone else's
/// `forwarded` is ignored: a source address comes from the network, never from a header.
fn client_address(
    state: &MeshState,
    destination: &Workload,
    peer: Option<&proto::SpiffeId>,
    peer_addr: SocketAddr,
    forwarded: Option<IpAddr>,
) -> SocketAddr {
    match (forwarded, peer) {
        // What every ztunnel sends: the address it connected from.
        (Some(ip), _) if ip == peer_addr.ip() => peer_addr,
        (Some(ip), Some(peer)) if crate::outbound::is_waypoint_of(state, destination, peer) => SocketAddr::new(ip, 0),
        (Some(ip), _) => {
            debug!(peer = ?peer.map(|p| p.as_str()), %peer_addr, claimed = %ip,
                "ignoring forwarded: only the destination's waypoint may speak for a client");
            peer_addr
        }
        (None, _) => peer_addr,
    }
}

/// Looks up both ends and authorizes; `None` when no workload has the destination address.
fn admit(
    ctx: &Context,
    peer: Option<&proto::SpiffeId>,
    peer_addr: SocketAddr,
    forwarded: Option<IpAddr>,
    target: SocketAddr,
) -> Option<Admission> {
    // Taken before the state is read: if it has moved by the time the connection is registered,
    // the decision is made again there.
    let generation = ctx.view.generation();
    ctx.view.read(|state| {
        let destination = state.workload_by_ip(target.ip())?;
        let client = client_address(state, destination, peer, peer_addr, forwarded);
        let conn = Connection {
            source: peer,
            source_ip: client.ip(),
            destination_ip: target.ip(),
            destination_port: target.port(),
        };
        let (decision, dry_run) = rbac::authorize_with_dry_run(state, destination, &conn);
        if let Some(would) = dry_run {
            let decision = if would.allowed() { "allow" } else { "deny" };
            ctx.metrics.dry_run.get_or_create(&crate::telemetry::DryRunLabels { decision }).inc();
            info!(src.addr = %client, src.identity = ?peer.map(|p| p.as_str()), dst.addr = %target,
                dry_run.decision = ?would, "dry-run policies applied (not enforced)");
        }
        // Only an identity the handshake proved is reported as the source principal.
        let source = Peer::proven(state.workload_by_ip(client.ip()), peer.cloned());
        let info = ConnectionInfo {
            reporter: Reporter::Destination,
            src: client,
            dst: target,
            source,
            destination: Peer::of(destination),
            service: None,
            mtls: peer.is_some(),
        };
        Some(Admission { info, decision, generation, client })
    })
}

/// Why a service hostname authority could not be resolved.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Unresolved {
    #[error("no workload is known at {0}, the address the tunnel arrived on")]
    NoWorkload(IpAddr),
    #[error("the pod is an endpoint of no service named {0}")]
    NoService(String),
    #[error("service {host} has no port {port} the pod serves")]
    NoPort { host: String, port: u16 },
    #[error("service {host}:{port} resolves to {resolved}, one of the mesh's own ports")]
    MeshPort { host: String, port: u16, resolved: u16 },
}

impl Unresolved {
    fn status(&self) -> StatusCode {
        match self {
            Unresolved::MeshPort { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// The address a tunnel goes to in the pod at `local`: an `ip:port` authority as it is (the
/// server checked it names `local`); a `hostname:port` authority resolved among the services the
/// pod is an endpoint of — the pod's own namespace first, as Istio's ztunnel prefers — to the
/// port the pod serves that service port on (its own mapping, else the service's target port).
fn resolve_target(state: &MeshState, local: IpAddr, target: &Target) -> Result<SocketAddr, Unresolved> {
    let (host, port) = match target {
        Target::Addr(addr) => return Ok(*addr),
        Target::Service { host, port } => (host, *port),
    };
    let pod = state.workload_by_ip(local).ok_or(Unresolved::NoWorkload(local))?;
    let (service, mappings) = pod
        .services
        .iter()
        .filter_map(|(key, mappings)| Some((state.service(key)?, mappings)))
        .filter(|(service, _)| service.hostname == *host)
        .min_by_key(|(service, _)| (service.namespace != pod.namespace, service.key.as_str()))
        .ok_or_else(|| Unresolved::NoService(host.clone()))?;
    let resolved = mappings
        .iter()
        .find(|m| m.service_port == port)
        .and_then(|m| m.target_port)
        .or_else(|| service.target_port(port))
        .ok_or_else(|| Unresolved::NoPort { host: host.clone(), port })?;
    // What an ip:port authority may not name, a hostname may not resolve to (a loop into ztunnel).
    if MESH_PORTS.contains(&resolved) {
        return Err(Unresolved::MeshPort { host: host.clone(), port, resolved });
    }
    Ok(SocketAddr::new(local, resolved))
}

impl Handler for Inbound {
    /// As on the outbound side, the set-up (resolution, policy, the dial to the app) runs in its
    /// own allocation, freed before the copy: the task that lives as long as the connection
    /// holds only what the copy needs.
    fn handle(&self, connect: InboundConnect) -> impl Future<Output = ()> + Send {
        // Boxed before the task's future is built, so the request is not kept in it either.
        let establish = Box::pin(self.establish(connect));
        async move {
            let Some(Established { app, tunnel, record, registration }) = establish.await else { return };
            self.relay(copy::copy_bidirectional_until(app, tunnel, registration.revoked()), record).await;
        }
    }
}

/// An admitted connection with both sides open: what its copy needs.
struct Established {
    app: TcpStream,
    tunnel: proto::hbone::H2Stream,
    record: ConnectionRecord,
    /// Keeps the connection in the table of live connections (re-authorized on policy changes);
    /// its copy ends when the registration is revoked.
    registration: Registration,
}

impl Inbound {
    /// Resolves, authorizes and dials the app; `None` when the `CONNECT` was refused (answered
    /// and recorded then).
    async fn establish(&self, mut connect: InboundConnect) -> Option<Established> {
        let peer = connect.peer_identity.clone();
        let local = connect.local_addr.ip();
        // An ip:port is taken as it is, without a look at the state (the common case).
        let resolved = match &connect.target {
            Target::Addr(addr) => Ok(*addr),
            Target::Service { .. } => self.ctx.view.read(|state| resolve_target(state, local, &connect.target)),
        };
        let target = match resolved {
            Ok(target) => target,
            Err(why) => {
                warn!(src.identity = %peer, authority = %connect.target, pod = %self.pod.name, reason = %why,
                    "inbound refused ({})", why.status().as_u16());
                connect.reject(why.status());
                return None;
            }
        };
        let forwarded = connect
            .headers
            .get(proto::hbone::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(proto::hbone::parse_forwarded_for);

        let admitted = admit(&self.ctx, Some(&peer), connect.peer_addr, forwarded, target);
        let Some(Admission { info, decision, generation, client }) = admitted else {
            warn!(src.identity = %peer, dst.addr = %target, pod = %self.pod.name,
                "inbound refused (400): no workload known at the destination address");
            connect.reject(StatusCode::BAD_REQUEST);
            return None;
        };
        let record = ConnectionRecord::open(&self.ctx.metrics, info);
        if !decision.allowed() {
            connect.reject(StatusCode::UNAUTHORIZED);
            record.close(Outcome::Denied, 0, 0, Some(&format!("{decision:?}")));
            return None;
        }
        let registration =
            self.ctx.tracker.register(&self.ctx.view, generation, &self.pod, Some(peer), client.ip(), target);
        // The dial is cancelled if the client resets the stream, and bounded in time.
        let dial = tokio::time::timeout(APP_CONNECT_TIMEOUT, self.connect_app(client.ip(), target));
        let app = match connect.until_reset(dial).await {
            Some(Ok(Ok(s))) => s,
            Some(Ok(Err(e))) => {
                connect.reject(StatusCode::SERVICE_UNAVAILABLE);
                record.close(Outcome::ConnectFailed, 0, 0, Some(&format!("connecting to the app: {e}")));
                return None;
            }
            Some(Err(_)) => {
                connect.reject(StatusCode::SERVICE_UNAVAILABLE);
                let reason = format!("connecting to the app: no answer within {APP_CONNECT_TIMEOUT:?}");
                record.close(Outcome::ConnectFailed, 0, 0, Some(&reason));
                return None;
            }
            None => {
                record.close(Outcome::Done, 0, 0, Some("the client reset the stream before it was answered"));
                return None;
            }
        };
        let tunnel = match connect.accept() {
            Ok(t) => t,
            Err(e) => {
                record.close(Outcome::Done, 0, 0, Some(&format!("client went away before the answer: {e}")));
                return None;
            }
        };
        Some(Established { app, tunnel, record, registration })
    }

    /// Copies until both sides close, the pod goes or policy revokes the connection, then closes
    /// the record. An `async` block that owns both and awaits the copy in place stores each once
    /// (see `Outbound::connection`).
    #[allow(clippy::manual_async_fn, reason = "an async fn would store its arguments twice (see above)")]
    fn relay(&self, mut copy: copy::CopyUntil<Revocation>, record: ConnectionRecord) -> impl Future<Output = ()> + '_ {
        async move {
            match (&mut copy).await {
                // The tunnel's "sent" is what went to the client.
                Ok((t, false)) => record.close(Outcome::Done, t.received, t.sent, None),
                Ok((t, true)) => record.close(self.stop_reason(), t.received, t.sent, None),
                Err(e) => {
                    let t = e.transferred;
                    record.close(Outcome::Done, t.received, t.sent, Some(&e.to_string()))
                }
            }
        }
    }

    async fn connect_app(&self, client: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
        connect(self.pod.sockets.as_client(client)?, target).await
    }

    fn stop_reason(&self) -> Outcome {
        if self.pod.cancel.is_cancelled() { Outcome::Shutdown } else { Outcome::Revoked }
    }
}

/// Serves the pod's plaintext capture listener (15006) until a drain starts; each connection
/// holds `drain` until it ends.
pub async fn serve_plaintext(ctx: Arc<Context>, pod: Arc<Pod>, listener: TcpListener, mut drain: DrainWatcher) {
    loop {
        let (stream, peer) = tokio::select! {
            () = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(pod = %pod.name, error = %e, "accept failed on the plaintext listener");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let watcher = drain.clone();
        let (ctx, pod) = (ctx.clone(), pod.clone());
        tokio::spawn(async move {
            let _watcher = watcher;
            plaintext(ctx, pod, stream, peer).await;
        });
    }
}

async fn plaintext(ctx: Arc<Context>, pod: Arc<Pod>, stream: TcpStream, client: SocketAddr) {
    let target = match crate::outbound::original_dst(&stream) {
        Ok(t) => t,
        Err(e) => {
            debug!(pod = %pod.name, %client, error = %e, "plaintext connection without an original destination; closing");
            return;
        }
    };
    if MESH_PORTS.contains(&target.port()) {
        info!(pod = %pod.name, %client, dst.addr = %target, "plaintext connection to a mesh port refused");
        return;
    }
    let _ = stream.set_nodelay(true);
    let Some(Admission { info, decision, generation, .. }) = admit(&ctx, None, client, None, target) else {
        warn!(pod = %pod.name, %client, dst.addr = %target, "plaintext inbound refused: no workload known at the destination address");
        return;
    };
    let record = ConnectionRecord::open(&ctx.metrics, info);
    if !decision.allowed() {
        record.close(Outcome::Denied, 0, 0, Some(&format!("{decision:?}")));
        return;
    }
    let registration = ctx.tracker.register(&ctx.view, generation, &pod, None, client.ip(), target);
    let app = match pod.sockets.as_client(client.ip()) {
        Ok(socket) => Box::pin(connect(socket, target)).await,
        Err(e) => Err(e),
    };
    let app = match app {
        Ok(a) => a,
        Err(e) => {
            record.close(Outcome::ConnectFailed, 0, 0, Some(&format!("connecting to the app: {e}")));
            return;
        }
    };
    let (t, stopped, error) = copy::copy_plain_until(stream, app, registration.revoked()).await;
    let outcome = match (stopped, pod.cancel.is_cancelled()) {
        (false, _) => Outcome::Done,
        (true, true) => Outcome::Shutdown,
        (true, false) => Outcome::Revoked,
    };
    record.close(outcome, t.sent, t.received, error.map(|e| e.to_string()).as_deref());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proto::api::istio::workload::{NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload};

    use super::*;

    const POD: [u8; 4] = [10, 0, 0, 1];

    fn port(service_port: u32, target_port: u32) -> Port {
        Port { service_port, target_port, app_protocol: 0 }
    }

    fn service(namespace: &str, host: &str, ports: Vec<Port>) -> Service {
        Service {
            name: host.split('.').next().unwrap().into(),
            namespace: namespace.into(),
            hostname: host.into(),
            addresses: vec![NetworkAddress { network: String::new(), address: vec![10, 96, 0, 9], length: None }],
            ports,
            ..Default::default()
        }
    }

    /// One pod in `demo` at [`POD`], an endpoint of each `(service, its ports on the pod)`.
    fn state(services: Vec<(Service, Vec<Port>)>) -> MeshState {
        let mut s = MeshState::default();
        let pod = Workload {
            uid: "Kubernetes//Pod/demo/db-0".into(),
            name: "db-0".into(),
            namespace: "demo".into(),
            addresses: vec![POD.to_vec()],
            tunnel_protocol: TunnelProtocol::Hbone as i32,
            services: services
                .iter()
                .map(|(svc, ports)| (format!("{}/{}", svc.namespace, svc.hostname), PortList { ports: ports.clone() }))
                .collect(),
            ..Default::default()
        };
        s.insert_workload(proto::state::Workload::from_pb(pod).unwrap());
        for (svc, _) in services {
            s.insert_service(proto::state::Service::from_pb(svc).unwrap());
        }
        s
    }

    fn host(name: &str, port: u16) -> Target {
        Target::Service { host: name.into(), port }
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    #[test]
    fn an_address_authority_is_taken_as_it_is() {
        let s = state(vec![]);
        let addr: SocketAddr = "10.0.0.1:5432".parse().unwrap();
        assert_eq!(resolve_target(&s, LOCAL, &Target::Addr(addr)), Ok(addr));
    }

    #[test]
    fn a_hostname_resolves_to_the_port_the_pod_serves_the_service_port_on() {
        let s = state(vec![
            (service("demo", "db.demo.svc.cluster.local", vec![port(80, 8080)]), vec![port(80, 9090)]),
            (service("demo", "web.demo.svc.cluster.local", vec![port(81, 8081)]), vec![]),
        ]);
        // The pod's own mapping wins over the service's (a named target port, resolved per pod).
        assert_eq!(
            resolve_target(&s, LOCAL, &host("db.demo.svc.cluster.local", 80)),
            Ok("10.0.0.1:9090".parse().unwrap())
        );
        // No mapping of its own: the service's numeric target port.
        assert_eq!(
            resolve_target(&s, LOCAL, &host("web.demo.svc.cluster.local", 81)),
            Ok("10.0.0.1:8081".parse().unwrap())
        );
        assert_eq!(
            resolve_target(&s, LOCAL, &host("db.demo.svc.cluster.local", 81)),
            Err(Unresolved::NoPort { host: "db.demo.svc.cluster.local".into(), port: 81 })
        );
    }

    #[test]
    fn the_pods_own_namespace_wins_among_services_of_one_hostname() {
        let shared = "db.example.com";
        let s = state(vec![
            (service("aaa", shared, vec![port(5432, 1111)]), vec![]),
            (service("demo", shared, vec![port(5432, 2222)]), vec![]),
            (service("zzz", shared, vec![port(5432, 3333)]), vec![]),
        ]);
        assert_eq!(resolve_target(&s, LOCAL, &host(shared, 5432)), Ok("10.0.0.1:2222".parse().unwrap()));
    }

    #[test]
    fn a_hostname_the_pod_does_not_serve_is_refused() {
        let mut s = state(vec![(service("demo", "db.demo.svc.cluster.local", vec![port(80, 8080)]), vec![])]);
        // A service of that name exists, but the pod is not one of its endpoints.
        s.insert_service(
            proto::state::Service::from_pb(service("demo", "other.demo.svc.cluster.local", vec![port(80, 80)]))
                .unwrap(),
        );
        for name in ["other.demo.svc.cluster.local", "nothing.demo.svc.cluster.local"] {
            assert_eq!(resolve_target(&s, LOCAL, &host(name, 80)), Err(Unresolved::NoService(name.into())));
        }
        let elsewhere: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            resolve_target(&s, elsewhere, &host("db.demo.svc.cluster.local", 80)),
            Err(Unresolved::NoWorkload(elsewhere))
        );
    }

    #[test]
    fn a_hostname_may_not_resolve_to_a_mesh_port() {
        let s = state(vec![(service("demo", "db.demo.svc.cluster.local", vec![port(80, 15008)]), vec![])]);
        let refused = resolve_target(&s, LOCAL, &host("db.demo.svc.cluster.local", 80)).unwrap_err();
        assert_eq!(
            refused,
            Unresolved::MeshPort { host: "db.demo.svc.cluster.local".into(), port: 80, resolved: 15008 }
        );
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}

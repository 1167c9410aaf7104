//! A ztunnel handing a pod's listening sockets to its successor: the very sockets pass (what the
//! successor serves outlives the predecessor's shutdown), an app in the pod cannot join a port
//! before or after, and a successor that leaves before taking over gives the pods back.

use std::sync::Arc;
use std::time::Duration;

use proto::api::istio::workload::zds::WorkloadInfo;
use proto::certs::{CertConfig, CertManager, TokenSource};
use tokio_util::sync::CancellationToken;
use ztunnel::handoff::{HandoffServer, Predecessor, ZdsGate};
use ztunnel::netns::NetNs;
use ztunnel::pods::Proxy;
use ztunnel::xds::MeshView;

use crate::support::{Ca, ISSUER, ZTUNNEL, start_ca, target, ztunnel_token};

fn proxy(target: &proto::control::ControlPlaneTarget, token: &str) -> Arc<Proxy> {
    let certs = CertManager::new(CertConfig::new(
        target.clone(),
        TokenSource::Static(token.to_owned()),
        ZTUNNEL.parse().unwrap(),
    ))
    .unwrap();
    let view = MeshView::new(&ztunnel::xds::SUBSCRIBED, target.trust.clone());
    Proxy::new(crate::support::context(view, certs), Duration::from_secs(5))
}

/// A control plane in process, how to reach it, and node-1's ztunnel token for it.
struct ControlPlane {
    ca: Ca,
    target: proto::control::ControlPlaneTarget,
    token: String,
    _dirs: [tempfile::TempDir; 2],
}

impl ControlPlane {
    async fn start() -> ControlPlane {
        let objects = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let signer = ca::auth::TokenSigner::new(ISSUER, None).unwrap();
        let ca = start_ca(objects.path(), state.path(), &signer, "127.0.0.1:0".parse().unwrap()).await;
        let (target, _) = target(ca.grpc, state.path());
        ControlPlane { ca, target, token: ztunnel_token(&signer, "node-1"), _dirs: [objects, state] }
    }
}

/// A bind of `port` inside `pod` as an app running as root would try it to share the port.
fn squat(pod: &NetNs, port: u16) -> std::io::Result<()> {
    pod.run(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_port(true)?;
        s.set_reuse_address(true)?;
        s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        s.listen(8)
    })
}

/// Asks the pod's DNS port (its loopback, 15053) a question; the answer's id, if one comes.
async fn ask_dns(pod: &NetNs) -> Option<u16> {
    let socket = pod.udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    // Header: id 0x4a11, recursion desired, one question; then `x.example.` A IN.
    let mut q = vec![0x4a, 0x11, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x01x\x07example\x00\x00\x01\x00\x01");
    socket.send_to(&q, ("127.0.0.1", ztunnel::dns::DNS_PORT)).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), socket.recv_from(&mut buf)).await.ok()?.ok()?;
    (n >= 2).then(|| u16::from_be_bytes([buf[0], buf[1]]))
}

#[tokio::test]
async fn a_successor_serves_the_very_sockets_its_predecessor_handed_over() {
    let cp = ControlPlane::start().await;
    let (target, token) = (&cp.target, &cp.token);

    let pod = NetNs::new_isolated().unwrap();
    pod.run(|| {
        let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status()?;
        assert!(up.success());
        Ok(())
    })
    .unwrap();
    let info = WorkloadInfo { name: "app".into(), namespace: "demo".into(), service_account: "app".into() };

    let old = proxy(target, token);
    old.add_netns("uid-1", Some(&info), pod.clone()).unwrap();
    assert_eq!(ask_dns(&pod).await, Some(0x4a11), "the predecessor does not answer the pod's DNS");
    for port in [15001, 15006, 15008] {
        let err = squat(&pod, port).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "an app joined port {port}");
    }

    let dir = tempfile::tempdir().unwrap();
    let path = ztunnel::handoff::default_path(&dir.path().join("ztunnel.sock"));
    assert!(Predecessor::take_over(&path, "node-1").await.unwrap().is_none(), "nothing runs yet");
    let (gate, handed_over, stop) = (Arc::new(ZdsGate::default()), CancellationToken::new(), CancellationToken::new());
    let server = HandoffServer::bind(&path, "node-1").unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let serving = tokio::spawn(server.serve(old.clone(), gate, handed_over.clone(), stop.clone()));

    // A ztunnel of another node gets nothing.
    let err = Predecessor::take_over(&path, "node-2").await.unwrap_err();
    assert!(matches!(err, ztunnel::handoff::HandoffError::Packet { .. }), "{err}");

    // A successor that leaves before taking over: the predecessor keeps its pods and serves the
    // next one.
    let first = Predecessor::take_over(&path, "node-1").await.unwrap().unwrap();
    assert_eq!(first.pods.keys().collect::<Vec<_>>(), ["uid-1"]);
    drop(first);

    let mut predecessor = Predecessor::take_over(&path, "node-1").await.unwrap().unwrap();
    assert_eq!(predecessor.pid, Some(std::process::id() as i32));
    let new = proxy(target, token);
    new.inherit(std::mem::take(&mut predecessor.pods));
    new.add_netns("uid-1", Some(&info), pod.clone()).unwrap();
    assert!(new.has("uid-1"));
    predecessor.taken().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), handed_over.cancelled()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), serving).await.unwrap().unwrap();

    // The predecessor drains and closes its copies; the sockets live on in the successor, which
    // answers on them, and still no app can join them.
    old.shutdown().await;
    assert_eq!(ask_dns(&pod).await, Some(0x4a11), "the successor does not answer on the handed DNS socket");
    let connected = pod.run(|| std::net::TcpStream::connect(("127.0.0.1", 15006)).map(|_| ()));
    assert!(connected.is_ok(), "15006 closed with the predecessor: {connected:?}");
    for port in [15001, 15006, 15008] {
        let err = squat(&pod, port).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "an app joined port {port} after the handover");
    }
    // Removing the pod from the successor closes the sockets for good.
    assert!(new.remove("uid-1"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = pod.run(|| std::net::TcpStream::connect(("127.0.0.1", 15006)).map(|_| ()));
    assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
    stop.cancel();
    cp.ca.stop().await;
}

/// Sockets handed for one namespace are not used for another: the successor binds anew.
#[tokio::test]
async fn handed_sockets_are_checked_against_the_pods_namespace() {
    let cp = ControlPlane::start().await;
    let (target, token) = (&cp.target, &cp.token);
    let info = WorkloadInfo { name: "app".into(), namespace: "demo".into(), service_account: "app".into() };

    let (first, second) = (NetNs::new_isolated().unwrap(), NetNs::new_isolated().unwrap());
    let old = proxy(target, token);
    old.add_netns("uid-1", Some(&info), first.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handoff.sock");
    let stop = CancellationToken::new();
    let server = HandoffServer::bind(&path, "node-1").unwrap();
    tokio::spawn(server.serve(old.clone(), Arc::new(ZdsGate::default()), CancellationToken::new(), stop.clone()));
    let mut predecessor = Predecessor::take_over(&path, "node-1").await.unwrap().unwrap();
    let handed = predecessor.pods.remove("uid-1").unwrap();
    let err = handed.into_listeners(&second).unwrap_err();
    assert!(err.to_string().starts_with("handed for namespace inode"), "{err}");
    // Re-handed, and told it is the first namespace: each socket is checked and passes.
    drop(predecessor);
    let mut predecessor = Predecessor::take_over(&path, "node-1").await.unwrap().unwrap();
    let listeners = predecessor.pods.remove("uid-1").unwrap().into_listeners(&first).unwrap();
    assert_eq!(listeners.outbound.local_addr().unwrap().port(), 15001);
    assert_eq!(listeners.hbone.local_addr().unwrap().port(), 15008);
    assert!(listeners.dns.is_some());
    stop.cancel();
    cp.ca.stop().await;
}

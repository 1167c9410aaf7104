//! Security properties of the HBONE mTLS handshake, each proved with real certificates: who is
//! refused, when, and that swaps of certificates and bundles take effect on the next handshake
//! without disturbing live connections. Also: hostile bytes never take the server down.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::hbone::pool::{ConnectRequest, Pool, PoolConfig, PoolError};
use proto::hbone::server::ServerConfig;
use proto::testing::{TestCa, Validity};
use proto::tls::{Credential, TrustBundle};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// Opens a tunnel to an echo upstream and checks one round trip.
async fn round_trip(
    pool: &Pool,
    cred: Arc<Credential>,
    server: SocketAddr,
    expect: Vec<proto::SpiffeId>,
) -> Result<(), PoolError> {
    let upstream = echo_upstream().await;
    let mut s = pool.connect(ConnectRequest::new(cred, server, expect, upstream)).await?;
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end_timeout(&mut s, WAIT).await, b"ping");
    Ok(())
}

/// The rustls error inside a pool error, if the failure was a TLS one.
fn tls_error(e: &PoolError) -> Option<&rustls::Error> {
    match e {
        PoolError::Tls { source, .. } => source.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
    }
}

async fn forward_server(
    cred: Arc<Credential>,
    trust: Arc<proto::tls::SharedTrustBundle>,
) -> (TestServer, Arc<Forward>) {
    let forward = Arc::new(Forward::default());
    (TestServer::start(cred, trust, ServerConfig::default(), forward.clone()).await, forward)
}

#[tokio::test]
async fn mutual_identities_come_from_the_handshake() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let (server, forward) = forward_server(server_cred, trust.clone()).await;
    let pool = Pool::new(PoolConfig::default(), trust);
    round_trip(&pool, ca.credential(id("client").as_str()), server.addr, vec![id("server")]).await.unwrap();
    assert_eq!(forward.seen()[0].peer_identity, id("client"));
}

#[tokio::test]
async fn refuses_server_whose_identity_is_not_expected() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("impostor");
    let (server, forward) = forward_server(server_cred, trust.clone()).await;
    let pool = Pool::new(PoolConfig::default(), trust);
    let err = round_trip(&pool, ca.credential(id("client").as_str()), server.addr, vec![id("server"), id("waypoint")])
        .await
        .unwrap_err();
    let tls = tls_error(&err).unwrap_or_else(|| panic!("expected a TLS refusal, got {err}"));
    assert!(matches!(tls, rustls::Error::InvalidCertificate(rustls::CertificateError::Other(_))), "{tls:?}");
    assert!(err.to_string().contains("not one of the expected identities"), "{err}");
    assert!(forward.seen().is_empty());
    // The expected identity set is part of the pool key: asking for the right one works.
    round_trip(&pool, ca.credential(id("client").as_str()), server.addr, vec![id("impostor")]).await.unwrap();
}

#[tokio::test]
async fn refuses_client_from_another_trust_domain() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let (server, forward) = forward_server(server_cred, trust.clone()).await;
    let pool = Pool::new(PoolConfig::default(), trust);
    // Same CA, so the chain verifies: only the trust domain check can refuse it.
    let foreign = Credential::new(ca.issue(&"spiffe://other.domain/ns/test/sa/client".parse().unwrap()));
    let err = round_trip(&pool, foreign, server.addr, vec![id("server")]).await.unwrap_err();
    // TLS 1.3: the client learns of the refusal after its handshake, so it surfaces as a TLS
    // alert or as the HTTP/2 handshake failing; either way no tunnel opens.
    assert!(matches!(err, PoolError::Tls { .. } | PoolError::Http2 { .. }), "{err}");
    assert!(forward.seen().is_empty(), "a foreign trust domain reached the handler");
}

#[tokio::test]
/// The client side has no list of trust domains: it expects exact identities, which carry the
/// trust domain. A server certificate with the expected namespace and service account but another
/// trust domain, chained to a trusted root, is refused because that full identity is not expected.
async fn refuses_server_from_another_trust_domain_signed_by_a_trusted_ca() {
    init_tracing();
    let ca = TestCa::new();
    let trust = ca.shared_bundle();
    let foreign = "spiffe://other.domain/ns/test/sa/server";
    assert_eq!(
        id("server").as_str().strip_prefix("spiffe://cluster.local"),
        foreign.strip_prefix("spiffe://other.domain")
    );
    let server_cred = Credential::new(ca.issue(&foreign.parse().unwrap()));
    let (server, forward) = forward_server(server_cred, trust.clone()).await;
    let pool = Pool::new(PoolConfig::default(), trust);
    let err =
        round_trip(&pool, ca.credential(id("client").as_str()), server.addr, vec![id("server")]).await.unwrap_err();
    let tls = tls_error(&err).unwrap_or_else(|| panic!("expected a TLS refusal, got {err}"));
    assert!(matches!(tls, rustls::Error::InvalidCertificate(rustls::CertificateError::Other(_))), "{tls:?}");
    let reason = err.to_string();
    assert!(reason.contains(&format!("{foreign} is not one of the expected identities")), "{reason}");
    assert!(forward.seen().is_empty());
}

#[tokio::test]
async fn refuses_certificates_outside_their_validity() {
    init_tracing();
    for validity in [Validity::Expired, Validity::NotYetValid] {
        // Bad server certificate: the client refuses.
        let ca = TestCa::new();
        let trust = ca.shared_bundle();
        let bad_server = Credential::new(ca.issue_with(&[id("server").as_str()], validity));
        let (server, _) = forward_server(bad_server, trust.clone()).await;
        let pool = Pool::new(PoolConfig::default(), trust.clone());
        let err =
            round_trip(&pool, ca.credential(id("client").as_str()), server.addr, vec![id("server")]).await.unwrap_err();
        let tls = tls_error(&err).unwrap_or_else(|| panic!("{validity:?}: expected TLS refusal, got {err}"));
        let expected = match validity {
            Validity::Expired => {
                matches!(tls, rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. }))
            }
            _ => matches!(tls, rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYetContext { .. })),
        };
        assert!(expected, "{validity:?}: {tls:?}");

        // Bad client certificate: the server refuses.
        let (good_server, forward) = forward_server(ca.credential(id("server").as_str()), trust.clone()).await;
        let bad_client = Credential::new(ca.issue_with(&[id("client").as_str()], validity));
        let err = round_trip(&pool, bad_client, good_server.addr, vec![id("server")]).await.unwrap_err();
        assert!(matches!(err, PoolError::Tls { .. } | PoolError::Http2 { .. }), "{validity:?}: {err}");
        assert!(forward.seen().is_empty());
    }
}

#[tokio::test]
async fn refuses_chains_from_an_untrusted_root() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let (server, forward) = forward_server(server_cred, trust.clone()).await;
    let rogue = TestCa::new();
    let pool = Pool::new(PoolConfig::default(), trust.clone());
    let err =
        round_trip(&pool, rogue.credential(id("client").as_str()), server.addr, vec![id("server")]).await.unwrap_err();
    assert!(matches!(err, PoolError::Tls { .. } | PoolError::Http2 { .. }), "{err}");
    assert!(forward.seen().is_empty());

    // And a client that trusts only the rogue root refuses our server.
    let rogue_pool = Pool::new(PoolConfig::default(), rogue.shared_bundle());
    let err = round_trip(&rogue_pool, rogue.credential(id("client").as_str()), server.addr, vec![id("server")])
        .await
        .unwrap_err();
    assert!(
        matches!(tls_error(&err), Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))),
        "{err}"
    );
    drop(ca);
}

#[tokio::test]
async fn refuses_leaf_with_several_uri_sans() {
    init_tracing();
    let ca = TestCa::new();
    let (chain, key) = ca.issue_raw(&[id("a").as_str(), id("b").as_str()], Validity::Current);
    let err = proto::tls::WorkloadCert::from_der(chain, key).unwrap_err();
    assert!(err.to_string().contains("2 URI subject alternative names"), "{err}");
    let (chain, key) = ca.issue_raw(&["spiffe://cluster.local/not/a/mesh/id"], Validity::Current);
    assert!(proto::tls::WorkloadCert::from_der(chain, key).is_err());
}

#[tokio::test]
async fn trust_bundle_with_two_roots_accepts_both_during_rotation() {
    init_tracing();
    let old = TestCa::new();
    let new = TestCa::new();
    let both = old.bundle().merged(&new.bundle());
    assert_eq!(both.roots().len(), 2);
    let trust = proto::tls::SharedTrustBundle::new(both);
    let (server, forward) = forward_server(old.credential(id("server").as_str()), trust.clone()).await;
    let pool = Pool::new(PoolConfig::default(), trust);
    round_trip(&pool, old.credential(id("old-client").as_str()), server.addr, vec![id("server")]).await.unwrap();
    round_trip(&pool, new.credential(id("new-client").as_str()), server.addr, vec![id("server")]).await.unwrap();
    let ids: Vec<_> = forward.seen().iter().map(|s| s.peer_identity.clone()).collect();
    assert_eq!(ids, vec![id("old-client"), id("new-client")]);
}

#[tokio::test]
async fn swapped_server_certificate_is_used_by_the_next_handshake_only() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server-v1");
    let (server, _) = forward_server(server_cred.clone(), trust.clone()).await;
    let upstream = echo_upstream().await;
    let client = ca.credential(id("client").as_str());

    // A live stream on a connection made with the old certificate.
    let pool_v1 = Pool::new(PoolConfig::default(), trust.clone());
    let mut live = pool_v1
        .connect(ConnectRequest::new(client.clone(), server.addr, vec![id("server-v1")], upstream))
        .await
        .unwrap();
    live.write_all(b"before ").await.unwrap();

    // A client that only accepts the new identity is refused until the swap...
    let pool_v2 = Pool::new(PoolConfig::default(), trust.clone());
    assert!(round_trip(&pool_v2, client.clone(), server.addr, vec![id("server-v2")]).await.is_err());
    server_cred.replace(ca.issue(&id("server-v2")));
    // ...and accepted right after it: the next handshake presents the new certificate.
    round_trip(&pool_v2, client.clone(), server.addr, vec![id("server-v2")]).await.unwrap();

    // The live connection is untouched.
    live.write_all(b"after").await.unwrap();
    live.shutdown().await.unwrap();
    assert_eq!(read_to_end_timeout(&mut live, WAIT).await, b"before after");
}

#[tokio::test]
async fn swapped_client_certificate_is_used_by_the_next_handshake() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let (server, forward) = forward_server(server_cred, trust.clone()).await;
    let pool = Pool::new(PoolConfig::default(), trust);
    let client = ca.credential(id("client").as_str());
    let first = client.current();
    round_trip(&pool, client.clone(), server.addr, vec![id("server")]).await.unwrap();
    // Rotation: same identity, new certificate and key.
    client.replace(ca.issue(&id("client")));
    assert_ne!(first.chain()[0], client.current().chain()[0]);
    round_trip(&pool, client.clone(), server.addr, vec![id("server")]).await.unwrap();
    assert_eq!(forward.seen().len(), 2);
}

#[tokio::test]
async fn swapped_trust_bundle_applies_to_new_handshakes() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let (server, forward) = forward_server(server_cred, trust.clone()).await;
    let other = TestCa::new();
    let pool = Pool::new(PoolConfig::default(), trust.clone());
    let newcomer = other.credential(id("newcomer").as_str());
    assert!(round_trip(&pool, newcomer.clone(), server.addr, vec![id("server")]).await.is_err());
    trust.replace(ca.bundle().merged(&other.bundle()));
    round_trip(&pool, newcomer, server.addr, vec![id("server")]).await.unwrap();
    assert_eq!(forward.seen().len(), 1);
}

#[tokio::test]
async fn server_drops_a_peer_that_stalls_mid_handshake() {
    init_tracing();
    let (_ca, server_cred, trust) = ca_and_server("server");
    let config = ServerConfig { handshake_timeout: Duration::from_millis(300), ..ServerConfig::default() };
    let server = TestServer::start(server_cred, trust, config, Arc::new(Forward::default())).await;

    // Silent peer, and a peer that stops after the first bytes of a TLS record.
    for opening in [&b""[..], &[0x16, 0x03, 0x01, 0x02][..]] {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(opening).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
        let n = read.expect("server kept a stalled handshake open").unwrap_or(0);
        assert_eq!(n, 0, "server sent data to a stalled peer");
        assert!(started.elapsed() >= Duration::from_millis(250), "closed before the timeout: {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn client_gives_up_on_a_server_that_stalls_mid_handshake() {
    init_tracing();
    let ca = TestCa::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts TCP and never says a word.
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let config = PoolConfig { connect_timeout: Duration::from_millis(300), ..PoolConfig::default() };
    let pool = Pool::new(config, ca.shared_bundle());
    let err = pool
        .connect(ConnectRequest::new(ca.credential(id("client").as_str()), addr, vec![id("server")], addr))
        .await
        .unwrap_err();
    assert!(matches!(err, PoolError::Timeout { after, .. } if after == Duration::from_millis(300)), "{err}");
    assert_eq!(pool.connection_count(), 0);
}

#[tokio::test]
async fn garbage_instead_of_tls_is_dropped_and_the_server_keeps_serving() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let (server, _) = forward_server(server_cred, trust.clone()).await;
    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        &[0x16, 0x03, 0x03, 0xff, 0xff, 0x01, 0x00, 0xff, 0xfb],
        &[0u8; 4096],
    ];
    for bytes in garbage {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let _ = tcp.write_all(bytes).await;
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(WAIT, tcp.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "server kept a garbage connection open");
    }
    let pool = Pool::new(PoolConfig::default(), trust);
    round_trip(&pool, ca.credential(id("client").as_str()), server.addr, vec![id("server")]).await.unwrap();
}

#[tokio::test]
async fn malformed_http2_frames_close_only_that_connection() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let (server, forward) = forward_server(server_cred, trust.clone()).await;
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let empty_settings: &[u8] = &[0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    // (case, bytes, whether we then end our side): a truncated frame is only detectable once the
    // peer's stream ends; the others must be refused on sight.
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("truncated frame header", [preface, empty_settings, &[0, 0, 10, 0x1]].concat(), true),
        ("truncated frame payload", [preface, empty_settings, &[0, 0, 64, 0x0, 0x0, 0, 0, 0, 1, 1, 2]].concat(), true),
        // A DATA frame declaring 16 MiB - 1, over the advertised maximum frame size.
        (
            "oversized frame",
            [preface, empty_settings, &[0xff, 0xff, 0xff, 0x0, 0x0, 0, 0, 0, 1], &[0u8; 64]].concat(),
            false,
        ),
        // HEADERS whose HPACK block is garbage.
        (
            "bad hpack",
            [preface, empty_settings, &[0, 0, 4, 0x1, 0x5, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]].concat(),
            false,
        ),
        ("no preface", b"this is not http/2 at all".to_vec(), false),
    ];
    for (name, bytes, end_ours) in cases {
        let tls =
            proto::tls::client_config(ca.credential(id("fuzz").as_str()), trust.clone(), vec![id("server")]).unwrap();
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(tls)
            .connect(rustls_pki_types::ServerName::IpAddress(server.addr.ip().into()), tcp)
            .await
            .unwrap();
        tls.write_all(&bytes).await.unwrap();
        tls.flush().await.unwrap();
        if end_ours {
            tls.shutdown().await.unwrap();
        }
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(WAIT, tls.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "{name}: server kept the connection open");
    }
    assert!(forward.seen().is_empty());
    let pool = Pool::new(PoolConfig::default(), trust);
    round_trip(&pool, ca.credential(id("client").as_str()), server.addr, vec![id("server")]).await.unwrap();
}

#[test]
fn trust_bundle_rejects_empty_and_garbage_pem() {
    assert!(matches!(TrustBundle::from_pem(b""), Err(proto::tls::TlsError::EmptyBundle)));
    assert!(TrustBundle::from_pem(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").is_err());
    let ca = TestCa::new();
    let bundle = TrustBundle::from_pem(ca.root_pem().as_bytes()).unwrap();
    assert_eq!(bundle.roots(), std::slice::from_ref(ca.root()));
}

/// A TLS 1.2 ClientHello (no `supported_versions` extension, so TLS 1.2 is the highest version
/// offered), as an old client would send it. Built by hand: the mesh's TLS library is compiled
/// without TLS 1.2 at all.
fn tls12_client_hello() -> Vec<u8> {
    let ext = |kind: u16, body: &[u8]| [&kind.to_be_bytes()[..], &(body.len() as u16).to_be_bytes(), body].concat();
    let extensions = [
        // supported_groups: x25519, secp256r1.
        ext(0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]),
        // ec_point_formats: uncompressed.
        ext(0x000b, &[0x01, 0x00]),
        // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256.
        ext(0x000d, &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01]),
    ]
    .concat();
    // ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-RSA-AES128-GCM-SHA256.
    let suites = [0xc0, 0x2b, 0xc0, 0x2f];
    let mut hello = vec![0x03, 0x03];
    hello.extend_from_slice(&[0x42; 32]);
    hello.push(0); // no session id
    hello.extend_from_slice(&(suites.len() as u16).to_be_bytes());
    hello.extend_from_slice(&suites);
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend_from_slice(&extensions);
    let len = hello.len() as u32;
    let handshake = [&[0x01][..], &len.to_be_bytes()[1..], &hello].concat();
    [&[0x16, 0x03, 0x01][..], &(handshake.len() as u16).to_be_bytes(), &handshake].concat()
}

#[tokio::test]
async fn refuses_a_tls12_peer() {
    init_tracing();
    let (_ca, server_cred, trust) = ca_and_server("server");
    let (server, forward) = forward_server(server_cred, trust).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&tls12_client_hello()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await.unwrap().unwrap();
    // One fatal alert, protocol_version (70), and the connection closed: no ServerHello.
    assert_eq!(answer, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 70], "{answer:02x?}");
    assert!(forward.seen().is_empty());
}

//! The certificate authority end to end: a running control plane, real TLS gRPC clients, real
//! CSRs. Issuance (SVID profile, `openssl verify`), every refusal, admin API, root rotation with
//! live HBONE handshakes, restart and a kill -9 in the middle of issuing, 1,000 concurrent CSRs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::support::{ADMIN, Mesh, ZTUNNEL, credential, csr, csr_with, id, request};
use prost::Message;
use proto::api::ambient::ca::v1 as pb;
use proto::api::ambient::ca::v1::ca_admin_client::CaAdminClient;
use proto::api::envoy::config::core::v3::Node;
use proto::api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use proto::api::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use proto::api::type_url::TRUST_BUNDLE;
use proto::hbone::pool::{ConnectRequest, Pool, PoolConfig};
use proto::hbone::server::{Handler, InboundConnect, Server, ServerConfig};
use proto::testing::eventually;
use proto::tls::{Credential, SharedTrustBundle, TrustBundle};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use x509_parser::prelude::*;

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

fn pod(name: &str, sa: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: []\nstatus:\n  podIP: {ip}\n"
    )
}

async fn mesh() -> Mesh {
    mesh_with(|_| {}).await
}

async fn mesh_with(configure: impl FnOnce(&mut ca::Config)) -> Mesh {
    let mesh = Mesh::new();
    mesh.write("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n");
    mesh.write(
        "pods.yaml",
        &[pod("client", "client", "node-1", "10.0.1.1"), pod("server", "server", "node-2", "10.0.2.1")].join("---\n"),
    );
    let mut config = mesh.config();
    configure(&mut config);
    let mesh = mesh.boot_with(config).await;
    mesh.wait_ready().await;
    mesh
}

fn admin_client(mesh: &Mesh) -> CaAdminClient<tonic::transport::Channel> {
    CaAdminClient::new(mesh.channel(Some(mesh.admin_credential())))
}

/// The PEM blocks of one entry, as written.
fn pem_blocks(entry: &str) -> Vec<String> {
    entry.split_inclusive("-----END CERTIFICATE-----\n").map(str::to_owned).collect()
}

/// The roots (DER) in the last entry of an answer.
fn roots_in(chain: &[String]) -> Vec<Vec<u8>> {
    ::pem::parse_many(chain.last().unwrap()).unwrap().into_iter().map(::pem::Pem::into_contents).collect()
}

fn der_chain(chain: &[String]) -> Vec<Vec<u8>> {
    chain.iter().map(|p| ::pem::parse(p).unwrap().into_contents()).collect()
}

#[tokio::test]
async fn node_proxy_gets_an_svid_that_passes_openssl_verify() {
    let mesh = mesh().await;
    let token = mesh.token("istio-system", "ztunnel", Some("node-1"));
    let (_key, pem) = csr(&[CLIENT]);
    let started = std::time::SystemTime::now();
    let chain = mesh
        .ca_client(Some(token), None)
        .create_certificate(request(pem, 3600, Some(CLIENT)))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    let ders = der_chain(&chain);

    // SVID profile.
    let (_, leaf) = X509Certificate::from_der(&ders[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => *u,
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect();
    assert_eq!(uris, [CLIENT]);
    assert!(san.critical, "SAN must be critical with an empty subject");
    assert!(leaf.subject().iter().next().is_none(), "empty subject");
    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let issued_at = started.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((na - issued_at - 3600).abs() <= 2, "lifetime is the requested hour: {}", na - issued_at);
    assert!((issued_at - nb - 60).abs() <= 2, "backdated one minute for clock skew");
    // Chain order: leaf issued by the intermediate, intermediate by the root, root self-signed.
    let (_, int) = X509Certificate::from_der(&ders[1]).unwrap();
    let (_, root) = X509Certificate::from_der(&ders[2]).unwrap();
    assert_eq!(leaf.issuer(), int.subject());
    assert_eq!(int.issuer(), root.subject());
    assert_eq!(root.issuer(), root.subject());
    assert!(int.basic_constraints().unwrap().unwrap().value.ca);

    // openssl agrees.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("leaf.pem"), &chain[0]).unwrap();
    std::fs::write(dir.path().join("int.pem"), &chain[1]).unwrap();
    std::fs::write(dir.path().join("root.pem"), &chain[2]).unwrap();
    let out = Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "int.pem",
            "leaf.pem",
        ])
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "leaf.pem: OK", "{}", String::from_utf8_lossy(&out.stderr));
    // The root is the one the CA publishes.
    assert_eq!(std::fs::read_to_string(mesh.state.path().join("root-cert.pem")).unwrap(), chain[2]);

    // Default lifetime 24 h when none is asked.
    let token = mesh.token("demo", "client", None);
    let (_key, pem) = csr(&[CLIENT]);
    let chain = mesh.ca_client(Some(token), None).create_certificate(request(pem, 0, None)).await.unwrap().into_inner();
    let ders = der_chain(&chain.cert_chain);
    let (_, leaf) = X509Certificate::from_der(&ders[0]).unwrap();
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(life, 24 * 3600 + 60);
    mesh.shutdown().await;
}

fn weak_rsa_csr() -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("openssl")
        .current_dir(dir.path())
        .args(["req", "-new", "-newkey", "rsa:1024", "-nodes", "-keyout", "k.pem", "-subj", "/"])
        .args(["-addext", &format!("subjectAltName=URI:{CLIENT}"), "-out", "csr.pem"])
        .output()
        .expect("openssl is installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(dir.path().join("csr.pem")).unwrap()
}

#[tokio::test]
async fn every_refusal_has_a_clear_status_and_is_counted() {
    let mesh = mesh().await;
    let ztunnel_node1 = mesh.token("istio-system", "ztunnel", Some("node-1"));
    let ztunnel_node2 = mesh.token("istio-system", "ztunnel", Some("node-2"));
    let client_token = mesh.token("demo", "client", None);
    let other_app = mesh.token("demo", "server", Some("node-1"));
    let signer = &mesh.signer;
    let req = |aud: &'static str| ca::auth::TokenRequest {
        namespace: "demo",
        service_account: "client",
        pod: None,
        node: None,
        audience: aud,
        ttl: Duration::from_secs(600),
    };
    let expired =
        signer.mint_issued_at(&req(ca::auth::DEFAULT_AUDIENCE), jsonwebtoken::get_current_timestamp() - 7200).unwrap();
    let wrong_audience = signer.mint(&req("kubernetes")).unwrap();
    let forged = ca::auth::TokenSigner::new(crate::support::ISSUER, None)
        .unwrap()
        .mint(&req(ca::auth::DEFAULT_AUDIENCE))
        .unwrap();

    let (key, good_csr) = csr(&[CLIENT]);
    let mut tampered = ::pem::parse(&good_csr).unwrap().into_contents();
    let n = tampered.len();
    tampered[n - 3] ^= 0x40;
    let bad_signature = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", tampered));
    let p521 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
    let _ = key;

    type Case = (&'static str, Option<String>, String, i64, Option<&'static str>, Code, &'static str);
    let cases: Vec<Case> = vec![
        (
            "CSR for another identity",
            Some(client_token.clone()),
            csr(&["spiffe://cluster.local/ns/demo/sa/server"]).1,
            0,
            None,
            Code::Unauthenticated,
            "identity_mismatch",
        ),
        (
            "impersonation by a non-node account",
            Some(other_app),
            good_csr.clone(),
            0,
            Some(CLIENT),
            Code::Unauthenticated,
            "not_node_account",
        ),
        (
            "impersonating a pod on another node",
            Some(ztunnel_node2),
            good_csr.clone(),
            0,
            Some(CLIENT),
            Code::Unauthenticated,
            "pod_not_on_node",
        ),
        (
            "impersonation not matching the CSR",
            Some(ztunnel_node1.clone()),
            good_csr.clone(),
            0,
            Some("spiffe://cluster.local/ns/demo/sa/server"),
            Code::Unauthenticated,
            "identity_mismatch",
        ),
        ("expired token", Some(expired), good_csr.clone(), 0, None, Code::Unauthenticated, "invalid_token"),
        ("forged token", Some(forged), good_csr.clone(), 0, None, Code::Unauthenticated, "invalid_token"),
        ("wrong audience", Some(wrong_audience), good_csr.clone(), 0, None, Code::Unauthenticated, "invalid_token"),
        ("no credentials", None, good_csr.clone(), 0, None, Code::Unauthenticated, "no_credentials"),
        (
            "malformed PEM",
            Some(client_token.clone()),
            "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n".into(),
            0,
            None,
            Code::InvalidArgument,
            "malformed_csr",
        ),
        (
            "bad CSR signature",
            Some(client_token.clone()),
            bad_signature,
            0,
            None,
            Code::InvalidArgument,
            "bad_signature",
        ),
        ("weak RSA key", Some(client_token.clone()), weak_rsa_csr(), 0, None, Code::InvalidArgument, "weak_key"),
        (
            "unsupported curve",
            Some(client_token.clone()),
            csr_with(&[CLIENT], &p521),
            0,
            None,
            Code::InvalidArgument,
            "weak_key",
        ),
        (
            "TTL over the maximum",
            Some(client_token.clone()),
            good_csr.clone(),
            91 * 24 * 3600,
            None,
            Code::InvalidArgument,
            "ttl",
        ),
        ("negative TTL", Some(client_token.clone()), good_csr.clone(), -5, None, Code::InvalidArgument, "ttl"),
    ];
    let mut expected_counts: BTreeMap<&str, u64> = BTreeMap::new();
    for (what, token, pem, ttl, impersonate, code, reason) in cases {
        let err = mesh.ca_client(token, None).create_certificate(request(pem, ttl, impersonate)).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        if code == Code::Unauthenticated {
            // The reason is logged, not told.
            assert!(err.message().ends_with("failed"), "{what}: {}", err.message());
        }
        *expected_counts.entry(reason).or_default() += 1;
    }
    // A non-string ImpersonatedIdentity is an invalid argument too.
    let mut bad_meta = request(good_csr.clone(), 0, None);
    bad_meta.metadata = Some(prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(1.0)) },
        )]
        .into(),
    });
    let err = mesh.ca_client(Some(ztunnel_node1.clone()), None).create_certificate(bad_meta).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    *expected_counts.entry("bad_metadata").or_default() += 1;

    // The right request still works, and the metrics add up.
    mesh.ca_client(Some(ztunnel_node1), None).create_certificate(request(good_csr, 0, Some(CLIENT))).await.unwrap();
    let (_, metrics) = mesh.admin_get("/metrics").await;
    for (reason, count) in &expected_counts {
        let line = format!("ca_certificate_requests_refused_total{{reason=\"{reason}\"}} {count}");
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("ca_certificates_issued_total 1\n"), "{metrics}");
    let total: u64 = expected_counts.values().sum::<u64>() + 1;
    assert!(metrics.contains(&format!("ca_certificate_requests_total {total}\n")), "{metrics}");
    assert!(metrics.contains("ca_signing_duration_seconds_count 1\n"), "{metrics}");
    mesh.shutdown().await;
}

#[tokio::test]
async fn a_client_certificate_renews_its_own_identity_only() {
    let mesh = mesh().await;
    let (key, pem) = csr(&[CLIENT]);
    let chain = mesh
        .ca_client(Some(mesh.token("demo", "client", None)), None)
        .create_certificate(request(pem, 0, None))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    let cred = credential(&chain, &key);
    // Renewal with the certificate alone.
    let (_, pem) = csr(&[CLIENT]);
    mesh.ca_client(None, Some(cred.clone())).create_certificate(request(pem, 0, None)).await.unwrap();
    // Not another identity, and no impersonation.
    let (_, pem) = csr(&["spiffe://cluster.local/ns/demo/sa/server"]);
    let err =
        mesh.ca_client(None, Some(cred.clone())).create_certificate(request(pem.clone(), 0, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = mesh
        .ca_client(None, Some(cred))
        .create_certificate(request(pem, 0, Some("spiffe://cluster.local/ns/demo/sa/server")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    mesh.shutdown().await;
}

#[tokio::test]
async fn admin_api_needs_an_admin_identity_and_lists_issued_certificates() {
    let mesh = mesh().await;
    let ztunnel = mesh.token("istio-system", "ztunnel", Some("node-1"));
    let (_, pem) = csr(&[CLIENT]);
    let issued =
        mesh.ca_client(Some(ztunnel.clone()), None).create_certificate(request(pem, 600, Some(CLIENT))).await.unwrap();
    let ders = der_chain(&issued.get_ref().cert_chain);
    let (_, leaf) = X509Certificate::from_der(&ders[0]).unwrap();
    let serial = leaf.raw_serial_as_string().replace(':', "");

    // No credentials; a non-admin identity (token or certificate).
    let mut anonymous = CaAdminClient::new(mesh.channel(None));
    assert_eq!(anonymous.get_status(pb::GetStatusRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    let mut not_admin = CaAdminClient::with_interceptor(mesh.channel(None), proto::control::with_token(Some(ztunnel)));
    let err = not_admin.rotate_intermediate(pb::RotateIntermediateRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // An admin token works as well as the admin certificate.
    let admin_token = mesh.token("istio-system", "mesh-admin", None);
    let mut by_token =
        CaAdminClient::with_interceptor(mesh.channel(None), proto::control::with_token(Some(admin_token)));
    let status = by_token.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.roots.len(), 1);
    assert_eq!(status.roots[0].state, pb::RootState::Active as i32);

    let mut admin = admin_client(&mesh);
    let list = admin
        .list_certificates(pb::ListCertificatesRequest { include_expired: false, identity: CLIENT.into() })
        .await
        .unwrap()
        .into_inner()
        .certificates;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].serial_hex, serial);
    assert_eq!(list[0].node, "node-1");
    assert_eq!(list[0].requested_by, ZTUNNEL);
    assert_eq!(list[0].not_after_unix, leaf.validity().not_after.timestamp());

    // Rotating the intermediate keeps the root; new leaves chain through the new intermediate.
    let before = admin.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    let after = admin.rotate_intermediate(pb::RotateIntermediateRequest {}).await.unwrap().into_inner();
    assert_ne!(before.signer_fingerprint_sha256, after.signer_fingerprint_sha256);
    assert_eq!(before.bundle, after.bundle);
    let (_, pem) = csr(&[CLIENT]);
    let token = mesh.token("demo", "client", None);
    let chain = mesh
        .ca_client(Some(token), None)
        .create_certificate(request(pem, 0, None))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(chain[2], issued.get_ref().cert_chain[2], "same root");
    assert_ne!(chain[1], issued.get_ref().cert_chain[1], "new intermediate");
    // Out-of-order root steps are refused with the reason.
    let err = admin.rotate_root(pb::RotateRootRequest { phase: 2, force: false }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("prepare"), "{}", err.message());
    mesh.shutdown().await;
}

/// Accepts every CONNECT and writes "ok".
struct Accept;

impl Handler for Accept {
    async fn handle(&self, connect: InboundConnect) {
        if let Ok(mut s) = connect.accept() {
            let _ = s.write_all(b"ok").await;
            let _ = s.shutdown().await;
        }
    }
}

/// One HBONE handshake + CONNECT from `client` to a server presenting `server`, each side
/// trusting its own bundle.
async fn hbone(
    client: &Arc<Credential>,
    client_trust: &TrustBundle,
    server: &Arc<Credential>,
    server_trust: &TrustBundle,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = proto::tls::server_config(
        server.clone(),
        SharedTrustBundle::new(server_trust.clone()),
        vec!["cluster.local".into()],
    )
    .unwrap();
    let srv = Server::new(listener, tls, ServerConfig::default(), Arc::new(Accept)).unwrap();
    let (trigger, watcher) = proto::drain::new();
    let task = tokio::spawn(srv.run(watcher));
    let pool = Pool::new(PoolConfig::default(), SharedTrustBundle::new(client_trust.clone()));
    let result = pool
        .connect(ConnectRequest::new(client.clone(), addr, vec![server.identity()], addr))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    drop(pool);
    trigger.drain(Duration::from_secs(1)).await;
    task.abort();
    result
}

async fn issue(mesh: &Mesh, sa: &str) -> (Arc<Credential>, Vec<String>) {
    let id = format!("spiffe://cluster.local/ns/demo/sa/{sa}");
    let (key, pem) = csr(&[&id]);
    let chain = mesh
        .ca_client(Some(mesh.token("demo", sa, None)), None)
        .create_certificate(request(pem, 3600, None))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    (credential(&chain, &key), chain)
}

/// A proxy's view of the trust bundle, kept by a delta xDS subscription.
struct BundleWatch {
    _requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl BundleWatch {
    async fn start(mesh: &Mesh) -> BundleWatch {
        let token = mesh.token("istio-system", "ztunnel", Some("node-1"));
        let mut ads = AggregatedDiscoveryServiceClient::with_interceptor(
            mesh.channel(None),
            proto::control::with_token(Some(token)),
        );
        let (tx, rx) = mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node { id: "ztunnel~node-1".into(), ..Default::default() }),
            type_url: TRUST_BUNDLE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let responses = ads.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
        BundleWatch { _requests: tx, responses }
    }

    async fn next(&mut self) -> TrustBundle {
        let r = tokio::time::timeout(Duration::from_secs(5), self.responses.message())
            .await
            .expect("trust bundle pushed in time")
            .unwrap()
            .unwrap();
        assert_eq!(r.type_url, TRUST_BUNDLE);
        let body = r.resources[0].resource.as_ref().unwrap();
        let bundle = pb::TrustBundle::decode(body.value.as_slice()).unwrap();
        assert_eq!(bundle.trust_domain, "cluster.local");
        TrustBundle::from_pem(bundle.roots_pem.concat().as_bytes()).unwrap()
    }
}

#[tokio::test]
async fn root_rotation_keeps_old_and_new_certificates_talking_until_retirement() {
    let mesh = mesh().await;
    let mut watch = BundleWatch::start(&mesh).await;
    let initial = watch.next().await;
    assert_eq!(initial.roots().len(), 1);
    let (old_a, old_chain) = issue(&mesh, "client").await;
    let (old_b, _) = issue(&mesh, "server").await;

    // 1. Prepare: the new root reaches proxies; signing is unchanged.
    let mut admin = admin_client(&mesh);
    let s = admin.rotate_root(pb::RotateRootRequest { phase: 1, force: false }).await.unwrap().into_inner();
    assert_eq!(
        s.roots.iter().map(|r| r.state).collect::<Vec<_>>(),
        [pb::RootState::Active as i32, pb::RootState::Pending as i32]
    );
    let overlap = watch.next().await;
    assert_eq!(overlap.roots().len(), 2);
    let (_, still_old) = issue(&mesh, "client").await;
    assert_eq!(still_old[1], old_chain[1], "prepare does not change signing");
    // The answer ends with the whole bundle, as istiod's does: a proxy that takes its roots from
    // it (Istio's ztunnel) trusts peers under either root.
    assert_eq!(roots_in(&old_chain), [roots_in(&old_chain)[0].clone()], "one root before the rotation");
    assert_eq!(roots_in(&still_old), overlap.roots().iter().map(|r| r.to_vec()).collect::<Vec<_>>());
    let old_root = pem_blocks(old_chain.last().unwrap()).remove(0);

    // 2. Activate: new certificates chain to the new root.
    let s = admin.rotate_root(pb::RotateRootRequest { phase: 2, force: false }).await.unwrap().into_inner();
    assert_eq!(
        s.roots.iter().map(|r| r.state).collect::<Vec<_>>(),
        [pb::RootState::Retiring as i32, pb::RootState::Active as i32]
    );
    let (new_a, new_chain) = issue(&mesh, "client").await;
    let (new_b, _) = issue(&mesh, "server").await;
    assert_ne!(new_chain[1], old_chain[1], "a new intermediate");
    let new_root = pem_blocks(new_chain.last().unwrap()).into_iter().find(|r| *r != old_root).unwrap();
    assert_eq!(roots_in(&new_chain).len(), 2, "both roots while the old one retires");

    // During the overlap every pair completes an HBONE handshake, both directions.
    for (what, client, server) in [
        ("old → new", &old_a, &new_b),
        ("new → old", &new_a, &old_b),
        ("old → old", &old_a, &old_b),
        ("new → new", &new_a, &new_b),
    ] {
        hbone(client, &overlap, server, &overlap).await.unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    // 3. Retire: refused while old certificates are valid, unless forced.
    let err = admin.rotate_root(pb::RotateRootRequest { phase: 3, force: false }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("still valid"), "{}", err.message());
    // The admin credential was reissued under the new root; use it (the old one stops working).
    let admin_cred = wait_for_new_admin_credential(&mesh, &new_root).await;
    let mut admin = CaAdminClient::new(
        proto::control::ControlPlaneTarget {
            addr: mesh.grpc,
            server_name: "localhost".into(),
            trust: SharedTrustBundle::new(overlap.clone()),
            credential: Some(admin_cred),
            cluster_id: None,
        }
        .channel()
        .unwrap(),
    );
    let s = admin.rotate_root(pb::RotateRootRequest { phase: 3, force: true }).await.unwrap().into_inner();
    assert_eq!(s.roots.len(), 1);
    let after = watch.next().await;
    assert_eq!(after.roots().len(), 1);
    assert_eq!(after.roots()[0].as_ref(), ::pem::parse(&new_root).unwrap().contents());
    let (_, after_chain) = issue(&mesh, "client").await;
    assert_eq!(
        roots_in(&after_chain),
        [::pem::parse(&new_root).unwrap().into_contents()],
        "the old root left the answer"
    );

    // Only new-root certificates are accepted now, in either role.
    hbone(&new_a, &after, &new_b, &after).await.unwrap();
    let err = hbone(&old_a, &after, &new_b, &after).await.unwrap_err();
    assert!(err.contains("UnknownCA"), "old client refused by server: {err}");
    let err = hbone(&new_a, &after, &old_b, &after).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "old server refused by client: {err}");
    // The CA itself no longer accepts old-root client certificates.
    let (_, pem) = csr(&[CLIENT]);
    let refused = mesh.ca_client(None, Some(old_a)).create_certificate(request(pem, 0, None)).await;
    assert!(refused.is_err());
    mesh.shutdown().await;
}

async fn wait_for_new_admin_credential(mesh: &Mesh, root_pem: &str) -> Arc<Credential> {
    let path = mesh.state.path().join("admin").join(ca::ADMIN_CREDENTIAL);
    eventually("the admin credential to be reissued under the new root", Duration::from_secs(5), || async {
        // Chain then key: the root is the last certificate.
        std::fs::read_to_string(&path).unwrap_or_default().contains(root_pem).then_some(())
    })
    .await;
    mesh.admin_credential()
}

#[tokio::test]
async fn a_thousand_concurrent_csrs_all_succeed() {
    // One caller asks for all of them: lift its rate limit (tested on its own below).
    let mesh = mesh_with(|c| c.limits.issue_burst = 1000).await;
    let channels: Vec<_> = (0..4).map(|_| mesh.channel(None)).collect();
    let token = mesh.token("istio-system", "ztunnel", Some("node-1"));
    let csrs: Vec<String> = (0..1000).map(|_| csr(&[CLIENT]).1).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, pem) in csrs.into_iter().enumerate() {
        let mut client = proto::api::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient::with_interceptor(
            channels[i % channels.len()].clone(),
            proto::control::with_token(Some(token.clone())),
        );
        tasks.spawn(async move { client.create_certificate(request(pem, 0, Some(CLIENT))).await });
    }
    let mut serials = HashSet::new();
    while let Some(result) = tasks.join_next().await {
        let chain = result.unwrap().expect("every CSR succeeds").into_inner().cert_chain;
        let ders = der_chain(&chain);
        let (_, leaf) = X509Certificate::from_der(&ders[0]).unwrap();
        serials.insert(leaf.raw_serial_as_string());
    }
    assert_eq!(serials.len(), 1000, "distinct serials");
    let logged = mesh.authority.as_ref().unwrap().log().records(0).len();
    // 1,000 workload certificates plus the CA's own serving and admin certificates.
    assert_eq!(logged, 1002);
    mesh.shutdown().await;
}

#[tokio::test]
async fn plugged_in_ca_signs_with_operator_material_and_refuses_rotation() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let cacerts = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "operator root");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = p.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "operator intermediate");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let int = p.signed_by(&int_key, &Issuer::from_ca_cert_der(root.der(), root_key).unwrap()).unwrap();
    std::fs::write(cacerts.path().join("ca-cert.pem"), int.pem()).unwrap();
    std::fs::write(cacerts.path().join("ca-key.pem"), int_key.serialize_pem()).unwrap();
    std::fs::write(cacerts.path().join("root-cert.pem"), root.pem()).unwrap();
    std::fs::write(cacerts.path().join("cert-chain.pem"), format!("{}{}", int.pem(), root.pem())).unwrap();

    let mesh = Mesh::new();
    mesh.write("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n");
    let mut config = mesh.config();
    config.authority.keys = ca::authority::KeySource::PlugIn(cacerts.path().to_owned());
    let mesh = mesh.boot_with(config).await;
    let (_, chain) = issue(&mesh, "client").await;
    assert_eq!(chain.len(), 3);
    assert_eq!(::pem::parse(&chain[2]).unwrap().contents(), root.der().as_ref());
    assert_eq!(::pem::parse(&chain[1]).unwrap().contents(), int.der().as_ref());
    let err = admin_client(&mesh).rotate_intermediate(pb::RotateIntermediateRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("plugged in"), "{}", err.message());
    mesh.shutdown().await;

    // A key that does not match the certificate is refused at start, with the file named.
    std::fs::write(cacerts.path().join("ca-key.pem"), KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let mut config = Mesh::new().config();
    config.authority.keys = ca::authority::KeySource::PlugIn(cacerts.path().to_owned());
    let err = proto::error_chain(&ca::ControlPlane::bind(config).await.unwrap_err());
    assert!(err.contains("ca-cert.pem") && err.contains("does not match"), "{err}");
}

#[tokio::test]
async fn the_root_survives_a_restart() {
    let mesh = mesh().await;
    let root_before = std::fs::read_to_string(mesh.state.path().join("root-cert.pem")).unwrap();
    let (cred, chain) = issue(&mesh, "client").await;
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(mesh.state.path().join("authority.json")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "keys are private");
    let mesh = mesh.shutdown().await.boot().await;
    mesh.wait_ready().await;
    assert_eq!(std::fs::read_to_string(mesh.state.path().join("root-cert.pem")).unwrap(), root_before);
    // The certificate from before the restart still authenticates to the restarted CA.
    let (_, pem) = csr(&[CLIENT]);
    let renewed = mesh.ca_client(None, Some(cred)).create_certificate(request(pem, 0, None)).await.unwrap();
    assert_eq!(renewed.get_ref().cert_chain[1..], chain[1..]);
    let _ = (ADMIN, id(CLIENT));
    mesh.shutdown().await;
}

/// A CSR cannot widen what it is issued: one that asks for DNS and IP SANs, a subject, `CA:true`,
/// `keyCertSign`/`cRLSign` and any extended usage gets the fixed SVID profile (its one URI SAN,
/// empty subject, `CA:false`, digitalSignature + keyEncipherment, serverAuth + clientAuth); one
/// that asks for a second URI is refused.
#[tokio::test]
async fn a_csr_asking_for_more_gets_only_the_svid_profile() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    let mesh = mesh().await;
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "root-of-everything");
    params.subject_alt_names = vec![
        SanType::URI(CLIENT.try_into().unwrap()),
        SanType::DnsName("evil.example".try_into().unwrap()),
        SanType::IpAddress("10.0.0.1".parse().unwrap()),
    ];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::Any, ExtendedKeyUsagePurpose::CodeSigning];
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    // The request really asks for all of that.
    let der = ::pem::parse(&pem).unwrap().into_contents();
    let (_, req) = X509CertificationRequest::from_der(&der).unwrap();
    let asked: Vec<String> =
        req.requested_extensions().into_iter().flatten().map(|e| format!("{e:?}").chars().take(24).collect()).collect();
    for kind in ["SubjectAlternativeName", "BasicConstraints", "KeyUsage", "ExtendedKeyUsage"] {
        assert!(asked.iter().any(|a| a.starts_with(kind)), "the CSR does not ask for {kind}: {asked:?}");
    }

    let token = mesh.token("demo", "client", None);
    let chain = mesh.ca_client(Some(token), None).create_certificate(request(pem, 0, None)).await.unwrap().into_inner();
    let ders = der_chain(&chain.cert_chain);
    let (_, leaf) = X509Certificate::from_der(&ders[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names, [GeneralName::URI(CLIENT)], "only the one URI SAN");
    assert!(leaf.subject().iter().next().is_none(), "the requested subject was copied");
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca, "CA:true was granted");
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment(), "{ku:?}");
    assert!(!ku.key_cert_sign() && !ku.crl_sign(), "a CA key usage was granted: {ku:?}");
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any && !eku.code_signing, "{eku:?}");

    // A second URI: refused, with the reason.
    let token = mesh.token("demo", "client", None);
    let (_key, two) = csr(&[CLIENT, "spiffe://cluster.local/ns/demo/sa/server"]);
    let err = mesh.ca_client(Some(token), None).create_certificate(request(two, 0, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("names 2 URI SANs; exactly one SPIFFE ID is allowed"), "{}", err.message());
    mesh.shutdown().await;
}

/// Before a caller is authenticated, what it can make the CA hold is bounded: a request larger
/// than a CSR needs is refused from its length prefix (not read, not reserved), a connection
/// carries a bounded number of streams, and one caller gets certificates at a bounded rate
/// (RESOURCE_EXHAUSTED beyond it, counted) while other callers are unaffected.
#[tokio::test]
async fn requests_are_bounded_in_size_streams_and_rate() {
    let mesh = mesh_with(|c| {
        c.limits.issue_burst = 3;
        c.limits.issue_per_second = 1;
    })
    .await;
    let token = mesh.token("demo", "client", None);
    // Oversized: a 100 KiB "CSR" (tonic checks the announced length before reading it).
    let big = request("x".repeat(100 * 1024), 0, None);
    let err = mesh.ca_client(Some(token.clone()), None).create_certificate(big).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("the limit is: 65536 bytes"), "{}", err.message());

    // Rate: three at once, then refused until the bucket refills.
    let mut client = mesh.ca_client(Some(token), None);
    for i in 0..3 {
        client.create_certificate(request(csr(&[CLIENT]).1, 0, None)).await.unwrap_or_else(|e| panic!("{i}: {e:?}"));
    }
    let err = client.create_certificate(request(csr(&[CLIENT]).1, 0, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Another caller (another node's ztunnel) is not held up by it.
    let other = mesh.token("istio-system", "ztunnel", Some("node-2"));
    let server = "spiffe://cluster.local/ns/demo/sa/server";
    mesh.ca_client(Some(other), None).create_certificate(request(csr(&[server]).1, 0, Some(server))).await.unwrap();
    // Under test: the bucket refills with time; a second later the first caller has one more.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.create_certificate(request(csr(&[CLIENT]).1, 0, None)).await.unwrap();
    let (_, metrics) = mesh.admin_get("/metrics").await;
    assert!(metrics.contains("ca_certificate_requests_refused_total{reason=\"rate_limited\"} 1"), "{metrics}");

    // Streams per connection: the server announces its limit in its HTTP/2 settings.
    let (send, mut conn) = raw_h2(&mesh).await;
    // Drive the connection until the server's SETTINGS arrive.
    let _ = tokio::time::timeout(
        Duration::from_millis(300),
        std::future::poll_fn(|cx| futures_util::FutureExt::poll_unpin(&mut conn, cx)),
    )
    .await;
    assert_eq!(conn.max_concurrent_send_streams(), 256);
    // What one stream can make the server buffer before it reads: a 64 KiB send window (hyper's
    // default is 1 MiB), whatever the caller asks for.
    let driver = tokio::spawn(conn);
    let (_answer, mut body) = open_certificate_call(send).await;
    body.reserve_capacity(4 << 20);
    // Capacity comes from the window the server granted; it grows only when the server reads.
    let granted = tokio::time::timeout(Duration::from_secs(5), std::future::poll_fn(|cx| body.poll_capacity(cx)))
        .await
        .expect("no send capacity granted");
    assert_eq!(body.capacity(), 64 * 1024, "{granted:?}");
    driver.abort();
    drop((client, body));
    mesh.shutdown().await;
}

#[tokio::test]
async fn a_call_that_never_finishes_is_dropped_at_the_drain_deadline() {
    let drain = Duration::from_millis(500);
    let mesh = mesh_with(|c| c.drain_timeout = drain).await;
    // A client that sends a certificate call's headers and never its body: the server holds the
    // stream open, and a graceful shutdown alone would wait for it forever.
    let (send, mut conn) = raw_h2(&mesh).await;
    let mut ping = conn.ping_pong().unwrap();
    let driver = tokio::spawn(conn);
    let (_answer, _body) = open_certificate_call(send).await;
    // The pong comes after the server has read the HEADERS frame sent before the PING.
    ping.ping(h2::Ping::opaque()).await.unwrap();

    let started = std::time::Instant::now();
    mesh.shutdown().await; // fails after 10 s if the CA waits for the call
    let took = started.elapsed();
    assert!(took >= drain, "the CA stopped after {took:?}, before its drain deadline: the call was not held open");
    driver.abort();
}

/// An HTTP/2 connection to the CA's gRPC port, over its TLS, driven by hand.
async fn raw_h2(
    mesh: &Mesh,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    h2::client::Connection<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
) {
    let tcp = tokio::net::TcpStream::connect(mesh.grpc).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(proto::tls::control_plane_client_config(mesh.trust(), None).unwrap());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tls.connect(name, tcp).await.unwrap();
    h2::client::handshake(stream).await.unwrap()
}

/// Starts a certificate call: its headers, and a body stream left open.
async fn open_certificate_call(
    send: h2::client::SendRequest<bytes::Bytes>,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let mut send = send.ready().await.unwrap();
    let post = http::Request::post("https://localhost/istio.v1.auth.IstioCertificateService/CreateCertificate")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    send.send_request(post, false).unwrap()
}

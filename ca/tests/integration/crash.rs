//! The real `ca` binary killed with SIGKILL while it is issuing certificates: after a restart the
//! root is the same, the issuance log reads back whole, and every certificate a client received
//! before the kill is in it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{csr, request};
use ca::auth::{DEFAULT_AUDIENCE, TokenRequest, TokenSigner};
use proto::api::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use proto::control::{ControlPlaneTarget, with_token};
use proto::tls::{SharedTrustBundle, TrustBundle};
use x509_parser::prelude::*;

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

/// A free port on a loopback address of its own (127.x.y.z): a port picked ahead and released
/// can be handed to another test's process before the CA binds it; on its own address it cannot
/// end up shared.
fn free_port() -> SocketAddr {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let [a, b, c, _] = (h.finish() as u32).to_be_bytes();
    let ip = std::net::Ipv4Addr::new(127, a, b, c.max(2));
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

struct Ca {
    child: Child,
    grpc: SocketAddr,
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the `ca` binary on free ports and waits until it serves (its trust bundle written, its
/// port accepting). Ports picked ahead can be taken by another test's process before the CA binds
/// them: then the CA exits, and it is started again on other ports.
fn start(objects: &std::path::Path, state: &std::path::Path, jwks: &std::path::Path) -> Ca {
    for _ in 0..5 {
        let grpc = free_port();
        let admin = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(["--config-dir", &objects.display().to_string()])
            .args(["--state-dir", &state.display().to_string()])
            .args(["--grpc-addr", &grpc.to_string(), "--admin-addr", &admin.to_string()])
            .args(["--jwt-issuer", crate::support::ISSUER, "--jwks-file", &jwks.display().to_string()])
            // One caller issues as fast as it can: lift its rate limit (tested in ca.rs).
            .args(["--issue-rate", "1000000", "--issue-burst", "1000000"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Our CA, not whatever else listens there: it is running and wrote its bundle first.
        let started = proto::testing::eventually_blocking("the CA to listen", Duration::from_secs(20), || {
            if child.try_wait().unwrap().is_some() {
                return Some(false);
            }
            (state.join("root-cert.pem").exists() && std::net::TcpStream::connect(grpc).is_ok()).then_some(true)
        });
        if started {
            return Ca { child, grpc };
        }
    }
    panic!("ca exited at start five times (ports taken?)");
}

fn serial(chain: &[String]) -> String {
    let der = ::pem::parse(&chain[0]).unwrap().into_contents();
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    leaf.raw_serial_as_string().replace(':', "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_issuing_loses_nothing_that_was_handed_out() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let signer = TokenSigner::new(crate::support::ISSUER, None).unwrap();
    let keys = tempfile::tempdir().unwrap();
    let jwks = keys.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::to_string(signer.jwks()).unwrap()).unwrap();
    std::fs::write(objects.path().join("ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n")
        .unwrap();
    let token = signer
        .mint(&TokenRequest {
            namespace: "demo",
            service_account: "client",
            pod: None,
            node: None,
            audience: DEFAULT_AUDIENCE,
            ttl: Duration::from_secs(600),
        })
        .unwrap();

    let ca = start(objects.path(), state.path(), &jwks);
    let root_before = std::fs::read(state.path().join("root-cert.pem")).unwrap();
    let trust = SharedTrustBundle::new(TrustBundle::from_pem(&root_before).unwrap());
    let target = ControlPlaneTarget {
        addr: ca.grpc,
        server_name: "localhost".into(),
        trust,
        credential: None,
        cluster_id: None,
    };

    // Clients issue continuously; record every certificate received.
    let received = Arc::new(Mutex::new(Vec::new()));
    let csrs: Vec<String> = (0..64).map(|_| csr(&[CLIENT]).1).collect();
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let mut client =
            IstioCertificateServiceClient::with_interceptor(target.channel().unwrap(), with_token(Some(token.clone())));
        let received = received.clone();
        let csrs = csrs.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let pem = csrs[(worker * 7 + i) % csrs.len()].clone();
                match client.create_certificate(request(pem, 0, None)).await {
                    Ok(r) => received.lock().unwrap().push(serial(&r.into_inner().cert_chain)),
                    Err(_) => return,
                }
            }
        }));
    }
    // Let it issue a few hundred, then SIGKILL mid-stream.
    proto::testing::eventually("300 certificates issued", Duration::from_secs(20), || async {
        (received.lock().unwrap().len() >= 300).then_some(())
    })
    .await;
    drop(ca); // kill -9
    for t in tasks {
        t.await.unwrap();
    }
    let handed_out: Vec<String> = received.lock().unwrap().clone();

    // Restart on the same state.
    let ca = start(objects.path(), state.path(), &jwks);
    assert_eq!(std::fs::read(state.path().join("root-cert.pem")).unwrap(), root_before, "same root after restart");
    let log = std::fs::read_to_string(state.path().join("issued.jsonl")).unwrap();
    assert!(log.ends_with('\n'), "no partial record left behind");
    let logged: HashSet<String> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every line is a whole record"))
        .map(|v| v["serial"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<&String> = handed_out.iter().filter(|s| !logged.contains(*s)).collect();
    assert!(missing.is_empty(), "{} of {} handed-out certificates are not in the log", missing.len(), handed_out.len());

    // And it issues again.
    let mut client = IstioCertificateServiceClient::with_interceptor(
        ControlPlaneTarget { addr: ca.grpc, ..target }.channel().unwrap(),
        with_token(Some(token)),
    );
    let chain = client.create_certificate(request(csr(&[CLIENT]).1, 0, None)).await.unwrap().into_inner().cert_chain;
    assert_eq!(chain.last().unwrap().as_bytes(), root_before.as_slice());
}

/// The operator commands against the real binary: status, rotation steps, certificate list, and a
/// refused step exits non-zero with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_drive_the_admin_api() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let signer = TokenSigner::new(crate::support::ISSUER, None).unwrap();
    let jwks = keys.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::to_string(signer.jwks()).unwrap()).unwrap();
    std::fs::write(objects.path().join("ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n")
        .unwrap();
    let ca = start(objects.path(), state.path(), &jwks);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(args)
            .args(["--server", &ca.grpc.to_string(), "--state-dir", &state.path().display().to_string()])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (ok, out, err) = run(&["status"]);
    assert!(ok, "{err}");
    assert!(out.contains("trust domain: cluster.local") && out.contains("state: active"), "{out}");

    let (ok, out, _) = run(&["rotate-root", "retire"]);
    assert!(!ok, "retire before prepare must fail: {out}");
    let (_, _, err) = run(&["rotate-root", "retire"]);
    assert!(err.contains("FailedPrecondition") && err.contains("prepare"), "{err}");

    let (ok, out, err) = run(&["rotate-root", "prepare"]);
    assert!(ok, "{err}");
    assert!(out.contains("pending (trusted, not signing)"), "{out}");
    let (ok, bundle, err) = run(&["trust-bundle"]);
    assert!(ok, "{err}");
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);

    let (ok, out, err) = run(&["certs", "--identity", "spiffe://cluster.local/ns/istio-system/sa/mesh-admin"]);
    assert!(ok, "{err}");
    assert!(out.lines().count() >= 2 && out.contains("mesh-admin"), "{out}");

    // Without a credential the CLI says why.
    let (ok, _, err) = {
        let out = Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(["status", "--server", &ca.grpc.to_string(), "--state-dir", "/nonexistent"])
            .output()
            .unwrap();
        (out.status.success(), (), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert!(!ok);
    assert!(err.contains("/nonexistent/root-cert.pem"), "{err}");
}

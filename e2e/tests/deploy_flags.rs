//! The manifests in `deploy/` pass the proxies only flags the binaries accept (clap parses every
//! flag and value before `--help`, so an unknown flag or a bad value fails): the ztunnel and node
//! agent DaemonSets, the waypoint and ingress gateway templates (the CA's Deployment is checked in `ca/tests/deploy.rs`);
//! the optional Prometheus' Deployment passes only flags `prometheus` accepts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use e2e::mesh::binary;
use serde::Deserialize;

fn document(file: &str, kind: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_norway::Value::deserialize(d).unwrap()).unwrap())
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {file}"))
}

fn container_args(file: &str, kind: &str) -> Vec<String> {
    let doc = document(file, kind);
    let args = &doc["spec"]["template"]["spec"]["containers"][0]["args"];
    args.as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect()
}

fn assert_accepted(program: &str, args: &[String]) {
    let out = std::process::Command::new(binary(program).unwrap())
        .args(args)
        .arg("--help")
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_proxies_accept_every_flag_their_manifests_pass() {
    assert_accepted("ztunnel", &container_args("ztunnel.yaml", "DaemonSet"));
    assert_accepted("waypoint", &container_args("waypoint.yaml", "Deployment"));
    assert_accepted("waypoint", &container_args("ingress-gateway.yaml", "Deployment"));
    assert_accepted("node-agent", &container_args("node-agent.yaml", "DaemonSet"));
    // The check itself refuses what the binaries do not know.
    let out =
        std::process::Command::new(binary("ztunnel").unwrap()).args(["--no-such-flag", "--help"]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn the_optional_prometheus_passes_only_flags_prometheus_accepts() {
    // Its configuration runs in the one-machine mesh's Prometheus (e2e::prometheus), relabelling
    // as written; only the Kubernetes discovery is not exercised there (Debian's build of
    // Prometheus leaves it out).
    let args = container_args("prometheus.yaml", "Deployment");
    let prometheus = e2e::prometheus::binary().expect("prometheus (Debian: apt-get install prometheus)");
    let out = std::process::Command::new(&prometheus).args(&args).arg("--help").output().unwrap();
    assert!(out.status.success(), "prometheus {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(&prometheus).args(["--no-such-flag", "--help"]).output().unwrap();
    assert!(!out.status.success());
}

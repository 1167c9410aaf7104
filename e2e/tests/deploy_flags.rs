//! The manifests in `deploy/` pass the proxies only flags the binaries accept (clap parses every
//! flag and value before `--help`, so an unknown flag or a bad value fails): the ztunnel and node
//! agent DaemonSets, the waypoint and ingress gateway templates (the CA's Deployment is checked in `ca/tests/deploy.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use e2e::mesh::binary;
use serde::Deserialize;

fn container_args(file: &str, kind: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let doc = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_norway::Value::deserialize(d).unwrap()).unwrap())
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {file}"));
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

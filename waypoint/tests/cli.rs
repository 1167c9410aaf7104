//! The `waypoint` binary's command line: help, and clear refusals of unusable settings.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn waypoint() -> Command {
    Command::new(env!("CARGO_BIN_EXE_waypoint"))
}

#[test]
fn help_explains_the_waypoint() {
    let out = waypoint().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in ["istio-waypoint", "--namespace", "--ca-addr", "--token-file", "15008", "--drain-timeout"] {
        assert!(text.contains(needle), "--help does not mention {needle}:\n{text}");
    }
}

#[test]
fn a_missing_trust_root_is_a_clear_error() {
    let out = waypoint()
        .args(["--namespace", "demo", "--ca-root", "/nonexistent/root-cert.pem", "--ca-addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("reading --ca-root /nonexistent/root-cert.pem"), "{err}");
}

#[test]
fn the_namespace_is_required() {
    let out = waypoint().env_remove("POD_NAMESPACE").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("--namespace"));
}

//! The allocator options baked into the `ztunnel` and `waypoint` binaries: jemalloc only warns on
//! stderr about an option it does not understand and carries on without it, so check that it warns
//! about none.

#![allow(clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

use e2e::mesh::binary;

fn version(name: &str, malloc_conf: Option<&str>) -> Output {
    let path = binary(name).expect("locating the binary");
    let mut command = Command::new(&path);
    command.arg("--version").env_remove("MALLOC_CONF");
    match malloc_conf {
        Some(conf) => command.env("_RJEM_MALLOC_CONF", conf),
        None => command.env_remove("_RJEM_MALLOC_CONF"),
    };
    command.output().unwrap_or_else(|e| panic!("running {} --version: {e}", path.display()))
}

#[test]
fn jemalloc_accepts_the_baked_in_options() {
    for binary in ["ztunnel", "waypoint"] {
        let out = version(binary, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{binary} --version failed: {stderr}");
        assert!(!stderr.contains("<jemalloc>"), "{binary}: jemalloc rejected an option: {stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{binary} ")), "{binary} --version");
    }
}

#[test]
fn jemalloc_reports_an_option_it_rejects() {
    // The sign the test above looks for, seen when an option is bad (here through the override).
    for binary in ["ztunnel", "waypoint"] {
        let stderr = String::from_utf8_lossy(&version(binary, Some("no_such_option:1")).stderr).into_owned();
        assert!(stderr.contains("<jemalloc>: Invalid conf pair: no_such_option:1"), "{binary}: {stderr}");
    }
}

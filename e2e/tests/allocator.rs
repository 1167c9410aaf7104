//! The allocator of the `ztunnel` and `waypoint` binaries: jemalloc, with the options baked in by
//! `proto::proxy_allocator!` in effect. jemalloc only warns on stderr about an option it does not
//! understand and carries on without it, so the check reads what it reports.

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
fn jemalloc_runs_with_the_baked_in_options() {
    for binary in ["ztunnel", "waypoint"] {
        // `stats_print` adds to the baked-in options: jemalloc prints the ones in effect at exit.
        let out = version(binary, Some("stats_print:true"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{binary} --version failed: {stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{binary} ")), "{binary} --version");
        assert!(!stderr.contains("Invalid conf"), "{binary}: jemalloc rejected an option: {stderr}");
        for line in ["opt.background_thread: true", "opt.dirty_decay_ms: 1000", "opt.muzzy_decay_ms: 0"] {
            assert!(stderr.contains(line), "{binary}: jemalloc's options lack {line:?}: {stderr}");
        }
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

//! The allocator options baked into the `ztunnel` binary: jemalloc only warns on stderr about an
//! option it does not understand and carries on without it, so check that it warns about none.

use std::process::Command;

#[test]
fn jemalloc_accepts_the_baked_in_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .arg("--version")
        .env_remove("_RJEM_MALLOC_CONF")
        .env_remove("MALLOC_CONF")
        .output()
        .expect("running ztunnel --version");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ztunnel --version failed: {stderr}");
    assert!(!stderr.contains("<jemalloc>"), "jemalloc rejected an option: {stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ztunnel "), "unexpected --version output");
}

#[test]
fn jemalloc_reports_an_option_it_rejects() {
    // The sign the test above looks for, seen when an option is bad (here through the override).
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "no_such_option:1")
        .output()
        .expect("running ztunnel --version");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("<jemalloc>: Invalid conf pair: no_such_option:1"), "stderr: {stderr}");
}

//! Capture rules: what the node agent installs in a pod's network namespace before handing it to
//! ztunnel, so the pod's TCP traffic passes through ztunnel's listeners inside that namespace.
//!
//! One nftables table (`ip ambient`, replaced atomically) plus one policy-routing rule:
//! - outbound TCP from the app to anything but loopback → `:15001` (REDIRECT; ztunnel reads the
//!   original destination with `SO_ORIGINAL_DST`);
//! - inbound TCP to the pod, except `:15008` (HBONE) → `:15006` (plaintext capture);
//! - DNS from the app (UDP and TCP to port 53 of anything but loopback) → `:15053`, ztunnel's DNS
//!   proxy on the pod's loopback ([`crate::dns`]);
//! - ztunnel's own sockets carry [`ZTUNNEL_MARK`] and are never redirected;
//! - only a connection's opening SYN is redirected: a connection already open when the pod is
//!   enrolled (conntrack picks it up mid-stream, as new) keeps going directly instead of being
//!   reset;
//! - ztunnel connects to the app with the client's IP as source (`IP_TRANSPARENT`). Those packets
//!   loop back through `lo`, where the mark is copied into the connection's conntrack mark
//!   ([`CONNMARK`]); the app's replies get it back as their packet mark, and a routing rule sends
//!   marked packets to table [`ROUTE_TABLE`], whose only route delivers everything locally, i.e.
//!   to ztunnel's socket instead of out of the pod.
//!
//! Capture is IPv4 only for now, so IPv6 must not become a way around it: a second table
//! (`ip6 ambient`) drops every IPv6 packet of an enrolled pod but loopback and neighbour
//! discovery (an app's IPv6 connection is refused at once). `nft` and `ip` run inside the pod's
//! namespace.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::netns::NetNs;

/// Mark on every socket ztunnel opens for traffic (Istio's value).
pub const ZTUNNEL_MARK: u32 = 0x539;
/// Conntrack mark for connections ztunnel opened to the app with a spoofed source.
pub const CONNMARK: u32 = 0x111;
/// The bits of the mark the rules look at.
pub const MARK_MASK: u32 = 0xfff;
/// Routing table holding the "deliver locally" route for marked replies.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the routing rule (before `main`, 32766).
pub const RULE_PRIORITY: u32 = 32764;
/// The nftables table name (family `ip`).
pub const TABLE: &str = "ambient";

/// Why capture could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A tool could not be started (not installed?).
    #[error("running {tool}: {source} (is it installed?)")]
    Spawn {
        /// `nft` or `ip`.
        tool: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A tool refused.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// Entering the namespace.
    #[error("entering the pod's network namespace: {0}")]
    Netns(std::io::Error),
}

/// The nftables script (replaces the table if present).
pub fn ruleset() -> String {
    let (mark, connmark, mask, dns) = (ZTUNNEL_MARK, CONNMARK, MARK_MASK, crate::dns::DNS_PORT);
    format!(
        "table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
  chain prerouting_mangle {{
    type filter hook prerouting priority mangle; policy accept;
    meta mark & {mask:#x} == {mark:#x} ct mark set {connmark:#x}
  }}
  chain output_route {{
    type route hook output priority mangle; policy accept;
    ct mark & {mask:#x} == {connmark:#x} meta mark set ct mark
  }}
  chain prerouting_nat {{
    type nat hook prerouting priority dstnat; policy accept;
    meta l4proto tcp tcp flags & (fin|syn|rst|ack) == syn ip daddr != 127.0.0.0/8 tcp dport != 15008 meta mark & {mask:#x} != {mark:#x} redirect to :15006
  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    meta mark & {mask:#x} == {connmark:#x} accept
    oifname \"lo\" accept
    udp dport 53 ip daddr != 127.0.0.0/8 meta mark & {mask:#x} != {mark:#x} redirect to :{dns}
    tcp dport 53 tcp flags & (fin|syn|rst|ack) == syn ip daddr != 127.0.0.0/8 meta mark & {mask:#x} != {mark:#x} redirect to :{dns}
    meta l4proto tcp tcp flags & (fin|syn|rst|ack) == syn ip daddr != 127.0.0.0/8 meta mark & {mask:#x} != {mark:#x} redirect to :15001
  }}
}}
table ip6 {TABLE}
delete table ip6 {TABLE}
table ip6 {TABLE} {{
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"lo\" accept
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert }} accept
    counter drop
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    oifname \"lo\" accept
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert }} accept
    meta l4proto tcp counter reject with tcp reset
    counter drop
  }}
}}
"
    )
}

fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<(), CaptureError> {
    let mut cmd = Command::new(tool);
    cmd.args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| CaptureError::Spawn { tool, source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|source| CaptureError::Spawn { tool, source })?;
    }
    let out = child.wait_with_output().map_err(|source| CaptureError::Spawn { tool, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CaptureError::Failed {
            command: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn in_netns(netns: &NetNs, f: impl FnOnce() -> Result<(), CaptureError>) -> Result<(), CaptureError> {
    let mut result = Ok(());
    netns
        .run(|| {
            result = f();
            Ok(())
        })
        .map_err(CaptureError::Netns)?;
    result
}

fn rule_args(verb: &str) -> Vec<String> {
    [
        "-4",
        "rule",
        verb,
        "fwmark",
        &format!("{CONNMARK:#x}/{MARK_MASK:#x}"),
        "pref",
        &RULE_PRIORITY.to_string(),
        "lookup",
        &ROUTE_TABLE.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Installs (or re-installs: idempotent) capture in `netns`.
pub fn install(netns: &NetNs) -> Result<(), CaptureError> {
    in_netns(netns, || {
        run("nft", &["-f", "-"], Some(&ruleset()))?;
        // Remove an earlier copy of the rule so re-installing does not stack duplicates.
        let del = rule_args("del");
        while run("ip", &del.iter().map(String::as_str).collect::<Vec<_>>(), None).is_ok() {}
        let add = rule_args("add");
        run("ip", &add.iter().map(String::as_str).collect::<Vec<_>>(), None)?;
        let table = ROUTE_TABLE.to_string();
        run("ip", &["-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", &table], None)
    })
}

/// Removes capture from `netns` (a pod leaving the mesh); what is not there is not an error.
pub fn remove(netns: &NetNs) -> Result<(), CaptureError> {
    in_netns(netns, || {
        let _ = run("nft", &["delete", "table", "ip", TABLE], None);
        let _ = run("nft", &["delete", "table", "ip6", TABLE], None);
        let del = rule_args("del");
        while run("ip", &del.iter().map(String::as_str).collect::<Vec<_>>(), None).is_ok() {}
        let table = ROUTE_TABLE.to_string();
        let _ = run("ip", &["-4", "route", "flush", "table", &table], None);
        Ok(())
    })
}

/// Whether capture is installed in `netns` (the table exists).
pub fn installed(netns: &NetNs) -> Result<bool, CaptureError> {
    let mut present = false;
    in_netns(netns, || {
        present = run("nft", &["list", "table", "ip", TABLE], None).is_ok();
        Ok(())
    })?;
    Ok(present)
}

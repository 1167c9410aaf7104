//! What a node's ztunnel holds, read from its admin endpoint (`127.0.0.1:15000` in its network
//! namespace: in a cluster through `kubectl port-forward`, in the one-machine mesh with `--netns`).

#![allow(clippy::print_stdout)]

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

/// GETs `path` from the admin endpoint at `addr` (`host:port`) and parses the JSON answer.
pub async fn get_json(addr: &str, path: &str) -> Result<Value> {
    let stream = tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to ztunnel's admin endpoint at {addr} (is ztunnel running there?)"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP to {addr}"))?;
    tokio::spawn(connection);
    let request = http::Request::get(path).header(http::header::HOST, addr).body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await.with_context(|| format!("GET {addr}{path}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.with_context(|| format!("reading {addr}{path}"))?.to_bytes();
    if !status.is_success() {
        bail!("GET {addr}{path}: {status}: {}", String::from_utf8_lossy(&body).trim());
    }
    serde_json::from_slice(&body).with_context(|| format!("GET {addr}{path}: not JSON"))
}

/// Seconds from now until `unix` (negative: past), as `3h12m`, `-45s`.
pub fn relative(unix: i64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let (sign, secs) = if unix < now { ("-", now - unix) } else { ("", unix - now) };
    let human = if secs >= 86400 {
        format!("{}d{}h", secs / 86400, secs % 86400 / 3600)
    } else if secs >= 3600 {
        format!("{}h{}m", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    };
    format!("{sign}{human}")
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// `workloads`: the pods this ztunnel serves, then every workload it knows.
pub fn print_workloads(dump: &Value) {
    println!("PODS SERVED ON THIS NODE");
    println!("{:<40} {:<56} POOLED CONNECTIONS", "POD", "IDENTITY");
    for p in dump["pods"].as_array().into_iter().flatten() {
        println!("{:<40} {:<56} {}", s(&p["name"]), s(&p["identity"]), p["pooled_connections"]);
    }
    println!();
    println!("WORKLOADS IN THE MESH");
    println!("{:<40} {:<16} {:<12} {:<8} {:<9} POLICIES", "WORKLOAD", "IP", "NODE", "PROTOCOL", "WAYPOINT");
    for w in dump["mesh"]["workloads"].as_array().into_iter().flatten() {
        let name = format!("{}/{}", s(&w["namespace"]), s(&w["name"]));
        let ips: Vec<&str> = w["addresses"].as_array().into_iter().flatten().map(s).collect();
        let policies: Vec<&str> = w["authorization_policies"].as_array().into_iter().flatten().map(s).collect();
        println!(
            "{:<40} {:<16} {:<12} {:<8} {:<9} {}",
            name,
            ips.join(","),
            s(&w["node"]),
            s(&w["protocol"]),
            if w["waypoint"].as_bool() == Some(true) { "yes" } else { "-" },
            if policies.is_empty() { "-".to_owned() } else { policies.join(",") }
        );
    }
}

/// `certs`: the certificates held, with their signer and root, and the trust bundle.
pub fn print_certs(dump: &Value) {
    println!("{:<56} {:<8} {:<10} {:<18} ROOT", "IDENTITY", "STATE", "EXPIRES", "SIGNER");
    for c in dump["certificates"].as_array().into_iter().flatten() {
        let chain: Vec<&str> = c["chain_sha256"].as_array().into_iter().flatten().map(s).collect();
        let short = |f: Option<&&str>| f.map_or("-".to_owned(), |f| f.chars().take(16).collect());
        println!(
            "{:<56} {:<8} {:<10} {:<18} {}",
            s(&c["identity"]),
            s(&c["state"]),
            c["expires_unix"].as_i64().map_or("-".to_owned(), relative),
            short(chain.first()),
            short(chain.last()),
        );
    }
    println!();
    println!("TRUSTED ROOTS");
    for r in dump["trust_bundle"].as_array().into_iter().flatten() {
        println!("{}", s(r));
    }
}

/// `connections`: live inbound connections, who made them (as their certificate proved) and since
/// when.
pub fn print_connections(live: &Value) {
    println!("{:<56} {:<16} {:<22} AGE", "SOURCE IDENTITY", "SOURCE IP", "DESTINATION");
    for c in live["inbound"].as_array().into_iter().flatten() {
        let identity = c["source_identity"].as_str().unwrap_or("(plaintext)");
        let age = c["opened_unix"].as_i64().map_or("-".to_owned(), |t| relative(t).trim_start_matches('-').to_owned());
        println!("{:<56} {:<16} {:<22} {}", identity, s(&c["source_ip"]), s(&c["destination"]), age);
    }
}

//! What a node's ztunnel holds, read from its admin endpoint (`127.0.0.1:15000` in its network
//! namespace: in a cluster through `kubectl port-forward`, in the one-machine mesh with `--netns`).

#![allow(clippy::print_stdout)]

use anyhow::{Context, Result};
use serde_json::Value;

use super::print_table;

/// GETs `path` from the admin endpoint at `addr` (`host:port`) and parses the JSON answer.
pub async fn get_json(addr: &str, path: &str) -> Result<Value> {
    let body = crate::fetch::http_get(addr, path)
        .await
        .with_context(|| format!("ztunnel's admin endpoint at {addr} (is ztunnel running there?)"))?;
    serde_json::from_slice(&body).with_context(|| format!("GET {addr}{path}: not JSON"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// `workloads`: the pods this ztunnel serves, then every workload it knows.
pub fn print_workloads(dump: &Value) {
    println!("PODS SERVED ON THIS NODE");
    let pods: Vec<[String; 3]> = dump["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| [s(&p["name"]).to_owned(), s(&p["identity"]).to_owned(), p["pooled_connections"].to_string()])
        .collect();
    print_table(&["POD", "IDENTITY", "POOLED CONNECTIONS"], &pods);
    println!();
    println!("WORKLOADS IN THE MESH");
    let workloads: Vec<[String; 6]> = dump["mesh"]["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let ips: Vec<&str> = w["addresses"].as_array().into_iter().flatten().map(s).collect();
            let policies: Vec<&str> = w["authorization_policies"].as_array().into_iter().flatten().map(s).collect();
            [
                format!("{}/{}", s(&w["namespace"]), s(&w["name"])),
                ips.join(","),
                s(&w["node"]).to_owned(),
                s(&w["protocol"]).to_owned(),
                if w["waypoint"].as_bool() == Some(true) { "yes" } else { "-" }.to_owned(),
                if policies.is_empty() { "-".to_owned() } else { policies.join(",") },
            ]
        })
        .collect();
    print_table(&["WORKLOAD", "IP", "NODE", "PROTOCOL", "WAYPOINT", "POLICIES"], &workloads);
}

/// `certs`: the certificates held (expiry, next renewal, signer and root), and the trust bundle.
pub fn print_certs(dump: &Value) {
    let when = |v: &Value| v.as_i64().map_or("-".to_owned(), super::date_and_distance);
    let certs: Vec<[String; 6]> = dump["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let chain: Vec<&str> = c["chain_sha256"].as_array().into_iter().flatten().map(s).collect();
            let short = |f: Option<&&str>| f.map_or("-".to_owned(), |f| f.chars().take(16).collect());
            [
                s(&c["identity"]).to_owned(),
                s(&c["state"]).to_owned(),
                when(&c["expires_unix"]),
                c["renews_unix"].as_i64().map_or("-".to_owned(), super::distance),
                short(chain.first()),
                short(chain.last()),
            ]
        })
        .collect();
    print_table(&["IDENTITY", "STATE", "EXPIRES", "RENEWS", "SIGNER", "ROOT"], &certs);
    println!();
    println!("TRUSTED ROOTS");
    for r in dump["trust_bundle"].as_array().into_iter().flatten() {
        println!("{}", s(r));
    }
}

/// `connections`: live inbound connections, who made them (as their certificate proved) and since
/// when.
pub fn print_connections(live: &Value) {
    let rows: Vec<[String; 5]> = live["inbound"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            [
                c["source_identity"].as_str().unwrap_or("(plaintext)").to_owned(),
                s(&c["source_ip"]).to_owned(),
                s(&c["destination"]).to_owned(),
                c["opened_unix"].as_i64().map_or("-".to_owned(), super::age),
                c["id"].as_u64().map_or("-".to_owned(), |id| id.to_string()),
            ]
        })
        .collect();
    print_table(&["SOURCE IDENTITY", "SOURCE IP", "DESTINATION", "AGE", "ID"], &rows);
}

/// `explain`: the decision path of one connection, a line per step.
pub fn print_explanation(e: &Value) {
    println!("{}", explanation_lines(e).join("\n"));
}

fn end(v: &Value) -> String {
    let mut line = format!("{}  {}", s(&v["workload"]), s(&v["identity"]));
    let mut at = vec![format!("node {}", s(&v["node"]))];
    if let Some(ip) = v["address"].as_str() {
        at.push(ip.to_owned());
    }
    if v["in_mesh"] == Value::Bool(false) {
        at.push("not in the mesh".into());
    }
    line.push_str(&format!("  ({})", at.join(", ")));
    line
}

/// The waypoint's part of an explanation: the request, its JWT, the L7 policies, the route, the
/// backends.
fn request_lines(r: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut out = vec![
        format!("request    {} at the waypoint", s(&r["request"])),
        format!("jwt        {}", s(&r["authentication"])),
        "L7 policy  (bound to the waypoint's Gateway or the service):".to_owned(),
    ];
    let policies = r["policies"].as_array().map(Vec::as_slice).unwrap_or_default();
    if policies.is_empty() {
        out.push("             (no L7 AuthorizationPolicy applies)".into());
    }
    for p in policies {
        let matched = match p["rule"].as_u64() {
            Some(rule) => format!("matched (rule {rule})"),
            None => "no match".to_owned(),
        };
        let dry = if p["dry_run"] == Value::Bool(true) { "  (dry run: not enforced)" } else { "" };
        out.push(format!("             {:<6} {:<40} {matched}{dry}", s(&p["action"]), s(&p["name"])));
    }
    out.push(format!("verdict    {}: {}", s(&r["verdict"]), s(&r["reason"])));
    if !s(&r["routing"]).is_empty() {
        out.push(format!("route      {}", s(&r["routing"])));
    }
    for b in r["backends"].as_array().into_iter().flatten() {
        let mut line = format!("backend    {:>3.0}%  {}", b["share"].as_f64().unwrap_or_default(), s(&b["service"]));
        if let Some(port) = b["port"].as_u64() {
            line.push_str(&format!(":{port}"));
        }
        if let Some(subset) = b["subset"].as_str() {
            line.push_str(&format!(" subset {subset}"));
        }
        let endpoints: Vec<&str> = b["endpoints"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        line.push_str(&format!(
            " (endpoints: {})",
            if endpoints.is_empty() { "none healthy".to_owned() } else { endpoints.join(", ") }
        ));
        out.push(line);
        if let Some(policy) = b["policy"].as_str() {
            out.push(format!("             {policy}"));
        }
    }
    for setting in r["rule_settings"].as_array().into_iter().flatten() {
        out.push(format!("rule       {}", s(setting)));
    }
    out
}

/// The lines [`print_explanation`] prints.
pub fn explanation_lines(e: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = e["connection"].as_object() {
        let peer = c["source_identity"].as_str().unwrap_or("no identity (plaintext)");
        out.push(format!(
            "connection {} from {} ({peer}) to {}, open for {}; as the mesh is now:",
            c["id"],
            s(&c["source_ip"]),
            s(&c["destination"]),
            c["opened_unix"].as_i64().map_or("-".to_owned(), super::age)
        ));
    }
    let proved = e["connection"]["source_identity"].as_str();
    if let Some(peer) = proved.filter(|p| Some(*p) != e["source"]["identity"].as_str()) {
        out.push(format!(
            "note: its peer {peer} spoke for the client (a waypoint); explained below as the client's own connection"
        ));
    }
    out.push(format!("from       {}", end(&e["source"])));
    let mut to = format!("to         {}", s(&e["destination_address"]));
    if let Some(svc) = e["service"].as_object() {
        let endpoints: Vec<&str> =
            svc["endpoints"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let endpoints = if endpoints.is_empty() { "none healthy".to_owned() } else { endpoints.join(", ") };
        to.push_str(&format!("  service {} (endpoints: {endpoints})", s(&svc["hostname"])));
    }
    out.push(to);
    if let Some(gw) = e["waypoint"].as_object() {
        out.push(format!("waypoint   {}  {}", s(&gw["workload"]), s(&gw["identity"])));
        out.push(format!("           because {}", s(&gw["reason"])));
    }
    out.push(format!("hop        {}", s(&e["hop"])));
    if e["destination"].is_object() {
        out.push(format!("reaches    {}", end(&e["destination"])));
    }
    if let Some(authz) = e["authorization"].as_object() {
        out.push(format!(
            "policy     at {}, peer {} (from its TLS handshake):",
            s(&authz["at"]),
            s(&authz["peer_identity"])
        ));
        let policies = authz["policies"].as_array().map(Vec::as_slice).unwrap_or_default();
        if policies.is_empty() {
            out.push("             (no AuthorizationPolicy applies)".into());
        }
        for p in policies {
            let matched = if p["matched"] == Value::Bool(true) { "matched" } else { "no match" };
            let dry = if p["dry_run"] == Value::Bool(true) { "  (dry run: not enforced)" } else { "" };
            out.push(format!("             {:<6} {:<40} {matched}{dry}", s(&p["action"]), s(&p["name"])));
        }
        out.push(format!("verdict    {}: {}", s(&authz["verdict"]), s(&authz["reason"])));
    }
    if let Some(r) = e["request"].as_object() {
        out.extend(request_lines(r));
    }
    out.push(format!("outcome    {}", s(&e["outcome"])));
    for left in e["not_explained"].as_array().into_iter().flatten() {
        out.push(format!("not explained here: {}", s(left)));
    }
    out
}

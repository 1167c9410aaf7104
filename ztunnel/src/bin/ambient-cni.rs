//! `ambient-cni`: the CNI plugin of the ambient mesh, chained after the cluster's network plugin.
//!
//! On `ADD` it reports the new pod sandbox (namespace, name, uid, network namespace) to the node
//! agent on its socket and waits for the answer: a pod that belongs in the mesh is captured before
//! its containers start. The previous plugin's result is passed through unchanged. When the agent
//! cannot be reached or refuses, the ADD fails and the kubelet retries: a mesh pod never starts
//! uncaptured. `DEL`, `CHECK`, `STATUS` and `GC` succeed (pod removal follows the API server).

#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{Value, json};
use ztunnel::node::{CNI_SOCKET, CniAdd, CniReply};

const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error result (printed on stdout, exit 1).
fn fail(version: &str, code: u32, msg: &str, details: &str) -> std::process::ExitCode {
    let error = json!({"cniVersion": version, "code": code, "msg": msg, "details": details});
    println!("{error}");
    eprintln!("ambient-cni: {msg}: {details}");
    std::process::ExitCode::FAILURE
}

/// `K8S_POD_NAME=x;K8S_POD_NAMESPACE=y;...` → the value of `key`.
fn cni_arg(args: &str, key: &str) -> Option<String> {
    args.split(';').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v.to_owned()))
}

fn main() -> std::process::ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    if command != "VERSION" {
        let _ = std::io::stdin().take(1 << 20).read_to_string(&mut stdin);
    }
    let config: Value = serde_json::from_str(&stdin).unwrap_or(Value::Null);
    let version = config["cniVersion"].as_str().unwrap_or("1.0.0").to_owned();
    match command.as_str() {
        "VERSION" => {
            println!("{}", json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}));
            std::process::ExitCode::SUCCESS
        }
        "ADD" => add(&config, &version),
        "DEL" | "CHECK" | "STATUS" | "GC" => std::process::ExitCode::SUCCESS,
        other => fail(&version, 4, "unknown CNI_COMMAND", other),
    }
}

fn add(config: &Value, version: &str) -> std::process::ExitCode {
    if config.is_null() {
        return fail(version, 6, "cannot decode the network configuration on stdin", "not JSON");
    }
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    // The previous plugin's result is ours to pass on.
    let result = config.get("prevResult").cloned().unwrap_or_else(|| json!({"cniVersion": version}));
    let (Some(name), Some(namespace)) = (cni_arg(&args, "K8S_POD_NAME"), cni_arg(&args, "K8S_POD_NAMESPACE")) else {
        // Not a Kubernetes pod: nothing to do.
        println!("{result}");
        return std::process::ExitCode::SUCCESS;
    };
    let Ok(netns) = std::env::var("CNI_NETNS") else {
        return fail(version, 4, "CNI_NETNS is not set", "the runtime passed no network namespace");
    };
    let report =
        CniAdd { uid: cni_arg(&args, "K8S_POD_UID").unwrap_or_default(), namespace, name, netns: netns.into() };
    let socket = config["agent_socket"].as_str().unwrap_or(CNI_SOCKET);
    match ask(socket, &report) {
        Ok(CniReply { error: None, .. }) => {
            println!("{result}");
            std::process::ExitCode::SUCCESS
        }
        Ok(CniReply { error: Some(e), .. }) => fail(version, 999, "the node agent refused the pod", &e),
        Err(e) => fail(version, 999, "the node agent is unreachable", &format!("{socket}: {e}")),
    }
}

fn ask(socket: &str, report: &CniAdd) -> std::io::Result<CniReply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_string(report).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

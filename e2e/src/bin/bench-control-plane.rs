//! Control-plane scale benchmark.
//!
//! Writes a YAML directory with N pods / M services / P policies, starts the real `ca` binary on
//! it, connects C delta xDS clients (each its own HTTP/2 connection, subscribed to every Address
//! and Authorization, like ztunnels), then edits a file R times and measures how long until every
//! client holds the update. Reports the initial sync time, edit→all-clients latency (p50/max),
//! and the control plane's memory (RSS, from /proc) at that size, as a table and JSON.
//!
//! Build first: `cargo build --release -p ca -p e2e`.

#![allow(clippy::print_stdout)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use e2e::ca_process::{CaProcess, ca_binary, rss_mib};
use proto::api::envoy::config::core::v3::Node;
use proto::api::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use proto::api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use proto::api::type_url::{ADDRESS, AUTHORIZATION};
use proto::control::{ControlPlaneTarget, with_token};
use serde::Serialize;
use tokio::sync::{Barrier, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Measure the control plane at scale.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Pods.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Services (each selects pods/services of the pods in its namespace).
    #[arg(long, default_value_t = 1_000)]
    services: usize,
    /// AuthorizationPolicies.
    #[arg(long, default_value_t = 100)]
    policies: usize,
    /// Namespaces the objects are spread over.
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// Subscribed xDS clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Edits to time.
    #[arg(long, default_value_t = 10)]
    edits: usize,
    /// The `ca` binary (default: next to this one).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Also write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    pods: usize,
    services: usize,
    policies: usize,
    clients: usize,
    initial_sync_s: f64,
    snapshot_bytes_per_client: usize,
    edit_to_all_clients_p50_ms: f64,
    edit_to_all_clients_max_ms: f64,
    ca_rss_mib_idle_loaded: f64,
    ca_rss_mib_peak: f64,
}

fn pod_yaml(ns: usize, i: usize, ip_octet: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{i}\n  namespace: ns-{ns}\n  labels:\n    app: app-{app}\nspec:\n  nodeName: node-{node}\n  serviceAccountName: sa-{app}\n  containers:\n    - name: c\n      image: i\n      ports:\n        - name: http\n          containerPort: 8080\nstatus:\n  podIP: 10.{a}.{b}.{c}\n",
        app = i % 10,
        node = i % 50,
        a = 1 + ns / 200,
        b = ns % 200,
        c = ip_octet,
    )
}

fn namespace_file(args: &Args, ns: usize, generation: usize) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-{ns}\n  labels:\n    istio.io/dataplane-mode: ambient\n"
    );
    let pods = args.pods / args.namespaces;
    for i in 0..pods {
        // The edit moves pod 0 of the namespace to another IP.
        let octet = if i == 0 { 2 + (generation % 2) * 250 } else { 3 + i };
        out.push_str("---\n");
        out.push_str(&pod_yaml(ns, i, octet.min(254)));
    }
    let services = args.services / args.namespaces;
    for s in 0..services {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{s}\n  namespace: ns-{ns}\nspec:\n  clusterIP: 10.200.{ns_b}.{s}\n  selector:\n    app: app-{app}\n  ports:\n    - name: http\n      port: 80\n      targetPort: http\n",
            ns_b = ns % 250,
            s = s + 1,
            app = s % 10
        );
    }
    let policies = args.policies / args.namespaces;
    for p in 0..policies {
        let _ = write!(
            out,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: policy-{p}\n  namespace: ns-{ns}\nspec:\n  selector:\n    matchLabels:\n      app: app-{app}\n  rules:\n    - from:\n        - source:\n            principals: [\"cluster.local/ns/ns-{ns}/sa/sa-{other}\"]\n      to:\n        - operation:\n            ports: [\"8080\"]\n",
            app = p % 10,
            other = (p + 1) % 10
        );
    }
    out
}

fn write_atomic(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// One client: subscribes, then reports the generation (system_version_info) of every response
/// on `seen`, after the initial snapshot of both types.
async fn client(
    target: ControlPlaneTarget,
    token: String,
    id: usize,
    seen: mpsc::UnboundedSender<(usize, u64, usize)>,
    ready: Arc<Barrier>,
) -> Result<()> {
    let mut ads = AggregatedDiscoveryServiceClient::with_interceptor(target.channel()?, with_token(Some(token)))
        .max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(16);
    let mut responses = ads.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    for type_url in [ADDRESS, AUTHORIZATION] {
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node { id: format!("bench-{id}"), ..Default::default() }),
            type_url: type_url.into(),
            ..Default::default()
        })
        .await?;
    }
    let mut initial = 0;
    let mut bytes = 0;
    let mut generation = 0;
    while let Some(r) = responses.message().await? {
        generation = r.system_version_info.parse().unwrap_or(generation);
        bytes += r.resources.iter().map(|x| x.resource.as_ref().map_or(0, |a| a.value.len())).sum::<usize>();
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
        if initial < 2 {
            initial += 1;
            if initial == 2 {
                let _ = seen.send((id, generation, bytes));
                ready.wait().await;
            }
            continue;
        }
        let _ = seen.send((id, generation, bytes));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let ca_bin = ca_binary(args.ca.as_deref())?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    for ns in 0..args.namespaces {
        write_atomic(&config.join(format!("ns-{ns}.yaml")), &namespace_file(&args, ns, 0))?;
    }
    let log = std::env::var("CA_LOG").ok();
    let ca = CaProcess::start(&ca_bin, &config, &dir.path().join("state"), log.as_deref())?;
    let pid = ca.pid();
    let target = ca.target(None)?;

    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let ready = Arc::new(Barrier::new(args.clients + 1));
    let started = Instant::now();
    // Set once measuring is over: streams then end because the CA is stopped, which is no error.
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for id in 0..args.clients {
        let (target, seen, ready) = (target.clone(), seen_tx.clone(), ready.clone());
        let token = ca.token("istio-system", "ztunnel", Some(&format!("node-{}", id % 50)))?;
        let finished = finished.clone();
        tokio::spawn(async move {
            if let Err(e) = client(target, token, id, seen, ready).await
                && !finished.load(std::sync::atomic::Ordering::Relaxed)
            {
                eprintln!("client {id}: {e}");
            }
        });
    }
    let mut snapshot_bytes = 0;
    // The newest state generation any client holds.
    let mut newest = 0u64;
    for _ in 0..args.clients {
        let (_, generation, bytes) =
            tokio::time::timeout(Duration::from_secs(300), seen_rx.recv()).await?.context("clients gone")?;
        snapshot_bytes = bytes;
        newest = newest.max(generation);
    }
    ready.wait().await;
    let initial_sync = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_loaded, _) = rss_mib(pid)?;

    let mut latencies = Vec::new();
    for edit in 0..args.edits {
        let ns = edit % args.namespaces;
        // Each edit moves pod 0 of one namespace to its other IP: exactly one workload changes.
        let content = namespace_file(&args, ns, edit / args.namespaces + 1);
        let t0 = Instant::now();
        write_atomic(&config.join(format!("ns-{ns}.yaml")), &content)?;
        // Done when every client holds a state newer than the one before the edit.
        let mut have = std::collections::HashSet::new();
        let mut round_newest = newest;
        while have.len() < args.clients {
            let (id, generation, _) =
                tokio::time::timeout(Duration::from_secs(30), seen_rx.recv()).await?.context("clients gone")?;
            if generation > newest {
                have.insert(id);
                round_newest = round_newest.max(generation);
            }
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
        newest = round_newest;
        // Let stragglers (e.g. the same update on the other type) drain before the next edit.
        while let Ok(Some((_, generation, _))) = tokio::time::timeout(Duration::from_millis(200), seen_rx.recv()).await
        {
            newest = newest.max(generation);
        }
    }
    let (_, rss_peak) = rss_mib(pid)?;
    latencies.sort_by(f64::total_cmp);

    let report = Report {
        pods: args.pods,
        services: args.services,
        policies: args.policies,
        clients: args.clients,
        initial_sync_s: initial_sync.as_secs_f64(),
        snapshot_bytes_per_client: snapshot_bytes,
        edit_to_all_clients_p50_ms: latencies[latencies.len() / 2],
        edit_to_all_clients_max_ms: *latencies.last().unwrap_or(&0.0),
        ca_rss_mib_idle_loaded: rss_loaded,
        ca_rss_mib_peak: rss_peak,
    };
    println!(
        "control plane: {} pods, {} services, {} policies; {} xDS clients",
        report.pods, report.services, report.policies, report.clients
    );
    println!(
        "  initial sync, all clients:     {:>9.2} s ({} KiB per client)",
        report.initial_sync_s,
        snapshot_bytes / 1024
    );
    println!("  file edit -> all clients, p50: {:>9.1} ms", report.edit_to_all_clients_p50_ms);
    println!("  file edit -> all clients, max: {:>9.1} ms", report.edit_to_all_clients_max_ms);
    println!(
        "  ca memory (RSS) loaded:        {:>9.1} MiB (peak {:.1} MiB)",
        report.ca_rss_mib_idle_loaded, report.ca_rss_mib_peak
    );
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json)?;
    }
    finished.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(ca);
    Ok(())
}

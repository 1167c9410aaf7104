//! HTTP through a waypoint against the same without one, in one run, on the one-machine topology
//! (real `ca`, `ztunnel` and `waypoint` processes).
//!
//! Two ambient namespaces, each with a client pod on node-1 and a server pod on node-2 behind a
//! service: `l4` has no waypoint (client → ztunnel → HBONE → ztunnel → server), `l7` has one on
//! node-2 (client → ztunnel → waypoint → ztunnel → server). For each: HTTP/1.1 keep-alive
//! requests per second with 1 KiB responses over `--connections` connections, and latency p50/p99;
//! for the waypoint, its CPU time per second of load, as cores and per 1,000 requests/s.
//! Ingress: a client outside the mesh and the nodes, straight to the `l4` server pod and through
//! an ingress gateway (`waypoint --ingress` on node-1, an Istio Gateway + VirtualService): the
//! same figures, and the gateway's requests per core.
//! The server app runs as its own process in the server pod. Table and JSON.
//!
//! Scale: requests/s through the waypoint again with the proxies' state padded to 10,000
//! workloads, 1,000 services, 1,000 L4 and 1,000 L7 policies that have nothing to do with the
//! measured requests ([`e2e::scale`]), between two rounds without it (`--pad-workloads 0` skips
//! it; `--scale-only` measures only this).
//!
//! Tracing (`--tracing-only`): the waypoint's requests/s per core with spans off, at 1 % and at
//! 100 % sampling (the Telemetry API, a real OTLP collector in this process), in alternating
//! rounds (`--tracing-rounds`), with the spans the collector received per request.
//!
//! Needs root, iproute2 and nftables; build first:
//! `cargo build --release -p ca -p ztunnel -p waypoint -p e2e`.

#![allow(clippy::print_stdout)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use e2e::ca_process::{KillOnDrop, cpu_seconds, spawn_child_with, wait_for_port};
use e2e::load::percentile;
use e2e::mesh::{CA_IP, Mesh, MeshOptions, MeshPod, PodSpec, http_exchange, http_exchange_as};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use serde::Serialize;
use ztunnel::netns::NetNs;

/// Benchmark HTTP through a waypoint against the same without one.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Seconds of load per path.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Keep-alive connections, each sending one request after another.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Response body size in bytes.
    #[arg(long, default_value_t = 1024)]
    response_bytes: usize,
    /// RUST_LOG for the mesh's processes (`info` writes one access-log line per request on the
    /// waypoint, as in production).
    #[arg(long, default_value = "info")]
    log_filter: String,
    #[command(flatten)]
    scale: e2e::scale::ScaleArgs,
    /// Measure only the cost of tracing: spans off, at 1 % and at 100 % sampling.
    #[arg(long)]
    tracing_only: bool,
    /// Rounds of the tracing measurement (each: off, 1 %, 100 %).
    #[arg(long, default_value_t = 3)]
    tracing_rounds: usize,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// (internal) Serve HTTP on this IP, port 8080, and nothing else.
    #[arg(long, hide = true)]
    serve: Option<IpAddr>,
}

#[derive(Debug, Serialize)]
struct PathResult {
    requests: u64,
    requests_per_s: f64,
    latency_p50_us: f64,
    latency_p99_us: f64,
}

/// Requests/s through the waypoint with a small state and with a padded one.
#[derive(Debug, Serialize)]
struct Scale {
    /// Workloads the waypoint held in the small mesh.
    small_workloads: usize,
    padded_workloads: usize,
    padded_services: usize,
    padded_l4_policies: usize,
    padded_l7_policies: usize,
    /// Requests/s: small, padded, small again.
    requests_per_s: [f64; 3],
    /// padded / mean of the two small rounds.
    padded_ratio: f64,
}

/// Requests/s through the waypoint, small, padded, then small again.
async fn scale(
    mesh: &Mesh,
    waypoint: &MeshPod,
    (client, target): &(Arc<MeshPod>, SocketAddr),
    args: &Args,
) -> Result<Scale> {
    let small_workloads = mesh.waypoint_config(waypoint).await?["waypoint"]["workloads"].as_u64().unwrap_or(0) as usize;
    let padding = args.scale.padding(true);
    let timeout = Duration::from_secs(300);
    let small = load(client, *target, args).await?.requests_per_s;
    padding.apply(mesh, &[1, 2], timeout).await?;
    padding.wait_for_waypoint(mesh, waypoint, timeout).await?;
    let padded = load(client, *target, args).await?.requests_per_s;
    padding.remove(mesh, &[1, 2], small_workloads, timeout).await?;
    padding.wait_for_waypoint_to_drop(mesh, waypoint, small_workloads, timeout).await?;
    let small_again = load(client, *target, args).await?.requests_per_s;
    Ok(Scale {
        small_workloads,
        padded_workloads: args.scale.pad_workloads,
        padded_services: args.scale.pad_services,
        padded_l4_policies: args.scale.pad_policies,
        padded_l7_policies: args.scale.pad_policies,
        requests_per_s: [small, padded, small_again],
        padded_ratio: padded / ((small + small_again) / 2.0),
    })
}

fn print_scale(s: &Scale) {
    let [small, padded, again] = s.requests_per_s;
    println!(
        "waypoint requests/s with {} workloads: {small:.0}, then {again:.0}; with {} workloads, {} services, {} L4 and {} L7 policies: {padded:.0} ({:.3} of small)",
        s.small_workloads,
        s.padded_workloads,
        s.padded_services,
        s.padded_l4_policies,
        s.padded_l7_policies,
        s.padded_ratio
    );
}

#[derive(Debug, Serialize)]
struct Report {
    connections: usize,
    response_bytes: usize,
    without_waypoint: PathResult,
    with_waypoint: PathResult,
    /// with / without requests per second.
    throughput_ratio: f64,
    /// with − without p50, µs.
    added_latency_p50_us: f64,
    /// Waypoint CPU during its run, in cores.
    waypoint_cores: f64,
    /// Waypoint cores per 1,000 requests/s.
    waypoint_cores_per_1k_rps: f64,
    /// Requests per second one waypoint core handles.
    requests_per_waypoint_core: f64,
    /// An outside client (not in the mesh, not on a node) straight to the server pod (its ztunnel
    /// takes plaintext in, PERMISSIVE), and the same through the ingress gateway (node-1) into
    /// the mesh over HBONE.
    ingress: Ingress,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<Scale>,
}

#[derive(Debug, Serialize)]
struct Ingress {
    direct_to_pod: PathResult,
    through_gateway: PathResult,
    /// through / direct requests per second.
    throughput_ratio: f64,
    /// through − direct p50, µs.
    added_latency_p50_us: f64,
    /// Gateway CPU during its run, in cores.
    gateway_cores: f64,
    /// Requests per second one gateway core handles.
    requests_per_gateway_core: f64,
}

const APP_PORT: u16 = 8080;

/// Keep-alive HTTP/1.1 load from `client` to `target` for `duration`.
async fn load(client: &Arc<MeshPod>, target: SocketAddr, args: &Args) -> Result<PathResult> {
    load_from(&client.netns.ns, target, &target.to_string(), args).await
}

/// Keep-alive HTTP/1.1 load from inside `netns` to `target`, naming `host`, for `duration`.
async fn load_from(netns: &NetNs, target: SocketAddr, host: &str, args: &Args) -> Result<PathResult> {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let path = format!("/bytes/{}", args.response_bytes);
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (netns, path, size, host) = (netns.clone(), path.clone(), args.response_bytes, host.to_owned());
        tasks.push(tokio::spawn(async move {
            let stream = netns.tcp_socket(target.is_ipv6())?.connect(target).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut samples = Vec::new();
            while Instant::now() < deadline {
                let req = hyper::Request::get(path.as_str())
                    .header(hyper::header::HOST, host.as_str())
                    .body(Empty::<Bytes>::new())?;
                let start = Instant::now();
                let resp = sender.send_request(req).await?;
                ensure!(resp.status() == 200, "answered {}", resp.status());
                let body = resp.into_body().collect().await?.to_bytes();
                samples.push(start.elapsed());
                ensure!(body.len() == size, "{} of {size} response bytes", body.len());
            }
            Ok::<_, anyhow::Error>(samples)
        }));
    }
    let start = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(PathResult {
        requests: all.len() as u64,
        requests_per_s: all.len() as f64 / elapsed,
        latency_p50_us: percentile(&mut all, 0.50),
        latency_p99_us: percentile(&mut all, 0.99),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(ip) = args.serve {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, APP_PORT)).await?;
            e2e::apps::http_server(listener, "server").await?;
            Ok(())
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

/// An ingress gateway on node-1 routing `bench.example` to the `l4` server, and a client outside
/// the mesh and the nodes: load straight to the server pod, then through the gateway.
async fn ingress(mesh: &mut Mesh, server: &MeshPod, args: &Args) -> Result<Ingress> {
    mesh.apply(
        "bench-gateway",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: bench, namespace: l4}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [bench.example]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bench, namespace: l4}\nspec:\n  hosts: [bench.example]\n  gateways: [bench]\n  http:\n  - route: [{destination: {host: server}}]\n",
    )?;
    let gateway =
        mesh.ingress_gateway("istio-system", "istio-ingressgateway", 1, &[("istio", "ingressgateway")]).await?;
    let outside = mesh.outside_client(1)?;
    let through = SocketAddr::from((gateway.ip, 80));
    mesh.wait_until("the ingress gateway to route", Duration::from_secs(30), || async {
        http_exchange_as(&outside.ns, "bench.example", through, "/", &[]).await.is_ok_and(|a| a.status == 200)
    })
    .await?;
    let direct_to_pod = load_from(&outside.ns, server.addr(APP_PORT), "bench.example", args).await?;
    let pid = mesh.waypoint_pid(&gateway).context("the gateway is not running")?;
    let (cpu_before, start) = (cpu_seconds(pid)?, Instant::now());
    let through_gateway = load_from(&outside.ns, through, "bench.example", args).await?;
    let gateway_cores = (cpu_seconds(pid)? - cpu_before) / start.elapsed().as_secs_f64();
    Ok(Ingress {
        throughput_ratio: through_gateway.requests_per_s / direct_to_pod.requests_per_s,
        added_latency_p50_us: through_gateway.latency_p50_us - direct_to_pod.latency_p50_us,
        requests_per_gateway_core: through_gateway.requests_per_s / gateway_cores,
        gateway_cores,
        direct_to_pod,
        through_gateway,
    })
}

/// One setting of the tracing measurement.
#[derive(Debug, Serialize)]
struct TracingSetting {
    /// `off`, `1%` or `100%`.
    setting: &'static str,
    /// Requests/s per waypoint core, each round.
    requests_per_core: Vec<f64>,
    /// Their median.
    median_requests_per_core: f64,
    /// Its ratio to spans off (medians).
    ratio_to_off: f64,
    /// Spans the collector received per request (all rounds).
    spans_per_request: f64,
}

/// The waypoint's requests/s per core with tracing off, at 1 % and at 100 %, alternating.
async fn tracing_cost(
    mesh: &Mesh,
    waypoint: &MeshPod,
    (client, target): &(Arc<MeshPod>, SocketAddr),
    args: &Args,
) -> Result<Vec<TracingSetting>> {
    const COLLECTOR_PORT: u16 = 4317;
    ensure!(args.tracing_rounds > 0, "--tracing-rounds must be at least 1");
    let collector = e2e::otlp::Collector::serve(&mesh.underlay.ns, SocketAddr::from((CA_IP, COLLECTOR_PORT)))?;
    mesh.apply(
        "mesh-config",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |\n    extensionProviders:\n      - name: otel\n        opentelemetry:\n          service: {CA_IP}\n          port: {COLLECTOR_PORT}\n"
        ),
    )?;
    let pid = mesh.waypoint_pid(waypoint).context("the waypoint is not running")?;
    let settings: [(&'static str, Option<f64>); 3] = [("off", None), ("1%", Some(1.0)), ("100%", Some(100.0))];
    let mut per_core: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    let mut spans = vec![(0usize, 0u64); settings.len()];
    let switches =
        |log: &str| log.matches("tracing: exporting spans").count() + log.matches("tracing: no spans reported").count();
    for round in 0..args.tracing_rounds {
        for (i, (label, percent)) in settings.iter().enumerate() {
            let before = switches(&mesh.waypoint_log(waypoint)?);
            match percent {
                None if round == 0 => {}
                None => mesh.delete("telemetry-bench")?,
                Some(p) => mesh.apply(
                    "telemetry-bench",
                    &format!(
                        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n  name: bench\n  namespace: istio-system\nspec:\n  tracing:\n    - providers: [{{name: otel}}]\n      randomSamplingPercentage: {p}\n"
                    ),
                )?,
            }
            // The very first "off" is the waypoint's state already: nothing to wait for.
            if round > 0 || i > 0 {
                mesh.wait_until(&format!("tracing {label} at the waypoint"), Duration::from_secs(30), || async {
                    mesh.waypoint_log(waypoint).is_ok_and(|l| switches(&l) > before)
                })
                .await?;
            }
            let spans_before = collector.count();
            let (cpu_before, start) = (cpu_seconds(pid)?, Instant::now());
            let r = load(client, *target, args).await?;
            let cores = (cpu_seconds(pid)? - cpu_before) / start.elapsed().as_secs_f64();
            // The last batch leaves within a second.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            spans[i].0 += collector.count() - spans_before;
            spans[i].1 += r.requests;
            per_core[i].push(r.requests_per_s / cores);
            println!(
                "round {}: tracing {label:<5} {:>8.0} requests/s, {:.2} cores, {:>8.0} per core, {} spans",
                round + 1,
                r.requests_per_s,
                cores,
                r.requests_per_s / cores,
                collector.count() - spans_before
            );
        }
    }
    mesh.delete("telemetry-bench")?;
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let off = median(&per_core[0]);
    Ok(settings
        .iter()
        .enumerate()
        .map(|(i, (label, _))| TracingSetting {
            setting: label,
            median_requests_per_core: median(&per_core[i]),
            ratio_to_off: median(&per_core[i]) / off,
            requests_per_core: per_core[i].clone(),
            spans_per_request: spans[i].0 as f64 / spans[i].1.max(1) as f64,
        })
        .collect())
}

fn service(name: &str, namespace: &str, vip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {vip}\n  selector:\n    app: {name}\n  ports:\n    - name: http\n      port: 80\n      targetPort: {APP_PORT}\n"
    )
}

async fn run(args: Args) -> Result<()> {
    ztunnel::raise_open_files_limit();
    let mut mesh = Mesh::start(MeshOptions { log_filter: args.log_filter.clone(), ..MeshOptions::default() })?;
    let mut servers = Vec::new();
    let mut server_pods = Vec::new();
    let mut paths = Vec::new();
    for (ns, vip) in [("l4", Ipv4Addr::new(10, 96, 5, 10)), ("l7", Ipv4Addr::new(10, 96, 6, 10))] {
        mesh.namespace(ns, true).await?;
        let client = mesh.pod(PodSpec::new("client", ns, 1)).await?;
        let server = mesh.pod(PodSpec::new("server", ns, 2).label("app", "server")).await?;
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["--serve", &server.ip.to_string()]);
        let mut child = spawn_child_with(&command, Some(&server.netns.ns), Stdio::null(), Stdio::inherit())?;
        wait_for_port(&mut child, "HTTP server", server.addr(APP_PORT), Some(&server.netns.ns))?;
        servers.push(KillOnDrop(child));
        server_pods.push(server.clone());
        mesh.apply(&format!("svc-{ns}"), &service("server", ns, vip))?;
        paths.push((client, SocketAddr::from((vip, 80))));
    }
    let waypoint = mesh.waypoint("l7", "waypoint", 2, Ipv4Addr::new(10, 96, 6, 2)).await?;
    mesh.use_waypoint("l7", Some("waypoint"))?;
    mesh.settle(&[], &[]).await?;
    for (client, target) in &paths {
        let what = format!("{target} reachable");
        mesh.wait_until(&what, Duration::from_secs(30), || async {
            http_exchange(&client.netns.ns, "GET", *target, "/", &[]).await.is_ok_and(|a| a.status == 200)
        })
        .await?;
    }
    let (client, target) = &paths[1];
    mesh.wait_until("traffic to l7 to cross the waypoint", Duration::from_secs(30), || async {
        let ok = http_exchange(&client.netns.ns, "GET", *target, "/", &[]).await.is_ok_and(|a| a.status == 200);
        let m = mesh.waypoint_metrics(&waypoint).await.unwrap_or_default();
        ok && m.contains("server.l7.svc.cluster.local")
    })
    .await?;
    if args.tracing_only {
        let report = tracing_cost(&mesh, &waypoint, &paths[1], &args).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if args.scale.scale_only {
        let scale = scale(&mesh, &waypoint, &paths[1], &args).await?;
        print_scale(&scale);
        println!("{}", serde_json::to_string_pretty(&scale)?);
        return Ok(());
    }

    let without = load(&paths[0].0, paths[0].1, &args).await?;
    let pid = mesh.waypoint_pid(&waypoint).context("the waypoint is not running")?;
    let (cpu_before, start) = (cpu_seconds(pid)?, Instant::now());
    let with = load(&paths[1].0, paths[1].1, &args).await?;
    let cores = (cpu_seconds(pid)? - cpu_before) / start.elapsed().as_secs_f64();
    let ingress = ingress(&mut mesh, &server_pods[0], &args).await?;
    let scale =
        if args.scale.pad_workloads > 0 { Some(scale(&mesh, &waypoint, &paths[1], &args).await?) } else { None };
    drop(servers);

    let report = Report {
        connections: args.connections,
        response_bytes: args.response_bytes,
        throughput_ratio: with.requests_per_s / without.requests_per_s,
        added_latency_p50_us: with.latency_p50_us - without.latency_p50_us,
        waypoint_cores: cores,
        waypoint_cores_per_1k_rps: cores / (with.requests_per_s / 1000.0),
        requests_per_waypoint_core: with.requests_per_s / cores,
        without_waypoint: without,
        with_waypoint: with,
        ingress,
        scale,
    };
    println!("HTTP/1.1 keep-alive, {} connections, {} B responses", report.connections, report.response_bytes);
    println!("{:<22} {:>12} {:>12} {:>12}", "", "requests/s", "p50 (µs)", "p99 (µs)");
    for (name, r) in [("without waypoint", &report.without_waypoint), ("with waypoint", &report.with_waypoint)] {
        println!("{name:<22} {:>12.0} {:>12.1} {:>12.1}", r.requests_per_s, r.latency_p50_us, r.latency_p99_us);
    }
    println!(
        "waypoint: {:.2} cores at {:.0} requests/s = {:.3} cores per 1,000 requests/s, {:.0} requests/s per core",
        report.waypoint_cores,
        report.with_waypoint.requests_per_s,
        report.waypoint_cores_per_1k_rps,
        report.requests_per_waypoint_core
    );
    let i = &report.ingress;
    for (name, r) in [("outside → pod", &i.direct_to_pod), ("outside → gateway", &i.through_gateway)] {
        println!("{name:<22} {:>12.0} {:>12.1} {:>12.1}", r.requests_per_s, r.latency_p50_us, r.latency_p99_us);
    }
    println!(
        "ingress gateway: {:.2} cores at {:.0} requests/s = {:.0} requests/s per core; {:.3} of direct, +{:.1} µs p50",
        i.gateway_cores,
        i.through_gateway.requests_per_s,
        i.requests_per_gateway_core,
        i.throughput_ratio,
        i.added_latency_p50_us
    );
    if let Some(scale) = &report.scale {
        print_scale(scale);
    }
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

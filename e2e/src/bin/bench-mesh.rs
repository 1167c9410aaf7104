//! The mesh against direct connections, in one run, on the one-machine topology: real namespaces,
//! capture rules, `ca` and one `ztunnel` per node as processes.
//!
//! Two pairs of pods, each a client on node-1 and a server on node-2: one pair in a namespace
//! outside the mesh (`direct`: pod → pod over the bridges and the underlay), one in an ambient
//! namespace (`mesh`: pod → ztunnel → HBONE → ztunnel → pod). Measured for each: one-stream
//! throughput, 1 KiB request/response latency (p50/p99), new connections per second; and for the
//! mesh, the memory each ztunnel adds per open connection with 1,000 idle connections. Reports a
//! table and JSON, with the mesh as a ratio to direct. Client, servers and both ztunnels share the
//! machine's cores.
//!
//! Needs root, iproute2 and nftables; build first: `cargo build --release -p ca -p ztunnel -p e2e`.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use e2e::ca_process::rss_mib;
use e2e::load::{connection_rate, latency, median, serve_echo, serve_ping, serve_sink, throughput};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Benchmark the mesh against direct pod-to-pod connections.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Bytes per throughput round.
    #[arg(long, default_value_t = 512 << 20)]
    bytes: u64,
    /// Throughput rounds per path (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// 1 KiB request/response exchanges per latency measurement.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Seconds of the connection-rate measurement, per path.
    #[arg(long, default_value_t = 5)]
    rate_seconds: u64,
    /// Connections opened at once in the connection-rate measurement.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Idle connections held open for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// RUST_LOG for ztunnel and the CA (`info` writes one access-log line per connection, as in
    /// production).
    #[arg(long, default_value = "info")]
    log_filter: String,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct PathResult {
    throughput_gbit_s: f64,
    latency_p50_us: f64,
    latency_p99_us: f64,
    connections_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Memory {
    idle_connections: usize,
    /// Growth of the client node's ztunnel (source side), KiB per connection.
    source_ztunnel_kib_per_conn: f64,
    /// Growth of the server node's ztunnel (destination side), KiB per connection.
    destination_ztunnel_kib_per_conn: f64,
    source_ztunnel_rss_mib: [f64; 2],
    destination_ztunnel_rss_mib: [f64; 2],
}

#[derive(Debug, Serialize)]
struct Report {
    direct: PathResult,
    mesh: PathResult,
    /// mesh / direct throughput.
    throughput_ratio: f64,
    /// mesh − direct p50 latency, µs.
    added_latency_p50_us: f64,
    /// mesh − direct p99 latency, µs.
    added_latency_p99_us: f64,
    /// mesh / direct connection rate.
    connection_rate_ratio: f64,
    memory: Memory,
}

const SINK: u16 = 5001;
const ECHO: u16 = 5002;
const PING: u16 = 5003;

async fn measure(client: &Arc<MeshPod>, server: &MeshPod, args: &Args) -> Result<PathResult> {
    let mut rounds = Vec::new();
    for _ in 0..args.rounds.max(1) {
        rounds.push(throughput(client.connect(server.addr(SINK)).await?, args.bytes).await?);
    }
    let (p50, p99) = latency(client.connect(server.addr(ECHO)).await?, args.requests).await?;
    let (c, target) = (client.clone(), server.addr(PING));
    let rate = connection_rate(
        move || {
            let c = c.clone();
            async move { c.connect(target).await }
        },
        Duration::from_secs(args.rate_seconds),
        args.concurrency,
    )
    .await?;
    Ok(PathResult {
        throughput_gbit_s: median(rounds),
        latency_p50_us: p50,
        latency_p99_us: p99,
        connections_per_s: rate,
    })
}

async fn memory(mesh: &Mesh, client: &MeshPod, server: &MeshPod, idle: usize) -> Result<Memory> {
    let pids = [mesh.nodes[0].ztunnel_pid(), mesh.nodes[1].ztunnel_pid()];
    let [Some(src), Some(dst)] = pids else { anyhow::bail!("a ztunnel is not running") };
    // Let earlier measurements' connections close and buffers shrink.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = (rss_mib(src)?.0, rss_mib(dst)?.0);
    let mut held = Vec::with_capacity(idle);
    for _ in 0..idle {
        let mut s = client.connect(server.addr(ECHO)).await?;
        let mut buf = [1u8; e2e::load::MESSAGE];
        s.write_all(&buf).await?;
        s.read_exact(&mut buf).await.context("idle connection did not echo")?;
        held.push(s);
    }
    // Idle long enough for read buffers to drop back to their minimum.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = (rss_mib(src)?.0, rss_mib(dst)?.0);
    drop(held);
    let per = |b: f64, a: f64| (a - b) * 1024.0 / idle as f64;
    Ok(Memory {
        idle_connections: idle,
        source_ztunnel_kib_per_conn: per(before.0, after.0),
        destination_ztunnel_kib_per_conn: per(before.1, after.1),
        source_ztunnel_rss_mib: [before.0, after.0],
        destination_ztunnel_rss_mib: [before.1, after.1],
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    ztunnel::raise_open_files_limit();
    let mut mesh = Mesh::start(MeshOptions { log_filter: args.log_filter.clone(), ..MeshOptions::default() })?;
    mesh.namespace("direct", false).await?;
    mesh.namespace("mesh", true).await?;
    let mut pairs = Vec::new();
    for ns in ["direct", "mesh"] {
        let client = mesh.pod(PodSpec::new("client", ns, 1)).await?;
        let server = mesh.pod(PodSpec::new("server", ns, 2)).await?;
        serve_sink(server.listen(SINK)?);
        serve_echo(server.listen(ECHO)?);
        serve_ping(server.listen(PING)?);
        pairs.push((client, server));
    }
    mesh.settle(&[], &[]).await?;

    let direct = measure(&pairs[0].0, &pairs[0].1, &args).await?;
    let through = measure(&pairs[1].0, &pairs[1].1, &args).await?;
    let memory = memory(&mesh, &pairs[1].0, &pairs[1].1, args.idle).await?;
    let report = Report {
        throughput_ratio: through.throughput_gbit_s / direct.throughput_gbit_s,
        added_latency_p50_us: through.latency_p50_us - direct.latency_p50_us,
        added_latency_p99_us: through.latency_p99_us - direct.latency_p99_us,
        connection_rate_ratio: through.connections_per_s / direct.connections_per_s,
        direct,
        mesh: through,
        memory,
    };

    println!("{:<28} {:>12} {:>12} {:>10}", "", "direct", "mesh", "mesh/direct");
    let row = |name: &str, d: f64, m: f64, unit: &str| {
        println!("{name:<28} {d:>10.2}{unit:<2} {m:>10.2}{unit:<2} {:>10.2}", m / d);
    };
    row("throughput (Gbit/s)", report.direct.throughput_gbit_s, report.mesh.throughput_gbit_s, "");
    row("latency p50 (µs)", report.direct.latency_p50_us, report.mesh.latency_p50_us, "");
    row("latency p99 (µs)", report.direct.latency_p99_us, report.mesh.latency_p99_us, "");
    row("new connections/s", report.direct.connections_per_s, report.mesh.connections_per_s, "");
    println!("added latency p50/p99: {:.1} / {:.1} µs", report.added_latency_p50_us, report.added_latency_p99_us);
    println!(
        "ztunnel memory per idle connection ({}): source {:.2} KiB, destination {:.2} KiB",
        report.memory.idle_connections,
        report.memory.source_ztunnel_kib_per_conn,
        report.memory.destination_ztunnel_kib_per_conn
    );
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

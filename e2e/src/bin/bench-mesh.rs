//! The mesh against direct connections, in one run, on the one-machine topology: real namespaces,
//! capture rules, `ca` and one `ztunnel` per node as processes.
//!
//! Two pairs of pods, each a client on node-1 and a server on node-2: one pair in a namespace
//! outside the mesh (`direct`: pod → pod over the bridges and the underlay), one in an ambient
//! namespace (`mesh`: pod → ztunnel → HBONE → ztunnel → pod). Measured for each: one-stream
//! throughput, 1 KiB request/response latency (p50/p99), new connections per second; and for the
//! mesh, the CPU both ztunnels spend per GiB carried and per request, and the memory each adds per
//! open connection with 1,000 idle connections. Reports a table and JSON, with the mesh as a ratio to direct.
//! Client, servers and both ztunnels share the machine's cores.
//!
//! Scale: the mesh's connection rate again with the proxies' state padded to 10,000 workloads,
//! 1,000 services and 1,000 policies that have nothing to do with the measured pair
//! ([`e2e::scale`]), between two rounds without it, through the server's service VIP: what a
//! connection's lookups, endpoint pick and policy check cost as the mesh grows (`--pad-workloads 0` skips it; `--scale-only` measures only this).
//!
//! The server apps run as their own process in the server pod (this binary with `--serve`), as a
//! real pod's would: a client and server sharing one thread would make the direct path's round
//! trip free of any process wakeup, which no pair of pods gets.
//!
//! Calibration: the same latency measurement over loopback, direct and through two plain TCP
//! relays (separate processes, no TLS, no HTTP/2): what two extra process hops cost on this
//! machine whatever they do, the floor under the mesh's added latency.
//!
//! Needs root, iproute2 and nftables; build first: `cargo build --release -p ca -p ztunnel -p e2e`.

#![allow(clippy::print_stdout)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use e2e::ca_process::{KillOnDrop, cpu_seconds, rss_mib, spawn_child_with, wait_for_port};
use e2e::load::{connection_rate, latency, median, serve_echo, serve_ping, serve_sink, throughput};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
    #[command(flatten)]
    scale: e2e::scale::ScaleArgs,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// (internal) Run the sink, echo and ping servers on this IP (ports 5001–5003) and nothing else.
    #[arg(long, hide = true)]
    serve: Option<std::net::IpAddr>,
    /// (internal) Relay plain TCP from the first address to the second and nothing else.
    #[arg(long, hide = true, num_args = 2, value_names = ["LISTEN", "TARGET"])]
    relay: Option<Vec<SocketAddr>>,
}

#[derive(Debug, Serialize)]
struct PathResult {
    throughput_gbit_s: f64,
    latency_p50_us: f64,
    latency_p99_us: f64,
    connections_per_s: f64,
    /// CPU both ztunnels spent per latency round trip, µs (mesh only): their whole cost per
    /// request, user space and kernel, whatever the wake-up latency of the machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    ztunnel_cpu_us_per_request: Option<f64>,
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

/// Two plain TCP relays over loopback, against a direct loopback connection.
#[derive(Debug, Serialize)]
struct Calibration {
    direct_p50_us: f64,
    relayed_p50_us: f64,
    /// relayed − direct p50, µs: the cost of two process hops on this machine.
    added_p50_us: f64,
}

/// The mesh's connection rate with a small state and with a padded one.
#[derive(Debug, Serialize)]
struct Scale {
    /// Workloads each ztunnel held in the small mesh.
    small_workloads: usize,
    /// Workloads, services and policies each ztunnel held in the padded mesh.
    padded_workloads: usize,
    padded_services: usize,
    padded_policies: usize,
    /// New connections/s through the mesh: small, padded, small again.
    connections_per_s: [f64; 3],
    /// padded / mean of the two small rounds.
    padded_ratio: f64,
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
    /// CPU seconds both ztunnels together spent per GiB of one-stream throughput (both ends of the
    /// tunnel: read, encrypt, frame, and decrypt, unframe, write).
    ztunnel_cpu_s_per_gib: f64,
    memory: Memory,
    calibration: Calibration,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<Scale>,
}

/// A client pod and a server pod.
type Pair = (Arc<MeshPod>, Arc<MeshPod>);

const SINK: u16 = 5001;
const ECHO: u16 = 5002;
const PING: u16 = 5003;
/// The mesh server's service, for the scale check.
const SCALE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 10);

/// One-stream throughput rounds, alternating direct and mesh so that drift in the machine's speed
/// over the run lands on both alike. Returns the medians (Gbit/s) and the CPU both ztunnels used
/// per GiB carried during the mesh rounds.
async fn throughputs(ztunnels: [u32; 2], direct: &Pair, meshed: &Pair, args: &Args) -> Result<(f64, f64, f64)> {
    let (mut d, mut m, mut ztunnel_cpu) = (Vec::new(), Vec::new(), 0.0);
    for _ in 0..args.rounds.max(1) {
        d.push(throughput(direct.0.connect(direct.1.addr(SINK)).await?, args.bytes).await?);
        let before = cpu_of(ztunnels)?;
        m.push(throughput(meshed.0.connect(meshed.1.addr(SINK)).await?, args.bytes).await?);
        ztunnel_cpu += cpu_of(ztunnels)? - before;
    }
    let gib = (args.bytes as f64 * args.rounds.max(1) as f64) / f64::from(1u32 << 30);
    Ok((median(d), median(m), ztunnel_cpu / gib))
}

/// The ztunnels of the client's node and the server's node.
fn ztunnel_pids(mesh: &Mesh) -> Result<[u32; 2]> {
    match [mesh.nodes[0].ztunnel_pid(), mesh.nodes[1].ztunnel_pid()] {
        [Some(src), Some(dst)] => Ok([src, dst]),
        _ => anyhow::bail!("a ztunnel is not running"),
    }
}

/// CPU seconds `pids` have used so far, together.
fn cpu_of(pids: [u32; 2]) -> Result<f64> {
    Ok(cpu_seconds(pids[0])? + cpu_seconds(pids[1])?)
}

/// Latency and connection rate of one path; with `ztunnels`, also the CPU they spend per request.
async fn measure(
    (client, server): &Pair,
    throughput_gbit_s: f64,
    args: &Args,
    ztunnels: Option<[u32; 2]>,
) -> Result<PathResult> {
    let stream = client.connect(server.addr(ECHO)).await?;
    let before = ztunnels.map(|pids| cpu_of(pids).map(|cpu| (pids, cpu))).transpose()?;
    let (p50, p99) = latency(stream, args.requests).await?;
    // `latency` also makes 100 unmeasured warm-up exchanges.
    let ztunnel_cpu_us_per_request = before
        .map(|(pids, cpu)| cpu_of(pids).map(|now| (now - cpu) * 1e6 / (args.requests + 100) as f64))
        .transpose()?;
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
        throughput_gbit_s,
        latency_p50_us: p50,
        latency_p99_us: p99,
        connections_per_s: rate,
        ztunnel_cpu_us_per_request,
    })
}

/// The mesh pair's connection rate, small, padded, then small again.
async fn scale(mesh: &Mesh, (client, _server): &Pair, args: &Args) -> Result<Scale> {
    let rate = || {
        let (c, target) = (client.clone(), SocketAddr::from((SCALE_VIP, PING)));
        connection_rate(
            move || {
                let c = c.clone();
                async move { c.connect(target).await }
            },
            Duration::from_secs(args.rate_seconds),
            args.concurrency,
        )
    };
    let small_workloads = mesh.config_dump(1).await?["mesh"]["workloads"].as_array().map_or(0, Vec::len);
    let padding = args.scale.padding(false);
    let timeout = Duration::from_secs(300);
    let small = rate().await?;
    padding.apply(mesh, &[1, 2], timeout).await?;
    let padded = rate().await?;
    padding.remove(mesh, &[1, 2], small_workloads, timeout).await?;
    let small_again = rate().await?;
    Ok(Scale {
        small_workloads,
        padded_workloads: args.scale.pad_workloads,
        padded_services: args.scale.pad_services,
        padded_policies: args.scale.pad_policies,
        connections_per_s: [small, padded, small_again],
        padded_ratio: padded / ((small + small_again) / 2.0),
    })
}

async fn memory([src, dst]: [u32; 2], client: &MeshPod, server: &MeshPod, idle: usize) -> Result<Memory> {
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

/// This binary again with `args`, inside `netns` if given; waits until `ready` accepts.
fn helper(args: &[String], netns: Option<&ztunnel::netns::NetNs>, ready: SocketAddr) -> Result<Child> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args(args);
    let mut child = spawn_child_with(&command, netns, Stdio::null(), Stdio::inherit())?;
    wait_for_port(&mut child, "benchmark helper", ready, netns)?;
    Ok(child)
}

/// Servers on `ip`, ports [`SINK`], [`ECHO`], [`PING`] (the `--serve` helper).
async fn serve(ip: IpAddr) -> Result<()> {
    let listen = |port| {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(ip, port))?;
        socket.listen(1024)
    };
    serve_sink(listen(SINK)?);
    serve_echo(listen(ECHO)?);
    serve_ping(listen(PING)?).await?;
    Ok(())
}

/// Plain TCP from `listen` to `target` (the `--relay` helper).
async fn relay(listen: SocketAddr, target: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (mut inbound, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else { return };
            let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

/// Loopback latency, direct and through two relay processes.
async fn calibrate(requests: usize) -> Result<Calibration> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let free = || e2e::ca_process::free_port();
    let (echo_ip, relay_a, relay_b) = (loopback, free()?, free()?);
    let echo = SocketAddr::new(echo_ip, ECHO);
    let _server = KillOnDrop(helper(&["--serve".into(), echo_ip.to_string()], None, echo)?);
    let _b = KillOnDrop(helper(&["--relay".into(), relay_b.to_string(), echo.to_string()], None, relay_b)?);
    let _a = KillOnDrop(helper(&["--relay".into(), relay_a.to_string(), relay_b.to_string()], None, relay_a)?);
    let connect = |addr| async move {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok::<_, anyhow::Error>(s)
    };
    let (direct, _) = latency(connect(echo).await?, requests).await?;
    let (relayed, _) = latency(connect(relay_a).await?, requests).await?;
    Ok(Calibration { direct_p50_us: direct, relayed_p50_us: relayed, added_p50_us: relayed - direct })
}

fn print_scale(s: &Scale) {
    let [small, padded, again] = s.connections_per_s;
    println!(
        "mesh new connections/s with {} workloads: {small:.0}, then {again:.0}; with {} workloads, {} services, {} policies: {padded:.0} ({:.3} of small)",
        s.small_workloads, s.padded_workloads, s.padded_services, s.padded_policies, s.padded_ratio
    );
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if let Some(ip) = args.serve {
        return runtime.block_on(serve(ip));
    }
    if let Some([listen, target]) = args.relay.as_deref() {
        return runtime.block_on(relay(*listen, *target));
    }
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    ztunnel::raise_open_files_limit();
    let calibration = if args.scale.scale_only { None } else { Some(calibrate(args.requests).await?) };
    let mut mesh = Mesh::start(MeshOptions { log_filter: args.log_filter.clone(), ..MeshOptions::default() })?;
    mesh.namespace("direct", false).await?;
    mesh.namespace("mesh", true).await?;
    let mut pairs = Vec::new();
    let mut servers = Vec::new();
    for ns in ["direct", "mesh"] {
        let client = mesh.pod(PodSpec::new("client", ns, 1)).await?;
        let server = mesh.pod(PodSpec::new("server", ns, 2).label("app", "server")).await?;
        let serve_args = ["--serve".to_string(), server.ip.to_string()];
        servers.push(KillOnDrop(helper(&serve_args, Some(&server.netns.ns), server.addr(PING))?));
        pairs.push((client, server));
    }
    // The scale check connects through a service VIP: the endpoint pick is part of what it measures.
    mesh.service("server", "mesh", SCALE_VIP, PING, "server", PING)?;
    mesh.settle(&[], &[]).await?;
    // Until the client's ztunnel knows the VIP, a connection to it is passed through (and reset:
    // nothing answers there outside the mesh).
    mesh.wait_for_service(1, SCALE_VIP.into()).await?;
    let Some(calibration) = calibration else {
        let scale = scale(&mesh, &pairs[1], &args).await?;
        print_scale(&scale);
        println!("{}", serde_json::to_string_pretty(&scale)?);
        return Ok(());
    };

    let ztunnels = ztunnel_pids(&mesh)?;
    let (direct_gbit_s, mesh_gbit_s, ztunnel_cpu_s_per_gib) =
        throughputs(ztunnels, &pairs[0], &pairs[1], &args).await?;
    let direct = measure(&pairs[0], direct_gbit_s, &args, None).await?;
    let through = measure(&pairs[1], mesh_gbit_s, &args, Some(ztunnels)).await?;
    let memory = memory(ztunnels, &pairs[1].0, &pairs[1].1, args.idle).await?;
    let scale = if args.scale.pad_workloads > 0 { Some(scale(&mesh, &pairs[1], &args).await?) } else { None };
    drop(servers);
    let report = Report {
        throughput_ratio: through.throughput_gbit_s / direct.throughput_gbit_s,
        added_latency_p50_us: through.latency_p50_us - direct.latency_p50_us,
        added_latency_p99_us: through.latency_p99_us - direct.latency_p99_us,
        connection_rate_ratio: through.connections_per_s / direct.connections_per_s,
        ztunnel_cpu_s_per_gib,
        direct,
        mesh: through,
        memory,
        calibration,
        scale,
    };

    println!("{:<28} {:>12} {:>12} {:>10}", "", "direct", "mesh", "mesh/direct");
    let row = |name: &str, d: f64, m: f64, unit: &str| {
        println!("{name:<28} {d:>10.2}{unit:<2} {m:>10.2}{unit:<2} {:>10.2}", m / d);
    };
    row("throughput (Gbit/s)", report.direct.throughput_gbit_s, report.mesh.throughput_gbit_s, "");
    row("latency p50 (µs)", report.direct.latency_p50_us, report.mesh.latency_p50_us, "");
    row("latency p99 (µs)", report.direct.latency_p99_us, report.mesh.latency_p99_us, "");
    row("new connections/s", report.direct.connections_per_s, report.mesh.connections_per_s, "");
    println!("ztunnel CPU per GiB carried (both nodes): {:.3} s", report.ztunnel_cpu_s_per_gib);
    println!("added latency p50/p99: {:.1} / {:.1} µs", report.added_latency_p50_us, report.added_latency_p99_us);
    if let Some(us) = report.mesh.ztunnel_cpu_us_per_request {
        println!("ztunnel CPU per 1 KiB round trip (both nodes): {us:.1} µs");
    }
    println!(
        "calibration, loopback p50: direct {:.1} µs, through two plain TCP relays {:.1} µs (+{:.1} µs for two process hops)",
        report.calibration.direct_p50_us, report.calibration.relayed_p50_us, report.calibration.added_p50_us
    );
    println!(
        "ztunnel memory per idle connection ({}): source {:.2} KiB, destination {:.2} KiB",
        report.memory.idle_connections,
        report.memory.source_ztunnel_kib_per_conn,
        report.memory.destination_ztunnel_kib_per_conn
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

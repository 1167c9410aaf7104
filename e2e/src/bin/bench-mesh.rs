//! The mesh's data path against a direct connection, against the machine's floor and against
//! another ztunnel (Istio's), in one run on the one-machine topology: real namespaces, capture
//! rules, `ca` and one ztunnel per node as processes.
//!
//! Paths, each from a client pod on node-1 to a server pod on node-2:
//! - `direct`: pod → pod over the bridges and the underlay, outside the mesh;
//! - `floor`: pod → a plain TCP relay on node-1 → a plain TCP relay on node-2 → pod. Two user-space
//!   hops that only copy bytes (no TLS, no HTTP/2, no policy): what any pair of node proxies costs
//!   on this machine at the least;
//! - `ours`: a pair of pods in an ambient namespace, through this project's ztunnel on each node;
//! - `peer` (`--peer-ztunnel BIN`): the same pods through another ztunnel binary (Istio's, built
//!   from its public source outside the project), started on both nodes in place of ours, on the
//!   same CA, xDS and node agent.
//!
//! Rounds go through all paths in turn (the ztunnels swapped between `ours` and `peer`, and
//! restarted before each: every ztunnel path starts on a fresh pair), so that drift in the
//! machine's speed lands on every path alike; `ours` and `peer` alternate which goes first. The
//! report gives each metric's median over the rounds with every round's figure, as a table and as
//! JSON.
//!
//! Measured per path and round: one-stream throughput (and the CPU the path's two proxies spend
//! per GiB carried, user space and kernel), 1 KiB request/response latency p50/p99 on one
//! connection (and the proxies' CPU per round trip), new connections per second, p50/p99/p99.9 of
//! 1 KiB round trips with 100 and 1,000 connections busy at once (`--concurrent`), and each
//! proxy's memory at rest and its growth per held connection (1,000 held, idle).
//!
//! Scale (ours only, after the rounds): the mesh's connection rate again with the proxies' state
//! padded to 10,000 workloads, 1,000 services and 1,000 policies that have nothing to do with the
//! measured pair ([`e2e::scale`]), between two rounds without it, through the server's service
//! VIP (`--pad-workloads 0` skips it; `--scale-only` measures only this).
//!
//! The server apps run as their own process in the server pod (this binary with `--serve`), as a
//! real pod's would; the relays too (`--relay`), one process per node.
//!
//! Needs root, iproute2 and nftables; build first: `cargo build --release -p ca -p ztunnel -p e2e`.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use e2e::ca_process::{KillOnDrop, cpu_seconds, rss_mib, spawn_child_with, wait_for_port};
use e2e::load::{
    Concurrent, concurrent_latency, connection_rate, latency, median, serve_echo, serve_ping, serve_sink, throughput,
};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec, ZtunnelImpl};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Benchmark the mesh's data path in one run: direct pod to pod, the floor (two plain relay
/// processes, one per node), through our ztunnels, and through another ztunnel (--peer-ztunnel).
/// Needs root; prints a table (median [each round]) and JSON.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Another ztunnel binary to measure against ours in the same run (Istio's, built from its
    /// public source; see ../shared/bench/README.md). It is started on both nodes in place of ours
    /// with Istio's environment variables, on this mesh's CA, xDS and node agent.
    #[arg(long, env = "PEER_ZTUNNEL")]
    peer_ztunnel: Option<PathBuf>,
    /// Rounds through all paths (medians are reported, with every round's figure).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Bytes per one-stream throughput run (two runs per path and round).
    #[arg(long, default_value_t = 512 << 20)]
    bytes: u64,
    /// 1 KiB request/response exchanges per one-connection latency measurement.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Seconds of the connection-rate measurement, per path and round.
    #[arg(long, default_value_t = 3)]
    rate_seconds: u64,
    /// Connections opened at once in the connection-rate measurement.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Connections busy at once in the loaded-latency measurements (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    concurrent: Vec<usize>,
    /// Seconds of each loaded-latency measurement.
    #[arg(long, default_value_t = 3)]
    concurrent_seconds: u64,
    /// Idle connections held open for the memory measurement (0 skips it).
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// RUST_LOG for the ztunnels and the CA (`info` writes one access-log line per connection,
    /// as in production).
    #[arg(long, default_value = "info")]
    log_filter: String,
    #[command(flatten)]
    scale: e2e::scale::ScaleArgs,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Profile where each path's CPU goes: in the first round, one more throughput run,
    /// connection-rate run and one-connection latency run per path under `perf record` and `perf
    /// stat` (its proxies only; not counted in the figures), with the samples and reports kept in
    /// this directory and the split (kernel, crypto, copies; system calls and context switches)
    /// in the report. More `perf record` arguments come from BENCH_PERF_ARGS (`-g` for call
    /// graphs; `-e sched:sched_switch -e sched:sched_wakeup -g` for why and by whom threads sleep
    /// and wake).
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
    /// (internal) Run the sink, echo and ping servers on this IP (ports 5001–5003) and nothing else.
    #[arg(long, hide = true)]
    serve: Option<IpAddr>,
    /// (internal) Relay plain TCP from the first IP's ports 5001–5003 to the second's, and nothing else.
    #[arg(long, hide = true, num_args = 2, value_names = ["LISTEN", "TARGET"])]
    relay: Option<Vec<IpAddr>>,
}

/// The paths measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Direct,
    Floor,
    Ours,
    Peer,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Floor => "floor",
            Kind::Ours => "ours",
            Kind::Peer => "peer",
        }
    }
}

/// One path's figures in one round.
#[derive(Debug, Default, Serialize)]
struct Round {
    /// One-stream throughput, Gbit/s (mean of two runs).
    throughput_gbit_s: f64,
    /// CPU seconds the path's two proxies spent per GiB carried, together.
    #[serde(skip_serializing_if = "Option::is_none")]
    proxies_cpu_s_per_gib: Option<f64>,
    latency_p50_us: f64,
    latency_p99_us: f64,
    /// CPU the two proxies spent per 1 KiB round trip, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    proxies_cpu_us_per_request: Option<f64>,
    connections_per_s: f64,
    /// CPU the two proxies spent per new connection, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    proxies_cpu_us_per_connection: Option<f64>,
    /// Share of the machine's CPU time busy during the connection-rate run (1.0: every core
    /// all the time, so the rate is bound by CPU per connection, not by waiting).
    machine_busy_connections: f64,
    /// Round trips with many connections busy at once.
    concurrent: Vec<Concurrent>,
    /// CPU the two proxies spent per round trip under that load, µs (same order as `concurrent`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    concurrent_proxies_cpu_us_per_request: Vec<f64>,
    /// Each proxy's resident memory at rest (source node, destination node), MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_at_rest_mib: Option<[f64; 2]>,
    /// Each proxy's growth per held idle connection (source node, destination node), KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    kib_per_held_connection: Option<[f64; 2]>,
    /// Where the proxies' CPU went during a throughput run (`--profile`, first round).
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<Profile>,
    /// Where it went while connections opened and closed (`--profile`, first round).
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_profile: Option<Profile>,
    /// Where it went during one connection's 1 KiB round trips (`--profile`, first round).
    #[serde(skip_serializing_if = "Option::is_none")]
    round_trip_profile: Option<Profile>,
}

/// Shares of the proxies' CPU samples during one throughput run, by what the code does.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Profile {
    samples: u64,
    /// The kernel copying between user memory and socket buffers (`read`/`write` payloads).
    kernel_copy: f64,
    /// The rest of the kernel: TCP/IP, bridges, netfilter, scheduling, system-call entry.
    kernel_other: f64,
    /// Encryption and decryption (AES-GCM, GHASH, ChaCha20-Poly1305).
    user_crypto: f64,
    /// memcpy/memmove in user space.
    user_copy: f64,
    /// Everything else in user space (HTTP/2, TLS records, the runtime, the allocator).
    user_other: f64,
    /// System calls the two proxies made per MiB carried (or per connection).
    syscalls_per_unit: f64,
    /// Context switches of the two proxies' threads per MiB carried (or per connection).
    context_switches_per_unit: f64,
}

impl Profile {
    /// Classifies `perf report --sort dso,sym -t '|' -n` lines: `share% | samples |dso|[k] symbol`.
    fn parse(report: &str) -> Profile {
        let mut p = Profile::default();
        for line in report.lines() {
            let fields: Vec<&str> = line.split('|').map(str::trim).collect();
            let [_, samples, dso, sym] = fields[..] else { continue };
            let Ok(n) = samples.parse::<u64>() else { continue };
            let sym = sym.to_ascii_lowercase();
            let bucket = if dso.contains("kernel") {
                if [
                    "copy_from_iter",
                    "copy_to_iter",
                    "copy_user",
                    "rep_movs",
                    "copy_page_to_iter",
                    "copy_page_from_iter",
                ]
                .iter()
                .any(|k| sym.contains(k))
                {
                    &mut p.kernel_copy
                } else {
                    &mut p.kernel_other
                }
            } else if ["aes", "gcm", "ghash", "chacha", "poly1305"].iter().any(|k| sym.contains(k)) {
                &mut p.user_crypto
            } else if sym.contains("memmove") || sym.contains("memcpy") {
                &mut p.user_copy
            } else {
                &mut p.user_other
            };
            *bucket += n as f64;
            p.samples += n;
        }
        if p.samples > 0 {
            let total = p.samples as f64;
            for share in
                [&mut p.kernel_copy, &mut p.kernel_other, &mut p.user_crypto, &mut p.user_copy, &mut p.user_other]
            {
                *share /= total;
            }
        }
        p
    }
}

/// What a profile runs.
#[derive(Debug, Clone, Copy)]
enum Workload {
    /// One stream of four times `--bytes` (counts per MiB).
    Bytes,
    /// New connections for `--rate-seconds` (counts per connection).
    Connections,
    /// `--requests` 1 KiB round trips on one connection (counts per round trip).
    RoundTrips,
}

/// `workload` once more on `path` with `perf record` and `perf stat` on its proxies; the
/// samples, the report and the split go to `dir`.
async fn profile(path: &Path, args: &Args, dir: &std::path::Path, workload: Workload) -> Result<Option<Profile>> {
    let Some([a, b]) = path.proxies else { return Ok(None) };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = match workload {
        Workload::Bytes => path.kind.name().to_owned(),
        Workload::Connections => format!("{}-connections", path.kind.name()),
        Workload::RoundTrips => format!("{}-round-trips", path.kind.name()),
    };
    let (data, counts) = (dir.join(format!("{name}.perf.data")), dir.join(format!("{name}.perf-stat.csv")));
    let pids = format!("{a},{b}");
    let spawn = |args: &[&str], out: &std::path::Path| {
        Command::new("perf")
            .args(args)
            .args(["-p", &pids, "-o"])
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running perf (Debian: apt-get install linux-perf)")
    };
    let extra = std::env::var("BENCH_PERF_ARGS").unwrap_or_default();
    let mut rec_args = vec!["record", "-q", "-F", "999"];
    rec_args.extend(extra.split_whitespace());
    let mut record = KillOnDrop(spawn(&rec_args, &data)?);
    let mut stat = KillOnDrop(spawn(&["stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches"], &counts)?);
    // perf attaches before the first sample; give it a moment so the run is covered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = match workload {
        // Four times the measured runs' bytes: enough samples to split.
        Workload::Bytes => {
            let bytes = 4 * args.bytes;
            throughput(path.connect(SINK).await?, bytes).await.map(|_| bytes as f64 / f64::from(1u32 << 20))
        }
        Workload::Connections => {
            let seconds = args.rate_seconds;
            rate(&path.client, SocketAddr::new(path.target, PING), args).await.map(|per_s| per_s * seconds as f64)
        }
        // (`latency` makes 100 warm-up exchanges before the measured ones.)
        Workload::RoundTrips => {
            latency(path.connect(ECHO).await?, args.requests).await.map(|_| (args.requests + 100) as f64)
        }
    };
    for perf in [&mut record, &mut stat] {
        e2e::topology::run("kill", &["-INT", &perf.0.id().to_string()])?;
        perf.0.wait()?;
    }
    let units = run?;
    let out = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "dso,sym", "-t", "|", "-q", "-n", "-i"])
        .arg(&data)
        .stderr(Stdio::null())
        .output()
        .context("perf report")?;
    let report = String::from_utf8_lossy(&out.stdout);
    std::fs::write(dir.join(format!("{name}.perf.txt")), report.as_bytes())?;
    let mut profile = Profile::parse(&report);
    let counts = std::fs::read_to_string(&counts).with_context(|| format!("reading {}", counts.display()))?;
    let count = |event: &str| {
        counts
            .lines()
            .find(|l| l.split(',').nth(2) == Some(event))
            .and_then(|l| l.split(',').next()?.parse::<f64>().ok())
    };
    profile.syscalls_per_unit = count("raw_syscalls:sys_enter").unwrap_or(f64::NAN) / units;
    profile.context_switches_per_unit = count("context-switches").unwrap_or(f64::NAN) / units;
    Ok(Some(profile))
}

/// One metric over all rounds.
#[derive(Debug, Serialize)]
struct Row {
    metric: String,
    /// Each path's figure, round by round.
    rounds: BTreeMap<Kind, Vec<f64>>,
    /// Each path's median.
    median: BTreeMap<Kind, f64>,
    /// Median over rounds of ours / peer in the same round.
    #[serde(skip_serializing_if = "Option::is_none")]
    ours_to_peer: Option<f64>,
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
    rounds: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_ztunnel: Option<PathBuf>,
    /// Medians, rounds and ratios per metric.
    summary: Vec<Row>,
    /// Everything measured, per path and round.
    paths: BTreeMap<Kind, Vec<Round>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<Scale>,
}

const SINK: u16 = 5001;
const ECHO: u16 = 5002;
const PING: u16 = 5003;
/// The mesh server's service, for the scale check.
const SCALE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 10);

/// A path under test: where its client connects and which two processes carry it.
struct Path {
    kind: Kind,
    client: Arc<MeshPod>,
    /// Where the client connects for port `p`: the server, or the first relay.
    target: IpAddr,
    /// The proxies (source node, destination node), if any.
    proxies: Option<[u32; 2]>,
}

impl Path {
    async fn connect(&self, port: u16) -> Result<TcpStream> {
        self.client.connect(SocketAddr::new(self.target, port)).await
    }

    fn cpu(&self) -> Result<Option<f64>> {
        self.proxies.map(|[a, b]| Ok(cpu_seconds(a)? + cpu_seconds(b)?)).transpose()
    }

    /// CPU the proxies used since `before`, per `units`.
    fn cpu_per(&self, before: Option<f64>, units: f64) -> Result<Option<f64>> {
        Ok(match (before, self.cpu()?) {
            (Some(b), Some(a)) => Some((a - b) / units),
            _ => None,
        })
    }
}

/// One round's figures for `path`.
async fn measure(path: &Path, args: &Args, first_round: bool) -> Result<Round> {
    let mut round = Round::default();
    // Memory first: a ztunnel just (re)started is at rest, with nothing left over from the load below.
    if let (Some(proxies), true) = (path.proxies, args.idle > 0) {
        let (at_rest, per) = memory(proxies, path, args.idle).await?;
        round.rss_at_rest_mib = Some(at_rest);
        round.kib_per_held_connection = Some(per);
    }
    let (mut gbit, cpu) = (Vec::new(), path.cpu()?);
    for _ in 0..2 {
        gbit.push(throughput(path.connect(SINK).await?, args.bytes).await?);
    }
    round.throughput_gbit_s = gbit.iter().sum::<f64>() / 2.0;
    round.proxies_cpu_s_per_gib = path.cpu_per(cpu, 2.0 * args.bytes as f64 / f64::from(1u32 << 30))?;

    let stream = path.connect(ECHO).await?;
    let cpu = path.cpu()?;
    (round.latency_p50_us, round.latency_p99_us) = latency(stream, args.requests).await?;
    // `latency` also makes 100 unmeasured warm-up exchanges.
    round.proxies_cpu_us_per_request = path.cpu_per(cpu, (args.requests + 100) as f64 / 1e6)?;

    let (cpu, machine) = (path.cpu()?, machine_ticks()?);
    round.connections_per_s = rate(&path.client, SocketAddr::new(path.target, PING), args).await?;
    round.machine_busy_connections = busy_since(machine)?;
    round.proxies_cpu_us_per_connection =
        path.cpu_per(cpu, round.connections_per_s * args.rate_seconds as f64 / 1e6)?;

    for &n in &args.concurrent {
        let mut streams = Vec::with_capacity(n);
        for _ in 0..n {
            streams.push(path.connect(ECHO).await?);
        }
        let cpu = path.cpu()?;
        let load = concurrent_latency(streams, Duration::from_secs(args.concurrent_seconds))
            .await
            .with_context(|| format!("{} connections busy at once", n))?;
        let done = load.requests_per_s * args.concurrent_seconds as f64;
        if let Some(us) = path.cpu_per(cpu, done / 1e6)? {
            round.concurrent_proxies_cpu_us_per_request.push(us);
        }
        round.concurrent.push(load);
    }

    if let (Some(dir), true) = (&args.profile, first_round) {
        round.profile = profile(path, args, dir, Workload::Bytes).await?;
        round.connection_profile = profile(path, args, dir, Workload::Connections).await?;
        round.round_trip_profile = profile(path, args, dir, Workload::RoundTrips).await?;
    }

    Ok(round)
}

/// The machine's (busy, all) CPU time so far, in ticks, from /proc/stat.
fn machine_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().filter(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let all: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok((all - idle, all))
}

/// Share of the machine's CPU time busy since `before` was read.
fn busy_since(before: (u64, u64)) -> Result<f64> {
    let now = machine_ticks()?;
    Ok((now.0 - before.0) as f64 / (now.1 - before.1).max(1) as f64)
}

/// New connections per second on `path`, `--concurrency` at a time for `--rate-seconds`.
async fn rate(client: &Arc<MeshPod>, target: SocketAddr, args: &Args) -> Result<f64> {
    let client = client.clone();
    connection_rate(
        move || {
            let c = client.clone();
            async move { c.connect(target).await }
        },
        Duration::from_secs(args.rate_seconds),
        args.concurrency,
    )
    .await
}

/// Each proxy's memory at rest and its growth per held idle connection.
async fn memory([src, dst]: [u32; 2], path: &Path, idle: usize) -> Result<([f64; 2], [f64; 2])> {
    // Let earlier measurements' connections close and buffers shrink.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = [rss_mib(src)?.0, rss_mib(dst)?.0];
    let mut held = Vec::with_capacity(idle);
    for _ in 0..idle {
        let mut s = path.connect(ECHO).await?;
        let mut buf = [1u8; e2e::load::MESSAGE];
        s.write_all(&buf).await?;
        s.read_exact(&mut buf).await.context("idle connection did not echo")?;
        held.push(s);
    }
    // Idle long enough for read buffers to drop back to their minimum.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = [rss_mib(src)?.0, rss_mib(dst)?.0];
    drop(held);
    let per = |i: usize| (after[i] - before[i]) * 1024.0 / idle as f64;
    Ok((before, [per(0), per(1)]))
}

/// Runs `which` ztunnel on both nodes (SIGKILL for the one running: its connections are the
/// previous path's) and waits until the mesh pair exchanges through it.
async fn swap_ztunnels(mesh: &mut Mesh, which: &ZtunnelImpl, client: &MeshPod, server: &MeshPod) -> Result<()> {
    for node in [1, 2] {
        mesh.kill_ztunnel(node)?;
    }
    // A predecessor's TIME_WAIT sockets on the pods' 15001/15006/15008 keep an implementation that
    // binds with SO_REUSEPORT alone (Istio's) from listening there.
    for pod in [client, server] {
        pod.netns.exec(&["ss", "-K", "-tan", "( sport = :15001 or sport = :15006 or sport = :15008 )"])?;
    }
    let before: Vec<u64> = mesh.nodes.iter().map(|n| n.agent.snapshots()).collect();
    for node in [1, 2] {
        mesh.start_ztunnel_impl(node, which)?;
    }
    for (node, after) in mesh.nodes.iter().zip(before) {
        tokio::time::timeout(Duration::from_secs(30), node.agent.wait_for_snapshot(after))
            .await
            .with_context(|| format!("the new ztunnel on {} never asked the node agent for its pods", node.name))?;
    }
    let exchange = || async {
        let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), client.connect(server.addr(ECHO))).await
        else {
            return false;
        };
        let mut buf = [3u8; e2e::load::MESSAGE];
        let echoed = async {
            s.write_all(&buf).await?;
            s.read_exact(&mut buf).await
        };
        matches!(tokio::time::timeout(Duration::from_secs(2), echoed).await, Ok(Ok(_)))
    };
    mesh.wait_until("an exchange through the new ztunnels", Duration::from_secs(30), exchange).await
}

/// The mesh pair's connection rate, small, padded, then small again.
async fn scale(mesh: &Mesh, client: &Arc<MeshPod>, args: &Args) -> Result<Scale> {
    let vip = SocketAddr::from((SCALE_VIP, PING));
    let small_workloads = mesh.config_dump(1).await?["mesh"]["workloads"].as_array().map_or(0, Vec::len);
    let padding = args.scale.padding(false);
    let timeout = Duration::from_secs(300);
    let small = rate(client, vip, args).await?;
    padding.apply(mesh, &[1, 2], timeout).await?;
    let padded = rate(client, vip, args).await?;
    padding.remove(mesh, &[1, 2], small_workloads, timeout).await?;
    let small_again = rate(client, vip, args).await?;
    Ok(Scale {
        small_workloads,
        padded_workloads: args.scale.pad_workloads,
        padded_services: args.scale.pad_services,
        padded_policies: args.scale.pad_policies,
        connections_per_s: [small, padded, small_again],
        padded_ratio: padded / ((small + small_again) / 2.0),
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

/// Plain TCP from `listen`'s ports [`SINK`], [`ECHO`], [`PING`] to the same ports of `target`
/// (the `--relay` helper): the copy ztunnel's own plain relays use, without TLS or HTTP/2.
async fn relay(listen: IpAddr, target: IpAddr) -> Result<()> {
    for port in [SINK, ECHO, PING] {
        let listener = TcpListener::bind(SocketAddr::new(listen, port)).await?;
        let target = SocketAddr::new(target, port);
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                    proto::hbone::copy::copy_plain_until(inbound, outbound, std::future::pending()).await;
                });
            }
        });
    }
    // Until the benchmark kills it.
    std::future::pending().await
}

/// The summary rows: each metric's medians over rounds, and ours/peer.
fn summarize(paths: &BTreeMap<Kind, Vec<Round>>, levels: &[usize]) -> Vec<Row> {
    type Pick = Box<dyn Fn(&Round) -> Option<f64>>;
    let mut rows = Vec::new();
    let direct = paths.get(&Kind::Direct);
    let mut push = |metric: String, pick: Pick, minus_direct: bool| {
        let mut row = Row { metric, rounds: BTreeMap::new(), median: BTreeMap::new(), ours_to_peer: None };
        for (&kind, rounds) in paths {
            if minus_direct && kind == Kind::Direct {
                continue;
            }
            let values: Vec<f64> = rounds
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let v = pick(r)?;
                    if minus_direct { Some(v - pick(direct?.get(i)?)?) } else { Some(v) }
                })
                .collect();
            if !values.is_empty() {
                row.median.insert(kind, median(values.clone()));
                row.rounds.insert(kind, values);
            }
        }
        // Paired by round (both measured minutes apart), so drift between rounds cancels out.
        if let (Some(o), Some(p)) = (row.rounds.get(&Kind::Ours), row.rounds.get(&Kind::Peer))
            && o.len() == p.len()
        {
            row.ours_to_peer = Some(median(o.iter().zip(p).map(|(o, p)| o / p).collect()));
        }
        if !row.median.is_empty() {
            rows.push(row);
        }
    };
    push("one-stream throughput, Gbit/s".into(), Box::new(|r| Some(r.throughput_gbit_s)), false);
    push("CPU per GiB, both proxies, s".into(), Box::new(|r| r.proxies_cpu_s_per_gib), false);
    push("latency p50, 1 KiB, µs".into(), Box::new(|r| Some(r.latency_p50_us)), false);
    push("added p50 (− direct), µs".into(), Box::new(|r| Some(r.latency_p50_us)), true);
    push("latency p99, 1 KiB, µs".into(), Box::new(|r| Some(r.latency_p99_us)), false);
    push("added p99 (− direct), µs".into(), Box::new(|r| Some(r.latency_p99_us)), true);
    push("CPU per round trip, both proxies, µs".into(), Box::new(|r| r.proxies_cpu_us_per_request), false);
    push("new connections/s".into(), Box::new(|r| Some(r.connections_per_s)), false);
    push("CPU per connection, both proxies, µs".into(), Box::new(|r| r.proxies_cpu_us_per_connection), false);
    push("connections: machine CPU busy".into(), Box::new(|r| Some(r.machine_busy_connections)), false);
    for (i, &n) in levels.iter().enumerate() {
        let at = move |r: &Round| r.concurrent.get(i).copied();
        push(format!("{n} busy: round trips/s"), Box::new(move |r| Some(at(r)?.requests_per_s)), false);
        push(format!("{n} busy: added p50, µs"), Box::new(move |r| Some(at(r)?.p50_us)), true);
        push(format!("{n} busy: added p99, µs"), Box::new(move |r| Some(at(r)?.p99_us)), true);
        push(format!("{n} busy: added p99.9, µs"), Box::new(move |r| Some(at(r)?.p999_us)), true);
        push(
            format!("{n} busy: CPU per round trip, both, µs"),
            Box::new(move |r| r.concurrent_proxies_cpu_us_per_request.get(i).copied()),
            false,
        );
    }
    push("CPU share: kernel copies".into(), Box::new(|r| Some(r.profile?.kernel_copy)), false);
    push("CPU share: rest of the kernel".into(), Box::new(|r| Some(r.profile?.kernel_other)), false);
    push("CPU share: crypto".into(), Box::new(|r| Some(r.profile?.user_crypto)), false);
    push("CPU share: user-space copies".into(), Box::new(|r| Some(r.profile?.user_copy)), false);
    push("CPU share: rest of user space".into(), Box::new(|r| Some(r.profile?.user_other)), false);
    push("system calls per MiB, both".into(), Box::new(|r| Some(r.profile?.syscalls_per_unit)), false);
    push("context switches per MiB, both".into(), Box::new(|r| Some(r.profile?.context_switches_per_unit)), false);
    push(
        "connections: CPU share, kernel".into(),
        Box::new(|r| r.connection_profile.map(|p| p.kernel_copy + p.kernel_other)),
        false,
    );
    let connection: fn(&Round) -> Option<Profile> = |r| r.connection_profile;
    let round_trip: fn(&Round) -> Option<Profile> = |r| r.round_trip_profile;
    for (what, profile) in [("connections", connection), ("round trips", round_trip)] {
        push(format!("{what}: system calls each, both"), Box::new(move |r| Some(profile(r)?.syscalls_per_unit)), false);
        push(
            format!("{what}: context switches each, both"),
            Box::new(move |r| Some(profile(r)?.context_switches_per_unit)),
            false,
        );
    }
    push("memory at rest, source node, MiB".into(), Box::new(|r| Some(r.rss_at_rest_mib?[0])), false);
    push("memory at rest, destination node, MiB".into(), Box::new(|r| Some(r.rss_at_rest_mib?[1])), false);
    push("KiB per held connection, source".into(), Box::new(|r| Some(r.kib_per_held_connection?[0])), false);
    push("KiB per held connection, destination".into(), Box::new(|r| Some(r.kib_per_held_connection?[1])), false);
    rows
}

/// The summary as a table: one column per path ("median [round figures]"), then ours/peer
/// (the median of the rounds' ratios).
fn print_table(rows: &[Row], kinds: &[Kind]) {
    let cell = |row: &Row, k: Kind| match (row.median.get(&k), row.rounds.get(&k)) {
        (Some(m), Some(all)) if all.len() > 1 => {
            format!("{} [{}]", fmt(*m), all.iter().map(|v| fmt(*v)).collect::<Vec<_>>().join(" "))
        }
        (Some(m), _) => fmt(*m),
        _ => "–".into(),
    };
    let mut table: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["metric".to_owned()];
    header.extend(kinds.iter().map(|k| k.name().to_owned()));
    if kinds.contains(&Kind::Peer) {
        header.push("ours/peer".into());
    }
    table.push(header);
    for row in rows {
        let mut line = vec![row.metric.clone()];
        line.extend(kinds.iter().map(|&k| cell(row, k)));
        if kinds.contains(&Kind::Peer) {
            line.push(row.ours_to_peer.map_or("–".into(), |r| format!("{r:.2}")));
        }
        table.push(line);
    }
    let widths: Vec<usize> =
        (0..table[0].len()).map(|i| table.iter().map(|l| l[i].chars().count()).max().unwrap_or(0)).collect();
    for (n, line) in table.iter().enumerate() {
        let cells: Vec<String> =
            line.iter().zip(&widths).map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count()))).collect();
        println!("| {} |", cells.join(" | "));
        if n == 0 {
            println!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
        }
    }
}

/// Three significant-ish digits: 6.71, 40.2, 2134.
fn fmt(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
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
    if let Some([listen, target]) = args.relay.as_deref() {
        // Two workers, as each ztunnel has: the floor gets the same cores.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        return runtime.block_on(relay(*listen, *target));
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if let Some(ip) = args.serve {
        return runtime.block_on(serve(ip));
    }
    if let Some(peer) = &args.peer_ztunnel
        && !peer.is_file()
    {
        bail!(
            "--peer-ztunnel {}: no such file (build Istio's ztunnel first: ../shared/bench/README.md)",
            peer.display()
        );
    }
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    ztunnel::raise_open_files_limit();
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
    let [(direct_client, direct_server), (mesh_client, mesh_server)] =
        <[_; 2]>::try_from(pairs).map_err(|_| anyhow::anyhow!("two pairs"))?;
    // The scale check connects through a service VIP: the endpoint pick is part of what it measures.
    mesh.service("server", "mesh", SCALE_VIP, PING, "server", PING)?;
    mesh.settle(&[], &[]).await?;
    // Until the client's ztunnel knows the VIP, a connection to it is passed through (and reset:
    // nothing answers there outside the mesh).
    mesh.wait_for_service(1, SCALE_VIP.into()).await?;
    if args.scale.scale_only {
        let scale = scale(&mesh, &mesh_client, &args).await?;
        print_scale(&scale);
        println!("{}", serde_json::to_string_pretty(&scale)?);
        return Ok(());
    }

    // The floor: a relay on each node, client → node-1 → node-2 → the direct pair's server.
    let (node1, node2) = (IpAddr::V4(mesh.nodes[0].ip), IpAddr::V4(mesh.nodes[1].ip));
    let relay_args = |from: IpAddr, to: IpAddr| vec!["--relay".to_string(), from.to_string(), to.to_string()];
    let second = KillOnDrop(helper(
        &relay_args(node2, direct_server.ip.into()),
        Some(&mesh.nodes[1].netns.ns),
        SocketAddr::new(node2, PING),
    )?);
    let first =
        KillOnDrop(helper(&relay_args(node1, node2), Some(&mesh.nodes[0].netns.ns), SocketAddr::new(node1, PING))?);
    let relays = [first.0.id(), second.0.id()];

    let mut kinds = vec![Kind::Direct, Kind::Floor, Kind::Ours];
    if args.peer_ztunnel.is_some() {
        kinds.push(Kind::Peer);
    }
    let mut paths: BTreeMap<Kind, Vec<Round>> = BTreeMap::new();
    let mut running = Kind::Ours;
    // Whether the running ztunnels are fresh: every ztunnel path starts on a just-started pair.
    let mut fresh = true;
    for round in 1..=args.rounds.max(1) {
        // Ours and peer alternate which goes first: the second of the two measured better under
        // load whichever binary it was (±10 %), so the order must favour neither.
        let mut order = kinds.clone();
        if round % 2 == 0 {
            order.iter_mut().for_each(|k| {
                *k = match *k {
                    Kind::Ours if kinds.contains(&Kind::Peer) => Kind::Peer,
                    Kind::Peer => Kind::Ours,
                    other => other,
                }
            });
        }
        for &kind in &order {
            if matches!(kind, Kind::Ours | Kind::Peer) {
                if kind != running || !fresh {
                    let which = match (kind, &args.peer_ztunnel) {
                        (Kind::Peer, Some(bin)) => ZtunnelImpl::Istio(bin.clone()),
                        _ => ZtunnelImpl::Ours,
                    };
                    swap_ztunnels(&mut mesh, &which, &mesh_client, &mesh_server).await?;
                    running = kind;
                }
                fresh = false;
            }
            let path = match kind {
                Kind::Direct => {
                    Path { kind, client: direct_client.clone(), target: direct_server.ip.into(), proxies: None }
                }
                Kind::Floor => Path { kind, client: direct_client.clone(), target: node1, proxies: Some(relays) },
                Kind::Ours | Kind::Peer => {
                    let pids = [mesh.nodes[0].ztunnel_pid(), mesh.nodes[1].ztunnel_pid()];
                    let [Some(a), Some(b)] = pids else { bail!("a ztunnel is not running") };
                    Path { kind, client: mesh_client.clone(), target: mesh_server.ip.into(), proxies: Some([a, b]) }
                }
            };
            eprintln!("round {round}: {}", path.kind.name());
            let figures =
                measure(&path, &args, round == 1).await.with_context(|| format!("round {round}, {}", kind.name()))?;
            paths.entry(kind).or_default().push(figures);
        }
    }
    drop((first, second));
    let scale = if args.scale.pad_workloads > 0 {
        if running != Kind::Ours {
            swap_ztunnels(&mut mesh, &ZtunnelImpl::Ours, &mesh_client, &mesh_server).await?;
        }
        Some(scale(&mesh, &mesh_client, &args).await?)
    } else {
        None
    };
    drop(servers);

    let summary = summarize(&paths, &args.concurrent);
    let report = Report { rounds: args.rounds.max(1), peer_ztunnel: args.peer_ztunnel.clone(), summary, paths, scale };
    print_table(&report.summary, &kinds);
    let added = |k: Kind| {
        report.summary.iter().find(|r| r.metric.starts_with("added p50")).and_then(|r| r.median.get(&k).copied())
    };
    if let (Some(ours), Some(floor)) = (added(Kind::Ours), added(Kind::Floor)) {
        println!("ours' added p50 above the floor's (two plain relays): {:+.1} µs", ours - floor);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_is_split_by_what_the_code_does() {
        let report = " 40.00% | 400 |[kernel.kallsyms]|[k] _copy_from_iter
 20.00% | 200 |[kernel.kallsyms]|[k] handle_softirqs
 15.00% | 150 |ztunnel          |[.] aws_lc_0_47_0_aes_gcm_encrypt_avx512
 10.00% | 100 |libc.so.6        |[.] __memmove_avx512_unaligned_erms
 15.00% | 150 |ztunnel          |[.] h2::proto::connection::Connection<T,P,B>::poll
garbage line
";
        let p = Profile::parse(report);
        assert_eq!(p.samples, 1000);
        assert_eq!(
            [p.kernel_copy, p.kernel_other, p.user_crypto, p.user_copy, p.user_other],
            [0.40, 0.20, 0.15, 0.10, 0.15]
        );
    }
}

//! `soak`: the mesh's reliability under time and faults, measured on the one-machine mesh (real
//! processes, network namespaces, capture rules). Not part of the test suite: the full run takes
//! about an hour. Each scenario starts a fresh mesh (client pod on node-1, echo server on node-2,
//! both enrolled) and prints its figure; the exit status is non-zero when one misses its target.
//!
//! - `hold`: `--connections` (10,000) concurrent connections through the ztunnel pair for
//!   `--duration` (10 min), a 1 KiB round trip on each every `--interval` (1 s): no error, and
//!   each ztunnel's memory after `--warmup` (1 min) grows less than 5 % by the end.
//! - `rotation`: `--streams` (1,000) streams doing round trips while the intermediate and the
//!   root are rotated through the CA's API and leaves are renewed (certificate TTL 2 min): no
//!   stream dropped, and the pods' certificates end up under the new root.
//! - `restart`: ztunnel on the server's node killed (SIGKILL) and started again, three times: how
//!   long until a new connection succeeds (target ≤ 2 s).
//! - `agent`: both node agents restarted under `--streams` streams: none reset, pods still served.
//! - `ca-outage`: the CA stopped for `--ca-outage` (30 min) with certificates of a TTL a third
//!   longer (renewal falls due in the outage and fails): new connections and streams unaffected
//!   throughout, ztunnel warns while renewal fails, and renews once the CA is back.
//! - `disk-full`: the CA's issuance log on a full file system: a new pod's certificate is refused
//!   with a clear error (nothing issued unlogged), and issued once there is room again.

#![allow(clippy::print_stdout)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use e2e::ca_process::{KillOnDrop, rss_mib, spawn_child_with, wait_for_port};
use e2e::load::{MESSAGE, serve_echo};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ECHO: u16 = 7000;

/// The mesh's reliability under time and faults (see the module docs; about an hour with the
/// defaults, which are the targets' own figures).
#[derive(Debug, Parser)]
struct Args {
    /// Scenarios to run, comma-separated: hold, rotation, restart, agent, ca-outage, disk-full.
    #[arg(long, value_delimiter = ',', default_value = "hold,rotation,restart,agent,ca-outage,disk-full")]
    only: Vec<Scenario>,
    /// `hold`: concurrent connections.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// `hold`: how long they are held.
    #[arg(long, default_value = "10m", value_parser = proto::duration::parse)]
    duration: Duration,
    /// `hold`: time between two round trips on one connection.
    #[arg(long, default_value = "1s", value_parser = proto::duration::parse)]
    interval: Duration,
    /// `hold`: memory is compared with its level after this long.
    #[arg(long, default_value = "1m", value_parser = proto::duration::parse)]
    warmup: Duration,
    /// `rotation`, `agent`: streams carrying traffic meanwhile.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// `ca-outage`: how long the CA is down.
    #[arg(long, default_value = "30m", value_parser = proto::duration::parse)]
    ca_outage: Duration,
    /// Write the figures as JSON here too.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// (internal) serve the echo port on this address: the server pod's app, a process of its own.
    #[arg(long, hide = true)]
    serve: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    Hold,
    Rotation,
    Restart,
    Agent,
    CaOutage,
    DiskFull,
}

/// One scenario's outcome.
#[derive(Debug, Serialize)]
struct Figure {
    scenario: Scenario,
    passed: bool,
    /// The figure, in one line.
    summary: String,
    details: serde_json::Value,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("soak: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(ip) = args.serve {
        return match runtime.block_on(serve(ip)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("soak --serve: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(run(&args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(ip: IpAddr) -> Result<()> {
    ztunnel::raise_open_files_limit();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(ip, ECHO))?;
    serve_echo(socket.listen(4096)?).await?;
    Ok(())
}

async fn run(args: &Args) -> Result<bool> {
    ztunnel::raise_open_files_limit();
    let mut figures = Vec::new();
    for scenario in &args.only {
        println!("== {scenario:?}");
        let figure = match scenario {
            Scenario::Hold => hold(args).await,
            Scenario::Rotation => rotation(args).await,
            Scenario::Restart => restart().await,
            Scenario::Agent => agent(args).await,
            Scenario::CaOutage => ca_outage(args).await,
            Scenario::DiskFull => disk_full().await,
        }
        .with_context(|| format!("scenario {scenario:?}"))?;
        println!("{} {:?}: {}", if figure.passed { "PASS" } else { "FAIL" }, figure.scenario, figure.summary);
        figures.push(figure);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(figures.iter().all(|f| f.passed))
}

/// A fresh mesh with the client on node-1 and the echo server (a process of its own) on node-2.
struct Pair {
    mesh: Mesh,
    client: Arc<MeshPod>,
    server: Arc<MeshPod>,
    _app: KillOnDrop,
}

impl Pair {
    async fn start(options: MeshOptions) -> Result<Pair> {
        let mut mesh = Mesh::start(options)?;
        mesh.namespace("soak", true).await?;
        let client = mesh.pod(PodSpec::new("client", "soak", 1)).await?;
        let server = mesh.pod(PodSpec::new("server", "soak", 2)).await?;
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["--serve", &server.ip.to_string()]);
        let mut child = spawn_child_with(&command, Some(&server.netns.ns), Stdio::null(), Stdio::inherit())?;
        wait_for_port(&mut child, "the echo app", server.addr(ECHO), Some(&server.netns.ns))?;
        mesh.settle(&[], &[]).await?;
        let pair = Pair { mesh, client, server, _app: KillOnDrop(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pair.new_connection_works().await {
            ensure!(Instant::now() < deadline, "the client cannot reach the server through the mesh");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(pair)
    }

    async fn connect(&self) -> Result<TcpStream> {
        let s = self.client.connect(self.server.addr(ECHO)).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// A new connection carries one round trip within 2 s.
    async fn new_connection_works(&self) -> bool {
        let attempt = async {
            let mut s = self.connect().await?;
            round_trip(&mut s).await
        };
        matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Ok(())))
    }

    fn ztunnel_pids(&self) -> Result<[u32; 2]> {
        let pid = |i: usize| self.mesh.nodes[i].ztunnel_pid().context("ztunnel is not running");
        Ok([pid(0)?, pid(1)?])
    }
}

async fn round_trip(s: &mut TcpStream) -> Result<()> {
    let mut buf = [7u8; MESSAGE];
    s.write_all(&buf).await?;
    s.read_exact(&mut buf).await?;
    ensure!(buf.iter().all(|b| *b == 7), "the echo came back changed");
    Ok(())
}

/// Streams doing a round trip every `every` until stopped: the count of round trips and the
/// errors (a stream that fails stops).
struct Streams {
    trips: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Option<String>>>,
}

impl Streams {
    async fn open(pair: &Pair, n: usize, every: Duration) -> Result<Streams> {
        let (trips, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let mut s = pair.connect().await.with_context(|| format!("opening stream {i}"))?;
            round_trip(&mut s).await.with_context(|| format!("first round trip on stream {i}"))?;
            let (trips, stop) = (trips.clone(), stop.clone());
            // Spread the round trips over the interval.
            let offset = every.mul_f64(i as f64 / n.max(1) as f64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    match tokio::time::timeout(Duration::from_secs(10), round_trip(&mut s)).await {
                        Ok(Ok(())) => trips.fetch_add(1, Ordering::Relaxed),
                        Ok(Err(e)) => return Some(format!("stream {i}: {e:#}")),
                        Err(_) => return Some(format!("stream {i}: no echo within 10 s")),
                    };
                }
                None
            }));
        }
        Ok(Streams { trips, stop, tasks })
    }

    fn trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    /// Streams that failed so far.
    fn failed(&self) -> usize {
        self.tasks.iter().filter(|t| t.is_finished()).count()
    }

    /// Stops them; the errors.
    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in self.tasks {
            if let Ok(Some(e)) = t.await {
                errors.push(e);
            }
        }
        errors
    }
}

fn growth(from: f64, to: f64) -> f64 {
    if from > 0.0 { (to - from) / from * 100.0 } else { 0.0 }
}

async fn hold(args: &Args) -> Result<Figure> {
    let pair = Pair::start(MeshOptions::default()).await?;
    let pids = pair.ztunnel_pids()?;
    let started = Instant::now();
    let streams = Streams::open(&pair, args.connections, args.interval).await?;
    println!("{} connections open in {:.1} s", args.connections, started.elapsed().as_secs_f64());
    let t0 = Instant::now();
    let rss = || -> Result<[f64; 2]> { Ok([rss_mib(pids[0])?.0, rss_mib(pids[1])?.0]) };
    let mut warm = None;
    let mut samples = Vec::new();
    while t0.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_secs(10).min(args.duration.saturating_sub(t0.elapsed()))).await;
        let now = rss()?;
        samples.push((t0.elapsed().as_secs(), now));
        if warm.is_none() && t0.elapsed() >= args.warmup {
            warm = Some(now);
        }
        println!(
            "  {:>4} s: {} round trips, {} streams failed, ztunnel RSS {:.1} / {:.1} MiB",
            t0.elapsed().as_secs(),
            streams.trips(),
            streams.failed(),
            now[0],
            now[1]
        );
    }
    let end = rss()?;
    let warm = warm.unwrap_or(end);
    let trips = streams.trips();
    let errors = streams.stop().await;
    let growth = [growth(warm[0], end[0]), growth(warm[1], end[1])];
    let passed = errors.is_empty() && growth.iter().all(|g| *g < 5.0);
    Ok(Figure {
        scenario: Scenario::Hold,
        passed,
        summary: format!(
            "{} connections for {} s, {trips} round trips, {} errors; ztunnel RSS after warm-up {:.1} / {:.1} MiB, at the end {:.1} / {:.1} MiB ({:+.1} % / {:+.1} %)",
            args.connections,
            args.duration.as_secs(),
            errors.len(),
            warm[0],
            warm[1],
            end[0],
            end[1],
            growth[0],
            growth[1]
        ),
        details: serde_json::json!({
            "connections": args.connections, "duration_s": args.duration.as_secs(), "round_trips": trips,
            "errors": errors.iter().take(20).collect::<Vec<_>>(), "error_count": errors.len(),
            "rss_warm_mib": warm, "rss_end_mib": end, "growth_percent": growth, "samples": samples,
        }),
    })
}

const CLIENT_ID: &str = "spiffe://cluster.local/ns/soak/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/soak/sa/server";

async fn rotation(args: &Args) -> Result<Figure> {
    let ttl = Duration::from_secs(120);
    let pair = Pair::start(MeshOptions { cert_ttl: Some(ttl), ..MeshOptions::default() }).await?;
    let streams = Streams::open(&pair, args.streams, Duration::from_millis(500)).await?;
    let mesh = &pair.mesh;
    let before = [mesh.cert_chain(1, CLIENT_ID).await?, mesh.cert_chain(2, SERVER_ID).await?];
    let serials = [mesh.cert_validity(1, CLIENT_ID).await?, mesh.cert_validity(2, SERVER_ID).await?];
    let started = Instant::now();
    let first = |out: String| out.lines().next().unwrap_or_default().to_owned();
    let mut steps = vec![first(mesh.ambientctl_ca(&["rotate-intermediate"])?)];
    tokio::time::sleep(Duration::from_secs(5)).await;
    steps.push(first(mesh.ambientctl_ca(&["rotate-root", "prepare"])?));
    mesh.wait_until("both ztunnels to trust the new root", Duration::from_secs(30), || async {
        let mut both = true;
        for node in 1..=2 {
            let n = mesh.config_dump(node).await.map(|d| d["trust_bundle"].as_array().map_or(0, Vec::len));
            both &= n.is_ok_and(|n| n == 2);
        }
        both
    })
    .await?;
    steps.push(first(mesh.ambientctl_ca(&["rotate-root", "activate"])?));
    // Leaves are renewed at half their TTL: wait until both pods' certificates are under the new
    // root (at most a TTL).
    let new_root = |c: &[String], old: &[String]| c.last().is_some_and(|r| Some(r) != old.last());
    let deadline = Instant::now() + ttl + Duration::from_secs(30);
    let (mut after, mut renewed) = (before.clone(), false);
    while Instant::now() < deadline {
        after = [mesh.cert_chain(1, CLIENT_ID).await?, mesh.cert_chain(2, SERVER_ID).await?];
        if new_root(&after[0], &before[0]) && new_root(&after[1], &before[1]) {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let leaves_renewed =
        [mesh.cert_validity(1, CLIENT_ID).await? != serials[0], mesh.cert_validity(2, SERVER_ID).await? != serials[1]];
    // A while longer under the new chain.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let trips = streams.trips();
    let errors = streams.stop().await;
    let works = pair.new_connection_works().await;
    let passed = errors.is_empty() && renewed && leaves_renewed == [true, true] && works;
    Ok(Figure {
        scenario: Scenario::Rotation,
        passed,
        summary: format!(
            "{} streams, {trips} round trips over {:.0} s of intermediate, root and leaf rotation: {} dropped; both pods' leaves renewed under the new root: {renewed}; new connections work: {works}",
            args.streams,
            started.elapsed().as_secs_f64(),
            errors.len()
        ),
        details: serde_json::json!({
            "streams": args.streams, "round_trips": trips, "dropped": errors.len(),
            "errors": errors.iter().take(20).collect::<Vec<_>>(), "steps": steps,
            "chains_before": before, "chains_after": after, "leaves_renewed": leaves_renewed,
        }),
    })
}

async fn restart() -> Result<Figure> {
    let mut pair = Pair::start(MeshOptions::default()).await?;
    let mut times = Vec::new();
    for _ in 0..3 {
        pair.mesh.kill_ztunnel(2)?;
        let started = Instant::now();
        pair.mesh.start_ztunnel(2)?;
        let deadline = started + Duration::from_secs(30);
        while !pair.new_connection_works().await {
            ensure!(Instant::now() < deadline, "no new connection within 30 s of the restart");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        times.push(started.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let worst = times.iter().copied().fold(0.0, f64::max);
    Ok(Figure {
        scenario: Scenario::Restart,
        passed: worst <= 2.0,
        summary: format!(
            "ztunnel SIGKILLed and started again, 3 times: a new connection succeeded {} s after the start (worst {worst:.2} s)",
            times.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>().join(", ")
        ),
        details: serde_json::json!({ "seconds_to_first_connection": times }),
    })
}

async fn agent(args: &Args) -> Result<Figure> {
    let mut pair = Pair::start(MeshOptions::default()).await?;
    let streams = Streams::open(&pair, args.streams, Duration::from_millis(100)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in [1, 2] {
        pair.mesh.restart_node_agent(node).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let trips = streams.trips();
    let errors = streams.stop().await;
    let works = pair.new_connection_works().await;
    let mut dropped_pods = 0;
    for node in [1, 2] {
        dropped_pods += pair.mesh.ztunnel_log(node)?.matches("removing pod").count();
    }
    Ok(Figure {
        scenario: Scenario::Agent,
        passed: errors.is_empty() && works && dropped_pods == 0,
        summary: format!(
            "both node agents restarted under {} streams ({trips} round trips): {} reset, {dropped_pods} pods dropped by ztunnel, new connections work: {works}",
            args.streams,
            errors.len()
        ),
        details: serde_json::json!({ "streams": args.streams, "round_trips": trips, "reset": errors.len(), "errors": errors.iter().take(20).collect::<Vec<_>>() }),
    })
}

async fn ca_outage(args: &Args) -> Result<Figure> {
    // Certificates outlive the outage by a third of it; renewal (at half the TTL) falls due
    // during it.
    let ttl = Duration::from_secs(args.ca_outage.mul_f64(4.0 / 3.0).as_secs().max(60));
    let mut pair = Pair::start(MeshOptions { cert_ttl: Some(ttl), ..MeshOptions::default() }).await?;
    let streams = Streams::open(&pair, 100, Duration::from_millis(200)).await?;
    pair.mesh.stop_ca();
    let down = Instant::now();
    let (mut checks, mut failures) = (0u32, 0u32);
    while down.elapsed() < args.ca_outage {
        checks += 1;
        if !pair.new_connection_works().await {
            failures += 1;
        }
        tokio::time::sleep(Duration::from_secs(5).min(args.ca_outage.saturating_sub(down.elapsed()))).await;
    }
    let warnings = [1u8, 2].iter().try_fold(0, |n, node| {
        Ok::<_, anyhow::Error>(
            n + pair
                .mesh
                .ztunnel_log(*node)?
                .matches("certificate renewal failed; still serving the current one")
                .count(),
        )
    })?;
    pair.mesh.start_ca()?;
    let up = Instant::now();
    let renewed = async {
        loop {
            let logs = [pair.mesh.ztunnel_log(1)?, pair.mesh.ztunnel_log(2)?];
            if logs.iter().all(|l| l.contains("certificate renewed")) {
                return Ok::<_, anyhow::Error>(up.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let renewed_after = tokio::time::timeout(Duration::from_secs(120), renewed).await.ok().transpose()?;
    let trips = streams.trips();
    let errors = streams.stop().await;
    let passed = failures == 0 && errors.is_empty() && warnings > 0 && renewed_after.is_some();
    Ok(Figure {
        scenario: Scenario::CaOutage,
        passed,
        summary: format!(
            "CA down {} s with certificates of {} s: {checks} new-connection checks, {failures} failed; 100 streams ({trips} round trips), {} broken; {warnings} renewal warnings logged meanwhile; renewed {} after the CA came back",
            args.ca_outage.as_secs(),
            ttl.as_secs(),
            errors.len(),
            renewed_after.map_or("never".to_owned(), |s| format!("{s:.1} s"))
        ),
        details: serde_json::json!({
            "outage_s": args.ca_outage.as_secs(), "cert_ttl_s": ttl.as_secs(), "checks": checks, "failures": failures,
            "round_trips": trips, "streams_broken": errors.len(), "warnings": warnings, "renewed_after_s": renewed_after,
        }),
    })
}

/// A tmpfs on `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).status()?;
        ensure!(status.success(), "mounting a tmpfs on {}", dir.display());
        Ok(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn disk_full() -> Result<Figure> {
    let mut pair = Pair::start(MeshOptions::default()).await?;
    // The issuance log moves to a small file system of its own.
    pair.mesh.stop_ca();
    let state = pair.mesh.ca_state_dir().to_owned();
    let disk = Tmpfs::mount(&state.join("log-disk"), "256k")?;
    let log = state.join("issued.jsonl");
    std::fs::copy(&log, disk.0.join("issued.jsonl"))?;
    std::fs::remove_file(&log)?;
    std::os::unix::fs::symlink(disk.0.join("issued.jsonl"), &log)?;
    pair.mesh.start_ca()?;
    ensure!(
        pair.new_connection_works().await || pair.new_connection_works().await,
        "the mesh does not work on the new log"
    );
    let lines =
        || std::fs::read_to_string(disk.0.join("issued.jsonl")).map(|t| t.lines().filter(|l| !l.is_empty()).count());
    let before = lines()?;
    // Fill it. The log's last page has room a file system keeps for it (a full disk still takes
    // a few more records there): blank lines, which the log skips, use that room up first.
    let filler = disk.0.join("filler");
    {
        use std::io::Write as _;
        let mut log = std::fs::OpenOptions::new().append(true).open(disk.0.join("issued.jsonl"))?;
        let len = log.metadata()?.len();
        log.write_all(&vec![b'\n'; (4096 - len % 4096) as usize % 4096])?;
        let mut f = std::fs::File::create(&filler)?;
        let block = [0u8; 4096];
        while f.write_all(&block).is_ok() {}
    }
    // A new pod now: its certificate cannot be logged, so it is not issued.
    let late = pair.mesh.pod(PodSpec::new("late", "soak", 1)).await?;
    let late_id = "spiffe://cluster.local/ns/soak/sa/late";
    let ca_log_path = pair.mesh.state_dir().join("logs/ca.log");
    let ca_log =
        || std::fs::read_to_string(&ca_log_path).unwrap_or_else(|e| format!("({}: {e})", ca_log_path.display()));
    let refused_line = "cannot write the issuance log; refusing to issue";
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        while !ca_log().contains(refused_line) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .is_ok();
    let ztunnel_saw =
        pair.mesh.ztunnel_log(1)?.lines().any(|l| l.contains("certificate request failed") && l.contains(late_id));
    let issued_while_full = lines()? - before;
    // Room again.
    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    let resumed = tokio::time::timeout(Duration::from_secs(60), async {
        while pair.mesh.cert_validity(1, late_id).await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .is_ok()
    .then(|| freed.elapsed().as_secs_f64());
    let text = std::fs::read_to_string(disk.0.join("issued.jsonl"))?;
    let whole = text.ends_with('\n')
        && text.lines().filter(|l| !l.is_empty()).all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok());
    let works = {
        let mut ok = false;
        for _ in 0..50 {
            let attempt = async {
                let mut s = late.connect(pair.server.addr(ECHO)).await?;
                round_trip(&mut s).await
            };
            if matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Ok(()))) {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ok
    };
    pair.mesh.stop_ca();
    drop(disk);
    let passed = refused && ztunnel_saw && issued_while_full == 0 && resumed.is_some() && whole && works;
    if !passed && !refused {
        bail!("the CA never refused to issue on the full disk; its log:\n{}", ca_log());
    }
    Ok(Figure {
        scenario: Scenario::DiskFull,
        passed,
        summary: format!(
            "issuance log's disk full: a new pod's certificate refused ({refused_line:?} in the CA's log; ztunnel logged the failed request: {ztunnel_saw}), {issued_while_full} issued meanwhile; space freed: issued {} later, the log whole: {whole}, the pod's traffic works: {works}",
            resumed.map_or("never".to_owned(), |s| format!("{s:.1} s"))
        ),
        details: serde_json::json!({
            "refused": refused, "ztunnel_logged": ztunnel_saw, "issued_while_full": issued_while_full,
            "resumed_after_s": resumed, "log_whole": whole, "traffic_after": works,
        }),
    })
}

//! HBONE versus plain TCP over loopback, in one run.
//!
//! Paths measured (all on 127.0.0.1, real certificates from a throwaway CA):
//! - `direct`: app → TCP → server app;
//! - `hbone`: app → TCP → local proxy → HBONE (mTLS + HTTP/2 CONNECT) → proxy → TCP → server app,
//!   i.e. the two node-proxy hops of a mesh connection, both doing the bidirectional copy.
//!
//! Reports single-stream throughput and 1 KiB request/response latency (p50/p99) for each, and the
//! ratio of HBONE to direct, as a table and as JSON.

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use e2e::load::{latency, median, serve_echo, serve_sink, throughput};
use proto::hbone::copy_bidirectional;
use proto::hbone::pool::{ConnectRequest, Pool, PoolConfig};
use proto::hbone::server::{Handler, InboundConnect, Server, ServerConfig};
use proto::testing::TestCa;
use proto::tls::server_config;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

/// Measure one HBONE stream against plain TCP over loopback.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Bytes sent per throughput round.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Throughput rounds per path (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// 1 KiB request/response exchanges per latency measurement.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct PathResult {
    throughput_gbit_s: f64,
    latency_p50_us: f64,
    latency_p99_us: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    bytes_per_round: u64,
    rounds: usize,
    requests: usize,
    direct: PathResult,
    hbone: PathResult,
    /// hbone / direct throughput.
    throughput_ratio: f64,
    /// hbone / direct latency.
    latency_p50_ratio: f64,
    latency_p99_ratio: f64,
}

/// Forwards each tunnel to its target, as a node proxy's inbound side does.
#[derive(Debug)]
struct Forward;

impl Handler for Forward {
    async fn handle(&self, connect: InboundConnect) {
        // The server takes ip:port authorities only (ServerConfig::service_hostnames is off).
        let Some(target) = connect.target.addr() else {
            connect.reject(http_503());
            return;
        };
        let Ok(upstream) = TcpStream::connect(target).await else {
            connect.reject(http_503());
            return;
        };
        let _ = upstream.set_nodelay(true);
        if let Ok(stream) = connect.accept() {
            let _ = copy_bidirectional(upstream, stream).await;
        }
    }
}

fn http_503() -> proto::hbone::server::StatusCode {
    proto::hbone::server::StatusCode::SERVICE_UNAVAILABLE
}

/// A local listener that tunnels each connection to `target` through the pool.
async fn outbound(pool: Pool, ca: &TestCa, hbone: SocketAddr, target: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let cred = ca.credential("spiffe://cluster.local/ns/bench/sa/client");
    let server_id = "spiffe://cluster.local/ns/bench/sa/server".parse()?;
    tokio::spawn(async move {
        while let Ok((app, client)) = listener.accept().await {
            let _ = app.set_nodelay(true);
            let request =
                ConnectRequest::new(cred.clone(), hbone, vec![Clone::clone(&server_id)], target).forwarded_for(client);
            let pool = pool.clone();
            tokio::spawn(async move {
                if let Ok(tunnel) = pool.connect(request).await {
                    let _ = copy_bidirectional(app, tunnel).await;
                }
            });
        }
    });
    Ok(addr)
}

async fn measure(sink_addr: SocketAddr, echo_addr: SocketAddr, args: &Args) -> Result<PathResult> {
    let mut rounds = Vec::new();
    for _ in 0..args.rounds.max(1) {
        rounds.push(throughput(TcpStream::connect(sink_addr).await?, args.bytes).await?);
    }
    let (p50, p99) = latency(TcpStream::connect(echo_addr).await?, args.requests).await?;
    Ok(PathResult { throughput_gbit_s: median(rounds), latency_p50_us: p50, latency_p99_us: p99 })
}

/// Starts `f` on its own thread with its own runtime, the way a separate process would run it, and
/// returns what it produced. The runtime lives for the rest of the benchmark.
fn spawn_runtime<T, F, Fut>(name: &str, workers: usize, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = builder.enable_all().thread_name(name).build()?;
    std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        runtime.block_on(async move {
            let _ = tx.send(f().await);
            std::future::pending::<()>().await;
        });
    })?;
    rx.recv().context("runtime thread died")?
}

struct Mesh {
    sink: SocketAddr,
    echo: SocketAddr,
}

fn main() -> Result<()> {
    let args = Args::parse();

    // Applications (sink and echo servers) on their own thread, like a server process.
    let (sink_addr, echo_addr) = spawn_runtime("apps", 1, || async {
        let (sink, echo) = (TcpListener::bind("127.0.0.1:0").await?, TcpListener::bind("127.0.0.1:0").await?);
        let addrs = (sink.local_addr()?, echo.local_addr()?);
        serve_sink(sink);
        serve_echo(echo);
        Ok(addrs)
    })?;

    // Both node proxies in one 2-worker runtime, like the mesh's proxy processes.
    let mesh = spawn_runtime("mesh", 2, move || async move {
        let ca = TestCa::new();
        let trust = ca.shared_bundle();
        let server_cred = ca.credential("spiffe://cluster.local/ns/bench/sa/server");
        let tls = server_config(server_cred, trust.clone(), vec!["cluster.local".into()])?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let server = Server::new(listener, tls, ServerConfig::default(), Arc::new(Forward))?;
        let hbone_addr = server.local_addr();
        let (drain, watcher) = proto::drain::new();
        // Never drained: the process exits when the benchmark ends.
        std::mem::forget(drain);
        tokio::spawn(server.run(watcher));
        let pool = Pool::new(PoolConfig::default(), trust);
        Ok(Mesh {
            sink: outbound(pool.clone(), &ca, hbone_addr, sink_addr).await?,
            echo: outbound(pool, &ca, hbone_addr, echo_addr).await?,
        })
    })?;

    // The client on the main thread, like a client process. Each path runs alone, direct first.
    let client = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (direct, hbone) = client.block_on(async {
        let direct = measure(sink_addr, echo_addr, &args).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let hbone = measure(mesh.sink, mesh.echo, &args).await?;
        Ok::<_, anyhow::Error>((direct, hbone))
    })?;

    let report = Report {
        bytes_per_round: args.bytes,
        rounds: args.rounds,
        requests: args.requests,
        throughput_ratio: hbone.throughput_gbit_s / direct.throughput_gbit_s,
        latency_p50_ratio: hbone.latency_p50_us / direct.latency_p50_us,
        latency_p99_ratio: hbone.latency_p99_us / direct.latency_p99_us,
        direct,
        hbone,
    };

    println!(
        "HBONE vs direct TCP over loopback ({} MiB x {} rounds, {} x 1 KiB req/resp)",
        args.bytes >> 20,
        args.rounds,
        args.requests
    );
    println!("{:<8} {:>16} {:>12} {:>12}", "path", "throughput", "p50", "p99");
    for (name, r) in [("direct", &report.direct), ("hbone", &report.hbone)] {
        println!(
            "{:<8} {:>11.2} Gb/s {:>9.1} µs {:>9.1} µs",
            name, r.throughput_gbit_s, r.latency_p50_us, r.latency_p99_us
        );
    }
    println!(
        "{:<8} {:>16.3} {:>12.2} {:>12.2}",
        "ratio", report.throughput_ratio, report.latency_p50_ratio, report.latency_p99_ratio
    );
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

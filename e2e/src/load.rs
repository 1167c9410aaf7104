//! Load generators and the servers they talk to, shared by the benchmarks. Servers take a bound
//! listener and clients a connected stream, so the same code runs on loopback or inside pods.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Size of the request/response messages.
pub const MESSAGE: usize = 1024;

/// Reads each connection to EOF, then answers with the byte count (u64, little-endian).
pub fn serve_sink(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_le_bytes()).await;
            });
        }
    })
}

/// Echoes fixed [`MESSAGE`]-byte messages until the client closes.
pub fn serve_echo(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; MESSAGE];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// Sends `bytes` over `stream` to a sink and returns Gbit/s (until the sink's count arrives).
pub async fn throughput(mut stream: TcpStream, bytes: u64) -> Result<f64> {
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    let mut ack = [0u8; 8];
    stream.read_exact(&mut ack).await.context("reading the sink's byte count")?;
    let elapsed = start.elapsed();
    ensure!(u64::from_le_bytes(ack) == bytes, "sink received {} of {bytes} bytes", u64::from_le_bytes(ack));
    Ok(bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9)
}

/// Request/response round trips of [`MESSAGE`] bytes on one connection to an echo server (after
/// 100 unmeasured ones); returns (p50, p99) in µs.
pub async fn latency(mut stream: TcpStream, requests: usize) -> Result<(f64, f64)> {
    stream.set_nodelay(true)?;
    let mut buf = [7u8; MESSAGE];
    for _ in 0..100 {
        stream.write_all(&buf).await?;
        stream.read_exact(&mut buf).await?;
    }
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let start = Instant::now();
        stream.write_all(&buf).await?;
        stream.read_exact(&mut buf).await?;
        samples.push(start.elapsed());
    }
    Ok((percentile(&mut samples, 0.50), percentile(&mut samples, 0.99)))
}

/// The `p` quantile of `samples`, in µs.
pub fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
}

/// The `p` quantile of `sorted` (ascending), as is.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The median of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Per connection: reads one byte, answers one byte, closes.
pub fn serve_ping(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut one = [0u8; 1];
                if s.read_exact(&mut one).await.is_ok() {
                    let _ = s.write_all(&one).await;
                }
            });
        }
    })
}

/// New connections per second against a ping server for `duration`, `concurrency` at a time:
/// each connects (through `connect`), sends a byte, waits for the answer and closes.
pub async fn connection_rate<F, Fut>(connect: F, duration: Duration, concurrency: usize) -> Result<f64>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<TcpStream>> + Send,
{
    let connect = std::sync::Arc::new(connect);
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let connect = connect.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let mut s = connect().await?;
                    s.write_all(b"p").await?;
                    let mut one = [0u8; 1];
                    s.read_exact(&mut one).await.context("no answer from the ping server")?;
                    done += 1;
                }
                Ok::<u64, anyhow::Error>(done)
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Closed-loop request/response on many connections at once: figures of one run.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Concurrent {
    /// Connections, each with one [`MESSAGE`]-byte request outstanding at a time.
    pub connections: usize,
    /// Round trips completed per second, all connections together.
    pub requests_per_s: f64,
    /// Latency of one round trip, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
}

/// Every stream of `streams` sends a [`MESSAGE`]-byte request to an echo server, waits for the
/// answer and sends the next, for `duration` (after 10 unmeasured round trips each, so that no
/// connection set-up is measured); the latencies of all round trips together.
pub async fn concurrent_latency(streams: Vec<TcpStream>, duration: Duration) -> Result<Concurrent> {
    let connections = streams.len();
    let warm = std::sync::Arc::new(tokio::sync::Barrier::new(connections + 1));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let (warm, stop) = (warm.clone(), stop.clone());
            tokio::spawn(async move {
                s.set_nodelay(true)?;
                let mut buf = [7u8; MESSAGE];
                let mut exchange = async |s: &mut TcpStream| {
                    s.write_all(&buf).await?;
                    s.read_exact(&mut buf).await.context("the echo server closed")
                };
                let warmed = async {
                    for _ in 0..10 {
                        exchange(&mut s).await?;
                    }
                    Ok::<_, anyhow::Error>(())
                }
                .await;
                warm.wait().await;
                warmed?;
                let mut samples = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let start = Instant::now();
                    exchange(&mut s).await?;
                    samples.push(start.elapsed());
                }
                Ok::<_, anyhow::Error>(samples)
            })
        })
        .collect();
    warm.wait().await;
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    ensure!(!samples.is_empty(), "no round trip completed in {duration:?}");
    let requests_per_s = samples.len() as f64 / elapsed;
    Ok(Concurrent {
        connections,
        requests_per_s,
        p50_us: percentile(&mut samples, 0.50),
        p99_us: percentile(&mut samples, 0.99),
        p999_us: percentile(&mut samples, 0.999),
    })
}

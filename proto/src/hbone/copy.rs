//! The bidirectional copy between a plain stream (TCP to or from an application) and a tunnel.
//!
//! Half-close is carried both ways: EOF from the application becomes `END_STREAM` on the tunnel, and
//! `END_STREAM` from the tunnel becomes a write shutdown (FIN) towards the application; the other
//! direction keeps flowing until it ends too. An error on either side aborts both: the tunnel
//! stream is reset and the plain stream dropped.
//!
//! Bytes read from the application go to HTTP/2 without being copied again (`Bytes` split off the
//! read buffer). The read buffer grows while reads fill it (busy stream) and shrinks when they do
//! not; a read left waiting for a while drops back to the minimum, so an idle tunnel holds about a
//! kilobyte per direction instead of the peak buffer.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::stream::{H2Stream, h2_to_io};

/// Smallest (and idle) read buffer.
const MIN_BUF: usize = 1024;
/// Largest read buffer; big enough that per-read overhead vanishes at tens of Gbit/s.
const MAX_BUF: usize = 256 * 1024;
/// A read waiting this long releases its large buffer.
const IDLE_SHRINK: Duration = Duration::from_secs(1);

/// Bytes moved by a copy, counted from the application's side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Application → tunnel.
    pub sent: u64,
    /// Tunnel → application.
    pub received: u64,
}

/// A copy that ended in error, with what was moved before it.
#[derive(Debug, thiserror::Error)]
#[error("{direction} failed after {} bytes sent and {} received: {source}", transferred.sent, transferred.received)]
pub struct CopyError {
    /// Which leg failed.
    pub direction: Direction,
    /// Bytes moved before the failure.
    pub transferred: Transferred,
    /// The error.
    pub source: io::Error,
}

/// A leg of the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reading the application or sending into the tunnel.
    Send,
    /// Receiving from the tunnel or writing to the application.
    Receive,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Send => "application → tunnel",
            Direction::Receive => "tunnel → application",
        })
    }
}

/// Copies between `io` and `tunnel` until both directions have ended, carrying half-closes.
pub async fn copy_bidirectional<S>(io: S, tunnel: H2Stream) -> Result<Transferred, CopyError>
where
    S: AsyncRead + AsyncWrite,
{
    copy_bidirectional_until(io, tunnel, std::future::pending()).await.map(|(t, _)| t)
}

/// Like [`copy_bidirectional`], but abandons the copy when `stop` resolves (a policy revoked the
/// connection, the proxy is shutting down): the tunnel stream is reset and the plain stream dropped.
/// Returns what was moved and whether `stop` ended it.
pub async fn copy_bidirectional_until<S>(
    io: S,
    tunnel: H2Stream,
    stop: impl Future<Output = ()>,
) -> Result<(Transferred, bool), CopyError>
where
    S: AsyncRead + AsyncWrite,
{
    let (reader, writer) = tokio::io::split(io);
    let (mut send, recv, pending, _slot) = tunnel.into_parts();
    let mut sent = 0u64;
    let mut received = 0u64;

    let result = {
        let upload = upload(reader, &mut send, &mut sent);
        let download = download(recv, pending, writer, &mut received);
        let both = async {
            tokio::try_join!(async { upload.await.map_err(|e| (Direction::Send, e)) }, async {
                download.await.map_err(|e| (Direction::Receive, e))
            },)
        };
        tokio::select! {
            r = both => Some(r),
            () = stop => None,
        }
    };
    let transferred = Transferred { sent, received };
    match result {
        Some(Ok(_)) => Ok((transferred, false)),
        Some(Err((direction, source))) => {
            send.send_reset(h2::Reason::CANCEL);
            Err(CopyError { direction, transferred, source })
        }
        None => {
            send.send_reset(h2::Reason::CANCEL);
            Ok((transferred, true))
        }
    }
}

/// Copies between two plain streams (`client` and `server`) until both directions have ended,
/// carrying half-closes, or until `stop` resolves. Returns the bytes moved (`sent`: client →
/// server, `received`: server → client), whether `stop` ended it, and the first error.
pub async fn copy_plain_until<A, B>(
    client: A,
    server: B,
    stop: impl Future<Output = ()>,
) -> (Transferred, bool, Option<io::Error>)
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    let mut sent = 0u64;
    let mut received = 0u64;
    let result = {
        let up = pipe(client_read, server_write, &mut sent);
        let down = pipe(server_read, client_write, &mut received);
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => Some(r),
            () = stop => None,
        }
    };
    let transferred = Transferred { sent, received };
    match result {
        Some(Ok(_)) => (transferred, false, None),
        Some(Err(e)) => (transferred, false, Some(e)),
        None => (transferred, true, None),
    }
}

/// One direction of a plain copy, ending with a write shutdown on EOF.
async fn pipe<R: AsyncRead, W: AsyncWrite>(reader: R, writer: W, moved: &mut u64) -> io::Result<()> {
    let reader = std::pin::pin!(reader);
    let mut reader = AdaptiveReader::new(reader);
    let mut writer = std::pin::pin!(writer);
    while let Some(chunk) = reader.next().await? {
        writer.write_all(&chunk).await?;
        *moved += chunk.len() as u64;
    }
    writer.shutdown().await
}

/// Application → tunnel, ending with `END_STREAM` on EOF.
async fn upload<R: AsyncRead + Unpin>(reader: R, send: &mut SendStream<Bytes>, sent: &mut u64) -> io::Result<()> {
    let mut reader = AdaptiveReader::new(reader);
    while let Some(chunk) = reader.next().await? {
        let len = chunk.len() as u64;
        send_all(send, chunk).await?;
        *sent += len;
    }
    send.reserve_capacity(0);
    send.send_data(Bytes::new(), true).map_err(h2_to_io)
}

/// Sends `data`, waiting for flow-control capacity so a slow peer slows us down instead of
/// growing a buffer.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    send.reserve_capacity(data.len());
    while !data.is_empty() {
        let cap = send.capacity();
        if cap > 0 {
            let chunk = data.split_to(cap.min(data.len()));
            send.send_data(chunk, false).map_err(h2_to_io)?;
            continue;
        }
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(h2_to_io(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed")),
        }
    }
    Ok(())
}

/// Tunnel → application, ending with a write shutdown on `END_STREAM`.
async fn download<W: AsyncWrite>(
    mut recv: RecvStream,
    pending: Bytes,
    writer: W,
    received: &mut u64,
) -> io::Result<()> {
    let mut writer = std::pin::pin!(writer);
    if !pending.is_empty() {
        writer.write_all(&pending).await?;
        recv.flow_control().release_capacity(pending.len()).map_err(h2_to_io)?;
        *received += pending.len() as u64;
    }
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_to_io)?;
        writer.write_all(&chunk).await?;
        // Window goes back only once the application took the bytes.
        recv.flow_control().release_capacity(chunk.len()).map_err(h2_to_io)?;
        *received += chunk.len() as u64;
    }
    writer.shutdown().await
}

/// Reads into a buffer sized by recent traffic; see the module docs.
struct AdaptiveReader<R> {
    io: R,
    buf: BytesMut,
    target: usize,
    idle: Pin<Box<Sleep>>,
    idle_armed: bool,
}

impl<R: AsyncRead + Unpin> AdaptiveReader<R> {
    fn new(io: R) -> Self {
        AdaptiveReader {
            io,
            buf: BytesMut::new(),
            target: MIN_BUF,
            idle: Box::pin(tokio::time::sleep_until(Instant::now())),
            idle_armed: false,
        }
    }

    /// The next chunk, or `None` at EOF.
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        let this = self;
        poll_fn(|cx| {
            loop {
                if this.buf.capacity() < this.target {
                    this.buf.reserve(this.target);
                }
                let room = this.buf.capacity() - this.buf.len();
                match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(None)),
                    Poll::Ready(Ok(n)) => {
                        this.idle_armed = false;
                        if n >= room && this.target < MAX_BUF {
                            this.target *= 2;
                        } else if n < this.target / 4 && this.target > MIN_BUF {
                            this.target /= 2;
                        }
                        return Poll::Ready(Ok(Some(this.buf.split_to(n).freeze())));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if this.buf.capacity() <= MIN_BUF {
                            return Poll::Pending;
                        }
                        if !this.idle_armed {
                            this.idle.as_mut().reset(Instant::now() + IDLE_SHRINK);
                            this.idle_armed = true;
                        }
                        if this.idle.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        // Idle: trade the big buffer for a small one and wait again.
                        this.idle_armed = false;
                        this.target = MIN_BUF;
                        this.buf = BytesMut::new();
                    }
                }
            }
        })
        .await
    }

    /// Bytes currently held for reading.
    #[cfg(test)]
    fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn read_buffer_grows_under_load_and_shrinks_when_idle() {
        let (mut tx, rx) = tokio::io::duplex(4 * MAX_BUF);
        let mut reader = AdaptiveReader::new(rx);
        tx.write_all(&vec![7u8; 2 * MAX_BUF]).await.unwrap();
        let mut total = 0;
        let mut largest = 0;
        while total < 2 * MAX_BUF {
            let chunk = reader.next().await.unwrap().unwrap();
            total += chunk.len();
            largest = largest.max(chunk.len());
        }
        assert_eq!(total, 2 * MAX_BUF);
        assert!(largest >= MAX_BUF / 2, "buffer never grew: largest read {largest}");

        // Nothing more arrives: after the idle period the reader holds only the minimum.
        let read = tokio::spawn(async move {
            let chunk = reader.next().await.unwrap().unwrap();
            (chunk, reader.buffer_capacity())
        });
        tokio::time::sleep(IDLE_SHRINK * 2).await;
        tx.write_all(b"x").await.unwrap();
        let (chunk, capacity) = read.await.unwrap();
        assert_eq!(&chunk[..], b"x");
        assert!(capacity <= MIN_BUF, "idle reader kept {capacity} bytes");
    }

    #[tokio::test]
    async fn eof_is_reported_once_data_is_consumed() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = AdaptiveReader::new(rx);
        tx.write_all(b"abc").await.unwrap();
        drop(tx);
        assert_eq!(&reader.next().await.unwrap().unwrap()[..], b"abc");
        assert!(reader.next().await.unwrap().is_none());
    }
}

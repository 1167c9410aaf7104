//! The bidirectional copy between a plain stream (TCP to or from an application) and a tunnel.
//!
//! Half-close is carried both ways: EOF from the application becomes `END_STREAM` on the tunnel, and
//! `END_STREAM` from the tunnel becomes a write shutdown (FIN) towards the application; the other
//! direction keeps flowing until it ends too. An error on either side aborts both: the tunnel
//! stream is reset and the plain stream dropped.
//!
//! Bytes read from the application go to HTTP/2 without being copied again (`Bytes` split off the
//! read buffer). Reads wait for readiness *without* a buffer, so a direction waiting for data holds
//! no read memory at all; a buffer is taken only when data is there, sized by recent traffic: it
//! grows while reads fill it (busy stream) and shrinks when they do not.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

use super::stream::{H2Stream, h2_to_io};

/// Smallest read buffer.
const MIN_BUF: usize = 1024;
/// Largest read buffer; big enough that per-read overhead vanishes at tens of Gbit/s.
const MAX_BUF: usize = 256 * 1024;

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
pub async fn copy_bidirectional(io: TcpStream, tunnel: H2Stream) -> Result<Transferred, CopyError> {
    copy_bidirectional_until(io, tunnel, std::future::pending::<()>()).await.map(|(t, _)| t)
}

/// Like [`copy_bidirectional`], but abandons the copy when `stop` resolves (a policy revoked the
/// connection, the proxy is shutting down): the tunnel stream is reset and the plain stream
/// dropped. Resolves to what was moved and whether `stop` ended it.
///
/// A named future rather than an `async fn`: it holds the copy's state once, where an `async fn`
/// would also keep its arguments for as long as it runs. Await it by `&mut` from a caller that
/// keeps it anyway (as an argument), so it is not moved into a second slot either: per open
/// connection, these bytes are the cost. `stop` is kept inline, hence `Unpin` (box one that is
/// not).
pub fn copy_bidirectional_until<S: Future<Output = ()> + Unpin>(
    io: TcpStream,
    tunnel: H2Stream,
    stop: S,
) -> CopyUntil<S> {
    let (send, recv, pending, sent_early, slot) = tunnel.into_parts();
    CopyUntil {
        copy: Bidi {
            io,
            send,
            recv,
            reader: Sizer::default(),
            buf: BytesMut::new(),
            upload: None,
            upload_done: false,
            download: pending,
            download_done: false,
            shut_down: false,
            transferred: Transferred { sent: u64::from(sent_early), received: 0 },
        },
        stop,
        _slot: slot,
    }
}

/// The future of [`copy_bidirectional_until`].
pub struct CopyUntil<S> {
    copy: Bidi,
    stop: S,
    /// Keeps the pooled connection's stream count until the stream is gone (client side only).
    _slot: Option<super::pool::StreamSlot>,
}

impl<S> std::fmt::Debug for CopyUntil<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyUntil").field("transferred", &self.copy.transferred).finish_non_exhaustive()
    }
}

impl<S: Future<Output = ()> + Unpin> Future for CopyUntil<S> {
    type Output = Result<(Transferred, bool), CopyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match Pin::new(&mut this.copy).poll(cx) {
            Poll::Ready(Ok(())) => return Poll::Ready(Ok((this.copy.transferred, false))),
            Poll::Ready(Err((direction, source))) => {
                this.copy.send.send_reset(h2::Reason::CANCEL);
                return Poll::Ready(Err(CopyError { direction, transferred: this.copy.transferred, source }));
            }
            Poll::Pending => {}
        }
        if Pin::new(&mut this.stop).poll(cx).is_ready() {
            this.copy.send.send_reset(h2::Reason::CANCEL);
            return Poll::Ready(Ok((this.copy.transferred, true)));
        }
        Poll::Pending
    }
}

/// The bidirectional copy as one small state machine: a connection's task holds this and little
/// else for as long as the connection lives, so its size is the per-connection cost.
struct Bidi {
    io: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    reader: Sizer,
    /// Read buffer; empty (no allocation) while waiting for data.
    buf: BytesMut,
    /// Read from the application, not yet sent into the tunnel.
    upload: Option<Bytes>,
    upload_done: bool,
    /// Received from the tunnel, not yet written to the application.
    download: Bytes,
    download_done: bool,
    shut_down: bool,
    transferred: Transferred,
}

impl Bidi {
    /// Application → tunnel, until it would wait; `Ready` once `END_STREAM` is sent.
    fn poll_upload(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Some(chunk) = &mut self.upload {
                while !chunk.is_empty() {
                    self.send.reserve_capacity(chunk.len());
                    let cap = self.send.capacity();
                    if cap == 0 {
                        match self.send.poll_capacity(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Some(Ok(_))) => continue,
                            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_to_io(e))),
                            Poll::Ready(None) => {
                                return Poll::Ready(Err(io::Error::new(
                                    io::ErrorKind::BrokenPipe,
                                    "tunnel stream closed",
                                )));
                            }
                        }
                    }
                    let part = chunk.split_to(cap.min(chunk.len()));
                    let len = part.len() as u64;
                    self.send.send_data(part, false).map_err(h2_to_io)?;
                    self.transferred.sent += len;
                }
                self.upload = None;
            }
            std::task::ready!(self.io.poll_read_ready(cx))?;
            let room = self.reader.reserve(&mut self.buf);
            match read_buf(&mut self.io, cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => {
                    self.buf = BytesMut::new();
                    self.send.reserve_capacity(0);
                    self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(n)) => {
                    self.reader.after_read(n, room);
                    self.upload = Some(self.buf.split_to(n).freeze());
                    if n < room {
                        // Drained: the next poll waits, and waits holding no buffer.
                        self.buf = BytesMut::new();
                    }
                }
                // Wait with no buffer at all (sent chunks keep their own part of it).
                Poll::Pending => {
                    self.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Tunnel → application, until it would wait; `Ready` once the write side is shut down.
    fn poll_download(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while !self.download.is_empty() {
                let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.download))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                let _ = self.download.split_to(n);
                // Window goes back only once the application took the bytes.
                self.recv.flow_control().release_capacity(n).map_err(h2_to_io)?;
                self.transferred.received += n as u64;
            }
            // An empty slice still holds the whole buffer HTTP/2 read it from (shared with the
            // frames of other streams): let go of it while waiting.
            self.download = Bytes::new();
            if self.download_done {
                if !self.shut_down {
                    std::task::ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(chunk) => self.download = chunk.map_err(h2_to_io)?,
                None => self.download_done = true,
            }
        }
    }
}

impl Future for Bidi {
    type Output = Result<(), (Direction, io::Error)>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if !this.upload_done {
            match this.poll_upload(cx) {
                Poll::Ready(Ok(())) => this.upload_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err((Direction::Send, e))),
                Poll::Pending => {}
            }
        }
        if !(this.download_done && this.shut_down) {
            match this.poll_download(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err((Direction::Receive, e))),
                Poll::Pending => {}
            }
        }
        if this.upload_done && this.download_done && this.shut_down { Poll::Ready(Ok(())) } else { Poll::Pending }
    }
}

/// One read into `buf`'s spare room, through the socket's `AsyncRead` rather than `try_read`: a
/// read that comes back short shows the socket drained, and tokio then clears its readiness at
/// once instead of making us learn it from a second `read(2)` that fails with `EAGAIN` (one
/// syscall saved per message on request/response traffic).
fn read_buf<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut std::task::Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Read-buffer sizing from recent traffic (see the module docs).
#[derive(Debug)]
pub(super) struct Sizer {
    target: usize,
}

impl Default for Sizer {
    fn default() -> Self {
        Sizer { target: MIN_BUF }
    }
}

impl Sizer {
    /// The size the next read should have room for.
    pub(super) fn target(&self) -> usize {
        self.target
    }

    /// Makes room in `buf` for the next read; returns the room.
    pub(super) fn reserve(&self, buf: &mut BytesMut) -> usize {
        if buf.capacity() - buf.len() < self.target {
            buf.reserve(self.target);
        }
        buf.capacity() - buf.len()
    }

    /// Grows after a read that filled the room, shrinks after small ones.
    pub(super) fn after_read(&mut self, n: usize, room: usize) {
        if n >= room && self.target < MAX_BUF {
            self.target *= 2;
        } else if n < self.target / 4 && self.target > MIN_BUF {
            self.target /= 2;
        }
    }
}

/// Copies between two plain streams (`client` and `server`) until both directions have ended,
/// carrying half-closes, or until `stop` resolves. Returns the bytes moved (`sent`: client →
/// server, `received`: server → client), whether `stop` ended it, and the first error.
pub async fn copy_plain_until(
    client: TcpStream,
    server: TcpStream,
    stop: impl Future<Output = ()>,
) -> (Transferred, bool, Option<io::Error>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
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
async fn pipe<W: AsyncWrite>(reader: OwnedReadHalf, writer: W, moved: &mut u64) -> io::Result<()> {
    let mut reader = AdaptiveReader::new(reader);
    let mut writer = std::pin::pin!(writer);
    while let Some(chunk) = reader.next().await? {
        writer.write_all(&chunk).await?;
        *moved += chunk.len() as u64;
    }
    writer.shutdown().await
}

/// Reads into a buffer sized by recent traffic; see the module docs.
struct AdaptiveReader {
    io: OwnedReadHalf,
    buf: BytesMut,
    sizer: Sizer,
}

impl AdaptiveReader {
    fn new(io: OwnedReadHalf) -> Self {
        AdaptiveReader { io, buf: BytesMut::new(), sizer: Sizer::default() }
    }

    /// The next chunk, or `None` at EOF.
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        // Wait for data holding no buffer.
        self.io.readable().await?;
        let (n, room) = std::future::poll_fn(|cx| {
            let room = self.sizer.reserve(&mut self.buf);
            match read_buf(&mut self.io, cx, &mut self.buf) {
                Poll::Ready(r) => Poll::Ready(r.map(|n| (n, room))),
                // The readiness was stale, or the task used up its turn (tokio's cooperative
                // budget: `readable()` above does not count against it, the read does). Either
                // way the read arranged the wake-up: yield, and wait holding no buffer (chunks
                // handed out keep their own part of it). Going back to `readable()` instead
                // would spin without ever yielding.
                Poll::Pending => {
                    self.buf = BytesMut::new();
                    Poll::Pending
                }
            }
        })
        .await?;
        if n == 0 {
            return Ok(None);
        }
        self.sizer.after_read(n, room);
        let chunk = self.buf.split_to(n).freeze();
        if n < room {
            // Drained: the next call waits, and waits holding no buffer.
            self.buf = BytesMut::new();
        }
        Ok(Some(chunk))
    }

    /// Bytes currently held for reading.
    #[cfg(test)]
    fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, OwnedReadHalf) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tx = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (rx, _) = listener.accept().await.unwrap();
        (tx, rx.into_split().0)
    }

    #[tokio::test]
    async fn read_buffer_grows_under_load_and_is_released_when_idle() {
        let (mut tx, rx) = pair().await;
        let mut reader = AdaptiveReader::new(rx);
        let writer = tokio::spawn(async move {
            tx.write_all(&vec![7u8; 8 * MAX_BUF]).await.unwrap();
            tx
        });
        let mut total = 0;
        let mut largest = 0;
        while total < 8 * MAX_BUF {
            let chunk = reader.next().await.unwrap().unwrap();
            total += chunk.len();
            largest = largest.max(chunk.len());
        }
        let mut tx = writer.await.unwrap();
        assert_eq!(total, 8 * MAX_BUF);
        assert!(largest >= MAX_BUF / 2, "buffer never grew: largest read {largest}");

        // Nothing more arrives: the reader holds no buffer while it waits (it takes one again
        // when data comes, and lets it go as soon as a read comes back short or would block).
        let read = tokio::spawn(async move {
            let chunk = reader.next().await.unwrap().unwrap();
            let held = reader.buffer_capacity();
            let next = tokio::time::timeout(Duration::from_millis(100), reader.next()).await;
            (chunk, held, next.is_err(), reader.buffer_capacity())
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx.write_all(b"x").await.unwrap();
        let (chunk, held, waiting, idle) = read.await.unwrap();
        assert_eq!(&chunk[..], b"x");
        // A short read shows the socket drained: the buffer goes at once, not at the next read.
        assert_eq!(held, 0, "a drained reader keeps its buffer");
        assert!(waiting);
        assert_eq!(idle, 0, "a reader waiting for data holds a buffer");
        drop(tx);
    }

    /// A plain copy with data always waiting and room always free (sender and receiver on their
    /// own threads) runs out of its task's cooperative budget again and again: it must yield
    /// then, not spin. Before the fix this never finished: the copy's task spun at 100 % CPU in
    /// its read loop and the runtime's only thread never ran anything else again.
    #[test]
    fn a_saturated_plain_copy_yields_instead_of_spinning() {
        const TOTAL: usize = 256 << 20;
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let back = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (relay_addr, upstream_addr) = (front.local_addr().unwrap(), back.local_addr().unwrap());
        // Receiver and sender: blocking threads, as fast as the copy goes.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = back.accept().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0;
            while let Ok(n @ 1..) = std::io::Read::read(&mut s, &mut buf) {
                total += n;
            }
            let _ = tx.send(total);
        });
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(relay_addr).unwrap();
            let chunk = vec![9u8; 1 << 20];
            for _ in 0..TOTAL / chunk.len() {
                std::io::Write::write_all(&mut s, &chunk).unwrap();
            }
        });
        // The copy on a runtime of its own thread (a spinning copy would hold that thread).
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                front.set_nonblocking(true).unwrap();
                let (client, _) = tokio::net::TcpListener::from_std(front).unwrap().accept().await.unwrap();
                let server = TcpStream::connect(upstream_addr).await.unwrap();
                copy_plain_until(client, server, std::future::pending()).await
            })
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(TOTAL), "the copy stalled");
    }

    #[tokio::test]
    async fn eof_is_reported_once_data_is_consumed() {
        let (mut tx, rx) = pair().await;
        let mut reader = AdaptiveReader::new(rx);
        tx.write_all(b"abc").await.unwrap();
        drop(tx);
        let mut got = Vec::new();
        while let Some(chunk) = reader.next().await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, b"abc");
        assert!(reader.next().await.unwrap().is_none());
    }
}

//! Large reads from a tunnel's socket, whatever size the TLS layer asks for.
//!
//! rustls reads TLS records from its transport at most a few KiB at a time (it sizes its buffer to
//! the next record or 4 KiB more), so a busy tunnel connection would make a `read(2)` per few KiB
//! and, with every read freeing receive-buffer space, the kernel would send a window update
//! nearly as often. [`ReadAhead`] sits under TLS: a small read finds its bytes in a buffer filled
//! by one large read of the socket. The buffer exists only while it holds bytes or the socket
//! keeps it full: it is released as soon as it is drained after a read that came back short (the
//! socket had no more), and when a read has to wait, so an idle connection holds none.
//! Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::copy::Sizer;

/// A transport with read-ahead; see the module docs.
#[derive(Debug)]
pub struct ReadAhead<T> {
    io: T,
    /// Read from the socket, not yet handed out.
    buf: BytesMut,
    /// Read size, from recent traffic: grows while reads fill it, shrinks when they do not.
    sizer: Sizer,
    /// The last read filled what it was given: the socket may have more.
    full: bool,
}

impl<T> ReadAhead<T> {
    /// Wraps `io`.
    pub fn new(io: T) -> Self {
        ReadAhead { io, buf: BytesMut::new(), sizer: Sizer::default(), full: false }
    }

    /// The transport.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Bytes currently held for reading (buffer capacity).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= this.sizer.target() {
                // Asked for at least a read's worth: read into the caller's buffer directly.
                this.buf = BytesMut::new();
                let room = out.remaining();
                let before = out.filled().len();
                std::task::ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
                this.sizer.after_read(out.filled().len() - before, room);
                return Poll::Ready(Ok(()));
            }
            let room = this.sizer.reserve(&mut this.buf);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Ready(Ok(n)) => {
                    this.sizer.after_read(n, room);
                    this.full = n >= room;
                    if n == 0 {
                        this.buf = BytesMut::new();
                        return Poll::Ready(Ok(()));
                    }
                }
                // Waiting (or failed): hold no buffer.
                Poll::Pending => {
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Err(e));
                }
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() && !this.full {
            // Drained, and the socket had no more at the last read: let the buffer go.
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Counts the reads that reached the socket.
    struct Counted {
        io: TcpStream,
        reads: usize,
    }

    impl AsyncRead for Counted {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.io).poll_read(cx, buf);
            if r.is_ready() {
                this.reads += 1;
            }
            r
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tx = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (rx, _) = listener.accept().await.unwrap();
        (tx, rx)
    }

    #[tokio::test]
    async fn small_reads_are_served_from_few_large_ones_and_the_buffer_goes_when_idle() {
        const TOTAL: usize = 8 << 20;
        let (mut tx, rx) = pair().await;
        let data: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            tx.write_all(&sent).await.unwrap();
            tx
        });
        let mut reader = ReadAhead::new(Counted { io: rx, reads: 0 });
        // What rustls asks for: a few KiB at a time.
        let mut got = Vec::with_capacity(TOTAL);
        let mut chunk = [0u8; 4096];
        let mut calls = 0;
        while got.len() < TOTAL {
            let n = reader.read(&mut chunk).await.unwrap();
            assert!(n > 0, "early EOF");
            got.extend_from_slice(&chunk[..n]);
            calls += 1;
        }
        let tx = writer.await.unwrap();
        assert!(got == data, "bytes changed on the way");
        let socket_reads = reader.get_ref().reads;
        assert!(socket_reads * 8 < calls, "{socket_reads} socket reads for {calls} reads of 4 KiB: no read-ahead");

        // Nothing more comes: a read waits, and waits holding no buffer.
        let wait = tokio::time::timeout(Duration::from_millis(100), reader.read(&mut chunk)).await;
        assert!(wait.is_err(), "a read returned with nothing sent");
        assert_eq!(reader.buffer_capacity(), 0, "an idle reader holds a buffer");
        drop(tx);
        assert_eq!(reader.read(&mut chunk).await.unwrap(), 0, "EOF is passed on");
    }

    #[tokio::test]
    async fn a_large_read_goes_straight_to_the_caller() {
        let (mut tx, rx) = pair().await;
        tx.write_all(&[5u8; 1000]).await.unwrap();
        let mut reader = ReadAhead::new(rx);
        let mut big = vec![0u8; 1 << 20];
        let n = reader.read(&mut big).await.unwrap();
        assert!(n > 0 && big[..n].iter().all(|&b| b == 5));
        assert_eq!(reader.buffer_capacity(), 0, "bytes were staged in the read-ahead buffer");
    }
}

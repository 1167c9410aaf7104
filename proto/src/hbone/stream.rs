//! One HBONE tunnel stream: the two halves of an HTTP/2 `CONNECT` stream after a `200`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::StreamSlot;

/// An established tunnel stream.
///
/// Implements `AsyncRead + AsyncWrite` for code that wants a byte stream (e.g. an HTTP server
/// inside the tunnel); [`copy_bidirectional`](super::copy_bidirectional) uses the halves directly to
/// avoid a copy. Shutting down the write side sends `END_STREAM` (a TCP half-close); dropping the
/// stream before both sides ended resets it.
#[derive(Debug)]
pub struct H2Stream {
    pub(super) send: SendStream<Bytes>,
    pub(super) recv: RecvStream,
    /// Received bytes not yet handed to the reader.
    pending: Bytes,
    recv_done: bool,
    send_done: bool,
    /// Bytes sent before the stream was answered ([`ConnectRequest::early_data`]); a copy counts
    /// them as sent.
    ///
    /// [`ConnectRequest::early_data`]: super::pool::ConnectRequest::early_data
    pub(super) sent_early: u32,
    /// Keeps the pooled connection's stream count until the stream is gone (client side only).
    pub(super) _slot: Option<StreamSlot>,
}

pub(super) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 i/o error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl H2Stream {
    pub(super) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<StreamSlot>) -> Self {
        H2Stream { send, recv, pending: Bytes::new(), recv_done: false, send_done: false, sent_early: 0, _slot: slot }
    }

    /// Splits into the raw halves, the bytes received and not read, the bytes sent early and the
    /// pool slot (which must outlive both halves).
    pub(super) fn into_parts(self) -> (SendStream<Bytes>, RecvStream, Bytes, u32, Option<StreamSlot>) {
        (self.send, self.recv, self.pending, self.sent_early, self._slot)
    }

    /// Bytes sent before the stream was answered (early data), which a copy counts as sent.
    pub fn sent_early(&self) -> u64 {
        u64::from(self.sent_early)
    }

    /// Receives the next chunk into the read buffer without consuming anything, for looking at a
    /// stream's first bytes ([`buffered`](Self::buffered)) before deciding how to read it; reads
    /// then start with them. `Ok(false)` once the peer has ended its side.
    pub async fn fill(&mut self) -> io::Result<bool> {
        if self.recv_done {
            return Ok(false);
        }
        match std::future::poll_fn(|cx| self.recv.poll_data(cx)).await {
            Some(Ok(chunk)) => {
                self.pending = if self.pending.is_empty() {
                    chunk
                } else {
                    let mut joined = bytes::BytesMut::with_capacity(self.pending.len() + chunk.len());
                    joined.extend_from_slice(&self.pending);
                    joined.extend_from_slice(&chunk);
                    joined.freeze()
                };
                Ok(true)
            }
            Some(Err(e)) => Err(h2_to_io(e)),
            None => {
                self.recv_done = true;
                Ok(false)
            }
        }
    }

    /// Bytes received and not yet read.
    pub fn buffered(&self) -> &[u8] {
        &self.pending
    }

    /// Aborts the stream with `RST_STREAM(CANCEL)`.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                if this.pending.is_empty() {
                    // An empty slice still holds the buffer HTTP/2 read it from: let go of it.
                    this.pending = Bytes::new();
                }
                // Return window only as the reader consumes: that is the back-pressure.
                this.recv.flow_control().release_capacity(n).map_err(h2_to_io)?;
                return Poll::Ready(Ok(()));
            }
            if this.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => this.recv_done = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.send_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.send.reserve_capacity(buf.len());
        loop {
            let cap = this.send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_to_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.send_done {
            this.send_done = true;
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

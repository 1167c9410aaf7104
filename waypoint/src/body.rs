//! Body plumbing: a request body kept for sending more than once (retries, mirrors) when it is
//! small enough, streamed once when it is not; and a response body cut off at the route's
//! deadline.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::upstream::{Body, BoxError};

/// A request body on its way upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// Held whole: can be sent any number of times.
    Buffered(Bytes),
    /// Streamed: can be sent once (`None` after that).
    Stream(Option<Body>),
}

impl RequestBody {
    /// The body for the next send, if it can be sent again.
    pub fn take(&mut self) -> Option<Body> {
        match self {
            RequestBody::Buffered(b) => Some(Full::new(b.clone()).map_err(|e| match e {}).boxed()),
            RequestBody::Stream(s) => s.take(),
        }
    }

    /// Reads `body` whole if it ends within `limit` bytes; a longer one streams on from where the
    /// reading stopped (nothing read is lost), to be sent once.
    pub async fn buffer_up_to(mut body: Body, limit: usize) -> Result<RequestBody, BoxError> {
        let mut frames = VecDeque::new();
        let mut size = 0usize;
        loop {
            let Some(frame) = body.frame().await else {
                let mut whole = BytesMut::with_capacity(size);
                for f in frames.into_iter().filter_map(|f: Frame<Bytes>| f.into_data().ok()) {
                    whole.extend_from_slice(&f);
                }
                return Ok(RequestBody::Buffered(whole.freeze()));
            };
            let frame = frame?;
            size += frame.data_ref().map_or(0, Bytes::len);
            frames.push_back(frame);
            if size > limit {
                let rest = Prefixed { read: frames, rest: body };
                return Ok(RequestBody::Stream(Some(rest.boxed())));
            }
        }
    }
}

/// Frames already read, then the rest of the body.
#[derive(Debug)]
struct Prefixed {
    read: VecDeque<Frame<Bytes>>,
    rest: Body,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }
}

/// A response body that fails once `deadline` passes, so the route's timeout covers the whole
/// response (as Envoy's does), not only its headers.
#[derive(Debug)]
pub struct Deadline {
    inner: Body,
    sleep: Pin<Box<Sleep>>,
}

impl Deadline {
    /// `inner`, cut off at `deadline`.
    pub fn new(inner: Body, deadline: Instant) -> Self {
        Deadline { inner, sleep: Box::pin(tokio::time::sleep_until(deadline)) }
    }
}

/// The error a body cut off by its deadline ends with.
#[derive(Debug, thiserror::Error)]
#[error("upstream response timeout: the route's timeout passed while the body was streaming")]
pub struct BodyTimeout;

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! What an open HBONE stream keeps allocated on the server: not the request it started with.
//!
//! Its own test binary: it counts the process's live allocations of one size with a global
//! allocator, which other tests running alongside would disturb.

#![allow(clippy::unwrap_used, clippy::expect_used, unsafe_code)]

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

use proto::hbone::pool::{ConnectRequest, Pool, PoolConfig};
use proto::hbone::server::{InboundConnect, ServerConfig};
use support::{FnHandler, TestServer, ca_and_server, id};

/// The allocation size counted (0: none yet).
static WATCHED: AtomicUsize = AtomicUsize::new(0);
/// Allocations of that size alive now.
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting the live allocations of the watched size.
struct Counting;

fn count(size: usize, delta: isize) {
    if size == WATCHED.load(Ordering::Relaxed) {
        LIVE.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed to `System` as it is; the counting touches only atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 1);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 1);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(layout.size(), -1);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(layout.size(), -1);
        count(new_size, 1);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The server boxes each validated `CONNECT` on its way to the stream's task (so the task is not
/// sized for it); that box must be freed once the handler has taken the request, not kept until
/// the stream ends. 200 streams are held open, each by a handler that took its request at once:
/// allocations the size of the request must not have grown by one per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_stream_does_not_keep_the_request_it_started_with() {
    const STREAMS: usize = 200;
    let (ca, server_cred, trust) = ca_and_server("server");
    let release = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let release = release.clone();
        FnHandler(move |connect: InboundConnect| {
            let release = release.clone();
            // The request is consumed here; only the stream is held.
            let stream = connect.accept();
            async move {
                let _stream = stream;
                release.notified().await;
            }
        })
    };
    let server = TestServer::start(server_cred, trust.clone(), ServerConfig::default(), Arc::new(handler)).await;
    let pool = Pool::new(PoolConfig::default(), trust);
    let cred = ca.credential(id("client").as_str());
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let request = || ConnectRequest::new(cred.clone(), server.addr, vec![id("server")], target);
    // Warm up (the pool's connection, the server's first stream), then start counting.
    drop(pool.connect(request()).await.unwrap());
    WATCHED.store(std::mem::size_of::<InboundConnect>(), Ordering::Relaxed);
    let before = LIVE.load(Ordering::Relaxed);

    let mut held = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        held.push(pool.connect(request()).await.unwrap());
    }
    // Every stream has been answered, so every handler has taken its request.
    let grown = LIVE.load(Ordering::Relaxed) - before;
    assert!(
        grown < (STREAMS / 4) as isize,
        "{grown} more allocations of {} bytes (a request's size) with {STREAMS} streams held",
        std::mem::size_of::<InboundConnect>()
    );
    release.notify_waiters();
    drop(held);
}

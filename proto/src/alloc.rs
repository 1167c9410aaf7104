//! The proxies' memory allocator: jemalloc, not the system allocator.
//!
//! The data path allocates and frees buffers of up to a few hundred KiB at a high rate (TLS
//! records, HTTP/2 frames, read buffers sized by traffic), which glibc serves with fresh pages — a
//! page fault and a zeroed page per 4 KiB, about a sixth of a busy ztunnel's CPU — where jemalloc
//! reuses them (the waypoint, which allocates per request, spends about 5 % less CPU per request).
//! A binary opts in with [`proxy_allocator!`](crate::proxy_allocator).

#[doc(hidden)]
pub use tikv_jemallocator::Jemalloc;

/// jemalloc's options (read before `main`; the `_RJEM_MALLOC_CONF` environment variable overrides
/// them): freed pages go back to the kernel after about a second, by one background thread, so an
/// idle proxy's memory falls back without waiting for its next allocation.
pub const OPTIONS: &str = "background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0";

/// Makes jemalloc, with [`OPTIONS`], the global allocator of the binary that invokes it (once, at
/// the crate root).
#[macro_export]
macro_rules! proxy_allocator {
    () => {
        #[global_allocator]
        static ALLOC: $crate::alloc::Jemalloc = $crate::alloc::Jemalloc;

        /// [`proto::alloc::OPTIONS`], NUL-terminated, where jemalloc looks for them.
        #[allow(unsafe_code)]
        #[unsafe(export_name = "_rjem_malloc_conf")]
        static JEMALLOC_CONF: &[u8; $crate::alloc::OPTIONS.len() + 1] = &{
            let mut conf = [0u8; $crate::alloc::OPTIONS.len() + 1];
            let options = $crate::alloc::OPTIONS.as_bytes();
            let mut i = 0;
            while i < options.len() {
                conf[i] = options[i];
                i += 1;
            }
            conf
        };
    };
}

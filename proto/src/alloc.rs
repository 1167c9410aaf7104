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

/// Hands what the calling thread's allocator cache holds back to the shared arenas, where pages
/// left empty go back to the kernel at the next decay (about a second, [`OPTIONS`]). jemalloc
/// trims a thread's cache only as that thread allocates more, so a thread that went quiet after a
/// burst keeps its cache — up to hundreds of KiB of freed buffers — until its next burst; a thread
/// carrying traffic calls this now and then (`ztunnel`'s shards: every second).
pub fn flush_thread_cache() {
    // Fails only where the thread has no cache (`_RJEM_MALLOC_CONF=tcache:false`): nothing to do.
    let _ = control(c"thread.tcache.flush");
}

/// Runs jemalloc's control `name`, one that neither reads nor writes a value.
fn control(name: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: `name` is NUL-terminated, and no value goes either way (null pointers, length 0):
    // jemalloc reads or writes a value only through a pointer that is not null. Private, and
    // called only with the names of controls that take no value.
    #[allow(unsafe_code)]
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(name.as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), 0)
    };
    match rc {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_cache_flush_is_a_control_jemalloc_knows() {
        // A misspelt name would make `flush_thread_cache` a silent no-op: jemalloc answers ENOENT.
        assert_eq!(
            control(c"thread.tcache.flsuh").map_err(|e| e.raw_os_error()),
            Err(Some(nix::errno::Errno::ENOENT as i32))
        );
        assert!(control(c"thread.tcache.flush").is_ok());
    }
}

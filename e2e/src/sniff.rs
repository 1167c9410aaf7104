//! Packet capture on a namespace's interfaces (`AF_PACKET`, every protocol), to check what crosses
//! the underlay.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use ztunnel::netns::NetNs;

/// `ETH_P_ALL`, in network byte order as `socket(2)` wants it.
const ETH_P_ALL: i32 = (0x0003u16).to_be() as i32;

/// A running capture; [`Sniffer::finish`] returns every frame's bytes, concatenated.
#[derive(Debug)]
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<u8>>>,
}

impl Sniffer {
    /// Starts capturing every frame on every interface of `netns`.
    pub fn start(netns: &NetNs) -> Result<Sniffer> {
        let socket = netns
            .run(|| Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(ETH_P_ALL))))
            .context("opening a packet socket")?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        socket.set_recv_buffer_size(8 << 20)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut socket = socket;
            let mut seen = Vec::new();
            let mut frame = vec![0u8; 65536];
            while !flag.load(Ordering::SeqCst) {
                match socket.read(&mut frame) {
                    Ok(n) => seen.extend_from_slice(&frame[..n]),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(seen)
        });
        Ok(Sniffer { stop, thread })
    }

    /// Stops and returns what was captured.
    pub fn finish(self) -> Result<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().map_err(|_| anyhow::anyhow!("capture thread panicked"))?
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

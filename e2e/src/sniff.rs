//! Packet capture on a namespace's interfaces (`AF_PACKET`, every protocol), to check what crosses
//! the underlay.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use ztunnel::netns::NetNs;

/// `ETH_P_ALL`, in network byte order as `socket(2)` wants it.
const ETH_P_ALL: i32 = (0x0003u16).to_be() as i32;

/// A running capture; [`Sniffer::finish`] returns every frame's bytes, concatenated, and
/// [`Sniffer::frames`] the frames one by one.
#[derive(Debug)]
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<Vec<u8>>>>,
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
            loop {
                // Read the flag before the socket: once it is set, what is queued is read to the
                // end (every frame sent before `finish` is already queued), then the loop ends.
                let stopping = flag.load(Ordering::SeqCst);
                match socket.read(&mut frame) {
                    Ok(n) => seen.push(frame[..n].to_vec()),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        if stopping {
                            return Ok(seen);
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        });
        Ok(Sniffer { stop, thread })
    }

    /// Stops and returns what was captured, concatenated.
    pub fn finish(self) -> Result<Vec<u8>> {
        Ok(self.frames()?.concat())
    }

    /// Stops and returns the captured frames: every frame that crossed the namespace's
    /// interfaces before the call (no need to wait for the capture to catch up).
    pub fn frames(self) -> Result<Vec<Vec<u8>>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().map_err(|_| anyhow::anyhow!("capture thread panicked"))?
    }
}

/// A TCP segment with data, from a captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Source.
    pub src: SocketAddrV4,
    /// Destination.
    pub dst: SocketAddrV4,
    /// The data it carried.
    pub payload: Vec<u8>,
}

/// The TCP segments carrying data among Ethernet/IPv4 `frames` (anything else is skipped).
pub fn tcp_segments(frames: &[Vec<u8>]) -> Vec<Segment> {
    frames.iter().filter_map(|f| tcp_segment(f)).collect()
}

fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    let be16 = |b: &[u8], at: usize| Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
    if be16(frame, 12)? != 0x0800 {
        return None;
    }
    let ip = frame.get(14..)?;
    let header = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 6 || header < 20 {
        return None;
    }
    let total = usize::from(be16(ip, 2)?).min(ip.len());
    let addr = |at: usize| Some(Ipv4Addr::new(*ip.get(at)?, *ip.get(at + 1)?, *ip.get(at + 2)?, *ip.get(at + 3)?));
    let tcp = ip.get(header..total)?;
    let data_at = usize::from(tcp.get(12)? >> 4) * 4;
    let payload = tcp.get(data_at..)?;
    if payload.is_empty() {
        return None;
    }
    Some(Segment {
        src: SocketAddrV4::new(addr(12)?, be16(tcp, 0)?),
        dst: SocketAddrV4::new(addr(16)?, be16(tcp, 2)?),
        payload: payload.to_vec(),
    })
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_tcp_segment_is_read_from_an_ethernet_frame_and_others_are_skipped() {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let payload = b"hello";
        let total = (20 + 20 + payload.len()) as u16;
        frame.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64, 6, 0, 0]);
        frame.extend_from_slice(&[10, 10, 0, 1, 10, 10, 0, 2]);
        frame.extend_from_slice(&[0x9c, 0x40, 0x3a, 0x98]); // 40000 -> 15000
        frame.extend_from_slice(&[0; 8]);
        frame.extend_from_slice(&[0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(&[0; 6]); // Ethernet padding past the IP length
        let arp = [vec![0u8; 12], vec![0x08, 0x06, 1, 2, 3]].concat();
        let segments = tcp_segments(&[frame, arp, vec![1, 2, 3]]);
        assert_eq!(
            segments,
            vec![Segment {
                src: "10.10.0.1:40000".parse().unwrap(),
                dst: "10.10.0.2:15000".parse().unwrap(),
                payload: payload.to_vec(),
            }]
        );
    }
}

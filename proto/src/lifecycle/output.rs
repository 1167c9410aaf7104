//! Where log lines go, without ever making the thread that logs wait for the output. ztunnel's and
//! the waypoint's workers write an access-log line per connection or request; with stderr a pipe
//! to a log collector that stalls, a plain `write(2)` blocks once the pipe is full, and the data
//! path would stop with it.
//!
//! A line is written at once, on the thread that logged it, when the output can take it without
//! blocking (a regular file always can; a pipe or socket when `poll` says writable and the line
//! fits in a free page) and nothing is waiting before it: as cheap as before, and in the file when
//! the log call returns. Otherwise it joins a queue that a thread of its own writes out (blocking
//! there is harmless), in order. What waits is bounded in bytes: a line that does not fit is
//! dropped and counted, and once the output moves again the writer logs how many were lost — the
//! data path is never held up by its logs, and a loss is never silent. (Istio's ztunnel blocks its workers instead, once 10,000 lines
//! wait.)

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// How many bytes of log lines may wait for the output before new lines are dropped.
pub(super) const QUEUE_LIMIT: usize = 4 << 20;

/// The longest line written straight from the thread that logs: a pipe with room takes at least
/// a page without blocking. Longer lines go through the writer thread.
const DIRECT_MAX: usize = 4096;

/// A batch buffer larger than this is not kept for the next batch (a burst's memory is returned).
const KEEP_CAPACITY: usize = 256 << 10;

/// The sending side of the log output; cheap to clone.
#[derive(Clone)]
pub(super) struct Output {
    shared: Arc<Shared>,
}

struct Shared {
    out: File,
    /// The output is a regular file: writes to it never wait for a reader, so no `poll`.
    is_file: bool,
    state: Mutex<State>,
    /// The writer thread waits here for lines.
    lines: Condvar,
    /// `flush` waits here for the writer to catch up.
    written: Condvar,
    limit: usize,
}

#[derive(Default)]
struct State {
    queue: Vec<u8>,
    /// A thread is writing to the output (a line of its own, or the writer thread a batch):
    /// whatever comes meanwhile queues behind it, so lines keep their order.
    writing: bool,
    /// Lines dropped since the writer last reported a loss.
    dropped: u64,
    /// Lines dropped since the start.
    dropped_total: u64,
    /// Bytes ever accepted, and ever written (or failed to write: there is nowhere to say so);
    /// the difference is what waits, queued or in the writer's hands, and is what the limit bounds.
    accepted: u64,
    written: u64,
    /// The writer thread runs; until it does (or when it could not be started) every line is
    /// written at once, blocking like a plain `write`.
    has_writer: bool,
    /// The writer thread waits for lines: queuing one must wake it.
    idle: bool,
    /// The writer thread is to finish the queue and exit.
    closed: bool,
}

impl Output {
    /// Takes over `out` (stderr's descriptor, duplicated), with at most `limit` bytes waiting.
    /// Lines are written directly until [`Output::start_writer`] has started the writer thread.
    pub(super) fn new(out: OwnedFd, limit: usize) -> Output {
        let out = File::from(out);
        let is_file = out.metadata().is_ok_and(|m| m.is_file());
        let shared = Arc::new(Shared {
            out,
            is_file,
            state: Mutex::new(State::default()),
            lines: Condvar::new(),
            written: Condvar::new(),
            limit,
        });
        Output { shared }
    }

    /// Starts the thread that writes queued lines; from then on no line waits for the output.
    pub(super) fn start_writer(&self) -> std::io::Result<()> {
        let writer = Arc::clone(&self.shared);
        std::thread::Builder::new().name("log-writer".into()).spawn(move || writer.run())?;
        self.shared.lock().has_writer = true;
        Ok(())
    }

    /// [`Output::new`] with its writer thread started.
    #[cfg(test)]
    fn start(out: OwnedFd, limit: usize) -> std::io::Result<Output> {
        let output = Output::new(out, limit);
        output.start_writer()?;
        Ok(output)
    }

    /// Writes `line` now if the output takes it without blocking, or queues it for the writer
    /// thread, or drops and counts it when the queue is full. Never waits for the output.
    pub(super) fn push(&self, line: &[u8]) {
        let mut state = self.shared.lock();
        if !state.has_writer {
            // No writer thread (not yet, or it could not be started): as a plain `write`, in
            // order under the lock.
            let _ = (&self.shared.out).write_all(line);
            return;
        }
        if !state.writing && state.queue.is_empty() && self.shared.takes_now(line.len()) {
            state.writing = true;
            drop(state);
            let _ = (&self.shared.out).write_all(line);
            let mut state = self.shared.lock();
            state.writing = false;
            state.accepted += line.len() as u64;
            state.written += line.len() as u64;
            // Lines that came meanwhile wait for the writer thread.
            let wake = !state.queue.is_empty() && std::mem::take(&mut state.idle);
            drop(state);
            if wake {
                self.shared.lines.notify_one();
            }
            return;
        }
        if (state.accepted - state.written) as usize + line.len() > self.shared.limit {
            state.dropped += 1;
            state.dropped_total += 1;
            return;
        }
        state.queue.extend_from_slice(line);
        state.accepted += line.len() as u64;
        let wake = !state.writing && std::mem::take(&mut state.idle);
        drop(state);
        if wake {
            self.shared.lines.notify_one();
        }
    }

    /// Waits until every line accepted before the call is written, or `timeout` has passed;
    /// false when it timed out (the output is stuck).
    pub(super) fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        let target = state.accepted;
        while state.written < target {
            if !state.writing && std::mem::take(&mut state.idle) {
                self.shared.lines.notify_one();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self.shared.written.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Lines dropped since the start because the output could not keep up.
    pub(super) fn dropped_total(&self) -> u64 {
        self.shared.lock().dropped_total
    }

    /// Ends the writer thread once it has written what is queued.
    #[cfg(test)]
    pub(super) fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.lines.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left the state whole (each change is
        // made in one go): go on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a line of `len` bytes can be written now without waiting for the output.
    fn takes_now(&self, len: usize) -> bool {
        // A write to a regular file never waits for a reader, whatever its length.
        self.is_file || (len <= DIRECT_MAX && self.writable())
    }

    /// Whether a write of up to a page would not block now.
    fn writable(&self) -> bool {
        let mut fds = [PollFd::new(self.out.as_fd(), PollFlags::POLLOUT)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
            && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLOUT))
    }

    fn run(&self) {
        let mut batch = Vec::new();
        loop {
            let mut state = self.lock();
            while state.writing || (state.queue.is_empty() && state.dropped == 0) {
                if state.closed && !state.writing && state.queue.is_empty() {
                    return;
                }
                state.idle = true;
                state = self.lines.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            state.idle = false;
            state.writing = true;
            std::mem::swap(&mut state.queue, &mut batch);
            let dropped = std::mem::take(&mut state.dropped);
            let dropped_total = state.dropped_total;
            drop(state);

            // Blocks while the output is stuck; the threads that log queue meanwhile.
            let _ = (&self.out).write_all(&batch);
            let taken = batch.len() as u64;
            batch.clear();
            if batch.capacity() > KEEP_CAPACITY {
                batch = Vec::new();
            }
            let mut state = self.lock();
            state.writing = false;
            state.written += taken;
            drop(state);
            self.written.notify_all();
            if dropped > 0 {
                // Through the subscriber (so in the log's format) and back through `push`.
                tracing::warn!(dropped, dropped_total, "the log output could not keep up: log lines were dropped");
            }
        }
    }
}

/// What a log event is written with (`tracing_subscriber`'s `MakeWriter`): the formatter hands it
/// each line whole, in one `write_all`.
pub(super) struct LineWriter<'a>(&'a Output);

impl std::io::Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Output {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Read;

    use super::*;

    fn line(i: usize) -> Vec<u8> {
        format!("line {i:04}\n").into_bytes()
    }

    fn lines(range: std::ops::RangeInclusive<usize>) -> String {
        range.map(|i| String::from_utf8(line(i)).unwrap()).collect()
    }

    /// Reads what is in the pipe now, without waiting for more.
    fn drain(reader: &mut std::io::PipeReader) -> String {
        let mut all = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::ZERO).unwrap() == 0 {
                break;
            }
            let n = reader.read(&mut buf).unwrap();
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(all).unwrap()
    }

    #[test]
    fn a_line_is_in_the_output_when_the_log_call_returns() {
        let (mut reader, writer) = std::io::pipe().unwrap();
        let output = Output::start(writer.into(), QUEUE_LIMIT).unwrap();
        for i in 0..100 {
            LineWriter(&output).write_all(&line(i)).unwrap();
            assert_eq!(drain(&mut reader), lines(i..=i), "line {i} waited");
        }
        assert_eq!(output.dropped_total(), 0);
        output.close();
    }

    #[test]
    fn a_stuck_output_queues_then_drops_and_never_blocks_the_logger() {
        // A pipe nobody reads fills up: page-long lines, so no page has room left once it is full.
        let (mut reader, writer) = std::io::pipe().unwrap();
        let output = Output::start(writer.into(), 100).unwrap();
        let page = |i: usize| format!("{}\n", char::from(b'a' + (i % 26) as u8).to_string().repeat(4095));
        let mut filled = String::new();
        while output.shared.writable() {
            let line = page(filled.len() / 4096);
            output.push(line.as_bytes());
            filled.push_str(&line);
        }
        assert!(!filled.is_empty());
        // Then lines queue (ten fit in 100 bytes, counting the one the writer thread may already
        // be blocked on) and the rest are dropped; no push waits.
        for i in 0..25 {
            output.push(&line(i));
        }
        assert_eq!(output.dropped_total(), 15);
        assert!(!output.flush(Duration::from_millis(50)), "a stuck output cannot be flushed");

        // The reader catches up: what filled the pipe, then the ten queued lines, whole and in order.
        let queued = lines(0..=9);
        let mut got = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !got.ends_with(&queued) && Instant::now() < deadline {
            got.push_str(&drain(&mut reader));
        }
        assert_eq!(got, filled + &queued);
        assert!(output.flush(Duration::from_secs(10)));
        assert_eq!(output.dropped_total(), 15);
        output.close();
    }

    #[test]
    fn a_file_takes_any_line_at_once() {
        // A regular file never waits for a reader: even lines longer than a pipe's page are written
        // by the thread that logs (through the writer thread they would arrive a wake-up later).
        let path = std::env::temp_dir().join(format!("output-test-{}.log", std::process::id()));
        let file = File::create(&path).unwrap();
        let output = Output::start(file.into(), QUEUE_LIMIT).unwrap();
        let mut expected = 0;
        for i in 0..100 {
            let long = format!("{}\n", char::from(b'a' + (i % 26) as u8).to_string().repeat(64 << 10));
            LineWriter(&output).write_all(long.as_bytes()).unwrap();
            expected += long.len() as u64;
            assert_eq!(std::fs::metadata(&path).unwrap().len(), expected, "line {i} waited");
        }
        output.close();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn without_a_writer_thread_lines_are_written_directly() {
        // Before the writer thread starts (or if it cannot), a line is written as a plain `write`
        // would: at once, whatever its length, never queued for a thread that is not there.
        let (mut reader, writer) = std::io::pipe().unwrap();
        let output = Output::new(writer.into(), QUEUE_LIMIT);
        let long = "x".repeat(8 << 10) + "\n";
        output.push(long.as_bytes());
        output.push(&line(1));
        assert_eq!(drain(&mut reader), long + &lines(1..=1));
        assert!(output.flush(Duration::ZERO));
    }

    #[test]
    fn lines_from_many_threads_are_written_whole() {
        let (mut reader, writer) = std::io::pipe().unwrap();
        let output = Output::start(writer.into(), QUEUE_LIMIT).unwrap();
        let reading = std::thread::spawn(move || {
            let mut all = String::new();
            reader.read_to_string(&mut all).unwrap();
            all
        });
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let output = output.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        output.push(format!("thread {t} line {i:04}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(output.flush(Duration::from_secs(10)));
        output.close();
        drop(output);
        let all = reading.join().unwrap();
        // Each thread's lines whole and in its order, none lost.
        for t in 0..4 {
            let own: Vec<&str> = all.lines().filter(|l| l.starts_with(&format!("thread {t} "))).collect();
            let expected: Vec<String> = (0..2000).map(|i| format!("thread {t} line {i:04}")).collect();
            assert_eq!(own, expected);
        }
        assert_eq!(all.lines().count(), 8000);
    }
}

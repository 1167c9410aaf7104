//! The issuance log: one JSON line per issued certificate, append-only, on disk before the
//! certificate is returned.
//!
//! A single writer thread appends: it takes every record waiting, writes them with one `write`,
//! `fdatasync`s once, then answers each waiter (group commit, so 1,000 concurrent requests cost a
//! handful of syncs, not 1,000). On open, a last line cut short by a crash (no newline) is
//! truncated away with a warning; complete lines that do not parse are skipped and counted.
//!
//! Memory keeps the records still useful for listing and for the root-retirement check: those
//! not expired, and those expired less than [`KEEP_EXPIRED`] ago. The file keeps everything.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

/// How long expired records stay listable in memory.
pub const KEEP_EXPIRED: Duration = Duration::from_secs(7 * 24 * 3600);

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The SPIFFE ID certified.
    pub identity: String,
    /// Node of the proxy that asked on the workload's behalf (impersonation), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The authenticated caller.
    pub requested_by: String,
    /// Validity start, Unix seconds.
    pub not_before: i64,
    /// Validity end, Unix seconds.
    pub not_after: i64,
    /// SHA-256 fingerprint of the root the chain leads to.
    pub root: String,
}

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Opening or reading the file.
    #[error("issuance log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The writer thread is gone.
    #[error("issuance log writer stopped")]
    Stopped,
    /// A write failed (the certificate must not be handed out).
    #[error("writing the issuance log")]
    Write(#[source] Arc<io::Error>),
    /// A record could not be encoded.
    #[error("encoding an issuance log record")]
    Encode(#[source] serde_json::Error),
}

/// A line to write, and who waits for it (one failed write answers everyone in its batch).
type Pending = (Vec<u8>, oneshot::Sender<Result<(), Arc<io::Error>>>);

/// The issuance log.
#[derive(Debug)]
pub struct IssuanceLog {
    tx: mpsc::UnboundedSender<Pending>,
    records: Arc<Mutex<Vec<Record>>>,
}

/// What opening found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records read.
    pub records: usize,
    /// Bytes of a cut-short last line that were truncated.
    pub truncated_bytes: u64,
    /// Complete lines that did not parse (skipped).
    pub bad_lines: usize,
}

impl IssuanceLog {
    /// Opens (creating) the log, recovering from a crash mid-write, and starts the writer thread.
    pub fn open(path: &Path, now_unix: i64) -> Result<(Self, Recovery), LogError> {
        let io_err = |source| LogError::Io { path: path.to_owned(), source };
        let mut file =
            OpenOptions::new().read(true).append(true).create(true).mode(0o600).open(path).map_err(io_err)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io_err)?;

        let mut recovery = Recovery::default();
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            recovery.truncated_bytes = (text.len() - complete) as u64;
            warn!(
                path = %path.display(),
                bytes = recovery.truncated_bytes,
                "issuance log ends with a partial record (interrupted write); truncating it"
            );
            file.set_len(complete as u64).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
            file.seek(SeekFrom::End(0)).map_err(io_err)?;
        }
        let keep_after = now_unix - KEEP_EXPIRED.as_secs() as i64;
        let mut records = Vec::new();
        for line in text[..complete].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Record>(line) {
                Ok(r) => {
                    recovery.records += 1;
                    if r.not_after > keep_after {
                        records.push(r);
                    }
                }
                Err(e) => {
                    recovery.bad_lines += 1;
                    warn!(path = %path.display(), error = %e, "skipping an unreadable issuance log line");
                }
            }
        }

        let (tx, rx) = mpsc::unbounded_channel();
        let records = Arc::new(Mutex::new(records));
        let thread_path = path.to_owned();
        std::thread::Builder::new()
            .name("issuance-log".into())
            .spawn(move || writer(file, &thread_path, rx))
            .map_err(io_err)?;
        Ok((IssuanceLog { tx, records }, recovery))
    }

    /// Appends a record; returns once it is on disk.
    pub async fn append(&self, record: Record) -> Result<(), LogError> {
        let mut line = serde_json::to_vec(&record).map_err(LogError::Encode)?;
        line.push(b'\n');
        let (done_tx, done_rx) = oneshot::channel();
        self.tx.send((line, done_tx)).map_err(|_| LogError::Stopped)?;
        done_rx.await.map_err(|_| LogError::Stopped)?.map_err(LogError::Write)?;
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.push(record);
        Ok(())
    }

    /// Records in memory (see the module docs), oldest first, after dropping those expired more
    /// than [`KEEP_EXPIRED`] before `now_unix`.
    pub fn records(&self, now_unix: i64) -> Vec<Record> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let keep_after = now_unix - KEEP_EXPIRED.as_secs() as i64;
        records.retain(|r| r.not_after > keep_after);
        records.clone()
    }

    /// How many unexpired certificates chain to the root with this fingerprint, and the latest
    /// expiry among them.
    pub fn unexpired_under(&self, root: &str, now_unix: i64) -> (u64, Option<i64>) {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records
            .iter()
            .filter(|r| r.root == root && r.not_after > now_unix)
            .fold((0, None), |(n, latest), r| (n + 1, Some(latest.map_or(r.not_after, |l: i64| l.max(r.not_after)))))
    }
}

/// The writer thread: batches whatever is waiting into one write + one sync. A write that fails
/// (the disk full, say) may have left part of the batch in the file: the file is cut back to its
/// last whole record, so that once the disk has room again the next records start on a line of
/// their own and every record stays readable. The batch's callers are refused: nothing of it was
/// issued. If the cut itself fails, every later write is refused too (until a restart, whose
/// recovery cuts the partial line), rather than write records after an unreadable line.
fn writer(mut file: File, path: &Path, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::new();
    let mut buf = Vec::new();
    let mut broken: Option<io::ErrorKind> = None;
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        buf.clear();
        for (line, _) in &batch {
            buf.extend_from_slice(line);
        }
        let result = match broken {
            Some(kind) => Err(io::Error::new(kind, "the log could not be repaired after a failed write")),
            None => file.metadata().map(|m| m.len()).and_then(|whole| {
                file.write_all(&buf).and_then(|()| file.sync_data()).inspect_err(|e| {
                    error!(path = %path.display(), error = %e, "cannot write the issuance log; refusing to issue");
                    if let Err(cut) = file.set_len(whole) {
                        error!(path = %path.display(), error = %cut,
                            "cannot cut the issuance log back to its last whole record; refusing to issue until restarted");
                        broken = Some(cut.kind());
                    }
                })
            }),
        }
        .map_err(Arc::new);
        for (_, done) in batch.drain(..) {
            let _ = done.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(serial: &str, not_after: i64) -> Record {
        Record {
            serial: serial.into(),
            identity: "spiffe://cluster.local/ns/a/sa/b".into(),
            node: Some("node-1".into()),
            requested_by: "spiffe://cluster.local/ns/istio-system/sa/ztunnel".into(),
            not_before: 0,
            not_after,
            root: "aa".into(),
        }
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("issued.jsonl");
        {
            let (log, recovery) = IssuanceLog::open(&path, 0).unwrap();
            assert_eq!(recovery, Recovery::default());
            for i in 0..5 {
                log.append(record(&format!("{i:02x}"), 1000)).await.unwrap();
            }
        }
        // A crash in the middle of the next write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"serial":"05","identity":"spi"#).unwrap();
        drop(f);

        let (log, recovery) = IssuanceLog::open(&path, 0).unwrap();
        assert_eq!(recovery, Recovery { records: 5, truncated_bytes: 30, bad_lines: 0 });
        log.append(record("06", 1000)).await.unwrap();
        let serials: Vec<String> = log.records(0).into_iter().map(|r| r.serial).collect();
        assert_eq!(serials, ["00", "01", "02", "03", "04", "06"]);
        // The file itself is whole again: every line parses.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 6);
        assert!(text.lines().all(|l| serde_json::from_str::<Record>(l).is_ok()));
        assert_eq!(log.unexpired_under("aa", 999), (6, Some(1000)));
        assert_eq!(log.unexpired_under("aa", 1000), (0, None));
        assert_eq!(log.unexpired_under("bb", 0), (0, None));
    }

    /// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn mount(size: &str) -> Tmpfs {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "mount tmpfs");
            Tmpfs(dir)
        }

        fn resize(&self, size: &str) {
            let status = std::process::Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(self.0.path())
                .status()
                .unwrap();
            assert!(status.success(), "remount tmpfs");
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0.path()).status();
        }
    }

    /// The disk fills up: issuing is refused (the append fails), the file keeps only whole
    /// records, and once there is room again records are appended and all of them read back.
    #[tokio::test]
    async fn a_full_disk_refuses_records_and_leaves_the_log_whole() {
        let disk = Tmpfs::mount("8k");
        let path = disk.0.path().join("issued.jsonl");
        let (log, _) = IssuanceLog::open(&path, 0).unwrap();
        let mut written = 0;
        let refused = loop {
            match log.append(record(&format!("{written:04x}"), 1000)).await {
                Ok(()) => written += 1,
                Err(e) => break e,
            }
            assert!(written < 1000, "the 8 KiB disk never filled");
        };
        assert!(written > 5, "only {written} records fit");
        assert!(matches!(&refused, LogError::Write(e) if e.raw_os_error() == Some(28)), "{refused:?}");
        let whole = |expected: usize| {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.ends_with('\n'), "a partial record was left at the end");
            assert_eq!(text.lines().count(), expected);
            assert!(text.lines().all(|l| serde_json::from_str::<Record>(l).is_ok()));
        };
        whole(written);
        // Still full: refused again, still whole.
        assert!(log.append(record("ffff", 1000)).await.is_err());
        whole(written);
        // Room again: issuing resumes.
        disk.resize("64k");
        log.append(record("aaaa", 1000)).await.unwrap();
        whole(written + 1);
        assert_eq!(log.records(0).len(), written + 1);
        drop(log);
        let (_, recovery) = IssuanceLog::open(&path, 0).unwrap();
        assert_eq!(recovery, Recovery { records: written + 1, truncated_bytes: 0, bad_lines: 0 });
    }

    #[tokio::test]
    async fn old_expired_records_leave_memory_not_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("issued.jsonl");
        let (log, _) = IssuanceLog::open(&path, 0).unwrap();
        log.append(record("01", 10)).await.unwrap();
        log.append(record("02", 10 + KEEP_EXPIRED.as_secs() as i64 + 100)).await.unwrap();
        let later = 10 + KEEP_EXPIRED.as_secs() as i64 + 50;
        assert_eq!(log.records(later).len(), 1);
        drop(log);
        let (_, recovery) = IssuanceLog::open(&path, later).unwrap();
        assert_eq!(recovery.records, 2);
    }
}

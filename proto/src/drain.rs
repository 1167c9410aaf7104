//! Graceful shutdown shared by every listener.
//!
//! The owner of a component holds a [`DrainTrigger`]; every accept loop and every connection holds a
//! [`DrainWatcher`]. Draining is: signal (listeners stop accepting, HTTP/2 connections send GOAWAY
//! and let open streams finish), then wait until every watcher is dropped, or give up at a deadline
//! and let the caller drop what is left.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Starts a drain and waits for it to complete.
#[derive(Debug)]
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
}

/// Held by everything that must finish before a drain completes.
#[derive(Debug, Clone)]
pub struct DrainWatcher {
    signal: watch::Receiver<bool>,
    // Never sent on: the trigger learns that all watchers are gone when the channel closes.
    _alive: mpsc::Sender<()>,
}

/// Holds a drain open without watching for its signal: what a connection keeps for as long as it
/// lives (8 bytes, where a [`DrainWatcher`] is 24).
#[derive(Debug, Clone)]
pub struct DrainGuard {
    _alive: mpsc::Sender<()>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every watcher finished before the deadline.
    Complete,
    /// The deadline passed with watchers still alive.
    TimedOut,
}

/// Creates a connected trigger/watcher pair.
pub fn new() -> (DrainTrigger, DrainWatcher) {
    let (signal, signal_rx) = watch::channel(false);
    let (alive, done) = mpsc::channel(1);
    (DrainTrigger { signal, done }, DrainWatcher { signal: signal_rx, _alive: alive })
}

impl DrainTrigger {
    /// Signals every watcher, then waits until all are dropped or `deadline` passes.
    pub async fn drain(mut self, deadline: Duration) -> DrainOutcome {
        // Ignore the error: no receiver left simply means nothing to wait for.
        let _ = self.signal.send(true);
        match tokio::time::timeout(deadline, self.done.recv()).await {
            Ok(_) => DrainOutcome::Complete,
            Err(_) => DrainOutcome::TimedOut,
        }
    }
}

impl DrainWatcher {
    /// Resolves once a drain has started (immediately if it already has).
    pub async fn signaled(&mut self) {
        // An error means the trigger was dropped without draining: treat that as a drain too, so
        // nothing keeps running for an owner that is gone.
        let _ = self.signal.wait_for(|draining| *draining).await;
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// A guard that keeps the drain waiting until it is dropped, like a watcher.
    pub fn guard(&self) -> DrainGuard {
        DrainGuard { _alive: self._alive.clone() }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn drain_completes_when_all_watchers_finish() {
        let (trigger, watcher) = new();
        let mut w2 = watcher.clone();
        let task = tokio::spawn(async move {
            w2.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(w2);
        });
        drop(watcher);
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, DrainOutcome::Complete);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_guard_holds_the_drain_like_a_watcher() {
        let (trigger, watcher) = new();
        let guard = watcher.guard();
        drop(watcher);
        let drain = tokio::spawn(trigger.drain(Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!drain.is_finished(), "the drain completed while a guard was held");
        drop(guard);
        assert_eq!(drain.await.unwrap(), DrainOutcome::Complete);
    }

    #[tokio::test]
    async fn drain_times_out_when_a_watcher_lingers() {
        let (trigger, watcher) = new();
        assert!(!watcher.is_draining());
        let out = trigger.drain(Duration::from_millis(100)).await;
        assert_eq!(out, DrainOutcome::TimedOut);
        assert!(watcher.is_draining());
    }

    #[tokio::test]
    async fn dropped_trigger_counts_as_drain() {
        let (trigger, mut watcher) = new();
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(1), watcher.signaled()).await.unwrap();
    }
}

//! The output circuit breaker. A publish that fails (no stream, timeout, storage full, no
//! leader) opens it; a stored one closes it. While it is open the pull stage takes no new
//! inputs and `/readyz` reports not ready; inputs already in flight are held and retried,
//! kept alive by progress acks up to the processing cap, so an output outage never spends
//! their deliveries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics::gauge;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::metrics as m;

pub struct Breaker {
    open: watch::Sender<bool>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

impl Breaker {
    /// `ready` is the worker's readiness flag: cleared while open (and never set again once
    /// `shutdown` is cancelled).
    pub fn new(ready: Arc<AtomicBool>, shutdown: CancellationToken) -> Breaker {
        Breaker {
            open: watch::Sender::new(false),
            ready,
            shutdown,
        }
    }

    /// A publish failed: stop taking inputs.
    pub fn trip(&self) {
        if !self.open.send_replace(true) {
            tracing::warn!("output unavailable: pausing intake, holding inputs in flight");
            self.ready.store(false, Ordering::SeqCst);
            gauge!(m::READY).set(0.0);
            gauge!(m::OUTPUT_BLOCKED).set(1.0);
        }
    }

    /// A publish succeeded: resume.
    pub fn reset(&self) {
        if self.open.send_replace(false) {
            tracing::info!("output available again: resuming intake");
            gauge!(m::OUTPUT_BLOCKED).set(0.0);
            if !self.shutdown.is_cancelled() {
                self.ready.store(true, Ordering::SeqCst);
                gauge!(m::READY).set(1.0);
            }
        }
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Resolves once the breaker is closed.
    pub async fn closed(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| !open).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_on_failure_closes_on_success_and_drives_readiness() {
        let ready = Arc::new(AtomicBool::new(true));
        let shutdown = CancellationToken::new();
        let b = Arc::new(Breaker::new(ready.clone(), shutdown.clone()));
        b.closed().await;
        b.trip();
        assert!(b.is_open() && !ready.load(Ordering::SeqCst));
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.closed().await }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "intake waits while the breaker is open"
        );
        b.reset();
        waiter.await.unwrap();
        assert!(!b.is_open() && ready.load(Ordering::SeqCst));
        b.trip();
        shutdown.cancel();
        b.reset();
        assert!(
            !ready.load(Ordering::SeqCst),
            "never ready again after shutdown"
        );
    }
}

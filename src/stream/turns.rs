//! Batch order for the adaptive memory. Up to two batches are encoded and scored at once, so
//! without help they could reach the memory in either order; the memory's stream must be the
//! order in which batches were formed (docs/adaptive.md §6). Each batch takes a [`Turn`] when it
//! is formed: a turn waits until every earlier turn has ended, and ends when it is dropped,
//! whatever path the batch took (routed, retried, dead-lettered, failed), so a failure can never
//! hold up the batches behind it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Hands out turns in the order they are asked for.
#[derive(Debug)]
pub struct Turns {
    issued: u64,
    order: Arc<Order>,
}

#[derive(Debug)]
struct Order {
    /// Turns that ended before every earlier one did.
    ended: Mutex<BTreeSet<u64>>,
    /// The first turn that has not ended: every turn before it has.
    first_open: watch::Sender<u64>,
}

/// One batch's place in the order. Dropping it ends it; the next turn goes once every earlier
/// turn has ended too (a turn abandoned early does not let its successors overtake the turns
/// before it).
#[derive(Debug)]
pub struct Turn {
    ticket: u64,
    order: Arc<Order>,
}

impl Turns {
    pub fn new() -> Turns {
        Turns {
            issued: 0,
            order: Arc::new(Order {
                ended: Mutex::new(BTreeSet::new()),
                first_open: watch::Sender::new(0),
            }),
        }
    }

    /// The next turn: it comes after every turn handed out before.
    pub fn take(&mut self) -> Turn {
        let ticket = self.issued;
        self.issued += 1;
        Turn {
            ticket,
            order: self.order.clone(),
        }
    }
}

impl Default for Turns {
    fn default() -> Self {
        Turns::new()
    }
}

impl Turn {
    /// Waits until every earlier turn has ended (on an async task).
    pub async fn wait(&mut self) {
        let mut rx = self.order.first_open.subscribe();
        // The sender lives in `self.order`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|first| *first >= self.ticket).await;
    }

    /// Waits until every earlier turn has ended (on a blocking thread, never on an async
    /// worker).
    pub fn wait_blocking(&mut self) {
        futures::executor::block_on(self.wait());
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // A poisoned lock still holds a valid set: take it.
        let mut ended = self
            .order
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ended.insert(self.ticket);
        let mut first = *self.order.first_open.borrow();
        while ended.remove(&first) {
            first += 1;
        }
        self.order.first_open.send_replace(first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Turns taken 0..8 whose work becomes ready in the reverse order still reach the shared
    /// state in the order they were taken, on blocking threads and on async tasks alike, and
    /// a turn dropped without waiting (a failed batch) holds nobody up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_runs_in_the_order_turns_were_taken() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut turns = Turns::new();
        let mut handles = Vec::new();
        for i in 0..8u64 {
            let mut turn = turns.take();
            let log = log.clone();
            let delay = Duration::from_millis(10 * (8 - i));
            handles.push(match i % 3 {
                0 => tokio::task::spawn_blocking(move || {
                    std::thread::sleep(delay);
                    turn.wait_blocking();
                    log.lock().unwrap().push(i);
                }),
                1 => tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    turn.wait().await;
                    log.lock().unwrap().push(i);
                }),
                // Abandoned: ends without waiting or logging.
                _ => tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    drop(turn);
                }),
            });
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 3, 4, 6, 7]);
    }
}

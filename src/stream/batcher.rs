//! Dynamic batching: wait for the first decoded image, then take whatever is queued, waiting
//! up to `max_wait` (counted from the first image's arrival) only while the batch is short.
//! Also assembles a batch's image tensors into one `[n, 3, size, size]` tensor. No I/O.

use std::time::{Duration, Instant};

use ndarray::Array4;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::sink::recv_until;

/// Anything that knows when it was queued.
pub trait Queued {
    fn queued_at(&self) -> Instant;
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPolicy {
    pub max_size: usize,
    pub max_wait: Duration,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    #[error("image {index} of the batch has {got} values, expected {expected}")]
    TensorLength {
        index: usize,
        got: usize,
        expected: usize,
    },
}

/// The next batch: `None` once upstream is done and the queue is empty. While
/// `upstream_done` is not cancelled this waits for the first item indefinitely.
pub async fn next_batch<T: Queued>(
    rx: &mut mpsc::Receiver<T>,
    policy: BatchPolicy,
    upstream_done: &CancellationToken,
) -> Option<Vec<T>> {
    let max = policy.max_size.max(1);
    let first = recv_until(rx, upstream_done).await?;
    let deadline = tokio::time::Instant::from_std(first.queued_at() + policy.max_wait);
    let mut batch = Vec::with_capacity(max);
    batch.push(first);
    while batch.len() < max {
        match rx.try_recv() {
            Ok(x) => batch.push(x),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                if upstream_done.is_cancelled() {
                    break;
                }
                match tokio::time::timeout_at(deadline, recv_until(rx, upstream_done)).await {
                    Ok(Some(x)) => batch.push(x),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
    Some(batch)
}

/// Copies per-image tensors (`3 × size × size` values each, CHW) into one batch tensor.
pub fn assemble<'a>(
    images: impl ExactSizeIterator<Item = &'a [u8]>,
    size: usize,
    normalize: impl Fn(&[u8], &mut [f32]),
) -> Result<Array4<f32>, BatchError> {
    let n = images.len();
    let per = 3 * size * size;
    let mut data = vec![0f32; n * per];
    for ((index, img), out) in images.enumerate().zip(data.chunks_exact_mut(per)) {
        if img.len() != per {
            return Err(BatchError::TensorLength {
                index,
                got: img.len(),
                expected: per,
            });
        }
        normalize(img, out);
    }
    // The length is checked above, so the shape always matches.
    Array4::from_shape_vec((n, 3, size, size), data).map_err(|_| BatchError::TensorLength {
        index: 0,
        got: 0,
        expected: per,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Item(u32, Instant);
    impl Queued for Item {
        fn queued_at(&self) -> Instant {
            self.1
        }
    }

    fn ids(b: &[Item]) -> Vec<u32> {
        b.iter().map(|i| i.0).collect()
    }

    const POLICY: BatchPolicy = BatchPolicy {
        max_size: 3,
        max_wait: Duration::from_millis(50),
    };

    #[tokio::test(start_paused = true)]
    async fn takes_what_is_queued_up_to_the_maximum() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..5 {
            tx.send(Item(i, Instant::now())).await.unwrap();
        }
        let done = CancellationToken::new();
        assert_eq!(
            ids(&next_batch(&mut rx, POLICY, &done).await.unwrap()),
            [0, 1, 2]
        );
        // Two left: the short batch waits for max_wait, then goes.
        let b = next_batch(&mut rx, POLICY, &done).await.unwrap();
        assert_eq!(ids(&b), [3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_item_joins_within_max_wait_only() {
        let (tx, mut rx) = mpsc::channel(16);
        let done = CancellationToken::new();
        tx.send(Item(0, Instant::now())).await.unwrap();
        let tx2 = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx2.send(Item(1, Instant::now())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx2.send(Item(2, Instant::now())).await.unwrap();
        });
        assert_eq!(
            ids(&next_batch(&mut rx, POLICY, &done).await.unwrap()),
            [0, 1]
        );
        assert_eq!(ids(&next_batch(&mut rx, POLICY, &done).await.unwrap()), [2]);
    }

    #[tokio::test(start_paused = true)]
    async fn ends_when_upstream_is_done_even_with_a_sender_alive() {
        let (tx, mut rx) = mpsc::channel(16);
        let done = CancellationToken::new();
        tx.send(Item(9, Instant::now())).await.unwrap();
        done.cancel();
        assert_eq!(ids(&next_batch(&mut rx, POLICY, &done).await.unwrap()), [9]);
        assert!(next_batch(&mut rx, POLICY, &done).await.is_none());
        drop(tx);
    }

    #[test]
    fn assembles_images_in_order_and_rejects_a_wrong_length() {
        // 2 × 2 HWC crops; the normaliser writes CHW = value + 10 · channel.
        let chw = |hwc: &[u8], out: &mut [f32]| {
            for (i, px) in hwc.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    out[c * 4 + i] = f32::from(px[c]) + 10.0 * c as f32;
                }
            }
        };
        let a = vec![1u8; 12];
        let b: Vec<u8> = (0..12).collect();
        let t = assemble([a.as_slice(), b.as_slice()].into_iter(), 2, chw).unwrap();
        assert_eq!(t.shape(), &[2, 3, 2, 2]);
        assert_eq!(t[[0, 2, 1, 1]], 21.0);
        assert_eq!(t[[1, 0, 0, 0]], 0.0);
        // Pixel (y 1, x 0) is the third: bytes 6, 7, 8.
        assert_eq!(t[[1, 1, 1, 0]], 17.0);
        let short = vec![0u8; 11];
        assert_eq!(
            assemble([a.as_slice(), short.as_slice()].into_iter(), 2, chw).unwrap_err(),
            BatchError::TensorLength {
                index: 1,
                got: 11,
                expected: 12
            }
        );
    }
}

//! Batches made on a worker thread, a bounded number ahead, so that the training loop does not wait for
//! decoding, augmentation and normalisation; the time it still waits is measured.
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

/// Items produced in order by a worker thread; iterate to receive them. A panic in the worker (a libtorch
/// error while making a batch) arrives as an `Err` with its message, and ends the stream.
pub struct Prefetch<T> {
    rx: Receiver<Result<T, String>>,
    waited: Duration,
}

impl<T: Send + 'static> Prefetch<T> {
    /// Starts a worker that calls `produce(step)` for `step` in `0..n`, staying at most `depth` items ahead.
    /// The worker stops early when this is dropped.
    pub fn new(n: usize, depth: usize, mut produce: impl FnMut(usize) -> T + Send + 'static) -> Prefetch<T> {
        let (tx, rx) = sync_channel(depth.max(1));
        std::thread::spawn(move || {
            for step in 0..n {
                let item = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| produce(step)));
                let failed = item.is_err();
                let item = item.map_err(|e| {
                    let msg =
                        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
                    format!("making batch {step} failed: {}", msg.unwrap_or_else(|| "unknown error".into()))
                });
                if tx.send(item).is_err() || failed {
                    break;
                }
            }
        });
        Prefetch { rx, waited: Duration::ZERO }
    }

    /// Total time the consumer has been blocked waiting for an item.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl<T> Iterator for Prefetch<T> {
    type Item = Result<T, String>;

    fn next(&mut self) -> Option<Result<T, String>> {
        let t = Instant::now();
        let item = self.rx.recv().ok();
        self.waited += t.elapsed();
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_arrive_in_order_and_waiting_is_measured() {
        let p = Prefetch::new(5, 2, |i| {
            std::thread::sleep(Duration::from_millis(20));
            i * 10
        });
        let mut p = p;
        let got: Vec<usize> = p.by_ref().map(Result::unwrap).collect();
        assert_eq!(got, vec![0, 10, 20, 30, 40]);
        assert!(p.waited() >= Duration::from_millis(60), "{:?}", p.waited());
    }

    #[test]
    fn a_consumer_that_stops_early_stops_the_worker() {
        let mut p = Prefetch::new(1_000_000, 1, |i| i);
        assert_eq!(p.next(), Some(Ok(0)));
        drop(p); // the worker's next send fails and it ends; nothing hangs
    }

    #[test]
    fn a_failing_batch_is_an_error_not_a_short_epoch() {
        let got: Vec<Result<usize, String>> =
            Prefetch::new(5, 2, |i| if i == 2 { panic!("bad image {i}") } else { i }).collect();
        assert_eq!(got.len(), 3);
        assert!(got[2].as_ref().unwrap_err().contains("bad image 2"), "{got:?}");
    }
}

//! Step progress: an indicatif bar on a terminal, plain lines (about every 10% of an epoch) otherwise, so that
//! logs of long runs show progress too.
use indicatif::ProgressBar;
use tch::{Device, Kind, Tensor};

/// Reports `step` (0-based) of `total` with loss, accuracy and rate; called at the loop's sync points
/// (every 10 steps and at the last).
pub fn report(bar: &ProgressBar, step: usize, total: usize, loss: f64, acc: f64, rate: f64) {
    let msg = format!("loss {loss:.3} acc {:.1}% {rate:.0} img/s", 100.0 * acc);
    if bar.is_hidden() {
        let every = (total / 10).max(1).div_ceil(10) * 10;
        if (step + 1).is_multiple_of(every) || step + 1 == total {
            eprintln!("  step {}/{total}: {msg}", step + 1);
        }
    } else {
        bar.set_message(msg);
    }
}

/// Running loss and accuracy of an epoch's training steps, kept on the device and read back only every 10
/// steps (one host round trip per 10 steps), where it also checks for a non-finite loss and shows progress.
pub struct StepMeter {
    loss_sum: Tensor,
    correct: Tensor,
    seen: usize,
    total: usize,
    start: std::time::Instant,
}

impl StepMeter {
    /// A meter for an epoch of `total` steps; `bar` (when shown) gets its length.
    pub fn new(device: Device, total: usize, bar: Option<&ProgressBar>) -> StepMeter {
        if let Some(b) = bar {
            b.set_length(total as u64);
            b.set_position(0);
        }
        StepMeter {
            loss_sum: Tensor::zeros([], (Kind::Double, device)),
            correct: Tensor::zeros([], (Kind::Int64, device)),
            seen: 0,
            total,
            start: std::time::Instant::now(),
        }
    }

    /// Records step `step` (0-based): its mean loss and logits on labels `y`. Every 10 steps and at the last it
    /// reads the running loss back, fails with `nan_hint` when it is not finite, and reports progress.
    pub fn record(
        &mut self,
        step: usize,
        loss: &Tensor,
        logits: &Tensor,
        y: &Tensor,
        bar: Option<&ProgressBar>,
        nan_hint: &str,
    ) -> anyhow::Result<()> {
        let n = y.size()[0] as usize;
        self.loss_sum += loss.detach().to_kind(Kind::Double) * n as f64;
        self.correct += logits.argmax(-1, false).eq_tensor(y).sum(Kind::Int64);
        self.seen += n;
        if step % 10 == 9 || step + 1 == self.total {
            let (mean, acc) = self.means();
            if !mean.is_finite() {
                anyhow::bail!("the training loss became {mean} at step {} of {}: {nan_hint}", step + 1, self.total);
            }
            if let Some(b) = bar {
                report(b, step, self.total, mean, acc, self.seen as f64 / self.start.elapsed().as_secs_f64());
            }
        }
        if let Some(b) = bar {
            b.inc(1);
        }
        Ok(())
    }

    /// Continues from saved [`StepMeter::sums`] (a run resumed inside an epoch).
    pub fn restore(&mut self, [loss, correct, seen]: [f64; 3]) {
        let _ = self.loss_sum.fill_(loss);
        let _ = self.correct.fill_(correct as i64);
        self.seen = seen as usize;
    }

    /// (summed loss, correct predictions, examples) so far: what several processes' meters add up.
    pub fn sums(&self) -> [f64; 3] {
        [self.loss_sum.double_value(&[]), self.correct.int64_value(&[]) as f64, self.seen as f64]
    }

    /// (mean loss, accuracy) so far.
    pub fn means(&self) -> (f64, f64) {
        let n = self.seen.max(1) as f64;
        (self.loss_sum.double_value(&[]) / n, self.correct.int64_value(&[]) as f64 / n)
    }
}

/// Peak resident set size of this process in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

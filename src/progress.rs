//! Step progress: an indicatif bar on a terminal, plain lines (about every 10% of an epoch) otherwise, so that
//! logs of long runs show progress too.
use indicatif::ProgressBar;

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

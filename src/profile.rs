//! Where a search step's time goes, by op type: timing points in the supernet's forward pass (off unless a
//! profile is being collected on this thread) and the records they leave.
use crate::space::OpKind;
use std::cell::RefCell;
use tch::Tensor;

/// One timed call.
#[derive(Clone, Debug)]
pub struct Record {
    /// What ran: an op name, "preprocess", "stem" or "classifier".
    pub name: &'static str,
    /// The candidate op, for op calls.
    pub op: Option<OpKind>,
    /// Input shape.
    pub input: Vec<i64>,
    /// Stride of the op (1 or 2).
    pub stride: i64,
    /// Wall-clock seconds (the device synchronised on CUDA).
    pub seconds: f64,
}

thread_local! {
    static RECORDS: RefCell<Option<Vec<Record>>> = const { RefCell::new(None) };
}

fn active() -> bool {
    RECORDS.with(|r| r.borrow().is_some())
}

fn sync(x: &Tensor) {
    if let tch::Device::Cuda(i) = x.device() {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs `f` on `x`, timing it under `name` when a profile is being collected.
pub fn time(name: &'static str, op: Option<OpKind>, stride: i64, x: &Tensor, f: impl FnOnce() -> Tensor) -> Tensor {
    if !active() {
        return f();
    }
    sync(x);
    let t = std::time::Instant::now();
    let y = f();
    sync(&y);
    let seconds = t.elapsed().as_secs_f64();
    let rec = Record { name, op, input: x.size(), stride, seconds };
    RECORDS.with(|r| r.borrow_mut().as_mut().map(|v| v.push(rec)));
    y
}

/// Runs `f` with profiling on and returns what the timing points recorded.
pub fn collect(f: impl FnOnce()) -> Vec<Record> {
    RECORDS.with(|r| *r.borrow_mut() = Some(Vec::new()));
    f();
    RECORDS.with(|r| r.borrow_mut().take()).unwrap_or_default()
}

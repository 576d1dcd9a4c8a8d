//! Counting ATen operator calls (the shim's RecordFunction hooks, `csrc/aten_count.cpp`): the number a GPU would
//! launch, which does not drift with the machine.

use super::last_error;
use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, CStr};

extern "C" {
    // Tensors are tch's `C_tensor` pointers (libtorch's `at::Tensor*`), passed untyped.
    fn darts_count_aten_start(by_name: c_int) -> c_int;
    fn darts_count_aten_stop() -> i64;
    fn darts_count_aten_names() -> *const c_char;
}

/// Runs `f` and returns its result with the number of ATen operator calls it made on every thread (libtorch's
/// RecordFunction hooks, the events torch.profiler records: `aten::` operators, nested calls included). Not
/// reentrant: one count at a time per process. With `DARTS_ATEN_NAMES=N` in the environment, the N most called
/// operators and their counts go to standard error (where a step's calls come from).
pub fn count_aten_calls<R>(f: impl FnOnce() -> R) -> Result<(R, u64)> {
    let names = std::env::var("DARTS_ATEN_NAMES").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
    let (r, n, rows) = count_aten_calls_by_name(f)?;
    if let Some(top) = names {
        eprintln!("ATen calls: {n}, by operator:");
        for (count, name) in rows.iter().take(top) {
            eprintln!("{count:>8} {name}");
        }
    }
    Ok((r, n))
}

/// Calls per ATen operator name, most called first.
pub type CallsByName = Vec<(u64, String)>;

/// As [`count_aten_calls`], with the calls per operator name, most called first.
pub fn count_aten_calls_by_name<R>(f: impl FnOnce() -> R) -> Result<(R, u64, CallsByName)> {
    // SAFETY: a plain flag; the shim catches C++ exceptions.
    if unsafe { darts_count_aten_start(1) } != 0 {
        bail!("could not count ATen calls: {}", last_error());
    }
    let r = f();
    // SAFETY: no arguments; stops the counter started above.
    let n = unsafe { darts_count_aten_stop() };
    // SAFETY: the shim returns its own NUL-terminated text, valid until the next call, copied at once.
    let text = unsafe { CStr::from_ptr(darts_count_aten_names()) }.to_string_lossy().into_owned();
    let rows = text
        .lines()
        .filter_map(|l| l.split_once(' ').and_then(|(c, name)| Some((c.parse().ok()?, name.to_string()))))
        .collect();
    Ok((r, n.max(0) as u64, rows))
}

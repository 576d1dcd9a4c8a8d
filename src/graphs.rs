//! CUDA graphs: a step whose shapes stay the same captured once (`at::cuda::CUDAGraph`, through the shim) and then
//! replayed, so that its thousands of small kernels are launched as one graph instead of one by one.
//!
//! [`Graphed`] wraps a function of tensors to tensors, as `torch.cuda.graph` and `torch.cuda.make_graphed_callables`
//! wrap a step: the first calls with a shape run eagerly on a side stream (the warm-up that lazily initialised
//! libraries need), the next is captured into a graph with static copies of its inputs, and every later call with
//! the same shapes and key copies its inputs into those static tensors and replays the graph. The outputs of a
//! replay are the same tensors each time: they are valid until the next call.
//!
//! What a graph replays is what the capture recorded: the values on the host (learning rates, drop rates, random
//! seeds drawn on the host) are baked in. Callers put every such value into the key, so that a change captures
//! afresh, or run eagerly where the host decides per call (GDAS's sampled ops, masks from seeds). A capture that
//! fails (an operation that cannot be captured, such as a copy to the host) turns the graphs off with a message,
//! and that call and every later one run eagerly: a run never stops for its graphs.

use std::ffi::{c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::{Device, Kind, Tensor};

extern "C" {
    fn darts_last_error() -> *const std::ffi::c_char;
    fn darts_cuda_graphs_available() -> c_int;
    fn darts_graph_new(index: c_int, out: *mut *mut c_void) -> c_int;
    fn darts_graph_enter(g: *mut c_void) -> c_int;
    fn darts_graph_exit(g: *mut c_void) -> c_int;
    fn darts_graph_capture_begin(g: *mut c_void) -> c_int;
    fn darts_graph_capture_end(g: *mut c_void) -> c_int;
    fn darts_graph_replay(g: *mut c_void) -> c_int;
    fn darts_graph_free(g: *mut c_void);
}

fn last_error() -> String {
    // SAFETY: the shim returns a NUL-terminated thread-local string that lives until its next failing call.
    unsafe { CStr::from_ptr(darts_last_error()) }.to_string_lossy().into_owned()
}

/// Whether this build of darts can capture CUDA graphs (it was compiled against CUDA's headers).
pub fn built_with_graphs() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { darts_cuda_graphs_available() == 1 }
}

/// Why a step on `device` cannot be captured (None when it can).
pub fn unavailable_on(device: Device) -> Option<String> {
    match device {
        Device::Cuda(_) if built_with_graphs() => None,
        Device::Cuda(_) => Some("this darts was built without CUDA's headers (see build.rs)".into()),
        Device::Cpu => Some("CUDA graphs need a CUDA device, and this run computes on the CPU".into()),
        other => Some(format!("CUDA graphs need a CUDA device, and this run computes on {other:?}")),
    }
}

/// Refuses `--cuda-graphs` where a step on `device` cannot be captured: the reason, and what to do instead.
pub fn require(device: Device) -> anyhow::Result<()> {
    match unavailable_on(device) {
        Some(why) => anyhow::bail!("--cuda-graphs: {why}; drop --cuda-graphs, or run on a GPU (--device cuda)"),
        None => Ok(()),
    }
}

/// One `at::cuda::CUDAGraph` with its side stream (in unit tests, a null pointer is a stand-in that runs nothing).
struct Graph(*mut c_void);

// SAFETY: the graph object is only used by the thread that holds `Graphed` (moving it between threads is safe:
// libtorch's CUDAGraph has no thread affinity).
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: made by darts_graph_new, freed once.
            unsafe { darts_graph_free(self.0) }
        }
    }
}

/// What the shim does to a graph.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Enter,
    Exit,
    Begin,
    End,
    Replay,
}

#[cfg(test)]
thread_local! {
    /// Unit tests: `Some(fail)` makes stand-in graphs whose capture fails when `fail`.
    static STAND_IN: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

impl Graph {
    fn new(device: Device) -> Result<Graph, String> {
        #[cfg(test)]
        if STAND_IN.get().is_some() {
            return Ok(Graph(std::ptr::null_mut()));
        }
        let Device::Cuda(index) = device else { return Err(format!("no CUDA graph on {device:?}")) };
        let mut p = std::ptr::null_mut();
        // SAFETY: writes a new graph to `p` or fails.
        let rc = unsafe { darts_graph_new(index as c_int, &mut p) };
        if rc != 0 || p.is_null() {
            return Err(format!("could not make a CUDA graph: {}", last_error()));
        }
        Ok(Graph(p))
    }

    fn call(&self, op: Op) -> Result<(), String> {
        let (f, what): (unsafe extern "C" fn(*mut c_void) -> c_int, &str) = match op {
            Op::Enter => (darts_graph_enter, "could not switch to the graph's side stream"),
            Op::Exit => (darts_graph_exit, "could not switch back from the graph's side stream"),
            Op::Begin => (darts_graph_capture_begin, "could not begin the capture"),
            Op::End => (darts_graph_capture_end, "the capture failed"),
            Op::Replay => (darts_graph_replay, "replaying the CUDA graph failed"),
        };
        #[cfg(test)]
        if self.0.is_null() {
            return match (op, STAND_IN.get()) {
                (Op::End, Some(true)) => Err(format!("{what}: a stand-in failure")),
                _ => Ok(()),
            };
        }
        // SAFETY: `self.0` is a live graph.
        if unsafe { f(self.0) } != 0 {
            return Err(format!("{what}: {}", last_error()));
        }
        Ok(())
    }

    /// Makes the side stream current until the guard is dropped.
    fn side_stream(&self) -> Result<SideStream<'_>, String> {
        self.call(Op::Enter)?;
        Ok(SideStream(self))
    }
}

/// The graph's side stream is current while this lives.
struct SideStream<'a>(&'a Graph);

impl Drop for SideStream<'_> {
    fn drop(&mut self) {
        let _ = self.0.call(Op::Exit);
    }
}

/// What a captured call keeps: static inputs, the outputs its replays write, and the graph. Fields drop in this
/// order (tensors before the graph whose memory pool holds them).
struct Captured {
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
    graph: Graph,
}

/// The shapes, strides and kinds of a call's inputs, and the caller's key for what the host bakes in.
type Key = (u64, Vec<(Vec<i64>, Vec<i64>, Kind)>);

/// A function of tensors replayed as a CUDA graph while its inputs' shapes and its key stay the same (module
/// documentation); eager where graphs are off.
pub struct Graphed {
    name: String,
    off: Option<String>,
    device: Device,
    key: Option<Key>,
    warm_left: usize,
    captured: Option<Captured>,
    /// The graph the warm-up calls used the side stream of, and the capture will use.
    next: Option<Graph>,
    captures: usize,
    replays: u64,
}

impl std::fmt::Debug for Graphed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graphed")
            .field("name", &self.name)
            .field("off", &self.off)
            .field("captures", &self.captures)
            .field("replays", &self.replays)
            .finish()
    }
}

/// Eager calls on the side stream before the first capture (cuBLAS and cuDNN set up their handles, workspaces
/// and algorithm choices per stream and shape); one before a capture for another shape or key.
const WARMUP_FIRST: usize = 2;
const WARMUP_AGAIN: usize = 1;

impl Graphed {
    /// A function that always runs eagerly.
    pub fn eager(name: &str) -> Graphed {
        Graphed {
            name: name.into(),
            off: Some("CUDA graphs were not asked for".into()),
            device: Device::Cpu,
            key: None,
            warm_left: 0,
            captured: None,
            next: None,
            captures: 0,
            replays: 0,
        }
    }

    /// A function captured and replayed on `device`; eager, with the reason, where graphs cannot be used there.
    pub fn on(name: &str, device: Device) -> Graphed {
        Graphed { off: unavailable_on(device), device, ..Graphed::eager(name) }
    }

    /// Why calls run eagerly (None while graphs are in use).
    pub fn off_reason(&self) -> Option<&str> {
        self.off.as_deref()
    }

    /// Captures so far, and replays (calls that ran the graph rather than the function).
    pub fn counts(&self) -> (usize, u64) {
        (self.captures, self.replays)
    }

    /// `f(inputs)`, through the graph where it can be (module documentation). `key` is the caller's summary of the
    /// host values `f` bakes in: another key captures afresh. The outputs are valid until the next call.
    pub fn run(
        &mut self,
        key: u64,
        inputs: &[&Tensor],
        f: &mut dyn FnMut(&[Tensor]) -> anyhow::Result<Vec<Tensor>>,
    ) -> anyhow::Result<Vec<Tensor>> {
        let given: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        if self.off.is_some() {
            return f(&given);
        }
        let k: Key = (key, inputs.iter().map(|t| (t.size(), t.stride(), t.kind())).collect());
        if self.key.as_ref() != Some(&k) {
            self.captured = None;
            self.next = None;
            self.key = Some(k);
            self.warm_left = if self.captures == 0 { WARMUP_FIRST } else { WARMUP_AGAIN };
        }
        if let Some(c) = &self.captured {
            tch::no_grad(|| {
                for (s, t) in c.inputs.iter().zip(inputs) {
                    let mut s = s.shallow_clone();
                    s.copy_(t);
                }
            });
            if let Err(e) = c.graph.call(Op::Replay) {
                anyhow::bail!("{}: {e}", self.name);
            }
            self.replays += 1;
            return Ok(c.outputs.iter().map(Tensor::shallow_clone).collect());
        }
        if self.warm_left > 0 {
            self.warm_left -= 1;
            if self.next.is_none() {
                self.next = Some(Graph::new(self.device).map_err(anyhow::Error::msg)?);
            }
            let graph = self.next.as_ref().expect("just made");
            let _side = graph.side_stream().map_err(anyhow::Error::msg)?;
            return f(&given);
        }
        match self.capture(inputs, f) {
            Ok(outputs) => Ok(outputs),
            Err(why) => {
                eprintln!("CUDA graphs off for {}: the capture failed ({why}); running it eagerly", self.name);
                self.off = Some(why);
                self.captured = None;
                f(&given)
            }
        }
    }

    /// Captures `f` on static copies of `inputs`, then replays it once (the capture itself runs nothing).
    fn capture(
        &mut self,
        inputs: &[&Tensor],
        f: &mut dyn FnMut(&[Tensor]) -> anyhow::Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>, String> {
        let graph = match self.next.take() {
            Some(g) => g,
            None => Graph::new(self.device)?,
        };
        let statics: Vec<Tensor> = tch::no_grad(|| {
            inputs
                .iter()
                .map(|t| {
                    let mut s = t.empty_like();
                    s.copy_(t);
                    s
                })
                .collect()
        });
        let outcome = {
            let _side = graph.side_stream()?;
            graph.call(Op::Begin)?;
            // A failing operation inside the capture panics in tch: caught, quietly, and reported as the reason.
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let run = catch_unwind(AssertUnwindSafe(|| f(&statics)));
            std::panic::set_hook(hook);
            let end = graph.call(Op::End);
            match (run, end) {
                (Ok(Ok(outputs)), Ok(())) => Ok(outputs),
                (Ok(Err(e)), _) => Err(format!("{e:#}")),
                (Err(p), _) => Err(panic_message(p.as_ref())),
                (Ok(Ok(_)), Err(e)) => Err(e),
            }
        };
        let outputs = outcome?;
        graph.call(Op::Replay)?;
        if self.captures == 0 {
            eprintln!("CUDA graphs: {} captured; its later calls replay the graph", self.name);
        }
        self.captures += 1;
        let shallow = outputs.iter().map(Tensor::shallow_clone).collect();
        self.captured = Some(Captured { inputs: statics, outputs, graph });
        Ok(shallow)
    }
}

/// Fresh copies of `ts` (undefined ones stay undefined), in one multi-tensor copy: what a caller may keep across
/// the next replay, which rewrites a graph's outputs in place.
pub fn copies(ts: &[Tensor]) -> Vec<Tensor> {
    let out: Vec<Tensor> = ts.iter().map(|t| if t.defined() { t.empty_like() } else { Tensor::new() }).collect();
    let (dst, src): (Vec<Tensor>, Vec<Tensor>) =
        out.iter().zip(ts).filter(|(_, t)| t.defined()).map(|(d, t)| (d.shallow_clone(), t.shallow_clone())).unzip();
    if !dst.is_empty() {
        tch::no_grad(|| crate::native::foreach_copy(&dst, &src));
    }
    out
}

/// Graphed functions told apart by an identity (such as the addresses of the tensors a pass differentiates),
/// each made on its first use.
#[derive(Debug, Default)]
pub struct ByIdentity(Vec<(Vec<usize>, Graphed)>);

impl ByIdentity {
    /// The function for `id`, made by `make` the first time.
    pub fn get(&mut self, id: Vec<usize>, make: impl FnOnce() -> Graphed) -> &mut Graphed {
        let i = match self.0.iter().position(|(k, _)| *k == id) {
            Some(i) => i,
            None => {
                self.0.push((id, make()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let s = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
    let s = s.unwrap_or_else(|| "a panic".into());
    s.lines().next().unwrap_or_default().chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_the_gpu_a_graphed_function_runs_eagerly_and_says_why() {
        let mut g = Graphed::on("the test step", Device::Cpu);
        let why = g.off_reason().expect("no graphs on the CPU").to_string();
        assert!(why.contains("CUDA device") && why.contains("the CPU"), "{why}");
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let mut calls = 0;
        for i in 0..4 {
            let out = g
                .run(0, &[&x], &mut |t| {
                    calls += 1;
                    Ok(vec![&t[0] * (i as f64)])
                })
                .unwrap();
            let want = &x * (i as f64);
            assert_eq!(f64::try_from((&out[0] - want).abs().max()).unwrap(), 0.0);
        }
        assert_eq!((calls, g.counts()), (4, (0, 0)));
        let e = Graphed::eager("x");
        assert!(e.off_reason().unwrap().contains("not asked"));
    }

    #[test]
    fn errors_of_the_function_reach_the_caller() {
        let mut g = Graphed::on("the test step", Device::Cpu);
        let x = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let e = g.run(0, &[&x], &mut |_| anyhow::bail!("bad batch")).unwrap_err();
        assert_eq!(e.to_string(), "bad batch");
    }

    /// A graphed function on stand-in graphs (the capture runs `f` on the CPU, a replay runs nothing).
    fn stand_in(fail: bool) -> Graphed {
        STAND_IN.set(Some(fail));
        Graphed { off: None, device: Device::Cuda(0), ..Graphed::eager("the stand-in step") }
    }

    #[test]
    fn warm_up_twice_then_capture_on_static_inputs_then_replay_with_the_inputs_copied_in() {
        let mut g = stand_in(false);
        let mut calls = Vec::new();
        let mut seen_ptrs = Vec::new();
        let mut outs = Vec::new();
        for i in 0..6 {
            let x = Tensor::from_slice(&[i as f32, 1.0]);
            let out = g
                .run(7, &[&x], &mut |t| {
                    calls.push(i);
                    seen_ptrs.push(std::ptr::eq(t[0].data_ptr(), x.data_ptr()));
                    Ok(vec![&t[0] * 2.0])
                })
                .unwrap();
            outs.push(out.into_iter().next().unwrap());
            if i >= 2 {
                let statics = &g.captured.as_ref().expect("captured at the third call").inputs[0];
                assert_eq!(Vec::<f32>::try_from(statics).unwrap(), vec![i as f32, 1.0], "call {i}");
            }
        }
        // Two warm-up calls on the given tensors, the capture on static copies, then no calls: replays.
        assert_eq!(calls, vec![0, 1, 2]);
        assert_eq!(seen_ptrs, vec![true, true, false]);
        assert_eq!(g.counts(), (1, 3));
        // A replay hands back the captured outputs (a real replay rewrites them; the stand-in does not).
        for o in &outs[3..] {
            assert_eq!(o.data_ptr(), outs[2].data_ptr());
        }
        // Another key (a baked-in host value) or shape: one warm-up call, then a new capture.
        calls.clear();
        let y = Tensor::from_slice(&[5.0f32, 1.0]);
        for _ in 0..3 {
            g.run(8, &[&y], &mut |t| {
                calls.push(8);
                Ok(vec![t[0].shallow_clone()])
            })
            .unwrap();
        }
        let z = Tensor::from_slice(&[5.0f32, 1.0, 2.0]);
        for _ in 0..3 {
            g.run(8, &[&z], &mut |t| {
                calls.push(9);
                Ok(vec![t[0].shallow_clone()])
            })
            .unwrap();
        }
        assert_eq!(calls, vec![8, 8, 9, 9]);
        assert_eq!(g.counts(), (3, 5));
        STAND_IN.set(None);
    }

    #[test]
    fn a_failed_capture_turns_graphs_off_and_the_call_runs_eagerly() {
        let mut g = stand_in(true);
        let x = Tensor::from_slice(&[3.0f32]);
        let mut calls = 0;
        for _ in 0..5 {
            let out = g
                .run(0, &[&x], &mut |t| {
                    calls += 1;
                    Ok(vec![&t[0] + 1.0])
                })
                .unwrap();
            assert_eq!(Vec::<f32>::try_from(&out[0]).unwrap(), vec![4.0]);
        }
        // Two warm-ups, the capture and its eager rerun, then two eager calls.
        assert_eq!(calls, 6);
        assert!(g.off_reason().unwrap().contains("stand-in failure"), "{:?}", g.off_reason());
        assert_eq!(g.counts(), (0, 0));
        // An error inside the capture is reported the same way, and the eager rerun's error reaches the caller.
        let mut g = stand_in(false);
        for _ in 0..2 {
            g.run(0, &[&x], &mut |t| Ok(vec![t[0].shallow_clone()])).unwrap();
        }
        let e = g.run(0, &[&x], &mut |_| anyhow::bail!("a host copy")).unwrap_err();
        assert_eq!(e.to_string(), "a host copy");
        assert_eq!(g.off_reason(), Some("a host copy"));
        STAND_IN.set(None);
    }

    #[test]
    fn copies_are_fresh_and_keep_undefined_tensors_undefined() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]);
        let b = Tensor::from_slice(&[3.0f64]).reshape([1, 1]);
        let c = copies(&[a.shallow_clone(), Tensor::new(), b.shallow_clone()]);
        assert!(!c[1].defined());
        assert_eq!(Vec::<f32>::try_from(&c[0]).unwrap(), vec![1.0, 2.0]);
        assert_eq!(
            (c[2].size(), c[2].kind(), f64::try_from(&c[2].reshape([-1])).unwrap()),
            (vec![1, 1], Kind::Double, 3.0)
        );
        let _ = a.shallow_clone().fill_(0.0);
        assert_eq!(Vec::<f32>::try_from(&c[0]).unwrap(), vec![1.0, 2.0], "a copy, not a view");
    }

    #[test]
    fn panic_messages_are_one_short_line() {
        let p: Box<dyn std::any::Any + Send> = Box::new(format!("first line\nframe #0 {}", "x".repeat(400)));
        assert_eq!(panic_message(p.as_ref()), "first line");
        let p: Box<dyn std::any::Any + Send> = Box::new("static");
        assert_eq!(panic_message(p.as_ref()), "static");
    }
}

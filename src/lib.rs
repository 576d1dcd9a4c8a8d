//! darts: differentiable architecture search (Liu, Simonyan & Yang, ICLR 2019) on libtorch.
//!
//! The data flows in one line: [`data`] (load, split into disjoint weight/alpha halves) ->
//! [`supernet`] (the continuous relaxation of a [`space::SearchSpace`]) -> [`search`] (the bilevel loop,
//! with [`architect`] computing alpha's hypergradient) -> [`genotype`] (the discrete cells derived from alpha).
#![warn(missing_docs)]

pub mod allocator;
pub mod architect;
pub mod baseline;
pub mod bench;
pub mod compare;
pub mod data;
pub mod decision;
pub mod deploy;
pub mod dist;
pub mod driver;
pub mod evaluate;
pub mod genotype;
pub mod graphs;
pub mod interrupt;
pub mod native;
pub mod network;
pub mod openmp;
pub mod ops;
pub mod optim;
pub mod params;
pub mod profile;
pub mod progress;
pub mod recipe;
pub mod report;
pub mod run;
pub mod rundir;
pub mod search;
pub mod shared;
pub mod space;
pub mod supernet;
pub mod train;
pub mod viz;
pub mod zoo;

/// Held while seeding libtorch's global generator and drawing initial weights from it, so that runs built
/// on parallel threads (tests, a library user's) do not interleave their draws.
pub fn torch_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    #[test]
    fn failures_are_explained_and_out_of_memory_gets_advice() {
        let m =
            super::explain_failure("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory");
        assert!(m.contains("out of memory") && m.contains("--batch-size") && m.contains("--resume"), "{m}");
        let m = super::explain_failure("CUDA out of memory. Tried to allocate 2.00 GiB");
        assert!(m.contains("--channels"), "{m}");
        let tch = r#"called `Result::unwrap()` on an `Err` value: Torch("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 80281600 bytes.\nframe #0: c10::ThrowEnforceNotMet") (at tensor_generated.rs:1)"#;
        let m = super::explain_failure(tch);
        assert!(
            m.starts_with("out of memory: [enforce fail") && !m.contains("frame #") && !m.contains("unwrap"),
            "{m}"
        );
        let m = super::explain_failure("shape mismatch");
        assert!(m.starts_with("libtorch failed: shape mismatch") && !m.contains("--batch-size"), "{m}");
    }
}

/// Memory layout of activations and convolution kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// Channels-last on the CPU (libtorch's faster kernels there), NCHW on CUDA.
    #[default]
    Auto,
    /// Contiguous NCHW everywhere.
    Nchw,
    /// Channels-last (NHWC in memory) everywhere.
    ChannelsLast,
}

impl Layout {
    /// Whether to use channels-last on `device`.
    pub fn channels_last(self, device: tch::Device) -> bool {
        match self {
            Layout::Auto => device == tch::Device::Cpu,
            Layout::Nchw => false,
            Layout::ChannelsLast => true,
        }
    }
}

/// Switches every 4-d variable of `vs` (the convolution kernels) to channels-last strides in place (`on`), or
/// back to contiguous NCHW. Values, names and gradients are unchanged; only the memory order differs.
pub fn set_vars_channels_last(vs: &tch::nn::VarStore, on: bool) {
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            if t.dim() == 4 {
                let data = if on { channels_last(&t) } else { t.contiguous() };
                t.set_data(&data);
            }
        }
    });
}

/// The same tensor with channels-last strides (NHWC in memory, NCHW in shape), as PyTorch's
/// `.to(memory_format=torch.channels_last)`; other ranks are returned as they are.
pub fn channels_last(t: &tch::Tensor) -> tch::Tensor {
    if t.dim() == 4 {
        t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    } else {
        t.shallow_clone()
    }
}

/// Turns a libtorch failure message into an error for people: out-of-memory gets the options that reduce
/// memory, and every message says that the last checkpoint is intact.
pub fn explain_failure(msg: &str) -> String {
    // tch reports libtorch errors as `called Result::unwrap() on an Err value: Torch("...\nframe #0 ...")`:
    // keep libtorch's own first line, drop the C++ stack.
    let mut msg = msg;
    if let Some(i) = msg.find("Torch(\"") {
        msg = &msg[i + 7..];
    }
    for cut in ["\\nframe #", "\nframe #", "\\nException raised from", "\nException raised from", "\") (at "] {
        if let Some(i) = msg.find(cut) {
            msg = &msg[..i];
        }
    }
    let msg = msg.trim();
    let lower = msg.to_lowercase();
    let oom = lower.contains("out of memory")
        || lower.contains("can't allocate memory")
        || lower.contains("failed to allocate");
    let resume = "Checkpoints are written at the end of every epoch, so the last one is intact: continue with \
                  --resume DIR";
    if oom {
        format!(
            "out of memory: {msg}\n  Reduce what a step holds. A search: --checkpoint-cells (recomputes each cell \
             during backward: same result, a fraction of the memory; also works with --resume DIR), \
             --partial-channels 4 (PC-DARTS: each edge's ops see a quarter of the channels), first-order instead \
             of --order second (the unrolled step holds a second graph), fewer --nodes or --ops. Any run: a \
             smaller --batch-size, fewer --channels or --layers. {resume} (settings that change the result are \
             fixed for a run, so a smaller one starts anew with --out)."
        )
    } else {
        format!("libtorch failed: {msg}\n  {resume}. If it repeats, please report it with the command line.")
    }
}

/// Picks the compute device: "cpu", "cuda" (the first GPU; an error without one) or "auto".
pub fn device_from_name(name: &str) -> anyhow::Result<tch::Device> {
    match name {
        "cpu" => Ok(tch::Device::Cpu),
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(tch::Device::Cuda(0))
            } else {
                anyhow::bail!("--device cuda: no CUDA device is visible to libtorch; use --device cpu or auto")
            }
        }
        other => anyhow::bail!("unknown device '{other}': use cpu, cuda or auto"),
    }
}

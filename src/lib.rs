//! darts: differentiable architecture search (Liu, Simonyan & Yang, ICLR 2019) on libtorch.
//!
//! The data flows in one line: [`data`] (load, split into disjoint weight/alpha halves) ->
//! [`supernet`] (the continuous relaxation of a [`space::SearchSpace`]) -> [`search`] (the bilevel loop,
//! with [`architect`] computing alpha's hypergradient) -> [`genotype`] (the discrete cells derived from alpha).
#![warn(missing_docs)]

pub mod architect;
pub mod bench;
pub mod data;
pub mod genotype;
pub mod network;
pub mod ops;
pub mod optim;
pub mod progress;
pub mod run;
pub mod search;
pub mod space;
pub mod supernet;
pub mod train;
pub mod zoo;

/// Held while seeding libtorch's global generator and drawing initial weights from it, so that runs built
/// on parallel threads (tests, a library user's) do not interleave their draws.
pub fn torch_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
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

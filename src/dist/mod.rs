//! torch.distributed (c10d) for data-parallel runs: the process group torchrun's environment describes (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; SLURM jobs set the same), joined through libtorch's
//! own TCPStore and ProcessGroupNCCL (CUDA) or ProcessGroupGloo (CPU) via `csrc/dist.cpp`, and the collectives
//! darts needs: gradients averaged in a few large flattened buckets, broadcasts, and a check that every rank holds
//! the same weights.
//!
//! The launch environment and the backend's choice are [`launch`]'s.

mod launch;

pub use launch::{Backend, Launch};

use anyhow::{bail, Context, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use tch::{Device, Kind, Tensor};

extern "C" {
    fn darts_last_error() -> *const c_char;
    fn darts_dist_available() -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn darts_pg_new(
        host: *const c_char,
        port: c_int,
        is_server: c_int,
        rank: c_int,
        world: c_int,
        bind: *const c_char,
        iface: *const c_char,
        prefix: *const c_char,
        timeout_ms: i64,
        backend: c_int,
        cuda_device: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    fn darts_pg_allreduce_sum(pg: *mut c_void, tensors: *const *const c_void, n: c_int) -> c_int;
    fn darts_pg_broadcast(pg: *mut c_void, tensors: *const *const c_void, n: c_int, root: c_int) -> c_int;
    fn darts_pg_barrier(pg: *mut c_void) -> c_int;
    fn darts_pg_free(pg: *mut c_void);
}

fn last_error() -> String {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated string, valid until the next call.
    let msg = unsafe { CStr::from_ptr(darts_last_error()) }.to_string_lossy().into_owned();
    // libtorch appends the C++ stack: keep its own message.
    msg.split("\nException raised from").next().unwrap_or_default().trim().to_string()
}

/// What a failed collective most likely means, and what to do.
const PEER_GONE: &str = "(another rank stopped or hangs: see its own output; the last checkpoint is intact, and \
                         running the same command again resumes from it)";

/// Gradients are averaged in buckets of about this many bytes (as DDP's reducer: few large calls).
pub const BUCKET_BYTES: usize = 25 << 20;

/// A joined process group.
#[derive(Debug)]
pub struct Dist {
    pg: *mut c_void,
    /// How this process was launched.
    pub launch: Launch,
    /// The backend its collectives run on.
    pub backend: Backend,
    /// Where the values darts makes on the host (metrics, checksums, positions) go for a collective: the GPU for
    /// NCCL, the CPU for Gloo.
    device: Device,
    /// Nanoseconds spent in collectives.
    comm_nanos: std::sync::atomic::AtomicU64,
}

// SAFETY: the process group is only used through `&self` calls that wait for their collective; libtorch's
// ProcessGroupGloo and ProcessGroupNCCL are safe to call from any thread.
unsafe impl Send for Dist {}
// SAFETY: as above.
unsafe impl Sync for Dist {}

impl Drop for Dist {
    fn drop(&mut self) {
        // SAFETY: `pg` came from darts_pg_new and is freed once.
        unsafe { darts_pg_free(self.pg) }
    }
}

impl Dist {
    /// Whether this build of darts has c10d.
    pub fn available() -> bool {
        // SAFETY: a plain query.
        unsafe { darts_dist_available() == 1 }
    }

    /// Whether this build of darts has c10d's NCCL backend.
    pub fn nccl_available() -> bool {
        launch::nccl_built()
    }

    /// Joins the process group of `launch` for a run on `device`, on the backend [`Backend::choose`] picks
    /// (`DARTS_DIST_BACKEND` from the environment): NCCL on the CUDA device, or Gloo, whose device binds to
    /// 127.0.0.1 when the rendezvous host is a loopback address, to `GLOO_SOCKET_IFNAME` when set, else to this
    /// host's name. Waits up to `timeout_s` seconds for the other processes.
    pub fn join(launch: Launch, timeout_s: u64, device: Device) -> Result<Dist> {
        if !Dist::available() {
            bail!(
                "WORLD_SIZE={}: this darts was built without c10d (gloo's headers were missing at build time): \
                 install libgloo-dev (scripts/setup.sh does, as root) and rebuild",
                launch.world
            );
        }
        let backend = Backend::choose(device, std::env::var("DARTS_DIST_BACKEND").ok().as_deref())?;
        let (comm_device, cuda_index) = match (backend, device) {
            (Backend::Nccl, Device::Cuda(i)) => (device, i as c_int),
            _ => (Device::Cpu, 0),
        };
        let loopback = ["127.", "localhost", "::1"].iter().any(|p| launch.master_addr.starts_with(p));
        let bind = if loopback { "127.0.0.1".to_string() } else { hostname() };
        let iface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        let c = |s: &str| CString::new(s).context("a NUL byte in a rendezvous setting");
        let (host, bind_c, iface_c) = (c(&launch.master_addr)?, c(&bind)?, c(&iface)?);
        let prefix = c(&format!("darts/{}/", launch.restart))?;
        let mut pg: *mut c_void = std::ptr::null_mut();
        let is_server = launch.rank == 0 && !launch.agent_store;
        // SAFETY: every pointer is a live NUL-terminated string or `&mut pg`; the shim catches C++ exceptions.
        let rc = unsafe {
            darts_pg_new(
                host.as_ptr(),
                c_int::from(launch.master_port),
                c_int::from(is_server),
                launch.rank as c_int,
                launch.world as c_int,
                bind_c.as_ptr(),
                iface_c.as_ptr(),
                prefix.as_ptr(),
                (timeout_s * 1000) as i64,
                c_int::from(backend == Backend::Nccl),
                cuda_index,
                &mut pg,
            )
        };
        if rc != 0 || pg.is_null() {
            bail!(
                "rank {} of {}: could not join the {} process group at {}:{} within {timeout_s} s: {}",
                launch.rank,
                launch.world,
                backend.name(),
                launch.master_addr,
                launch.master_port,
                last_error()
            );
        }
        Ok(Dist { pg, launch, backend, device: comm_device, comm_nanos: std::sync::atomic::AtomicU64::new(0) })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    /// The number of processes.
    pub fn world(&self) -> usize {
        self.launch.world
    }

    /// Whether this process writes the run directory (rank 0).
    pub fn is_writer(&self) -> bool {
        self.launch.rank == 0
    }

    /// Sums `tensors` over all processes, in place (one collective per element type: they travel flattened).
    pub fn all_reduce_sum(&self, tensors: &[&Tensor]) -> Result<()> {
        self.timed(|| flattened(tensors, |flat| self.all_reduce_one(flat)))
    }

    /// Copies `tensors` of rank `root` into every process's, in place (one collective per element type).
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        self.timed(|| flattened(tensors, |flat| self.broadcast_one(flat, root)))
    }

    fn all_reduce_one(&self, t: &Tensor) -> Result<()> {
        let p = crate::native::ptrs(&[t]);
        // SAFETY: live tensors; the call waits for the collective to finish before returning.
        if unsafe { darts_pg_allreduce_sum(self.pg, p.as_ptr(), p.len() as c_int) } != 0 {
            bail!("rank {}: all-reduce failed: {} {PEER_GONE}", self.rank(), last_error());
        }
        Ok(())
    }

    fn broadcast_one(&self, t: &Tensor, root: usize) -> Result<()> {
        let p = crate::native::ptrs(&[t]);
        // SAFETY: as in all_reduce_sum.
        if unsafe { darts_pg_broadcast(self.pg, p.as_ptr(), p.len() as c_int, root as c_int) } != 0 {
            bail!("rank {}: broadcast failed: {} {PEER_GONE}", self.rank(), last_error());
        }
        Ok(())
    }

    /// Waits for every process.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a collective on a live group.
        if unsafe { darts_pg_barrier(self.pg) } != 0 {
            bail!("rank {}: barrier failed: {} {PEER_GONE}", self.rank(), last_error());
        }
        Ok(())
    }

    /// Sums scalars over all processes (metrics: losses times counts, correct predictions, counts).
    pub fn sum_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(values).to_device(self.device);
        self.all_reduce_sum(&[&t])?;
        Ok(Vec::<f64>::try_from(&t)?)
    }

    /// Replaces each gradient by the mean over all processes of `weight * gradient`, divided by the total
    /// weight (`weight`: this process's examples in the step, so that unequal shards average as one batch
    /// would). The gradients travel flattened in buckets of about [`BUCKET_BYTES`] (as DDP's reducer: a few large
    /// calls, not one per tensor). Undefined gradients (the ops GDAS did not sample, the same on every rank, which
    /// draw their samples from one stream) stay undefined: every rank leaves out the same ones.
    pub fn average_gradients(&self, grads: &mut [Tensor], weight: f64) -> Result<()> {
        let total = self.sum_f64(&[weight])?[0];
        let mut defined: Vec<&mut Tensor> = grads.iter_mut().filter(|g| g.defined()).collect();
        let mut start = 0;
        while start < defined.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < defined.len() && (end == start || bytes < BUCKET_BYTES) {
                bytes += defined[end].numel() * 4;
                end += 1;
            }
            let bucket = &mut defined[start..end];
            tch::no_grad(|| -> Result<()> {
                // The bucket travels in its first gradient's element type (float32, or float64 in tests).
                let kind = bucket[0].kind();
                let parts: Vec<Tensor> = bucket.iter().map(|g| g.to_kind(kind).flatten(0, -1) * weight).collect();
                let flat = Tensor::cat(&parts, 0);
                self.all_reduce_sum(&[&flat])?;
                let mut offset = 0;
                for g in bucket.iter_mut() {
                    let n = g.numel() as i64;
                    let mean = flat.narrow(0, offset, n).view(g.size().as_slice()) / total;
                    **g = mean.to_kind(g.kind());
                    offset += n;
                }
                Ok(())
            })?;
            start = end;
        }
        Ok(())
    }

    /// Fails on every rank unless every rank was started with the same `settings` (a run's configuration as
    /// JSON): ranks launched with different seeds, spaces or data would silently train different things.
    pub fn check_same_settings(&self, settings: &serde_json::Value) -> Result<()> {
        let text = settings.to_string();
        // FNV-1a of the settings, in 52 bits so that it travels exactly as a float64.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let (ranks, differs) = self.differ_from_rank0(&[(hash >> 12) as f64])?;
        if ranks > 0.0 {
            bail!(
                "{ranks} of {} ranks were started with other settings than rank 0 (seed, space, data, schedule...): \
                 start every rank with the same command line{}",
                self.world(),
                if differs { format!(" (this rank, {}, differs)", self.rank()) } else { String::new() }
            );
        }
        Ok(())
    }

    /// Compares `values` with rank 0's, exactly: how many ranks hold others, and whether this one does.
    fn differ_from_rank0(&self, values: &[f64]) -> Result<(f64, bool)> {
        let ours = Tensor::from_slice(values).to_device(self.device);
        let theirs = ours.copy();
        self.broadcast(&[&theirs], 0)?;
        let differs = !ours.equal(&theirs);
        Ok((self.sum_f64(&[f64::from(u8::from(differs))])?[0], differs))
    }

    /// Time this process has spent in collectives so far, in seconds (the communication share of a step).
    pub fn seconds_in_collectives(&self) -> f64 {
        self.comm_nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9
    }

    fn timed(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let start = std::time::Instant::now();
        let r = f();
        self.comm_nanos.fetch_add(start.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        r
    }

    /// Fails on every rank, naming `what`, unless every rank holds bit-identical `tensors` (compared by an exact
    /// integer checksum of their bit patterns per tensor, against rank 0's).
    pub fn check_identical(&self, what: &str, tensors: &[Tensor]) -> Result<()> {
        let sums: Vec<f64> = tch::no_grad(|| {
            tensors
                .iter()
                .map(|t| {
                    let bits = t.detach().to_kind(Kind::Float).contiguous().view_dtype(Kind::Int);
                    // Exact: integers, and the sum of 2^31-bounded values over < 2^32 elements fits in i64; as f64
                    // it keeps 53 bits, enough to tell any difference that survives the modulus below.
                    (bits.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]) % (1 << 52)) as f64
                })
                .collect()
        });
        let (ranks, _) = self.differ_from_rank0(&sums)?;
        if ranks > 0.0 {
            bail!(
                "{what} differ between ranks ({ranks} of {} ranks differ from rank 0): the run stopped rather than \
                 derive different results per rank. Please report it with the command line",
                self.world()
            );
        }
        Ok(())
    }
}

/// Runs `collective` on one flat contiguous buffer per element type of `tensors` and copies the results back
/// (Gloo's collectives take one tensor per call, or several of one shape as one per device).
fn flattened(tensors: &[&Tensor], collective: impl Fn(&Tensor) -> Result<()>) -> Result<()> {
    // Element types in order of first appearance, so that every rank runs the same collectives in step.
    let mut kinds: Vec<Kind> = Vec::new();
    for t in tensors {
        if !kinds.contains(&t.kind()) {
            kinds.push(t.kind());
        }
    }
    for kind in kinds {
        let group: Vec<&Tensor> = tensors.iter().copied().filter(|t| t.kind() == kind).collect();
        if let [one] = group.as_slice() {
            if one.is_contiguous() {
                collective(one)?;
                continue;
            }
        }
        tch::no_grad(|| -> Result<()> {
            let flat = Tensor::cat(&group.iter().map(|t| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
            collective(&flat)?;
            let mut offset = 0;
            for t in &group {
                let n = t.numel() as i64;
                t.shallow_clone().copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()));
                offset += n;
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The contiguous part of a global batch of `n` examples that `rank` of `world` takes: sizes differ by at most
/// one, earlier ranks take the larger parts.
pub fn shard(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn shards_cover_a_batch_once_and_balance() {
        for (n, world) in [(10, 3), (96, 2), (5, 4), (2, 2), (7, 1)] {
            let parts: Vec<_> = (0..world).map(|r| shard(n, r, world)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[world - 1].end, n);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
            }
        }
        assert_eq!(shard(10, 1, 3), 4..7);
    }
}

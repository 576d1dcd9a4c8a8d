//! What torchrun's (or SLURM's) environment says about a data-parallel run: rank, world, the store's address,
//! and the c10d backend its collectives run on.

use anyhow::{bail, Context, Result};
use std::ffi::c_int;
use tch::Device;

extern "C" {
    fn darts_nccl_available() -> c_int;
}

/// Whether this build of darts has c10d's NCCL backend ([`super::Dist::nccl_available`]).
pub(super) fn nccl_built() -> bool {
    // SAFETY: a plain query.
    unsafe { darts_nccl_available() == 1 }
}

/// The c10d backend a process group runs its collectives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors (the default on the CPU).
    Gloo,
    /// ProcessGroupNCCL: CUDA tensors, one GPU per process (the default on CUDA).
    Nccl,
}

impl Backend {
    /// The backend for a run on `device`: `DARTS_DIST_BACKEND` (`gloo` or `nccl`) when set, else NCCL on CUDA
    /// where this build has it and Gloo otherwise; NCCL on the CPU is refused.
    pub fn choose(device: Device, requested: Option<&str>) -> Result<Backend> {
        let cuda = matches!(device, Device::Cuda(_));
        let backend = match requested.map(|r| r.trim().to_ascii_lowercase()) {
            None => {
                if cuda && nccl_built() {
                    Backend::Nccl
                } else {
                    Backend::Gloo
                }
            }
            Some(r) if r == "gloo" => Backend::Gloo,
            Some(r) if r == "nccl" => Backend::Nccl,
            Some(r) => bail!("DARTS_DIST_BACKEND={r:?}: use gloo or nccl"),
        };
        if backend == Backend::Nccl {
            if !cuda {
                bail!("DARTS_DIST_BACKEND=nccl needs CUDA tensors: run with --device cuda, or use gloo on the CPU");
            }
            if !nccl_built() {
                bail!(
                    "DARTS_DIST_BACKEND=nccl: this darts was built without NCCL (nccl.h and CUDA's headers, from the \
                     torch wheel's nvidia packages, were missing at build time): rebuild after scripts/setup.sh, \
                     or use gloo"
                );
            }
        }
        Ok(backend)
    }

    /// The backend's name as c10d spells it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// Where this process stands in a multi-process run, as torchrun (or SLURM) says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank, 0..world.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// This process's index on its node: the CUDA device it uses.
    pub local_rank: usize,
    /// The rendezvous host (rank 0's, or torchrun's agent's TCPStore).
    pub master_addr: String,
    /// The rendezvous port.
    pub master_port: u16,
    /// torchrun's agent serves the store (`TORCHELASTIC_USE_AGENT_STORE`), so rank 0 does not.
    pub agent_store: bool,
    /// torchrun's restart count: each restart joins under a fresh key prefix.
    pub restart: usize,
}

impl Launch {
    /// The launch a process environment describes (`var` reads a variable): None without `WORLD_SIZE` or with a
    /// world of 1 (a plain single-process run), unless `DARTS_DIST_BACKEND` asks for a process group anyway (a
    /// world of one process that runs every collective: how the NCCL path is checked on a single GPU); an error
    /// naming the variable when one is missing or malformed.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let num = |name: &str, text: &str| -> Result<usize> {
            text.trim().parse().with_context(|| format!("{name}={text:?} is not a number (torchrun sets it)"))
        };
        let world = num("WORLD_SIZE", &world)?;
        if world == 0 {
            bail!("WORLD_SIZE=0: a run has at least one process");
        }
        if world == 1 && var("DARTS_DIST_BACKEND").is_none() {
            return Ok(None);
        }
        let need = |name: &str| {
            var(name).with_context(|| {
                format!("WORLD_SIZE={world} but {name} is not set: start darts with torchrun (or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
            })
        };
        let rank = num("RANK", &need("RANK")?)?;
        if rank >= world {
            bail!("RANK={rank} with WORLD_SIZE={world}: a rank lies in 0..{world}");
        }
        let local_rank = var("LOCAL_RANK").map(|v| num("LOCAL_RANK", &v)).transpose()?.unwrap_or(0);
        let master_port = need("MASTER_PORT")?;
        let master_port =
            master_port.trim().parse().with_context(|| format!("MASTER_PORT={master_port:?} is not a port number"))?;
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let restart = var("TORCHELASTIC_RESTART_COUNT").map(|v| num("TORCHELASTIC_RESTART_COUNT", &v)).transpose()?;
        Ok(Some(Launch {
            rank,
            world,
            local_rank,
            master_addr: need("MASTER_ADDR")?,
            master_port,
            agent_store,
            restart: restart.unwrap_or(0),
        }))
    }

    /// The launch of this process's environment.
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(|name| std::env::var(name).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launch_is_read_from_torchruns_variables_with_clear_errors() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(Launch::from_vars(env(&[])).unwrap(), None);
        assert_eq!(Launch::from_vars(env(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let l = Launch::from_vars(env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank, l.master_port, l.agent_store, l.restart), (3, 4, 1, 29500, true, 2));
        let e = Launch::from_vars(env(&[("WORLD_SIZE", "2"), ("RANK", "0")])).unwrap_err().to_string();
        assert!(e.contains("MASTER_PORT") && e.contains("torchrun"), "{e}");
        let e =
            Launch::from_vars(env(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")]))
                .unwrap_err()
                .to_string();
        assert!(e.contains("RANK=2"), "{e}");
        let e = Launch::from_vars(env(&[("WORLD_SIZE", "two")])).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE"), "{e}");
        let e = Launch::from_vars(env(&[("WORLD_SIZE", "0")])).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE=0"), "{e}");
        // A world of one joins a group only when a backend is asked for (the single-GPU check of NCCL).
        let one = Launch::from_vars(env(&[
            ("WORLD_SIZE", "1"),
            ("RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("DARTS_DIST_BACKEND", "nccl"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((one.rank, one.world, one.local_rank), (0, 1, 0));
    }

    #[test]
    fn the_backend_follows_the_device_and_refuses_impossible_requests() {
        assert_eq!(Backend::choose(Device::Cpu, None).unwrap(), Backend::Gloo);
        assert_eq!(Backend::choose(Device::Cpu, Some("Gloo")).unwrap(), Backend::Gloo);
        let want = if nccl_built() { Backend::Nccl } else { Backend::Gloo };
        assert_eq!(Backend::choose(Device::Cuda(0), None).unwrap(), want);
        assert_eq!(Backend::choose(Device::Cuda(1), Some("gloo")).unwrap(), Backend::Gloo);
        let e = Backend::choose(Device::Cpu, Some("nccl")).unwrap_err().to_string();
        assert!(e.contains("--device cuda"), "{e}");
        let e = Backend::choose(Device::Cpu, Some("mpi")).unwrap_err().to_string();
        assert!(e.contains("gloo or nccl"), "{e}");
    }
}

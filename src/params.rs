//! A network's state as named tensors: trainable weights and BN buffers in one fixed (name-sorted) order, with
//! checked loading. Search and training both keep their models' state this way.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, Tensor};

/// The weights and buffers of a VarStore, each list sorted by name (the order optimiser state follows).
#[derive(Debug)]
pub struct Params {
    /// Names of the trainable weights (the original PyTorch state_dict keys).
    pub names: Vec<String>,
    /// The trainable weights (shallow: they share storage with the VarStore).
    pub weights: Vec<Tensor>,
    /// Names of the non-trainable buffers (BN running statistics).
    pub buffer_names: Vec<String>,
    /// The buffers.
    pub buffers: Vec<Tensor>,
}

impl Params {
    /// The state of `vs`.
    pub fn of(vs: &nn::VarStore) -> Params {
        let mut all: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let (train, fixed): (Vec<_>, Vec<_>) = all.into_iter().partition(|(_, t)| t.requires_grad());
        let (names, weights) = train.into_iter().unzip();
        let (buffer_names, buffers) = fixed.into_iter().unzip();
        Params { names, weights, buffer_names, buffers }
    }

    /// Weights then buffers as (name, detached tensor).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        let w = self.names.iter().zip(&self.weights);
        let b = self.buffer_names.iter().zip(&self.buffers);
        w.chain(b).map(|(n, t)| (n.clone(), t.detach())).collect()
    }

    /// Copies every weight and buffer from `map` (read from `path`), after checking that each is there with its
    /// shape and that the file has no other model tensors (keys with a '/' and "meta" are other state, and
    /// PyTorch's BN `num_batches_tracked` counters are accepted and ignored); an error lists the differences.
    pub fn load(&self, map: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        let ours = self.named();
        let mut problems = Vec::new();
        for (name, t) in &ours {
            match map.get(name) {
                None => problems.push(format!("missing {name} {:?}", t.size())),
                Some(s) if s.size() != t.size() => {
                    problems.push(format!("{name}: file has {:?}, the network expects {:?}", s.size(), t.size()))
                }
                Some(_) => {}
            }
        }
        let known: std::collections::HashSet<&str> = ours.iter().map(|(n, _)| n.as_str()).collect();
        for name in map.keys() {
            let other_state = name == "meta" || name.contains('/') || name.ends_with(".num_batches_tracked");
            if !known.contains(name.as_str()) && !other_state {
                problems.push(format!("unexpected {name} (not in this network)"));
            }
        }
        if !problems.is_empty() {
            problems.sort();
            let shown = problems.iter().take(12).cloned().collect::<Vec<_>>().join("\n  ");
            bail!(
                "{} does not match the network its config builds ({} differences):\n  {shown}",
                path.display(),
                problems.len()
            );
        }
        let dsts = self.weights.iter().chain(&self.buffers);
        tch::no_grad(|| {
            for ((name, _), dst) in ours.iter().zip(dsts) {
                dst.shallow_clone().copy_(&map[name].to_device(dst.device()));
            }
        });
        Ok(())
    }

    /// Copies tensors named `{prefix}{name}` (one per weight) from `map` into `dsts` (e.g. momentum buffers).
    pub fn load_per_weight(
        &self,
        map: &HashMap<String, Tensor>,
        prefix: &str,
        dsts: &[Tensor],
        path: &Path,
    ) -> Result<()> {
        for (n, dst) in self.names.iter().zip(dsts) {
            copy_checked(map, &format!("{prefix}{n}"), dst, path)?;
        }
        Ok(())
    }
}

/// Copies `map[key]` (read from `path`) into `dst`, after checking that it is there with `dst`'s shape.
pub fn copy_checked(map: &HashMap<String, Tensor>, key: &str, dst: &Tensor, path: &Path) -> Result<()> {
    let Some(src) = map.get(key) else { bail!("{} lacks {key}: it was written by another version", path.display()) };
    if src.size() != dst.size() {
        bail!("{}: {key} has shape {:?}, expected {:?}", path.display(), src.size(), dst.size());
    }
    tch::no_grad(|| dst.shallow_clone().copy_(&src.to_device(dst.device())));
    Ok(())
}

/// Reads a safetensors file into a name -> tensor map.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| format!("{} is missing or damaged", path.display()))?
        .into_iter()
        .collect())
}

/// Opens the checkpoint `file` of the `kind` run in `dir`: its tensors and its JSON metadata (tensor "meta").
pub fn read_checkpoint<M: serde::de::DeserializeOwned>(
    dir: &Path,
    file: &str,
    kind: &str,
) -> Result<(std::path::PathBuf, HashMap<String, Tensor>, M)> {
    let path = dir.join(file);
    if !path.is_file() {
        bail!("{} has no {file}: it is not a {kind} run directory, or no epoch has finished yet", dir.display());
    }
    let map = read_tensors(&path)?;
    let meta = map.get("meta").with_context(|| format!("{} lacks its metadata", path.display()))?;
    let mut bytes = vec![0u8; meta.numel()];
    meta.copy_data_u8(&mut bytes, meta.numel());
    let meta = serde_json::from_slice(&bytes).with_context(|| format!("{}: unreadable metadata", path.display()))?;
    Ok((path, map, meta))
}

/// Writes named tensors to a safetensors file atomically (a temporary file renamed over `path`), as
/// contiguous CPU tensors whatever their device or memory layout.
pub fn write_tensors_atomically(named: &[(String, tch::Tensor)], path: &Path) -> Result<()> {
    use anyhow::Context;
    let host: Vec<(String, tch::Tensor)> =
        named.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let written = tch::Tensor::write_safetensors(&host, &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display())));
    if let Err(e) = written {
        // The file it was to replace is untouched; the half-written temporary goes.
        let _ = std::fs::remove_file(&tmp);
        return Err(explain_write_failure(e, path));
    }
    Ok(())
}

/// A failed write's error, saying that the previous file is intact and, when the disk is full, what to free.
pub fn explain_write_failure(e: anyhow::Error, path: &Path) -> anyhow::Error {
    let text = format!("{e:#}");
    let full = text.contains("No space left") || text.contains("os error 28") || text.contains("ENOSPC");
    let dir = path.parent().map_or_else(|| ".".into(), |d| d.display().to_string());
    if full {
        anyhow::anyhow!(
            "the disk holding {dir} is full, so {} could not be written (the previous one is intact): free space \
             there (old run directories, figures/), then continue with the same command or --resume",
            path.display()
        )
    } else {
        e.context(format!("writing {} (the previous one is intact)", path.display()))
    }
}

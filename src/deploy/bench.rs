//! Inference speed of a final network in libtorch, tract and ONNX Runtime, measured interleaved in one run
//! (round by round, every engine in turn), so that the machine's drift lands in every engine alike.

use super::onnx::{self, ExportOptions};
use super::runtime::tract_plan;
use super::ModelCard;
use crate::network::{Network, NetworkConfig};
use crate::space::DataShape;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, Write};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};
use tract_onnx::prelude::{tvec, Tensor as TractTensor};

/// One engine at one batch size: the median seconds per forward pass over the rounds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InferenceRow {
    /// Engine and configuration, e.g. `libtorch channels-last` or `tract, BN folded`.
    pub engine: String,
    /// Images per forward pass.
    pub batch: usize,
    /// Median over rounds of each round's median seconds per pass.
    pub seconds: f64,
    /// Smallest and largest round median.
    pub spread: (f64, f64),
    /// Images per second at the median.
    pub images_per_second: f64,
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct InferencePlan {
    /// The network.
    pub genotype: crate::genotype::Genotype,
    /// Its macro shape.
    pub network: NetworkConfig,
    /// Input shape and classes.
    pub shape: DataShape,
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Threads for every engine.
    pub threads: usize,
    /// Python with onnxruntime and the path of bench/ort_bench.py, when ONNX Runtime is measured.
    pub ort: Option<(String, std::path::PathBuf)>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Passes per measurement so that one takes about a quarter of a second (at least 2).
fn iterations(one_pass: f64) -> usize {
    ((0.25 / one_pass.max(1e-6)) as usize).clamp(2, 50)
}

/// Runs the plan; `dir` holds the exported files.
pub fn bench_inference(plan: &InferencePlan, dir: &Path, mut log: impl FnMut(&str)) -> Result<Vec<InferenceRow>> {
    tch::set_num_threads(plan.threads as i32);
    super::runtime::set_tract_threads(plan.threads);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut net = Network::new(&vs.root(), &plan.genotype, &plan.network, &plan.shape);
    let card = ModelCard {
        dataset: "bench".into(),
        shape: plan.shape,
        mean: vec![0.5; plan.shape.channels],
        std: vec![0.25; plan.shape.channels],
        class_names: (0..plan.shape.classes).map(|c| c.to_string()).collect(),
        genotype: plan.genotype.clone(),
        network: plan.network.clone(),
        darts_version: env!("CARGO_PKG_VERSION").into(),
    };
    let variants = [("BN folded", true), ("BN as nodes", false)];
    let mut files = Vec::new();
    let mut tract = Vec::new();
    for (name, fold) in variants {
        let opts = ExportOptions { fold_batch_norm: fold, normalize_inside: false };
        let bytes = onnx::to_bytes(&onnx::export(&net, &card, opts)?);
        let path = dir.join(format!("{}.onnx", if fold { "folded" } else { "nodes" }));
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        files.push((if fold { "folded" } else { "nodes" }, path));
        tract.push((format!("tract, {name}"), tract_plan(&bytes, &card)?));
    }
    let mut folded_vs = nn::VarStore::new(Device::Cpu);
    let mut folded = Network::new(&folded_vs.root(), &plan.genotype, &plan.network, &plan.shape);
    folded_vs.copy(&vs)?;
    folded.fold_batch_norm();
    crate::network::set_channels_last(&mut folded, &folded_vs, true);
    let mut ort = match &plan.ort {
        Some((py, script)) => {
            let mut cmd = std::process::Command::new(py);
            cmd.arg(script).arg(plan.threads.to_string());
            for (n, p) in &files {
                cmd.arg(format!("{n}={}", p.display()));
            }
            let mut child = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {py} for ONNX Runtime"))?;
            let mut out = std::io::BufReader::new(child.stdout.take().context("no stdout")?);
            let mut line = String::new();
            out.read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("ONNX Runtime's helper did not start: {line}");
            }
            Some((child, out))
        }
        None => None,
    };
    let mut times: std::collections::BTreeMap<(String, usize), Vec<f64>> = Default::default();
    for round in 0..plan.rounds {
        log(&format!("round {}/{}", round + 1, plan.rounds));
        for &batch in &plan.batches {
            let s = plan.shape;
            let x = Tensor::randn(
                [batch as i64, s.channels as i64, s.height as i64, s.width as i64],
                (Kind::Float, Device::Cpu),
            );
            let flat = Vec::<f32>::try_from(x.flatten(0, -1))?;
            // One untimed pass sets the number of timed ones.
            let probe = std::time::Instant::now();
            let _ = tch::no_grad(|| net.forward_t(&x, false).0);
            let iters = iterations(probe.elapsed().as_secs_f64());
            let mut measure = |name: String, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
                f()?;
                let mut per = Vec::with_capacity(iters);
                for _ in 0..iters {
                    let t = std::time::Instant::now();
                    f()?;
                    per.push(t.elapsed().as_secs_f64());
                }
                times.entry((name, batch)).or_default().push(median(&mut per));
                Ok(())
            };
            for cl in [false, true] {
                crate::network::set_channels_last(&mut net, &vs, cl);
                let name = format!("libtorch {}", if cl { "channels-last" } else { "NCHW" });
                measure(name, &mut || {
                    let _ = tch::no_grad(|| net.forward_t(&x, false).0);
                    Ok(())
                })?;
            }
            // The network darts predict runs: BatchNorm folded, channels-last.
            measure("libtorch channels-last, BN folded".into(), &mut || {
                let _ = tch::no_grad(|| folded.forward_t(&x, false).0);
                Ok(())
            })?;
            for (name, p) in &tract {
                let input = TractTensor::from_shape(&[batch, s.channels, s.height, s.width], &flat)?;
                measure(name.clone(), &mut || {
                    p.run(tvec!(input.clone().into()))?;
                    Ok(())
                })?;
            }
            if let Some((child, out)) = ort.as_mut() {
                for (variant, label) in [("folded", "BN folded"), ("nodes", "BN as nodes")] {
                    let stdin = child.stdin.as_mut().context("no stdin")?;
                    writeln!(stdin, "{variant} {batch} {iters}")?;
                    stdin.flush()?;
                    let mut line = String::new();
                    out.read_line(&mut line)?;
                    let mut per: Vec<f64> =
                        serde_json::from_str(&line).with_context(|| format!("ONNX Runtime's helper said {line}"))?;
                    times.entry((format!("ONNX Runtime, {label}"), batch)).or_default().push(median(&mut per));
                }
            }
        }
    }
    if let Some((mut child, _)) = ort {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = writeln!(stdin);
        }
        let _ = child.wait();
    }
    Ok(times
        .into_iter()
        .map(|((engine, batch), mut v)| {
            let seconds = median(&mut v);
            InferenceRow {
                engine,
                batch,
                seconds,
                spread: (v[0], v[v.len() - 1]),
                images_per_second: batch as f64 / seconds,
            }
        })
        .collect())
}

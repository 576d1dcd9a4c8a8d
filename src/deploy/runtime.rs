//! Running a trained network on a batch: through libtorch (the model as trained) or through tract, a Rust ONNX
//! runtime, on the exported graph. Both take the same input and give the same logits.

use super::{onnx, ModelCard, TrainedModel};
use anyhow::{Context, Result};
use std::path::Path;
use tract_onnx::prelude::{
    tvec, Arc, DatumExt, Framework, InferenceFact, InferenceModelExt, IntoRunnable, ShapeFact, TDim, TypedRunnableModel,
};

/// Which engine computes the logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// libtorch, on the model as trained (run directories only).
    Torch,
    /// tract on the ONNX graph (exported in memory from a run directory, or read from a .onnx file).
    Tract,
}

type Plan = Arc<TypedRunnableModel>;

/// A loaded engine with the card of its model.
pub enum Engine {
    /// libtorch.
    Torch(Box<TrainedModel>),
    /// tract, with whether its graph normalises the input itself.
    Tract {
        /// The optimised plan.
        plan: Plan,
        /// The model's card.
        card: Box<ModelCard>,
        /// The graph takes `p / 255` and normalises inside.
        normalize_inside: bool,
    },
}

/// Runs tract's matrix products on `n` threads (1: on the calling thread only).
pub fn set_tract_threads(n: usize) {
    use tract_linalg::multithread::{set_default_executor, Executor};
    set_default_executor(if n <= 1 { Executor::SingleThread } else { Executor::multithread(n) });
}

/// An optimised tract plan of an ONNX model's bytes, its batch dimension symbolic.
pub fn tract_plan(bytes: &[u8], card: &ModelCard) -> Result<Plan> {
    let model = tract_onnx::onnx().model_for_read(&mut &bytes[..]).context("tract could not read the ONNX model")?;
    let s = card.shape;
    let batch = model.sym("batch");
    let (c, h, w) = (s.channels as i64, s.height as i64, s.width as i64);
    let dims: [TDim; 4] = [batch.into(), c.into(), h.into(), w.into()];
    let fact: InferenceFact = f32::fact(ShapeFact::from(&dims[..])).into();
    let plan = model
        .with_input_fact(0, fact)?
        .into_optimized()
        .context("tract could not optimise the ONNX model")?
        .into_runnable()?;
    Ok(plan)
}

impl Engine {
    /// The engine `kind` for `model`: a training run directory (its `which` weights), or a `.onnx` file (tract).
    pub fn load(model: &Path, which: super::Which, kind: EngineKind, device: tch::Device) -> Result<Engine> {
        let is_onnx = model.is_file() && model.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"));
        if is_onnx {
            if kind == EngineKind::Torch {
                anyhow::bail!(
                    "{} is an ONNX file, which libtorch does not run: use --engine tract, or give the training run \
                     directory to run it with libtorch",
                    model.display()
                );
            }
            let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
            let proto =
                onnx::from_bytes(&bytes).with_context(|| format!("{} is not an ONNX model", model.display()))?;
            let (card, opts) = ModelCard::from_onnx(&proto)?;
            let plan = tract_plan(&bytes, &card)?;
            return Ok(Engine::Tract { plan, card: Box::new(card), normalize_inside: opts.normalize_inside });
        }
        let mut trained = TrainedModel::load(model, which, device)?;
        Ok(match kind {
            EngineKind::Torch => {
                // Inference only: BatchNorm folded into the convolutions (the same outputs, fewer kernels).
                trained.net.fold_batch_norm();
                Engine::Torch(Box::new(trained))
            }
            EngineKind::Tract => {
                let opts = onnx::ExportOptions::default();
                let bytes = onnx::to_bytes(&trained.to_onnx(opts)?);
                let plan = tract_plan(&bytes, &trained.card)?;
                Engine::Tract { plan, card: Box::new(trained.card), normalize_inside: opts.normalize_inside }
            }
        })
    }

    /// The model's card.
    pub fn card(&self) -> &ModelCard {
        match self {
            Engine::Torch(m) => &m.card,
            Engine::Tract { card, .. } => card,
        }
    }

    /// Whether the engine takes normalised input (else `p / 255`).
    pub fn takes_normalized(&self) -> bool {
        !matches!(self, Engine::Tract { normalize_inside: true, .. })
    }

    /// Logits `[n][classes]` of `n` inputs laid out one after the other (each `c * h * w`, CHW).
    pub fn logits(&self, input: &[f32], n: usize) -> Result<Vec<Vec<f32>>> {
        let s = self.card().shape;
        let classes = s.classes;
        let flat: Vec<f32> = match self {
            Engine::Torch(m) => {
                let dims = [n as i64, s.channels as i64, s.height as i64, s.width as i64];
                let x = tch::Tensor::from_slice(input).reshape(dims);
                let y = m.logits(&x).to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).contiguous();
                Vec::<f32>::try_from(y.flatten(0, -1))?
            }
            Engine::Tract { plan, .. } => {
                let t = tract_onnx::prelude::Tensor::from_shape(&[n, s.channels, s.height, s.width], input)?;
                let out = plan.run(tvec!(t.into()))?;
                out[0].to_plain_array_view::<f32>()?.iter().copied().collect()
            }
        };
        anyhow::ensure!(flat.len() == n * classes, "the model gave {} values for {n} x {classes} logits", flat.len());
        Ok(flat.chunks(classes).map(<[f32]>::to_vec).collect())
    }
}

/// Runs the exported `bytes` of `model` in tract on two seeded random images and returns the largest difference
/// from libtorch's logits relative to their scale; an error when it exceeds 1e-4 (the file would not compute
/// what was trained).
pub fn check_against_torch(model: &TrainedModel, bytes: &[u8], opts: onnx::ExportOptions) -> Result<f64> {
    let card = &model.card;
    let s = card.shape;
    let n = 2usize;
    let len = n * s.channels * s.height * s.width;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0x0dd5);
    // Pixels in [0, 1], as images give them.
    let pixels: Vec<f32> = (0..len).map(|_| rand::Rng::random::<f32>(&mut rng)).collect();
    let plane = s.height * s.width;
    let normalized: Vec<f32> = pixels
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let ch = (i / plane) % s.channels;
            ((p as f64 - card.mean[ch]) / card.std[ch]) as f32
        })
        .collect();
    let want = {
        let dims = [n as i64, s.channels as i64, s.height as i64, s.width as i64];
        let y = model.logits(&tch::Tensor::from_slice(&normalized).reshape(dims));
        Vec::<f32>::try_from(y.to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).flatten(0, -1))?
    };
    let plan = tract_plan(bytes, card)?;
    let tract = Engine::Tract { plan, card: Box::new(card.clone()), normalize_inside: opts.normalize_inside };
    let got = tract.logits(if opts.normalize_inside { &pixels } else { &normalized }, n)?.concat();
    let scale = 1.0 + want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = want.iter().zip(&got).fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64)) / scale;
    if diff > 1e-4 || !diff.is_finite() {
        anyhow::bail!(
            "the exported graph's logits differ from the network's by {diff:.2e} (relative) in tract: this is a \
             darts bug, please report it with the run's train-config.json"
        );
    }
    Ok(diff)
}

/// Evaluates an ONNX file written by `darts export` in tract on the test set of the dataset its card names
/// (`data_dir` where the data is not found by itself, the first `limit` examples): loss, top-1 and top-5, as
/// `darts eval` reports them for the run directory.
pub fn evaluate_onnx(
    path: &Path,
    data_dir: Option<&Path>,
    limit: Option<usize>,
) -> Result<crate::evaluate::EvalResult> {
    use tch::{Kind, Tensor};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let proto = onnx::from_bytes(&bytes).with_context(|| format!("{} is not an ONNX model", path.display()))?;
    let (card, opts) = ModelCard::from_onnx(&proto)?;
    let kind: crate::data::DatasetKind = serde_json::from_value(serde_json::json!(card.dataset))
        .with_context(|| format!("the model was trained on {:?}, which this darts does not know", card.dataset))?;
    let s = card.shape;
    let size = (kind == crate::data::DatasetKind::Folder).then_some(s.height);
    let test = crate::data::load_with(kind, data_dir, false, size)?.truncated(limit);
    if (test.shape.channels, test.shape.height, test.shape.width) != (s.channels, s.height, s.width) {
        anyhow::bail!(
            "the test images are {}x{}x{}, the model takes {}x{}x{}: give the --data-dir it was trained on",
            test.shape.channels,
            test.shape.height,
            test.shape.width,
            s.channels,
            s.height,
            s.width
        );
    }
    let engine = Engine::Tract {
        plan: tract_plan(&bytes, &card)?,
        card: Box::new(card.clone()),
        normalize_inside: opts.normalize_inside,
    };
    let (mut loss, mut top1, mut top5) = (0.0, 0.0, 0.0);
    let all: Vec<usize> = (0..test.len()).collect();
    for idx in all.chunks(64) {
        let (x, y) = test.batch(idx, None, tch::Device::Cpu);
        let x = if opts.normalize_inside {
            let ix = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>());
            test.images.index_select(0, &ix).to_kind(Kind::Float) / 255.0
        } else {
            x
        };
        let flat = Vec::<f32>::try_from(x.contiguous().flatten(0, -1))?;
        let rows = engine.logits(&flat, idx.len())?;
        let logits = Tensor::from_slice(&rows.concat()).reshape([idx.len() as i64, -1]);
        loss += logits.cross_entropy_for_logits(&y).double_value(&[]) * idx.len() as f64;
        top1 += logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64).int64_value(&[]) as f64;
        if s.classes > 5 {
            let (_, top) = logits.topk(5, -1, true, true);
            top5 += top.eq_tensor(&y.unsqueeze(1)).any_dim(1, false).sum(Kind::Int64).int64_value(&[]) as f64;
        }
    }
    Ok(crate::evaluate::EvalResult::from_sums([loss, top1, top5, test.len() as f64], s.classes))
}

//! Using what was found: a trained final network as an ONNX file (`darts export`), and classifying image files
//! with it (`darts predict`) through libtorch or an ONNX runtime (tract), which give the same answers.
//!
//! A [`ModelCard`] says what a deployer needs besides the weights: the input's shape and channel order, the
//! normalisation, the class names, the genotype and the darts version. Training writes it into the run
//! directory (`model-card.json`); for older runs it is rebuilt from the training data.

pub mod bench;
pub mod image;
pub mod onnx;
pub mod runtime;

use crate::data::{self, DatasetKind};
use crate::genotype::Genotype;
use crate::network::{Network, NetworkConfig};
use crate::rundir;
use crate::space::DataShape;
use crate::train::TrainConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

/// Which weights of a training run.
pub use crate::rundir::Which;

/// What a deployer needs to feed a trained network and read its answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// The dataset it was trained on (`builtin`, `cifar10`, ...).
    pub dataset: String,
    /// Input channels, height and width, and the number of classes.
    pub shape: DataShape,
    /// Per-channel mean of the normalisation `(pixel / 255 - mean) / std`, as in training.
    pub mean: Vec<f64>,
    /// Per-channel std of the normalisation.
    pub std: Vec<f64>,
    /// Class names, by class index.
    pub class_names: Vec<String>,
    /// The cell.
    pub genotype: Genotype,
    /// The macro shape.
    pub network: NetworkConfig,
    /// The darts version that wrote the card.
    pub darts_version: String,
}

impl ModelCard {
    /// The card of a training with `config` on `train` (its training set).
    pub fn of_training(config: &TrainConfig, train: &data::Dataset) -> Result<ModelCard> {
        Ok(ModelCard {
            dataset: config.dataset.name().into(),
            shape: train.shape,
            mean: train.mean.clone(),
            std: train.std.clone(),
            class_names: class_names(config.dataset, config.data_dir.as_deref(), train.shape.classes)?,
            genotype: config.genotype.clone(),
            network: config.network.clone(),
            darts_version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    /// The card in the run directory `dir`, or (runs from before cards were written) rebuilt from its
    /// training configuration and data.
    pub fn of_run(dir: &Path, config: &TrainConfig) -> Result<ModelCard> {
        let path = dir.join(rundir::MODEL_CARD);
        if path.is_file() {
            return rundir::read_json(&path);
        }
        let train = data::load_with(config.dataset, config.data_dir.as_deref(), true, config.image_size).with_context(
            || format!("{} has no {}: darts rebuilds it from the training data", dir.display(), rundir::MODEL_CARD),
        )?;
        ModelCard::of_training(config, &train)
    }

    /// The channel order of the input: `gray` or `RGB`.
    pub fn channel_order(&self) -> &'static str {
        if self.shape.channels == 1 {
            "gray"
        } else {
            "RGB"
        }
    }

    /// The genotype's zoo name when it is a published one, else "custom genotype".
    pub fn genotype_name(&self) -> String {
        crate::zoo::names()
            .into_iter()
            .find(|n| crate::zoo::get(n).is_some_and(|g| g == self.genotype))
            .map_or_else(|| "custom genotype".into(), str::to_string)
    }

    /// How the input tensor is made from image pixels under `opts`.
    pub fn input_description(&self, opts: onnx::ExportOptions) -> String {
        let s = self.shape;
        let base = format!(
            "float32 [batch, {}, {}, {}], {} channels in that order (NCHW), from pixels p in 0..=255",
            s.channels,
            s.height,
            s.width,
            self.channel_order()
        );
        if opts.normalize_inside {
            format!("{base}: p / 255 (the graph subtracts mean {:?} and divides by std {:?})", self.mean, self.std)
        } else {
            format!("{base}: (p / 255 - mean) / std per channel, mean {:?}, std {:?}", self.mean, self.std)
        }
    }

    /// Key/value metadata for an ONNX file: the card as JSON (`darts.card`) and its fields one by one.
    pub fn metadata(&self, opts: onnx::ExportOptions) -> Vec<(String, String)> {
        let s = self.shape;
        vec![
            ("darts.card".into(), json(self)),
            ("darts.export".into(), json(&opts)),
            ("input_shape".into(), format!("[batch, {}, {}, {}]", s.channels, s.height, s.width)),
            ("channel_order".into(), self.channel_order().into()),
            ("input".into(), self.input_description(opts)),
            ("mean".into(), json(&self.mean)),
            ("std".into(), json(&self.std)),
            ("normalization_inside".into(), opts.normalize_inside.to_string()),
            ("class_names".into(), json(&self.class_names)),
            ("dataset".into(), self.dataset.clone()),
            ("genotype".into(), self.genotype.to_string()),
            ("darts_version".into(), self.darts_version.clone()),
        ]
    }

    /// The card and export options stored in an ONNX model's metadata by [`ModelCard::metadata`].
    pub fn from_onnx(model: &tract_onnx::pb::ModelProto) -> Result<(ModelCard, onnx::ExportOptions)> {
        let get = |k: &str| model.metadata_props.iter().find(|p| p.key == k).map(|p| p.value.as_str());
        let card = get("darts.card").context(
            "this ONNX file has no darts.card metadata: it was not written by darts export (darts predict needs \
             the input size, normalisation and class names that darts stores there)",
        )?;
        let card: ModelCard = serde_json::from_str(card).context("the ONNX file's darts.card metadata is malformed")?;
        let opts = match get("darts.export") {
            Some(o) => serde_json::from_str(o).context("the ONNX file's darts.export metadata is malformed")?,
            None => onnx::ExportOptions::default(),
        };
        Ok((card, opts))
    }
}

/// Compact JSON of a value that always serialises.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Class names of a dataset (folder names for image folders; indices where a dataset names none).
pub fn class_names(kind: DatasetKind, dir: Option<&Path>, classes: usize) -> Result<Vec<String>> {
    let names: Vec<String> = match kind {
        DatasetKind::Folder => {
            let root = dir.context("an image-folder dataset needs its --data-dir")?;
            data::folder::class_names(root)?
        }
        other => match other.class_names() {
            Some(n) => n.iter().map(|s| s.to_string()).collect(),
            None => (0..classes).map(|i| i.to_string()).collect(),
        },
    };
    if names.len() != classes {
        bail!("{} class names for {classes} classes", names.len());
    }
    Ok(names)
}

/// A trained final network in evaluation mode, with its card.
#[derive(Debug)]
pub struct TrainedModel {
    /// What it takes and answers.
    pub card: ModelCard,
    /// The network.
    pub net: Network,
    /// Its weights and BN statistics.
    pub vs: nn::VarStore,
    /// Which run directory and weights it came from.
    pub source: PathBuf,
}

impl TrainedModel {
    /// Loads `which` weights of the training run in `dir` (or of the training stage of a `darts run` directory)
    /// onto `device`.
    pub fn load(dir: &Path, which: Which, device: Device) -> Result<TrainedModel> {
        let dir = &rundir::training_dir(dir);
        let cfg_path = dir.join(rundir::TRAIN_CONFIG);
        if !cfg_path.is_file() {
            bail!(
                "{} is not a training run directory (no {}): give the directory of a darts train or a darts run",
                dir.display(),
                rundir::TRAIN_CONFIG
            );
        }
        let config: TrainConfig = rundir::read_json(&cfg_path)?;
        let weights = dir.join(which.file_name());
        if which == Which::Best && !weights.is_file() {
            bail!(
                "{} has no {}: a best model exists only for runs trained with --valid-portion (chosen on that \
                 held-out split); use --which last",
                dir.display(),
                which.file_name()
            );
        }
        if !weights.is_file() {
            bail!("{} has no {} yet: the training has not finished", dir.display(), which.file_name());
        }
        let card = ModelCard::of_run(dir, &config)?;
        let vs = nn::VarStore::new(device);
        let net = Network::new(&vs.root(), &config.genotype, &config.network, &card.shape);
        let map = crate::params::read_tensors(&weights)?;
        crate::params::Params::of(&vs).load(&map, &weights)?;
        Ok(TrainedModel { card, net, vs, source: weights })
    }

    /// Logits of a normalised batch `[n, c, h, w]` (evaluation mode, no gradients).
    pub fn logits(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.net.forward_t(&x.to_device(self.vs.device()), false).0)
    }

    /// The ONNX model of this network.
    pub fn to_onnx(&self, opts: onnx::ExportOptions) -> Result<tract_onnx::pb::ModelProto> {
        onnx::export(&self.net, &self.card, opts)
    }
}

/// One file's answer: the `k` most probable classes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prediction {
    /// The image file.
    pub file: PathBuf,
    /// The most probable classes, most probable first.
    pub top: Vec<ClassScore>,
}

/// A class and its probability.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClassScore {
    /// Class index (the label).
    pub class: usize,
    /// Its name.
    pub name: String,
    /// Softmax probability.
    pub probability: f64,
}

/// A file that could not be classified, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    /// The file.
    pub file: PathBuf,
    /// What went wrong.
    pub error: String,
}

/// The `k` largest softmax probabilities of `logits`, with the card's class names.
pub fn top_k(logits: &[f32], k: usize, card: &ModelCard) -> Vec<ClassScore> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exp: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Ties keep the lower class first, as argmax does.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k.max(1))
        .map(|c| ClassScore {
            class: c,
            name: card.class_names.get(c).cloned().unwrap_or_else(|| c.to_string()),
            probability: exp[c] / sum,
        })
        .collect()
}

/// Classifies `files`, `batch` at a time, calling `progress` with the number done after each batch. Files that
/// cannot be read come back as failures; the others are classified.
pub fn predict_files(
    engine: &runtime::Engine,
    files: &[PathBuf],
    k: usize,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<(Vec<Prediction>, Vec<Failure>)> {
    let card = engine.card().clone();
    let normalized = engine.takes_normalized();
    let (mut preds, mut failures) = (Vec::new(), Vec::new());
    let mut done = 0;
    for chunk in files.chunks(batch.max(1)) {
        let mut input = Vec::new();
        let mut ok = Vec::new();
        for f in chunk {
            match image::input_of(f, &card, normalized) {
                Ok(v) => {
                    input.extend(v);
                    ok.push(f);
                }
                Err(e) => failures.push(Failure { file: f.clone(), error: format!("{e:#}") }),
            }
        }
        if !ok.is_empty() {
            let logits = engine.logits(&input, ok.len())?;
            for (f, l) in ok.into_iter().zip(logits) {
                preds.push(Prediction { file: f.clone(), top: top_k(&l, k, &card) });
            }
        }
        done += chunk.len();
        progress(done);
    }
    Ok((preds, failures))
}

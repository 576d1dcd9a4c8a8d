//! `darts train`: train a genotype's network from scratch; `darts eval`: test a trained model.
use anyhow::Result;
use darts::data::DatasetKind;
use darts::run;
use darts::train::TrainConfig;
use std::path::PathBuf;

/// Arguments of `darts train`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  darts train --genotype DARTS_V2 --dataset cifar10 --data-dir ~/data/cifar-10-batches-bin\n  darts train --genotype runs/search/genotype.json --dataset fashion-mnist --epochs 100 --channels 16 --layers 8\n  darts train --resume runs/train"
)]
pub struct TrainArgs {
    /// The cell: a zoo name (DARTS_V1, DARTS_V2, NASNet, AmoebaNet, PC_DARTS_cifar, PC_DARTS_image, PDARTS),
    /// a genotype.json / genotype.txt file, or the DARTS Python text.
    #[arg(long, required_unless_present = "resume")]
    genotype: Option<String>,
    #[command(flatten)]
    common: TrainCommon,
    /// Run directory; default runs/train-<date>-<time>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory.
    #[arg(long, conflicts_with_all = ["genotype", "out"])]
    resume: Option<PathBuf>,
}

/// Training settings shared by `darts train` and `darts run`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainCommon {
    /// Dataset.
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetKind>,
    /// Dataset folder.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Use only the first N training and test examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Initial channels (default 36, or 48 with --imagenet).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Cells (default 20, or 14 with --imagenet).
    #[arg(long)]
    pub layers: Option<usize>,
    /// No auxiliary head.
    #[arg(long)]
    pub no_auxiliary: bool,
    /// The ImageNet variant: two-stage stride-2 stem, ImageNet auxiliary head, label smoothing 0.1, 48
    /// channels and 14 cells unless given.
    #[arg(long)]
    pub imagenet: bool,
    /// Label smoothing (default 0, or 0.1 with --imagenet).
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Image folders (--dataset folder): resize images to this square size (default 32).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Epochs.
    #[arg(long = "epochs", default_value_t = 600)]
    pub train_epochs: usize,
    /// Batch size.
    #[arg(long = "batch-size", default_value_t = 96)]
    pub train_batch_size: usize,
    /// Initial learning rate (cosine to 0).
    #[arg(long = "lr", default_value_t = 0.025)]
    pub train_lr: f64,
    /// Auxiliary loss weight.
    #[arg(long, default_value_t = 0.4)]
    pub aux_weight: f64,
    /// Final drop-path probability (ramped from 0).
    #[arg(long, default_value_t = 0.2)]
    pub drop_path: f64,
    /// Cutout side in pixels (0 = off).
    #[arg(long, default_value_t = 16)]
    pub cutout: i64,
    /// Seed.
    #[arg(long = "seed", default_value_t = 0)]
    pub train_seed: u64,
    /// Forward-pass arithmetic: fp32, or bf16 mixed precision (autocast: convolutions and matrix products in
    /// bfloat16, weights, gradients and SGD in float32); for GPUs with bfloat16 units (NVIDIA Ampere and later).
    #[arg(long, value_enum, default_value_t = darts::native::Precision::Fp32)]
    pub precision: darts::native::Precision,
}

impl TrainCommon {
    /// The training configuration for `genotype`.
    pub fn config(&self, genotype: darts::genotype::Genotype, dataset: DatasetKind) -> TrainConfig {
        let mut c = TrainConfig::darts(genotype);
        c.dataset = self.dataset.unwrap_or(dataset);
        c.data_dir = self.data_dir.clone();
        c.limit = self.limit;
        if self.imagenet {
            c.network = darts::network::NetworkConfig::imagenet();
        }
        c.network.channels = self.channels.unwrap_or(c.network.channels);
        c.network.layers = self.layers.unwrap_or(c.network.layers);
        c.network.auxiliary = !self.no_auxiliary;
        c.label_smoothing = self.label_smoothing.unwrap_or(if self.imagenet { 0.1 } else { 0.0 });
        c.epochs = self.train_epochs;
        c.batch_size = self.train_batch_size;
        c.lr = self.train_lr;
        c.aux_weight = self.aux_weight;
        c.drop_path = self.drop_path;
        c.cutout = self.cutout;
        c.seed = self.train_seed;
        c.image_size = self.image_size;
        c.precision = self.precision;
        c
    }
}

pub fn run(a: TrainArgs, rt: &super::Runtime) -> Result<()> {
    let device = rt.device()?;
    let mut opts = rt.options(a.out.clone().unwrap_or_else(|| run::default_dir("train")), device);
    let out = match &a.resume {
        Some(dir) => {
            opts.out_dir = dir.clone();
            run::resume_training(&opts)?
        }
        None => {
            let g = darts::zoo::resolve(a.genotype.as_deref().unwrap_or_default())?;
            run::start_training(a.common.config(g, DatasetKind::Builtin), &opts)?
        }
    };
    println!("{}", serde_json::to_string(&out.last)?);
    eprintln!(
        "test accuracy {:.2}% (best {:.2}%), weights in {}/model-last.safetensors and model-best.safetensors",
        100.0 * out.last.top1,
        100.0 * out.best_acc,
        opts.out_dir.display()
    );
    Ok(())
}

/// Arguments of `darts eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A training run directory (from `darts train` or `darts run`).
    #[arg(long)]
    model: PathBuf,
    /// Which weights: best (highest test accuracy) or last.
    #[arg(long, default_value = "best", value_parser = ["best", "last"])]
    which: String,
}

pub fn eval(a: EvalArgs, rt: &super::Runtime) -> Result<()> {
    let r = run::evaluate_model(&a.model, &a.which, rt.device()?, rt.layout)?;
    println!("{}", serde_json::to_string(&r)?);
    eprintln!(
        "test: {} examples, loss {:.4}, top-1 {:.2}%{}",
        r.examples,
        r.loss,
        100.0 * r.top1,
        r.top5.map_or(String::new(), |t| format!(", top-5 {:.2}%", 100.0 * t))
    );
    Ok(())
}

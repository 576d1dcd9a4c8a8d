//! `darts train`: train a genotype's network from scratch; `darts eval`: test a trained model.
use super::args::{DataArgs, StageArgs, TrainOnlyArgs};
use anyhow::Result;
use darts::run;
use darts::train::TrainConfig;
use std::path::PathBuf;

/// Arguments of `darts train`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  darts train --genotype DARTS_V2 --dataset cifar10 --data-dir ~/data/cifar-10-batches-bin\n  darts train --genotype runs/search --dataset fashion-mnist --epochs 100 --channels 16 --layers 8 --valid-portion 0.1\n  darts train --genotype DARTS_V2 --recipe darts-imagenet --dataset folder --data-dir ~/data/imagenet --image-size 224\n  darts train --resume runs/train"
)]
pub struct TrainArgs {
    /// The cell: a zoo name (DARTS_V1, DARTS_V2, NASNet, AmoebaNet, PC_DARTS_cifar, PC_DARTS_image, PDARTS),
    /// a genotype.json / genotype.txt file, a search run directory, or the DARTS Python text.
    #[arg(long, required_unless_present = "resume")]
    genotype: Option<String>,
    #[command(flatten)]
    common: TrainCommon,
    #[command(flatten)]
    control: super::args::RunControl,
    /// Run directory; default runs/train-<date>-<time>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory. Its settings are fixed in its train-config.json: flags that would
    /// change them are refused.
    #[arg(
        long,
        conflicts_with_all = [
            "genotype", "out", "DataArgs", "StageArgs", "recipe", "imagenet", "valid_portion", "no_auxiliary",
            "aux_weight", "drop_path", "cutout", "label_smoothing", "lr_schedule", "lr_gamma", "lr_period",
            "warmup_epochs", "precision", "seed"
        ]
    )]
    resume: Option<PathBuf>,
}

/// The settings of `darts train`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainCommon {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    stage: StageArgs,
    #[command(flatten)]
    train: TrainOnlyArgs,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
}

impl TrainCommon {
    /// The training configuration for `genotype`, validated.
    pub fn config(&self, genotype: darts::genotype::Genotype) -> Result<TrainConfig> {
        let mut c = TrainConfig::from_recipe(self.train.recipe(), genotype);
        self.train.apply(&mut c)?;
        self.data.apply_train(&mut c);
        self.stage.stage().apply_train(&mut c);
        c.seed = self.seed.unwrap_or(c.seed);
        c.validate()?;
        Ok(c)
    }
}

pub fn run(a: TrainArgs, rt: &super::Runtime) -> Result<()> {
    let mut opts = rt.run_options(a.resume.as_ref().or(a.out.as_ref()), "train", &a.control)?;
    let out = match &a.resume {
        Some(dir) => {
            opts.out_dir = dir.clone();
            run::resume_training(&opts)?
        }
        None => {
            let g = darts::rundir::resolve_genotype(a.genotype.as_deref().unwrap_or_default())?;
            run::start_or_continue_training(a.common.config(g)?, &opts)?
        }
    };
    if !opts.writes() {
        return Ok(());
    }
    super::write_report(&opts.out_dir);
    println!("{}", serde_json::to_string(&out.last)?);
    let best = match out.best {
        Some(b) => format!(
            "; model-best.safetensors: epoch {} of best validation accuracy {:.2}% (darts eval --which best tests it)",
            b.epoch + 1,
            100.0 * b.valid_acc
        ),
        None => String::new(),
    };
    eprintln!(
        "test accuracy {:.2}% after the last epoch, weights in {}/model-last.safetensors{best}",
        100.0 * out.last.top1,
        opts.out_dir.display()
    );
    Ok(())
}

/// Arguments of `darts eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A training run directory (from `darts train` or `darts run`), or an ONNX file from `darts export` (run in
    /// tract on the test set of the dataset it was trained on).
    #[arg(long)]
    model: PathBuf,
    /// Which weights: last (after the last epoch) or best (the epoch of best accuracy on the held-out
    /// validation split; runs trained with --valid-portion only).
    #[arg(long, value_enum, default_value = "last")]
    which: run::Which,
    /// An ONNX file's test data: where the dataset is (when not found by itself; image folders always).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// An ONNX file's test data: only the first N test examples (as the training's --limit).
    #[arg(long)]
    limit: Option<usize>,
}

pub fn eval(a: EvalArgs, rt: &super::Runtime) -> Result<()> {
    let is_onnx = a.model.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"));
    if !is_onnx && (a.data_dir.is_some() || a.limit.is_some()) {
        anyhow::bail!(
            "--data-dir and --limit are for an ONNX file: a run directory evaluates on the data of its \
             train-config.json"
        );
    }
    let (device, dist) = if is_onnx {
        rt.single_process("eval of an ONNX file")?;
        rt.set_tract_threads();
        (tch::Device::Cpu, None)
    } else {
        rt.launch()?
    };
    let writes = dist.as_ref().is_none_or(|d| d.is_writer());
    let r = if is_onnx {
        darts::deploy::runtime::evaluate_onnx(&a.model, a.data_dir.as_deref(), a.limit)?
    } else {
        run::evaluate_model_in(&a.model, a.which, device, rt.layout, dist)?
    };
    if !writes {
        return Ok(());
    }
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

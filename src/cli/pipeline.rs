//! `darts run`: search -> derive -> train from scratch -> evaluate, in one run directory that can be
//! re-run to continue where it stopped.
use anyhow::Result;
use darts::data::DatasetKind;
use darts::genotype::Genotype;
use darts::run;
use darts::search::SearchConfig;
use darts::train::TrainConfig;
use std::path::PathBuf;

/// Starting configurations for the whole pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PipelinePreset {
    /// The paper: search C=16/8 cells/50 epochs, then train C=36/20 cells/600 epochs.
    Darts,
    /// Minutes on a laptop: the quick search preset, then C=16/8 cells for 3 epochs on the built-in data.
    Quick,
}

/// Arguments of `darts run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Starting configuration.
    #[arg(long, value_enum, default_value = "quick")]
    preset: PipelinePreset,
    /// Dataset for both stages.
    #[arg(long, value_enum)]
    dataset: Option<DatasetKind>,
    /// Dataset folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Use only the first N training (and test) examples in both stages.
    #[arg(long)]
    limit: Option<usize>,
    /// Search: initial channels.
    #[arg(long)]
    search_channels: Option<usize>,
    /// Search: cells.
    #[arg(long)]
    search_layers: Option<usize>,
    /// Search: intermediate nodes per cell.
    #[arg(long)]
    search_nodes: Option<usize>,
    /// Search epochs.
    #[arg(long)]
    search_epochs: Option<usize>,
    /// Training epochs.
    #[arg(long)]
    train_epochs: Option<usize>,
    /// Training: initial channels.
    #[arg(long)]
    train_channels: Option<usize>,
    /// Training: cells.
    #[arg(long)]
    train_layers: Option<usize>,
    /// Training: forward-pass arithmetic, fp32 or bf16 (mixed precision, for GPUs with bfloat16 units).
    #[arg(long, value_enum, default_value_t = darts::native::Precision::Fp32)]
    train_precision: darts::native::Precision,
    #[command(flatten)]
    collapse: super::search::CollapseArgs,
    /// Seed for both stages.
    #[arg(long, default_value_t = 2)]
    seed: u64,
    /// Run directory (search/, train/ and summary.json inside; default runs/run-<date>-<time>); running again continues it.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn configs(a: &RunArgs) -> (SearchConfig, Box<dyn Fn(Genotype) -> TrainConfig + '_>) {
    let mut s = match a.preset {
        PipelinePreset::Darts => SearchConfig::default(),
        PipelinePreset::Quick => SearchConfig::quick(),
    };
    if let Some(d) = a.dataset {
        s.dataset = d;
    }
    s.data_dir = a.data_dir.clone();
    if let Some(e) = a.search_epochs {
        s.epochs = e;
    }
    if a.limit.is_some() {
        s.limit = a.limit;
    }
    if let Some(c) = a.search_channels {
        s.space.channels = c;
    }
    if let Some(l) = a.search_layers {
        s.space.layers = l;
    }
    if let Some(n) = a.search_nodes {
        s.space.nodes = n;
    }
    a.collapse.apply(&mut s);
    s.seed = a.seed;
    let dataset = s.dataset;
    let train = move |g: Genotype| {
        let mut t = TrainConfig::darts(g);
        t.dataset = dataset;
        t.data_dir = a.data_dir.clone();
        t.seed = a.seed;
        t.limit = a.limit;
        if a.preset == PipelinePreset::Quick {
            t.network.channels = 16;
            t.network.layers = 8;
            t.epochs = 3;
            t.batch_size = 64;
        }
        if let Some(e) = a.train_epochs {
            t.epochs = e;
        }
        if let Some(c) = a.train_channels {
            t.network.channels = c;
        }
        if let Some(l) = a.train_layers {
            t.network.layers = l;
        }
        t.precision = a.train_precision;
        t
    };
    (s, Box::new(train))
}

pub fn run(a: RunArgs, rt: &super::Runtime) -> Result<()> {
    let device = rt.device()?;
    let (search_cfg, train_cfg) = configs(&a);
    search_cfg.validate()?;
    let root = a.out.clone().unwrap_or_else(|| run::default_dir("run"));
    eprintln!("run directory {}", root.display());
    let opts = |sub: &str| rt.options(root.join(sub), device);
    let t0 = std::time::Instant::now();
    let (genotype, _) = run::search_or_resume(search_cfg.clone(), &opts("search"))?;
    let search_seconds = t0.elapsed().as_secs_f64();
    eprintln!("derived genotype: {genotype}");
    let t1 = std::time::Instant::now();
    let out = run::train_or_resume(train_cfg(genotype.clone()), &opts("train"))?;
    let summary = serde_json::json!({
        "genotype": genotype.to_string(),
        "search_seconds_this_invocation": search_seconds,
        "train_seconds_this_invocation": t1.elapsed().as_secs_f64(),
        "test": out.last,
        "best_test_top1": out.best_acc,
        "finished": out.finished,
    });
    std::fs::write(root.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    run::write_report(&root);
    println!("{summary}");
    Ok(())
}

//! `darts run`: search -> derive -> train from scratch -> evaluate, in one run directory that can be
//! re-run to continue where it stopped.
use super::args::{DataArgs, SearchOnlyArgs, SearchStageArgs, TrainOnlyArgs, TrainStageArgs};
use anyhow::{Context, Result};
use darts::genotype::Genotype;
use darts::search::SearchConfig;
use darts::train::TrainConfig;
use darts::{run, rundir};
use std::path::PathBuf;

/// Starting configurations for the whole pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PipelinePreset {
    /// The paper: search C=16/8 cells/50 epochs, then train C=36/20 cells/600 epochs (recipe darts-cifar).
    Darts,
    /// Minutes on a laptop: the quick search preset, then C=16/8 cells for 3 epochs on the built-in data.
    Quick,
}

/// Arguments of `darts run`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Every search setting of `darts search` and training setting of `darts train` is here; the ones \
both stages have are prefixed --search-* and --train-*. All are checked before the search starts.\n\nExamples:\n  darts run --preset quick\n  darts run --preset darts --order second --dataset cifar10 --out runs/darts2\n  darts run --out runs/darts2   (the same command again continues the run)"
)]
pub struct RunArgs {
    /// Starting configuration.
    #[arg(long, value_enum, default_value = "quick")]
    preset: PipelinePreset,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    search_stage: SearchStageArgs,
    #[command(flatten)]
    search: SearchOnlyArgs,
    #[command(flatten)]
    train_stage: TrainStageArgs,
    #[command(flatten)]
    train: TrainOnlyArgs,
    /// Gradient checkpointing of the search's cells (same results, less memory).
    #[arg(long)]
    checkpoint_cells: bool,
    /// Also write a checkpoint after every N steps inside an epoch, in both stages.
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<usize>,
    /// Also write a checkpoint inside an epoch when M minutes have passed since the last one, in both stages.
    #[arg(long, value_name = "M")]
    checkpoint_minutes: Option<f64>,
    /// Seed for both stages.
    #[arg(long, default_value_t = 2)]
    seed: u64,
    /// Run directory (search/, train/ and summary.json inside; default runs/run-<date>-<time>); running the same
    /// command again continues it.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The search configuration, and the training configuration for a genotype, both validated.
fn configs(a: &RunArgs) -> Result<(SearchConfig, impl Fn(Genotype) -> Result<TrainConfig> + '_)> {
    let mut s = match a.preset {
        PipelinePreset::Darts => SearchConfig::default(),
        PipelinePreset::Quick => SearchConfig::quick(),
    };
    a.search.apply(&mut s)?;
    a.data.apply_search(&mut s);
    a.search_stage.stage().apply_search(&mut s);
    s.seed = a.seed;
    s.checkpoint_cells |= a.checkpoint_cells;
    s.validate().context("search settings")?;
    let (dataset, data_dir, limit, image_size) = (s.dataset, s.data_dir.clone(), s.limit, s.image_size);
    let train = move |g: Genotype| -> Result<TrainConfig> {
        let mut t = TrainConfig::from_recipe(a.train.recipe(), g);
        t.dataset = dataset;
        t.data_dir = data_dir.clone();
        t.limit = limit;
        t.image_size = image_size;
        t.seed = a.seed;
        if a.preset == PipelinePreset::Quick {
            t.network.channels = 16;
            t.network.layers = 8;
            t.epochs = 3;
            t.batch_size = 64;
        }
        a.train.apply(&mut t)?;
        a.train_stage.stage().apply_train(&mut t);
        t.validate_settings().context("training settings")?;
        Ok(t)
    };
    // The training settings are checked now, with a placeholder cell, so that a bad one fails before the search.
    let placeholder = darts::zoo::get("DARTS_V2").expect("DARTS_V2 is in the zoo");
    train(placeholder)?;
    Ok((s, train))
}

pub fn run(a: RunArgs, rt: &super::Runtime) -> Result<()> {
    let (device, dist) = rt.launch()?;
    let (search_cfg, train_cfg) = configs(&a)?;
    let root = super::run_dir(a.out.as_ref(), "run", dist.is_some())?;
    let writes = dist.as_ref().is_none_or(|d| d.is_writer());
    if writes {
        eprintln!("run directory {}", root.display());
    }
    // SIGTERM/SIGINT checkpoint where the stage is and stop (in a data-parallel run every rank at the same step);
    // the same command continues.
    let stop = Some(darts::interrupt::stop_on_signals()?);
    let opts = |sub: &str| darts::run::RunOptions {
        dist: dist.clone(),
        stop: stop.clone(),
        checkpoint_every: a.checkpoint_every,
        checkpoint_minutes: a.checkpoint_minutes,
        ..rt.options(root.join(sub), device)
    };
    let (search_dir, train_dir) = (root.join(rundir::SEARCH_STAGE), root.join(rundir::TRAIN_STAGE));
    let t0 = std::time::Instant::now();
    let (genotype, _) = run::search_or_resume(search_cfg.clone(), &opts(rundir::SEARCH_STAGE))?;
    if writes {
        super::write_report(&search_dir);
    }
    let search_seconds = t0.elapsed().as_secs_f64();
    if writes {
        eprintln!("derived genotype: {genotype}");
    }
    let t1 = std::time::Instant::now();
    let train = train_cfg(genotype.clone())?;
    train.validate()?;
    let out = run::train_or_resume(train, &opts(rundir::TRAIN_STAGE))?;
    if !writes {
        return Ok(());
    }
    super::write_report(&train_dir);
    let summary = serde_json::json!({
        "genotype": genotype.to_string(),
        "search_seconds_this_invocation": search_seconds,
        "train_seconds_this_invocation": t1.elapsed().as_secs_f64(),
        "test": out.last,
        "test_of": "the last epoch's weights (the test set is never used to choose)",
        "best_on_validation": out.best,
        "finished": out.finished,
    });
    rundir::write_json(&root.join(rundir::SUMMARY), &summary)?;
    super::write_report(&root);
    println!("{summary}");
    Ok(())
}

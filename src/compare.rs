//! DARTS against random search and RL on the same space, data and evaluation: DARTS searches; random search and
//! REINFORCE sample, train and score cells (by default for as many seconds as the DARTS search took); then every
//! method's cell is trained from scratch with the same settings and tested on the same test set. The table says
//! what each method cost and what its cell scores.
//!
//! Directory layout: `darts/` (the search), `random/`, `rl/` (the baselines), `train-darts/`, `train-random/`,
//! `train-rl/`, and `compare.json` / `compare.md`. Every stage resumes from its own directory, so an interrupted
//! comparison continues where it stopped.

use crate::baseline::{self, BaselineConfig, Strategy};
use crate::genotype::Genotype;
use crate::run::{self, RunOptions};
use crate::rundir::{self, CompareOutcome, Method, MethodResult};
use crate::search::SearchConfig;
use crate::train::TrainConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What to compare, and how.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompareConfig {
    /// The DARTS search.
    pub search: SearchConfig,
    /// The baselines' settings (their strategy is set per method).
    pub baseline: BaselineConfig,
    /// Give each baseline the DARTS search's seconds as its budget (else it runs all its samples).
    pub equal_budget: bool,
    /// How every method's cell is trained from scratch and tested (its genotype is replaced per method).
    pub train: TrainConfig,
}

impl CompareConfig {
    /// The quick comparison: DARTS's quick search (built-in data, 800 images), the baselines on the same 800
    /// images with DARTS's search time as their budget, and each cell trained as `darts run --preset quick` does
    /// (16 channels, 8 cells, 3 epochs on the 6,000 built-in training images, tested on the 1,000 test images).
    pub fn quick() -> CompareConfig {
        let search = SearchConfig::quick();
        let mut baseline = BaselineConfig::quick(Strategy::Random);
        baseline.samples = 1000;
        baseline.dataset = search.dataset;
        baseline.limit = search.limit;
        baseline.space = search.space.clone();
        baseline.seed = search.seed;
        let mut train = TrainConfig::darts(crate::zoo::get("DARTS_V2").expect("DARTS_V2 is in the zoo"));
        train.dataset = search.dataset;
        train.network.channels = 16;
        train.network.layers = 8;
        train.epochs = 3;
        train.batch_size = 64;
        train.seed = search.seed;
        CompareConfig { search, baseline, equal_budget: true, train }
    }
}

fn train_and_test(
    name: &str,
    genotype: &Genotype,
    cfg: &CompareConfig,
    root: &Path,
    base: &RunOptions,
) -> Result<(i64, f64, f64)> {
    let opts = RunOptions { out_dir: root.join(format!("train-{name}")), ..base.clone() };
    let train = TrainConfig { genotype: genotype.clone(), ..cfg.train.clone() };
    let out = run::train_or_resume(train, &opts)?;
    let parameters = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(opts.out_dir.join(rundir::NETWORK)).unwrap_or_default(),
    )
    .ok()
    .and_then(|v| v["parameters"].as_i64())
    .unwrap_or(0);
    Ok((parameters, out.last.top1, rundir::metrics_seconds(&opts.out_dir)))
}

/// The run directories of a comparison's stages in `root` that exist: the searches, then the trainings.
pub fn stage_dirs(root: &Path) -> Vec<std::path::PathBuf> {
    let names = [Method::Darts, Method::Random, Method::Rl].map(Method::name);
    let stages = names.iter().map(|n| n.to_string()).chain(names.iter().map(|n| format!("train-{n}")));
    stages.map(|s| root.join(s)).filter(|d| d.is_dir()).collect()
}

/// Runs (or continues) the comparison in `root`.
pub fn compare(cfg: &CompareConfig, root: &Path, base: &RunOptions) -> Result<CompareOutcome> {
    std::fs::create_dir_all(root)?;
    rundir::write_json(&root.join(rundir::COMPARE_CONFIG), cfg)?;
    let sub = |name: &str| RunOptions { out_dir: root.join(name), ..base.clone() };
    let mut methods = Vec::new();

    eprintln!("== DARTS search");
    let (genotype, _) = run::search_or_resume(cfg.search.clone(), &sub("darts"))?;
    let darts_seconds = rundir::metrics_seconds(&root.join("darts"));
    let (parameters, test_top1, train_seconds) = train_and_test("darts", &genotype, cfg, root, base)?;
    methods.push(MethodResult {
        method: Method::Darts,
        search_seconds: darts_seconds,
        architectures_trained: 1,
        genotype: genotype.clone(),
        parameters,
        test_top1,
        train_seconds,
    });

    for strategy in [Strategy::Random, Strategy::Rl] {
        let name = strategy.name();
        eprintln!("== {name} search");
        let mut b = BaselineConfig { strategy, ..cfg.baseline.clone() };
        if cfg.equal_budget {
            b.budget_seconds = Some(darts_seconds);
        }
        let opts = sub(name);
        let out = if opts.out_dir.join(rundir::BASELINE_STATE).is_file() {
            baseline::resume(&opts)?
        } else {
            baseline::start(b, &opts)?
        };
        let (parameters, test_top1, train_seconds) = train_and_test(name, &out.best, cfg, root, base)?;
        methods.push(MethodResult {
            method: match strategy {
                Strategy::Random => Method::Random,
                Strategy::Rl => Method::Rl,
            },
            search_seconds: out.samples.last().map_or(0.0, |s| s.total_seconds),
            architectures_trained: out.samples.len(),
            genotype: out.best.clone(),
            parameters,
            test_top1,
            train_seconds,
        });
    }
    let outcome = CompareOutcome { methods, device: format!("{:?}", base.device) };
    rundir::write_json(&root.join(rundir::COMPARE), &outcome)?;
    rundir::write_atomically(&root.join(rundir::COMPARE_TABLE), table(&outcome).as_bytes())?;
    Ok(outcome)
}

/// The comparison as a Markdown table.
pub fn table(o: &CompareOutcome) -> String {
    let mut s = String::from(
        "| method | search seconds | architectures trained | final-network parameters | test top-1 | training seconds |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for m in &o.methods {
        s.push_str(&format!(
            "| {} | {:.0} | {} | {} | {:.2}% | {:.0} |\n",
            m.method,
            m.search_seconds,
            m.architectures_trained,
            m.parameters,
            100.0 * m.test_top1,
            m.train_seconds
        ));
    }
    s.push_str(
        "\nWhich split chose what: DARTS's cell by alpha on the training set's alpha half; the baselines' cells by \
         their scores on a split of the training set; test top-1 is each cell's last training epoch on the test set, \
         which chose nothing.\n",
    );
    s
}

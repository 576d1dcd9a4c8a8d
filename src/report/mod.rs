//! The run report: one self-contained HTML page per run directory (search, training, a `darts run` pipeline
//! with both, a random/RL baseline, or a `darts compare` root), with the configuration, the genotype and its
//! cell diagrams, softmax(alpha) heat maps and their evolution, learning curves, parameter and MAC counts,
//! timings and the final test accuracy; a baseline's sample scores; a comparison's table and every method's cell.
//! Every figure is also written to `figures/` as SVG and PNG (cells also as DOT).
use crate::genotype::Genotype;
use crate::network::NetworkCost;
use crate::rundir::{self, read_json, read_records, EpochStats, TrainStats};
use crate::search::SearchConfig;
use crate::train::TrainConfig;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

mod figures;
mod html;

pub use figures::write_cell_figures;

/// A search run directory's contents.
pub struct SearchRun {
    /// The directory.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: SearchConfig,
    /// `metrics.jsonl`, one entry per finished epoch.
    pub epochs: Vec<EpochStats>,
    /// `genotype.json` when the search finished, else the genotype derived after the last epoch.
    pub genotype: Option<Genotype>,
}

/// A training run directory's contents.
pub struct TrainRun {
    /// The directory.
    pub dir: PathBuf,
    /// `train-config.json`.
    pub config: TrainConfig,
    /// `metrics.jsonl`, one entry per finished epoch.
    pub epochs: Vec<TrainStats>,
    /// `network.json` (parameters and MACs), when present.
    pub cost: Option<NetworkCost>,
}

impl SearchRun {
    /// Reads a search run directory (`config.json`, `metrics.jsonl`, `genotype.json`).
    pub fn load(dir: &Path) -> Result<SearchRun> {
        let config: SearchConfig = read_json(&dir.join(rundir::CONFIG))?;
        let epochs: Vec<EpochStats> = read_records(&dir.join(rundir::METRICS))?;
        let genotype = match rundir::read_genotype(dir)? {
            Some(g) => Some(g),
            None => epochs.last().map(|e| e.genotype.clone()),
        };
        Ok(SearchRun { dir: dir.to_path_buf(), config, epochs, genotype })
    }

    /// All epochs done, or stopped early (a genotype was written before the last epoch).
    pub fn finished(&self) -> bool {
        self.epochs.len() >= self.config.epochs || self.stopped_early()
    }

    /// Ended by the early stop against skip-connection collapse.
    pub fn stopped_early(&self) -> bool {
        self.epochs.len() < self.config.epochs && self.dir.join(rundir::GENOTYPE_JSON).is_file()
    }
}

impl TrainRun {
    /// Reads a training run directory (`train-config.json`, `metrics.jsonl`, `network.json`).
    pub fn load(dir: &Path) -> Result<TrainRun> {
        let config: TrainConfig = read_json(&dir.join(rundir::TRAIN_CONFIG))?;
        let epochs = read_records(&dir.join(rundir::METRICS))?;
        let cost_file = dir.join(rundir::NETWORK);
        let cost = if cost_file.is_file() { Some(read_json(&cost_file)?) } else { None };
        Ok(TrainRun { dir: dir.to_path_buf(), config, epochs, cost })
    }

    /// All epochs done.
    pub fn finished(&self) -> bool {
        self.epochs.len() >= self.config.epochs
    }
}

/// A baseline (random search or RL) run directory's contents.
pub struct BaselineRun {
    /// `baseline-config.json`.
    pub config: crate::baseline::BaselineConfig,
    /// `samples.jsonl`.
    pub samples: Vec<crate::rundir::SampleRecord>,
    /// `genotype.json` when it finished.
    pub genotype: Option<Genotype>,
}

/// What a report covers: a search, a training, or both (a `darts run` directory); a baseline; a comparison.
pub struct RunDir {
    /// The directory the report goes into.
    pub dir: PathBuf,
    /// The search, if any.
    pub search: Option<SearchRun>,
    /// The training, if any.
    pub train: Option<TrainRun>,
    /// The baseline search, if any.
    pub baseline: Option<BaselineRun>,
    /// The comparison (`compare.json`), if any.
    pub comparison: Option<crate::rundir::CompareOutcome>,
}

impl RunDir {
    /// Recognises a search directory (`config.json`), a training directory (`train-config.json`) or a
    /// pipeline directory (`search/` and/or `train/` inside).
    pub fn load(dir: &Path) -> Result<RunDir> {
        if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        for d in [dir.to_path_buf(), dir.join(rundir::SEARCH_STAGE), dir.join(rundir::TRAIN_STAGE)] {
            rundir::check_format(&d)?;
        }
        let (mut search, mut train, mut baseline, mut comparison) = (None, None, None, None);
        if dir.join(rundir::COMPARE).is_file() {
            comparison = Some(read_json(&dir.join(rundir::COMPARE))?);
        } else if dir.join(rundir::BASELINE_CONFIG).is_file() {
            let config = read_json(&dir.join(rundir::BASELINE_CONFIG))?;
            let samples = rundir::read_records(&dir.join(rundir::SAMPLES))?;
            let genotype = rundir::read_genotype(dir)?;
            baseline = Some(BaselineRun { config, samples, genotype });
        } else if dir.join(rundir::CONFIG).is_file() {
            search = Some(SearchRun::load(dir)?);
        } else if dir.join(rundir::TRAIN_CONFIG).is_file() {
            train = Some(TrainRun::load(dir)?);
        } else {
            if dir.join(rundir::SEARCH_STAGE).join(rundir::CONFIG).is_file() {
                search = Some(SearchRun::load(&dir.join(rundir::SEARCH_STAGE))?);
            }
            if dir.join(rundir::TRAIN_STAGE).join(rundir::TRAIN_CONFIG).is_file() {
                train = Some(TrainRun::load(&dir.join(rundir::TRAIN_STAGE))?);
            }
        }
        if search.is_none() && train.is_none() && baseline.is_none() && comparison.is_none() {
            bail!(
                "{} is not a darts run directory: it has no config.json (search), train-config.json (training), \
                 baseline-config.json (baseline), compare.json (comparison), nor search/ or train/ folders with them \
                 (darts run)",
                dir.display()
            );
        }
        Ok(RunDir { dir: dir.to_path_buf(), search, train, baseline, comparison })
    }

    /// The genotype the report shows: the trained one, else the searched one, else the baseline's best.
    pub fn genotype(&self) -> Option<&Genotype> {
        self.train
            .as_ref()
            .map(|t| &t.config.genotype)
            .or(self.search.as_ref().and_then(|s| s.genotype.as_ref()))
            .or(self.baseline.as_ref().and_then(|b| b.genotype.as_ref()))
    }
}

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Writes `figures/` and `report.html` for the run directory `dir`; returns the report's path.
pub fn write_report(dir: &Path) -> Result<PathBuf> {
    let run = RunDir::load(dir)?;
    let figs = figures::write_all(&run, &dir.join(rundir::FIGURES))?;
    let html = html::render_html(&run, &figs)?;
    let path = dir.join(rundir::REPORT);
    rundir::write_atomically(&path, html.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_that_is_not_a_run_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_report(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a darts run directory"), "{err}");
    }
}

//! The run report: one self-contained HTML page per run directory (search, training, a `darts run` pipeline
//! with both, a random/RL baseline, or a `darts compare` root), with the configuration, the genotype and its
//! cell diagrams, softmax(alpha) heat maps and their evolution, learning curves, parameter and MAC counts,
//! timings and the final test accuracy; a baseline's sample scores; a comparison's table and every method's cell.
//! Every figure is also written to `figures/` as SVG and PNG (cells also as DOT).
use crate::genotype::Genotype;
use crate::network::NetworkCost;
use crate::search::{EpochStats, SearchConfig};
use crate::train::{TrainConfig, TrainStats};
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
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

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid darts file", path.display()))
}

fn read_metrics<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {} is not a metrics line", path.display(), i + 1))
        })
        .collect()
}

impl SearchRun {
    /// Reads a search run directory (`config.json`, `metrics.jsonl`, `genotype.json`).
    pub fn load(dir: &Path) -> Result<SearchRun> {
        let config: SearchConfig = read_json(&dir.join("config.json"))?;
        let epochs: Vec<EpochStats> = read_metrics(&dir.join("metrics.jsonl"))?;
        let file = dir.join("genotype.json");
        let genotype = if file.is_file() {
            Some(
                Genotype::from_json(&std::fs::read_to_string(&file)?)
                    .with_context(|| format!("in {}", file.display()))?,
            )
        } else {
            epochs.last().map(|e| Genotype::parse(&e.genotype)).transpose()?
        };
        Ok(SearchRun { dir: dir.to_path_buf(), config, epochs, genotype })
    }

    /// All epochs done, or stopped early (a genotype was written before the last epoch).
    pub fn finished(&self) -> bool {
        self.epochs.len() >= self.config.epochs || self.stopped_early()
    }

    /// Ended by the early stop against skip-connection collapse.
    pub fn stopped_early(&self) -> bool {
        self.epochs.len() < self.config.epochs && self.dir.join("genotype.json").is_file()
    }
}

impl TrainRun {
    /// Reads a training run directory (`train-config.json`, `metrics.jsonl`, `network.json`).
    pub fn load(dir: &Path) -> Result<TrainRun> {
        let config: TrainConfig = read_json(&dir.join("train-config.json"))?;
        let epochs = read_metrics(&dir.join("metrics.jsonl"))?;
        let cost_file = dir.join("network.json");
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
    pub samples: Vec<crate::baseline::SampleRecord>,
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
    pub comparison: Option<crate::compare::CompareOutcome>,
}

impl RunDir {
    /// Recognises a search directory (`config.json`), a training directory (`train-config.json`) or a
    /// pipeline directory (`search/` and/or `train/` inside).
    pub fn load(dir: &Path) -> Result<RunDir> {
        if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        let (mut search, mut train, mut baseline, mut comparison) = (None, None, None, None);
        if dir.join("compare.json").is_file() {
            comparison = Some(read_json(&dir.join("compare.json"))?);
        } else if dir.join("baseline-config.json").is_file() {
            let (config, samples) = crate::baseline::load_run(dir)?;
            let file = dir.join("genotype.json");
            let genotype =
                if file.is_file() { Some(Genotype::from_json(&std::fs::read_to_string(&file)?)?) } else { None };
            baseline = Some(BaselineRun { config, samples, genotype });
        } else if dir.join("config.json").is_file() {
            search = Some(SearchRun::load(dir)?);
        } else if dir.join("train-config.json").is_file() {
            train = Some(TrainRun::load(dir)?);
        } else {
            if dir.join("search/config.json").is_file() {
                search = Some(SearchRun::load(&dir.join("search"))?);
            }
            if dir.join("train/train-config.json").is_file() {
                train = Some(TrainRun::load(&dir.join("train"))?);
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
    let fig_dir = dir.join("figures");
    let figs = figures::write_all(&run, &fig_dir)?;
    let html = html::render_html(&run, &figs)?;
    let path = dir.join("report.html");
    let tmp = dir.join("report.html.tmp");
    std::fs::write(&tmp, html).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)?;
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

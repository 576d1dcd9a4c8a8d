//! The run directory's format, its one owner: every file name, how each file is written (atomically: a
//! temporary file renamed over the old one) and read back, and the typed records (one JSON line per epoch or
//! sample) that the drivers write and the report reads.
//!
//! | file | written by | what |
//! |---|---|---|
//! | `config.json` | search | the search's `SearchConfig` |
//! | `train-config.json` | training | the training's `TrainConfig` |
//! | `baseline-config.json`, `baseline-state.json` | baseline | its configuration; its state after every sample |
//! | `metrics.jsonl` | search, training | an [`EpochStats`] or [`TrainStats`] line per epoch |
//! | `samples.jsonl` | baseline | a [`SampleRecord`] line per sample |
//! | `checkpoint.safetensors` | search, training | everything a resume needs, after every epoch |
//! | `genotype.json`, `genotype.txt` | search, training, baseline | the cell, as JSON and DARTS Python text |
//! | `model-last.safetensors`, `model-best.safetensors` | training | the weights, as the original state_dict |
//! | `network.json` | training | parameter and multiply-accumulate counts |
//! | `summary.json` | `darts run` | the pipeline's outcome |
//! | `compare-config.json`, `compare.json`, `compare.md` | `darts compare` | its settings and [`CompareOutcome`] |
//! | `report.html`, `figures/` | the commands, through `report` | the report |

use crate::genotype::Genotype;
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

mod records;

pub use records::{decision, Best, CompareOutcome, EpochStats, Method, MethodResult, SampleRecord, TrainStats};

/// A search's settings.
pub const CONFIG: &str = "config.json";
/// A training's settings.
pub const TRAIN_CONFIG: &str = "train-config.json";
/// A baseline's settings.
pub const BASELINE_CONFIG: &str = "baseline-config.json";
/// A baseline's state after its last sample.
pub const BASELINE_STATE: &str = "baseline-state.json";
/// A comparison's settings.
pub const COMPARE_CONFIG: &str = "compare-config.json";
/// A comparison's outcome.
pub const COMPARE: &str = "compare.json";
/// A comparison's table.
pub const COMPARE_TABLE: &str = "compare.md";
/// One record per finished epoch.
pub const METRICS: &str = "metrics.jsonl";
/// One record per evaluated sample.
pub const SAMPLES: &str = "samples.jsonl";
/// The state a search or training resumes from.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// The cell as JSON.
pub const GENOTYPE_JSON: &str = "genotype.json";
/// The cell as DARTS Python text.
pub const GENOTYPE_TXT: &str = "genotype.txt";
/// The weights after the last epoch.
pub const MODEL_LAST: &str = "model-last.safetensors";
/// The weights of the epoch of best validation accuracy.
pub const MODEL_BEST: &str = "model-best.safetensors";
/// The model card of a training run (input, normalisation, class names: what a deployer needs).
pub const MODEL_CARD: &str = "model-card.json";

/// The training run directory of `dir`: `dir` itself when it holds a training, else the training stage of a
/// `darts run` directory (`dir/train`); `dir` unchanged when neither (the caller's error names it).
pub fn training_dir(dir: &Path) -> PathBuf {
    let stage = dir.join(TRAIN_STAGE);
    if !dir.join(TRAIN_CONFIG).is_file() && stage.join(TRAIN_CONFIG).is_file() {
        stage
    } else {
        dir.to_path_buf()
    }
}

/// Which trained weights of a training run directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The weights after the last epoch run (what the original reports).
    #[default]
    Last,
    /// The epoch of best accuracy on the held-out validation split (runs with `--valid-portion` only).
    Best,
}

impl Which {
    /// The weights' file name in a run directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Which::Last => MODEL_LAST,
            Which::Best => MODEL_BEST,
        }
    }
}
/// Parameter and MAC counts of a trained network.
pub const NETWORK: &str = "network.json";
/// A pipeline's outcome.
pub const SUMMARY: &str = "summary.json";
/// The report.
pub const REPORT: &str = "report.html";
/// The report's pictures.
pub const FIGURES: &str = "figures";
/// The format marker: which darts wrote the directory, in which format.
pub const FORMAT_FILE: &str = "darts-run.json";
/// The format this darts writes: 1 has typed genotypes in its records (earlier directories, without a marker,
/// hold DARTS Python text there, and load too).
pub const FORMAT: u32 = 1;
/// The lock a running process holds on its run directory.
pub const LOCK: &str = "darts.lock";
/// A pipeline's search stage.
pub const SEARCH_STAGE: &str = "search";
/// A pipeline's training stage.
pub const TRAIN_STAGE: &str = "train";

/// A fresh run directory name under `runs/`: `runs/<kind>-YYYYMMDD-HHMMSS` (UTC).
pub fn default_dir(kind: &str) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    PathBuf::from(format!("runs/{kind}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60))
}

/// Creates `dir` for a new `kind` of run, refusing a directory that already holds one (its `marker` file, the
/// state a resume reads, is there), and writes the format marker.
pub fn create(dir: &Path, kind: &str, marker: &str) -> Result<()> {
    if dir.join(marker).exists() {
        bail!("{} already holds a {kind}; continue it with --resume {0}, or choose another --out", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let marker = serde_json::json!({ "format": FORMAT, "kind": kind, "darts": env!("CARGO_PKG_VERSION") });
    write_json(&dir.join(FORMAT_FILE), &marker)
}

/// Checks that this darts can read the run directory `dir`: one without a marker is from before markers (and
/// loads); one written in a newer format is refused with a message saying so.
pub fn check_format(dir: &Path) -> Result<()> {
    let path = dir.join(FORMAT_FILE);
    if !path.is_file() {
        return Ok(());
    }
    let marker: serde_json::Value = read_json(&path)?;
    let format = marker["format"].as_u64().with_context(|| format!("{} has no format number", path.display()))?;
    if format > u64::from(FORMAT) {
        bail!(
            "{} was written by darts {} in run-directory format {format}; this darts ({}) reads formats up to \
             {FORMAT}: use a newer darts for it",
            dir.display(),
            marker["darts"].as_str().unwrap_or("(unknown)"),
            env!("CARGO_PKG_VERSION")
        );
    }
    Ok(())
}

/// An advisory lock on a run directory, held while a process runs it: a second process is refused, naming the
/// holder. The operating system releases it when the process ends, however it ends (a kill -9 leaves no stale
/// lock).
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Locks `dir` (which must exist) for this process, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        use std::io::{Read, Seek};
        let path = dir.join(LOCK);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let h: serde_json::Value = serde_json::from_str(&holder).unwrap_or_default();
                bail!(
                    "{} is in use: darts process {} on {} has been running it since {} (unix time). Wait for it to \
                     finish or stop it; two processes must not write one run",
                    dir.display(),
                    h["pid"],
                    h["host"].as_str().unwrap_or("?"),
                    h["since"]
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let holder = serde_json::json!({ "pid": std::process::id(), "host": host.trim(), "since": since });
        file.set_len(0)?;
        file.rewind()?;
        serde_json::to_writer(&mut file, &holder)?;
        // Temporary files of a process that died while writing: the files they were to replace are intact.
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(RunLock { _file: file })
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, renamed over it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary(path);
    let written = std::fs::write(&tmp, bytes)
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display())));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(crate::params::explain_write_failure(e, path));
    }
    Ok(())
}

fn temporary(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    write_atomically(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// Reads the JSON file `path` as a `T`, saying which file is missing or malformed.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid darts file", path.display()))
}

/// Appends one record as a JSON line to `path`.
pub fn append_record<T: Serialize>(path: &Path, record: &T) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(record)?).with_context(|| format!("writing {}", path.display()))
}

/// The records of the JSON-lines file `path` (none when there is no such file).
pub fn read_records<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {} is not a darts record", path.display(), i + 1))
        })
        .collect()
}

/// Keeps the first `n` lines of the JSON-lines file `path` (records past the state a resume starts from, written
/// before an interruption, are dropped: that epoch or sample runs again).
pub fn keep_records(path: &Path, n: usize) -> Result<()> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let kept: String = text.lines().filter(|l| !l.trim().is_empty()).take(n).map(|l| format!("{l}\n")).collect();
        write_atomically(path, kept.as_bytes())?;
    }
    Ok(())
}

/// Writes `genotype.json` and `genotype.txt` (DARTS Python text) into `dir`.
pub fn write_genotype(dir: &Path, g: &Genotype) -> Result<()> {
    write_atomically(&dir.join(GENOTYPE_JSON), (g.to_json() + "\n").as_bytes())?;
    write_atomically(&dir.join(GENOTYPE_TXT), (g.to_string() + "\n").as_bytes())
}

/// The genotype in `dir/genotype.json`, if the file is there.
pub fn read_genotype(dir: &Path) -> Result<Option<Genotype>> {
    let file = dir.join(GENOTYPE_JSON);
    if !file.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok(Some(Genotype::from_json(&text).with_context(|| format!("in {}", file.display()))?))
}

/// The one genotype resolver of every command: a zoo name, a file (JSON or DARTS Python text), a run directory
/// (its `genotype.json`, or that of its `train/` or `search/` stage), or the text itself.
pub fn resolve_genotype(arg: &str) -> Result<Genotype> {
    if let Some(g) = crate::zoo::get(arg) {
        return Ok(g);
    }
    let mut path = std::path::PathBuf::from(arg);
    if path.is_dir() {
        // A run directory: a search's genotype, or the one a training or `darts run` trained.
        let found =
            [path.clone(), path.join(TRAIN_STAGE), path.join(SEARCH_STAGE)].into_iter().map(|d| d.join(GENOTYPE_JSON));
        path = found.into_iter().find(|p| p.is_file()).with_context(|| {
            format!("{arg} is a directory without a genotype.json (a search that has not finished yet?)")
        })?;
    }
    if path.is_file() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        return Genotype::parse(text.trim()).with_context(|| format!("in {}", path.display()));
    }
    let t = arg.trim_start();
    if t.starts_with("Genotype") || t.starts_with('{') {
        return Ok(Genotype::parse(arg.trim())?);
    }
    bail!(
        "'{arg}' is neither a zoo name ({}), a file, a run directory, nor a genotype text",
        crate::zoo::names().join(", ")
    )
}

/// Seconds a search or training run directory's epochs took, from its `metrics.jsonl` (all invocations).
pub fn metrics_seconds(dir: &Path) -> f64 {
    read_records::<serde_json::Value>(&dir.join(METRICS))
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v["seconds"].as_f64())
        .sum()
}

pub use crate::params::write_tensors_atomically;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_takes_names_text_and_files_and_explains_failure() {
        let v2 = crate::zoo::get("DARTS_V2").unwrap();
        assert_eq!(resolve_genotype("DARTS_V2").unwrap(), v2);
        assert_eq!(resolve_genotype(&v2.to_string()).unwrap(), v2);
        let dir = std::env::temp_dir().join(format!("darts-zoo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("g.json");
        std::fs::write(&f, v2.to_json()).unwrap();
        assert_eq!(resolve_genotype(f.to_str().unwrap()).unwrap(), v2);
        // A run directory: its own genotype.json, or its training's.
        let run = dir.join("run");
        std::fs::create_dir_all(run.join(TRAIN_STAGE)).unwrap();
        let e = resolve_genotype(run.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("without a genotype.json"), "{e}");
        write_genotype(&run.join(TRAIN_STAGE), &v2).unwrap();
        assert_eq!(resolve_genotype(run.to_str().unwrap()).unwrap(), v2);
        let e = resolve_genotype("DARTS_V9").unwrap_err().to_string();
        assert!(e.contains("zoo name") && e.contains("DARTS_V2"), "{e}");
    }

    #[test]
    fn default_dir_has_a_plausible_utc_timestamp() {
        let d = default_dir("search").display().to_string();
        assert!(d.starts_with("runs/search-20"), "{d}");
        let stamp = &d["runs/search-".len()..];
        assert_eq!(stamp.len(), 15);
        let month: u32 = stamp[4..6].parse().unwrap();
        let day: u32 = stamp[6..8].parse().unwrap();
        assert!((1..=12).contains(&month) && (1..=31).contains(&day), "{d}");
    }

    /// A full disk (the temporary file pointing at /dev/full, which answers every write with ENOSPC): the
    /// previous file is intact, no temporary remains, and the message says what to free.
    #[test]
    fn a_full_disk_leaves_the_previous_file_and_says_what_to_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        let tensors = vec![("w".to_string(), tch::Tensor::from_slice(&[1.0f32, 2.0]))];
        write_tensors_atomically(&tensors, &path).unwrap();
        let before = std::fs::read(&path).unwrap();
        for (file, bytes) in [(&path, None), (&dir.path().join("config.json"), Some(b"{}".as_slice()))] {
            if let Some(b) = bytes {
                std::fs::write(file, b).unwrap();
            }
            let tmp = temporary(file);
            std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
            let e = match bytes {
                None => write_tensors_atomically(&tensors, file).unwrap_err(),
                Some(_) => write_atomically(file, &vec![b'x'; 1 << 16]).unwrap_err(),
            };
            let e = format!("{e:#}");
            assert!(e.contains("is full") && e.contains("free space") && e.contains("intact"), "{e}");
            assert!(!tmp.exists() && std::fs::symlink_metadata(&tmp).is_err(), "the temporary remains");
        }
        assert_eq!(std::fs::read(&path).unwrap(), before, "the previous checkpoint changed");
        assert_eq!(std::fs::read(dir.path().join("config.json")).unwrap(), b"{}");
    }

    #[test]
    fn a_run_directory_is_locked_by_one_process_and_stale_temporaries_go() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkpoint.safetensors.tmp"), "half").unwrap();
        let held = RunLock::acquire(dir.path()).unwrap();
        assert!(!dir.path().join("checkpoint.safetensors.tmp").exists());
        let e = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is in use") && e.contains(&std::process::id().to_string()), "{e}");
        drop(held);
        RunLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn records_append_read_back_and_are_cut_to_the_resumed_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS);
        assert!(read_records::<serde_json::Value>(&path).unwrap().is_empty());
        for i in 0..3 {
            append_record(&path, &serde_json::json!({ "epoch": i })).unwrap();
        }
        keep_records(&path, 2).unwrap();
        let back: Vec<serde_json::Value> = read_records(&path).unwrap();
        assert_eq!(back, vec![serde_json::json!({"epoch": 0}), serde_json::json!({"epoch": 1})]);
        std::fs::write(&path, "{\"epoch\": 0}\nnot json\n").unwrap();
        let e = read_records::<serde_json::Value>(&path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(!dir.path().join("metrics.jsonl.tmp").exists());
        create(dir.path(), "search", METRICS).unwrap_err();
        let new = dir.path().join("new");
        create(&new, "search", METRICS).unwrap();
        check_format(&new).unwrap();
        check_format(dir.path()).unwrap();
        write_json(&new.join(FORMAT_FILE), &serde_json::json!({"format": FORMAT + 1, "darts": "9.0.0"})).unwrap();
        let e = check_format(&new).unwrap_err().to_string();
        assert!(e.contains("darts 9.0.0") && e.contains("newer darts"), "{e}");
    }
}

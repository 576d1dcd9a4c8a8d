//! The run report: one self-contained HTML page per run directory (search, training, a `darts run` pipeline
//! with both, a random/RL baseline, or a `darts compare` root), with the configuration, the genotype and its
//! cell diagrams, softmax(alpha) heat maps and their evolution, learning curves, parameter and MAC counts,
//! timings and the final test accuracy; a baseline's sample scores; a comparison's table and every method's cell.
//! Every figure is also written to `figures/` as SVG and PNG (cells also as DOT).
use crate::genotype::Genotype;
use crate::network::NetworkCost;
use crate::search::{EpochStats, SearchConfig};
use crate::train::{TrainConfig, TrainStats};
use crate::viz::cell::{cell_dot, edge_labels, CellKind};
use crate::viz::plot::{alpha_evolution, alpha_heatmap, curves, Panel, Series};
use crate::viz::{dot_to_svg, write_svg_png};
use anyhow::{bail, Context, Result};
use base64::Engine;
use serde::de::DeserializeOwned;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

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

struct Figure {
    stem: String,
    caption: String,
    svg: String,
    dot: bool,
}

/// Writes each cell's DOT, SVG and PNG into `dir` as `{prefix}normal.*` and `{prefix}reduce.*`; returns the
/// SVG texts (normal, reduce).
pub fn write_cell_figures(dir: &Path, g: &Genotype, prefix: &str) -> Result<[String; 2]> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = [String::new(), String::new()];
    for (slot, kind) in out.iter_mut().zip(CellKind::both()) {
        let dot = cell_dot(g, kind);
        let stem = format!("{prefix}{}", kind.name());
        std::fs::write(dir.join(format!("{stem}.dot")), &dot)?;
        *slot = write_svg_png(dir, &stem, dot_to_svg(&dot)?)?;
    }
    Ok(out)
}

/// (alpha row, op column) of each edge a genotype keeps, for framing in the heat map.
fn kept_cells(cell: &[(crate::space::OpKind, usize)], ops: &[crate::space::OpKind]) -> Vec<(usize, usize)> {
    cell.iter()
        .enumerate()
        .filter_map(|(k, (op, j))| ops.iter().position(|o| o == op).map(|c| (crate::genotype::edge_row(k / 2, *j), c)))
        .collect()
}

fn search_figures(s: &SearchRun, figs: &mut Vec<Figure>) -> Result<()> {
    let Some(last) = s.epochs.last() else { return Ok(()) };
    let ops: Vec<String> = s.config.space.ops.iter().map(|o| o.name().to_string()).collect();
    let edges = edge_labels(s.config.space.nodes);
    let derived = Genotype::parse(&last.genotype)?;
    for (kind, w, cell, betas) in [
        (CellKind::Normal, &last.alpha_normal, &derived.normal, &last.beta_normal),
        (CellKind::Reduce, &last.alpha_reduce, &derived.reduce, &last.beta_reduce),
    ] {
        let title = format!("softmax(alpha), {} cell, after epoch {}", kind.name(), last.epoch + 1);
        let kept = kept_cells(cell, &s.config.space.ops);
        let svg = alpha_heatmap(&title, w, &ops, &edges, &kept, betas.as_deref())?;
        figs.push(Figure {
            stem: format!("alpha-{}", kind.name()),
            caption: format!(
                "Architecture weights of the {} cell at the end of the search: one row per edge, one column per \
                 op; framed: the ops the derived genotype keeps.",
                kind.name()
            ),
            svg,
            dot: false,
        });
    }
    for kind in CellKind::both() {
        let per_epoch: Vec<Vec<Vec<f64>>> = s
            .epochs
            .iter()
            .map(|e| if kind == CellKind::Normal { e.alpha_normal.clone() } else { e.alpha_reduce.clone() })
            .collect();
        let svg =
            alpha_evolution(&format!("softmax(alpha) over epochs, {} cell", kind.name()), &per_epoch, &ops, &edges)?;
        figs.push(Figure {
            stem: format!("alpha-evolution-{}", kind.name()),
            caption: format!("How each edge's op weights in the {} cell moved, epoch by epoch.", kind.name()),
            svg,
            dot: false,
        });
    }
    let x = |e: &EpochStats| (e.epoch + 1) as f64;
    let series = |name: &str, f: &dyn Fn(&EpochStats) -> f64| Series {
        name: name.to_string(),
        points: s.epochs.iter().map(|e| (x(e), f(e))).collect(),
    };
    let svg = curves(
        "search",
        &[
            Panel {
                title: "loss".into(),
                y_label: "cross-entropy".into(),
                series: vec![series("weight split (train)", &|e| e.train_loss), series("alpha split", &|e| e.val_loss)],
            },
            Panel {
                title: "accuracy".into(),
                y_label: "accuracy (%)".into(),
                series: vec![
                    series("weight split (train)", &|e| 100.0 * e.train_acc),
                    series("alpha split", &|e| 100.0 * e.val_acc),
                ],
            },
        ],
    )?;
    figs.push(Figure {
        stem: "search-curves".into(),
        caption: "Search: loss and accuracy on the weights' split (training mode) and on the disjoint alpha split \
                  (evaluation mode)."
            .into(),
        svg,
        dot: false,
    });
    if let Some(fig) = skip_figure(s)? {
        figs.push(fig);
    }
    Ok(())
}

/// The skip-connection collapse monitor: skip_connect edges in each epoch's derived cells, skip_connect's mean
/// weight over the edges, and the remedies' schedules (None when the op set has no skip_connect).
fn skip_figure(s: &SearchRun) -> Result<Option<Figure>> {
    use crate::space::OpKind;
    let Some(col) = s.config.space.ops.iter().position(|&o| o == OpKind::SkipConnect) else { return Ok(None) };
    let x = |e: &EpochStats| (e.epoch + 1) as f64;
    let mut counts = [Vec::new(), Vec::new()];
    for e in &s.epochs {
        let g = Genotype::parse(&e.genotype)?;
        counts[0].push((x(e), crate::genotype::skip_connects(&g.normal) as f64));
        counts[1].push((x(e), crate::genotype::skip_connects(&g.reduce) as f64));
    }
    let mean_weight = |rows: &Vec<Vec<f64>>| rows.iter().map(|r| r[col]).sum::<f64>() / rows.len().max(1) as f64;
    let weights = |name: &str, f: &dyn Fn(&EpochStats) -> &Vec<Vec<f64>>| Series {
        name: name.to_string(),
        points: s.epochs.iter().map(|e| (x(e), mean_weight(f(e)))).collect(),
    };
    let [normal, reduce] = counts;
    let mut panels = vec![
        Panel {
            title: "skip_connect edges in the derived cell".into(),
            y_label: "edges".into(),
            series: vec![
                Series { name: "normal".into(), points: normal },
                Series { name: "reduce".into(), points: reduce },
            ],
        },
        Panel {
            title: "skip_connect's mean softmax(alpha)".into(),
            y_label: "weight".into(),
            series: vec![
                weights("normal", &|e| &e.alpha_normal),
                weights("reduce", &|e| &e.alpha_reduce),
                Series {
                    name: format!("uniform (1/{})", s.config.space.ops.len()),
                    points: s.epochs.iter().map(|e| (x(e), 1.0 / s.config.space.ops.len() as f64)).collect(),
                },
            ],
        },
    ];
    let schedule = |name: &str, f: &dyn Fn(&EpochStats) -> Option<f64>| Series {
        name: name.to_string(),
        points: s.epochs.iter().filter_map(|e| f(e).map(|v| (x(e), v))).collect(),
    };
    let remedies: Vec<Series> = [
        schedule("skip dropout rate (P-DARTS)", &|e| e.skip_dropout),
        schedule("auxiliary skip weight (DARTS-)", &|e| e.aux_skip),
    ]
    .into_iter()
    .filter(|r| !r.points.is_empty())
    .collect();
    if !remedies.is_empty() {
        panels.push(Panel { title: "remedies".into(), y_label: "rate / weight".into(), series: remedies });
    }
    Ok(Some(Figure {
        stem: "skip-connections".into(),
        caption: "Skip-connection collapse monitor: DARTS's failure shows as skip_connect taking over the normal \
                  cell (3 or more of its edges) while its weight grows. Remedies: --max-skip-connects, \
                  --early-stop-skip-connects, --skip-dropout, --auxiliary-skip."
            .into(),
        svg: curves("skip connections", &panels)?,
        dot: false,
    }))
}

fn train_figures(t: &TrainRun, figs: &mut Vec<Figure>) -> Result<()> {
    if t.epochs.is_empty() {
        return Ok(());
    }
    let series = |name: &str, f: &dyn Fn(&TrainStats) -> Option<f64>| Series {
        name: name.to_string(),
        points: t.epochs.iter().filter_map(|e| f(e).map(|v| ((e.epoch + 1) as f64, v))).collect(),
    };
    let mut acc =
        vec![series("train", &|e| Some(100.0 * e.train_acc)), series("test top-1", &|e| Some(100.0 * e.test_acc))];
    if t.epochs.iter().any(|e| e.test_top5.is_some()) {
        acc.push(series("test top-5", &|e| e.test_top5.map(|v| 100.0 * v)));
    }
    let svg = curves(
        "final training",
        &[
            Panel {
                title: "loss".into(),
                y_label: "cross-entropy".into(),
                series: vec![series("train", &|e| Some(e.train_loss)), series("test", &|e| Some(e.test_loss))],
            },
            Panel { title: "accuracy".into(), y_label: "accuracy (%)".into(), series: acc },
        ],
    )?;
    figs.push(Figure {
        stem: "train-curves".into(),
        caption: "Final training from scratch: loss and accuracy on the training set (augmented, drop path) and \
                  the test set."
            .into(),
        svg,
        dot: false,
    });
    Ok(())
}

fn data_uri(svg: &str) -> String {
    format!("data:image/svg+xml;base64,{}", base64::engine::general_purpose::STANDARD.encode(svg))
}

fn row(html: &mut String, key: &str, value: &str) {
    let _ = writeln!(html, "<tr><th>{}</th><td>{}</td></tr>", escape(key), value);
}

fn pct(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

fn duration(seconds: f64) -> String {
    if seconds >= 3600.0 {
        format!("{:.2} h", seconds / 3600.0)
    } else if seconds >= 60.0 {
        format!("{:.1} min", seconds / 60.0)
    } else {
        format!("{seconds:.1} s")
    }
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:2em auto;max-width:1200px;\
padding:0 1em;color:#222}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}\
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;\
vertical-align:top}th{background:#f5f5f5;font-weight:600}td.num{text-align:right}pre{background:#f7f7f7;\
padding:.8em;overflow-x:auto;font-size:.85em;white-space:pre-wrap}figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}\
figcaption{font-size:.9em;color:#555}.files a{margin-right:.6em}#load-problems{display:none;background:#fdd;\
padding:.6em;border:1px solid #c00}";

/// Counts the images that loaded and the script errors, records both on `<body>` (data-images="loaded/total",
/// data-errors) and shows a warning when something is missing.
const SELF_CHECK: &str = "<script>\nvar reportErrors=[];\nwindow.addEventListener('error',function(e){\
reportErrors.push(e.message||('could not load '+((e.target&&e.target.src)||'a resource').slice(0,60)));},true);\n\
window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);\
var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;\
document.body.setAttribute('data-images',ok+'/'+imgs.length);\
document.body.setAttribute('data-errors',String(reportErrors.length));\
if(ok<imgs.length||reportErrors.length){var p=document.getElementById('load-problems');p.style.display='block';\
p.textContent=(imgs.length-ok)+' picture(s) did not load; '+reportErrors.join('; ');}});\n</script>\n";

/// Writes `figures/` and `report.html` for the run directory `dir`; returns the report's path.
pub fn write_report(dir: &Path) -> Result<PathBuf> {
    let run = RunDir::load(dir)?;
    let fig_dir = dir.join("figures");
    let mut figs = Vec::new();
    if let Some(g) = run.genotype() {
        let [normal, reduce] = write_cell_figures(&fig_dir, g, "cell-")?;
        for (kind, svg) in CellKind::both().into_iter().zip([normal, reduce]) {
            figs.push(Figure {
                stem: format!("cell-{}", kind.name()),
                caption: format!(
                    "The {} cell: inputs c_{{k-2}} and c_{{k-1}} (the two previous cells), intermediate nodes, \
                     output c_{{k}} (their concatenation); each oval is the op on one kept edge.",
                    kind.name()
                ),
                svg,
                dot: true,
            });
        }
    }
    if let Some(s) = &run.search {
        search_figures(s, &mut figs)?;
    }
    if let Some(t) = &run.train {
        train_figures(t, &mut figs)?;
    }
    if let Some(b) = &run.baseline {
        if !b.samples.is_empty() {
            figs.push(Figure {
                stem: "samples".into(),
                caption: "Each sampled cell's score (accuracy on the scoring split after its short training) and the \
                          best so far."
                    .into(),
                svg: crate::baseline::samples_figure(&b.samples, b.config.strategy)?,
                dot: false,
            });
        }
    }
    if let Some(c) = &run.comparison {
        for m in &c.methods {
            let g = Genotype::parse(&m.genotype)?;
            let prefix = format!("cell-{}-", m.method);
            let [normal, reduce] = write_cell_figures(&fig_dir, &g, &prefix)?;
            for (kind, svg) in CellKind::both().into_iter().zip([normal, reduce]) {
                figs.push(Figure {
                    stem: format!("{prefix}{}", kind.name()),
                    caption: format!("{}: the {} cell it found.", m.method, kind.name()),
                    svg,
                    dot: true,
                });
            }
        }
    }
    for f in &figs {
        if !f.dot {
            write_svg_png(&fig_dir, &f.stem, f.svg.clone())?;
        }
    }
    let html = render_html(&run, &figs)?;
    let path = dir.join("report.html");
    let tmp = dir.join("report.html.tmp");
    std::fs::write(&tmp, html).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn render_html(run: &RunDir, figs: &[Figure]) -> Result<String> {
    let title = run.dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>darts report: {t}</title><style>{STYLE}</style>\n{SELF_CHECK}</head><body>\n\
         <div id=\"load-problems\"></div>\n<h1>darts report: {t}</h1>\n<p>{dir}</p>\n",
        t = escape(&title),
        dir = escape(&run.dir.display().to_string())
    );
    // A comparison's root has no run of its own: its table below is the summary.
    let has_summary = run.search.is_some() || run.train.is_some() || run.baseline.is_some();
    if has_summary {
        h.push_str("<h2>Summary</h2>\n<table>\n");
    }
    if let Some(s) = &run.search {
        let secs: f64 = s.epochs.iter().map(|e| e.seconds).sum();
        let status = if s.stopped_early() {
            format!(
                "stopped early after {} of {} epochs: skip connections took over the normal cell (DARTS+ criterion)",
                s.epochs.len(),
                s.config.epochs
            )
        } else if s.finished() {
            format!("finished, {} epochs", s.config.epochs)
        } else {
            format!("{} of {} epochs (resume it to finish)", s.epochs.len(), s.config.epochs)
        };
        row(&mut h, "search", &escape(&status));
        row(
            &mut h,
            "search space",
            &escape(&format!(
                "{} cells, {} intermediate nodes, C={}, {} ops: {}",
                s.config.space.layers,
                s.config.space.nodes,
                s.config.space.channels,
                s.config.space.ops.len(),
                s.config.space.ops.iter().map(|o| o.name()).collect::<Vec<_>>().join(", ")
            )),
        );
        row(
            &mut h,
            "search data",
            &escape(&format!(
                "{}, {:.0}% of the training set for the weights, the rest for alpha (disjoint), batch {}",
                s.config.dataset.name(),
                100.0 * s.config.train_portion,
                s.config.batch_size
            )),
        );
        row(&mut h, "hypergradient", &escape(&format!("{:?} order", s.config.order).to_lowercase()));
        let mut extras = Vec::new();
        if s.config.space.partial_channels > 1 {
            extras.push(format!("partial channels 1/{}", s.config.space.partial_channels));
        }
        if s.config.space.edge_normalization {
            extras.push("edge normalisation (beta)".to_string());
        }
        if s.config.arch_warmup_epochs > 0 {
            extras.push(format!("alpha frozen for the first {} epochs", s.config.arch_warmup_epochs));
        }
        if s.config.checkpoint_cells {
            extras.push("gradient checkpointing of cells".to_string());
        }
        if let Some(m) = s.config.max_skip_connects {
            extras.push(format!("at most {m} skip connections in the normal cell (P-DARTS)"));
        }
        if let Some(n) = s.config.early_stop_skip_connects {
            extras.push(format!("early stop at {n} skip connections in the normal cell (DARTS+)"));
        }
        if s.config.space.auxiliary_skip {
            extras.push("auxiliary skip connections, weight decaying from 1 (DARTS-)".to_string());
        }
        if s.config.skip_dropout > 0.0 {
            extras.push(format!("dropout {} on skip connections, decaying to 0 (P-DARTS)", s.config.skip_dropout));
        }
        if !extras.is_empty() {
            row(&mut h, "search options", &escape(&extras.join(", ")));
        }
        if let Some(last) = s.epochs.last() {
            row(
                &mut h,
                "search time",
                &escape(&format!("{} ({} per epoch)", duration(secs), duration(secs / s.epochs.len() as f64))),
            );
            row(&mut h, "alpha-split accuracy (last epoch)", &pct(last.val_acc));
            let peak = s.epochs.iter().map(|e| e.peak_rss_mb).fold(0.0, f64::max);
            row(&mut h, "search peak memory (RSS)", &format!("{peak:.0} MiB"));
            let gpu = s.epochs.iter().filter_map(|e| e.peak_gpu_mb).fold(f64::NAN, f64::max);
            if gpu.is_finite() {
                row(&mut h, "search peak GPU memory (tensors)", &format!("{gpu:.0} MiB"));
            }
        }
    }
    if let Some(t) = &run.train {
        let status = if t.finished() {
            format!("finished, {} epochs", t.config.epochs)
        } else {
            format!("{} of {} epochs (resume it to finish)", t.epochs.len(), t.config.epochs)
        };
        row(&mut h, "final training", &escape(&status));
        row(
            &mut h,
            "final network",
            &escape(&format!(
                "{} cells, C={}, auxiliary head {}, drop path {}, cutout {}, {} on {}",
                t.config.network.layers,
                t.config.network.channels,
                if t.config.network.auxiliary { "on" } else { "off" },
                t.config.drop_path,
                t.config.cutout,
                if t.config.network.imagenet { "ImageNet variant" } else { "CIFAR variant" },
                t.config.dataset.name()
            )),
        );
        if let Some(c) = &t.cost {
            row(
                &mut h,
                "parameters",
                &format!(
                    "{} ({:.3} M; auxiliary head excluded; {:.3} M with it)",
                    c.parameters,
                    c.parameters as f64 / 1e6,
                    c.parameters_with_auxiliary as f64 / 1e6
                ),
            );
            row(
                &mut h,
                "multiply-accumulates",
                &format!("{:.1} M per {}x{}x{} image", c.macs as f64 / 1e6, c.input[0], c.input[1], c.input[2]),
            );
        }
        if let Some(last) = t.epochs.last() {
            let secs: f64 = t.epochs.iter().map(|e| e.seconds).sum();
            row(
                &mut h,
                "training time",
                &escape(&format!("{} ({} per epoch)", duration(secs), duration(secs / t.epochs.len() as f64))),
            );
            let top5 = last.test_top5.map_or(String::new(), |v| format!(", top-5 {}", pct(v)));
            row(&mut h, "test accuracy (last epoch)", &format!("<b>top-1 {}</b>{top5}", pct(last.test_acc)));
            let best = t.epochs.iter().map(|e| e.test_acc).fold(0.0, f64::max);
            row(&mut h, "best test top-1", &pct(best));
            let gpu = t.epochs.iter().filter_map(|e| e.peak_gpu_mb).fold(f64::NAN, f64::max);
            if gpu.is_finite() {
                row(&mut h, "training peak GPU memory (tensors)", &format!("{gpu:.0} MiB"));
            }
        }
        if t.config.precision != crate::native::Precision::Fp32 {
            row(&mut h, "precision", "bf16 mixed precision (autocast; float32 weights, gradients and SGD)");
        }
    }
    if let Some(b) = &run.baseline {
        let c = &b.config;
        let done = b.samples.len();
        let secs = b.samples.last().map_or(0.0, |x| x.total_seconds);
        let status = match (b.genotype.is_some(), c.budget_seconds) {
            (true, Some(budget)) if done < c.samples => format!("finished: {done} samples in the {budget:.0} s budget"),
            (true, _) => format!("finished, {done} samples"),
            (false, _) => format!("{done} of {} samples (resume it to finish)", c.samples),
        };
        row(&mut h, &format!("{} search", c.strategy.name()), &escape(&status));
        row(
            &mut h,
            "each sample",
            &escape(&format!(
                "a {}-channel {}-cell network trained {} epochs (batch {}, lr {}) on {}, scored on the disjoint rest",
                c.network.channels,
                c.network.layers,
                c.epochs,
                c.batch_size,
                c.lr,
                c.dataset.name()
            )),
        );
        if let Some(best) = b.samples.iter().map(|x| x.val_acc).reduce(f64::max) {
            row(&mut h, "best score", &format!("<b>{}</b>", pct(best)));
        }
        if done > 0 {
            row(
                &mut h,
                "search time",
                &escape(&format!("{} ({} per sample)", duration(secs), duration(secs / done as f64))),
            );
        }
    }
    if has_summary {
        h.push_str("</table>\n");
    }
    if let Some(c) = &run.comparison {
        h.push_str(
            "<h2>DARTS against random search and RL</h2>\n<table><tr><th>method</th><th>search time</th>\
             <th>architectures trained</th><th>final-network parameters</th><th>test top-1</th>\
             <th>training time</th></tr>\n",
        );
        for m in &c.methods {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td>\
                 <td class=num><b>{}</b></td><td class=num>{}</td></tr>",
                escape(&m.method),
                duration(m.search_seconds),
                m.architectures_trained,
                m.parameters,
                pct(m.test_top1),
                duration(m.train_seconds)
            );
        }
        let _ = writeln!(h, "</table>\n<p>Device: {}. Each method's folder has its own report.</p>", escape(&c.device));
    }
    if let Some(g) = run.genotype() {
        let _ = writeln!(h, "<h2>Genotype</h2>\n<pre>{}</pre>", escape(&g.to_string()));
        let terminal: String = CellKind::both().iter().map(|k| crate::viz::cell::cell_text(g, *k)).collect();
        let _ = writeln!(h, "<pre>{}</pre>", escape(&terminal));
    }
    h.push_str("<h2>Figures</h2>\n");
    for f in figs {
        let mut files = format!("<a href=\"figures/{s}.svg\">SVG</a><a href=\"figures/{s}.png\">PNG</a>", s = f.stem);
        if f.dot {
            let _ = write!(files, "<a href=\"figures/{}.dot\">DOT</a>", f.stem);
        }
        let _ = writeln!(
            h,
            "<figure id=\"{s}\"><img alt=\"{s}\" src=\"{uri}\"><figcaption>{c} <span class=\"files\">{files}</span>\
             </figcaption></figure>",
            s = f.stem,
            uri = data_uri(&f.svg),
            c = escape(&f.caption)
        );
    }
    if let Some(s) = &run.search {
        h.push_str(
            "<h2>Search, epoch by epoch</h2>\n<table><tr><th>epoch</th><th>lr</th><th>train loss</th>\
                    <th>train acc</th><th>alpha-split loss</th><th>alpha-split acc</th><th>seconds</th>\
                    <th>peak MiB</th><th>genotype</th></tr>\n",
        );
        for e in &s.epochs {
            let _ = writeln!(
                h,
                "<tr><td class=num>{}</td><td class=num>{:.5}</td><td class=num>{:.4}</td><td class=num>{}</td>\
                 <td class=num>{:.4}</td><td class=num>{}</td><td class=num>{:.1}</td><td class=num>{:.0}</td>\
                 <td><small>{}</small></td></tr>",
                e.epoch + 1,
                e.lr,
                e.train_loss,
                pct(e.train_acc),
                e.val_loss,
                pct(e.val_acc),
                e.seconds,
                e.peak_rss_mb,
                escape(&e.genotype)
            );
        }
        h.push_str("</table>\n");
        let _ = writeln!(
            h,
            "<h2>Search configuration</h2>\n<details><summary>config.json</summary><pre>{}</pre></details>",
            escape(&serde_json::to_string_pretty(&s.config)?)
        );
    }
    if let Some(t) = &run.train {
        h.push_str(
            "<h2>Final training, epoch by epoch</h2>\n<table><tr><th>epoch</th><th>lr</th><th>drop path</th>\
                    <th>train loss</th><th>train acc</th><th>test loss</th><th>test top-1</th><th>test top-5</th>\
                    <th>seconds</th><th>peak MiB</th></tr>\n",
        );
        for e in &t.epochs {
            let _ = writeln!(
                h,
                "<tr><td class=num>{}</td><td class=num>{:.5}</td><td class=num>{:.3}</td><td class=num>{:.4}</td>\
                 <td class=num>{}</td><td class=num>{:.4}</td><td class=num>{}</td><td class=num>{}</td>\
                 <td class=num>{:.1}</td><td class=num>{:.0}</td></tr>",
                e.epoch + 1,
                e.lr,
                e.drop_path,
                e.train_loss,
                pct(e.train_acc),
                e.test_loss,
                pct(e.test_acc),
                e.test_top5.map_or("-".into(), pct),
                e.seconds,
                e.peak_rss_mb
            );
        }
        h.push_str("</table>\n");
        let _ = writeln!(
            h,
            "<h2>Training configuration</h2>\n<details><summary>train-config.json</summary><pre>{}</pre></details>",
            escape(&serde_json::to_string_pretty(&t.config)?)
        );
    }
    if let Some(b) = &run.baseline {
        h.push_str(
            "<h2>Samples</h2>\n<table><tr><th>sample</th><th>score</th><th>scoring-split loss</th>\
             <th>parameters</th><th>seconds</th><th>genotype</th></tr>\n",
        );
        for x in &b.samples {
            let _ = writeln!(
                h,
                "<tr><td class=num>{}</td><td class=num>{}</td><td class=num>{:.4}</td><td class=num>{}</td>\
                 <td class=num>{:.1}</td><td><small>{}</small></td></tr>",
                x.index + 1,
                pct(x.val_acc),
                x.val_loss,
                x.parameters,
                x.seconds,
                escape(&x.genotype)
            );
        }
        h.push_str("</table>\n");
        let _ = writeln!(
            h,
            "<h2>Baseline configuration</h2>\n<details><summary>baseline-config.json</summary><pre>{}</pre></details>",
            escape(&serde_json::to_string_pretty(&b.config)?)
        );
    }
    let _ = writeln!(h, "<p><small>written by darts {}</small></p>\n</body></html>", env!("CARGO_PKG_VERSION"));
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_cells_index_alpha_rows_and_op_columns() {
        let g = crate::zoo::get("DARTS_V2").unwrap();
        let ops = crate::space::SearchSpace::default().ops;
        let kept = kept_cells(&g.normal, &ops);
        let col = |name: &str| ops.iter().position(|o| o.name() == name).unwrap();
        // node 0 reads rows 0,1; node 1 rows 2..5; node 2 rows 5..9; node 3 rows 9..14.
        assert_eq!(kept[0], (0, col("sep_conv_3x3")));
        assert_eq!(kept[3], (3, col("sep_conv_3x3")));
        assert_eq!(kept[5], (5, col("skip_connect")));
        assert_eq!(kept[7], (9 + 2, col("dil_conv_3x3")));
    }

    #[test]
    fn a_folder_that_is_not_a_run_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_report(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a darts run directory"), "{err}");
    }
}

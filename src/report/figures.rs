//! The report's figures: cell diagrams, softmax(alpha) heat maps and their evolution, learning curves, the
//! skip-connection collapse monitor, a baseline's samples and a comparison's cells.
use super::{RunDir, SearchRun, TrainRun};
use crate::genotype::Genotype;
use crate::rundir::EpochStats;
use crate::rundir::{SampleRecord, TrainStats};
use crate::viz::cell::{cell_dot, edge_labels, CellKind};
use crate::viz::plot::{alpha_evolution, alpha_heatmap, curves, Panel, Series};
use crate::viz::{dot_to_svg, write_svg_png};
use anyhow::{Context, Result};
use std::path::Path;

/// One figure of the report: its file stem in `figures/`, caption and SVG; `dot` when it is a cell diagram
/// (written with its DOT source).
pub(super) struct Figure {
    pub(super) stem: String,
    pub(super) caption: String,
    pub(super) svg: String,
    pub(super) dot: bool,
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
    let derived = &last.genotype;
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
        let g = &e.genotype;
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

/// Every figure of the run in `run`, written to `fig_dir` (SVG and PNG; cells also DOT).
pub(super) fn write_all(run: &RunDir, fig_dir: &Path) -> Result<Vec<Figure>> {
    let mut figs = Vec::new();
    if let Some(g) = run.genotype() {
        let [normal, reduce] = write_cell_figures(fig_dir, g, "cell-")?;
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
                svg: samples_figure(&b.samples, b.config.strategy)?,
                dot: false,
            });
        }
    }
    if let Some(c) = &run.comparison {
        for m in &c.methods {
            let g = &m.genotype;
            let prefix = format!("cell-{}-", m.method);
            let [normal, reduce] = write_cell_figures(fig_dir, g, &prefix)?;
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
            write_svg_png(fig_dir, &f.stem, f.svg.clone())?;
        }
    }
    Ok(figs)
}

/// The samples' scores and the best so far, as an SVG chart.
fn samples_figure(samples: &[SampleRecord], strategy: crate::baseline::Strategy) -> Result<String> {
    use crate::viz::plot::{curves_over, Panel, Series};
    let mut best = f64::NEG_INFINITY;
    let best_so_far: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| {
            best = best.max(s.val_acc);
            ((s.index + 1) as f64, 100.0 * best)
        })
        .collect();
    let score: Vec<(f64, f64)> = samples.iter().map(|s| ((s.index + 1) as f64, 100.0 * s.val_acc)).collect();
    let panel = Panel {
        title: "score of each sample (accuracy on the scoring split)".into(),
        y_label: "accuracy %".into(),
        series: vec![
            Series { name: "sample".into(), points: score },
            Series { name: "best so far".into(), points: best_so_far },
        ],
    };
    curves_over(&format!("{} search: {} samples", strategy.name(), samples.len()), "sample", &[panel])
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
}

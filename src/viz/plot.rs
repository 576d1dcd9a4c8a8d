//! Charts as SVG text (plotters' SVG backend): the softmax(alpha) heat map of a cell, the evolution of each
//! edge's op weights over the search, and learning curves.
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Ten distinguishable colours (matplotlib's tab10), one per op or series.
pub const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// From white (0) to dark blue (1), like matplotlib's "Blues".
fn blues(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * v).round() as u8;
    RGBColor(lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0))
}

fn text_style(size: f64, colour: &RGBColor, h: HPos) -> TextStyle<'static> {
    TextStyle {
        font: ("sans-serif", size).into_font(),
        color: colour.to_backend_color(),
        pos: Pos::new(h, VPos::Center),
    }
}

/// A heat map of softmax(alpha): one row per edge (`edges` labels), one column per op, each square printed
/// with its weight and shaded from white (the smallest weight in the matrix) to dark blue (the largest), so
/// that differences show even while all weights are still near 1/ops; the (edge, op) pairs in `kept` (the derived
/// genotype) get an orange frame.
pub fn alpha_heatmap(
    title: &str,
    weights: &[Vec<f64>],
    ops: &[String],
    edges: &[String],
    kept: &[(usize, usize)],
    edge_weights: Option<&[f64]>,
) -> Result<String> {
    anyhow::ensure!(weights.len() == edges.len(), "{} rows of weights for {} edges", weights.len(), edges.len());
    anyhow::ensure!(weights.iter().all(|r| r.len() == ops.len()), "every row needs one weight per op");
    if let Some(b) = edge_weights {
        anyhow::ensure!(b.len() == edges.len(), "{} edge weights for {} edges", b.len(), edges.len());
    }
    let (left, top, cw, ch) = (110i32, 64i32, 96i32, 24i32);
    let extra = if edge_weights.is_some() { cw + 12 } else { 0 };
    let width = (left + cw * ops.len() as i32 + extra + 20) as u32;
    let height = (top + ch * edges.len() as i32 + 34) as u32;
    let lo = weights.iter().flatten().fold(f64::MAX, |m, &w| m.min(w));
    let hi = weights.iter().flatten().fold(f64::MIN, |m, &w| m.max(w));
    let digits = if hi - lo < 0.01 { 4 } else { 3 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        root.draw(&Text::new(title.to_string(), (width as i32 / 2, 16), text_style(16.0, &BLACK, HPos::Center)))
            .map_err(draw_err)?;
        for (c, op) in ops.iter().enumerate() {
            let x = left + cw * c as i32 + cw / 2;
            root.draw(&Text::new(op.clone(), (x, top - 12), text_style(11.0, &BLACK, HPos::Center)))
                .map_err(draw_err)?;
        }
        for (r, (row, label)) in weights.iter().zip(edges).enumerate() {
            let y = top + ch * r as i32;
            root.draw(&Text::new(label.clone(), (left - 8, y + ch / 2), text_style(12.0, &BLACK, HPos::Right)))
                .map_err(draw_err)?;
            for (c, &w) in row.iter().enumerate() {
                let x = left + cw * c as i32;
                let shade = if hi - lo > 1e-12 { (w - lo) / (hi - lo) } else { 0.5 };
                root.draw(&Rectangle::new([(x, y), (x + cw, y + ch)], blues(shade).filled())).map_err(draw_err)?;
                let ink = if shade > 0.55 { WHITE } else { BLACK };
                root.draw(&Text::new(
                    format!("{w:.digits$}"),
                    (x + cw / 2, y + ch / 2),
                    text_style(11.0, &ink, HPos::Center),
                ))
                .map_err(draw_err)?;
            }
        }
        if let Some(b) = edge_weights {
            // PC-DARTS' edge weights (softmax of beta within each node), in their own column and scale.
            let x = left + cw * ops.len() as i32 + 12;
            root.draw(&Text::new("edge weight β", (x + cw / 2, top - 12), text_style(11.0, &BLACK, HPos::Center)))
                .map_err(draw_err)?;
            for (r, &v) in b.iter().enumerate() {
                let y = top + ch * r as i32;
                root.draw(&Rectangle::new([(x, y), (x + cw, y + ch)], blues(v).filled())).map_err(draw_err)?;
                let ink = if v > 0.55 { WHITE } else { BLACK };
                root.draw(&Text::new(
                    format!("{v:.3}"),
                    (x + cw / 2, y + ch / 2),
                    text_style(11.0, &ink, HPos::Center),
                ))
                .map_err(draw_err)?;
            }
        }
        for &(r, c) in kept {
            let (x, y) = (left + cw * c as i32, top + ch * r as i32);
            // SVG rectangles are drawn 1 px wide whatever the style says: two nested frames.
            for d in [1, 2] {
                let frame = Rectangle::new([(x + d, y + d), (x + cw - d, y + ch - d)], RGBColor(255, 127, 14));
                root.draw(&frame).map_err(draw_err)?;
            }
        }
        let note = format!("shade: {lo:.4} (white) to {hi:.4} (darkest); orange frame: kept in the derived genotype");
        root.draw(&Text::new(note, (left, height as i32 - 16), text_style(11.0, &BLACK, HPos::Left)))
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn legend(area: &DrawingArea<SVGBackend, Shift>, names: &[String]) -> Result<()> {
    let mut x = 10;
    for (i, name) in names.iter().enumerate() {
        area.draw(&PathElement::new(vec![(x, 12), (x + 22, 12)], colour(i).stroke_width(3))).map_err(draw_err)?;
        area.draw(&Text::new(name.clone(), (x + 27, 12), text_style(12.0, &BLACK, HPos::Left))).map_err(draw_err)?;
        x += 34 + 7 * name.chars().count() as i32;
    }
    Ok(())
}

/// Decimals for axis labels spaced about `(hi - lo) / labels` apart: enough that neighbouring labels differ
/// (alpha's weights after a short search span a few thousandths), no more.
pub fn label_decimals(lo: f64, hi: f64, labels: usize) -> usize {
    let step = (hi - lo).abs() / labels.max(1) as f64;
    if !(step.is_finite() && step > 0.0) {
        return 3;
    }
    (-step.log10()).ceil().clamp(0.0, 8.0) as usize
}

/// Small multiples, one per edge: each op's softmax(alpha) weight over the search's epochs.
/// `per_epoch[e][edge][op]`.
pub fn alpha_evolution(title: &str, per_epoch: &[Vec<Vec<f64>>], ops: &[String], edges: &[String]) -> Result<String> {
    anyhow::ensure!(!per_epoch.is_empty(), "no epochs to plot");
    anyhow::ensure!(per_epoch.iter().all(|e| e.len() == edges.len()), "every epoch needs one row per edge");
    let cols = 5usize.min(edges.len()).max(1);
    let rows = edges.len().div_ceil(cols);
    let (pw, ph) = (230u32, 170u32);
    let width = pw * cols as u32;
    let height = 40 + ph * rows as u32 + 30;
    let epochs = per_epoch.len();
    let lo = per_epoch.iter().flatten().flatten().fold(f64::MAX, |m, &v| m.min(v));
    let hi = per_epoch.iter().flatten().flatten().fold(f64::MIN, |m, &v| m.max(v));
    let pad = ((hi - lo) * 0.08).max(1e-4);
    let (y_min, y_max) = ((lo - pad).max(0.0), (hi + pad).min(1.0));
    let decimals = label_decimals(y_min, y_max, 4);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (head, rest) = root.split_vertically(40);
        let (body, foot) = rest.split_vertically(ph * rows as u32);
        head.draw(&Text::new(title.to_string(), (width as i32 / 2, 20), text_style(16.0, &BLACK, HPos::Center)))
            .map_err(draw_err)?;
        let panels = body.split_evenly((rows, cols));
        for (edge, area) in panels.iter().enumerate().take(edges.len()) {
            let mut chart = ChartBuilder::on(area)
                .caption(&edges[edge], ("sans-serif", 12))
                .margin(6)
                .x_label_area_size(18)
                .y_label_area_size(36)
                .build_cartesian_2d(1f64..(epochs.max(2) as f64), y_min..y_max)
                .map_err(draw_err)?;
            chart
                .configure_mesh()
                .x_labels(4)
                .y_labels(4)
                .label_style(("sans-serif", 9))
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v:.decimals$}"))
                .light_line_style(WHITE)
                .draw()
                .map_err(draw_err)?;
            for op in 0..ops.len() {
                let pts: Vec<(f64, f64)> =
                    per_epoch.iter().enumerate().map(|(e, w)| ((e + 1) as f64, w[edge][op])).collect();
                chart.draw_series(LineSeries::new(pts.clone(), colour(op).stroke_width(2))).map_err(draw_err)?;
                if epochs <= 12 {
                    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, colour(op).filled()))).map_err(draw_err)?;
                }
            }
        }
        legend(&foot, ops)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// One named line of a chart: (epoch, value) points.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure.
#[derive(Clone, Debug)]
pub struct Panel {
    /// Caption.
    pub title: String,
    /// The y axis' name.
    pub y_label: String,
    /// Its lines.
    pub series: Vec<Series>,
}

/// Panels side by side over epochs (learning curves: loss in one, accuracy in another).
pub fn curves(title: &str, panels: &[Panel]) -> Result<String> {
    curves_over(title, "epoch", panels)
}

/// [`curves`] over another x axis (`x_label`).
pub fn curves_over(title: &str, x_label: &str, panels: &[Panel]) -> Result<String> {
    anyhow::ensure!(!panels.is_empty(), "nothing to plot");
    let (pw, ph) = (440u32, 320u32);
    let width = pw * panels.len() as u32;
    let height = ph + 40;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (head, body) = root.split_vertically(32);
        head.draw(&Text::new(title.to_string(), (width as i32 / 2, 16), text_style(16.0, &BLACK, HPos::Center)))
            .map_err(draw_err)?;
        for (panel, area) in panels.iter().zip(body.split_evenly((1, panels.len())).iter()) {
            let pts = panel.series.iter().flat_map(|s| s.points.iter());
            let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
            for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
                (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            }
            if x0 > x1 {
                (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
            }
            if x1 - x0 < 1.0 {
                x1 = x0 + 1.0;
            }
            let pad = ((y1 - y0) * 0.08).max(1e-3);
            let (y0, y1) = (y0 - pad, y1 + pad);
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 14))
                .margin(10)
                .x_label_area_size(34)
                .y_label_area_size(50)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(draw_err)?;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(panel.y_label.as_str())
                .x_labels(6)
                .x_label_formatter(&|v| if v.fract().abs() < 1e-9 { format!("{v:.0}") } else { String::new() })
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(draw_err)?;
            for (i, s) in panel.series.iter().enumerate() {
                let c = colour(i);
                chart
                    .draw_series(LineSeries::new(s.points.clone(), c.stroke_width(2)))
                    .map_err(draw_err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(draw_err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .draw()
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heatmap_prints_every_weight_and_frames_kept_ops() {
        let ops: Vec<String> = ["none", "skip_connect", "sep_conv_3x3"].iter().map(|s| s.to_string()).collect();
        let edges = crate::viz::cell::edge_labels(1);
        let w = vec![vec![0.125, 0.5, 0.375], vec![0.25, 0.25, 0.5]];
        let svg = alpha_heatmap("normal", &w, &ops, &edges, &[(0, 1), (1, 2)], None).unwrap();
        for v in ["0.125", "0.500", "0.375", "0.250"] {
            assert!(svg.contains(v), "{v} missing");
        }
        assert_eq!(svg.matches("fill=\"none\" stroke=\"#FF7F0E\"").count(), 2 * 2, "two frames per kept op");
        assert!(alpha_heatmap("x", &w[..1], &ops, &edges, &[], None).is_err());
        let with_beta = alpha_heatmap("x", &w, &ops, &edges, &[], Some(&[0.625, 0.375])).unwrap();
        assert!(with_beta.contains("edge weight β") && with_beta.contains("0.625"));
    }

    #[test]
    fn curves_and_evolution_draw_one_line_per_series() {
        let s = |n: &str| Series { name: n.into(), points: vec![(1.0, 2.0), (2.0, 1.5), (3.0, 1.0)] };
        let svg =
            curves("search", &[Panel { title: "loss".into(), y_label: "loss".into(), series: vec![s("a"), s("b")] }])
                .unwrap();
        let lines = svg.matches("stroke=\"#1F77B4\" stroke-width=\"2\"").count()
            + svg.matches("stroke=\"#FF7F0E\" stroke-width=\"2\"").count();
        assert_eq!(lines, 2 + 2, "two series and their legend marks");
        let ops: Vec<String> = vec!["a".into(), "b".into()];
        let epochs = vec![vec![vec![0.5, 0.5]; 2], vec![vec![0.4, 0.6]; 2]];
        let svg = alpha_evolution("evolution", &epochs, &ops, &crate::viz::cell::edge_labels(1)).unwrap();
        assert!(svg.contains("c_{k-2} → 0") && svg.contains("c_{k-1} → 0"));
    }

    /// A short search moves alpha's weights by thousandths (0.1242 to 0.1262): the y labels must still differ.
    #[test]
    fn evolution_labels_of_a_narrow_range_are_distinct() {
        assert_eq!(
            (label_decimals(0.1240, 0.1264, 4), label_decimals(0.0, 1.0, 4), label_decimals(0.2, 0.2, 4)),
            (4, 1, 3)
        );
        let ops: Vec<String> = vec!["a".into(), "b".into()];
        let epochs = vec![vec![vec![0.1242, 0.1250]; 2], vec![vec![0.1262, 0.1249]; 2]];
        let svg = alpha_evolution("evolution", &epochs, &ops, &crate::viz::cell::edge_labels(1)).unwrap();
        let mut labels: Vec<&str> = svg
            .split('>')
            .filter_map(|t| t.split('<').next().map(str::trim))
            .filter(|t| t.starts_with("0.12") || t.starts_with("0.13"))
            .collect();
        let all = labels.len();
        labels.sort();
        labels.dedup();
        assert!(labels.len() >= 3, "{labels:?}");
        assert_eq!(all, 2 * labels.len(), "each of the two panels shows each label once: {labels:?}");
    }
}

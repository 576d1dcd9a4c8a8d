//! The report page: one self-contained HTML file (pictures inlined as data URIs) that checks in the browser that
//! every picture loaded.
use super::figures::Figure;
use super::{escape, BaselineRun, RunDir, SearchRun, TrainRun};
use crate::rundir::CompareOutcome;
use crate::viz::cell::CellKind;
use anyhow::Result;
use base64::Engine;
use std::fmt::Write as _;

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

/// The page for `run` with `figs`.
pub(super) fn render_html(run: &RunDir, figs: &[Figure]) -> Result<String> {
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
        search_summary(&mut h, s);
    }
    if let Some(t) = &run.train {
        train_summary(&mut h, t);
    }
    if let Some(b) = &run.baseline {
        baseline_summary(&mut h, b);
    }
    if has_summary {
        h.push_str("</table>\n");
    }
    if let Some(c) = &run.comparison {
        comparison_table(&mut h, c);
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
        search_tables(&mut h, s)?;
    }
    if let Some(t) = &run.train {
        train_tables(&mut h, t)?;
    }
    if let Some(b) = &run.baseline {
        baseline_tables(&mut h, b)?;
    }
    let _ = writeln!(h, "<p><small>written by darts {}</small></p>\n</body></html>", env!("CARGO_PKG_VERSION"));
    Ok(h)
}

/// Every choice of the derived cells with its margin and the last epoch's movement.
fn decision_table(h: &mut String, d: &crate::decision::Decision) {
    h.push_str(
        "<h2>How decided the cell is</h2>\n<p>Each choice of the derived cells: the margin of the kept op (or edge) \
         over the runner-up, in softmax(alpha) weight, against how far those weights moved in the last epoch. A \
         margin not larger than that movement is <b>within noise</b>: one more epoch could flip it.</p>\n\
         <table><tr><th>cell</th><th>node</th><th>choice</th><th>kept</th><th>runner-up</th><th>margin</th>\
         <th>moved last epoch</th><th></th></tr>\n",
    );
    for (name, c) in [("normal", &d.normal), ("reduce", &d.reduce)] {
        let flag = |m: f64, moved: f64| if m <= moved { "<b>within noise</b>" } else { "" };
        for o in &c.ops {
            let _ = writeln!(
                h,
                "<tr><td>{name}</td><td class=num>{}</td><td>op on edge from {}</td><td>{}</td><td>{}</td>\
                 <td class=num>{:.4}</td><td class=num>{:.4}</td><td>{}</td></tr>",
                o.node,
                o.input,
                o.op.name(),
                o.runner_up.name(),
                o.margin,
                o.moved,
                flag(o.margin, o.moved)
            );
        }
        for e in &c.edges {
            let _ = writeln!(
                h,
                "<tr><td>{name}</td><td class=num>{}</td><td>second edge</td><td>from {}</td><td>from {}</td>\
                 <td class=num>{:.4}</td><td class=num>{:.4}</td><td>{}</td></tr>",
                e.node,
                e.kept,
                e.dropped,
                e.margin,
                e.moved,
                flag(e.margin, e.moved)
            );
        }
    }
    h.push_str("</table>\n");
}

/// The summary rows of a search: status, space, data, options, time, accuracy, memory, how decided the cell is.
fn search_summary(h: &mut String, s: &SearchRun) {
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
    row(h, "search", &escape(&status));
    row(
        h,
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
        h,
        "search data",
        &escape(&format!(
            "{}, {:.0}% of the training set for the weights, the rest for alpha (disjoint), batch {}",
            s.config.dataset.name(),
            100.0 * s.config.train_portion,
            s.config.batch_size
        )),
    );
    row(h, "hypergradient", &escape(&format!("{:?} order", s.config.order).to_lowercase()));
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
    if let Some(g) = s.config.gdas {
        extras.push(format!("GDAS: one Gumbel-sampled op per edge, temperature {} -> {}", g.tau_max, g.tau_min));
    }
    if s.config.space.auxiliary_skip {
        extras.push("auxiliary skip connections, weight decaying from 1 (DARTS-)".to_string());
    }
    if s.config.skip_dropout > 0.0 {
        extras.push(format!(
            "dropout {} on skip connections, decaying linearly in the warm-up and exponentially after it (P-DARTS)",
            s.config.skip_dropout
        ));
    }
    if !extras.is_empty() {
        row(h, "search options", &escape(&extras.join(", ")));
    }
    if let Some(last) = s.epochs.last() {
        row(
            h,
            "search time",
            &escape(&format!("{} ({} per epoch)", duration(secs), duration(secs / s.epochs.len() as f64))),
        );
        row(h, "alpha-split accuracy (last epoch)", &pct(last.val_acc));
        if let Some(d) = crate::rundir::decision(&s.config.space, &s.epochs) {
            let line = format!("normal: {}; reduce: {}", d.normal.summary(), d.reduce.summary());
            row(h, "how decided the cell is", &escape(&line));
        }
        let peak = s.epochs.iter().map(|e| e.peak_rss_mb).fold(0.0, f64::max);
        row(h, "search peak memory (RSS)", &format!("{peak:.0} MiB"));
        let gpu = s.epochs.iter().filter_map(|e| e.peak_gpu_mb).fold(f64::NAN, f64::max);
        if gpu.is_finite() {
            row(h, "search peak GPU memory (tensors)", &format!("{gpu:.0} MiB"));
        }
    }
}

/// The summary rows of a final training: status, network, counts, time, test accuracy, the validation-chosen model.
fn train_summary(h: &mut String, t: &TrainRun) {
    let status = if t.finished() {
        format!("finished, {} epochs", t.config.epochs)
    } else {
        format!("{} of {} epochs (resume it to finish)", t.epochs.len(), t.config.epochs)
    };
    row(h, "final training", &escape(&status));
    row(
        h,
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
            h,
            "parameters",
            &format!(
                "{} ({:.3} M; auxiliary head excluded; {:.3} M with it)",
                c.parameters,
                c.parameters as f64 / 1e6,
                c.parameters_with_auxiliary as f64 / 1e6
            ),
        );
        row(
            h,
            "multiply-accumulates",
            &format!("{:.1} M per {}x{}x{} image", c.macs as f64 / 1e6, c.input[0], c.input[1], c.input[2]),
        );
    }
    if let Some(last) = t.epochs.last() {
        let secs: f64 = t.epochs.iter().map(|e| e.seconds).sum();
        row(
            h,
            "training time",
            &escape(&format!("{} ({} per epoch)", duration(secs), duration(secs / t.epochs.len() as f64))),
        );
        let top5 = last.test_top5.map_or(String::new(), |v| format!(", top-5 {}", pct(v)));
        row(h, "test accuracy (last epoch)", &format!("<b>top-1 {}</b>{top5}", pct(last.test_acc)));
        // The test set is reported, never used to choose: a best epoch exists only on a validation split.
        let best = t.epochs.iter().filter_map(|e| e.valid_acc.map(|v| (e.epoch, v)));
        if let Some((epoch, acc)) = best.fold(None, |b: Option<(usize, f64)>, x| match b {
            Some(b) if b.1 >= x.1 => Some(b),
            _ => Some(x),
        }) {
            row(
                h,
                "model-best (chosen on the validation split)",
                &format!(
                    "epoch {}, validation top-1 {} ({:.0}% of the training set held out; darts eval --which best \
                     tests it)",
                    epoch + 1,
                    pct(acc),
                    100.0 * t.config.valid_portion
                ),
            );
        }
        let gpu = t.epochs.iter().filter_map(|e| e.peak_gpu_mb).fold(f64::NAN, f64::max);
        if gpu.is_finite() {
            row(h, "training peak GPU memory (tensors)", &format!("{gpu:.0} MiB"));
        }
    }
    if t.config.precision != crate::native::Precision::Fp32 {
        row(h, "precision", "bf16 mixed precision (autocast; float32 weights, gradients and SGD)");
    }
}

/// The summary rows of a baseline search.
fn baseline_summary(h: &mut String, b: &BaselineRun) {
    let c = &b.config;
    let done = b.samples.len();
    let secs = b.samples.last().map_or(0.0, |x| x.total_seconds);
    let status = match (b.genotype.is_some(), c.budget_seconds) {
        (true, Some(budget)) if done < c.samples => format!("finished: {done} samples in the {budget:.0} s budget"),
        (true, _) => format!("finished, {done} samples"),
        (false, _) => format!("{done} of {} samples (resume it to finish)", c.samples),
    };
    row(h, &format!("{} search", c.strategy.name()), &escape(&status));
    row(
        h,
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
        row(h, "best score", &format!("<b>{}</b>", pct(best)));
    }
    if done > 0 {
        row(h, "search time", &escape(&format!("{} ({} per sample)", duration(secs), duration(secs / done as f64))));
    }
}

/// A comparison's table: each method's cost and its cell's test accuracy.
fn comparison_table(h: &mut String, c: &CompareOutcome) {
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
            m.method,
            duration(m.search_seconds),
            m.architectures_trained,
            m.parameters,
            pct(m.test_top1),
            duration(m.train_seconds)
        );
    }
    let _ = writeln!(h, "</table>\n<p>Device: {}. Each method's folder has its own report.</p>", escape(&c.device));
}

/// A search's epoch-by-epoch table, how decided its cell is, and its configuration.
fn search_tables(h: &mut String, s: &SearchRun) -> Result<()> {
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
            escape(&e.genotype.to_string())
        );
    }
    h.push_str("</table>\n");
    if let Some(d) = crate::rundir::decision(&s.config.space, &s.epochs) {
        decision_table(h, &d);
    }
    let _ = writeln!(
        h,
        "<h2>Search configuration</h2>\n<details><summary>config.json</summary><pre>{}</pre></details>",
        escape(&serde_json::to_string_pretty(&s.config)?)
    );
    Ok(())
}

/// A training's epoch-by-epoch table and its configuration.
fn train_tables(h: &mut String, t: &TrainRun) -> Result<()> {
    h.push_str(
        "<h2>Final training, epoch by epoch</h2>\n<table><tr><th>epoch</th><th>lr</th><th>drop path</th>\
                <th>train loss</th><th>train acc</th><th>validation top-1</th><th>test loss</th>\
                <th>test top-1</th><th>test top-5</th><th>seconds</th><th>peak MiB</th></tr>\n",
    );
    for e in &t.epochs {
        let _ = writeln!(
            h,
            "<tr><td class=num>{}</td><td class=num>{:.5}</td><td class=num>{:.3}</td><td class=num>{:.4}</td>\
             <td class=num>{}</td><td class=num>{}</td><td class=num>{:.4}</td><td class=num>{}</td>\
             <td class=num>{}</td><td class=num>{:.1}</td><td class=num>{:.0}</td></tr>",
            e.epoch + 1,
            e.lr,
            e.drop_path,
            e.train_loss,
            pct(e.train_acc),
            e.valid_acc.map_or("-".into(), pct),
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
    Ok(())
}

/// A baseline's samples and its configuration.
fn baseline_tables(h: &mut String, b: &BaselineRun) -> Result<()> {
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
            escape(&x.genotype.to_string())
        );
    }
    h.push_str("</table>\n");
    let _ = writeln!(
        h,
        "<h2>Baseline configuration</h2>\n<details><summary>baseline-config.json</summary><pre>{}</pre></details>",
        escape(&serde_json::to_string_pretty(&b.config)?)
    );
    Ok(())
}

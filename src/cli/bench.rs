//! `darts bench`: our search step against the original PyTorch code, same shapes, same machine, one run.
use anyhow::{Context, Result};
use darts::bench::{bench_final, bench_search, BenchRow, STEPS};
use darts::network::NetworkConfig;
use darts::space::{DataShape, SearchSpace};
use std::path::PathBuf;
use std::process::Command;

/// The PyTorch reference (the original DARTS code, condensed), carried inside the binary.
const REFERENCE: &str = include_str!("../../bench/pytorch_darts.py");

/// Arguments of `darts bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch: i64,
    /// Image height and width.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Initial channels C.
    #[arg(long, default_value_t = 16)]
    channels: usize,
    /// Cells.
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Timed repeats after one warm-up.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Which measurements, comma-separated.
    #[arg(long, default_value = "forward,forward_backward_sgd,first_order_step,second_order_step,final_train_step")]
    only: String,
    /// Final network: genotype (zoo name, file or text).
    #[arg(long, default_value = "DARTS_V2")]
    final_genotype: String,
    /// Final network: initial channels.
    #[arg(long, default_value_t = 36)]
    final_channels: usize,
    /// Final network: cells.
    #[arg(long, default_value_t = 20)]
    final_layers: usize,
    /// Final network: batch size.
    #[arg(long, default_value_t = 96)]
    final_batch: i64,
    /// Python with torch for the reference ("none" skips it; default: darts' own venv).
    #[arg(long)]
    pytorch: Option<String>,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn default_python() -> Option<String> {
    let home = std::env::var_os("HOME")?;
    let cache =
        std::env::var_os("DARTS_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(home).join(".cache/darts"));
    let py = cache.join("venv/bin/python");
    py.is_file().then(|| py.display().to_string())
}

/// Runs the benchmark: `--threads` (default 2 here) and `--device` are the global options; `--layout auto`
/// measures both layouts of ours, `nchw` or `channels-last` only that one.
pub fn run(a: BenchArgs, rt: &super::Runtime) -> Result<()> {
    let threads = rt.threads.unwrap_or(2);
    anyhow::ensure!(threads >= 1, "--threads {threads}: use at least 1");
    tch::set_num_threads(threads);
    let device = darts::device_from_name(&rt.device)?;
    let space = SearchSpace { channels: a.channels, layers: a.layers, ..Default::default() };
    let shape = DataShape { channels: 3, height: a.size, width: a.size, classes: 10 };
    space.validate_for(&shape)?;
    let only: Vec<&str> = a.only.split(',').map(str::trim).collect();
    let genotype = darts::zoo::resolve(&a.final_genotype)?;
    for o in &only {
        anyhow::ensure!(STEPS.contains(o), "--only: unknown measurement '{o}'; choose from {}", STEPS.join(", "));
    }
    eprintln!(
        "bench: batch {} x 3x{}x{}, C={}, {} cells, {} threads, device {:?}",
        a.batch, a.size, a.size, a.channels, a.layers, threads, device
    );
    let mut rows = Vec::new();
    for cl in [false, true] {
        if (cl && rt.layout == darts::Layout::Nchw) || (!cl && rt.layout == darts::Layout::ChannelsLast) {
            continue;
        }
        let show = |r: &BenchRow| {
            eprintln!(
                "  {:<26} {:<22} min {:>10.1} ms  median {:>10.1} ms",
                r.implementation, r.name, r.min_ms, r.median_ms
            )
        };
        rows.extend(bench_search(&space, &shape, a.batch, a.repeats, device, &only, cl, show));
        if only.contains(&"final_train_step") {
            let cfg = NetworkConfig { channels: a.final_channels, layers: a.final_layers, ..Default::default() };
            let r = bench_final(&genotype, &cfg, &shape, a.final_batch, a.repeats, device, cl);
            show(&r);
            rows.push(r);
        }
    }
    let python = match a.pytorch.as_deref() {
        Some("none") => None,
        Some(p) => Some(p.to_string()),
        None => default_python(),
    };
    if let Some(py) = python {
        let script = std::env::temp_dir().join(format!("darts-reference-{}.py", std::process::id()));
        std::fs::write(&script, REFERENCE)?;
        let cuda = if device.is_cuda() { "cuda" } else { "cpu" };
        let search_steps: Vec<&str> = only.iter().copied().filter(|s| *s != "final_train_step").collect();
        let omp = std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "PASSIVE".into());
        let mut outputs = Vec::new();
        if !search_steps.is_empty() {
            outputs.push(
                Command::new(&py)
                    .arg(&script)
                    .args(["bench", "--batch", &a.batch.to_string(), "--size", &a.size.to_string()])
                    .args(["--channels", &a.channels.to_string(), "--layers", &a.layers.to_string()])
                    .args(["--repeats", &a.repeats.to_string(), "--threads", &threads.to_string()])
                    .args(["--only", &search_steps.join(","), "--device", cuda])
                    .env("OMP_WAIT_POLICY", &omp)
                    .output()
                    .with_context(|| format!("running the PyTorch reference with {py}"))?,
            );
        }
        if only.contains(&"final_train_step") {
            outputs.push(
                Command::new(&py)
                    .arg(&script)
                    .args(["bench-final", "--genotype", &genotype.to_string(), "--batch", &a.final_batch.to_string()])
                    .args(["--size", &a.size.to_string(), "--channels", &a.final_channels.to_string()])
                    .args(["--layers", &a.final_layers.to_string(), "--repeats", &a.repeats.to_string()])
                    .args(["--threads", &threads.to_string(), "--device", cuda])
                    .env("OMP_WAIT_POLICY", &omp)
                    .output()
                    .with_context(|| format!("running the PyTorch reference with {py}"))?,
            );
        }
        let _ = std::fs::remove_file(&script);
        for out in &outputs {
            if !out.status.success() {
                anyhow::bail!("the PyTorch reference failed:\n{}", String::from_utf8_lossy(&out.stderr));
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let v: serde_json::Value = serde_json::from_str(line).context("reference output")?;
                rows.push(BenchRow {
                    implementation: "pytorch".into(),
                    name: v["name"].as_str().unwrap_or("").into(),
                    min_ms: v["min_ms"].as_f64().unwrap_or(f64::NAN),
                    median_ms: v["median_ms"].as_f64().unwrap_or(f64::NAN),
                    peak_rss_mb: v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
                });
            }
        }
    }
    let mut impls: Vec<String> = Vec::new();
    for r in &rows {
        if !impls.contains(&r.implementation) {
            impls.push(r.implementation.clone());
        }
    }
    let header: Vec<String> = impls.iter().map(|i| format!("{i} median ms (peak MiB)")).collect();
    println!("| step | {} | ratio to PyTorch |", header.join(" | "));
    println!("|---|{}---|", "---:|".repeat(impls.len()));
    for name in &only {
        let find = |imp: &str| rows.iter().find(|r| r.implementation == imp && r.name == *name);
        let cells: Vec<String> = impls
            .iter()
            .map(|i| find(i).map_or("-".into(), |r| format!("{:.1} ({:.0})", r.median_ms, r.peak_rss_mb)))
            .collect();
        let ratios: Vec<String> = match find("pytorch") {
            Some(t) => impls
                .iter()
                .filter(|i| *i != "pytorch")
                .filter_map(|i| find(i).map(|o| format!("{}: {:.2}", i, o.median_ms / t.median_ms)))
                .collect(),
            None => vec![],
        };
        println!("| {name} | {} | {} |", cells.join(" | "), ratios.join(", "));
    }
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

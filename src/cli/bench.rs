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

/// One reference measurement in its own process (so that each peak RSS is its own and an out-of-memory
/// kill loses only that row). Returns the row, or why there is none.
fn reference_row(py: &str, script: &std::path::Path, args: &[String]) -> Result<BenchRow, String> {
    let omp = std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "PASSIVE".into());
    let out = Command::new(py)
        .arg(script)
        .args(args)
        .env("OMP_WAIT_POLICY", omp)
        .output()
        .map_err(|e| format!("could not run {py}: {e}"))?;
    if !out.status.success() {
        use std::os::unix::process::ExitStatusExt;
        return Err(match out.status.signal() {
            Some(9) => "killed (signal 9: out of memory)".to_string(),
            Some(s) => format!("killed by signal {s}"),
            None => {
                let err = String::from_utf8_lossy(&out.stderr);
                format!("failed: {}", err.lines().last().unwrap_or("no message"))
            }
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().ok_or("no output")?;
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("unreadable output: {e}"))?;
    Ok(BenchRow {
        implementation: "pytorch".into(),
        name: v["name"].as_str().unwrap_or("").into(),
        min_ms: v["min_ms"].as_f64().unwrap_or(f64::NAN),
        median_ms: v["median_ms"].as_f64().unwrap_or(f64::NAN),
        peak_rss_mb: v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
    })
}

/// Runs the benchmark: `--threads` (default 2 here) and `--device` are the global options; `--layout auto`
/// measures both layouts of ours, `nchw` or `channels-last` only that one. The PyTorch reference runs first,
/// one process per measurement, then ours in this process.
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
        "bench: batch {} x 3x{}x{}, C={}, {} cells; final network {} x {} cells, batch {}; {} threads, device {:?}",
        a.batch, a.size, a.size, a.channels, a.layers, a.final_channels, a.final_layers, a.final_batch, threads, device
    );
    let show = |r: &BenchRow| {
        eprintln!(
            "  {:<26} {:<22} min {:>10.1} ms  median {:>10.1} ms  peak {:>8.0} MiB",
            r.implementation, r.name, r.min_ms, r.median_ms, r.peak_rss_mb
        )
    };
    let mut rows = Vec::new();
    let mut failures: Vec<(String, String)> = Vec::new();
    let python = match a.pytorch.as_deref() {
        Some("none") => None,
        Some(p) => Some(p.to_string()),
        None => default_python(),
    };
    if let Some(py) = python {
        let script = std::env::temp_dir().join(format!("darts-reference-{}.py", std::process::id()));
        std::fs::write(&script, REFERENCE).context("writing the reference script")?;
        let cuda = if device.is_cuda() { "cuda" } else { "cpu" };
        for &name in &only {
            let common = ["--repeats".to_string(), a.repeats.to_string(), "--threads".into(), threads.to_string()];
            let mut args: Vec<String> = if name == "final_train_step" {
                vec![
                    "bench-final".into(),
                    "--genotype".into(),
                    genotype.to_string(),
                    "--batch".into(),
                    a.final_batch.to_string(),
                    "--channels".into(),
                    a.final_channels.to_string(),
                    "--layers".into(),
                    a.final_layers.to_string(),
                ]
            } else {
                vec![
                    "bench".into(),
                    "--only".into(),
                    name.into(),
                    "--batch".into(),
                    a.batch.to_string(),
                    "--channels".into(),
                    a.channels.to_string(),
                    "--layers".into(),
                    a.layers.to_string(),
                ]
            };
            args.extend(["--size".into(), a.size.to_string(), "--device".into(), cuda.into()]);
            args.extend(common);
            match reference_row(&py, &script, &args) {
                Ok(r) => {
                    show(&r);
                    rows.push(r);
                }
                Err(why) => {
                    eprintln!("  pytorch                    {name:<22} {why}");
                    failures.push((name.to_string(), why));
                }
            }
        }
        let _ = std::fs::remove_file(&script);
    }
    for cl in [false, true] {
        if (cl && rt.layout == darts::Layout::Nchw) || (!cl && rt.layout == darts::Layout::ChannelsLast) {
            continue;
        }
        rows.extend(bench_search(&space, &shape, a.batch, a.repeats, device, &only, cl, show));
        if only.contains(&"final_train_step") {
            let cfg = NetworkConfig { channels: a.final_channels, layers: a.final_layers, ..Default::default() };
            let r = bench_final(&genotype, &cfg, &shape, a.final_batch, a.repeats, device, cl);
            show(&r);
            rows.push(r);
        }
    }
    let mut impls: Vec<String> = vec!["pytorch".into()];
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
        let failed = failures.iter().find(|(n, _)| n == name).map(|(_, w)| w.clone());
        let cells: Vec<String> = impls
            .iter()
            .map(|i| match find(i) {
                Some(r) => format!("{:.1} ({:.0})", r.median_ms, r.peak_rss_mb),
                None if i == "pytorch" => failed.clone().unwrap_or_else(|| "-".into()),
                None => "-".into(),
            })
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
        let json = serde_json::json!({"rows": rows, "pytorch_failures": failures});
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

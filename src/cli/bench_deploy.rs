//! `darts bench --deploy`: inference of the final network in every engine (libtorch, tract, ONNX Runtime), batch
//! sizes interleaved over rounds.
use super::bench::{default_python, BenchArgs};
use anyhow::Result;
use darts::network::NetworkConfig;
use darts::space::DataShape;
use std::path::PathBuf;
use std::process::Command;

/// `darts bench --deploy`: the inference table.
pub(super) fn deploy_bench(
    a: &BenchArgs,
    threads: usize,
    genotype: darts::genotype::Genotype,
    network: NetworkConfig,
    shape: DataShape,
) -> Result<()> {
    use darts::deploy::bench::{bench_inference, InferencePlan};
    let rounds = a.rounds.unwrap_or(5);
    anyhow::ensure!(rounds >= 1, "--rounds {rounds}: use at least 1");
    anyhow::ensure!(a.deploy_batches.iter().all(|&b| b >= 1), "--deploy-batches: sizes of at least 1");
    let ort = if a.no_pytorch {
        None
    } else {
        a.pytorch
            .clone()
            .or_else(default_python)
            .filter(|py| Command::new(py).args(["-c", "import onnxruntime"]).output().is_ok_and(|o| o.status.success()))
    };
    if ort.is_none() {
        eprintln!("ONNX Runtime is not measured: no Python with onnxruntime (scripts/setup.sh installs it)");
    }
    let dir = tempfile_dir()?;
    let script = dir.join("ort_bench.py");
    std::fs::write(&script, ORT_BENCH)?;
    let plan = InferencePlan {
        genotype,
        network,
        shape,
        batches: a.deploy_batches.clone(),
        rounds,
        threads,
        ort: ort.map(|py| (py, script)),
    };
    let rows = bench_inference(&plan, &dir, |m| eprintln!("{m}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "inference, {} {}x{} on {}x{}x{} images, {threads} thread(s), median of {} interleaved rounds",
        a.final_genotype, a.final_channels, a.final_layers, shape.channels, shape.height, shape.width, rounds
    );
    println!("{:<32} {:>6} {:>12} {:>22} {:>10}", "engine", "batch", "ms/batch", "spread (ms)", "images/s");
    for &b in &a.deploy_batches {
        for r in rows.iter().filter(|r| r.batch == b) {
            println!(
                "{:<32} {:>6} {:>12.2} {:>22} {:>10.0}",
                r.engine,
                r.batch,
                1e3 * r.seconds,
                format!("{:.2}-{:.2}", 1e3 * r.spread.0, 1e3 * r.spread.1),
                r.images_per_second
            );
        }
    }
    if let Some(path) = &a.json {
        darts::rundir::write_json(path, &rows)?;
    }
    Ok(())
}

/// ONNX Runtime's timing helper, carried inside the binary.
const ORT_BENCH: &str = include_str!("../../bench/ort_bench.py");

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("darts-deploy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

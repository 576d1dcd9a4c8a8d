//! `darts bench --profile`: where one step of the supernet, or of the final network (`--final-network`), spends
//! its time, by op type.
use super::bench::BenchArgs;
use anyhow::Result;
use darts::bench::Variant;
use darts::network::NetworkConfig;
use darts::space::{DataShape, SearchSpace};

/// `darts bench --profile`: where one forward + backward + SGD step of the supernet (in variant `v`) spends its
/// time, by op type.
pub(super) fn profile(
    a: &BenchArgs,
    v: &Variant,
    space: &SearchSpace,
    shape: &DataShape,
    device: tch::Device,
    threads: i32,
) -> Result<()> {
    eprintln!(
        "profile of one forward + backward + SGD step: batch {} x 3x{}x{}, C={}, {} cells, {}, {threads} threads",
        a.batch,
        a.size,
        a.size,
        a.channels,
        a.layers,
        v.label()
    );
    let (rows, step_ms) = darts::bench::profile_search(space, shape, a.batch, a.repeats, device, v);
    print_profile(a, v, &rows, step_ms)
}

/// `darts bench --profile --final-network`: where a training step of the final network spends its time.
pub(super) fn profile_final(
    a: &BenchArgs,
    v: &Variant,
    genotype: &darts::genotype::Genotype,
    cfg: &NetworkConfig,
    shape: &DataShape,
    device: tch::Device,
    threads: i32,
) -> Result<()> {
    eprintln!(
        "profile of one training step of the final network: {} {}x{} cells, batch {} x 3x{}x{}, {}, {threads} threads",
        a.final_genotype,
        a.final_channels,
        a.final_layers,
        a.final_batch,
        a.size,
        a.size,
        v.label()
    );
    let (rows, step_ms) = darts::bench::profile_final(genotype, cfg, shape, (a.final_batch, a.repeats), device, v)?;
    print_profile(a, v, &rows, step_ms)
}

/// The profile table on stdout, and as JSON when asked.
fn print_profile(a: &BenchArgs, v: &Variant, rows: &[darts::bench::ProfileRow], step_ms: f64) -> Result<()> {
    let num = |v: f64, pct: bool| match (v.is_nan(), pct) {
        (true, _) => "-".to_string(),
        (false, true) => format!("{:.1}%", 100.0 * v),
        (false, false) => format!("{v:.1}"),
    };
    println!("| op | calls | forward in the step, ms | forward + backward alone, ms | share of the step |");
    println!("|---|---:|---:|---:|---:|");
    for r in rows {
        let (f, fb, sh) = (num(r.forward_ms, false), num(r.forward_backward_ms, false), num(r.share, true));
        println!("| {} | {} | {f} | {fb} | {sh} |", r.name, r.calls);
    }
    println!("| whole step | | | {step_ms:.1} | 100% |");
    if let Some(path) = &a.json {
        let json = serde_json::json!({"variant": v.name, "step_ms": step_ms, "rows": rows});
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

//! `darts bench`: our search step against the original PyTorch code, same shapes, same machine, one run.
use anyhow::{Context, Result};
use darts::bench::{bench_final, bench_search, BenchRow, Step, Variant, VariantKind};
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
    pub(super) batch: i64,
    /// Image height and width.
    #[arg(long, default_value_t = 32)]
    pub(super) size: usize,
    /// Initial channels C.
    #[arg(long, default_value_t = 16)]
    pub(super) channels: usize,
    /// Cells.
    #[arg(long, default_value_t = 8)]
    pub(super) layers: usize,
    /// Timed repeats after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub(super) repeats: usize,
    /// Which measurements, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(super) only: Vec<Step>,
    /// Final network: genotype (zoo name, file or text).
    #[arg(long, default_value = "DARTS_V2")]
    pub(super) final_genotype: String,
    /// Final network: initial channels.
    #[arg(long, default_value_t = 36)]
    pub(super) final_channels: usize,
    /// Final network: cells.
    #[arg(long, default_value_t = 20)]
    pub(super) final_layers: usize,
    /// Final network: batch size.
    #[arg(long, default_value_t = 96)]
    pub(super) final_batch: i64,
    /// Python with torch for the reference (default: darts' own venv).
    #[arg(long, conflicts_with = "no_pytorch")]
    pub(super) pytorch: Option<String>,
    /// Measure ours only, without the PyTorch reference.
    #[arg(long)]
    pub(super) no_pytorch: bool,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub(super) json: Option<PathBuf>,
    /// Our configurations, comma-separated: nchw, channels-last, checkpoint (gradient checkpointing of
    /// cells), pc-darts (partial channels K=4 + edge normalisation; needs --channels divisible by 8),
    /// pc-darts-checkpoint, bf16, gdas (default: the layouts --layout allows, then checkpoint).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(super) variants: Vec<VariantKind>,
    /// Instead of the comparison: where one forward + backward + SGD step of the supernet spends its time, by
    /// op type (first variant of --variants; "auto": the device's best layout).
    #[arg(long)]
    pub(super) profile: bool,
    /// With --profile: the final network's training step (--final-genotype, --final-channels, --final-layers,
    /// --final-batch) instead of the supernet's.
    #[arg(long, requires = "profile")]
    pub(super) final_network: bool,
    /// Instead of the comparison: inference speed of the final network (--final-genotype, --final-channels,
    /// --final-layers, images of --size) in libtorch, tract and ONNX Runtime (from the venv, when it has it), at
    /// the --deploy-batches sizes, interleaved over --rounds rounds.
    #[arg(long)]
    pub(super) deploy: bool,
    /// Instead of the comparison: an epoch of training (--final-genotype, --final-channels, --final-layers,
    /// --final-batch) and of first-order search (--batch, --channels, --layers) on --world processes x
    /// (--threads / --world) threads against one process x --threads threads, interleaved over --rounds rounds,
    /// with the share of the epoch spent in all-reduces.
    #[arg(long)]
    pub(super) data_parallel: bool,
    /// Processes for --data-parallel.
    #[arg(long, default_value_t = 2)]
    pub(super) world: usize,
    /// Training examples of the --data-parallel epochs.
    #[arg(long, default_value_t = 1024)]
    pub(super) dp_limit: usize,
    /// Batch sizes for --deploy.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 64])]
    pub(super) deploy_batches: Vec<usize>,
    /// Interleaved rounds: every measurement (the reference's and ours, each in its own process) once per round,
    /// in turn, so that the machine's drift lands in every column alike; ratios are taken within a round and
    /// their median and spread reported (default 3; 5 for --deploy).
    #[arg(long)]
    pub(super) rounds: Option<usize>,
    /// Internal: measure one variant in this process and print its rows as JSON lines.
    #[arg(long, hide = true, value_enum)]
    pub(super) one: Option<VariantKind>,
}

pub(super) fn default_python() -> Option<String> {
    let home = std::env::var_os("HOME")?;
    let cache =
        std::env::var_os("DARTS_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(home).join(".cache/darts"));
    let py = cache.join("venv/bin/python");
    py.is_file().then(|| py.display().to_string())
}

/// One measurement in its own process (so that each peak RSS is its own and an out-of-memory kill loses
/// only that row): `program args...` prints JSON rows, the last line is taken. Returns the row, or why
/// there is none.
fn measured_row(program: &str, args: &[String], implementation: &str) -> Result<BenchRow, String> {
    let omp = std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "PASSIVE".into());
    let mut cmd = Command::new(program);
    cmd.args(args).env("OMP_WAIT_POLICY", omp);
    // The reference runs with glibc's allocator as it does without darts: not with the tunable darts set for
    // itself (its own allocator settings, like darts' in-process ones, are not the reference's).
    let ours = std::env::current_exe().is_ok_and(|e| e.display().to_string() == program);
    if !ours && std::env::var_os(darts::allocator::SET_BY_DARTS).is_some() {
        cmd.env_remove("GLIBC_TUNABLES").env_remove(darts::allocator::SET_BY_DARTS);
    }
    let out = cmd.output().map_err(|e| format!("could not run {program}: {e}"))?;
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
        implementation: implementation.into(),
        name: v["name"].as_str().unwrap_or("").into(),
        min_ms: v["min_ms"].as_f64().unwrap_or(f64::NAN),
        median_ms: v["median_ms"].as_f64().unwrap_or(f64::NAN),
        peak_rss_mb: v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
        peak_cuda_mb: v["peak_cuda_mb"].as_f64(),
        aten_calls: v["aten_calls"].as_u64(),
    })
}

/// Runs the benchmark: `--threads` (default 2 here) and `--device` are the global options; `--layout auto`
/// measures both layouts of ours, `nchw` or `channels-last` only that one. The PyTorch reference runs first,
/// one process per measurement, then ours in this process.
pub fn run(a: BenchArgs, rt: &super::Runtime) -> Result<()> {
    rt.single_process("bench")?;
    let threads = rt.threads.unwrap_or(2);
    anyhow::ensure!(threads >= 1, "--threads {threads}: use at least 1");
    tch::set_num_threads(threads);
    let device = darts::device_from_name(&rt.device)?;
    let space = SearchSpace { channels: a.channels, layers: a.layers, ..Default::default() };
    let shape = DataShape { channels: 3, height: a.size, width: a.size, classes: 10 };
    space.validate_for(&shape)?;
    let only: Vec<Step> = if a.only.is_empty() { Step::ALL.to_vec() } else { a.only.clone() };
    let genotype = darts::rundir::resolve_genotype(&a.final_genotype)?;
    let final_cfg = NetworkConfig { channels: a.final_channels, layers: a.final_layers, ..Default::default() };
    if a.deploy {
        return super::bench_deploy::deploy_bench(&a, threads as usize, genotype, final_cfg, shape);
    }
    if a.data_parallel {
        return super::bench_dp::bench_data_parallel(&super::bench_dp::DpPlan {
            world: a.world,
            threads: threads as usize,
            rounds: a.rounds.unwrap_or(3),
            limit: a.dp_limit,
            search: (a.batch, a.channels, a.layers),
            train: (a.final_batch, a.final_channels, a.final_layers, a.final_genotype.clone()),
        });
    }
    let graphs_here = |kinds: &[VariantKind]| -> Result<()> {
        match darts::graphs::unavailable_on(device) {
            Some(why) if kinds.contains(&VariantKind::CudaGraphs) => {
                anyhow::bail!("--variants cuda-graphs: {why}; leave it out, or bench on a GPU (--device cuda)")
            }
            _ => Ok(()),
        }
    };
    if let Some(kind) = a.one {
        graphs_here(&[kind])?;
        let variant = Variant::of(kind, rt.layout.channels_last(device));
        let print = |r: &BenchRow| println!("{}", serde_json::to_string(r).unwrap_or_default());
        if variant.has_search() {
            bench_search(&space, &shape, a.batch, a.repeats, device, &only, &variant, print);
        }
        if only.contains(&Step::FinalTrainStep) && variant.has_final() {
            print(&bench_final(&genotype, &final_cfg, &shape, (a.final_batch, a.repeats), device, &variant)?);
        }
        return Ok(());
    }
    let kinds: Vec<VariantKind> = if a.variants.is_empty() {
        let mut v = match rt.layout {
            darts::Layout::Nchw => vec![VariantKind::Nchw],
            darts::Layout::ChannelsLast => vec![VariantKind::ChannelsLast],
            darts::Layout::Auto => vec![VariantKind::Nchw, VariantKind::ChannelsLast],
        };
        v.push(VariantKind::Checkpoint);
        v
    } else {
        a.variants.clone()
    };
    graphs_here(&kinds)?;
    let variants: Vec<Variant> = kinds.iter().map(|&k| Variant::of(k, rt.layout.channels_last(device))).collect();
    for v in &variants {
        SearchSpace { partial_channels: v.partial_channels, ..space.clone() }
            .validate()
            .with_context(|| v.name.clone())?;
    }
    if a.profile {
        let v = if a.variants.is_empty() {
            let best = if rt.layout.channels_last(device) { VariantKind::ChannelsLast } else { VariantKind::Nchw };
            Variant::of(best, false)
        } else {
            variants[0].clone()
        };
        if a.final_network {
            return super::bench_profile::profile_final(&a, &v, &genotype, &final_cfg, &shape, device, threads);
        }
        return super::bench_profile::profile(&a, &v, &space, &shape, device, threads);
    }
    eprintln!(
        "bench: batch {} x 3x{}x{}, C={}, {} cells; final network {} x {} cells, batch {}; {} threads, device {:?}",
        a.batch, a.size, a.size, a.channels, a.layers, a.final_channels, a.final_layers, a.final_batch, threads, device
    );
    let rounds = a.rounds.unwrap_or(3);
    anyhow::ensure!(rounds >= 1, "--rounds {rounds}: use at least 1");
    let plan = Plan { a: &a, only, variants, genotype, device, threads, device_name: rt.device.clone() };
    let python = match (&a.pytorch, a.no_pytorch) {
        (_, true) => None,
        (Some(p), false) => Some(p.clone()),
        (None, false) => default_python(),
    };
    let script = std::env::temp_dir().join(format!("darts-reference-{}.py", std::process::id()));
    let mut jobs = Vec::new();
    if let Some(py) = &python {
        std::fs::write(&script, REFERENCE).context("writing the reference script")?;
        jobs.extend(reference_jobs(&plan, py, &script));
    }
    jobs.extend(our_jobs(&plan)?);
    let mut results = Results::default();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        // Step by step, every implementation in turn; every other round in the opposite order.
        let mut order: Vec<&Job> = Vec::new();
        for step in &plan.only {
            order.extend(jobs.iter().filter(|j| j.step == *step));
        }
        if round % 2 == 1 {
            order.reverse();
        }
        for job in order {
            results.add(round, &job.label, job.step.name(), measured_row(&job.program, &job.args, &job.label));
        }
    }
    let _ = std::fs::remove_file(&script);
    print_table(&plan, &results, rounds)
}

/// The reference's columns: float32 NCHW (the original code), float32 channels-last (PyTorch at its best on a
/// CPU), and bf16 autocast.
const TORCH: &str = "pytorch";
const TORCH_CL: &str = "pytorch channels-last";
const TORCH_BF16: &str = "pytorch (bf16)";

/// What one comparison measures.
struct Plan<'a> {
    a: &'a BenchArgs,
    only: Vec<Step>,
    variants: Vec<Variant>,
    genotype: darts::genotype::Genotype,
    device: tch::Device,
    threads: i32,
    /// `--device` as given, for our measuring processes.
    device_name: String,
}

/// One measurement in its own process: whose, which step, and the command line.
struct Job {
    label: String,
    step: Step,
    program: String,
    args: Vec<String>,
}

/// The rows measured, by round, and the measurements that failed: (implementation, step, why).
#[derive(Default)]
struct Results {
    rows: Vec<(usize, BenchRow)>,
    failures: Vec<(String, String, String)>,
}

impl Results {
    /// Keeps a measurement's row, or why there is none, and says it on stderr.
    fn add(&mut self, round: usize, label: &str, step: &str, row: Result<BenchRow, String>) {
        match row {
            Ok(r) => {
                eprintln!(
                    "  {:<26} {:<22} min {:>10.1} ms  median {:>10.1} ms  peak {:>8.0} MiB{}{}",
                    r.implementation,
                    r.name,
                    r.min_ms,
                    r.median_ms,
                    r.peak_rss_mb,
                    r.peak_cuda_mb.map_or(String::new(), |g| format!("  GPU peak {g:.0} MiB")),
                    r.aten_calls.map_or(String::new(), |n| format!("  {n} ATen calls"))
                );
                self.rows.push((round, r));
            }
            Err(why) => {
                eprintln!("  {label:<26} {step:<22} {why}");
                if !self.failures.iter().any(|(l, s, _)| l == label && s == step) {
                    self.failures.push((label.to_string(), step.to_string(), why));
                }
            }
        }
    }

    /// The rows of implementation `imp` for step `name`, round by round.
    fn of(&self, imp: &str, name: &str) -> Vec<(usize, &BenchRow)> {
        self.rows.iter().filter(|(_, r)| r.implementation == imp && r.name == name).map(|(k, r)| (*k, r)).collect()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The PyTorch reference's measurements, run by `py` from `script`.
fn reference_jobs(p: &Plan, py: &str, script: &std::path::Path) -> Vec<Job> {
    let cuda = if p.device.is_cuda() { "cuda" } else { "cpu" };
    // PyTorch's final step in bf16 autocast too when a bf16 variant of ours is measured.
    let bf16 = p.variants.iter().any(|v| v.precision == darts::native::Precision::Bf16);
    let mut kinds: Vec<(Step, bool, bool)> = Vec::new();
    for &s in &p.only {
        kinds.push((s, false, false));
        kinds.push((s, true, false));
    }
    if bf16 && p.only.contains(&Step::FinalTrainStep) {
        kinds.push((Step::FinalTrainStep, false, true));
    }
    kinds
        .into_iter()
        .map(|(step, channels_last, amp)| {
            let label = match (channels_last, amp) {
                (_, true) => TORCH_BF16,
                (true, false) => TORCH_CL,
                (false, false) => TORCH,
            };
            let mut args: Vec<String> = vec![script.display().to_string()];
            if step == Step::FinalTrainStep {
                args.extend([
                    "bench-final".into(),
                    "--genotype".into(),
                    p.genotype.to_string(),
                    "--batch".into(),
                    p.a.final_batch.to_string(),
                    "--channels".into(),
                    p.a.final_channels.to_string(),
                    "--layers".into(),
                    p.a.final_layers.to_string(),
                    "--amp".into(),
                    if amp { "bf16" } else { "none" }.into(),
                ]);
            } else {
                args.extend([
                    "bench".into(),
                    "--only".into(),
                    step.name().into(),
                    "--batch".into(),
                    p.a.batch.to_string(),
                    "--channels".into(),
                    p.a.channels.to_string(),
                    "--layers".into(),
                    p.a.layers.to_string(),
                ]);
            }
            args.extend(["--size".into(), p.a.size.to_string(), "--device".into(), cuda.into()]);
            args.extend(["--repeats".into(), p.a.repeats.to_string(), "--threads".into(), p.threads.to_string()]);
            if channels_last {
                args.push("--channels-last".into());
            }
            Job { label: label.into(), step, program: py.into(), args }
        })
        .collect()
}

/// Our measurements, one process per variant and step (each peak memory its own; an out-of-memory kill loses only
/// its row).
fn our_jobs(p: &Plan) -> Result<Vec<Job>> {
    let exe = std::env::current_exe().context("finding the darts binary")?.display().to_string();
    let mut jobs = Vec::new();
    for v in &p.variants {
        for &step in &p.only {
            let name = step.name();
            let wanted = if step.of_search() { v.has_search() && v.has_step(step) } else { v.has_final() };
            if !wanted {
                continue;
            }
            let mut args: Vec<String> =
                vec!["bench".into(), "--one".into(), v.name.clone(), "--only".into(), name.into()];
            for (flag, value) in [
                ("--batch", p.a.batch.to_string()),
                ("--size", p.a.size.to_string()),
                ("--channels", p.a.channels.to_string()),
                ("--layers", p.a.layers.to_string()),
                ("--repeats", p.a.repeats.to_string()),
                ("--final-genotype", p.genotype.to_string()),
                ("--final-channels", p.a.final_channels.to_string()),
                ("--final-layers", p.a.final_layers.to_string()),
                ("--final-batch", p.a.final_batch.to_string()),
                ("--threads", p.threads.to_string()),
                ("--device", p.device_name.clone()),
                ("--layout", if v.channels_last { "channels-last" } else { "nchw" }.to_string()),
            ] {
                args.extend([flag.to_string(), value]);
            }
            jobs.push(Job { label: v.label(), step, program: exe.clone(), args });
        }
    }
    Ok(jobs)
}

/// The comparison table on stdout (medians over rounds; ratios taken within each round, their median and
/// spread), the ATen calls per step, and the rows as JSON when asked.
fn print_table(p: &Plan, results: &Results, rounds: usize) -> Result<()> {
    let bf16 = |v: &Variant| v.precision == darts::native::Precision::Bf16;
    let mut columns: Vec<String> = vec![TORCH.into(), TORCH_CL.into()];
    if p.variants.iter().any(bf16) {
        columns.push(TORCH_BF16.into());
    }
    columns.extend(p.variants.iter().map(Variant::label));
    // Peak memory: the CUDA allocator's peak on a GPU, the process's peak RSS on the CPU.
    let mem = if p.device.is_cuda() { "GPU peak MiB" } else { "peak RSS MiB" };
    println!("median of {rounds} interleaved round(s); a ratio is ours / the reference's in the same round");
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "unset".into());
    println!(
        "every process (ours and the reference) ran with OMP_WAIT_POLICY={} GOMP_SPINCOUNT={}{}",
        var("OMP_WAIT_POLICY"),
        var("GOMP_SPINCOUNT"),
        match (std::env::var_os(darts::allocator::SET_BY_DARTS), std::env::var("GLIBC_TUNABLES")) {
            (Some(_), Ok(t)) => format!("; ours (not the reference) also with GLIBC_TUNABLES={t}"),
            (None, Ok(t)) => format!(" GLIBC_TUNABLES={t}"),
            _ => String::new(),
        }
    );
    let header: Vec<String> = columns.iter().map(|i| format!("{i} ms ({mem})")).collect();
    println!("| step | {} | ratio to PyTorch channels-last | ratio to PyTorch NCHW |", header.join(" | "));
    println!("|---|{}---|---|", "---:|".repeat(columns.len()));
    let failed =
        |i: &str, name: &str| results.failures.iter().find(|(f, n, _)| f == i && n == name).map(|(_, _, w)| w.clone());
    for name in p.only.iter().map(|s| s.name()) {
        let cells: Vec<String> = columns
            .iter()
            .map(|i| {
                let rows = results.of(i, name);
                if rows.is_empty() {
                    return failed(i, name).unwrap_or_else(|| "-".into());
                }
                let ms = median(rows.iter().map(|(_, r)| r.median_ms).collect());
                let mem = rows.iter().map(|(_, r)| r.peak_cuda_mb.unwrap_or(r.peak_rss_mb)).fold(0.0, f64::max);
                format!("{ms:.1} ({mem:.0})")
            })
            .collect();
        let ratio_to = |reference: &str| -> Vec<String> {
            p.variants
                .iter()
                .filter_map(|v| {
                    let refs = if bf16(v) { TORCH_BF16 } else { reference };
                    let theirs = results.of(refs, name);
                    let per_round: Vec<f64> = results
                        .of(&v.label(), name)
                        .iter()
                        .filter_map(|(k, o)| {
                            theirs.iter().find(|(kt, _)| kt == k).map(|(_, t)| o.median_ms / t.median_ms)
                        })
                        .collect();
                    if per_round.is_empty() {
                        return None;
                    }
                    let lo = per_round.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = per_round.iter().copied().fold(0.0, f64::max);
                    Some(format!("{}: {:.2} ({lo:.2}-{hi:.2})", v.label(), median(per_round)))
                })
                .collect()
        };
        println!(
            "| {name} | {} | {} | {} |",
            cells.join(" | "),
            ratio_to(TORCH_CL).join(", "),
            ratio_to(TORCH).join(", ")
        );
    }
    println!();
    println!("ATen operator calls per step (torch.profiler's aten:: events; does not drift with the machine):");
    println!("| step | {} |", columns.join(" | "));
    println!("|---|{}", "---:|".repeat(columns.len()));
    for name in p.only.iter().map(|s| s.name()) {
        let cells: Vec<String> = columns
            .iter()
            .map(|i| results.of(i, name).first().and_then(|(_, r)| r.aten_calls).map_or("-".into(), |n| n.to_string()))
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    if let Some(path) = &p.a.json {
        let failures: Vec<_> =
            results.failures.iter().map(|(i, n, w)| serde_json::json!({"impl": i, "name": n, "why": w})).collect();
        let rows: Vec<_> = results
            .rows
            .iter()
            .map(|(k, r)| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["round"] = serde_json::json!(k);
                v
            })
            .collect();
        let json = serde_json::json!({"rounds": rounds, "rows": rows, "failures": failures});
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

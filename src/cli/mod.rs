//! Subcommands, one file each.
use clap::{Parser, Subcommand};

mod args;
mod baseline;
mod bench;
mod bench_deploy;
mod bench_dp;
mod bench_profile;
mod compare;
mod data;
mod deploy;
mod genotype;
mod info;
mod pipeline;
mod report;
mod search;
mod show;
mod train;

/// Differentiable architecture search (DARTS) for convolutional networks.
#[derive(Parser, Debug)]
#[command(name = "darts", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    runtime: Runtime,
}

/// Options that change how, not what, darts computes.
#[derive(clap::Args, Debug)]
pub struct Runtime {
    /// cpu, cuda or auto.
    #[arg(long, global = true, default_value = "auto")]
    pub device: String,
    /// CPU threads for libtorch (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<i32>,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Memory layout: auto (channels-last on CPU, NCHW on CUDA), nchw or channels-last.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub layout: darts::Layout,
    /// Replay each search and training step's passes as CUDA graphs (same results, one launch per pass instead
    /// of thousands; GPU only; GDAS, skip dropout and data-parallel runs stay eager).
    #[arg(long, global = true)]
    pub cuda_graphs: bool,
}

impl Runtime {
    /// Applies the thread count and picks the device.
    pub fn device(&self) -> anyhow::Result<tch::Device> {
        if let Some(t) = self.threads {
            anyhow::ensure!(t >= 1, "--threads {t}: use at least 1");
            tch::set_num_threads(t);
        }
        darts::device_from_name(&self.device)
    }

    /// The device and process group of a data-parallel run when torchrun's environment describes one (the
    /// device: GPU `LOCAL_RANK` where the device is CUDA), else the device alone.
    /// Refuses `--cuda-graphs` off a CUDA device.
    pub fn launch(&self) -> anyhow::Result<(tch::Device, Option<std::sync::Arc<darts::dist::Dist>>)> {
        let device = self.device()?;
        if self.cuda_graphs {
            darts::graphs::require(device)?;
        }
        let Some(launch) = darts::dist::Launch::from_env()? else { return Ok((device, None)) };
        let device = match device {
            tch::Device::Cuda(_) => {
                let count = tch::Cuda::device_count() as usize;
                anyhow::ensure!(
                    launch.local_rank < count,
                    "LOCAL_RANK={} but this node has {count} CUDA device(s): one process per GPU (torchrun \
                     --nproc-per-node {count} at most), or --device cpu",
                    launch.local_rank
                );
                tch::Device::Cuda(launch.local_rank)
            }
            other => other,
        };
        let timeout = std::env::var("DARTS_DIST_TIMEOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
        Ok((device, Some(std::sync::Arc::new(darts::dist::Dist::join(launch, timeout, device)?))))
    }

    /// The run options of a search or training in `given` (else a fresh directory for `kind`): the device and
    /// process group of the launch, `control`'s checkpoints and stop, and, alone, a stop on SIGTERM/SIGINT.
    pub fn run_options(
        &self,
        given: Option<&std::path::PathBuf>,
        kind: &str,
        control: &args::RunControl,
    ) -> anyhow::Result<darts::run::RunOptions> {
        let (device, dist) = self.launch()?;
        let mut opts = self.options(run_dir(given, kind, dist.is_some())?, device);
        // Under torchrun too: it passes SIGTERM on to every worker, and the ranks agree to stop at one step.
        opts.stop = Some(darts::interrupt::stop_on_signals()?);
        opts.dist = dist;
        opts.stop_after = control.stop_after;
        opts.checkpoint_every = control.checkpoint_every;
        opts.checkpoint_minutes = control.checkpoint_minutes;
        Ok(opts)
    }

    /// Refuses to run `command` in a multi-process launch it does not support yet.
    pub fn single_process(&self, command: &str) -> anyhow::Result<()> {
        if let Some(l) = darts::dist::Launch::from_env()? {
            anyhow::bail!(
                "darts {command} does not run data-parallel yet (WORLD_SIZE={}; only darts train does): start it as \
                 one process, without torchrun",
                l.world
            );
        }
        Ok(())
    }

    /// Runs tract on `--threads` threads, else on one (faster than two on a 2-core machine: README, Deploy).
    pub fn set_tract_threads(&self) {
        darts::deploy::runtime::set_tract_threads(self.threads.map_or(1, |t| t.max(1) as usize));
    }

    /// Whether progress bars are off.
    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// Run options for `out_dir` on `device`.
    pub fn options(&self, out_dir: std::path::PathBuf, device: tch::Device) -> darts::run::RunOptions {
        darts::run::RunOptions {
            progress: !self.quiet,
            layout: self.layout,
            cuda_graphs: self.cuda_graphs,
            ..darts::run::RunOptions::new(out_dir, device)
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Search a cell with DARTS on a dataset and write the genotype it finds.
    Search(search::SearchArgs),
    /// Train a genotype's network from scratch on the full training set; evaluate on the test set.
    Train(train::TrainArgs),
    /// Evaluate a trained model on the test set.
    Eval(train::EvalArgs),
    /// Search, derive, train from scratch and evaluate, in one run directory.
    Run(Box<pipeline::RunArgs>),
    /// Write a trained network as an ONNX file (checked in tract before it is written).
    Export(deploy::ExportArgs),
    /// Classify image files (PNG, JPEG) with a trained network: its run directory or its ONNX file.
    Predict(deploy::PredictArgs),
    /// Parameters and multiply-accumulates of a genotype's network.
    Info(info::InfoArgs),
    /// Random search or RL (REINFORCE) on the same space: sample cells, train each briefly, keep the best.
    Baseline(baseline::BaselineArgs),
    /// DARTS against random search and RL: same space, data and time budget; each found cell trained and tested.
    Compare(compare::CompareArgs),
    /// Time our search step against the original PyTorch code on the same shapes.
    Bench(bench::BenchArgs),
    /// Read a genotype (JSON or DARTS Python text), check it, and print it in either format.
    Genotype(genotype::GenotypeArgs),
    /// Datasets: download the standard ones (checksummed, resumable), list what darts knows.
    Data(data::DataArgs),
    /// Draw a genotype's cells: a terminal view, and DOT, SVG and PNG files.
    Show(show::ShowArgs),
    /// Write the HTML report (and figures/) of a run directory: search, training or `darts run`.
    Report(report::ReportArgs),
}

/// The run directory: `given`, else a fresh time-stamped one under runs/ for `kind` (a data-parallel run needs it
/// given: every rank must name the same one, and time stamps could differ between them).
pub fn run_dir(
    given: Option<&std::path::PathBuf>,
    kind: &str,
    data_parallel: bool,
) -> anyhow::Result<std::path::PathBuf> {
    match given {
        Some(dir) => Ok(dir.clone()),
        None if data_parallel => anyhow::bail!("a data-parallel {kind} needs --out DIR (the same on every rank)"),
        None => Ok(darts::rundir::default_dir(kind)),
    }
}

/// Writes the report of the run directory `dir` and says where. A failure is only a warning: the run's results
/// are saved already, and `darts report DIR` tries again.
pub fn write_report(dir: &std::path::Path) {
    match darts::report::write_report(dir) {
        Ok(path) => eprintln!("report: {}", path.display()),
        Err(e) => {
            eprintln!("warning: could not write the report ({e:#}); `darts report {}` tries again", dir.display())
        }
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = &cli.runtime;
    match cli.command {
        Command::Search(a) => search::run(a, rt),
        Command::Train(a) => train::run(a, rt),
        Command::Eval(a) => train::eval(a, rt),
        Command::Run(a) => pipeline::run(*a, rt),
        Command::Info(a) => info::run(a),
        Command::Export(a) => deploy::export(a, rt),
        Command::Predict(a) => deploy::predict(a, rt),
        Command::Bench(a) => bench::run(a, rt),
        Command::Baseline(a) => baseline::run(a, rt),
        Command::Compare(a) => compare::run(a, rt),
        Command::Genotype(a) => genotype::run(a),
        Command::Show(a) => show::run(a),
        Command::Data(a) => data::run(a, rt),
        Command::Report(a) => report::run(a),
    }
}

//! `darts genotype`: check and convert genotypes, or derive one again from a search run's architecture weights.
use anyhow::{bail, Result};
use darts::genotype::{skip_connects, Genotype};
use darts::report::SearchRun;
use darts::rundir;
use std::path::{Path, PathBuf};

/// Arguments of `darts genotype`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  darts genotype runs/fmnist/genotype.txt --json\n  darts genotype \"Genotype(normal=[...], ...)\"\n  darts genotype runs/fmnist --max-skip-connects 2     # derive again, at most 2 skip connections\n  darts genotype runs/fmnist --epoch 20               # the cell after epoch 20 (before a collapse)"
)]
pub struct GenotypeArgs {
    /// A zoo name, a genotype file (JSON or DARTS Python text), the text itself, or a search run directory (or a
    /// `darts run` directory) to derive the genotype from its architecture weights again.
    genotype: String,
    /// Print JSON instead of DARTS Python text.
    #[arg(long)]
    json: bool,
    /// Run directory: derive from the architecture weights after this epoch (1-based; default the last).
    #[arg(long, value_name = "E")]
    epoch: Option<usize>,
    /// Run directory: derive with at most M skip_connect edges in the normal cell (P-DARTS's rule; default: the
    /// run's own setting).
    #[arg(long, value_name = "M")]
    max_skip_connects: Option<usize>,
}

/// The search directory of a run directory: itself, or the `search/` folder of a `darts run` directory.
fn search_dir(path: &Path) -> Option<PathBuf> {
    [path.to_path_buf(), path.join(rundir::SEARCH_STAGE)].into_iter().find(|d| d.join(rundir::CONFIG).is_file())
}

/// The genotype derived after epoch `epoch` (1-based, default the last) of the search in `dir`.
fn derive_again(dir: &Path, epoch: Option<usize>, max_skip: Option<usize>) -> Result<Genotype> {
    let run = SearchRun::load(dir)?;
    let n = run.epochs.len();
    if n == 0 {
        bail!("{} has no finished epoch yet (metrics.jsonl is empty): nothing to derive from", dir.display());
    }
    let e = epoch.unwrap_or(n);
    if e == 0 || e > n {
        bail!("--epoch {e}: {} has epochs 1 to {n}", dir.display());
    }
    let limit = max_skip.or(run.config.max_skip_connects);
    let g = run.epochs[e - 1].derive(&run.config.space, limit);
    let limit = limit.map_or("no skip-connect limit".to_string(), |m| format!("at most {m} skip connections"));
    eprintln!(
        "derived after epoch {e} of {n} of {}, {limit}: {} skip connections in the normal cell",
        dir.display(),
        skip_connects(&g.normal)
    );
    Ok(g)
}

pub fn run(a: GenotypeArgs) -> Result<()> {
    let path = Path::new(&a.genotype);
    let g = if path.is_dir() {
        let Some(dir) = search_dir(path) else {
            bail!(
                "{} is a folder but not a search run directory (no config.json in it or in its search/ folder)",
                path.display()
            );
        };
        derive_again(&dir, a.epoch, a.max_skip_connects)?
    } else {
        if a.epoch.is_some() || a.max_skip_connects.is_some() {
            bail!(
                "--epoch and --max-skip-connects derive again from a search run directory; {} is not one",
                a.genotype
            );
        }
        darts::rundir::resolve_genotype(&a.genotype)?
    };
    if a.json {
        println!("{}", g.to_json());
    } else {
        println!("{g}");
    }
    Ok(())
}

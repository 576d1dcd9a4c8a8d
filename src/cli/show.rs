//! `darts show`: a genotype's cells in the terminal and as DOT, SVG and PNG files.
use anyhow::{Context, Result};
use darts::genotype::Genotype;
use darts::viz::cell::{cell_text, CellKind};
use std::path::{Path, PathBuf};

/// Arguments of `darts show`.
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// A zoo name (e.g. DARTS_V2), a genotype file (JSON or DARTS Python text), the text itself, or a run
    /// directory (its genotype.json, or search/genotype.json).
    genotype: String,
    /// Where to write normal.{dot,svg,png} and reduce.{dot,svg,png} (default: cells-<name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only the terminal view; write no files.
    #[arg(long)]
    no_files: bool,
}

fn resolve(arg: &str) -> Result<Genotype> {
    let dir = Path::new(arg);
    if dir.is_dir() {
        for f in ["genotype.json", "search/genotype.json", "train/genotype.json"] {
            let path = dir.join(f);
            if path.is_file() {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                return Genotype::parse(text.trim()).with_context(|| format!("in {}", path.display()));
            }
        }
        anyhow::bail!("{arg} is a folder without genotype.json (nor search/genotype.json): has its search finished?");
    }
    darts::zoo::resolve(arg)
}

pub fn run(a: ShowArgs) -> Result<()> {
    let g = resolve(&a.genotype)?;
    println!("{g}\n");
    for kind in CellKind::both() {
        println!("{}", cell_text(&g, kind));
    }
    if a.no_files {
        return Ok(());
    }
    let name: String = if darts::zoo::get(&a.genotype).is_some() {
        a.genotype.clone()
    } else {
        Path::new(&a.genotype)
            .file_stem()
            .map(|s| {
                s.to_string_lossy().chars().filter(|c| c.is_alphanumeric() || "-_".contains(*c)).take(40).collect()
            })
            .filter(|s: &String| !s.is_empty())
            .unwrap_or_else(|| "genotype".into())
    };
    let out = a.out.unwrap_or_else(|| PathBuf::from(format!("cells-{name}")));
    darts::report::write_cell_figures(&out, &g, "")?;
    for kind in CellKind::both() {
        for ext in ["dot", "svg", "png"] {
            println!("wrote {}", out.join(format!("{}.{ext}", kind.name())).display());
        }
    }
    Ok(())
}

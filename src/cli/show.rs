//! `darts show`: a genotype's cells in the terminal and as DOT, SVG and PNG files.
use anyhow::Result;
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

pub fn run(a: ShowArgs) -> Result<()> {
    let g = darts::rundir::resolve_genotype(&a.genotype)?;
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

//! `darts genotype`: check and convert genotypes.
use anyhow::{Context, Result};
use darts::genotype::Genotype;

/// Arguments of `darts genotype`.
#[derive(clap::Args, Debug)]
pub struct GenotypeArgs {
    /// A genotype file (JSON or DARTS Python text), or the text itself.
    genotype: String,
    /// Print JSON instead of DARTS Python text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: GenotypeArgs) -> Result<()> {
    let text = if std::path::Path::new(&a.genotype).is_file() {
        std::fs::read_to_string(&a.genotype).with_context(|| format!("reading {}", a.genotype))?
    } else {
        a.genotype.clone()
    };
    let g = Genotype::parse(text.trim())
        .with_context(|| format!("in {}", a.genotype.chars().take(60).collect::<String>()))?;
    if a.json {
        println!("{}", g.to_json());
    } else {
        println!("{g}");
    }
    Ok(())
}

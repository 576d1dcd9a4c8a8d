//! `darts report`: the HTML report of a run directory.
use anyhow::Result;
use std::path::PathBuf;

/// Arguments of `darts report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// A run directory: of `darts search`, `darts train` or `darts run`.
    dir: PathBuf,
}

pub fn run(a: ReportArgs) -> Result<()> {
    let path = darts::report::write_report(&a.dir)?;
    println!("{}", path.display());
    Ok(())
}

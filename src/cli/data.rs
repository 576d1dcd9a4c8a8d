//! `darts data`: get the standard datasets.
use anyhow::{Context, Result};
use darts::data::download;
use darts::data::DatasetKind;
use std::path::PathBuf;

/// Arguments of `darts data`.
#[derive(clap::Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DataCommand {
    /// Download a dataset from its canonical location (SHA-256 checked, resumed if interrupted).
    Get {
        /// mnist, fashion-mnist, kmnist, cifar10 or cifar100.
        #[arg(value_enum)]
        name: DatasetKind,
        /// Folder to put the files in (default: where darts looks, ~/.cache/darts/data/<name>).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Another server holding the same files (a mirror), tried instead of the canonical ones.
        #[arg(long)]
        base_url: Option<String>,
    },
    /// The datasets darts can download, and where they would go.
    List,
}

pub fn run(a: DataArgs, rt: &super::Runtime) -> Result<()> {
    match a.command {
        DataCommand::Get { name, dir, base_url } => {
            let mut src = download::source(name).with_context(|| {
                format!(
                    "darts cannot download {} yet: put its files in a folder and pass --data-dir (see README)",
                    name.name()
                )
            })?;
            if let Some(url) = base_url {
                src.urls = vec![url];
            }
            let dir = dir.unwrap_or_else(|| download::default_dir(name));
            let dir = download::fetch(name.name(), &src, &dir, !rt.quiet())?;
            println!("{}", dir.display());
        }
        DataCommand::List => {
            for kind in download::downloadable() {
                if let Some(src) = download::source(kind) {
                    let total: u64 = src.files.iter().map(|f| f.size).sum();
                    println!(
                        "{:<14} {:>6.1} MB  {}  -> {}",
                        kind.name(),
                        total as f64 / 1e6,
                        src.urls[0],
                        download::default_dir(kind).display()
                    );
                }
            }
        }
    }
    Ok(())
}

//! Subcommands, one file each.
use clap::{Parser, Subcommand};

mod bench;
mod genotype;
mod search;

/// Differentiable architecture search (DARTS) for convolutional networks.
#[derive(Parser, Debug)]
#[command(name = "darts", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Search a cell with DARTS on a dataset and write the genotype it finds.
    Search(search::SearchArgs),
    /// Time our search step against the original PyTorch code on the same shapes.
    Bench(bench::BenchArgs),
    /// Read a genotype (JSON or DARTS Python text), check it, and print it in either format.
    Genotype(genotype::GenotypeArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Search(a) => search::run(a),
        Command::Genotype(a) => genotype::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

//! `darts info`: size and cost of a genotype's network.
use anyhow::Result;
use darts::network::{network_cost, Network, NetworkConfig};
use darts::space::DataShape;
use tch::{nn, Device};

/// Arguments of `darts info`.
#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// A zoo name, a genotype file, or the DARTS Python text.
    genotype: String,
    /// The ImageNet variant (defaults then: 48 channels, 14 cells, 1000 classes, 224x224).
    #[arg(long)]
    imagenet: bool,
    /// Initial channels (default 36).
    #[arg(long)]
    channels: Option<usize>,
    /// Cells (default 20).
    #[arg(long)]
    layers: Option<usize>,
    /// Classes (default 10).
    #[arg(long)]
    classes: Option<usize>,
    /// Input channels.
    #[arg(long, default_value_t = 3)]
    in_channels: usize,
    /// Image height and width (default 32).
    #[arg(long)]
    size: Option<usize>,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let g = darts::rundir::resolve_genotype(&a.genotype)?;
    let base = if a.imagenet { NetworkConfig::imagenet() } else { NetworkConfig::default() };
    let cfg = NetworkConfig {
        channels: a.channels.unwrap_or(base.channels),
        layers: a.layers.unwrap_or(base.layers),
        ..base
    };
    let size = a.size.unwrap_or(if a.imagenet { 224 } else { 32 });
    let classes = a.classes.unwrap_or(if a.imagenet { 1000 } else { 10 });
    let shape = DataShape { channels: a.in_channels, height: size, width: size, classes };
    anyhow::ensure!(cfg.channels >= 2 && cfg.channels.is_multiple_of(2), "--channels must be even and at least 2");
    anyhow::ensure!(cfg.layers >= 3, "--layers must be at least 3");
    anyhow::ensure!(size >= cfg.min_image_size(), "--size must be at least {}", cfg.min_image_size());
    anyhow::ensure!(classes >= 2, "--classes must be at least 2");
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Network::new(&vs.root(), &g, &cfg, &shape);
    let cost = network_cost(&net, &vs, &shape);
    let (params, total, macs) = (cost.parameters, cost.parameters_with_auxiliary, cost.macs);
    println!("{g}");
    println!(
        "{}",
        serde_json::json!({"parameters": params, "parameters_with_auxiliary": total, "macs": macs,
            "channels": cfg.channels, "layers": cfg.layers, "classes": classes, "imagenet": cfg.imagenet,
            "input": [a.in_channels, size, size]})
    );
    eprintln!(
        "{:.3}M parameters (auxiliary head excluded; {:.3}M with it), {:.1}M multiply-accumulates per {}x{}x{} image",
        params as f64 / 1e6,
        total as f64 / 1e6,
        macs as f64 / 1e6,
        a.in_channels,
        size,
        size
    );
    Ok(())
}

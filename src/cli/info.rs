//! `darts info`: size and cost of a genotype's network.
use anyhow::Result;
use darts::network::{count_parameters_without_auxiliary, Network, NetworkConfig};
use darts::space::DataShape;
use tch::{nn, Device, Kind, Tensor};

/// Arguments of `darts info`.
#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// A zoo name, a genotype file, or the DARTS Python text.
    genotype: String,
    /// Initial channels.
    #[arg(long, default_value_t = 36)]
    channels: usize,
    /// Cells.
    #[arg(long, default_value_t = 20)]
    layers: usize,
    /// Classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Input channels.
    #[arg(long, default_value_t = 3)]
    in_channels: usize,
    /// Image height and width.
    #[arg(long, default_value_t = 32)]
    size: usize,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let g = darts::zoo::resolve(&a.genotype)?;
    let shape = DataShape { channels: a.in_channels, height: a.size, width: a.size, classes: a.classes };
    let cfg = NetworkConfig { channels: a.channels, layers: a.layers, auxiliary: true, stem_multiplier: 3 };
    anyhow::ensure!(a.channels >= 2 && a.channels.is_multiple_of(2), "--channels must be even and at least 2");
    anyhow::ensure!(a.layers >= 3, "--layers must be at least 3");
    anyhow::ensure!(a.size >= 4, "--size must be at least 4");
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Network::new(&vs.root(), &g, &cfg, &shape);
    let params = count_parameters_without_auxiliary(&vs);
    let total: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    let x = Tensor::zeros([1, a.in_channels as i64, a.size as i64, a.size as i64], (Kind::Float, Device::Cpu));
    let conv_macs = darts::ops::count_conv_macs(|| {
        let _ = tch::no_grad(|| net.forward_t(&x, false));
    });
    let head = net.classifier_in() as u64 * a.classes as u64;
    let macs = conv_macs + head;
    println!("{g}");
    println!(
        "{}",
        serde_json::json!({"parameters": params, "parameters_with_auxiliary": total, "macs": macs,
            "channels": a.channels, "layers": a.layers, "classes": a.classes, "input": [a.in_channels, a.size, a.size]})
    );
    eprintln!(
        "{:.3}M parameters (auxiliary head excluded; {:.3}M with it), {:.1}M multiply-accumulates per {}x{}x{} image",
        params as f64 / 1e6,
        total as f64 / 1e6,
        macs as f64 / 1e6,
        a.in_channels,
        a.size,
        a.size
    );
    Ok(())
}

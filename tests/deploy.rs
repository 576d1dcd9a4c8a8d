//! The ONNX export against the network it came from: every op kind, odd sizes, both network variants, BatchNorm
//! folded or as nodes, run in tract (in-process) and, where the venv has them, checked by ONNX's own checker and
//! run in ONNX Runtime; and the published cells at their real size.
#[allow(dead_code)]
mod common;
use darts::deploy::onnx::{self, ExportOptions};
use darts::deploy::runtime::{tract_plan, Engine};
use darts::deploy::ModelCard;
use darts::genotype::Genotype;
use darts::network::{count_parameters_without_auxiliary, Network, NetworkConfig};
use darts::space::{DataShape, OpKind};
use darts::zoo;
use tch::{nn, Device, Kind, Tensor};

/// A genotype using every op kind, `none` included, with reducing skips (FactorizedReduce) and identities.
fn every_op() -> Genotype {
    use OpKind::*;
    Genotype {
        normal: vec![
            (SepConv7x7, 0),
            (Conv7x1_1x7, 1),
            (DilConv5x5, 0),
            (MaxPool3x3, 2),
            (AvgPool3x3, 1),
            (SkipConnect, 3),
            (SepConv3x3, 4),
            (DilConv3x3, 2),
        ],
        normal_concat: vec![2, 3, 4, 5],
        reduce: vec![
            (SkipConnect, 0),
            (None, 1),
            (AvgPool3x3, 0),
            (SepConv5x5, 2),
            (DilConv3x3, 1),
            (Conv7x1_1x7, 0),
            (MaxPool3x3, 3),
            (SkipConnect, 4),
        ],
        reduce_concat: vec![2, 3, 4, 5],
    }
}

fn card(genotype: &Genotype, network: &NetworkConfig, shape: DataShape) -> ModelCard {
    ModelCard {
        dataset: "test".into(),
        shape,
        mean: (0..shape.channels).map(|c| 0.3 + 0.1 * c as f64).collect(),
        std: (0..shape.channels).map(|c| 0.2 + 0.05 * c as f64).collect(),
        class_names: (0..shape.classes).map(|c| format!("class {c}")).collect(),
        genotype: genotype.clone(),
        network: network.clone(),
        darts_version: "test".into(),
    }
}

/// A network whose BatchNorm statistics and affine parameters are far from their initial 0/1, as after
/// training, so that folding them is exercised.
fn trained_like(genotype: &Genotype, cfg: &NetworkConfig, shape: &DataShape, seed: i64) -> (nn::VarStore, Network) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Network::new(&vs.root(), genotype, cfg, shape);
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if t.dim() != 1 {
                continue;
            }
            let r = Tensor::rand_like(&t);
            if name.ends_with("running_var") {
                t.copy_(&(r + 0.5));
            } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                t.copy_(&((r - 0.5) * 0.4));
            } else if name.ends_with(".weight") {
                t.copy_(&(r + 0.5));
            }
        }
    });
    (vs, net)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = 1.0 + b.abs().max().double_value(&[]);
    (a - b).abs().max().double_value(&[]) / scale
}

/// Exports `net`, runs the file in tract on `x` (normalised input) and returns the logits.
fn tract_logits(net: &Network, card: &ModelCard, opts: ExportOptions, x: &Tensor) -> Tensor {
    let bytes = onnx::to_bytes(&onnx::export(net, card, opts).unwrap());
    let plan = tract_plan(&bytes, card).unwrap();
    let engine = Engine::Tract { plan, card: card.clone(), normalize_inside: opts.normalize_inside };
    let input = if opts.normalize_inside {
        // The graph normalises: feed p / 255 = x * std + mean.
        let c = card.shape.channels as i64;
        let mean = Tensor::from_slice(&card.mean).to_kind(Kind::Float).reshape([1, c, 1, 1]);
        let std = Tensor::from_slice(&card.std).to_kind(Kind::Float).reshape([1, c, 1, 1]);
        x * std + mean
    } else {
        x.shallow_clone()
    };
    let n = x.size()[0] as usize;
    let flat = Vec::<f32>::try_from(input.contiguous().flatten(0, -1)).unwrap();
    let rows = engine.logits(&flat, n).unwrap();
    Tensor::from_slice(&rows.concat()).reshape([n as i64, -1])
}

#[test]
fn every_op_and_odd_sizes_give_the_networks_logits_in_tract() {
    let g = every_op();
    let cases = [
        (NetworkConfig { channels: 4, layers: 5, auxiliary: true, stem_multiplier: 3, imagenet: false }, 9, 1),
        (NetworkConfig { channels: 4, layers: 5, auxiliary: false, stem_multiplier: 3, imagenet: false }, 8, 3),
        (NetworkConfig { channels: 4, layers: 4, ..NetworkConfig::imagenet() }, 33, 3),
    ];
    for (i, (cfg, size, channels)) in cases.into_iter().enumerate() {
        let shape = DataShape { channels, height: size, width: size, classes: 7 };
        let (_vs, net) = trained_like(&g, &cfg, &shape, 10 + i as i64);
        let x = Tensor::randn([3, channels as i64, size as i64, size as i64], (Kind::Float, Device::Cpu));
        let want = tch::no_grad(|| net.forward_t(&x, false).0);
        let c = card(&g, &cfg, shape);
        for fold in [true, false] {
            for inside in [false, true] {
                let opts = ExportOptions { fold_batch_norm: fold, normalize_inside: inside };
                let got = tract_logits(&net, &c, opts, &x);
                let d = max_rel_diff(&got, &want);
                assert!(d < 1e-4, "case {i} ({size}x{size}, {opts:?}): logits differ by {d:e}");
            }
        }
    }
}

#[test]
fn published_cells_export_with_their_parameter_counts() {
    let cifar = DataShape { channels: 3, height: 32, width: 32, classes: 10 };
    let imagenet = DataShape { channels: 3, height: 224, width: 224, classes: 1000 };
    let mut cases: Vec<(String, NetworkConfig, DataShape)> =
        zoo::names().into_iter().map(|n| (n.to_string(), NetworkConfig::default(), cifar)).collect();
    assert!(cases.len() >= 7, "the zoo has {} cells", cases.len());
    cases.push(("DARTS_V2".into(), NetworkConfig::imagenet(), imagenet));
    for (name, cfg, shape) in cases {
        let g = zoo::get(&name).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Network::new(&vs.root(), &g, &cfg, &shape);
        let c = card(&g, &cfg, shape);
        let opts = ExportOptions { fold_batch_norm: false, normalize_inside: false };
        let model = onnx::export(&net, &c, opts).unwrap();
        assert_eq!(
            onnx::parameter_count(&model),
            count_parameters_without_auxiliary(&vs),
            "{name} {}: parameters in the ONNX graph",
            if cfg.imagenet { "ImageNet" } else { "CIFAR" }
        );
        // The file reads back with its metadata.
        let back = onnx::from_bytes(&onnx::to_bytes(&model)).unwrap();
        let (card_back, opts_back) = ModelCard::from_onnx(&back).unwrap();
        assert_eq!((card_back, opts_back), (c, opts));
        assert_eq!(back.opset_import[0].version, onnx::OPSET);
    }
}

#[test]
fn darts_v2_at_its_real_size_runs_in_tract_as_in_libtorch() {
    let g = zoo::get("DARTS_V2").unwrap();
    let cfg = NetworkConfig::default();
    let shape = DataShape { channels: 3, height: 32, width: 32, classes: 10 };
    let (_vs, net) = trained_like(&g, &cfg, &shape, 3);
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let want = tch::no_grad(|| net.forward_t(&x, false).0);
    let got = tract_logits(&net, &card(&g, &cfg, shape), ExportOptions::default(), &x);
    let d = max_rel_diff(&got, &want);
    assert!(d < 1e-4, "DARTS_V2 36x20: logits differ by {d:e}");
}

/// ONNX's own checker (full check, with shape inference) and ONNX Runtime, from the venv when they are installed
/// there (scripts/setup.sh installs them): the file is valid and ONNX Runtime's logits equal libtorch's.
#[test]
fn onnx_checker_accepts_the_file_and_onnx_runtime_gives_the_same_logits() {
    let py = common::darts_python();
    let probe = std::process::Command::new(&py).args(["-c", "import onnx, onnxruntime"]).output().unwrap();
    if !probe.status.success() {
        eprintln!("skipped: the venv has no onnx/onnxruntime (scripts/setup.sh installs them)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = every_op();
    for (i, (cfg, size)) in [
        (NetworkConfig { channels: 4, layers: 5, ..Default::default() }, 9usize),
        (NetworkConfig { channels: 4, layers: 4, ..NetworkConfig::imagenet() }, 33),
    ]
    .into_iter()
    .enumerate()
    {
        let shape = DataShape { channels: 3, height: size, width: size, classes: 5 };
        let (_vs, net) = trained_like(&g, &cfg, &shape, 20 + i as i64);
        let x = Tensor::randn([4, 3, size as i64, size as i64], (Kind::Float, Device::Cpu));
        let want = tch::no_grad(|| net.forward_t(&x, false).0);
        for fold in [true, false] {
            let opts = ExportOptions { fold_batch_norm: fold, normalize_inside: false };
            let model = dir.path().join(format!("m{i}{fold}.onnx"));
            std::fs::write(&model, onnx::to_bytes(&onnx::export(&net, &card(&g, &cfg, shape), opts).unwrap())).unwrap();
            let input = dir.path().join("x.f32");
            let v = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
            std::fs::write(&input, v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/onnx_check.py");
            let out = std::process::Command::new(&py)
                .args([script, model.to_str().unwrap(), input.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(out.status.success(), "onnx_check.py: {}", String::from_utf8_lossy(&out.stderr));
            let logits: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
            let got = Tensor::from_slice(&logits.concat()).reshape([4, -1]);
            let d = max_rel_diff(&got, &want);
            assert!(d < 1e-4, "ONNX Runtime, case {i}, fold {fold}: logits differ by {d:e}");
        }
    }
}

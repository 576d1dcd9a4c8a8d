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
    let engine = Engine::Tract { plan, card: Box::new(card.clone()), normalize_inside: opts.normalize_inside };
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

/// darts predict's libtorch network: BatchNorm folded into the convolutions gives the network's evaluation-mode
/// logits (every op kind, odd sizes, both variants, NCHW and channels-last), and such a network refuses export.
#[test]
fn folding_batch_norm_keeps_the_evaluation_logits() {
    let g = every_op();
    let cases = [
        (NetworkConfig { channels: 4, layers: 5, auxiliary: true, stem_multiplier: 3, imagenet: false }, 9, 1),
        (NetworkConfig { channels: 4, layers: 4, ..NetworkConfig::imagenet() }, 33, 3),
    ];
    for (i, (cfg, size, channels)) in cases.into_iter().enumerate() {
        let shape = DataShape { channels, height: size, width: size, classes: 7 };
        let (vs, mut net) = trained_like(&g, &cfg, &shape, 40 + i as i64);
        let x = Tensor::randn([3, channels as i64, size as i64, size as i64], (Kind::Float, Device::Cpu));
        let want = tch::no_grad(|| net.forward_t(&x, false).0);
        net.fold_batch_norm();
        for cl in [false, true] {
            darts::network::set_channels_last(&mut net, &vs, cl);
            let got = tch::no_grad(|| net.forward_t(&x, false).0);
            let d = max_rel_diff(&got, &want);
            assert!(d < 1e-4, "case {i}, channels-last {cl}: folded logits differ by {d:e}");
        }
        let err = onnx::export(&net, &card(&g, &cfg, shape), ExportOptions::default()).unwrap_err().to_string();
        assert!(err.contains("folded"), "{err}");
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

fn darts(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_darts")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Top-1 class of each file in `darts predict --json` output, by file name.
fn top1_by_file(stdout: &str) -> std::collections::BTreeMap<String, (usize, f64)> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let top = &v["top"][0];
            (
                v["file"].as_str().unwrap().to_string(),
                (top["class"].as_u64().unwrap() as usize, top["probability"].as_f64().unwrap()),
            )
        })
        .collect()
}

/// A model trained by `darts train`, exported, and asked about PNG files of its test images through libtorch,
/// tract on the exported file, tract on a graph exported in memory, and ONNX Runtime: all give the top-1
/// accuracy `darts eval` reports, and each image the same class.
#[test]
fn a_trained_model_exports_and_predicts_png_files_as_darts_eval_scores_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    let common = ["--channels", "4", "--layers", "5", "--limit", "96", "--batch-size", "32", "--device", "cpu"];
    let (ok, _, err) =
        darts(&[&["train", "--genotype", "DARTS_V2", "--epochs", "1", "--quiet", "--out", r], &common[..]].concat());
    assert!(ok, "{err}");
    let (ok, stdout, err) = darts(&["eval", "--model", r, "--device", "cpu"]);
    assert!(ok, "{err}");
    let eval: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    // The test set's first 96 images (what --limit 96 evaluates) as PNG files named by their label.
    let test = darts::data::load(darts::data::DatasetKind::Builtin, None, false).unwrap().truncated(Some(96));
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    let mut labels = std::collections::BTreeMap::new();
    for i in 0..test.len() {
        let px = Vec::<u8>::try_from(test.images.get(i as i64).flatten(0, -1)).unwrap();
        let label = test.labels.int64_value(&[i as i64]) as usize;
        // Some in a sub-folder: folders are searched recursively.
        let path = images.join(if i % 3 == 0 { "sub" } else { "" }).join(format!("{i:03}.png"));
        image::GrayImage::from_raw(28, 28, px).unwrap().save(&path).unwrap();
        labels.insert(path.to_str().unwrap().to_string(), label);
    }
    let accuracy = |top: &std::collections::BTreeMap<String, (usize, f64)>| {
        assert_eq!(top.len(), labels.len(), "every image answered");
        top.iter().filter(|(f, (c, _))| labels[f.as_str()] == *c).count() as f64 / labels.len() as f64
    };
    let imgs = images.to_str().unwrap();
    let (ok, torch, err) = darts(&["predict", "--model", r, "--json", "--batch-size", "40", imgs]);
    assert!(ok, "{err}");
    let torch = top1_by_file(&torch);
    assert_eq!(accuracy(&torch), eval["top1"].as_f64().unwrap(), "libtorch's predictions against darts eval");

    let onnx_file = dir.path().join("m.onnx");
    let (ok, stdout, err) = darts(&["export", "--model", r, "--out", onnx_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(stdout.contains("\"opset\":17"), "{stdout}");
    for args in [
        vec!["predict", "--model", onnx_file.to_str().unwrap(), "--json", imgs],
        vec!["predict", "--model", r, "--engine", "tract", "--json", imgs],
    ] {
        let (ok, out, err) = darts(&args);
        assert!(ok, "{args:?}: {err}");
        let tract = top1_by_file(&out);
        for (f, (c, p)) in &torch {
            let (ct, pt) = tract[f];
            assert!(ct == *c && (pt - p).abs() < 1e-4, "{args:?} {f}: class {ct} {pt} against libtorch's {c} {p}");
        }
    }

    // darts eval on the ONNX file (tract, the test set its card names) scores as on the run directory.
    let (ok, out, err) = darts(&["eval", "--model", onnx_file.to_str().unwrap(), "--limit", "96"]);
    assert!(ok, "{err}");
    let on_onnx: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(on_onnx["top1"], eval["top1"], "darts eval of the ONNX file");
    assert_eq!(on_onnx["examples"], 96);
    let (l1, l2) = (on_onnx["loss"].as_f64().unwrap(), eval["loss"].as_f64().unwrap());
    assert!((l1 - l2).abs() < 1e-4 * l2.max(1.0), "test loss {l1} in tract, {l2} in libtorch");
    let inside = dir.path().join("inside.onnx");
    let (ok, _, err) = darts(&["export", "--model", r, "--normalize-inside", "--out", inside.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, out, err) = darts(&["eval", "--model", inside.to_str().unwrap(), "--limit", "96"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["top1"], eval["top1"], "darts eval of the ONNX file that normalises inside");
    let (ok, _, err) = darts(&["eval", "--model", r, "--limit", "96"]);
    assert!(!ok && err.contains("ONNX file"), "{err}");

    // ONNX Runtime on the same images, normalised as the card says, scores as darts eval.
    let py = common::darts_python();
    let has_ort = std::process::Command::new(&py).args(["-c", "import onnxruntime"]).output().unwrap();
    if has_ort.status.success() {
        let files: Vec<&String> = labels.keys().collect();
        let mut input = Vec::new();
        let card: ModelCard =
            serde_json::from_str(&std::fs::read_to_string(run.join("model-card.json")).unwrap()).unwrap();
        for f in &files {
            input.extend(darts::deploy::image::input_of(std::path::Path::new(f), &card, true).unwrap());
        }
        let raw = dir.path().join("x.f32");
        std::fs::write(&raw, input.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/onnx_check.py");
        let out = std::process::Command::new(&py)
            .args([script, onnx_file.to_str().unwrap(), raw.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let logits: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
        let correct = files
            .iter()
            .zip(&logits)
            .filter(|(f, l)| {
                let best = (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b });
                labels[f.as_str()] == best
            })
            .count();
        assert_eq!(correct as f64 / files.len() as f64, eval["top1"].as_f64().unwrap(), "ONNX Runtime's top-1");
    }

    // Text output names classes; an unreadable file is reported by name, the others still answered, exit 1.
    std::fs::write(images.join("broken.png"), b"not a png").unwrap();
    let (ok, out, err) = darts(&["predict", "--model", r, "--top-k", "3", imgs]);
    assert!(!ok, "a broken file must fail the command");
    assert!(err.contains("broken.png") && err.contains("1 of 97"), "{err}");
    assert_eq!(out.lines().count(), 96, "{out}");
    let first = out.lines().next().unwrap();
    assert_eq!(first.matches('%').count(), 3, "{first}");
    assert!(card_names().iter().any(|n| first.contains(n)), "{first}");
    let (ok, _, err) = darts(&["predict", "--model", onnx_file.to_str().unwrap(), "--engine", "torch", imgs]);
    assert!(!ok && err.contains("--engine tract"), "{err}");
    let (ok, _, err) = darts(&["export", "--model", r, "--which", "best"]);
    assert!(!ok && err.contains("--valid-portion"), "{err}");

    // A run from before model cards: export rebuilds the card from the training data, to the same values.
    std::fs::remove_file(run.join("model-card.json")).unwrap();
    let again = dir.path().join("again.onnx");
    let (ok, _, err) = darts(&["export", "--model", r, "--out", again.to_str().unwrap()]);
    assert!(ok, "{err}");
    let card_of =
        |p: &std::path::Path| ModelCard::from_onnx(&onnx::from_bytes(&std::fs::read(p).unwrap()).unwrap()).unwrap().0;
    assert_eq!(card_of(&again), card_of(&onnx_file));
}

fn card_names() -> Vec<&'static str> {
    darts::data::DatasetKind::Builtin.class_names().unwrap().to_vec()
}

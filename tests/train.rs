//! Training a derived network from scratch: learning, resume, save/load and its checks, auxiliary loss.
use darts::data::DatasetKind;
use darts::network::loss_with_auxiliary;
use darts::run::{self, RunOptions};
use darts::train::{TrainConfig, Trainer};
use darts::zoo;
use tch::{Device, Kind, Tensor};

fn tiny(epochs: usize) -> TrainConfig {
    let mut c = TrainConfig::darts(zoo::get("DARTS_V2").unwrap());
    c.dataset = DatasetKind::Builtin;
    c.limit = Some(128);
    c.network.channels = 4;
    c.network.layers = 3;
    c.epochs = epochs;
    c.batch_size = 32;
    c.seed = 4;
    c
}

fn opts(dir: &std::path::Path, stop_after: Option<usize>) -> RunOptions {
    RunOptions { progress: false, stop_after, ..RunOptions::new(dir.to_path_buf(), Device::Cpu) }
}

#[test]
fn darts_v2_trained_briefly_on_fashion_mnist_beats_chance_widely() {
    let mut c = tiny(2);
    c.limit = Some(2000);
    c.network.channels = 8;
    c.network.layers = 5;
    c.batch_size = 64;
    c.epochs = 3;
    let mut t = Trainer::new(c, Device::Cpu).unwrap();
    let stats: Vec<_> = (0..3).map(|_| t.run_epoch(None).unwrap()).collect();
    for s in &stats {
        eprintln!("epoch {}: train {:.3} test {:.3}", s.epoch, s.train_acc, s.test_acc);
    }
    let last = stats.last().unwrap();
    // 10 balanced classes: chance is 10%.
    assert!(last.test_acc > 0.5, "test accuracy {}", last.test_acc);
    assert!(last.test_top5.unwrap() > last.test_acc);
    // The original train.py: `model.drop_path_prob = args.drop_path_prob * epoch / args.epochs` (0, 0.2/3,
    // 0.4/3), and the cosine schedule stepped before each epoch (PyTorch 0.3): epoch e at
    // 0.025 * (1 + cos(pi e / 3)) / 2 = 0.025, 0.01875, 0.00625.
    for (s, (dp, lr)) in stats.iter().zip([(0.0, 0.025), (0.2 / 3.0, 0.01875), (0.4 / 3.0, 0.00625)]) {
        assert!(
            (s.drop_path - dp).abs() < 1e-15 && (s.lr - lr).abs() < 1e-15,
            "epoch {}: {} {}",
            s.epoch,
            s.drop_path,
            s.lr
        );
        assert!(s.valid_acc.is_none(), "no validation split unless asked for");
    }
}

/// A held-out validation split chooses model-best: its examples are not trained on, model-best holds the
/// weights of the epoch of best validation accuracy (the same run stopped after that epoch has them as its
/// last weights), and without a split there is no model-best and `eval --which best` says why.
#[test]
fn model_best_is_chosen_on_a_held_out_validation_split_never_on_the_test_set() {
    let cfg = || TrainConfig { valid_portion: 0.25, ..tiny(3) };
    let t = Trainer::new(cfg(), Device::Cpu).unwrap();
    assert_eq!(t.sizes(), (96, 32, 128), "128 training examples: 96 learn, 32 validate");
    let a = tempfile::tempdir().unwrap();
    let out = run::start_training(cfg(), &opts(a.path(), None)).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(a.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let valid: Vec<f64> = lines.iter().map(|l| l["valid_acc"].as_f64().unwrap()).collect();
    // The first epoch of the highest validation accuracy (later ties do not replace it).
    let best = valid.iter().enumerate().fold(0, |b, (i, &v)| if v > valid[b] { i } else { b });
    let chosen = out.best.expect("a validation split gives a best model");
    assert_eq!((chosen.epoch, chosen.valid_acc), (best, valid[best]));
    let b = tempfile::tempdir().unwrap();
    run::start_training(cfg(), &opts(b.path(), Some(best + 1))).unwrap();
    let read = |p: std::path::PathBuf| {
        let mut v = Tensor::read_safetensors(p).unwrap();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let (kept, then) = (read(a.path().join("model-best.safetensors")), read(b.path().join("model-last.safetensors")));
    assert_eq!(kept.len(), then.len());
    for ((n, x), (_, y)) in kept.iter().zip(&then) {
        assert!(x.equal(y), "model-best's {n} is not epoch {best}'s");
    }
    let r = run::evaluate_model(a.path(), run::Which::Best, Device::Cpu, darts::Layout::Auto).unwrap();
    assert_eq!(r.examples, 128, "the best model is tested on the whole test set");
    // Without a validation split: no model-best, and asking for it explains.
    let c = tempfile::tempdir().unwrap();
    let plain = run::start_training(tiny(1), &opts(c.path(), None)).unwrap();
    assert!(plain.best.is_none() && !c.path().join("model-best.safetensors").exists());
    let e = run::evaluate_model(c.path(), run::Which::Best, Device::Cpu, darts::Layout::Auto).unwrap_err().to_string();
    assert!(e.contains("no validation split") && e.contains("--valid-portion") && e.contains("--which last"), "{e}");
    for bad in [1.0, -0.1, f64::NAN] {
        let e = TrainConfig { valid_portion: bad, ..tiny(1) }.validate().unwrap_err().to_string();
        assert!(e.contains("valid_portion"), "{e}");
    }
}

#[test]
fn training_resumes_bit_for_bit_and_saved_weights_reload_with_checks() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let full = run::start_training(tiny(2), &opts(a.path(), None)).unwrap();
    let part = run::start_training(tiny(2), &opts(b.path(), Some(1))).unwrap();
    assert!(!part.finished);
    let rest = run::resume_training(&opts(b.path(), None)).unwrap();
    assert!(rest.finished && full.finished);
    let read = |d: &std::path::Path| {
        let mut v = Tensor::read_safetensors(d.join("model-last.safetensors")).unwrap();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let (wa, wb) = (read(a.path()), read(b.path()));
    assert_eq!(wa.len(), wb.len());
    for ((n, x), (_, y)) in wa.iter().zip(&wb) {
        assert!(x.equal(y), "{n} differs after resume");
    }
    // Names follow the original PyTorch state_dict keys.
    let names: Vec<&str> = wa.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"cells.0.preprocess0.op.1.weight"), "{names:?}");
    assert!(names.contains(&"cells.0._ops.0.op.1.weight"));
    assert!(names.contains(&"auxiliary_head.classifier.weight"));
    assert!(names.contains(&"stem.1.running_mean"));
    // Reloading gives the same test result as the run reported.
    let again = run::evaluate_model(a.path(), run::Which::Last, Device::Cpu, darts::Layout::Auto).unwrap();
    assert_eq!(again.top1, full.last.top1);
    assert!((again.loss - full.last.loss).abs() < 1e-9);
    // A different genotype in the config: the weights no longer fit, and the error lists what differs.
    let cfg_path = a.path().join("train-config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["genotype"] = serde_json::from_str(&zoo::get("DARTS_V1").unwrap().to_json()).unwrap();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = run::evaluate_model(a.path(), run::Which::Last, Device::Cpu, darts::Layout::Auto).unwrap_err().to_string();
    assert!(e.contains("does not match") && e.contains("differences"), "{e}");
}

#[test]
fn auxiliary_loss_is_added_with_its_weight() {
    let logits = Tensor::from_slice(&[2.0f32, 0.0, -1.0, 0.5, 0.5, 0.0]).reshape([2, 3]);
    let aux = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 0.0, 0.0, 3.0]).reshape([2, 3]);
    let y = Tensor::from_slice(&[0i64, 2]);
    let ce = |l: &Tensor| l.cross_entropy_for_logits(&y).double_value(&[]);
    // Hand-computed: CE of row [2,0,-1] at 0 and [0.5,0.5,0] at 2.
    let by_hand = |rows: [[f64; 3]; 2], t: [usize; 2]| {
        rows.iter().zip(t).map(|(r, k)| r.iter().map(|v| v.exp()).sum::<f64>().ln() - r[k]).sum::<f64>() / 2.0
    };
    let main = by_hand([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [0, 2]);
    assert!((ce(&logits) - main).abs() < 1e-5);
    let total = loss_with_auxiliary(&logits, Some(&aux), &y, 0.4, 0.0).double_value(&[]);
    let aux_hand = by_hand([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], [0, 2]);
    assert!((total - (main + 0.4 * aux_hand)).abs() < 1e-5);
    assert_eq!(loss_with_auxiliary(&logits, None, &y, 0.4, 0.0).kind(), Kind::Float);
    // Label smoothing eps: (1 - eps) * CE + eps * mean over classes of -log p.
    let eps = 0.1;
    let smooth_hand = |rows: [[f64; 3]; 2], t: [usize; 2]| {
        rows.iter()
            .zip(t)
            .map(|(r, k)| {
                let lse = r.iter().map(|v| v.exp()).sum::<f64>().ln();
                (1.0 - eps) * (lse - r[k]) + eps * r.iter().map(|v| lse - v).sum::<f64>() / 3.0
            })
            .sum::<f64>()
            / 2.0
    };
    let smoothed = loss_with_auxiliary(&logits, None, &y, 0.4, eps).double_value(&[]);
    assert!((smoothed - smooth_hand([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [0, 2])).abs() < 1e-5);
}

#[test]
fn bf16_mixed_precision_tracks_float32_training_and_keeps_float32_weights() {
    use darts::native::Precision;
    let run = |precision: Precision| {
        let mut c = tiny(2);
        c.limit = Some(256);
        c.network.channels = 8;
        c.precision = precision;
        let mut t = Trainer::new(c, Device::Cpu).unwrap();
        let stats: Vec<_> = (0..2).map(|_| t.run_epoch(None).unwrap()).collect();
        let kinds: Vec<Kind> = t.weights().iter().map(|w| w.kind()).collect();
        (stats, kinds)
    };
    let (f32_stats, _) = run(Precision::Fp32);
    let (bf_stats, kinds) = run(Precision::Bf16);
    assert!(kinds.iter().all(|k| *k == Kind::Float), "weights must stay float32 under autocast");
    for (a, b) in f32_stats.iter().zip(&bf_stats) {
        eprintln!("epoch {}: fp32 loss {:.5} / bf16 loss {:.5}", a.epoch, a.train_loss, b.train_loss);
        assert!(b.train_loss.is_finite() && b.test_loss.is_finite());
        // Same seed, same batches: bf16 rounding moves the losses a little, never far.
        assert!((a.train_loss - b.train_loss).abs() < 0.05 * a.train_loss, "{} vs {}", a.train_loss, b.train_loss);
        assert!((a.test_loss - b.test_loss).abs() < 0.1 * a.test_loss, "{} vs {}", a.test_loss, b.test_loss);
    }
    // Identical numbers would mean autocast never ran.
    assert_ne!(f32_stats[0].train_loss, bf_stats[0].train_loss);
    assert!(bf_stats[1].train_loss < bf_stats[0].train_loss, "bf16 training learns");
}

/// Stopped inside an epoch (the stop a SIGTERM asks for, here asked before the first step: the loop checkpoints
/// after that step and ends), then resumed: the run ends bit for bit where an uninterrupted one does; checkpoints
/// every 2 steps change nothing either.
#[test]
fn a_training_stopped_inside_an_epoch_resumes_bit_for_bit() {
    use std::sync::atomic::AtomicBool;
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run::start_training(tiny(2), &opts(a.path(), None)).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(true));
    let stopping = RunOptions { stop: Some(stop.clone()), ..opts(b.path(), None) };
    let e = run::start_training(tiny(2), &stopping).unwrap_err();
    let i = e.downcast_ref::<darts::interrupt::Interrupted>().expect("stopped by the signal");
    assert_eq!((i.epoch, i.step), (0, 1));
    assert!(!b.path().join("metrics.jsonl").exists(), "no epoch finished");
    stop.store(false, std::sync::atomic::Ordering::SeqCst);
    run::resume_training(&RunOptions { checkpoint_every: Some(2), ..opts(b.path(), None) }).unwrap();
    run::start_training(tiny(2), &RunOptions { checkpoint_every: Some(2), ..opts(c.path(), None) }).unwrap();
    for dir in [b.path(), c.path()] {
        for file in ["checkpoint.safetensors", "model-last.safetensors"] {
            let (x, y) = (std::fs::read(a.path().join(file)).unwrap(), std::fs::read(dir.join(file)).unwrap());
            assert!(x == y, "{file} differs");
        }
        let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let want = std::fs::read_to_string(a.path().join("metrics.jsonl")).unwrap();
        let strip = |t: &str| -> Vec<serde_json::Value> {
            t.lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    for k in ["seconds", "peak_rss_mb", "data_wait_seconds"] {
                        v.as_object_mut().unwrap().remove(k);
                    }
                    v
                })
                .collect()
        };
        assert_eq!(strip(&lines), strip(&want), "the metrics of the interrupted epoch add up as uninterrupted");
    }
}

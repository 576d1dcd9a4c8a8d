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
    assert!(last.drop_path > 0.0 && last.drop_path < 0.2);
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
    let again = run::evaluate_model(a.path(), "last", Device::Cpu, darts::Layout::Auto).unwrap();
    assert_eq!(again.top1, full.last.top1);
    assert!((again.loss - full.last.loss).abs() < 1e-9);
    // A different genotype in the config: the weights no longer fit, and the error lists what differs.
    let cfg_path = a.path().join("train-config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["genotype"] = serde_json::from_str(&zoo::get("DARTS_V1").unwrap().to_json()).unwrap();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = run::evaluate_model(a.path(), "last", Device::Cpu, darts::Layout::Auto).unwrap_err().to_string();
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

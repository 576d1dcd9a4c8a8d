//! The search loop: reproducibility, bit-exact resume, second order, learning signal.
use darts::architect::Order;
use darts::data::DatasetKind;
use darts::run::{self, RunOptions};
use darts::search::{Search, SearchConfig};
use darts::space::SearchSpace;
use tch::{Device, Tensor};

fn tiny(epochs: usize) -> SearchConfig {
    SearchConfig {
        dataset: DatasetKind::Builtin,
        limit: Some(96),
        space: SearchSpace { channels: 4, layers: 3, nodes: 2, ..Default::default() },
        epochs,
        batch_size: 16,
        seed: 11,
        ..Default::default()
    }
}

fn opts(dir: &std::path::Path, stop_after: Option<usize>) -> RunOptions {
    RunOptions { progress: false, stop_after, ..RunOptions::new(dir.to_path_buf(), Device::Cpu) }
}

fn checkpoint_tensors(dir: &std::path::Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(dir.join("checkpoint.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Runs `cfg()` uninterrupted and stopped after `stop_after` epochs then resumed, asserts that both end with
/// the same checkpoint bit for bit, and returns the uninterrupted run's directory and checkpoint.
fn resumes_bit_for_bit(
    cfg: impl Fn() -> SearchConfig,
    stop_after: usize,
) -> (tempfile::TempDir, Vec<(String, Tensor)>) {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert!(run::start(cfg(), &opts(a.path(), None)).unwrap().finished);
    assert!(!run::start(cfg(), &opts(b.path(), Some(stop_after))).unwrap().finished);
    assert!(run::resume(&opts(b.path(), None)).unwrap().finished);
    let (ta, tb) = (checkpoint_tensors(a.path()), checkpoint_tensors(b.path()));
    assert_eq!(ta.len(), tb.len());
    for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(xa.equal(xb), "{na} differs after resume");
    }
    (a, ta)
}

/// One number per epoch from a run's `metrics.jsonl`.
fn metric(dir: &std::path::Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64().unwrap())
        .collect()
}

#[test]
fn a_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let full = run::start(tiny(3), &opts(a.path(), None)).unwrap();
    assert!(full.finished);
    let part = run::start(tiny(3), &opts(b.path(), Some(1))).unwrap();
    assert!(!part.finished);
    assert!(!b.path().join("genotype.json").exists());
    let rest = run::resume(&opts(b.path(), None)).unwrap();
    assert!(rest.finished);
    assert_eq!(rest.epochs.len(), 2);
    let (ta, tb) = (checkpoint_tensors(a.path()), checkpoint_tensors(b.path()));
    assert_eq!(ta.len(), tb.len());
    for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(xa.equal(xb), "{na} differs after resume");
    }
    assert_eq!(full.alphas, rest.alphas);
    assert_eq!(full.genotype, rest.genotype);
    // The metrics file holds one line per epoch, 0, 1, 2, even though the run was split.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(b.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let epochs: Vec<u64> = lines.iter().map(|l| l["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, vec![0, 1, 2]);
    assert_eq!(lines[2]["alpha_normal"].as_array().unwrap().len(), 5);
    let written = std::fs::read_to_string(b.path().join("genotype.txt")).unwrap();
    assert_eq!(written.trim(), rest.genotype.to_string());
}

#[test]
fn one_seed_reproduces_a_run_and_another_seed_differs() {
    let run_alphas = |seed: u64| {
        let mut s = Search::new(SearchConfig { seed, ..tiny(1) }, Device::Cpu).unwrap();
        s.run_epoch(None).unwrap();
        (s.net.alphas.normal.detach().copy(), s.net.alphas.reduce.detach().copy())
    };
    let (a1, r1) = run_alphas(5);
    let (a2, r2) = run_alphas(5);
    let (a3, _) = run_alphas(6);
    assert!(a1.equal(&a2) && r1.equal(&r2));
    assert!(!a1.equal(&a3));
}

#[test]
fn the_split_is_disjoint_and_alpha_moves_by_gradient() {
    let mut s = Search::new(tiny(1), Device::Cpu).unwrap();
    s.split.check_disjoint(96).unwrap();
    assert_eq!(s.split.train.len() + s.split.val.len(), 96);
    let before = s.net.alphas.normal.detach().copy();
    s.run_epoch(None).unwrap();
    let moved = (s.net.alphas.normal.detach() - before).abs().max().double_value(&[]);
    // 3 Adam steps of lr 3e-4 move each alpha by at most ~9e-4, and by something. (That the step descends the
    // validation loss is tests/architect.rs's a_first_order_alpha_step_descends_the_validation_loss.)
    assert!(moved > 1e-5 && moved < 1.5e-3, "{moved}");
}

/// The weights' learning rate per epoch, as the original train_search.py under PyTorch 0.3 (scheduler.step()
/// before each epoch: epoch e runs at the cosine value for e): 0.001 + 0.024 (1 + cos(pi e / 3)) / 2 =
/// 0.025, 0.019, 0.007; and the second-order unrolled step uses the same epoch's rate (architect.step(...,
/// lr, ...) in the original).
#[test]
fn the_learning_rate_of_each_epoch_and_of_the_unrolled_step_follow_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SearchConfig { order: Order::Second, limit: Some(48), ..tiny(3) };
    run::start(cfg, &opts(dir.path(), None)).unwrap();
    let want = [0.025, 0.019, 0.007];
    for (key, got) in [("lr", metric(dir.path(), "lr")), ("unrolled_lr", metric(dir.path(), "unrolled_lr"))] {
        assert_eq!(got.len(), 3);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-15, "{key}: {got:?}");
        }
    }
}

#[test]
fn second_order_search_runs_and_derives_a_valid_genotype() {
    let dir = tempfile::tempdir().unwrap();
    let out = run::start(SearchConfig { order: Order::Second, ..tiny(1) }, &opts(dir.path(), None)).unwrap();
    out.genotype.validate().unwrap();
    assert_eq!(out.genotype.normal.len(), 4);
    assert!(out.epochs[0].train_loss.is_finite());
}

#[test]
fn the_weights_learn_beyond_chance() {
    let cfg = SearchConfig { limit: Some(600), epochs: 4, batch_size: 32, ..tiny(4) };
    let mut s = Search::new(cfg, Device::Cpu).unwrap();
    let stats: Vec<_> = (0..4).map(|_| s.run_epoch(None).unwrap()).collect();
    let (first, last) = (&stats[0], &stats[3]);
    // 10 classes: chance is 10% and a loss of ln 10 = 2.30.
    assert!(last.train_acc > 0.2, "train accuracy {}", last.train_acc);
    assert!(last.train_loss < first.train_loss - 0.1, "loss {} -> {}", first.train_loss, last.train_loss);
    assert!(last.train_loss < 2.2, "loss {}", last.train_loss);
}

#[test]
fn a_second_start_in_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    run::start(tiny(1), &opts(dir.path(), None)).unwrap();
    let e = run::start(tiny(1), &opts(dir.path(), None)).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    let e = run::resume(&opts(&dir.path().join("nothing"), None)).err().unwrap().to_string();
    assert!(e.contains("checkpoint"), "{e}");
}

#[test]
fn a_diverging_search_stops_with_a_clear_error_and_writes_no_bad_checkpoint() {
    // An absurd learning rate: the loss overflows within a few steps of the first epoch.
    let dir = tempfile::tempdir().unwrap();
    let cfg = SearchConfig { lr: 1e30, lr_min: 0.0, epochs: 2, ..tiny(2) };
    let e = run::start(cfg, &opts(dir.path(), None)).unwrap_err().to_string();
    assert!(e.contains("training loss became") && e.contains("checkpoint"), "{e}");
    assert!(!e.contains("panicked"));
    // The failed epoch wrote nothing over the (here: absent) checkpoint, and no metrics line.
    assert!(!dir.path().join("checkpoint.safetensors").exists());
    assert!(!dir.path().join("metrics.jsonl").exists());
    assert!(dir.path().join("config.json").exists());
}

/// PC-DARTS (partial channels, edge normalisation, alpha warm-up) with gradient checkpointing: the betas
/// and their optimiser state checkpoint and resume exactly, alpha stays put during warm-up, and the
/// metrics carry the edge weights.
#[test]
fn pc_darts_with_checkpointed_cells_warms_up_and_resumes_bit_for_bit() {
    let cfg = || {
        let mut c = tiny(2);
        c.space.partial_channels = 2;
        c.space.edge_normalization = true;
        c.arch_warmup_epochs = 1;
        c.checkpoint_cells = true;
        c
    };
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let initial = Search::new(cfg(), Device::Cpu).unwrap();
    let alpha0 = initial.net.alphas.normal.detach().copy();
    let full = run::start(cfg(), &opts(a.path(), None)).unwrap();
    assert!(full.finished);
    run::start(cfg(), &opts(b.path(), Some(1))).unwrap();
    let after_warmup = Search::resume(b.path(), Device::Cpu).unwrap();
    assert!(after_warmup.net.alphas.normal.equal(&alpha0), "alpha moved during the warm-up epoch");
    run::resume(&opts(b.path(), None)).unwrap();
    let (ta, tb) = (checkpoint_tensors(a.path()), checkpoint_tensors(b.path()));
    assert!(ta.iter().any(|(n, _)| n == "beta/normal") && ta.iter().any(|(n, _)| n == "adam/m/3"));
    assert_eq!(ta.len(), tb.len());
    for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(xa.equal(xb), "{na} differs after resume");
    }
    let last: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(a.path().join("metrics.jsonl")).unwrap().lines().last().unwrap())
            .unwrap();
    let betas: Vec<f64> = last["beta_normal"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(betas.len(), 5);
    assert!((betas[0] + betas[1] - 1.0).abs() < 1e-5 && (betas[2..].iter().sum::<f64>() - 1.0).abs() < 1e-5);
    let final_search = Search::resume(a.path(), Device::Cpu).unwrap();
    assert!(!final_search.net.alphas.normal.equal(&alpha0), "alpha trains after the warm-up");
}

/// P-DARTS's skip dropout: the rate follows P-DARTS's train_search.py in the metrics, the masks come back on
/// resume (bit for bit), the dropout changes the search, and impossible rates are refused.
#[test]
fn skip_dropout_decays_resumes_bit_for_bit_and_changes_the_search() {
    let cfg = || SearchConfig { skip_dropout: 0.6, arch_warmup_epochs: 1, ..tiny(3) };
    let (a, ta) = resumes_bit_for_bit(cfg, 1);
    let c = tempfile::tempdir().unwrap();
    run::start(SearchConfig { skip_dropout: 0.0, ..cfg() }, &opts(c.path(), None)).unwrap();
    let tc = checkpoint_tensors(c.path());
    assert!(ta.iter().zip(&tc).any(|((_, xa), (_, xc))| !xa.equal(xc)), "skip dropout changed nothing");
    let rates = metric(a.path(), "skip_dropout");
    // P-DARTS: `p * (epochs - epoch - 1) / epochs` while epoch < eps_no_arch (here 1), then
    // `p * np.exp(-(epoch - eps_no_arch) * 0.2)`: 0.6 * 2/3, 0.6 * exp(0), 0.6 * exp(-0.2).
    assert_eq!(rates.len(), 3);
    for (r, want) in rates.iter().zip([0.4, 0.6, 0.49123845184678905]) {
        assert!((r - want).abs() < 1e-12, "{rates:?}");
    }
    // P-DARTS's own setting: 25 epochs per stage, 10 without alpha, rate 0.4 (its second stage).
    let p = SearchConfig { skip_dropout: 0.4, arch_warmup_epochs: 10, epochs: 25, ..tiny(25) };
    for (e, want) in [(0, 0.384), (9, 0.24), (10, 0.4), (11, 0.3274923012311928), (24, 0.024324025050087184)] {
        assert!((p.skip_dropout_at(e) - want).abs() < 1e-12, "epoch {e}: {}", p.skip_dropout_at(e));
    }
    for bad in [1.0, -0.1, f64::NAN] {
        let e = SearchConfig { skip_dropout: bad, ..tiny(3) }.validate().unwrap_err().to_string();
        assert!(e.contains("skip_dropout") && e.contains("[0, 1)"), "{e}");
    }
}

/// DARTS-'s auxiliary skip: its weight decays linearly, (E - e) / E, in the metrics; its FactorizedReduce
/// weights are checkpointed and a resumed search ends bit for bit where the uninterrupted one does.
#[test]
fn the_auxiliary_skip_decays_and_resumes_bit_for_bit() {
    let cfg = || {
        let mut c = tiny(2);
        c.space.auxiliary_skip = true;
        c
    };
    let (a, ta) = resumes_bit_for_bit(cfg, 1);
    assert!(ta.iter().any(|(n, _)| n.contains("auxiliary_op.conv_1")), "no auxiliary FactorizedReduce saved");
    assert_eq!(metric(a.path(), "aux_skip"), vec![1.0, 0.5]);
}

/// GDAS: the temperature anneals linearly from tau_max to tau_min; the samples come back on resume (bit for
/// bit); alpha learns; second order is refused.
#[test]
fn a_gdas_search_anneals_resumes_bit_for_bit_and_moves_alpha() {
    let cfg = || SearchConfig { gdas: Some(darts::search::Gdas { tau_max: 4.0, tau_min: 1.0 }), ..tiny(3) };
    let alpha0 = Search::new(cfg(), Device::Cpu).unwrap().net.alphas.normal.detach().copy();
    let (a, _) = resumes_bit_for_bit(cfg, 2);
    let taus = metric(a.path(), "gdas_tau");
    for (t, want) in taus.iter().zip([4.0, 2.5, 1.0]) {
        assert!((t - want).abs() < 1e-12, "{taus:?}");
    }
    let alpha = Search::resume(a.path(), Device::Cpu).unwrap().net.alphas.normal.detach();
    assert!((alpha - alpha0).abs().max().double_value(&[]) > 1e-4, "alpha did not learn");
    let e = SearchConfig { order: Order::Second, ..cfg() }.validate().unwrap_err().to_string();
    assert!(e.contains("GDAS") && e.contains("--order first"), "{e}");
    let e = SearchConfig { gdas: Some(darts::search::Gdas { tau_max: 1.0, tau_min: 0.0 }), ..tiny(3) }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("tau_min"), "{e}");
}

/// Colour data (a 3-channel stem, whose channels-last kernel is not dense) checkpoints and resumes, with a
/// class-balanced split.
#[test]
fn a_colour_search_checkpoints_and_resumes_with_a_balanced_split() {
    let data = tempfile::tempdir().unwrap();
    for b in 1..=5u8 {
        let bytes: Vec<u8> = (0..16u8)
            .flat_map(|i| std::iter::once((b + i) % 10).chain((0..3072).map(move |p| (p as u8) ^ i ^ b)))
            .collect();
        std::fs::write(data.path().join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    std::fs::write(data.path().join("test_batch.bin"), [3u8].iter().chain(&[9u8; 3072]).copied().collect::<Vec<u8>>())
        .unwrap();
    let cfg = SearchConfig {
        dataset: DatasetKind::Cifar10,
        data_dir: Some(data.path().to_path_buf()),
        balanced_split: true,
        limit: None,
        ..tiny(2)
    };
    let out = tempfile::tempdir().unwrap();
    run::start(cfg, &opts(out.path(), Some(1))).unwrap();
    assert!(out.path().join("checkpoint.safetensors").is_file());
    let rest = run::resume(&opts(out.path(), None)).unwrap();
    assert!(rest.finished);
}

#[test]
fn the_early_stop_ends_a_collapsing_search_and_stays_ended_on_resume() {
    use darts::space::OpKind;
    // skip_connect is the only real op: every kept edge is one, so the first epoch ends the search.
    let space = SearchSpace { ops: vec![OpKind::None, OpKind::SkipConnect], ..tiny(1).space };
    let cfg = SearchConfig { space, early_stop_skip_connects: Some(2), ..tiny(3) };
    let dir = tempfile::tempdir().unwrap();
    let out = run::start(cfg, &opts(dir.path(), None)).unwrap();
    assert_eq!(out.epochs.len(), 1, "stopped after the first epoch: every kept edge is a skip connection");
    assert!(out.finished, "an early stop finishes the search");
    assert!(dir.path().join("genotype.json").exists());
    let again = run::resume(&opts(dir.path(), None)).unwrap();
    assert!(again.epochs.is_empty() && again.finished, "a resumed early-stopped search runs no more epochs");
    assert_eq!(again.genotype, out.genotype);
}

#[test]
fn the_early_stop_waits_for_the_alpha_warm_up_and_the_skip_limit_shapes_the_genotype() {
    use darts::space::OpKind;
    let cfg = SearchConfig { early_stop_skip_connects: Some(2), max_skip_connects: Some(1), ..tiny(3) };
    let mut s = Search::new(SearchConfig { arch_warmup_epochs: 1, ..cfg }, Device::Cpu).unwrap();
    // Alphas that make every normal edge prefer skip_connect.
    let skip = s.config.space.ops.iter().position(|&o| o == OpKind::SkipConnect).unwrap() as i64;
    tch::no_grad(|| {
        let _ = s.net.alphas.normal.fill_(0.0);
        let _ = s.net.alphas.normal.narrow(1, skip, 1).fill_(3.0);
    });
    let unrestricted = s.unrestricted_genotype();
    assert_eq!(darts::genotype::skip_connects(&unrestricted.normal), 4);
    assert_eq!(darts::genotype::skip_connects(&s.genotype().normal), 1, "--max-skip-connects 1");
    s.epoch = 1;
    assert!(!s.check_early_stop(), "epoch 1 is still the warm-up: alpha has not moved yet");
    s.epoch = 2;
    assert!(s.check_early_stop() && s.stopped_early);
}

/// A run stopped before its first checkpoint (only its config is there, as after a kill in the first epoch)
/// continues with the same command (`start_or_continue`) or with `resume`, and ends bit for bit where an
/// uninterrupted run does; the same command with other settings is refused naming them; and while a process
/// runs a directory, a second one is refused naming the first.
#[test]
fn a_run_killed_before_its_first_checkpoint_continues_and_one_process_holds_a_run() {
    let cfg = || tiny(2);
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run::start(cfg(), &opts(a.path(), None)).unwrap();
    for dir in [b.path(), c.path()] {
        assert!(!run::start(cfg(), &opts(dir, Some(0))).unwrap().finished);
        assert!(dir.join("config.json").is_file() && !dir.join("checkpoint.safetensors").exists());
    }
    assert!(run::start_or_continue(cfg(), &opts(b.path(), None)).unwrap().finished);
    assert!(run::resume(&opts(c.path(), None)).unwrap().finished);
    let ta = checkpoint_tensors(a.path());
    for dir in [b.path(), c.path()] {
        let t = checkpoint_tensors(dir);
        assert_eq!(ta.len(), t.len());
        for ((n, x), (_, y)) in ta.iter().zip(&t) {
            assert!(x.equal(y), "{n} differs from the uninterrupted run");
        }
        assert_eq!(metric(dir, "epoch"), vec![0.0, 1.0], "one record per epoch");
    }
    let e = run::start_or_continue(SearchConfig { epochs: 3, ..cfg() }, &opts(b.path(), None)).unwrap_err();
    assert!(e.to_string().contains("epochs: 2 in the run, 3 now"), "{e}");
    let held = darts::rundir::RunLock::acquire(a.path()).unwrap();
    let e = run::resume(&opts(a.path(), None)).unwrap_err().to_string();
    assert!(e.contains("is in use") && e.contains(&std::process::id().to_string()), "{e}");
    drop(held);
    assert!(run::resume(&opts(a.path(), None)).unwrap().finished);
}

/// A second-order search with skip dropout stopped inside an epoch (as SIGTERM asks) and resumed ends bit for
/// bit where an uninterrupted one does: the loader's stream, the network's stream of mask seeds and the epoch's
/// sums continue where they were.
#[test]
fn a_search_stopped_inside_an_epoch_resumes_bit_for_bit() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let cfg = || SearchConfig { order: Order::Second, skip_dropout: 0.3, ..tiny(2) };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run::start(cfg(), &opts(a.path(), None)).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(true));
    let e = run::start(cfg(), &RunOptions { stop: Some(stop.clone()), ..opts(b.path(), None) }).unwrap_err();
    assert!(e.downcast_ref::<darts::interrupt::Interrupted>().is_some(), "{e}");
    stop.store(false, Ordering::SeqCst);
    assert!(run::resume(&RunOptions { checkpoint_every: Some(1), ..opts(b.path(), None) }).unwrap().finished);
    let (ta, tb) = (checkpoint_tensors(a.path()), checkpoint_tensors(b.path()));
    for ((n, x), (_, y)) in ta.iter().zip(&tb) {
        assert!(x.equal(y), "{n} differs after a stop inside an epoch");
    }
    assert_eq!(metric(b.path(), "train_loss"), metric(a.path(), "train_loss"));
}

/// The supernet's shared edge inputs (the default) against the unshared supernet (every edge from scratch, as the
/// original code): a search from one seed, first and second order, ends with the same genotype (up to ties that
/// the rounding below can flip: two picks whose derivation weights differ by no more than the alphas do) and with alphas
/// that differ no more than float rounding makes them differ: float32 gradients summed in another order differ
/// in their last bits, Adam divides each by its own running magnitude and the second order's finite differences
/// divide by a small step (and near-uniform alphas' gradients are differences of nearly equal terms). Where a
/// component of alpha's gradient is itself at rounding level, Adam's step for it (about the learning rate, whatever
/// the gradient's size) can turn around on rounding alone, so rounding reaches up to one Adam step. The measured
/// yardsticks: how far a search moves from itself when only rounding differs: the unshared search on one thread
/// instead of several (where a reduction splits otherwise; darts' own kernels give the same bits on any thread
/// count, so this is now small), and the shared search with each node's sum taken by operators instead of the
/// fused kernel (the same sum in another order at every node of every pass, as the unshared search sums it;
/// tests/mixed_sum.rs checks the two equal in float64). The same maths pass by pass, in float64, is
/// tests/shared_inputs.rs's.
#[test]
fn sharing_edge_inputs_leaves_a_search_from_one_seed_unchanged() {
    for order in [Order::First, Order::Second] {
        let run = |share: bool, one_thread: bool, fused_sums: bool| {
            let threads = tch::get_num_threads();
            if one_thread {
                tch::set_num_threads(1);
            }
            let space = SearchSpace { channels: 4, layers: 3, nodes: 3, ..Default::default() };
            let mut s = Search::new(SearchConfig { order, space, ..tiny(2) }, Device::Cpu).unwrap();
            s.net.share_edge_inputs = share;
            s.net.fused_sums = fused_sums;
            let init = s.net.alphas.normal.detach().copy();
            for _ in 0..2 {
                s.run_epoch(None).unwrap();
            }
            let moved = (s.net.alphas.normal.detach() - init).abs().max().double_value(&[]);
            tch::set_num_threads(threads);
            let weights = s.net.alphas.derivation_weights();
            (s.net.alphas.normal.detach().copy(), s.net.alphas.reduce.detach().copy(), s.genotype(), moved, weights)
        };
        let diff = |a: &(Tensor, Tensor, _, f64, _), b: &(Tensor, Tensor, _, f64, _)| {
            (&a.0 - &b.0).abs().max().max_other(&(&a.1 - &b.1).abs().max()).double_value(&[])
        };
        let shared = run(true, false, true);
        let unshared = run(false, false, true);
        let one_thread = run(false, true, true);
        let operator_sums = run(true, false, false);
        let rounding = diff(&unshared, &one_thread).max(diff(&shared, &operator_sums));
        let moved = shared.3;
        assert!(moved > 1e-4, "{order:?}: alpha moved by {moved} only");
        let adam_step = tiny(2).arch_lr;
        let d = diff(&shared, &unshared);
        assert!(
            d < 0.1 * moved && d < (10.0 * rounding).max(adam_step),
            "{order:?}: alphas differ by {d} (moved {moved}, rounding {rounding}, one Adam step {adam_step})"
        );
        eprintln!(
            "{order:?}: moved {moved:.3e}, shared against unshared {d:.3e}, the same search with other rounding {rounding:.3e}"
        );
        // The same genotype, except where a choice is a tie that this rounding can flip: there the two picks'
        // derivation weights differ by no more than the alphas do.
        same_genotype_up_to_ties(order, (&shared.2, &unshared.2), &shared.4, 10.0 * d.max(rounding));
    }
}

/// Batched edges (each separable half as one node, the first halves of the ops reading one state as one; the
/// default, channels-last on the CPU) leave a search from one seed where the unbatched one (every convolution on
/// its own) goes, first and second order: alphas that differ by no more than rounding makes a search differ
/// (the yardstick: the unbatched search with each node's sum taken by operators instead of the fused kernel, or
/// one Adam step, as above) and well under how far they moved. The same maths pass by pass, in float64:
/// tests/shared_inputs.rs and tests/sep_halves.rs.
#[test]
fn batched_edges_leave_a_search_from_one_seed_unchanged() {
    for order in [Order::First, Order::Second] {
        let run = |batched: bool, fused_sums: bool| {
            let space = SearchSpace { channels: 4, layers: 3, nodes: 3, ..Default::default() };
            let mut s = Search::new(SearchConfig { order, space, ..tiny(2) }, Device::Cpu).unwrap();
            s.set_channels_last(true);
            s.net.batched_edges = batched;
            s.net.fused_sums = fused_sums;
            let init = s.net.alphas.normal.detach().copy();
            for _ in 0..2 {
                s.run_epoch(None).unwrap();
            }
            let moved = (s.net.alphas.normal.detach() - init).abs().max().double_value(&[]);
            let weights = s.net.alphas.derivation_weights();
            (s.net.alphas.normal.detach().copy(), s.net.alphas.reduce.detach().copy(), moved, s.genotype(), weights)
        };
        type Run = (Tensor, Tensor, f64, darts::genotype::Genotype, (Vec<Vec<f64>>, Vec<Vec<f64>>));
        let diff = |a: &Run, b: &Run| (&a.0 - &b.0).abs().max().max_other(&(&a.1 - &b.1).abs().max()).double_value(&[]);
        let batched = run(true, true);
        let unbatched = run(false, true);
        let rounding = diff(&unbatched, &run(false, false));
        let moved = batched.2;
        assert!(moved > 1e-4, "{order:?}: alpha moved by {moved} only");
        let d = diff(&batched, &unbatched);
        let adam_step = tiny(2).arch_lr;
        assert!(
            d < 0.1 * moved && d < (10.0 * rounding).max(adam_step),
            "{order:?}: alphas differ by {d} (moved {moved}, rounding {rounding}, one Adam step {adam_step})"
        );
        eprintln!("{order:?}: moved {moved:.3e}, batched against unbatched {d:.3e}, other rounding {rounding:.3e}");
        // The same genotype, except where a choice is a tie that this rounding can flip (as above).
        same_genotype_up_to_ties(order, (&batched.3, &unbatched.3), &batched.4, 10.0 * d.max(rounding));
    }
}

/// Asserts that two searches of the 3-node default space derived the same genotype, except where a choice is a
/// tie within `bound`: there the two picks' derivation weights (`weights`, the first search's) differ by no more.
fn same_genotype_up_to_ties(
    order: Order,
    (a, b): (&darts::genotype::Genotype, &darts::genotype::Genotype),
    weights: &(Vec<Vec<f64>>, Vec<Vec<f64>>),
    bound: f64,
) {
    let space = SearchSpace { channels: 4, layers: 3, nodes: 3, ..Default::default() };
    let weights = [&weights.0, &weights.1];
    for (cell, (a, b)) in [(&a.normal, &b.normal), (&a.reduce, &b.reduce)].into_iter().enumerate() {
        assert_eq!(a.len(), b.len());
        for (k, (ga, gb)) in a.iter().zip(b.iter()).enumerate() {
            if ga != gb {
                let strength = |&(op, j): &(darts::space::OpKind, usize)| {
                    let row = darts::genotype::edge_row(k / 2, j);
                    weights[cell][row][space.ops.iter().position(|&o| o == op).unwrap()]
                };
                let gap = (strength(ga) - strength(gb)).abs();
                assert!(
                    gap <= bound,
                    "{order:?}: cell {cell} gene {k}: {ga:?} against {gb:?}, not a tie (weights differ by {gap})"
                );
                eprintln!("{order:?}: cell {cell} gene {k}: {ga:?} against {gb:?}, tied within {gap:.3e}");
            }
        }
    }
}

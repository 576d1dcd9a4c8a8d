//! Shared inputs (the default) against the unshared networks (every op from scratch, as the original code), in
//! float64. The tests of this file hold one lock: each counts ATen calls, which counts every thread's.
use darts::network::{drop_path_masks, loss_with_auxiliary, Network, NetworkConfig};
use darts::space::{DataShape, OpKind, SearchSpace};
use darts::supernet::{Alphas, SearchNetwork};
use darts::zoo;
use rand::SeedableRng;
use std::sync::Mutex;
use tch::{nn, Device, Kind, Tensor};

static SERIAL: Mutex<()> = Mutex::new(());

/// At most two threads while alive: the separable halves work example by example and apply to batches of at
/// least one example per thread, and these tests' batches are 3 and 4.
struct AtMostTwoThreads(i32);

impl AtMostTwoThreads {
    fn set() -> AtMostTwoThreads {
        let before = tch::get_num_threads();
        tch::set_num_threads(before.min(2));
        AtMostTwoThreads(before)
    }
}

impl Drop for AtMostTwoThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

fn all_buffers(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| !t.requires_grad()).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The default supernet shares what the edges reading one state compute alike (its activation, pooling, PC-DARTS'
/// slice and bypass, and in training mode the pooling BN): over three training passes its losses, logits and
/// every gradient (weights, alphas, betas) equal the unshared supernet's (every edge from scratch, as the original
/// code) in float64, its BN statistics end equal, and so do evaluation-mode logits; for the op sets and node
/// counts the tests use, PC-DARTS, GDAS, skip dropout, the auxiliary skip, GELU, channels-last and checkpointed
/// cells. Batched edges (each separable half as one node, the first halves of a state's readers as one,
/// channels-last) give the same values too, against both, and make fewer ATen calls in a training pass (they are
/// in effect). Sharing
/// makes fewer ATen calls (it is in effect).
#[test]
fn shared_edge_inputs_give_the_unshared_values_gradients_and_statistics() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _threads = AtMostTwoThreads::set();
    use darts::space::Activation;
    let smooth = vec![OpKind::None, OpKind::AvgPool3x3, OpKind::SkipConnect, OpKind::SepConv3x3, OpKind::DilConv3x3];
    struct Case {
        name: &'static str,
        space: SearchSpace,
        gdas: Option<f64>,
        skip_dropout: f64,
        aux: f64,
        checkpoint: bool,
        channels_last: bool,
    }
    let base = SearchSpace { channels: 4, layers: 3, nodes: 4, ..Default::default() };
    let case = |name, space| Case {
        name,
        space,
        gdas: None,
        skip_dropout: 0.0,
        aux: 1.0,
        checkpoint: false,
        channels_last: false,
    };
    let cases = [
        case("darts", base.clone()),
        case(
            "gelu, 2 nodes",
            SearchSpace { ops: smooth.clone(), nodes: 2, activation: Activation::Gelu, ..base.clone() },
        ),
        case(
            "pc-darts",
            SearchSpace { channels: 8, nodes: 3, partial_channels: 4, edge_normalization: true, ..base.clone() },
        ),
        Case { gdas: Some(1.0), ..case("gdas", SearchSpace { nodes: 3, ..base.clone() }) },
        Case { skip_dropout: 0.5, ..case("skip dropout", SearchSpace { nodes: 3, ..base.clone() }) },
        Case {
            aux: 0.6,
            ..case("aux skip, K=2", SearchSpace { nodes: 3, partial_channels: 2, auxiliary_skip: true, ..base.clone() })
        },
        Case { checkpoint: true, channels_last: true, ..case("checkpoint, channels-last", base.clone()) },
        Case {
            channels_last: true,
            ..case("pc-darts, channels-last", SearchSpace { channels: 8, partial_channels: 4, ..base.clone() })
        },
        Case { channels_last: true, ..case("darts, channels-last", base.clone()) },
        Case {
            channels_last: true,
            ..case(
                "gelu, 2 nodes, channels-last",
                SearchSpace { ops: smooth.clone(), nodes: 2, activation: Activation::Gelu, ..base.clone() },
            )
        },
        Case {
            channels_last: true,
            skip_dropout: 0.3,
            aux: 0.6,
            ..case("skip dropout, aux skip, channels-last", SearchSpace { auxiliary_skip: true, ..base.clone() })
        },
        Case {
            channels_last: true,
            gdas: Some(1.0),
            ..case("gdas, channels-last", SearchSpace { nodes: 3, ..base.clone() })
        },
    ];
    let opts = (Kind::Double, Device::Cpu);
    for c in cases {
        let name = c.name;
        let shape = DataShape { channels: 2, height: 9, width: 9, classes: 4 };
        let mut vs = nn::VarStore::new(Device::Cpu);
        let arch = |n: usize, ops: usize| (Tensor::randn([n as i64, ops as i64], opts) * 0.5).set_requires_grad(true);
        let edges: usize = (0..c.space.nodes).map(|i| 2 + i).sum();
        let ops = c.space.ops.len();
        let betas = c.space.edge_normalization.then(|| {
            let b = || (Tensor::randn([edges as i64], opts) * 0.5).set_requires_grad(true);
            (b(), b())
        });
        let alphas = Alphas { normal: arch(edges, ops), reduce: arch(edges, ops), betas, nodes: c.space.nodes };
        let mut net = SearchNetwork::new(&vs.root(), &c.space, &shape, alphas);
        vs.double();
        darts::supernet::set_channels_last(&mut net, &vs, c.channels_last);
        darts::supernet::set_checkpoint_cells(&mut net, &vs, c.checkpoint);
        net.gdas_tau = c.gdas;
        net.skip_dropout = c.skip_dropout;
        net.aux_skip = c.aux;
        let xs: Vec<Tensor> = (0..3).map(|_| Tensor::randn([4, 2, 9, 9], opts)).collect();
        let y = Tensor::from_slice(&[0i64, 3, 2, 1]);
        let mut wrt: Vec<Tensor> = vs.trainable_variables();
        wrt.extend(net.alphas.tensors().into_iter().map(|t| t.shallow_clone()));
        let refs: Vec<&Tensor> = wrt.iter().collect();
        let before: Vec<Tensor> = all_buffers(&vs).iter().map(|(_, t)| t.copy()).collect();
        let restore = || {
            tch::no_grad(|| {
                for ((_, t), b) in all_buffers(&vs).iter().zip(&before) {
                    t.shallow_clone().copy_(b);
                }
            })
        };
        let mut run = |share: bool, batched: bool| {
            restore();
            net.share_edge_inputs = share;
            net.batched_edges = batched;
            net.set_sample_stream(11);
            let passes: Vec<(Tensor, Tensor, Vec<Tensor>)> = xs.iter().map(|x| net.loss_grads(x, &y, &refs)).collect();
            let stats: Vec<Tensor> = all_buffers(&vs).iter().map(|(_, t)| t.copy()).collect();
            let eval = tch::no_grad(|| net.forward_t(&xs[0], false));
            let (_, calls) = darts::native::count_aten_calls(|| tch::no_grad(|| net.forward_t(&xs[0], false))).unwrap();
            net.set_sample_stream(11);
            let (_, train_calls) = darts::native::count_aten_calls(|| net.loss_grads(&xs[0], &y, &refs)).unwrap();
            (passes, stats, eval, calls, train_calls)
        };
        let (batched, stats_b, eval_b, _, train_b) = run(true, true);
        let (shared, stats_s, eval_s, calls_s, train_s) = run(true, false);
        let (plain, stats_p, eval_p, calls_p, _) = run(false, false);
        restore();
        let close = |a: &Tensor, b: &Tensor| {
            let scale = b.abs().max().double_value(&[]).max(1e-30);
            (a - b).abs().max().double_value(&[]) <= 1e-10 * scale + 1e-13
        };
        // Batched against unbatched, both shared; then shared (batched, the default) against the unshared.
        for (p, ((la, ga, gra), (lb, gb, grb))) in batched.iter().zip(&shared).enumerate() {
            assert!(close(la, lb), "{name}, pass {p}: batched loss {la} vs {lb}");
            assert!(close(ga, gb), "{name}, pass {p}: batched logits");
            for (i, (a, b)) in gra.iter().zip(grb).enumerate() {
                assert_eq!(a.defined(), b.defined(), "{name}, pass {p}: gradient {i} reached batched or not only");
                if a.defined() {
                    assert!(close(a, b), "{name}, pass {p}: batched gradient {i} differs by {}", (a - b).abs().max());
                }
            }
        }
        for (a, b) in stats_b.iter().zip(&stats_s) {
            assert!(close(a, b), "{name}: batched BN statistics");
        }
        assert!(close(&eval_b, &eval_s), "{name}: batched evaluation-mode logits");
        // In effect where the kernel applies (channels-last; under GDAS each op's halves, not across edges): one
        // node per half, and for the first halves of a state's readers one node backward instead of one per
        // convolution and autograd's additions of their gradients.
        if c.channels_last {
            assert!(train_b < train_s, "{name}: {train_b} ATen calls batched, {train_s} not");
        } else {
            assert_eq!(train_b, train_s, "{name}: batched edges where they do not apply");
        }
        for (p, ((la, ga, gra), (lb, gb, grb))) in batched.iter().zip(&plain).enumerate() {
            assert!(close(la, lb), "{name}, pass {p}: loss {la} vs {lb}");
            assert!(close(ga, gb), "{name}, pass {p}: logits");
            for (i, (a, b)) in gra.iter().zip(grb).enumerate() {
                assert_eq!(a.defined(), b.defined(), "{name}, pass {p}: gradient {i} reached in one only");
                if a.defined() {
                    assert!(close(a, b), "{name}, pass {p}: gradient {i} differs by {}", (a - b).abs().max());
                }
            }
            let n_arch = net.alphas.tensors().len();
            for g in &gra[gra.len() - n_arch..] {
                assert!(g.abs().max().double_value(&[]) > 0.0, "{name}: an architecture gradient is zero");
            }
        }
        for (((n, _), a), b) in all_buffers(&vs).iter().zip(&stats_b).zip(&stats_p) {
            assert!(close(a, b), "{name}: {n} after three passes");
        }
        assert!(stats_b.iter().zip(&before).any(|(a, b)| !a.equal(b)), "{name}: the statistics never moved");
        assert!(close(&eval_b, &eval_p), "{name}: evaluation-mode logits");
        assert!(calls_s < calls_p, "{name}: {calls_s} ATen calls shared, {calls_p} unshared");
    }
}

/// The final network shares what the readers of one state compute alike (a cell output's ReLU for the two next
/// cells and the auxiliary head, an op input's ReLU and pooling): its training-mode loss (drop path, auxiliary
/// head) and every gradient, its BN statistics and its evaluation logits equal the unshared network's in float64,
/// for DARTS_V2 (pooling in its reduction cell), DARTS_V1 and the ImageNet variant, NCHW and channels-last;
/// and sharing makes fewer ATen calls. Batched convolutions (each separable half as one node, the first halves of
/// the ops reading one state as one, channels-last) give the same values, against both, with fewer ATen calls in
/// a training pass.
#[test]
fn shared_inputs_give_the_unshared_final_networks_values_and_gradients() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _threads = AtMostTwoThreads::set();
    let cases = [("DARTS_V2", false, false, 16i64), ("DARTS_V1", false, true, 16), ("DARTS_V2", true, true, 56)];
    let opts = (Kind::Double, Device::Cpu);
    for (name, imagenet, cl, size) in cases {
        let shape = DataShape { channels: 3, height: size as usize, width: size as usize, classes: 5 };
        let base = if imagenet { NetworkConfig::imagenet() } else { NetworkConfig::default() };
        let cfg = NetworkConfig { channels: 6, layers: 5, ..base };
        let mut vs = nn::VarStore::new(Device::Cpu);
        let mut net = Network::new(&vs.root(), &zoo::get(name).unwrap(), &cfg, &shape);
        vs.double();
        darts::network::set_channels_last(&mut net, &vs, cl);
        net.drop_path_prob = 0.3;
        let x = Tensor::randn([4, 3, size, size], opts);
        let y = Tensor::from_slice(&[0i64, 4, 2, 1]);
        let masks = drop_path_masks(net.drop_sites(), 4, 0.3, &mut rand_chacha::ChaCha8Rng::seed_from_u64(2));
        let weights = vs.trainable_variables();
        let buffers: Vec<Tensor> = vs.variables().into_values().filter(|t| !t.requires_grad()).collect();
        let before: Vec<Tensor> = buffers.iter().map(|t| t.copy()).collect();
        let restore = || tch::no_grad(|| buffers.iter().zip(&before).for_each(|(t, b)| t.shallow_clone().copy_(b)));
        let mut run = |share: bool, batched: bool| {
            restore();
            net.share_inputs = share;
            net.batched_convs = batched;
            let step = || {
                let (logits, aux) = net.forward_masked(&x, true, Some(&masks));
                assert!(aux.is_some(), "{name}: the auxiliary head ran");
                let loss = loss_with_auxiliary(&logits, aux.as_ref(), &y, 0.4, 0.0);
                let grads = Tensor::run_backward(&[&loss], &weights.iter().collect::<Vec<_>>(), false, false);
                (loss, grads)
            };
            let (loss, grads) = step();
            let stats: Vec<Tensor> = buffers.iter().map(|t| t.copy()).collect();
            let eval = tch::no_grad(|| net.forward_t(&x, false).0);
            let (_, calls) = darts::native::count_aten_calls(|| tch::no_grad(|| net.forward_t(&x, false))).unwrap();
            let (_, train_calls) = darts::native::count_aten_calls(step).unwrap();
            (loss, grads, stats, eval, calls, train_calls)
        };
        let (loss_b, grads_b, stats_b, eval_b, _, train_b) = run(true, true);
        let (loss_s, grads_s, stats_s, eval_s, calls_s, train_s) = run(true, false);
        let (loss_p, grads_p, stats_p, eval_p, calls_p, _) = run(false, false);
        restore();
        let close = |a: &Tensor, b: &Tensor| {
            let scale = b.abs().max().double_value(&[]).max(1e-30);
            (a - b).abs().max().double_value(&[]) <= 1e-10 * scale + 1e-13
        };
        // Batched against unbatched (both shared); below, shared (unbatched) against the unshared.
        assert!(close(&loss_b, &loss_s), "{name}: batched loss");
        for (i, (a, b)) in grads_b.iter().zip(&grads_s).enumerate() {
            assert!(close(a, b), "{name}: batched gradient {i} differs by {}", (a - b).abs().max());
        }
        for (a, b) in stats_b.iter().zip(&stats_s) {
            assert!(close(a, b), "{name}: batched BN statistics");
        }
        assert!(close(&eval_b, &eval_s), "{name}: batched evaluation logits");
        if cl {
            assert!(train_b < train_s, "{name}: {train_b} ATen calls batched, {train_s} not");
        } else {
            assert_eq!(train_b, train_s, "{name}: batched convolutions on NCHW");
        }
        assert!(close(&loss_s, &loss_p), "{name}: loss");
        for (i, (a, b)) in grads_s.iter().zip(&grads_p).enumerate() {
            assert!(close(a, b), "{name}: gradient {i} differs by {}", (a - b).abs().max());
        }
        for (a, b) in stats_s.iter().zip(&stats_p) {
            assert!(close(a, b), "{name}: BN statistics");
        }
        assert!(close(&eval_s, &eval_p), "{name}: evaluation logits");
        assert!(calls_s < calls_p, "{name}: {calls_s} ATen calls shared, {calls_p} unshared");
    }
}

/// Grayscale images (one channel: the built-in data, Fashion-MNIST) run channels-last through both networks
/// when asked: libtorch's stem convolution returns NCHW from a one-channel input (a one-channel tensor is both
/// layouts), so the networks lay the stem's output out themselves. Seen through the separable halves, which
/// apply to channels-last input only: with them a training pass makes fewer ATen calls than without. And the
/// logits equal the NCHW network's (float64).
#[test]
fn grayscale_images_run_channels_last() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _threads = AtMostTwoThreads::set();
    let opts = (Kind::Double, Device::Cpu);
    let shape = DataShape { channels: 1, height: 8, width: 8, classes: 3 };
    let x = Tensor::randn([3, 1, 8, 8], opts);
    let y = Tensor::from_slice(&[0i64, 2, 1]);
    // The supernet.
    let space = SearchSpace { channels: 4, layers: 3, nodes: 2, ..Default::default() };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mut net = SearchNetwork::new(&vs.root(), &space, &shape, Alphas::random(&space, Device::Cpu));
    vs.double();
    net.alphas = Alphas {
        normal: net.alphas.normal.to_kind(Kind::Double),
        reduce: net.alphas.reduce.to_kind(Kind::Double),
        ..net.alphas
    };
    let nchw = tch::no_grad(|| net.forward_t(&x, false));
    darts::supernet::set_channels_last(&mut net, &vs, true);
    // Before any training pass (which moves the BN statistics that evaluation uses).
    let cl = tch::no_grad(|| net.forward_t(&x, false));
    assert!((&cl - &nchw).abs().max().double_value(&[]) < 1e-10, "supernet: channels-last logits");
    let weights = vs.trainable_variables();
    let refs: Vec<&Tensor> = weights.iter().collect();
    let mut calls = Vec::new();
    for batched in [true, false] {
        net.batched_edges = batched;
        let (_, n) = darts::native::count_aten_calls(|| net.loss_grads(&x, &y, &refs)).unwrap();
        calls.push(n);
    }
    assert!(calls[0] < calls[1], "supernet: {} ATen calls with separable halves, {} without", calls[0], calls[1]);
    // The final network.
    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg = NetworkConfig { channels: 6, layers: 3, ..NetworkConfig::default() };
    let mut net = Network::new(&vs.root(), &zoo::get("DARTS_V2").unwrap(), &cfg, &shape);
    vs.double();
    let nchw = tch::no_grad(|| net.forward_t(&x, false).0);
    darts::network::set_channels_last(&mut net, &vs, true);
    let cl = tch::no_grad(|| net.forward_t(&x, false).0);
    assert!((&cl - &nchw).abs().max().double_value(&[]) < 1e-10, "final network: channels-last logits");
    let weights = vs.trainable_variables();
    let mut calls = Vec::new();
    for batched in [true, false] {
        net.batched_convs = batched;
        let (_, n) = darts::native::count_aten_calls(|| {
            let (logits, aux) = net.forward_t(&x, true);
            let loss = loss_with_auxiliary(&logits, aux.as_ref(), &y, 0.4, 0.0);
            Tensor::run_backward(&[&loss], &weights.iter().collect::<Vec<_>>(), false, false)
        })
        .unwrap();
        calls.push(n);
    }
    assert!(calls[0] < calls[1], "final network: {} ATen calls with separable halves, {} without", calls[0], calls[1]);
}

//! The supernet's shape and size against the original code.
#[allow(dead_code)]
mod common;
use darts::space::{DataShape, OpKind, SearchSpace};
use darts::supernet::{count_parameters, Alphas, SearchNetwork};
use tch::{nn, Device, Kind, Tensor};

fn build(space: &SearchSpace, shape: &DataShape) -> (nn::VarStore, SearchNetwork) {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = SearchNetwork::new(&vs.root(), space, shape, Alphas::random(space, Device::Cpu));
    (vs, net)
}

#[test]
fn default_cifar_supernet_has_the_original_parameter_count() {
    let shape = DataShape { channels: 3, height: 32, width: 32, classes: 10 };
    let (vs, net) = build(&SearchSpace::default(), &shape);
    // model_search.Network(16, 10, 8) in quark0/darts: 1,930,618 parameters.
    assert_eq!(count_parameters(&vs), 1_930_618);
    assert_eq!(net.alphas.normal.size(), vec![14, 8]);
    assert_eq!(net.alphas.reduce.size(), vec![14, 8]);
    // alpha is not among the weights.
    assert!(vs.trainable_variables().iter().all(|t| t.size() != vec![14, 8]));
    // DARTS-'s auxiliary skip adds a FactorizedReduce(C, C) without affine BN (two 1x1 convolutions C -> C/2:
    // C^2 weights) on each of a reduction cell's 8 reducing edges; the reduction cells have C = 32 and 64.
    let (vs, _) = build(&SearchSpace { auxiliary_skip: true, ..Default::default() }, &shape);
    assert_eq!(count_parameters(&vs), 1_930_618 + 8 * 32 * 32 + 8 * 64 * 64);
}

/// Our count agrees with the PyTorch reference (the original model_search.py) for other shapes too.
#[test]
fn parameter_counts_match_the_pytorch_reference_for_other_shapes() {
    let py = common::darts_python();
    let cases = [
        (8usize, 5usize, 10usize, 1usize, 1usize, false),
        (4, 3, 7, 3, 1, false),
        (6, 6, 100, 3, 1, false),
        (16, 5, 10, 3, 4, false),
        (8, 4, 10, 1, 2, false),
        (6, 5, 10, 3, 1, true),
    ];
    for (c, layers, classes, in_ch, k, aux) in cases {
        let space = SearchSpace { channels: c, layers, partial_channels: k, auxiliary_skip: aux, ..Default::default() };
        let shape = DataShape { channels: in_ch, height: 16, width: 16, classes };
        let (vs, _) = build(&space, &shape);
        let out = std::process::Command::new(&py)
            .args([concat!(env!("CARGO_MANIFEST_DIR"), "/bench/pytorch_darts.py"), "count"])
            .args(["--channels", &c.to_string(), "--layers", &layers.to_string()])
            .args(["--classes", &classes.to_string(), "--in-channels", &in_ch.to_string()])
            .args(["--partial", &k.to_string()])
            .args(if aux { &["--aux-skip", "1"][..] } else { &[] })
            .output()
            .expect("run the PyTorch reference");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(count_parameters(&vs), want, "C={c} layers={layers} classes={classes} in={in_ch} K={k} aux={aux}");
    }
}

#[test]
fn forward_gives_logits_for_odd_sizes_and_one_channel() {
    let space = SearchSpace { channels: 4, layers: 3, nodes: 2, ..Default::default() };
    let shape = DataShape { channels: 1, height: 13, width: 11, classes: 5 };
    let (_vs, net) = build(&space, &shape);
    let x = Tensor::randn([3, 1, 13, 11], (Kind::Float, Device::Cpu));
    let y = net.forward_t(&x, true);
    assert_eq!(y.size(), vec![3, 5]);
    assert!(y.isfinite().all().int64_value(&[]) == 1);
}

#[test]
fn mixed_op_is_the_softmax_weighted_sum_of_its_ops() {
    // With alpha strongly favouring one op the supernet equals a network of that op alone; with the
    // none op favoured, every edge contributes nearly nothing and the cell outputs vanish.
    let space = SearchSpace {
        ops: vec![OpKind::None, OpKind::SkipConnect, OpKind::AvgPool3x3],
        channels: 4,
        layers: 1,
        nodes: 2,
        ..Default::default()
    };
    let shape = DataShape { channels: 2, height: 8, width: 8, classes: 3 };
    let vs = nn::VarStore::new(Device::Cpu);
    let big = |col: i64| {
        let a = Tensor::zeros([5, 3], (Kind::Float, Device::Cpu));
        let _ = a.narrow(1, col, 1).fill_(50.0);
        a.set_requires_grad(true)
    };
    let net = SearchNetwork::new(
        &vs.root(),
        &space,
        &shape,
        Alphas { normal: big(0), reduce: big(0), betas: None, nodes: space.nodes },
    );
    let x = Tensor::randn([4, 2, 8, 8], (Kind::Float, Device::Cpu));
    let logits = net.forward_t(&x, true);
    // Everything into the classifier is ~0, so logits ~ bias.
    let bias = vs.variables()["classifier.bias"].shallow_clone();
    let diff = (logits - bias.unsqueeze(0)).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "{diff}");
}

/// Writes our supernet (weights, BN statistics, alphas, betas), a batch, and our logits, loss and architecture
/// gradients; the original code (PC-DARTS' model_search.py where K > 1) loads it all and recomputes them.
#[test]
fn supernet_forward_and_architecture_gradients_equal_the_original_code() {
    let py = common::darts_python();
    let cases = [
        (4usize, 2usize, 1usize, false, None),
        (8, 3, 4, true, None),
        (8, 2, 2, true, None),
        (4, 3, 1, false, Some(0.6)),
    ];
    for (c, nodes, k, edge_norm, aux_skip) in cases {
        let space = SearchSpace {
            channels: c,
            layers: 4,
            nodes,
            partial_channels: k,
            edge_normalization: edge_norm,
            auxiliary_skip: aux_skip.is_some(),
            ..Default::default()
        };
        let shape = DataShape { channels: 3, height: 16, width: 16, classes: 10 };
        let (vs, mut net) = build(&space, &shape);
        net.aux_skip = aux_skip.unwrap_or(1.0);
        let x = Tensor::randn([6, 3, 16, 16], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 3, 9, 1, 1, 7]);
        let arch = net.alphas.tensors();
        let logits = net.forward_t(&x, true);
        let loss = logits.cross_entropy_for_logits(&y);
        let grads = Tensor::run_backward(&[&loss], &arch, false, false);
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        for (n, t) in net.alphas.names().into_iter().zip(&arch) {
            named.push((n.to_string(), t.detach()));
        }
        for (n, g) in net.alphas.names().into_iter().zip(&grads) {
            named.push((format!("test/grad/{n}"), g.shallow_clone()));
        }
        named.push(("test/x".into(), x));
        named.push(("test/y".into(), y));
        named.push(("test/logits".into(), logits.detach()));
        named.push(("test/loss".into(), loss.detach()));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("supernet.safetensors");
        Tensor::write_safetensors(&named, &file).unwrap();
        let mut cmd = std::process::Command::new(&py);
        cmd.args([concat!(env!("CARGO_MANIFEST_DIR"), "/bench/pytorch_darts.py"), "check-supernet"])
            .args(["--channels", &c.to_string(), "--layers", "4", "--nodes", &nodes.to_string()])
            .args(["--partial", &k.to_string(), "--in-channels", "3", "--classes", "10", "--weights"])
            .arg(&file);
        if edge_norm {
            cmd.arg("--edge-norm");
        }
        if let Some(w) = aux_skip {
            cmd.args(["--aux-skip", &w.to_string()]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let f = |key: &str| r[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {r}"));
        let case = format!("C={c} nodes={nodes} K={k} edge_norm={edge_norm} aux_skip={aux_skip:?}: {r}");
        assert!(f("logits") < 1e-4, "{case}");
        assert!(f("loss") < 1e-5, "{case}");
        for n in net.alphas.names() {
            let scale = f(&format!("grad scale {n}"));
            assert!(scale > 0.0, "{case}");
            assert!(f(&format!("grad {n}")) < 1e-6 + 1e-3 * scale, "{n}: {case}");
        }
    }
}

fn all_buffers(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| !t.requires_grad()).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Gradient checkpointing of cells recomputes each cell during backward: the gradients (weights and
/// architecture) and the BN statistics afterwards must be those of the plain pass.
#[test]
fn checkpointed_cells_give_the_plain_gradients_and_statistics() {
    let cases = [(1usize, false, 0.0, None), (2, true, 0.0, None), (1, false, 0.5, None), (2, false, 0.3, Some(1.0))];
    for (k, edge_norm, skip_dropout, gdas_tau) in cases {
        let space = SearchSpace {
            channels: 4,
            layers: 5,
            nodes: 3,
            partial_channels: k,
            edge_normalization: edge_norm,
            ..Default::default()
        };
        let shape = DataShape { channels: 1, height: 12, width: 12, classes: 5 };
        let (vs, mut net) = build(&space, &shape);
        net.gdas_tau = gdas_tau;
        let x = Tensor::randn([4, 1, 12, 12], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 4, 2, 1]);
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
        if skip_dropout > 0.0 {
            // The dropout is on: the same pass without it has another loss.
            let (undropped, _, _) = net.loss_grads(&x, &y, &refs);
            restore();
            net.skip_dropout = skip_dropout;
            net.set_sample_stream(5);
            let (dropped, _, _) = net.loss_grads(&x, &y, &refs);
            restore();
            assert!(!undropped.allclose(&dropped, 1e-4, 1e-6, false), "skip dropout changes nothing");
        }
        net.set_sample_stream(7);
        let (loss_a, _, plain) = net.loss_grads(&x, &y, &refs);
        let stats_a: Vec<Tensor> = all_buffers(&vs).iter().map(|(_, t)| t.copy()).collect();
        restore();
        darts::supernet::set_checkpoint_cells(&mut net, &vs, true);
        net.set_sample_stream(7);
        let (loss_b, _, ckpt) = net.loss_grads(&x, &y, &refs);
        assert!(loss_a.allclose(&loss_b, 1e-6, 1e-7, false));
        let n_arch = net.alphas.tensors().len();
        // GDAS runs one op per edge: the others' weights get no gradient, in both passes alike.
        let unreached = plain.iter().filter(|g| !g.defined()).count();
        assert_eq!(unreached > 0, gdas_tau.is_some(), "{unreached} weights without a gradient");
        for (i, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
            assert_eq!(a.defined(), b.defined(), "gradient {i}");
            if !a.defined() {
                assert!(i < wrt.len() - n_arch, "an architecture tensor without a gradient");
                continue;
            }
            assert!(a.abs().max().double_value(&[]) > 0.0 || i < wrt.len() - n_arch, "no gradient");
            assert!(a.allclose(b, 1e-4, 1e-6, false), "K={k}: gradient {i} differs by {}", (a - b).abs().max());
        }
        for ((n, t), s) in all_buffers(&vs).iter().zip(&stats_a) {
            assert!(t.allclose(s, 1e-5, 1e-7, false), "{n} after checkpointed pass");
        }
        assert!(stats_a.iter().zip(&before).any(|(a, b)| !a.equal(b)), "one forward updates the statistics");
    }
}

//! The supernet's shape and size against the original code.
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
}

/// Our count agrees with the PyTorch reference (the original model_search.py) for other shapes too.
#[test]
fn parameter_counts_match_the_pytorch_reference_for_other_shapes() {
    let py = darts_python();
    for (c, layers, classes, in_ch) in [(8usize, 5usize, 10usize, 1usize), (4, 3, 7, 3), (6, 6, 100, 3)] {
        let space = SearchSpace { channels: c, layers, ..Default::default() };
        let shape = DataShape { channels: in_ch, height: 16, width: 16, classes };
        let (vs, _) = build(&space, &shape);
        let out = std::process::Command::new(&py)
            .args([concat!(env!("CARGO_MANIFEST_DIR"), "/bench/pytorch_darts.py"), "count"])
            .args(["--channels", &c.to_string(), "--layers", &layers.to_string()])
            .args(["--classes", &classes.to_string(), "--in-channels", &in_ch.to_string()])
            .output()
            .expect("run the PyTorch reference");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(count_parameters(&vs), want, "C={c} layers={layers} classes={classes} in={in_ch}");
    }
}

/// The Python of darts' own set-up (scripts/setup.sh), which has torch.
pub fn darts_python() -> String {
    let cache =
        std::env::var("DARTS_CACHE").unwrap_or_else(|_| format!("{}/.cache/darts", std::env::var("HOME").unwrap()));
    let py = format!("{cache}/venv/bin/python");
    assert!(std::path::Path::new(&py).is_file(), "{py} missing: run scripts/setup.sh first");
    py
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
    let net = SearchNetwork::new(&vs.root(), &space, &shape, Alphas { normal: big(0), reduce: big(0) });
    let x = Tensor::randn([4, 2, 8, 8], (Kind::Float, Device::Cpu));
    let logits = net.forward_t(&x, true);
    // Everything into the classifier is ~0, so logits ~ bias.
    let bias = vs.variables()["classifier.bias"].shallow_clone();
    let diff = (logits - bias.unsqueeze(0)).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "{diff}");
}

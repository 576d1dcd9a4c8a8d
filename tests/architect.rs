//! The second-order hypergradient's Hessian-vector product against exact double backward.
#[allow(dead_code)]
mod common;
use darts::architect::{exact_hvp, finite_difference_hvp, global_norm, Architect, Order};
use darts::optim::Sgd;
use darts::params::Params;
use darts::space::{Activation, DataShape, OpKind, SearchSpace};
use darts::supernet::{Alphas, SearchNetwork};
use tch::{nn, Device, Kind, Tensor};

struct Fixture {
    _vs: nn::VarStore,
    net: SearchNetwork,
    weights: Vec<Tensor>,
    buffers: Vec<Tensor>,
    x: Tensor,
    y: Tensor,
}

fn fixture() -> Fixture {
    // The tests of this file run in parallel and draw from libtorch's one generator: hold it, so that every
    // test gets the same fixture.
    let _rng = darts::torch_rng_lock();
    tch::manual_seed(7);
    // A smooth supernet (GELU, no max pooling): with ReLU or max pooling the gradient has kinks, and a
    // finite difference of it picks up their jumps, which double backward (second derivative 0 between kinks)
    // does not see; then the two are not the same quantity and cannot be compared.
    let ops = vec![OpKind::None, OpKind::AvgPool3x3, OpKind::SkipConnect, OpKind::SepConv3x3, OpKind::DilConv3x3];
    let space =
        SearchSpace { ops, channels: 4, layers: 3, nodes: 2, activation: Activation::Gelu, ..Default::default() };
    let shape = DataShape { channels: 2, height: 8, width: 8, classes: 4 };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let opts = (Kind::Double, Device::Cpu);
    let a = || (Tensor::randn([5, 5], opts) * 0.5).set_requires_grad(true);
    let net = SearchNetwork::new(
        &vs.root(),
        &space,
        &shape,
        Alphas { normal: a(), reduce: a(), betas: None, nodes: space.nodes },
    );
    vs.double();
    let Params { weights, buffers, .. } = Params::of(&vs);
    let x = Tensor::randn([6, 2, 8, 8], opts);
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 0, 1]);
    Fixture { _vs: vs, net, weights, buffers, x, y }
}

fn rel_err(a: &[Tensor], b: &[Tensor]) -> f64 {
    let d: Vec<Tensor> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    global_norm(&d).double_value(&[]) / global_norm(b).double_value(&[])
}

#[test]
fn finite_difference_hvp_matches_double_backward() {
    let f = fixture();
    let v: Vec<Tensor> = f.weights.iter().map(|w| w.randn_like()).collect();
    let before: Vec<Tensor> = f.weights.iter().map(|w| w.detach().copy()).collect();
    let exact = exact_hvp(&f.net, &f.weights, &v, &f.x, &f.y);
    let fd = finite_difference_hvp(&f.net, &f.weights, &v, &f.x, &f.y, 0.01);
    let err = rel_err(&fd, &exact);
    assert!(err < 1e-3, "relative error {err} with DARTS' r = 0.01");
    // Central differences: the truncation error falls as r^2 (0.1 -> 0.03 should divide it by about 11).
    let coarse = rel_err(&finite_difference_hvp(&f.net, &f.weights, &v, &f.x, &f.y, 0.1), &exact);
    let finer = rel_err(&finite_difference_hvp(&f.net, &f.weights, &v, &f.x, &f.y, 0.03), &exact);
    assert!(coarse / finer > 6.0 && coarse / finer < 20.0, "error {coarse} at r = 0.1, {finer} at r = 0.03");
    assert!(global_norm(&exact).double_value(&[]) > 1e-6, "the product is not trivially zero");
    // The weights are restored exactly.
    for (w, b) in f.weights.iter().zip(&before) {
        assert!(w.equal(b));
    }
}

/// With skip dropout the loss is a random function of its masks; both finite-difference evaluations draw the
/// same masks, so the product is that of the loss under those masks (double backward with them), not noise.
#[test]
fn finite_difference_hvp_under_skip_dropout_differentiates_one_set_of_masks() {
    let mut f = fixture();
    let v: Vec<Tensor> = f.weights.iter().map(|w| w.randn_like()).collect();
    let plain = exact_hvp(&f.net, &f.weights, &v, &f.x, &f.y);
    f.net.skip_dropout = 0.3;
    f.net.set_sample_stream(11);
    let exact = exact_hvp(&f.net, &f.weights, &v, &f.x, &f.y);
    f.net.set_sample_stream(11);
    let fd = finite_difference_hvp(&f.net, &f.weights, &v, &f.x, &f.y, 0.01);
    assert_eq!(f.net.sample_stream(), 12, "one set of masks taken from the stream");
    let err = rel_err(&fd, &exact);
    assert!(err < 1e-3, "relative error {err}");
    assert!(rel_err(&exact, &plain) > 100.0 * err, "the masks change the product");
}

#[test]
fn second_order_hypergradient_is_val_gradient_at_unrolled_weights_minus_eta_hvp() {
    for skip_dropout in [0.0, 0.3] {
        let mut f = fixture();
        f.net.skip_dropout = skip_dropout;
        f.net.set_sample_stream(20);
        let mut sgd = Sgd::new(&f.weights, 0.1, 0.9, 3e-4);
        // A momentum buffer as after some steps: the unrolled step's `momentum * buf` term is exercised.
        sgd.buffers = f.weights.iter().map(|w| w.randn_like() * 0.05).collect();
        let arch = Architect::new(&f.net, Order::Second, 3e-4, (0.5, 0.999), 1e-3);
        let (xv, yv) = (f.x.flip([3]), f.y.shallow_clone());
        let eta = 0.1;
        let stats_before: Vec<Tensor> = f.buffers.iter().map(|t| t.copy()).collect();
        let h = arch.hypergradient(&f.net, &f.weights, &f.buffers, &sgd, (&f.x, &f.y), (&xv, &yv), eta);
        let stats_after: Vec<Tensor> = f.buffers.iter().map(|t| t.copy()).collect();
        tch::no_grad(|| {
            for (b, s) in f.buffers.iter().zip(&stats_before) {
                b.shallow_clone().copy_(s);
            }
        });
        if skip_dropout > 0.0 {
            assert_eq!(f.net.sample_stream(), 22, "the training batch's masks, then the validation batch's");
        }

        // Independent assembly: w' by hand, grads at w', exact HVP by double backward (with skip dropout: the
        // training batch's masks for the unrolled step and the Hessian, the next ones for the validation batch).
        f.net.set_sample_stream(20);
        let loss = f.net.loss(&f.x, &f.y);
        let g = Tensor::run_backward(&[loss], &f.weights, false, false);
        let theta: Vec<Tensor> = f.weights.iter().map(|w| w.detach().copy()).collect();
        tch::no_grad(|| {
            for (((w, t), gi), buf) in f.weights.iter().zip(&theta).zip(&g).zip(&sgd.buffers) {
                w.shallow_clone().copy_(&(t - (buf * 0.9 + gi + t * 3e-4) * eta));
            }
        });
        // The original unrolls a copy of the model: the validation pass at w' leaves the BN statistics alone.
        let stats_unrolled: Vec<Tensor> = f.buffers.iter().map(|t| t.copy()).collect();
        f.net.set_sample_stream(21);
        let lv = f.net.loss(&xv, &yv);
        let mut inputs: Vec<&Tensor> = f.net.alphas.tensors().to_vec();
        inputs.extend(f.weights.iter());
        let grads = Tensor::run_backward(&[lv], &inputs, false, false);
        tch::no_grad(|| {
            for (w, t) in f.weights.iter().zip(&theta) {
                w.shallow_clone().copy_(t);
            }
            for (b, s) in f.buffers.iter().zip(&stats_unrolled) {
                b.shallow_clone().copy_(s);
            }
        });
        if skip_dropout == 0.0 {
            // The real model's statistics then see the training batch twice more, at w + R v and w - R v (the
            // finite difference), as the original's `_hessian_vector_product` runs the real model.
            let v = &grads[2..];
            let big_r = 0.01 / global_norm(v).double_value(&[]);
            for sign in [1.0, -1.0] {
                tch::no_grad(|| {
                    for ((w, t), vi) in f.weights.iter().zip(&theta).zip(v) {
                        w.shallow_clone().copy_(&(t + vi * (big_r * sign)));
                    }
                });
                let _ = f.net.loss(&f.x, &f.y);
            }
            tch::no_grad(|| {
                for (w, t) in f.weights.iter().zip(&theta) {
                    w.shallow_clone().copy_(t);
                }
            });
            for (a, b) in stats_after.iter().zip(&f.buffers) {
                assert!(a.allclose(b, 1e-9, 1e-12, false), "BN statistics after the alpha step differ");
            }
            assert!(stats_after.iter().zip(&stats_before).any(|(a, b)| !a.equal(b)), "the statistics never moved");
        }
        f.net.set_sample_stream(20);
        let exact = exact_hvp(&f.net, &f.weights, &grads[2..], &f.x, &f.y);
        let want: Vec<Tensor> = grads[..2].iter().zip(&exact).map(|(d, e)| d - e * eta).collect();
        let err = rel_err(&h, &want);
        assert!(err < 1e-3, "relative error {err}");
        // And it differs from the first-order gradient (the correction is not nothing).
        let first = Architect::new(&f.net, Order::First, 3e-4, (0.5, 0.999), 1e-3);
        let h1 = first.hypergradient(&f.net, &f.weights, &f.buffers, &sgd, (&f.x, &f.y), (&xv, &yv), eta);
        assert!(rel_err(&h1, &want) > 10.0 * err);
        // And the momentum term matters: without the buffer the hypergradient is another one.
        let bare = Sgd::new(&f.weights, 0.1, 0.9, 3e-4);
        f.net.set_sample_stream(20);
        let h0 = arch.hypergradient(&f.net, &f.weights, &f.buffers, &bare, (&f.x, &f.y), (&xv, &yv), eta);
        assert!(rel_err(&h0, &want) > 10.0 * err, "the momentum buffer changed nothing");
    }
}

/// The unrolled hypergradient of the full DARTS op set (ReLU, max pooling) with a momentum buffer as after
/// some steps, against the reference architect in bench/pytorch_darts.py (the original architect.py): the same
/// weights, alphas, momentum buffers, batches and learning rate.
#[test]
fn second_order_hypergradient_with_momentum_equals_the_reference_architect() {
    let py = common::darts_python();
    let (space, shape) = {
        let space = SearchSpace { channels: 4, layers: 3, nodes: 2, ..Default::default() };
        (space, DataShape { channels: 3, height: 8, width: 8, classes: 10 })
    };
    let (vs, net) = {
        let _rng = darts::torch_rng_lock();
        tch::manual_seed(23);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = SearchNetwork::new(&vs.root(), &space, &shape, Alphas::random(&space, Device::Cpu));
        (vs, net)
    };
    // Alphas away from uniform, so that every op matters.
    tch::no_grad(|| {
        for a in net.alphas.tensors() {
            a.shallow_clone().copy_(&(a.randn_like() * 0.5));
        }
    });
    let params = Params::of(&vs);
    let mut sgd = Sgd::new(&params.weights, 0.025, 0.9, 3e-4);
    sgd.buffers = params.weights.iter().map(|w| w.randn_like() * 0.05).collect();
    let opts = (Kind::Float, Device::Cpu);
    let (xt, xv) = (Tensor::randn([8, 3, 8, 8], opts), Tensor::randn([8, 3, 8, 8], opts));
    let (yt, yv) = (Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]), Tensor::from_slice(&[9i64, 8, 7, 6, 5, 4, 3, 2]));
    let eta = 0.02;
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    for (n, t) in net.alphas.names().into_iter().zip(net.alphas.tensors()) {
        named.push((n.to_string(), t.detach().copy()));
    }
    for (n, b) in params.names.iter().zip(&sgd.buffers) {
        named.push((format!("sgd/{n}"), b.copy()));
    }
    let arch = Architect::new(&net, Order::Second, 3e-4, (0.5, 0.999), 1e-3);
    let h = arch.hypergradient(&net, &params.weights, &params.buffers, &sgd, (&xt, &yt), (&xv, &yv), eta);
    let bare = Sgd::new(&params.weights, 0.025, 0.9, 3e-4);
    let h0 = arch.hypergradient(&net, &params.weights, &params.buffers, &bare, (&xt, &yt), (&xv, &yv), eta);
    for (n, g) in net.alphas.names().into_iter().zip(&h) {
        named.push((format!("test/h/{n}"), g.shallow_clone()));
    }
    named.extend([("test/xt".into(), xt), ("test/yt".into(), yt), ("test/xv".into(), xv), ("test/yv".into(), yv)]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("architect.safetensors");
    Tensor::write_safetensors(&named, &file).unwrap();
    let out = std::process::Command::new(&py)
        .args([concat!(env!("CARGO_MANIFEST_DIR"), "/bench/pytorch_darts.py"), "check-architect"])
        .args(["--channels", "4", "--layers", "3", "--nodes", "2", "--in-channels", "3", "--classes", "10"])
        .args(["--eta", &eta.to_string(), "--weights"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = |key: &str| r[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {r}"));
    for (i, n) in net.alphas.names().into_iter().enumerate() {
        let scale = f(&format!("grad scale {n}"));
        assert!(scale > 0.0, "{r}");
        assert!(f(&format!("grad {n}")) < 1e-3 * scale, "{n}: {r}");
        // Without the momentum term the answer is measurably another: the comparison can tell them apart.
        let off = (&h0[i] - &h[i]).abs().max().double_value(&[]);
        assert!(off > 1e-2 * scale, "{n}: the momentum term moves the hypergradient by only {off} of {scale}");
    }
}

/// The first alpha step moves each alpha against its hypergradient by Adam's first-step size, lr times the
/// sign of (gradient + weight decay * alpha), where the gradient is the validation loss's, computed here
/// independently by autograd.
#[test]
fn a_first_order_alpha_step_descends_the_validation_loss() {
    let f = fixture();
    let (xv, yv) = (f.x.flip([2]), f.y.shallow_clone());
    let alphas = f.net.alphas.tensors();
    let before: Vec<Tensor> = alphas.iter().map(|a| a.detach().copy()).collect();
    let stats: Vec<Tensor> = f.buffers.iter().map(|t| t.copy()).collect();
    let g = Tensor::run_backward(&[f.net.loss(&xv, &yv)], &alphas, false, false);
    tch::no_grad(|| {
        for (b, s) in f.buffers.iter().zip(&stats) {
            b.shallow_clone().copy_(s);
        }
    });
    let sgd = Sgd::new(&f.weights, 0.1, 0.9, 3e-4);
    let mut arch = Architect::new(&f.net, Order::First, 3e-4, (0.5, 0.999), 1e-3);
    let loss_before = f.net.loss(&xv, &yv).double_value(&[]);
    arch.step(&f.net, &f.weights, &f.buffers, &sgd, (&f.x, &f.y), (&xv, &yv), 0.1).unwrap();
    let mut checked = 0;
    for ((a, b), gi) in alphas.iter().zip(&before).zip(&g) {
        let d = gi + b * 1e-3;
        let step = a.detach() - b;
        // Adam's first step, by hand: m = (1 - b1) d, v = (1 - b2) d^2, both bias-corrected back to d and d^2,
        // so the step is -lr d / (|d| + eps): the sign of d where |d| is far above eps = 1e-8.
        let want = &d * -3e-4 / (d.abs() + 1e-8);
        checked += d.abs().gt(1e-6).sum(Kind::Int64).int64_value(&[]);
        let err = (&step - &want).abs().max().double_value(&[]);
        assert!(err < 1e-12, "alpha moved {err} off Adam's first step against the gradient");
    }
    assert!(checked > 20, "only {checked} elements checked");
    // A small step against the gradient lowers the validation loss it was taken on (BN in training mode: batch
    // statistics, so the comparison is of the same function).
    assert!(f.net.loss(&xv, &yv).double_value(&[]) < loss_before);
}

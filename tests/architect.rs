//! The second-order hypergradient's Hessian-vector product against exact double backward.
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
        let sgd = Sgd::new(&f.weights, 0.1, 0.9, 3e-4);
        let arch = Architect::new(&f.net, Order::Second, 3e-4, (0.5, 0.999), 1e-3);
        let (xv, yv) = (f.x.flip([3]), f.y.shallow_clone());
        let eta = 0.1;
        let stats_before: Vec<Tensor> = f.buffers.iter().map(|t| t.copy()).collect();
        let h = arch.hypergradient(&f.net, &f.weights, &f.buffers, &sgd, (&f.x, &f.y), (&xv, &yv), eta);
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
            for ((w, t), gi) in f.weights.iter().zip(&theta).zip(&g) {
                w.shallow_clone().copy_(&(t - (gi + t * 3e-4) * eta));
            }
        });
        f.net.set_sample_stream(21);
        let lv = f.net.loss(&xv, &yv);
        let mut inputs: Vec<&Tensor> = f.net.alphas.tensors().to_vec();
        inputs.extend(f.weights.iter());
        let grads = Tensor::run_backward(&[lv], &inputs, false, false);
        tch::no_grad(|| {
            for (w, t) in f.weights.iter().zip(&theta) {
                w.shallow_clone().copy_(t);
            }
        });
        f.net.set_sample_stream(20);
        let exact = exact_hvp(&f.net, &f.weights, &grads[2..], &f.x, &f.y);
        let want: Vec<Tensor> = grads[..2].iter().zip(&exact).map(|(d, e)| d - e * eta).collect();
        let err = rel_err(&h, &want);
        assert!(err < 1e-3, "relative error {err}");
        // And it differs from the first-order gradient (the correction is not nothing).
        let first = Architect::new(&f.net, Order::First, 3e-4, (0.5, 0.999), 1e-3);
        let h1 = first.hypergradient(&f.net, &f.weights, &f.buffers, &sgd, (&f.x, &f.y), (&xv, &yv), eta);
        assert!(rel_err(&h1, &want) > 10.0 * err);
        let _ = stats_before;
    }
}

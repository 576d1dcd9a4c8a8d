//! The fused training-mode BatchNorm (the shim's kernel) against values worked from BatchNorm's definition, against
//! central differences, and against ATen's `batch_norm`: output, running statistics, every gradient, both layouts,
//! any number of threads, inputs the kernel does not take, and a gradient of a gradient; the BN with its ReLU
//! fused against ATen's BN followed by `relu`.
use darts::native::{batch_norm, batch_norm_ops, batch_norm_relu};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// The tests hold one lock: one counts ATen calls, which counts every thread's, and one sets the thread count.
static SERIAL: Mutex<()> = Mutex::new(());

const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

fn leaf(t: Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// Running statistics as `BatchNorm2d` starts them: mean 0, variance 1.
fn running(c: i64, kind: Kind) -> (Tensor, Tensor) {
    (Tensor::zeros([c], (kind, Device::Cpu)), Tensor::ones([c], (kind, Device::Cpu)))
}

/// x = [1, 2, 3, 4] as 2 x 1 x 1 x 2 (one channel, four values): mean 2.5, biased variance 1.25, unbiased 5/3,
/// so y = (x - 2.5) / sqrt(1.25 + eps) and, from mean 0 and variance 1, running mean 0.1 * 2.5 = 0.25 and
/// running variance 0.9 + 0.1 * 5/3. For loss = y[0], dy[0]/dx_i from the definition y_0 = (x_0 - mean) / sd:
/// (delta_0i - 1/4) / sd - (x_0 - mean) (x_i - mean) / (4 sd^3) with sd = sqrt(1.25 + eps).
#[test]
fn a_case_worked_from_the_definition() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for kind in [Kind::Double, Kind::Float] {
        for affine in [false, true] {
            let x = leaf(Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0]).to_kind(kind).reshape([2, 1, 1, 2]));
            let w = leaf(Tensor::from_slice(&[2.0f64]).to_kind(kind));
            let b = leaf(Tensor::from_slice(&[1.0f64]).to_kind(kind));
            let (rm, rv) = running(1, kind);
            let (wo, bo) = if affine { (Some(&w), Some(&b)) } else { (None, None) };
            let y = batch_norm(&x, wo, bo, &rm, &rv, MOMENTUM, EPS);
            let sd = (1.25f64 + EPS).sqrt();
            let (scale, shift) = if affine { (2.0, 1.0) } else { (1.0, 0.0) };
            let want: Vec<f64> = [1.0, 2.0, 3.0, 4.0].iter().map(|v| (v - 2.5) / sd * scale + shift).collect();
            let tol = if kind == Kind::Double { 1e-12 } else { 1e-6 };
            for (g, e) in values(&y).iter().zip(&want) {
                assert!((g - e).abs() < tol, "{kind:?} affine={affine}: y {g} vs {e}");
            }
            assert!((values(&rm)[0] - 0.25).abs() < tol, "running mean {}", values(&rm)[0]);
            assert!((values(&rv)[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < tol, "running var {}", values(&rv)[0]);
            let mut wrt = vec![&x];
            if affine {
                wrt.extend([&w, &b]);
            }
            let g = Tensor::run_backward(&[y.flatten(0, -1).get(0)], &wrt, false, false);
            let xs = [1.0, 2.0, 3.0, 4.0];
            for (i, got) in values(&g[0]).iter().enumerate() {
                let delta = if i == 0 { 1.0 } else { 0.0 };
                let e = scale * ((delta - 0.25) / sd - (xs[0] - 2.5) * (xs[i] - 2.5) / (4.0 * sd.powi(3)));
                assert!((got - e).abs() < tol, "{kind:?} affine={affine}: dx[{i}] {got} vs {e}");
            }
            if affine {
                // dy_0/dw = xhat_0, dy_0/db = 1.
                assert!((values(&g[1])[0] - (1.0 - 2.5) / sd).abs() < tol);
                assert!((values(&g[2])[0] - 1.0).abs() < tol);
            }
        }
    }
}

/// Gradients against central differences of the forward itself (float64, random input, affine).
#[test]
fn gradients_match_central_differences() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(11);
    let opts = (Kind::Double, Device::Cpu);
    let x = leaf(darts::channels_last(&Tensor::randn([3, 5, 2, 3], opts)));
    let w = leaf(Tensor::randn([5], opts));
    let b = leaf(Tensor::randn([5], opts));
    let c = Tensor::randn([3, 5, 2, 3], opts);
    let loss = |x: &Tensor, w: &Tensor, b: &Tensor| {
        let (rm, rv) = running(5, Kind::Double);
        (batch_norm(x, Some(w), Some(b), &rm, &rv, MOMENTUM, EPS) * &c).sum(Kind::Double)
    };
    let g = Tensor::run_backward(&[loss(&x, &w, &b)], &[&x, &w, &b], false, false);
    let h = 1e-6;
    for (which, t) in [&x, &w, &b].iter().enumerate() {
        let n = t.numel() as i64;
        let flat_grad = values(&g[which]);
        for i in (0..n).step_by(7) {
            let shifted = |d: f64| {
                let p = [&x, &w, &b].map(|u| u.detach().copy().contiguous());
                let _ = p[which].view([-1]).get(i).f_add_scalar_(d).unwrap();
                loss(&p[0], &p[1], &p[2]).double_value(&[])
            };
            let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
            // `values` reads in logical (NCHW) order, as `view([-1])` of the copy does.
            let analytic = flat_grad[i as usize];
            assert!((numeric - analytic).abs() < 1e-6, "input {which}[{i}]: {analytic} vs {numeric}");
        }
    }
}

/// Random inputs in NCHW and channels-last, float64 and float32, with and without affine parameters, for channel
/// counts below, at and above the kernel's 64-value groups and several blocks of rows: output, running statistics
/// and gradients equal ATen's batch_norm (to rounding), the output keeps the input's layout, ATen's batch norm is
/// not called, and one thread gives the same bits as two.
#[test]
fn equals_aten_in_both_layouts_and_on_any_number_of_threads() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    for kind in [Kind::Double, Kind::Float] {
        for channels_last in [false, true] {
            for (shape, affine) in [([4, 3, 17, 19], true), ([8, 8, 32, 32], false), ([2, 70, 9, 7], true)] {
                let lay = |t: Tensor| if channels_last { darts::channels_last(&t) } else { t };
                let c = shape[1];
                let x = leaf(lay(Tensor::randn(shape, (kind, Device::Cpu)) * 3.0 + 2.0));
                let w = leaf(Tensor::randn([c], (kind, Device::Cpu)));
                let b = leaf(Tensor::randn([c], (kind, Device::Cpu)));
                // The output's gradient in NCHW whatever x's layout: the kernel takes it into x's.
                let coef = Tensor::randn(shape, (kind, Device::Cpu));
                let (wo, bo) = if affine { (Some(&w), Some(&b)) } else { (None, None) };
                let mut wrt = vec![&x];
                if affine {
                    wrt.extend([&w, &b]);
                }
                let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
                    let (mut rm, rv) = running(c, kind);
                    let _ = rm.f_add_scalar_(0.5).unwrap();
                    let y = f(&rm, &rv);
                    let g = Tensor::run_backward(&[(&y * &coef).sum(kind)], &wrt, false, false);
                    (y, rm, rv, g)
                };
                let fused = |rm: &Tensor, rv: &Tensor| batch_norm(&x, wo, bo, rm, rv, MOMENTUM, EPS);
                let aten = |rm: &Tensor, rv: &Tensor| batch_norm_ops(&x, wo, bo, rm, rv, MOMENTUM, EPS);
                let (yf, rmf, rvf, gf) = run(&fused);
                let (ya, rma, rva, ga) = run(&aten);
                let at = format!("{kind:?} cl={channels_last} {shape:?} affine={affine}");
                assert_eq!(yf.stride(), x.stride(), "{at}: the output keeps the input's layout");
                let tol = if kind == Kind::Double { 1e-10 } else { 2e-4 };
                assert!(max_diff(&yf, &ya) <= tol, "{at}: y {}", max_diff(&yf, &ya));
                assert!(max_diff(&rmf, &rma) <= tol, "{at}: running mean {}", max_diff(&rmf, &rma));
                assert!(max_diff(&rvf, &rva) <= tol, "{at}: running var {}", max_diff(&rvf, &rva));
                for (i, (p, q)) in gf.iter().zip(&ga).enumerate() {
                    let scale = values(&q.abs().max())[0].max(1.0);
                    assert!(max_diff(p, q) <= tol * scale, "{at}: gradient {i}: {}", max_diff(p, q));
                }
                let (_, names) = {
                    let (rm, rv) = running(c, kind);
                    let (_, _, rows) = darts::native::count_aten_calls_by_name(|| {
                        let y = fused(&rm, &rv);
                        Tensor::run_backward(&[(&y * &coef).sum(kind)], &wrt, false, false)
                    })
                    .unwrap();
                    ((), rows)
                };
                assert!(!names.iter().any(|(_, n)| n.contains("batch_norm")), "{at}: ATen's batch norm ran: {names:?}");
                let before = tch::get_num_threads();
                tch::set_num_threads(1);
                let (y1, rm1, rv1, g1) = run(&fused);
                tch::set_num_threads(2);
                let (y2, rm2, rv2, g2) = run(&fused);
                tch::set_num_threads(before);
                assert!(y1.equal(&y2) && rm1.equal(&rm2) && rv1.equal(&rv2), "{at}: differs between 1 and 2 threads");
                for (p, q) in g1.iter().zip(&g2) {
                    assert!(p.equal(q), "{at}: a gradient differs between one and two threads");
                }
            }
        }
    }
}

/// Inputs the kernel does not take (a non-dense view, bfloat16) give ATen's result.
#[test]
fn other_inputs_fall_back_to_aten() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(6);
    let opts = (Kind::Double, Device::Cpu);
    let wide = Tensor::randn([2, 3, 5, 10], opts);
    let view = leaf(wide.narrow(3, 0, 5));
    let bf = leaf(Tensor::randn([2, 3, 4, 4], (Kind::BFloat16, Device::Cpu)));
    let w = Tensor::ones([3], opts);
    let b = Tensor::zeros([3], opts);
    for (x, w, b) in [(&view, None, None), (&bf, None, None), (&view, Some(&w), Some(&b))] {
        let (rm1, rv1) = running(3, x.kind());
        let (rm2, rv2) = running(3, x.kind());
        let f = batch_norm(x, w, b, &rm1, &rv1, MOMENTUM, EPS);
        let a = batch_norm_ops(x, w, b, &rm2, &rv2, MOMENTUM, EPS);
        assert_eq!(max_diff(&f, &a), 0.0);
        assert_eq!(max_diff(&rm1, &rm2), 0.0);
        assert_eq!(max_diff(&rv1, &rv2), 0.0);
    }
}

/// With a graph of the backward pass wanted, the input's gradient is itself differentiable, and its gradient
/// equals ATen's double backward of batch_norm (float64).
#[test]
fn a_gradient_of_the_gradient() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(7);
    second_order_gradients_agree(
        &|x, w, b, rm, rv| batch_norm(x, Some(w), Some(b), rm, rv, MOMENTUM, EPS),
        &|x, w, b, rm, rv| batch_norm_ops(x, Some(w), Some(b), rm, rv, MOMENTUM, EPS),
    );
}

/// The BN with the ReLU fused against ATen's BN then `relu`: output (exact zeros where negative), running
/// statistics and every gradient, NCHW and channels-last, float64 and float32, affine or not; one thread against
/// two; and the gradient of its gradient against ATen's.
#[test]
fn with_its_relu_equals_aten_then_relu() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(9);
    for kind in [Kind::Double, Kind::Float] {
        for channels_last in [false, true] {
            for (shape, affine) in [([4, 3, 17, 19], true), ([8, 16, 16, 16], false)] {
                let lay = |t: Tensor| if channels_last { darts::channels_last(&t) } else { t };
                let c = shape[1];
                let x = leaf(lay(Tensor::randn(shape, (kind, Device::Cpu))));
                let w = leaf(Tensor::randn([c], (kind, Device::Cpu)));
                let b = leaf(Tensor::randn([c], (kind, Device::Cpu)));
                let coef = lay(Tensor::randn(shape, (kind, Device::Cpu)));
                let (wo, bo) = if affine { (Some(&w), Some(&b)) } else { (None, None) };
                let mut wrt = vec![&x];
                if affine {
                    wrt.extend([&w, &b]);
                }
                let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
                    let (rm, rv) = running(c, kind);
                    let y = f(&rm, &rv);
                    let g = Tensor::run_backward(&[(&y * &coef).sum(kind)], &wrt, false, false);
                    (y, rm, rv, g)
                };
                let fused = |rm: &Tensor, rv: &Tensor| batch_norm_relu(&x, wo, bo, rm, rv, MOMENTUM, EPS);
                let aten = |rm: &Tensor, rv: &Tensor| batch_norm_ops(&x, wo, bo, rm, rv, MOMENTUM, EPS).relu();
                let (yf, rmf, rvf, gf) = run(&fused);
                let (ya, rma, rva, ga) = run(&aten);
                let at = format!("{kind:?} cl={channels_last} {shape:?} affine={affine}");
                let tol = if kind == Kind::Double { 1e-10 } else { 2e-4 };
                assert_eq!(yf.stride(), x.stride(), "{at}: the output keeps the input's layout");
                assert!(max_diff(&yf, &ya) <= tol, "{at}: y {}", max_diff(&yf, &ya));
                assert!(values(&yf.min())[0] == 0.0, "{at}: the ReLU's zeros");
                assert!(max_diff(&rmf, &rma) <= tol && max_diff(&rvf, &rva) <= tol, "{at}: running statistics");
                for (i, (p, q)) in gf.iter().zip(&ga).enumerate() {
                    let scale = values(&q.abs().max())[0].max(1.0);
                    assert!(max_diff(p, q) <= tol * scale, "{at}: gradient {i}: {}", max_diff(p, q));
                }
                let before = tch::get_num_threads();
                tch::set_num_threads(1);
                let (y1, _, _, g1) = run(&fused);
                tch::set_num_threads(2);
                let (y2, _, _, g2) = run(&fused);
                tch::set_num_threads(before);
                assert!(y1.equal(&y2), "{at}: differs between 1 and 2 threads");
                for (p, q) in g1.iter().zip(&g2) {
                    assert!(p.equal(q), "{at}: a gradient differs between one and two threads");
                }
            }
        }
    }
    second_order_gradients_agree(
        &|x, w, b, rm, rv| batch_norm_relu(x, Some(w), Some(b), rm, rv, MOMENTUM, EPS),
        &|x, w, b, rm, rv| batch_norm_ops(x, Some(w), Some(b), rm, rv, MOMENTUM, EPS).relu(),
    );
}

/// An affine BN (x, weight, bias, running mean, running variance) under test or as the reference.
type AffineBn<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Tensor;

/// The gradient, with respect to x and the weight, of <x's gradient, c2> (x's gradient taken with a graph: double
/// backward) agrees between `fused` and `reference` on a random channels-last float64 input (x's gradient does
/// not depend on the bias).
fn second_order_gradients_agree(fused: AffineBn, reference: AffineBn) {
    let opts = (Kind::Double, Device::Cpu);
    let x = leaf(darts::channels_last(&Tensor::randn([3, 4, 3, 3], opts)));
    let w = leaf(Tensor::randn([4], opts));
    let b = leaf(Tensor::randn([4], opts));
    let (c, c2) = (Tensor::randn([3, 4, 3, 3], opts), Tensor::randn([3, 4, 3, 3], opts));
    let second = |f: AffineBn| {
        let (rm, rv) = running(4, Kind::Double);
        let y = f(&x, &w, &b, &rm, &rv);
        let g = Tensor::run_backward(&[(&y * &c).sum(Kind::Double)], &[&x], true, true);
        Tensor::run_backward(&[(&g[0] * &c2).sum(Kind::Double)], &[&x, &w], false, true)
    };
    for (i, (p, q)) in second(fused).iter().zip(&second(reference)).enumerate() {
        assert!(max_diff(p, q) < 1e-10, "second-order gradient {i}: {}", max_diff(p, q));
    }
}

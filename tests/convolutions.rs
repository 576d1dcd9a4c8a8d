//! The shim's own convolutions. Depthwise: against the convolution's definition summed by hand, against central
//! differences, and against ATen's conv2d with `groups = C`: output and both gradients for every kernel size,
//! stride, padding and dilation DARTS's ops use (and asymmetric ones), float32 and float64, any number of threads,
//! inputs the kernel does not take, and a gradient of a gradient. Pointwise (1x1): against a product worked by
//! hand, against ATen's conv2d (output, gradients, several widths), declined inputs, a gradient of a gradient;
//! and `ops::Conv` (which picks the kernels) against ATen for every convolution of DARTS's ops.
use darts::native::{depthwise_conv, pointwise_conv};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// The tests hold one lock: one counts ATen calls, which counts every thread's, and one sets the thread count.
static SERIAL: Mutex<()> = Mutex::new(());

fn leaf(t: Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).contiguous().flatten(0, -1)).unwrap()
}

/// One geometry: kernel (kh, kw), stride, padding, dilation.
type Geom = ([i64; 2], [i64; 2], [i64; 2], [i64; 2]);

/// DARTS's convolutions (sep 3x3/5x5, dil 3x3/5x5, stride 1 and 2) and a few asymmetric ones.
const GEOMS: [Geom; 9] = [
    ([3, 3], [1, 1], [1, 1], [1, 1]),
    ([3, 3], [2, 2], [1, 1], [1, 1]),
    ([5, 5], [1, 1], [2, 2], [1, 1]),
    ([5, 5], [2, 2], [2, 2], [1, 1]),
    ([3, 3], [1, 1], [2, 2], [2, 2]),
    ([3, 3], [2, 2], [2, 2], [2, 2]),
    ([5, 5], [1, 1], [4, 4], [2, 2]),
    ([5, 5], [2, 2], [4, 4], [2, 2]),
    ([3, 2], [2, 1], [0, 3], [1, 3]),
];

fn aten(x: &Tensor, w: &Tensor, (_, s, p, d): Geom) -> Tensor {
    x.conv2d(w, None::<Tensor>, s, p, d, x.size()[1])
}

fn ours(x: &Tensor, w: &Tensor, (_, s, p, d): Geom) -> Tensor {
    depthwise_conv(x, w, s, p, d).expect("a channels-last float input takes the kernel")
}

/// out[n, c, y, x] = sum over (i, j) of w[c, 0, i, j] * x[n, c, y * s - p + i * d, x * s - p + j * d], zero
/// outside the image: summed by hand in float64 for a small input, with stride 2 and dilation 2, and compared,
/// with dL/dw[c, 0, i, j] = sum over outputs of x at the tap (L = the sum of the outputs times their index).
#[test]
fn a_case_summed_from_the_definition() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (n, c, h, wd) = (2usize, 3usize, 7usize, 6usize);
    let (k, s, p, d) = (3usize, 2usize, 2usize, 2usize);
    let xs: Vec<f64> = (0..n * c * h * wd).map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0).collect();
    let ws: Vec<f64> = (0..c * k * k).map(|i| ((i * 13 % 17) as f64 - 8.0) / 5.0).collect();
    let x = leaf(darts::channels_last(&Tensor::from_slice(&xs).reshape([n as i64, c as i64, h as i64, wd as i64])));
    let w = leaf(Tensor::from_slice(&ws).reshape([c as i64, 1, k as i64, k as i64]));
    let y = depthwise_conv(&x, &w, [s as i64; 2], [p as i64; 2], [d as i64; 2]).unwrap();
    let (oh, ow) = ((h + 2 * p - d * (k - 1) - 1) / s + 1, (wd + 2 * p - d * (k - 1) - 1) / s + 1);
    assert_eq!(y.size(), [n as i64, c as i64, oh as i64, ow as i64]);
    let xv = |b: usize, ch: usize, yy: i64, xx: i64| {
        if yy < 0 || xx < 0 || yy >= h as i64 || xx >= wd as i64 {
            0.0
        } else {
            xs[((b * c + ch) * h + yy as usize) * wd + xx as usize]
        }
    };
    let mut want = vec![0.0; n * c * oh * ow];
    let mut want_gw = vec![0.0; c * k * k];
    for b in 0..n {
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let o = ((b * c + ch) * oh + oy) * ow + ox;
                    for i in 0..k {
                        for j in 0..k {
                            let (yy, xx) = ((oy * s + i * d) as i64 - p as i64, (ox * s + j * d) as i64 - p as i64);
                            want[o] += ws[(ch * k + i) * k + j] * xv(b, ch, yy, xx);
                            want_gw[(ch * k + i) * k + j] += o as f64 * xv(b, ch, yy, xx);
                        }
                    }
                }
            }
        }
    }
    for (g, e) in values(&y).iter().zip(&want) {
        assert!((g - e).abs() < 1e-12, "output {g} vs {e}");
    }
    let index = Tensor::arange((n * c * oh * ow) as i64, (Kind::Double, Device::Cpu)).reshape(y.size());
    let g = Tensor::run_backward(&[(&y * &index).sum(Kind::Double)], &[&w], false, false);
    for (g, e) in values(&g[0]).iter().zip(&want_gw) {
        assert!((g - e).abs() < 1e-9 * e.abs().max(1.0), "weight gradient {g} vs {e}");
    }
}

/// Both gradients against central differences of the kernel's own forward (float64, random input).
#[test]
fn gradients_match_central_differences() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(21);
    let opts = (Kind::Double, Device::Cpu);
    for geom in [GEOMS[1], GEOMS[6], GEOMS[8]] {
        let kk = geom.0;
        let x = leaf(darts::channels_last(&Tensor::randn([2, 3, 6, 7], opts)));
        let w = leaf(Tensor::randn([3, 1, kk[0], kk[1]], opts));
        let coef = Tensor::randn(ours(&x, &w, geom).size(), opts);
        let loss = |x: &Tensor, w: &Tensor| (ours(x, w, geom) * &coef).sum(Kind::Double).double_value(&[]);
        let g = Tensor::run_backward(&[(ours(&x, &w, geom) * &coef).sum(Kind::Double)], &[&x, &w], false, false);
        let h = 1e-6;
        for (which, t) in [(0usize, &x), (1, &w)] {
            let flat = t.detach().contiguous().flatten(0, -1);
            let grad = values(&g[which]);
            let base = values(t);
            for i in [0usize, 5, 17, base.len() - 1] {
                let nudge = |delta: f64| {
                    let v = flat.copy();
                    let _ = v.get(i as i64).fill_(base_at(&flat, i) + delta);
                    let v = v.reshape(t.size());
                    let v = if which == 0 { darts::channels_last(&v) } else { v };
                    if which == 0 {
                        loss(&v, &w.detach())
                    } else {
                        loss(&x.detach(), &v)
                    }
                };
                let numeric = (nudge(h) - nudge(-h)) / (2.0 * h);
                // values(t) reads in the logical (NCHW) order, as flat does.
                assert!((numeric - grad[i]).abs() < 1e-6, "{geom:?} input {which} [{i}]: {numeric} vs {}", grad[i]);
            }
        }
    }
}

fn base_at(flat: &Tensor, i: usize) -> f64 {
    flat.double_value(&[i as i64])
}

/// Against ATen's conv2d (groups = C) for every geometry, float64 and float32, C = 2, 8 and 36: output, its
/// layout, both gradients; ATen's convolution is not called; one thread and two give the same bits.
#[test]
fn equals_aten_and_on_any_number_of_threads() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(22);
    for kind in [Kind::Double, Kind::Float] {
        for (shape, geom) in
            GEOMS.iter().enumerate().map(|(i, g)| ([[3, 8, 9, 10], [2, 36, 8, 8], [4, 2, 5, 11]][i % 3], *g))
        {
            let opts = (kind, Device::Cpu);
            let c = shape[1];
            let x = leaf(darts::channels_last(&Tensor::randn(shape, opts)));
            let w = leaf(Tensor::randn([c, 1, geom.0[0], geom.0[1]], opts));
            let yr = aten(&x, &w, geom);
            // The output's gradient in NCHW whatever the output's layout: the kernel takes it into its own.
            let coef = Tensor::randn(yr.size(), opts);
            let run = |f: &dyn Fn() -> Tensor| {
                let y = f();
                let g = Tensor::run_backward(&[(&y * &coef).sum(kind)], &[&x, &w], false, false);
                (y, g)
            };
            let (yo, go) = run(&|| ours(&x, &w, geom));
            let (ya, ga) = run(&|| aten(&x, &w, geom));
            let at = format!("{kind:?} {shape:?} {geom:?}");
            assert_eq!(yo.size(), ya.size(), "{at}");
            assert_eq!(yo.stride(), darts::channels_last(&ya).stride(), "{at}: channels-last output");
            let tol = if kind == Kind::Double { 1e-11 } else { 1e-4 };
            assert!(max_diff(&yo, &ya) <= tol, "{at}: output {}", max_diff(&yo, &ya));
            for (i, (p, q)) in go.iter().zip(&ga).enumerate() {
                let scale = values(&q.abs().max())[0].max(1.0);
                assert!(max_diff(p, q) <= tol * scale, "{at}: gradient {i}: {}", max_diff(p, q));
            }
            let (_, _, names) = darts::native::count_aten_calls_by_name(|| run(&|| ours(&x, &w, geom))).unwrap();
            assert!(!names.iter().any(|(_, n)| n.contains("conv")), "{at}: ATen's convolution ran: {names:?}");
            let before = tch::get_num_threads();
            tch::set_num_threads(1);
            let (y1, g1) = run(&|| ours(&x, &w, geom));
            tch::set_num_threads(2);
            let (y2, g2) = run(&|| ours(&x, &w, geom));
            tch::set_num_threads(before);
            assert!(y1.equal(&y2), "{at}: the output differs between one and two threads");
            for (p, q) in g1.iter().zip(&g2) {
                assert!(p.equal(q), "{at}: a gradient differs between one and two threads");
            }
        }
    }
}

/// Images smaller than the kernel's reach (taps wholly outside, as in the last cells of a small search), every
/// geometry, against ATen's conv2d: output and both gradients (float64).
#[test]
fn images_smaller_than_the_kernel() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(26);
    let opts = (Kind::Double, Device::Cpu);
    for geom in GEOMS {
        for shape in [[2i64, 3, 2, 2], [1, 2, 1, 3], [3, 5, 3, 1], [2, 9, 1, 1]] {
            let x = leaf(darts::channels_last(&Tensor::randn(shape, opts)));
            let w = leaf(Tensor::randn([shape[1], 1, geom.0[0], geom.0[1]], opts));
            let Ok(ya) = std::panic::catch_unwind(|| aten(&x, &w, geom)) else { continue };
            let yo = ours(&x, &w, geom);
            let at = format!("{shape:?} {geom:?}");
            assert!(max_diff(&yo, &ya) < 1e-12, "{at}: output");
            let c = ya.randn_like();
            let go = Tensor::run_backward(&[(&yo * &c).sum(Kind::Double)], &[&x, &w], false, false);
            let ga = Tensor::run_backward(&[(&ya * &c).sum(Kind::Double)], &[&x, &w], false, false);
            for (p, q) in go.iter().zip(&ga) {
                assert!(max_diff(p, q) < 1e-11, "{at}: gradient");
            }
        }
    }
}

/// Inputs the kernel does not take: NCHW, a non-dense view, bfloat16, a grouped (not depthwise) weight.
#[test]
fn other_inputs_are_declined() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let opts = (Kind::Float, Device::Cpu);
    let nchw = Tensor::randn([2, 4, 6, 6], opts);
    let view = darts::channels_last(&Tensor::randn([2, 8, 6, 6], opts)).narrow(1, 0, 4);
    let bf = darts::channels_last(&Tensor::randn([2, 4, 6, 6], (Kind::BFloat16, Device::Cpu)));
    let w = Tensor::randn([4, 1, 3, 3], opts);
    for x in [&nchw, &view, &bf] {
        assert!(depthwise_conv(x, &w, [1, 1], [1, 1], [1, 1]).is_none(), "{:?} {:?}", x.size(), x.stride());
    }
    let cl = darts::channels_last(&nchw);
    assert!(depthwise_conv(&cl, &Tensor::randn([4, 2, 3, 3], opts), [1, 1], [1, 1], [1, 1]).is_none());
    assert!(depthwise_conv(&cl, &Tensor::randn([4, 1, 9, 9], opts), [1, 1], [0, 0], [1, 1]).is_none(), "empty output");
}

/// With a graph of the backward pass wanted, both gradients are themselves differentiable, and their gradients
/// equal ATen's double backward of conv2d (float64).
#[test]
fn a_gradient_of_the_gradient() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(23);
    let opts = (Kind::Double, Device::Cpu);
    let geom = GEOMS[5];
    let x = leaf(darts::channels_last(&Tensor::randn([2, 4, 7, 7], opts)));
    let w = leaf(Tensor::randn([4, 1, 3, 3], opts));
    let c = Tensor::randn(aten(&x, &w, geom).size(), opts);
    let (cx, cw) = (Tensor::randn([2, 4, 7, 7], opts), Tensor::randn([4, 1, 3, 3], opts));
    let second = |f: &dyn Fn() -> Tensor| {
        let y = f();
        let g = Tensor::run_backward(&[(&y * &c).sum(Kind::Double)], &[&x, &w], true, true);
        let z = (&g[0] * &cx).sum(Kind::Double) + (&g[1] * &cw).sum(Kind::Double);
        Tensor::run_backward(&[z], &[&x, &w], false, true)
    };
    let (o, a) = (second(&|| ours(&x, &w, geom)), second(&|| aten(&x, &w, geom)));
    for (i, (p, q)) in o.iter().zip(&a).enumerate() {
        assert!(max_diff(p, q) < 1e-10, "second-order gradient {i}: {}", max_diff(p, q));
    }
}

/// y[n, o, y, x] = sum over i of w[o, i] * x[n, i, y, x]: a 2-pixel, 2-in, 3-out case worked by hand, and its
/// gradients for L = sum of y times (1, 2, 3, ...) in y's NCHW order.
#[test]
fn a_pointwise_case_worked_by_hand() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for kind in [Kind::Double, Kind::Float] {
        // x: one example, 2 channels, 1 x 2 pixels: channel 0 = (1, 2), channel 1 = (3, 4).
        let x = leaf(darts::channels_last(
            &Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0]).to_kind(kind).reshape([1, 2, 1, 2]),
        ));
        let w = leaf(Tensor::from_slice(&[1.0f64, -1.0, 0.5, 2.0, -3.0, 0.0]).to_kind(kind).reshape([3, 2, 1, 1]));
        let y = pointwise_conv(&x, &w).unwrap();
        // out 0 = x0 - x1 = (-2, -2); out 1 = 0.5 x0 + 2 x1 = (6.5, 9); out 2 = -3 x0 = (-3, -6).
        assert_eq!(values(&y), [-2.0, -2.0, 6.5, 9.0, -3.0, -6.0], "{kind:?}");
        let c = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]).to_kind(kind).reshape([1, 3, 1, 2]);
        let g = Tensor::run_backward(&[(&y * &c).sum(kind)], &[&x, &w], false, false);
        // dL/dx[i, p] = sum over o of c[o, p] * w[o, i]; dL/dw[o, i] = sum over p of c[o, p] * x[i, p].
        assert_eq!(values(&g[0]), [1.0 + 1.5 - 15.0, 2.0 + 2.0 - 18.0, -1.0 + 6.0, -2.0 + 8.0], "{kind:?}");
        assert_eq!(values(&g[1]), [1.0 + 4.0, 3.0 + 8.0, 3.0 + 8.0, 9.0 + 16.0, 5.0 + 12.0, 15.0 + 24.0], "{kind:?}");
    }
}

/// Against ATen's 1x1 conv2d, float64 and float32, narrow to wide and wide to narrow, one block of pixels and
/// several: output, layout, both gradients; ATen's convolution is not called; one thread and two give the same
/// bits.
#[test]
fn pointwise_equals_aten() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(24);
    for kind in [Kind::Double, Kind::Float] {
        let shapes =
            [([3, 8, 9, 10], 8), ([2, 36, 8, 8], 144), ([4, 144, 3, 5], 36), ([2, 3, 4, 4], 1), ([5, 16, 31, 29], 24)];
        for (shape, cout) in shapes {
            let opts = (kind, Device::Cpu);
            let x = leaf(darts::channels_last(&Tensor::randn(shape, opts)));
            let w = leaf(darts::channels_last(&Tensor::randn([cout, shape[1], 1, 1], opts)));
            let aten = |x: &Tensor| x.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
            let coef = Tensor::randn([shape[0], cout, shape[2], shape[3]], opts);
            let run = |f: &dyn Fn() -> Tensor| {
                let y = f();
                let g = Tensor::run_backward(&[(&y * &coef).sum(kind)], &[&x, &w], false, false);
                (y, g)
            };
            let (yo, go) = run(&|| pointwise_conv(&x, &w).unwrap());
            let (ya, ga) = run(&|| aten(&x));
            let at = format!("{kind:?} {shape:?} -> {cout}");
            assert_eq!(yo.stride(), darts::channels_last(&ya).stride(), "{at}: channels-last output");
            let tol = if kind == Kind::Double { 1e-11 } else { 1e-4 };
            assert!(max_diff(&yo, &ya) <= tol * 10.0, "{at}: output {}", max_diff(&yo, &ya));
            for (i, (p, q)) in go.iter().zip(&ga).enumerate() {
                let scale = values(&q.abs().max())[0].max(1.0);
                assert!(max_diff(p, q) <= tol * scale, "{at}: gradient {i}: {}", max_diff(p, q));
            }
            let (_, _, names) =
                darts::native::count_aten_calls_by_name(|| run(&|| pointwise_conv(&x, &w).unwrap())).unwrap();
            assert!(!names.iter().any(|(_, n)| n.contains("conv")), "{at}: ATen's convolution ran: {names:?}");
            let before = tch::get_num_threads();
            tch::set_num_threads(1);
            let (y1, g1) = run(&|| pointwise_conv(&x, &w).unwrap());
            tch::set_num_threads(2);
            let (y2, g2) = run(&|| pointwise_conv(&x, &w).unwrap());
            tch::set_num_threads(before);
            assert!(y1.equal(&y2), "{at}: the output differs between one and two threads");
            for (i, (p, q)) in g1.iter().zip(&g2).enumerate() {
                assert!(p.equal(q), "{at}: gradient {i} differs between one and two threads by {}", max_diff(p, q));
            }
        }
    }
}

/// Inputs the pointwise kernel does not take: NCHW, a non-dense view, bfloat16, a 3x3 weight, a transposed one.
#[test]
fn pointwise_declines_other_inputs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let opts = (Kind::Float, Device::Cpu);
    let nchw = Tensor::randn([2, 4, 6, 6], opts);
    let view = darts::channels_last(&Tensor::randn([2, 8, 6, 6], opts)).narrow(1, 0, 4);
    let bf = darts::channels_last(&Tensor::randn([2, 4, 6, 6], (Kind::BFloat16, Device::Cpu)));
    let w = Tensor::randn([5, 4, 1, 1], opts);
    for x in [&nchw, &view, &bf] {
        assert!(pointwise_conv(x, &w).is_none(), "{:?} {:?}", x.size(), x.stride());
    }
    let cl = darts::channels_last(&nchw);
    assert!(pointwise_conv(&cl, &Tensor::randn([5, 4, 3, 3], opts)).is_none());
    let transposed = Tensor::randn([4, 5, 1, 1], opts).transpose(0, 1);
    assert!(pointwise_conv(&cl, &transposed).is_none());
}

/// The pointwise gradients are differentiable with a graph wanted, and their gradients equal ATen's (float64).
#[test]
fn a_pointwise_gradient_of_the_gradient() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(25);
    let opts = (Kind::Double, Device::Cpu);
    let x = leaf(darts::channels_last(&Tensor::randn([2, 4, 5, 5], opts)));
    let w = leaf(Tensor::randn([6, 4, 1, 1], opts));
    let c = Tensor::randn([2, 6, 5, 5], opts);
    let (cx, cw) = (Tensor::randn([2, 4, 5, 5], opts), Tensor::randn([6, 4, 1, 1], opts));
    let second = |f: &dyn Fn() -> Tensor| {
        let y = f();
        let g = Tensor::run_backward(&[(&y * &c).sum(Kind::Double)], &[&x, &w], true, true);
        let z = (&g[0] * &cx).sum(Kind::Double) + (&g[1] * &cw).sum(Kind::Double);
        Tensor::run_backward(&[z], &[&x, &w], false, true)
    };
    let o = second(&|| pointwise_conv(&x, &w).unwrap());
    let a = second(&|| x.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1));
    for (i, (p, q)) in o.iter().zip(&a).enumerate() {
        assert!(max_diff(p, q) < 1e-10, "second-order gradient {i}: {}", max_diff(p, q));
    }
}

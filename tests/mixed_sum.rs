//! The fused node sum `sum_k w[k] * ys[k]` (the shim's one-pass kernel) against hand-computed values and against
//! the same sum as ATen operators: values, every gradient, any number of threads, layouts the kernel does not
//! take, and a gradient of a gradient.
use darts::native::{mixed_sum, mixed_sum_ops};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// The tests hold one lock: one counts ATen calls, which counts every thread's, and one sets the thread count.
static SERIAL: Mutex<()> = Mutex::new(());

fn leaf(t: Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

fn grads(out: &Tensor, c: &Tensor, wrt: &[&Tensor]) -> Vec<Tensor> {
    Tensor::run_backward(&[(out * c).sum(out.kind())], wrt, false, false)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A case worked by hand from the relaxation's rule (node = sum of weight times op output): w = [0.5, -2],
/// y0 = [1, 2, 3, 4], y1 = [10, 20, 30, 40], loss = <c, node> with c = [1, 0, 2, -1].
#[test]
fn a_hand_computed_node_and_its_gradients() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for kind in [Kind::Float, Kind::Double] {
        let w = leaf(Tensor::from_slice(&[0.5f64, -2.0]).to_kind(kind));
        let y0 = leaf(Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0]).to_kind(kind).reshape([1, 1, 2, 2]));
        let y1 = leaf(Tensor::from_slice(&[10.0f64, 20.0, 30.0, 40.0]).to_kind(kind).reshape([1, 1, 2, 2]));
        let c = Tensor::from_slice(&[1.0f64, 0.0, 2.0, -1.0]).to_kind(kind).reshape([1, 1, 2, 2]);
        let out = mixed_sum(&w, &[y0.shallow_clone(), y1.shallow_clone()]);
        let want = Tensor::from_slice(&[-19.5f64, -39.0, -58.5, -78.0]).to_kind(kind).reshape([1, 1, 2, 2]);
        assert_eq!(max_diff(&out, &want), 0.0, "{kind:?}: {out}");
        let g = grads(&out, &c, &[&w, &y0, &y1]);
        // d/dw_k = <c, y_k>: 1 + 0 + 6 - 4 = 3 and 10 + 0 + 60 - 40 = 30.
        assert_eq!(Vec::<f64>::try_from(g[0].to_kind(Kind::Double)).unwrap(), [3.0, 30.0], "{kind:?}");
        // d/dy_k = w_k * c.
        assert_eq!(max_diff(&g[1], &(&c * 0.5)), 0.0);
        assert_eq!(max_diff(&g[2], &(&c * -2.0)), 0.0);
    }
}

/// Random terms over several of the kernel's blocks, in NCHW and channels-last, float64 and float32: the
/// kernel's node and gradients equal the operators' (float64 to rounding, float32 to its precision), and the
/// kernel gives the same bits on one thread as on two.
#[test]
fn equals_the_operators_in_both_layouts_and_on_any_number_of_threads() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    for kind in [Kind::Double, Kind::Float] {
        for channels_last in [false, true] {
            let m = 7;
            let shape = [4, 6, 33, 35]; // 27,720 elements: two blocks and a partial one.
            let lay = |t: Tensor| if channels_last { darts::channels_last(&t) } else { t };
            let ys: Vec<Tensor> = (0..m).map(|_| leaf(lay(Tensor::randn(shape, (kind, Device::Cpu))))).collect();
            let w = leaf(Tensor::randn([m], (kind, Device::Cpu)).softmax(0, kind));
            let c = lay(Tensor::randn(shape, (kind, Device::Cpu)));
            let mut wrt: Vec<&Tensor> = vec![&w];
            wrt.extend(ys.iter());
            let fused = mixed_sum(&w, &ys);
            assert_eq!(fused.stride(), ys[0].stride(), "the node keeps its terms' layout");
            let plain = mixed_sum_ops(&w, &ys);
            // The kernel ran (not the operators' fallback): a handful of ATen calls against two per term.
            let (_, fused_calls) = darts::native::count_aten_calls(|| tch::no_grad(|| mixed_sum(&w, &ys))).unwrap();
            let (_, op_calls) = darts::native::count_aten_calls(|| tch::no_grad(|| mixed_sum_ops(&w, &ys))).unwrap();
            assert!(fused_calls < m as u64 && op_calls >= 2 * m as u64 - 1, "{fused_calls} fused vs {op_calls} calls");
            let tol = if kind == Kind::Double { 1e-12 } else { 1e-4 };
            assert!(max_diff(&fused, &plain) <= tol, "{kind:?} cl={channels_last}: {}", max_diff(&fused, &plain));
            let (gf, gp) = (grads(&fused, &c, &wrt), grads(&plain, &c, &wrt));
            for (i, (a, b)) in gf.iter().zip(&gp).enumerate() {
                let scale = b.abs().max().double_value(&[]).max(1.0);
                assert!(max_diff(a, b) <= tol * scale, "{kind:?} cl={channels_last}: gradient {i}: {}", max_diff(a, b));
            }
            let before = tch::get_num_threads();
            tch::set_num_threads(1);
            let one = mixed_sum(&w, &ys);
            let g_one = grads(&one, &c, &wrt);
            tch::set_num_threads(2);
            let two = mixed_sum(&w, &ys);
            let g_two = grads(&two, &c, &wrt);
            tch::set_num_threads(before);
            assert!(one.equal(&two), "the node differs between one and two threads");
            for (a, b) in g_one.iter().zip(&g_two) {
                assert!(a.equal(b), "a gradient differs between one and two threads");
            }
        }
    }
}

/// Terms the kernel does not take (layouts that differ, a non-dense view, an integer-free half type) give the
/// operators' sum and gradients.
#[test]
fn other_layouts_and_types_fall_back_to_the_operators() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(6);
    let opts = (Kind::Double, Device::Cpu);
    let a = leaf(Tensor::randn([2, 3, 5, 5], opts));
    let b = leaf(darts::channels_last(&Tensor::randn([2, 3, 5, 5], opts)));
    let wide = Tensor::randn([2, 3, 5, 10], opts);
    let view = leaf(wide.narrow(3, 0, 5));
    let w = leaf(Tensor::from_slice(&[0.25f64, 0.5, -1.0]));
    let ys = [a.shallow_clone(), b.shallow_clone(), view.shallow_clone()];
    let c = Tensor::randn([2, 3, 5, 5], opts);
    let (f, p) = (mixed_sum(&w, &ys), mixed_sum_ops(&w, &ys));
    assert!(max_diff(&f, &p) == 0.0);
    let (gf, gp) = (grads(&f, &c, &[&w, &a, &b, &view]), grads(&p, &c, &[&w, &a, &b, &view]));
    for (x, y) in gf.iter().zip(&gp) {
        assert!(max_diff(x, y) == 0.0);
    }
    let h: Vec<Tensor> = (0..2).map(|_| leaf(Tensor::randn([2, 2], (Kind::BFloat16, Device::Cpu)))).collect();
    let wh = leaf(Tensor::from_slice(&[0.5f32, 2.0]).to_kind(Kind::BFloat16));
    assert!(max_diff(&mixed_sum(&wh, &h).to_kind(Kind::Double), &mixed_sum_ops(&wh, &h).to_kind(Kind::Double)) == 0.0);
}

/// With a graph of the backward pass wanted, the gradient is itself differentiable: d/dw_0 of sum(d node/d y_0)
/// = d/dw_0 of sum(w_0 * c) = sum(c).
#[test]
fn a_gradient_of_the_gradient() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let opts = (Kind::Double, Device::Cpu);
    let y0 = leaf(Tensor::randn([1, 2, 3, 3], opts));
    let y1 = leaf(Tensor::randn([1, 2, 3, 3], opts));
    let w = leaf(Tensor::from_slice(&[0.3f64, 0.7]));
    let c = Tensor::randn([1, 2, 3, 3], opts);
    let out = mixed_sum(&w, &[y0.shallow_clone(), y1.shallow_clone()]);
    let g = Tensor::run_backward(&[(&out * &c).sum(Kind::Double)], &[&y0], true, true);
    let gg = Tensor::run_backward(&[g[0].sum(Kind::Double)], &[&w], false, false);
    let want = c.sum(Kind::Double).double_value(&[]);
    let got = Vec::<f64>::try_from(&gg[0]).unwrap();
    assert!((got[0] - want).abs() < 1e-12 && got[1].abs() < 1e-12, "{got:?} vs [{want}, 0]");
}

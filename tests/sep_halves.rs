//! Separable halves (`darts::native::sep_halves`: a depthwise then a 1x1 convolution, several reading one input,
//! as one autograd node that keeps no depthwise output): against ATen's conv2d with `groups = C` then conv2d
//! with the 1x1 weight, per half (outputs, every weight's gradient, and the input's gradient, which is the sum of
//! the halves'), for DARTS's geometries mixed in one call (kernel 3 and 5, dilation 1 and 2, stride 1 and 2, an
//! asymmetric one), 1x1 convolutions that keep or change the width, float32 and float64, with outputs that take
//! no part in the loss, on one and two threads, with a graph of the backward pass wanted, and inputs it declines.
use darts::native::{depthwise_conv, pointwise_conv, sep_halves, DepthwiseSpec, SepHalf};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// One test sets the thread count: they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// (kernel, stride, padding, dilation).
type Geom = ([i64; 2], [i64; 2], [i64; 2], [i64; 2]);

/// sep 3x3 and 5x5, dil 3x3 and 5x5 at stride 1 and 2, and an asymmetric one.
const GEOMS: [Geom; 9] = [
    ([3, 3], [1, 1], [1, 1], [1, 1]),
    ([5, 5], [1, 1], [2, 2], [1, 1]),
    ([3, 3], [1, 1], [2, 2], [2, 2]),
    ([5, 5], [1, 1], [4, 4], [2, 2]),
    ([3, 3], [2, 2], [1, 1], [1, 1]),
    ([5, 5], [2, 2], [2, 2], [1, 1]),
    ([3, 3], [2, 2], [2, 2], [2, 2]),
    ([5, 5], [2, 2], [4, 4], [2, 2]),
    ([3, 2], [2, 1], [0, 3], [1, 3]),
];

fn leaf(t: Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn halves<'a>(ws: &'a [Tensor], ps: &'a [Tensor], geoms: &[Geom]) -> Vec<SepHalf<'a>> {
    ws.iter()
        .zip(ps)
        .zip(geoms)
        .map(|((w, p), &(_, stride, padding, dilation))| SepHalf {
            depthwise: DepthwiseSpec { weight: w, stride, padding, dilation },
            pointwise: p,
        })
        .collect()
}

/// ATen's depthwise then 1x1 convolution.
fn aten(x: &Tensor, w: &Tensor, p: &Tensor, (_, s, pad, d): Geom) -> Tensor {
    x.conv2d(w, None::<Tensor>, s, pad, d, x.size()[1]).conv2d(p, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
}

/// The loss `sum_k <coef_k, y_k>` over the outputs with a coefficient (the others take no part), and its
/// gradients for x and every weight.
fn grads(ys: &[Tensor], coefs: &[Option<Tensor>], x: &Tensor, ws: &[Tensor], graph: bool) -> Vec<Tensor> {
    let kind = x.kind();
    let loss = ys
        .iter()
        .zip(coefs)
        .filter_map(|(y, c)| c.as_ref().map(|c| (y * c).sum(kind)))
        .reduce(|a, b| a + b)
        .expect("a term");
    let mut inputs = vec![x];
    inputs.extend(ws.iter());
    Tensor::run_backward(&[loss], &inputs, graph, graph)
}

#[test]
fn equals_aten_per_half_with_the_input_gradient_summed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(41);
    // All nine in one call; DARTS's stride-1 four; one alone; with outputs outside the loss.
    let groups: [(&[usize], &[bool]); 4] = [
        (&[0, 1, 2, 3, 4, 5, 6, 7, 8], &[true; 9]),
        (&[0, 1, 2, 3, 0, 1], &[true, true, false, true, true, true]),
        (&[5], &[true]),
        (&[4, 6, 7, 5], &[false, true, true, false]),
    ];
    for kind in [Kind::Double, Kind::Float] {
        let opts = (kind, Device::Cpu);
        for (gi, (idx, used)) in groups.iter().enumerate() {
            for (shape, widen) in [([3i64, 8, 9, 10], 0), ([2, 20, 8, 8], 3), ([4, 2, 5, 11], 1)] {
                let geoms: Vec<Geom> = idx.iter().map(|&i| GEOMS[i]).collect();
                let c = shape[1];
                let x = leaf(darts::channels_last(&Tensor::randn(shape, opts)));
                let ws: Vec<Tensor> = geoms.iter().map(|g| leaf(Tensor::randn([c, 1, g.0[0], g.0[1]], opts))).collect();
                // The 1x1 convolutions keep the width, or change it by `widen` for every other half.
                let ps: Vec<Tensor> = (0..geoms.len())
                    .map(|k| leaf(Tensor::randn([c + widen * (k as i64 % 2), c, 1, 1], opts)))
                    .collect();
                let reference: Vec<Tensor> =
                    ws.iter().zip(&ps).zip(&geoms).map(|((w, p), &g)| aten(&x, w, p, g)).collect();
                let coefs: Vec<Option<Tensor>> =
                    reference.iter().zip(used.iter()).map(|(y, &u)| u.then(|| y.randn_like())).collect();
                let ours = sep_halves(&x, &halves(&ws, &ps, &geoms)).expect("channels-last float input");
                let at = format!("{kind:?} group {gi} {shape:?}");
                let tol = if kind == Kind::Double { 1e-11 } else { 1e-4 };
                for (k, (o, a)) in ours.iter().zip(&reference).enumerate() {
                    assert_eq!(o.size(), a.size(), "{at}: output {k}");
                    assert_eq!(o.stride(), darts::channels_last(a).stride(), "{at}: output {k} channels-last");
                    let scale = a.abs().max().double_value(&[]).max(1.0);
                    assert!(max_diff(o, a) <= tol * scale, "{at}: output {k}: {}", max_diff(o, a));
                    // The two kernels one after the other: the same sums (BLAS may block another product size
                    // otherwise, so to rounding).
                    let (_, s, p, d) = geoms[k];
                    let two = pointwise_conv(&depthwise_conv(&x, &ws[k], s, p, d).unwrap(), &ps[k]).unwrap();
                    assert!(max_diff(o, &two) <= tol * scale, "{at}: output {k} against the two kernels");
                }
                let mut params: Vec<Tensor> = ws.iter().map(|w| w.shallow_clone()).collect();
                params.extend(ps.iter().map(|p| p.shallow_clone()));
                let go = grads(&ours, &coefs, &x, &params, false);
                let ga = grads(&reference, &coefs, &x, &params, false);
                let n = geoms.len();
                for (i, (p, q)) in go.iter().zip(&ga).enumerate() {
                    if i > 0 && !used[(i - 1) % n] {
                        // A half whose output takes no part in the loss gives its weights no gradient, as ATen's.
                        assert!(!p.defined() && !q.defined(), "{at}: unused half {}", (i - 1) % n);
                        continue;
                    }
                    let scale = q.abs().max().double_value(&[]).max(1.0);
                    assert!(max_diff(p, q) <= tol * scale, "{at}: gradient {i}: {}", max_diff(p, q));
                }
                // One and two threads: the same bits.
                let before = tch::get_num_threads();
                let mut runs = Vec::new();
                for threads in [1, 2] {
                    tch::set_num_threads(threads);
                    let ys = sep_halves(&x, &halves(&ws, &ps, &geoms)).unwrap();
                    let g = grads(&ys, &coefs, &x, &params, false);
                    runs.push((ys, g));
                }
                tch::set_num_threads(before);
                for (p, q) in runs[0].0.iter().chain(&runs[0].1).zip(runs[1].0.iter().chain(&runs[1].1)) {
                    assert!(p.defined() == q.defined() && (!p.defined() || p.equal(q)), "{at}: threads differ");
                }
            }
        }
    }
}

/// With a graph of the backward pass wanted (a user's gradient penalty), the gradients are differentiable and
/// their gradients equal ATen's double backward (float64).
#[test]
fn a_gradient_of_the_gradient() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(43);
    let opts = (Kind::Double, Device::Cpu);
    let geoms = [GEOMS[0], GEOMS[3], GEOMS[6]];
    let x = leaf(darts::channels_last(&Tensor::randn([2, 4, 7, 7], opts)));
    let ws: Vec<Tensor> = geoms.iter().map(|g| leaf(Tensor::randn([4, 1, g.0[0], g.0[1]], opts))).collect();
    let ps: Vec<Tensor> = (0..3).map(|_| leaf(Tensor::randn([4, 4, 1, 1], opts))).collect();
    let reference: Vec<Tensor> = ws.iter().zip(&ps).zip(&geoms).map(|((w, p), &g)| aten(&x, w, p, g)).collect();
    let coefs: Vec<Option<Tensor>> = reference.iter().map(|y| Some(y.randn_like())).collect();
    let mut params: Vec<Tensor> = ws.iter().map(|w| w.shallow_clone()).collect();
    params.extend(ps.iter().map(|p| p.shallow_clone()));
    let cs: Vec<Tensor> = std::iter::once(&x).chain(&params).map(|t| t.randn_like()).collect();
    let second = |ys: Vec<Tensor>| {
        let g = grads(&ys, &coefs, &x, &params, true);
        let z = g.iter().zip(&cs).map(|(g, c)| (g * c).sum(Kind::Double)).reduce(|a, b| a + b).unwrap();
        let mut inputs = vec![&x];
        inputs.extend(params.iter());
        Tensor::run_backward(&[z], &inputs, false, true)
    };
    let ours = second(sep_halves(&x, &halves(&ws, &ps, &geoms)).unwrap());
    let theirs = second(reference);
    for (i, (p, q)) in ours.iter().zip(&theirs).enumerate() {
        assert!(max_diff(p, q) < 1e-10, "second-order gradient {i}: {}", max_diff(p, q));
    }
}

/// One half the kernel does not take declines the whole call (the caller then convolves one by one): NCHW
/// input, bfloat16, a grouped depthwise weight, an empty output, a 1x1 weight of the wrong width or not dense.
#[test]
fn other_inputs_are_declined() {
    let opts = (Kind::Float, Device::Cpu);
    let nchw = Tensor::randn([2, 4, 6, 6], opts);
    let cl = darts::channels_last(&nchw);
    let bf = darts::channels_last(&Tensor::randn([2, 4, 6, 6], (Kind::BFloat16, Device::Cpu)));
    let w = Tensor::randn([4, 1, 3, 3], opts);
    let p = Tensor::randn([4, 4, 1, 1], opts);
    let half = |w, p| SepHalf {
        depthwise: DepthwiseSpec { weight: w, stride: [1, 1], padding: [1, 1], dilation: [1, 1] },
        pointwise: p,
    };
    assert!(sep_halves(&cl, &[half(&w, &p), half(&w, &p)]).is_some());
    assert!(sep_halves(&nchw, &[half(&w, &p)]).is_none(), "NCHW");
    assert!(sep_halves(&bf, &[half(&w, &p)]).is_none(), "bfloat16");
    let grouped = Tensor::randn([4, 2, 3, 3], opts);
    assert!(sep_halves(&cl, &[half(&w, &p), half(&grouped, &p)]).is_none(), "grouped");
    let big = Tensor::randn([4, 1, 9, 9], opts);
    let empty = SepHalf {
        depthwise: DepthwiseSpec { weight: &big, stride: [1, 1], padding: [0, 0], dilation: [1, 1] },
        pointwise: &p,
    };
    assert!(sep_halves(&cl, &[half(&w, &p), empty]).is_none(), "empty output");
    let narrow = Tensor::randn([4, 3, 1, 1], opts);
    assert!(sep_halves(&cl, &[half(&w, &narrow)]).is_none(), "1x1 weight of another width");
    let strided = Tensor::randn([4, 8, 1, 1], opts).narrow(1, 0, 4);
    assert!(sep_halves(&cl, &[half(&w, &strided)]).is_none(), "1x1 weight not dense");
    assert!(sep_halves(&cl, &[]).unwrap().is_empty());
}

/// Gradients for only some of the inputs (the architecture step asks for the alphas' alone, which reach the
/// halves through their input; a weight step for the weights): each equals ATen's.
#[test]
fn gradients_for_some_inputs_only() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(44);
    let opts = (Kind::Float, Device::Cpu);
    let geoms = [GEOMS[0], GEOMS[3]];
    let x = leaf(darts::channels_last(&Tensor::randn([3, 6, 8, 8], opts)));
    let ws: Vec<Tensor> = geoms.iter().map(|g| leaf(Tensor::randn([6, 1, g.0[0], g.0[1]], opts))).collect();
    let ps: Vec<Tensor> = (0..2).map(|_| leaf(Tensor::randn([6, 6, 1, 1], opts))).collect();
    let reference: Vec<Tensor> = ws.iter().zip(&ps).zip(&geoms).map(|((w, p), &g)| aten(&x, w, p, g)).collect();
    let coefs: Vec<Tensor> = reference.iter().map(|y| y.randn_like()).collect();
    let loss =
        |ys: &[Tensor]| ys.iter().zip(&coefs).map(|(y, c)| (y * c).sum(Kind::Float)).reduce(|a, b| a + b).unwrap();
    for subset in [vec![&x], vec![&ws[1]], vec![&ps[0]], vec![&ws[0], &ps[1]], vec![&x, &ps[1]]] {
        let ours =
            Tensor::run_backward(&[loss(&sep_halves(&x, &halves(&ws, &ps, &geoms)).unwrap())], &subset, false, false);
        let reference: Vec<Tensor> = ws.iter().zip(&ps).zip(&geoms).map(|((w, p), &g)| aten(&x, w, p, g)).collect();
        let theirs = Tensor::run_backward(&[loss(&reference)], &subset, false, false);
        for (p, q) in ours.iter().zip(&theirs) {
            assert!(max_diff(p, q) <= 1e-4 * q.abs().max().double_value(&[]).max(1.0), "{:?}", p.size());
        }
    }
}

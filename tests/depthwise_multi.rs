//! The batched depthwise convolutions (`darts::native::depthwise_convs`: the first convolution of every sep and
//! dil conv op on the edges that read one state, as one autograd node): against ATen's conv2d with `groups = C`
//! per convolution (outputs, every weight's gradient, and the input's gradient, which is the sum of the
//! convolutions'), for DARTS's geometries mixed in one call (kernel 3 and 5, dilation 1 and 2, stride 1 and 2,
//! an asymmetric one), float32 and float64, with outputs that take no part in the loss, on one and two threads,
//! with a graph of the backward pass wanted, and inputs it declines.
use darts::native::{depthwise_conv, depthwise_convs, DepthwiseSpec};
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

fn specs<'a>(ws: &'a [Tensor], geoms: &[Geom]) -> Vec<DepthwiseSpec<'a>> {
    ws.iter()
        .zip(geoms)
        .map(|(w, &(_, stride, padding, dilation))| DepthwiseSpec { weight: w, stride, padding, dilation })
        .collect()
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
fn equals_aten_per_convolution_with_the_input_gradient_summed() {
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
            for shape in [[3i64, 8, 9, 10], [2, 20, 8, 8], [4, 2, 5, 11]] {
                let geoms: Vec<Geom> = idx.iter().map(|&i| GEOMS[i]).collect();
                let x = leaf(darts::channels_last(&Tensor::randn(shape, opts)));
                let ws: Vec<Tensor> =
                    geoms.iter().map(|g| leaf(Tensor::randn([shape[1], 1, g.0[0], g.0[1]], opts))).collect();
                let aten: Vec<Tensor> = ws
                    .iter()
                    .zip(&geoms)
                    .map(|(w, &(_, s, p, d))| x.conv2d(w, None::<Tensor>, s, p, d, shape[1]))
                    .collect();
                let coefs: Vec<Option<Tensor>> =
                    aten.iter().zip(used.iter()).map(|(y, &u)| u.then(|| y.randn_like())).collect();
                let ours = depthwise_convs(&x, &specs(&ws, &geoms)).expect("channels-last float input");
                let at = format!("{kind:?} group {gi} {shape:?}");
                let tol = if kind == Kind::Double { 1e-11 } else { 1e-4 };
                for (k, (o, a)) in ours.iter().zip(&aten).enumerate() {
                    assert_eq!(o.size(), a.size(), "{at}: output {k}");
                    assert_eq!(o.stride(), darts::channels_last(a).stride(), "{at}: output {k} channels-last");
                    assert!(max_diff(o, a) <= tol, "{at}: output {k}: {}", max_diff(o, a));
                    // The single kernel's bits.
                    let (_, s, p, d) = geoms[k];
                    assert!(o.equal(&depthwise_conv(&x, &ws[k], s, p, d).unwrap()), "{at}: output {k} bits");
                }
                let go = grads(&ours, &coefs, &x, &ws, false);
                let ga = grads(&aten, &coefs, &x, &ws, false);
                for (i, (p, q)) in go.iter().zip(&ga).enumerate() {
                    if i > 0 && !used[i - 1] {
                        // A weight whose output takes no part in the loss gets no gradient, as with ATen.
                        assert!(!p.defined() && !q.defined(), "{at}: unused weight {}", i - 1);
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
                    let ys = depthwise_convs(&x, &specs(&ws, &geoms)).unwrap();
                    let g = grads(&ys, &coefs, &x, &ws, false);
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

/// With a graph of the backward pass wanted (the second-order architect's Hessian-vector product does not ask
/// for one, but a user's gradient penalty may), the gradients are differentiable and their gradients equal
/// ATen's double backward (float64).
#[test]
fn a_gradient_of_the_gradient() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(43);
    let opts = (Kind::Double, Device::Cpu);
    let geoms = [GEOMS[0], GEOMS[3], GEOMS[2]];
    let x = leaf(darts::channels_last(&Tensor::randn([2, 4, 7, 7], opts)));
    let ws: Vec<Tensor> = geoms.iter().map(|g| leaf(Tensor::randn([4, 1, g.0[0], g.0[1]], opts))).collect();
    let coefs: Vec<Option<Tensor>> = (0..3).map(|_| Some(Tensor::randn([2, 4, 7, 7], opts))).collect();
    let cs: Vec<Tensor> = std::iter::once(&x).chain(&ws).map(|t| t.randn_like()).collect();
    let second = |ys: Vec<Tensor>| {
        let g = grads(&ys, &coefs, &x, &ws, true);
        let z = g.iter().zip(&cs).map(|(g, c)| (g * c).sum(Kind::Double)).reduce(|a, b| a + b).unwrap();
        let mut inputs = vec![&x];
        inputs.extend(ws.iter());
        Tensor::run_backward(&[z], &inputs, false, true)
    };
    let ours = second(depthwise_convs(&x, &specs(&ws, &geoms)).unwrap());
    let aten =
        second(ws.iter().zip(&geoms).map(|(w, &(_, s, p, d))| x.conv2d(w, None::<Tensor>, s, p, d, 4)).collect());
    for (i, (p, q)) in ours.iter().zip(&aten).enumerate() {
        assert!(max_diff(p, q) < 1e-10, "second-order gradient {i}: {}", max_diff(p, q));
    }
}

/// One convolution the kernel does not take declines the whole call (the caller then convolves one by one):
/// NCHW input, bfloat16, a grouped weight, an empty output.
#[test]
fn other_inputs_are_declined() {
    let opts = (Kind::Float, Device::Cpu);
    let nchw = Tensor::randn([2, 4, 6, 6], opts);
    let cl = darts::channels_last(&nchw);
    let bf = darts::channels_last(&Tensor::randn([2, 4, 6, 6], (Kind::BFloat16, Device::Cpu)));
    let w = Tensor::randn([4, 1, 3, 3], opts);
    let spec = |w| DepthwiseSpec { weight: w, stride: [1, 1], padding: [1, 1], dilation: [1, 1] };
    assert!(depthwise_convs(&cl, &[spec(&w), spec(&w)]).is_some());
    assert!(depthwise_convs(&nchw, &[spec(&w)]).is_none(), "NCHW");
    assert!(depthwise_convs(&bf, &[spec(&w)]).is_none(), "bfloat16");
    let grouped = Tensor::randn([4, 2, 3, 3], opts);
    assert!(depthwise_convs(&cl, &[spec(&w), spec(&grouped)]).is_none(), "grouped");
    let big = Tensor::randn([4, 1, 9, 9], opts);
    let empty = DepthwiseSpec { weight: &big, stride: [1, 1], padding: [0, 0], dilation: [1, 1] };
    assert!(depthwise_convs(&cl, &[spec(&w), empty]).is_none(), "empty output");
    assert!(depthwise_convs(&cl, &[]).unwrap().is_empty());
}

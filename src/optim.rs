//! SGD with momentum and Adam, written out so that their state can be checkpointed and so that the
//! second-order architect can read the momentum buffer, with PyTorch's exact update rules.

use tch::{Kind, Tensor};

/// SGD with momentum and L2 weight decay (PyTorch `torch.optim.SGD`, dampening 0, no Nesterov).
#[derive(Debug)]
pub struct Sgd {
    /// Current learning rate (set by the schedule).
    pub lr: f64,
    /// Momentum factor.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// One momentum buffer per parameter (zeros before the first step, which gives PyTorch's first step).
    pub buffers: Vec<Tensor>,
}

impl Sgd {
    /// An optimiser for `params` with zeroed state.
    pub fn new(params: &[Tensor], lr: f64, momentum: f64, weight_decay: f64) -> Sgd {
        let buffers = params.iter().map(|p| p.zeros_like().detach()).collect();
        Sgd { lr, momentum, weight_decay, buffers }
    }

    /// One step: `buf = momentum * buf + (g + wd * p)`, `p -= lr * buf`. A parameter whose gradient is undefined
    /// (the loss did not reach it: GDAS's unsampled ops) is left alone, momentum and decay included, as
    /// PyTorch's SGD skips parameters whose `.grad` is None.
    ///
    /// Through the shim ([`crate::native::sgd_step`]): on CUDA one call of PyTorch's fused SGD kernel
    /// (`torch.optim.SGD(fused=True)`) for every parameter whose buffer shares its layout; on the CPU one loop
    /// of the shim's over each parameter's memory (no operator call).
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor]) {
        let (mut p, mut g, mut b) = (Vec::new(), Vec::new(), Vec::new());
        for ((param, grad), buf) in params.iter().zip(grads).zip(&self.buffers) {
            if grad.defined() {
                p.push(param);
                g.push(grad);
                b.push(buf);
            }
        }
        crate::native::sgd_step(&p, &g, &b, self.lr, self.momentum, self.weight_decay);
    }

    /// The same step as [`Sgd::step`], one operator at a time (the reference the fused step is tested against).
    pub fn step_unfused(&mut self, params: &[Tensor], grads: &[Tensor]) {
        tch::no_grad(|| {
            for ((p, g), buf) in params.iter().zip(grads).zip(self.buffers.iter_mut()) {
                if !g.defined() {
                    continue;
                }
                let d = g + p * self.weight_decay;
                let _ = buf.g_mul_scalar_(self.momentum).g_add_(&d);
                let mut p = p.shallow_clone();
                let _ = p.g_sub_(&(&*buf * self.lr));
            }
        })
    }
}

/// Adam with L2 weight decay added to the gradient (PyTorch `torch.optim.Adam`, not AdamW).
#[derive(Debug)]
pub struct Adam {
    /// Learning rate.
    pub lr: f64,
    /// (beta1, beta2).
    pub betas: (f64, f64),
    /// Denominator epsilon.
    pub eps: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Steps taken so far.
    pub step_count: i64,
    /// First moments.
    pub exp_avg: Vec<Tensor>,
    /// Second moments.
    pub exp_avg_sq: Vec<Tensor>,
}

impl Adam {
    /// An optimiser for `params` with zeroed state.
    pub fn new(params: &[&Tensor], lr: f64, betas: (f64, f64), weight_decay: f64) -> Adam {
        let z = || params.iter().map(|p| p.zeros_like().detach()).collect();
        Adam { lr, betas, eps: 1e-8, weight_decay, step_count: 0, exp_avg: z(), exp_avg_sq: z() }
    }

    /// One step with the given gradients (a parameter with an undefined gradient is left alone).
    pub fn step(&mut self, params: &[&Tensor], grads: &[Tensor]) {
        self.step_count += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.step_count as i32);
        let bc2 = 1.0 - b2.powi(self.step_count as i32);
        tch::no_grad(|| {
            for (i, (p, g)) in params.iter().zip(grads).enumerate() {
                if !g.defined() {
                    continue;
                }
                let g = g + *p * self.weight_decay;
                let m = &mut self.exp_avg[i];
                let _ = m.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let v = &mut self.exp_avg_sq[i];
                let _ = v.g_mul_scalar_(b2).g_add_(&(&g * &g * (1.0 - b2)));
                let denom = v.sqrt() / bc2.sqrt() + self.eps;
                let mut p = p.shallow_clone();
                let _ = p.g_sub_(&(&self.exp_avg[i] / denom * (self.lr / bc1)));
            }
        })
    }
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm` (PyTorch
/// `clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)` clamped to 1), with no host round trip.
/// Returns the norm before clipping as a 0-d tensor. Undefined gradients (parameters the loss did not reach)
/// are left out, as PyTorch leaves out parameters whose `.grad` is None.
///
/// On CUDA the norms in one multi-tensor call and the scaling in another (`torch._foreach_norm`,
/// `_foreach_mul_`, as PyTorch's `clip_grad_norm_` on GPUs), the same operations per tensor as
/// [`clip_grad_norm_unfused`]; on the CPU the shim's own sweeps with the sum of squares in float64
/// ([`crate::native::clip_grad_norm`]), equal to it within float32 rounding.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Tensor {
    let defined: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
    if defined.is_empty() {
        return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    }
    crate::native::clip_grad_norm(&defined, max_norm)
}

/// [`clip_grad_norm`] one tensor at a time (the reference the multi-tensor one is tested against).
pub fn clip_grad_norm_unfused(grads: &mut [Tensor], max_norm: f64) -> Tensor {
    let norms: Vec<Tensor> = grads.iter().filter(|g| g.defined()).map(|g| g.norm().to_kind(Kind::Float)).collect();
    let Some(first) = norms.first() else { return Tensor::zeros([], (Kind::Float, tch::Device::Cpu)) };
    let total = if norms.len() == 1 { first.shallow_clone() } else { Tensor::stack(&norms, 0).norm() };
    let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
    tch::no_grad(|| {
        for g in grads.iter_mut().filter(|g| g.defined()) {
            let _ = g.g_mul_(&coef);
        }
    });
    total
}

/// A learning-rate schedule over epochs. Epoch `e` (0-based) runs at the value the original scripts use for it:
/// they call `scheduler.step()` at the start of each epoch under PyTorch 0.3, so the first epoch runs at the
/// initial rate (under PyTorch >= 1.1 the same scripts run one epoch late; darts follows the scripts as their
/// authors ran them).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// Cosine annealing from the initial rate to the final one (`CosineAnnealingLR`; DARTS's CIFAR training).
    #[default]
    Cosine,
    /// `StepLR`: the rate times `gamma` every `period` epochs (DARTS's ImageNet training: 0.97 every epoch).
    Step {
        /// Factor per period.
        gamma: f64,
        /// Epochs per period.
        period: usize,
    },
    /// PC-DARTS's ImageNet `adjust_lr`: linear decay to 0, with a smaller slope over the last 5 epochs.
    PcDartsLinear,
}

impl LrSchedule {
    /// The rate in `epoch` of `epochs`, from `base` (and `min`, the cosine's final rate), before any warm-up.
    pub fn at(self, base: f64, min: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            LrSchedule::Cosine => cosine_lr(base, min, epoch, epochs),
            LrSchedule::Step { gamma, period } => base * gamma.powi((epoch / period.max(1)) as i32),
            LrSchedule::PcDartsLinear => {
                let (e, n) = (epoch as f64, epochs as f64);
                if n - e > 5.0 {
                    base * (n - 5.0 - e) / (n - 5.0)
                } else {
                    base * (n - e) / ((n - 5.0) * 5.0)
                }
            }
        }
    }
}

/// PC-DARTS's learning-rate warm-up: epoch `e < warmup` runs at `(e + 1) / warmup` of the scheduled rate.
pub fn warmup_factor(epoch: usize, warmup: usize) -> f64 {
    if epoch < warmup {
        (epoch + 1) as f64 / warmup as f64
    } else {
        1.0
    }
}

/// Cosine annealing (PyTorch `CosineAnnealingLR`): the learning rate for `epoch` of `epochs`.
pub fn cosine_lr(base: f64, min: f64, epoch: usize, epochs: usize) -> f64 {
    if epochs == 0 {
        return base;
    }
    min + (base - min) * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs as f64).cos()) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v).to_kind(Kind::Double)
    }

    #[test]
    fn sgd_matches_hand_computed_momentum_steps() {
        let p = t(&[1.0, -2.0]);
        let mut opt = Sgd::new(&[p.shallow_clone()], 0.1, 0.9, 0.01);
        let g = t(&[0.5, 0.25]);
        opt.step(&[p.shallow_clone()], &[g.shallow_clone()]);
        // d = g + 0.01 p = [0.51, 0.23]; buf = d; p = p - 0.1 d
        let p1 = [1.0 - 0.1 * 0.51, -2.0 - 0.1 * 0.23];
        assert!((p.double_value(&[0]) - p1[0]).abs() < 1e-12);
        assert!((p.double_value(&[1]) - p1[1]).abs() < 1e-12);
        opt.step(&[p.shallow_clone()], &[g.shallow_clone()]);
        let d2 = 0.5 + 0.01 * p1[0];
        let buf2 = 0.9 * 0.51 + d2;
        assert!((p.double_value(&[0]) - (p1[0] - 0.1 * buf2)).abs() < 1e-12);
    }

    /// A parameter without a gradient (undefined: the loss did not reach it) keeps its value and momentum, and
    /// clipping measures and scales the others only (PyTorch with `.grad` None): hand-computed.
    #[test]
    fn parameters_without_a_gradient_are_left_alone() {
        let (p, q) = (t(&[1.0, -2.0]), t(&[3.0]));
        let mut opt = Sgd::new(&[p.shallow_clone(), q.shallow_clone()], 0.1, 0.9, 0.01);
        opt.buffers[1] = t(&[0.5]);
        let mut grads = vec![t(&[3.0, 4.0]), Tensor::new()];
        let norm = clip_grad_norm(&mut grads, 1.0);
        assert!((norm.double_value(&[]) - 5.0).abs() < 1e-6 && !grads[1].defined());
        assert!((grads[0].double_value(&[0]) - 0.6).abs() < 1e-6);
        opt.step(&[p.shallow_clone(), q.shallow_clone()], &grads);
        assert_eq!((q.double_value(&[0]), opt.buffers[1].double_value(&[0])), (3.0, 0.5));
        assert!((p.double_value(&[0]) - (1.0 - 0.1 * (0.6 + 0.01))).abs() < 1e-6);
        let mut adam = Adam::new(&[&q], 0.1, (0.9, 0.999), 0.0);
        adam.step(&[&q], &[Tensor::new()]);
        assert_eq!(q.double_value(&[0]), 3.0);
        assert_eq!(clip_grad_norm(&mut [Tensor::new()], 1.0).double_value(&[]), 0.0);
    }

    /// The shim's SGD step and clipping against tch's operations one tensor at a time (and the norm against its
    /// float64 value), over
    /// several steps, on float32 tensors in NCHW and channels-last layouts and a gradient whose layout differs
    /// from its parameter's, a momentum buffer already non-zero.
    #[test]
    fn the_fused_step_and_clipping_equal_the_per_tensor_ones() {
        tch::manual_seed(5);
        let shapes: [&[i64]; 4] = [&[8, 4, 3, 3], &[16], &[5, 7], &[6, 2, 5, 5]];
        let make = || -> Vec<Tensor> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let t = Tensor::randn(*s, (Kind::Float, Device::Cpu));
                    if i == 0 {
                        crate::channels_last(&t)
                    } else {
                        t
                    }
                })
                .collect()
        };
        let params = make();
        let twins: Vec<Tensor> = params.iter().map(|p| p.copy()).collect();
        let (mut a, mut b) = (Sgd::new(&params, 0.05, 0.9, 3e-4), Sgd::new(&twins, 0.05, 0.9, 3e-4));
        for (x, y) in a.buffers.iter_mut().zip(b.buffers.iter_mut()) {
            let r = x.rand_like();
            x.copy_(&r);
            y.copy_(&r);
        }
        for step in 0..4 {
            let mut g = make();
            // The last gradient laid out unlike its parameter (channels-last against NCHW).
            g[3] = crate::channels_last(&g[3]);
            let mut h: Vec<Tensor> = g.iter().map(|t| t.copy()).collect();
            // The norm from the values themselves, in float64.
            let want: f64 =
                g.iter().map(|t| t.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[])).sum();
            let want = want.sqrt();
            let (na, nb) = (clip_grad_norm(&mut g, 1.5), clip_grad_norm_unfused(&mut h, 1.5));
            let (na, nb) = (na.double_value(&[]), nb.double_value(&[]));
            // Ours sums in float64 (ATen's per-tensor norms in float32): within float32 rounding of the exact norm.
            assert!((na - want).abs() <= 1e-7 * want, "step {step}: norm {na} vs {want}");
            assert!((na - nb).abs() <= 1e-6 * want, "step {step}: norms {na} {nb}");
            assert!(want > 1.5, "the case clips");
            for (x, y) in g.iter().zip(&h) {
                assert!((x - y).abs().max().double_value(&[]) <= 1e-7, "step {step}: clipped gradients differ");
                assert_eq!(x.stride(), y.stride(), "step {step}: clipping kept the layout");
            }
            a.step(&params, &g);
            b.step_unfused(&twins, &h);
            for (i, (x, y)) in params.iter().zip(&twins).enumerate() {
                let d = (x - y).abs().max().double_value(&[]);
                assert!(d <= 1e-6, "step {step}, tensor {i}: {d}");
                let d = (&a.buffers[i] - &b.buffers[i]).abs().max().double_value(&[]);
                assert!(d <= 1e-6, "step {step}, buffer {i}: {d}");
            }
            assert_eq!(params[0].stride(), crate::channels_last(&params[0]).stride());
        }
        // The step moved the parameters (a step that did nothing would pass the comparison above).
        assert!((&params[2] - &make()[2]).abs().max().double_value(&[]) > 0.0);
    }

    #[test]
    fn adam_matches_hand_computed_steps() {
        let p = t(&[1.0]);
        let mut opt = Adam::new(&[&p], 3e-4, (0.5, 0.999), 1e-3);
        let g = t(&[2.0]);
        opt.step(&[&p], &[g.shallow_clone()]);
        // First Adam step moves by lr * sign(g') (up to eps): g' = 2 + 1e-3.
        let g1 = 2.0 + 1e-3;
        let m = 0.5 * g1;
        let v = 0.001 * g1 * g1;
        let want = 1.0 - 3e-4 / 0.5 * m / ((v / 0.001f64).sqrt() + 1e-8);
        assert!((p.double_value(&[0]) - want).abs() < 1e-12, "{} vs {want}", p.double_value(&[0]));
        let p_before = p.double_value(&[0]);
        opt.step(&[&p], &[g.shallow_clone()]);
        let g2 = 2.0 + 1e-3 * p_before;
        let m2 = 0.5 * m + 0.5 * g2;
        let v2 = 0.999 * v + 0.001 * g2 * g2;
        let want2 = p_before - 3e-4 / (1.0 - 0.25) * m2 / ((v2 / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
        assert!((p.double_value(&[0]) - want2).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_leaves_small_gradients() {
        let mut g = vec![t(&[3.0, 0.0]), t(&[0.0, 4.0])];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n.double_value(&[]) - 5.0).abs() < 1e-6);
        let after: f64 = g.iter().map(|x| x.pow_tensor_scalar(2).sum(Kind::Double).double_value(&[])).sum();
        assert!((after.sqrt() - 1.0).abs() < 1e-5);
        let mut small = vec![Tensor::from_slice(&[0.1f32, 0.2]).to_device(Device::Cpu)];
        let _ = clip_grad_norm(&mut small, 5.0);
        assert!((small[0].double_value(&[1]) - 0.2).abs() < 1e-7);
    }

    /// The schedules against the original scripts' rules, written out by hand: DARTS's `train_imagenet.py`
    /// (StepLR(1, 0.97), stepped before each epoch under PyTorch 0.3: epoch e at 0.1 * 0.97^e) and PC-DARTS's
    /// `adjust_lr` with 250 epochs and lr 0.5 (epoch 0: 0.5 * 245/245; epoch 244: 0.5 * 1/245; epoch 245, the
    /// first of the last five: 0.5 * 5/(245*5); epoch 249: 0.5 * 1/1225), and its warm-up ((e+1)/5 below 5).
    #[test]
    fn step_and_linear_schedules_follow_the_original_scripts() {
        let step = LrSchedule::Step { gamma: 0.97, period: 1 };
        assert_eq!(step.at(0.1, 0.0, 0, 250), 0.1);
        assert!((step.at(0.1, 0.0, 1, 250) - 0.097).abs() < 1e-15);
        assert!((step.at(0.1, 0.0, 2, 250) - 0.09409).abs() < 1e-15);
        assert!((step.at(0.1, 0.0, 249, 250) - 0.1 * 0.97f64.powi(249)).abs() < 1e-15);
        let every3 = LrSchedule::Step { gamma: 0.5, period: 3 };
        assert_eq!([0, 2, 3, 5, 6].map(|e| every3.at(1.0, 0.0, e, 10)), [1.0, 1.0, 0.5, 0.5, 0.25]);
        let lin = LrSchedule::PcDartsLinear;
        assert_eq!(lin.at(0.5, 0.0, 0, 250), 0.5);
        assert!((lin.at(0.5, 0.0, 244, 250) - 0.5 / 245.0).abs() < 1e-15);
        assert!((lin.at(0.5, 0.0, 245, 250) - 0.5 * 5.0 / 1225.0).abs() < 1e-15);
        assert!((lin.at(0.5, 0.0, 249, 250) - 0.5 / 1225.0).abs() < 1e-15);
        assert_eq!([0, 1, 4, 5].map(|e| warmup_factor(e, 5)), [0.2, 0.4, 1.0, 1.0]);
        assert_eq!(warmup_factor(0, 0), 1.0);
    }

    #[test]
    fn cosine_schedule_runs_from_base_to_min() {
        assert!((cosine_lr(0.025, 0.001, 0, 50) - 0.025).abs() < 1e-12);
        assert!((cosine_lr(0.025, 0.001, 25, 50) - 0.013).abs() < 1e-12);
        assert!((cosine_lr(0.025, 0.001, 50, 50) - 0.001).abs() < 1e-12);
    }
}

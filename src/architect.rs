//! Hypergradients for alpha (the original `architect.py`): first order, and second order by unrolling one
//! SGD step and approximating the Hessian-vector product by central finite differences.

use crate::optim::{Adam, Sgd};
use crate::supernet::SearchNetwork;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Which hypergradient approximation the alpha step uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// grad_alpha L_val(w, alpha): cheap, the paper's DARTS (first order).
    First,
    /// grad_alpha L_val(w - xi grad_w L_train(w, alpha), alpha), with the finite-difference Hessian term.
    Second,
}

/// The architecture optimiser: Adam on alpha plus the hypergradient rule.
#[derive(Debug)]
pub struct Architect {
    /// Adam over the architecture tensors (alpha normal, alpha reduce, and the betas if any).
    pub adam: Adam,
    /// First or second order.
    pub order: Order,
    /// The finite-difference step is `hvp_r / ||v||` (0.01 in DARTS).
    pub hvp_r: f64,
    /// Second order: the weights' learning rate the last unrolled step used (what the metrics report).
    pub last_eta: Option<f64>,
    /// The process group of a data-parallel search: every gradient the hypergradient is made of is averaged
    /// over the processes (by their examples) where it is computed.
    pub dist: Option<std::sync::Arc<crate::dist::Dist>>,
}

/// Averages gradients over the processes of a data-parallel run, weighted by this process's examples (a no-op
/// alone).
type Reduce<'a> = &'a dyn Fn(&mut [Tensor], f64) -> anyhow::Result<()>;

fn alone(_: &mut [Tensor], _: f64) -> anyhow::Result<()> {
    Ok(())
}

fn examples(x: &Tensor) -> f64 {
    x.size()[0] as f64
}

/// A copy of tensors' values, to restore them exactly later.
fn snapshot(ts: &[Tensor]) -> Vec<Tensor> {
    crate::native::snapshot(ts)
}

fn restore(ts: &[Tensor], saved: &[Tensor]) {
    if !ts.is_empty() {
        crate::native::foreach_copy(ts, saved);
    }
}

/// grad_alpha of the training-mode loss on (x, y).
fn alpha_grads(net: &SearchNetwork, x: &Tensor, y: &Tensor) -> Vec<Tensor> {
    net.loss_grads(x, y, &net.alphas.tensors()).2
}

/// Global L2 norm of a list of tensors, as a float64 0-d tensor (stays on the device; on the CPU summed in
/// float64, [`crate::native::global_norm`]).
pub fn global_norm(ts: &[Tensor]) -> Tensor {
    crate::native::global_norm(ts)
}

/// The finite-difference approximation of `grad^2_{alpha,w} L_train(w, alpha) · v` used by DARTS:
/// `[grad_alpha L(w + R v) - grad_alpha L(w - R v)] / (2R)` with `R = r / ||v||`. The weights are restored
/// exactly afterwards. With skip dropout both evaluations draw the same masks (the next of the network's
/// stream of seeds), so that the difference is the loss's and not the masks'.
pub fn finite_difference_hvp(
    net: &SearchNetwork,
    weights: &[Tensor],
    v: &[Tensor],
    x: &Tensor,
    y: &Tensor,
    r: f64,
) -> Vec<Tensor> {
    finite_difference_hvp_with(net, weights, v, x, y, r, &alone).expect("a process alone cannot fail to reduce")
}

/// [`finite_difference_hvp`] with both gradients averaged over the processes by `reduce`.
fn finite_difference_hvp_with(
    net: &SearchNetwork,
    weights: &[Tensor],
    v: &[Tensor],
    x: &Tensor,
    y: &Tensor,
    r: f64,
    reduce: Reduce,
) -> anyhow::Result<Vec<Tensor>> {
    let saved = snapshot(weights);
    // R = r / |v| (the original's `R = r / _concat(vector).norm()`), read once on the host for the shifts.
    let big_r = (r / global_norm(v)).to_kind(weights[0].kind());
    let r_host = big_r.to_kind(Kind::Double).double_value(&[]);
    let shift = |sign: f64| crate::native::foreach_axpy(weights, &saved, v, sign * r_host);
    let masks = net.sample_stream();
    shift(1.0);
    let mut gp = alpha_grads(net, x, y);
    net.set_sample_stream(masks);
    shift(-1.0);
    let mut gn = alpha_grads(net, x, y);
    restore(weights, &saved);
    reduce(&mut gp, examples(x))?;
    reduce(&mut gn, examples(x))?;
    Ok(gp.iter().zip(&gn).map(|(a, b)| (a - b) / (&big_r * 2.0).to_kind(a.kind())).collect())
}

/// The exact `grad^2_{alpha,w} L_train(w, alpha) · v` by double backward (for tests and diagnostics).
pub fn exact_hvp(net: &SearchNetwork, weights: &[Tensor], v: &[Tensor], x: &Tensor, y: &Tensor) -> Vec<Tensor> {
    let loss = net.loss(x, y);
    let gw = Tensor::run_backward(&[loss], weights, true, true);
    let dot = gw.iter().zip(v).map(|(g, vi)| (g * vi).sum(g.kind())).reduce(|a, b| a + b).expect("weights");
    Tensor::run_backward(&[dot], &net.alphas.tensors(), false, false)
}

impl Architect {
    /// Adam(lr, betas, weight decay) over the network's alphas.
    pub fn new(net: &SearchNetwork, order: Order, lr: f64, betas: (f64, f64), weight_decay: f64) -> Architect {
        Architect {
            adam: Adam::new(&net.alphas.tensors(), lr, betas, weight_decay),
            order,
            hvp_r: 0.01,
            last_eta: None,
            dist: None,
        }
    }

    /// The hypergradient for (alpha_normal, alpha_reduce) at the current weights. `eta` is the weights'
    /// current learning rate; `sgd` gives the momentum buffer and weight decay of the unrolled step.
    #[allow(clippy::too_many_arguments)]
    pub fn hypergradient(
        &self,
        net: &SearchNetwork,
        weights: &[Tensor],
        buffers: &[Tensor],
        sgd: &Sgd,
        (x_train, y_train): (&Tensor, &Tensor),
        (x_val, y_val): (&Tensor, &Tensor),
        eta: f64,
    ) -> Vec<Tensor> {
        let train = (x_train, y_train);
        self.hypergradient_with(net, weights, buffers, sgd, train, (x_val, y_val), eta, &alone)
            .expect("a process alone cannot fail to reduce")
    }

    /// [`Architect::hypergradient`] with every gradient it is made of averaged over the processes by `reduce`:
    /// first order the validation gradient; second order the training gradient of the unrolled step, the
    /// validation gradients at the unrolled weights (alpha's and the weights', which set the Hessian's direction)
    /// and both finite-difference gradients. So every process unrolls to the same weights.
    #[allow(clippy::too_many_arguments)]
    fn hypergradient_with(
        &self,
        net: &SearchNetwork,
        weights: &[Tensor],
        buffers: &[Tensor],
        sgd: &Sgd,
        (x_train, y_train): (&Tensor, &Tensor),
        (x_val, y_val): (&Tensor, &Tensor),
        eta: f64,
        reduce: Reduce,
    ) -> anyhow::Result<Vec<Tensor>> {
        match self.order {
            Order::First => {
                let mut g = alpha_grads(net, x_val, y_val);
                reduce(&mut g, examples(x_val))?;
                Ok(g)
            }
            Order::Second => {
                // w' = w - eta (momentum * buf + grad_w L_train + wd * w)
                let train_masks = net.sample_stream();
                let w_refs: Vec<&Tensor> = weights.iter().collect();
                let (_, _, mut g) = net.loss_grads(x_train, y_train, &w_refs);
                reduce(&mut g, examples(x_train))?;
                let theta = snapshot(weights);
                crate::native::unrolled_step(weights, &theta, &g, &sgd.buffers, (eta, sgd.momentum, sgd.weight_decay));
                // The unrolled model is a copy in the original: its forward must not move our BN statistics.
                let stats = snapshot(buffers);
                let mut inputs: Vec<&Tensor> = net.alphas.tensors();
                let n_arch = inputs.len();
                inputs.extend(weights.iter());
                let (_, _, mut grads) = net.loss_grads(x_val, y_val, &inputs);
                reduce(&mut grads, examples(x_val))?;
                restore(weights, &theta);
                restore(buffers, &stats);
                let (dalpha, v) = grads.split_at(n_arch);
                // With skip dropout, the Hessian term differentiates the same L_train (the same masks) that the
                // unrolled step descended; the stream then goes on after the validation pass's masks.
                let after = net.sample_stream();
                net.set_sample_stream(train_masks);
                let implicit = finite_difference_hvp_with(net, weights, v, x_train, y_train, self.hvp_r, reduce)?;
                net.set_sample_stream(after);
                Ok(dalpha.iter().zip(&implicit).map(|(d, h)| d - h * eta).collect())
            }
        }
    }

    /// The hypergradient of this process's batches, averaged over the processes of a data-parallel search at every
    /// point where the original computes a gradient (alone: [`Architect::hypergradient`]).
    #[allow(clippy::too_many_arguments)]
    pub fn averaged_hypergradient(
        &self,
        net: &SearchNetwork,
        weights: &[Tensor],
        buffers: &[Tensor],
        sgd: &Sgd,
        train: (&Tensor, &Tensor),
        val: (&Tensor, &Tensor),
        eta: f64,
    ) -> anyhow::Result<Vec<Tensor>> {
        match &self.dist {
            Some(d) => {
                let reduce = |g: &mut [Tensor], n: f64| d.average_gradients(g, n);
                self.hypergradient_with(net, weights, buffers, sgd, train, val, eta, &reduce)
            }
            None => Ok(self.hypergradient(net, weights, buffers, sgd, train, val, eta)),
        }
    }

    /// One alpha step: hypergradient, then Adam.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        net: &SearchNetwork,
        weights: &[Tensor],
        buffers: &[Tensor],
        sgd: &Sgd,
        train: (&Tensor, &Tensor),
        val: (&Tensor, &Tensor),
        eta: f64,
    ) -> anyhow::Result<()> {
        let grads = self.averaged_hypergradient(net, weights, buffers, sgd, train, val, eta)?;
        if self.order == Order::Second {
            self.last_eta = Some(eta);
        }
        self.adam.step(&net.alphas.tensors(), &grads);
        Ok(())
    }
}

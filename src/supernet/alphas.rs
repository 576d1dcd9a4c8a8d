//! The architecture parameters and what is derived from them: alpha (and beta) as leaf tensors apart from the
//! weights, the weights derivation ranks, per-node edge softmax, and their rows as numbers.

use crate::space::SearchSpace;
use tch::{Device, Kind, Tensor};

/// The architecture parameters: one row per edge, one column per candidate op; with PC-DARTS edge
/// normalisation also one weight per edge (beta).
#[derive(Debug)]
pub struct Alphas {
    /// alpha for the normal cells, `[edges, ops]`.
    pub normal: Tensor,
    /// alpha for the reduction cells, `[edges, ops]`.
    pub reduce: Tensor,
    /// beta for the normal and the reduction cells, `[edges]` each (edge normalisation only).
    pub betas: Option<(Tensor, Tensor)>,
    /// Intermediate nodes per cell (the betas' softmax groups).
    pub nodes: usize,
}

impl Alphas {
    /// `1e-3 * N(0, 1)`, as the original (draws from libtorch's generator: seed it first); alpha normal,
    /// alpha reduce, then (edge normalisation) beta normal and beta reduce, PC-DARTS' order.
    pub fn random(space: &SearchSpace, device: Device) -> Alphas {
        let make = |shape: &[i64]| (Tensor::randn(shape, (Kind::Float, device)) * 1e-3).set_requires_grad(true);
        let shape = [space.edges() as i64, space.ops.len() as i64];
        let (normal, reduce) = (make(&shape), make(&shape));
        let betas = space.edge_normalization.then(|| (make(&shape[..1]), make(&shape[..1])));
        Alphas { normal, reduce, betas, nodes: space.nodes }
    }

    /// The same values on `device`, as new leaf tensors.
    pub fn to_device(&self, device: Device) -> Alphas {
        let mv = |t: &Tensor| t.detach().to_device(device).set_requires_grad(true);
        Alphas {
            normal: mv(&self.normal),
            reduce: mv(&self.reduce),
            betas: self.betas.as_ref().map(|(n, r)| (mv(n), mv(r))),
            nodes: self.nodes,
        }
    }

    /// Every architecture tensor, in the order of the optimiser state: alpha normal, alpha reduce, then the
    /// betas if any.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.normal, &self.reduce];
        if let Some((n, r)) = &self.betas {
            v.extend([n, r]);
        }
        v
    }

    /// Checkpoint names of [`Alphas::tensors`], in the same order.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = vec!["alpha/normal", "alpha/reduce"];
        if self.betas.is_some() {
            v.extend(["beta/normal", "beta/reduce"]);
        }
        v
    }

    /// softmax(alpha) per edge, as plain nested vectors: (normal, reduce).
    pub fn softmax(&self) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        (softmax_rows(&self.normal), softmax_rows(&self.reduce))
    }

    /// The edge weights (softmax of beta over each node's incoming edges), normal and reduce, as tensors.
    pub fn edge_weights(&self) -> Option<(Tensor, Tensor)> {
        self.betas.as_ref().map(|(n, r)| (node_softmax(n, self.nodes), node_softmax(r, self.nodes)))
    }

    /// [`Alphas::edge_weights`] on the host.
    pub fn edge_weights_vec(&self) -> Option<(Vec<f64>, Vec<f64>)> {
        let host = |t: Tensor| Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).to_device(Device::Cpu));
        self.edge_weights().map(|(n, r)| (host(n).unwrap_or_default(), host(r).unwrap_or_default()))
    }

    /// The weights derivation ranks by: softmax(alpha), each row scaled by its edge weight when there are
    /// betas (as PC-DARTS' `genotype()`): (normal, reduce).
    pub fn derivation_weights(&self) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let (n, r) = self.softmax();
        derivation_weights(n, r, self.edge_weights_vec())
    }
}

/// The weights derivation ranks, from softmax(alpha) of both cell types (a row per edge) and, with edge
/// normalisation, each edge's weight (normal, reduce): every row scaled by its edge's weight.
pub fn derivation_weights(
    mut normal: Vec<Vec<f64>>,
    mut reduce: Vec<Vec<f64>>,
    edge_weights: Option<(Vec<f64>, Vec<f64>)>,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    if let Some((bn, br)) = edge_weights {
        for (rows, w) in [(&mut normal, bn), (&mut reduce, br)] {
            for (row, w) in rows.iter_mut().zip(w) {
                row.iter_mut().for_each(|v| *v *= w);
            }
        }
    }
    (normal, reduce)
}

/// Softmax of a per-edge vector within each node's incoming edges (node i has 2 + i).
pub fn node_softmax(betas: &Tensor, nodes: usize) -> Tensor {
    let mut parts = Vec::with_capacity(nodes);
    let mut start = 0;
    for i in 0..nodes {
        let n = (2 + i) as i64;
        parts.push(betas.narrow(0, start, n).softmax(-1, betas.kind()));
        start += n;
    }
    Tensor::cat(&parts, 0)
}

/// Row-wise softmax of a 2-d tensor, copied to the host.
pub fn softmax_rows(t: &Tensor) -> Vec<Vec<f64>> {
    let s = t.detach().softmax(-1, Kind::Double).to_device(Device::Cpu);
    let (r, c) = (s.size()[0], s.size()[1]);
    (0..r).map(|i| (0..c).map(|j| s.double_value(&[i, j])).collect()).collect()
}

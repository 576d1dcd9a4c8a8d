//! Scoring a network on examples without gradients: mean cross-entropy, top-1 and top-5 accuracy, in evaluation
//! mode. Shared by the search (the alpha split), the final training (validation and test sets) and the baselines
//! (their scoring split).

use crate::data::Dataset;
use crate::native::{with_precision, Precision};
use crate::network::Network;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Test-set results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy when there are more than 5 classes.
    pub top5: Option<f64>,
    /// Examples evaluated.
    pub examples: usize,
}

/// Mean cross-entropy and accuracy of `forward` (called in evaluation mode by the caller's choice, without
/// gradients) on the examples `indices` of `data`, `chunk` at a time.
pub fn score_indices(
    data: &Dataset,
    indices: &[usize],
    chunk: usize,
    device: Device,
    forward: impl Fn(&Tensor) -> Tensor,
) -> (f64, f64) {
    tch::no_grad(|| {
        let (mut loss, mut correct) = (0.0, 0i64);
        for idx in indices.chunks(chunk.max(1)) {
            let (x, y) = data.batch(idx, None, device);
            let logits = forward(&x);
            loss += logits.cross_entropy_for_logits(&y).double_value(&[]) * idx.len() as f64;
            correct += logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
        }
        (loss / indices.len() as f64, correct as f64 / indices.len() as f64)
    })
}

/// Loss, top-1 and top-5 of `net` on `data`, in evaluation mode, the forward passes in `precision`.
pub fn evaluate(
    net: &Network,
    data: &Dataset,
    batch: usize,
    device: Device,
    precision: Precision,
) -> Result<EvalResult> {
    let idx: Vec<usize> = (0..data.len()).collect();
    let sums = evaluate_sums(net, data, &idx, batch, device, precision)?;
    Ok(EvalResult::from_sums(sums, data.shape.classes))
}

/// Sums over the examples `indices` of `data` (in evaluation mode, the forward passes in `precision`): the
/// cross-entropy, top-1 and top-5 hits, and the count; so that shards evaluated by several processes add up.
pub fn evaluate_sums(
    net: &Network,
    data: &Dataset,
    indices: &[usize],
    batch: usize,
    device: Device,
    precision: Precision,
) -> Result<[f64; 4]> {
    tch::no_grad(|| {
        let (mut loss, mut top1, mut top5) = (0.0, 0i64, 0i64);
        for chunk in indices.chunks(batch.max(1)) {
            let (x, y) = data.batch(chunk, None, device);
            let logits = with_precision(device, precision, || net.forward_t(&x, false).0)?.to_kind(Kind::Float);
            loss += logits.cross_entropy_for_logits(&y).double_value(&[]) * chunk.len() as f64;
            top1 += logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
            if data.shape.classes > 5 {
                let (_, top) = logits.topk(5, -1, true, true);
                top5 += top.eq_tensor(&y.unsqueeze(1)).any_dim(1, false).sum(Kind::Int64).int64_value(&[]);
            }
        }
        Ok([loss, top1 as f64, top5 as f64, indices.len() as f64])
    })
}

impl EvalResult {
    /// The result from [`evaluate_sums`]'s sums (added over shards) for data of `classes` classes.
    pub fn from_sums([loss, top1, top5, n]: [f64; 4], classes: usize) -> EvalResult {
        EvalResult { loss: loss / n, top1: top1 / n, top5: (classes > 5).then(|| top5 / n), examples: n as usize }
    }
}

//! Where a step's time goes, by op type (`darts bench --profile`): forward times from timing points inside a real
//! forward pass, forward + backward times of each op alone at every shape it meets.

use super::{time_ms, FinalStep, Variant};
use crate::optim::{clip_grad_norm, Sgd};
use crate::params::Params;
use crate::space::{DataShape, SearchSpace};
use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

/// One row of the per-op profile of a search step.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileRow {
    /// Op name, or "preprocess", "stem", "classifier", "rest".
    pub name: String,
    /// Calls per forward pass.
    pub calls: usize,
    /// Time of those calls inside a real forward pass (training mode), ms.
    pub forward_ms: f64,
    /// The same calls forward + backward (input and weight gradients), each op measured alone at its real
    /// shapes and multiplied by its calls, ms. For "rest": the step's time minus all ops' (preprocessing,
    /// stem, classifier, the weighted sums and concatenations, the optimiser).
    pub forward_backward_ms: f64,
    /// forward_backward_ms as a fraction of the whole forward + backward + SGD step.
    pub share: f64,
}

/// Where a forward + backward + SGD step of the supernet spends its time, by op type: forward times from
/// timing points inside a real forward pass; forward + backward times by measuring each op alone at every
/// shape it meets in the network (median of `repeats`). Returns the rows and the whole step's time in ms.
pub fn profile_search(
    space: &SearchSpace,
    shape: &DataShape,
    batch: i64,
    repeats: usize,
    device: Device,
    variant: &Variant,
) -> (Vec<ProfileRow>, f64) {
    let (space, vs, net) = variant.supernet(space, shape, device);
    let weights = Params::of(&vs).weights;
    let cfg = crate::search::SearchConfig::default();
    let mut sgd = Sgd::new(&weights, cfg.lr, cfg.momentum, cfg.weight_decay);
    let (c, h, w) = (shape.channels as i64, shape.height as i64, shape.width as i64);
    let x = Tensor::randn([batch, c, h, w], (Kind::Float, device));
    let y = Tensor::randint(shape.classes as i64, [batch], (Kind::Int64, device));
    let (_, step_ms) = time_ms(device, repeats, || {
        let wr: Vec<&Tensor> = weights.iter().collect();
        let (_, _, mut g) = net.loss_grads(&x, &y, &wr);
        let _ = clip_grad_norm(&mut g, cfg.grad_clip);
        sgd.step(&weights, &g);
    });
    let records = crate::profile::collect(|| {
        let _ = net.forward_t(&x, true);
    });
    let rows = profile_rows(&records, step_ms, device, repeats, variant.channels_last, |p, op, c, stride| {
        crate::ops::Op::new(p, op, c, stride, false, true, space.activation)
    });
    (rows, step_ms)
}

/// Where a training step of the final network (forward with drop path and the auxiliary head, backward, SGD, as
/// `bench_final` times it) spends its time, by op type: forward times from the timing points in a real forward
/// pass, forward + backward by measuring each op alone (affine BN, as in the final network) at every shape it
/// meets. Returns the rows and the whole step's time in ms.
pub fn profile_final(
    genotype: &crate::genotype::Genotype,
    cfg: &crate::network::NetworkConfig,
    shape: &DataShape,
    (batch, repeats): (i64, usize),
    device: Device,
    variant: &Variant,
) -> anyhow::Result<(Vec<ProfileRow>, f64)> {
    let mut s = FinalStep::new(genotype, cfg, shape, batch, device, variant);
    let (_, step_ms) = s.timed(variant.precision, |f| time_ms(device, repeats, f))?;
    let m = s.masks();
    let records = crate::profile::collect(|| {
        let _ = s.net.forward_masked(&s.x, true, Some(&m));
    });
    let rows = profile_rows(&records, step_ms, device, repeats, variant.channels_last, |p, op, c, stride| {
        crate::ops::Op::new(p, op, c, stride, true, false, crate::space::Activation::Relu)
    });
    Ok((rows, step_ms))
}

/// The profile's rows from a forward pass's timing `records` and the step's time: forward time and calls by name,
/// and each op measured alone, forward and backward, at every (input shape, stride) it met, built by `make`.
fn profile_rows(
    records: &[crate::profile::Record],
    step_ms: f64,
    device: Device,
    repeats: usize,
    channels_last: bool,
    make: impl Fn(&nn::Path, crate::space::OpKind, i64, i64) -> crate::ops::Op,
) -> Vec<ProfileRow> {
    use std::collections::BTreeMap;
    let mut by_name: BTreeMap<&'static str, (usize, f64)> = BTreeMap::new();
    let mut shapes: BTreeMap<(String, Vec<i64>, i64), (crate::space::OpKind, usize)> = BTreeMap::new();
    for r in records {
        let e = by_name.entry(r.name).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += r.seconds * 1e3;
        if let Some(op) = r.op {
            shapes.entry((op.name().to_string(), r.input.clone(), r.stride)).or_insert((op, 0)).1 += 1;
        }
    }
    let mut isolated: BTreeMap<String, f64> = BTreeMap::new();
    for ((name, input, stride), (op, count)) in &shapes {
        let vs1 = nn::VarStore::new(device);
        let o = make(&vs1.root(), *op, input[1], *stride);
        crate::set_vars_channels_last(&vs1, channels_last);
        let xi = Tensor::randn(input.as_slice(), (Kind::Float, device));
        let xi = if channels_last { crate::channels_last(&xi) } else { xi }.set_requires_grad(true);
        let mut inputs = vs1.trainable_variables();
        inputs.push(xi.shallow_clone());
        let (_, ms) = time_ms(device, repeats.max(3), || {
            let out = o.forward_t(&xi, true);
            if out.requires_grad() {
                let _ = Tensor::run_backward(&[out.sum(Kind::Float)], &inputs, false, false);
            }
        });
        *isolated.entry(name.clone()).or_insert(0.0) += ms * *count as f64;
    }
    let mut rows: Vec<ProfileRow> = by_name
        .iter()
        .map(|(name, (calls, fwd))| {
            let fb = isolated.get(*name).copied().unwrap_or(f64::NAN);
            ProfileRow {
                name: name.to_string(),
                calls: *calls,
                forward_ms: *fwd,
                forward_backward_ms: fb,
                share: fb / step_ms,
            }
        })
        .collect();
    let ops_total: f64 = isolated.values().sum();
    let key = |r: &ProfileRow| if r.forward_backward_ms.is_nan() { -1.0 } else { r.forward_backward_ms };
    rows.sort_by(|a, b| key(b).total_cmp(&key(a)));
    rows.push(ProfileRow {
        name: "rest".into(),
        calls: 0,
        forward_ms: f64::NAN,
        forward_backward_ms: step_ms - ops_total,
        share: (step_ms - ops_total) / step_ms,
    });
    rows
}

//! The final network built from a genotype (the original `model.py`, `NetworkCIFAR`): a stack of cells
//! applying the genotype's ops (BN affine now), an auxiliary head at 2/3 depth, drop path; and its parameter
//! and multiply-accumulate counts.

use crate::genotype::Genotype;
use crate::ops::{batch_norm, fold_batch_norm, Bn, Conv, ConvSpec, Op, Preprocess, ReluConvBn, Stem};
use crate::shared::EdgeInput;
use crate::space::{Activation, DataShape};
use std::rc::Rc;
use tch::nn;
use tch::{Kind, Tensor};

/// The macro shape of a final network.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NetworkConfig {
    /// Initial channels C (36 in DARTS' CIFAR evaluation).
    pub channels: usize,
    /// Number of cells (20 in DARTS' CIFAR evaluation).
    pub layers: usize,
    /// Build the auxiliary head at 2/3 depth.
    pub auxiliary: bool,
    /// The stem outputs `stem_multiplier * channels` channels (CIFAR variant).
    pub stem_multiplier: usize,
    /// The ImageNet variant (`NetworkImageNet`): a two-stage stride-2 stem (8x smaller maps), the first cell
    /// reducing its older input, the ImageNet auxiliary head.
    #[serde(default)]
    pub imagenet: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig { channels: 36, layers: 20, auxiliary: true, stem_multiplier: 3, imagenet: false }
    }
}

impl NetworkConfig {
    /// DARTS' ImageNet evaluation network: 48 channels, 14 cells, auxiliary head.
    pub fn imagenet() -> NetworkConfig {
        NetworkConfig { channels: 48, layers: 14, auxiliary: true, stem_multiplier: 3, imagenet: true }
    }

    /// Smallest image side the network accepts.
    pub fn min_image_size(&self) -> usize {
        if self.imagenet {
            32
        } else {
            4
        }
    }
}

/// The ImageNet stems: stem0 = conv3x3/2, BN, ReLU, conv3x3/2, BN; stem1 = ReLU, conv3x3/2, BN.
#[derive(Debug)]
pub(crate) struct ImageNetStem {
    pub(crate) conv0a: Conv,
    pub(crate) bn0a: Bn,
    pub(crate) conv0b: Conv,
    pub(crate) bn0b: Bn,
    pub(crate) conv1: Conv,
    pub(crate) bn1: Bn,
}

impl ImageNetStem {
    fn new(p: &nn::Path, c_in: i64, c: i64) -> ImageNetStem {
        let (s0, s1) = (p / "stem0", p / "stem1");
        ImageNetStem {
            conv0a: Conv::new(&(&s0 / "0"), c_in, c / 2, ConvSpec::square(3, 2, 1)),
            bn0a: batch_norm(&(&s0 / "1"), c / 2, true),
            conv0b: Conv::new(&(&s0 / "3"), c / 2, c, ConvSpec::square(3, 2, 1)),
            bn0b: batch_norm(&(&s0 / "4"), c, true),
            conv1: Conv::new(&(&s1 / "1"), c, c, ConvSpec::square(3, 2, 1)),
            bn1: batch_norm(&(&s1 / "2"), c, true),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let s0 = self.bn0a.forward_t(&self.conv0a.forward(x), train).relu();
        let s0 = self.bn0b.forward_t(&self.conv0b.forward(&s0), train);
        let s1 = self.bn1.forward_t(&self.conv1.forward(&s0.relu()), train);
        (s0, s1)
    }
}

#[derive(Debug)]
pub(crate) enum NetStem {
    Cifar(Box<Stem>),
    ImageNet(Box<ImageNetStem>),
}

/// A cell of the final network: each intermediate node sums two ops applied to its two chosen inputs.
#[derive(Debug)]
pub struct Cell {
    /// Whether this is a reduction cell.
    pub reduction: bool,
    pub(crate) preprocess0: Preprocess,
    pub(crate) preprocess1: ReluConvBn,
    pub(crate) ops: Vec<Op>,
    /// The genotype's op of each entry of `ops` (for the profile).
    kinds: Vec<crate::space::OpKind>,
    pub(crate) indices: Vec<usize>,
    pub(crate) concat: Vec<usize>,
}

/// Drop path: multiplies each example by its keep mask (0 or 1, `[n]`) and rescales by 1 / (1 - p).
pub fn drop_path(x: &Tensor, keep_mask: &Tensor, p: f64) -> Tensor {
    x * drop_path_scale(keep_mask, p, x.kind())
}

/// Drop path's factor per example, `[n, 1, 1, 1]`: the keep mask over 1 - p (the original divides the whole map
/// by 1 - p, then multiplies by the mask; one small division instead keeps drop path to one pass over the map,
/// equal to float rounding).
pub fn drop_path_scale(keep_mask: &Tensor, p: f64, kind: Kind) -> Tensor {
    keep_mask.view([-1, 1, 1, 1]).to_kind(kind) / (1.0 - p)
}

/// Keep masks for one step, `[sites, n]`: each entry 1 with probability 1 - p, drawn from `rng` (not from
/// libtorch's global generator, so that runs are reproducible and resumable whatever else draws from it).
pub fn drop_path_masks(sites: usize, n: usize, p: f64, rng: &mut rand_chacha::ChaCha8Rng) -> Tensor {
    use rand::Rng;
    let v: Vec<f32> = (0..sites * n).map(|_| if rng.random_bool(1.0 - p) { 1.0 } else { 0.0 }).collect();
    Tensor::from_slice(&v).reshape([sites as i64, n as i64])
}

impl Cell {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: &nn::Path,
        genotype: &Genotype,
        c_pp: i64,
        c_p: i64,
        c: i64,
        reduction: bool,
        reduction_prev: bool,
    ) -> Cell {
        let act = Activation::Relu;
        let preprocess0 = Preprocess::new(&(p / "preprocess0"), c_pp, c, reduction_prev, true, act);
        let preprocess1 = ReluConvBn::new(&(p / "preprocess1"), c_p, c, 1, 1, 0, true, act);
        let (gene, concat) = if reduction {
            (&genotype.reduce, &genotype.reduce_concat)
        } else {
            (&genotype.normal, &genotype.normal_concat)
        };
        let ops_path = p / "_ops";
        let ops = gene
            .iter()
            .enumerate()
            .map(|(k, &(kind, index))| {
                let stride = if reduction && index < 2 { 2 } else { 1 };
                Op::new(&(&ops_path / k), kind, c, stride, true, false, act)
            })
            .collect();
        let indices = gene.iter().map(|&(_, i)| i).collect();
        let kinds = gene.iter().map(|&(k, _)| k).collect();
        Cell { reduction, preprocess0, preprocess1, ops, kinds, indices, concat: concat.clone() }
    }

    /// Number of states concatenated into the output.
    pub fn multiplier(&self) -> usize {
        self.concat.len()
    }

    /// Ops that drop path applies to (all but identities).
    pub fn drop_sites(&self) -> usize {
        self.ops.iter().filter(|o| !o.is_identity()).count()
    }

    /// Applies the cell; with `drop` = (p, masks, next row) drop path applies to every non-identity op in
    /// training, each taking the next row of the masks.
    /// `s0` and `s1` share their activation with the other cell (or the auxiliary head) that reads them, and when
    /// they share ([`EdgeInput::shares`]) the ops reading one state share its activation and pooling.
    ///
    /// With `batched`, each separable half (a sep or dil conv's depthwise and 1x1 convolutions) runs as one node
    /// that keeps no depthwise output, and the first halves of the ops reading one state as one
    /// ([`EdgeInput::batch`]); without, every convolution on its own.
    pub fn forward_t(
        &self,
        s0: &EdgeInput,
        s1: &EdgeInput,
        drop: Option<(f64, &Tensor, &mut i64)>,
        train: bool,
        batched: bool,
    ) -> Tensor {
        crate::ops::with_separate_halves(!batched, || self.forward_halves(s0, s1, drop, train, batched))
    }

    fn forward_halves(
        &self,
        s0: &EdgeInput,
        s1: &EdgeInput,
        mut drop: Option<(f64, &Tensor, &mut i64)>,
        train: bool,
        batched: bool,
    ) -> Tensor {
        use crate::profile::time;
        let (p0, p1) = (&self.preprocess0, &self.preprocess1);
        let share = s1.shares();
        let s0 = time("preprocess", None, 1, s0.full(), || p0.forward_activated(&s0.activated(p0.activation()), train));
        let s1 = time("preprocess", None, 1, s1.full(), || p1.forward_activated(&s1.activated(p1.act), train));
        // State i, and with batched convolutions the ops that will read it.
        let input = |x: &Tensor, i: usize| {
            let state = EdgeInput::plain(x, share);
            if batched {
                state.batch(self.ops.iter().zip(&self.indices).filter(|(_, &j)| j == i).map(|(op, _)| op));
            }
            state
        };
        let mut inputs = vec![input(&s0, 0), input(&s1, 1)];
        for i in 0..self.ops.len() / 2 {
            let mut sum: Option<Tensor> = None;
            for k in [2 * i, 2 * i + 1] {
                let (op, kind) = (&self.ops[k], self.kinds[k]);
                let input = &inputs[self.indices[k]];
                let stride = if self.reduction && self.indices[k] < 2 { 2 } else { 1 };
                let h = time(kind.name(), Some(kind), stride, input.full(), || input.apply(op, train));
                let mut scale = None;
                if let (true, false, Some((p, masks, row))) = (train, op.is_identity(), drop.as_mut()) {
                    scale = Some(drop_path_scale(&masks.get(**row), *p, h.kind()));
                    **row += 1;
                }
                // The node's sum with drop path's factor in the same pass (addcmul: s + h * scale).
                sum = Some(match (sum, scale) {
                    (None, None) => h,
                    (None, Some(f)) => h * f,
                    (Some(s), None) => s + h,
                    (Some(s), Some(f)) => s.addcmul(&h, &f),
                });
            }
            inputs.push(input(&sum.expect("two ops per node"), i + 2));
        }
        let out: Vec<&Tensor> = self.concat.iter().map(|&i| inputs[i].full()).collect();
        Tensor::cat(&out, 1)
    }
}

/// The auxiliary classifier at 2/3 depth (the original `AuxiliaryHeadCIFAR` for 8x8 maps, or
/// `AuxiliaryHeadImageNet` for 7x7 maps, which has no BN after its second convolution).
#[derive(Debug)]
pub struct AuxiliaryHead {
    conv1: Conv,
    bn1: Bn,
    conv2: Conv,
    bn2: Option<Bn>,
    classifier: nn::Linear,
    imagenet: bool,
}

fn linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    let b = 1.0 / (i as f64).sqrt();
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: nn::Init::Uniform { lo: -b, up: b },
            bs_init: Some(nn::Init::Uniform { lo: -b, up: b }),
            bias: true,
        },
    )
}

impl AuxiliaryHead {
    fn new(p: &nn::Path, c: i64, classes: i64, imagenet: bool) -> AuxiliaryHead {
        let f = p / "features";
        AuxiliaryHead {
            conv1: Conv::new(&(&f / "2"), c, 128, ConvSpec::square(1, 1, 0)),
            bn1: batch_norm(&(&f / "3"), 128, true),
            conv2: Conv::new(&(&f / "5"), 128, 768, ConvSpec::square(2, 1, 0)),
            bn2: (!imagenet).then(|| batch_norm(&(&f / "6"), 768, true)),
            classifier: linear(p / "classifier", 768, classes),
            imagenet,
        }
    }

    /// Logits from the 2/3-depth feature map. Pooling is 5x5 with stride 3 (CIFAR, on 8x8 maps) or 2
    /// (ImageNet, on 7x7 maps) as the original; on other sizes an adaptive pool to 2x2 keeps the head's shape.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_activated(&x.relu(), train)
    }

    /// [`AuxiliaryHead::forward_t`] from `relu(x)` already computed (shared with the next cells' preprocessing).
    pub fn forward_activated(&self, x: &Tensor, train: bool) -> Tensor {
        let (h, w) = (x.size()[2], x.size()[3]);
        let x = match (self.imagenet, h, w) {
            (false, 8, 8) => x.avg_pool2d([5, 5], [3, 3], [0, 0], false, false, None),
            (true, 7, 7) => x.avg_pool2d([5, 5], [2, 2], [0, 0], false, false, None),
            _ => x.adaptive_avg_pool2d([2, 2]),
        };
        let x = self.bn1.forward_t(&self.conv1.forward(&x), train).relu();
        let x = self.conv2.forward(&x);
        let x = match &self.bn2 {
            Some(bn) => bn.forward_t(&x, train),
            None => x,
        }
        .relu();
        x.flatten(1, -1).apply(&self.classifier)
    }
}

/// The network evaluated after search.
#[derive(Debug)]
pub struct Network {
    pub(crate) stem: NetStem,
    pub(crate) cells: Vec<Cell>,
    aux: Option<AuxiliaryHead>,
    aux_after: usize,
    pub(crate) classifier: nn::Linear,
    /// Drop-path probability applied in training (ramped by the trainer).
    pub drop_path_prob: f64,
    /// Feed the network channels-last activations (set with the kernels by `set_channels_last`).
    pub channels_last: bool,
    /// The readers of one state share its activation and pooling ([`EdgeInput`]; the default); off, every op
    /// computes from scratch as the original code (the reference of the tests).
    pub share_inputs: bool,
    /// Separable halves as one node each, the first halves of the ops reading one state as one
    /// ([`Cell::forward_t`]'s `batched`; the default, with shared inputs); off, every convolution on its own.
    pub batched_convs: bool,
    /// Run the auxiliary head in training mode (when it exists); off when its loss would weigh 0.
    pub auxiliary_in_training: bool,
}

impl Network {
    /// Builds the network for `genotype` under `p`.
    pub fn new(p: &nn::Path, genotype: &Genotype, cfg: &NetworkConfig, shape: &DataShape) -> Network {
        let c = cfg.channels as i64;
        let layers = cfg.layers;
        let (stem, c_stem, mut reduction_prev) = if cfg.imagenet {
            (NetStem::ImageNet(Box::new(ImageNetStem::new(p, shape.channels as i64, c))), c, true)
        } else {
            let c_stem = cfg.stem_multiplier as i64 * c;
            (NetStem::Cifar(Box::new(Stem::new(&(p / "stem"), shape.channels as i64, c_stem))), c_stem, false)
        };
        let (mut c_pp, mut c_p) = (c_stem, c_stem);
        let mut c_curr = c;
        let mut cells = Vec::new();
        let mut c_aux = c_p;
        let cells_path = p / "cells";
        for i in 0..layers {
            let reduction = i == layers / 3 || i == 2 * layers / 3;
            if reduction {
                c_curr *= 2;
            }
            let cell = Cell::new(&(&cells_path / i), genotype, c_pp, c_p, c_curr, reduction, reduction_prev);
            reduction_prev = reduction;
            (c_pp, c_p) = (c_p, cell.multiplier() as i64 * c_curr);
            cells.push(cell);
            if i == 2 * layers / 3 {
                c_aux = c_p;
            }
        }
        let aux = cfg
            .auxiliary
            .then(|| AuxiliaryHead::new(&(p / "auxiliary_head"), c_aux, shape.classes as i64, cfg.imagenet));
        let classifier = linear(p / "classifier", c_p, shape.classes as i64);
        Network {
            stem,
            cells,
            aux,
            aux_after: 2 * layers / 3,
            classifier,
            drop_path_prob: 0.0,
            channels_last: false,
            share_inputs: true,
            batched_convs: true,
            auxiliary_in_training: true,
        }
    }

    /// Features entering the classifier.
    pub fn classifier_in(&self) -> i64 {
        self.classifier.ws.size()[1]
    }

    /// Number of rows the drop-path masks of one step need.
    pub fn drop_sites(&self) -> usize {
        self.cells.iter().map(Cell::drop_sites).sum()
    }

    /// (logits, auxiliary logits in training when the head exists and [`Network::auxiliary_in_training`]), without
    /// drop path.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> (Tensor, Option<Tensor>) {
        self.forward_masked(x, train, None)
    }

    /// As `forward_t`, with drop path at probability `drop_path_prob` using `masks` (`[drop_sites, n]`, from
    /// [`drop_path_masks`]) when training.
    pub fn forward_masked(&self, x: &Tensor, train: bool, masks: Option<&Tensor>) -> (Tensor, Option<Tensor>) {
        let x = if self.channels_last { crate::channels_last(x) } else { x.shallow_clone() };
        // CIFAR: both inputs of the first cell are the stem's output (None: the same as s1).
        let (s0, s1) = match &self.stem {
            NetStem::Cifar(stem) => (None, crate::profile::time("stem", None, 1, &x, || stem.forward_t(&x, train))),
            NetStem::ImageNet(stem) => {
                let mut s0 = None;
                let s1 = crate::profile::time("stem", None, 1, &x, || {
                    let (a, b) = stem.forward_t(&x, train);
                    s0 = Some(a);
                    b
                });
                (Some(s0.expect("the stem ran")), s1)
            }
        };
        // From a one-channel image (grayscale data) libtorch's convolution returns NCHW (a one-channel tensor is
        // both layouts, and it picks NCHW), which would run the whole network NCHW.
        let layout = |t: Tensor| if self.channels_last { crate::channels_last(&t) } else { t };
        let (s0, s1) = (s0.map(layout), layout(s1));
        let mut aux = None;
        let mut row = 0i64;
        let p = self.drop_path_prob;
        let share = self.share_inputs;
        let mut s1 = Rc::new(EdgeInput::plain(&s1, share));
        let mut s0 = match s0 {
            Some(s0) => Rc::new(EdgeInput::plain(&s0, share)),
            None => Rc::clone(&s1),
        };
        for (i, cell) in self.cells.iter().enumerate() {
            let drop = masks.filter(|_| p > 0.0).map(|m| (p, m, &mut row));
            let out = cell.forward_t(&s0, &s1, drop, train, self.batched_convs && share);
            (s0, s1) = (s1, Rc::new(EdgeInput::plain(&out, share)));
            if i == self.aux_after && train && self.auxiliary_in_training {
                aux = self.aux.as_ref().map(|h| {
                    crate::profile::time("auxiliary_head", None, 1, &out, || {
                        h.forward_activated(&s1.activated(Activation::Relu), train)
                    })
                });
            }
        }
        let s1 = s1.full();
        let logits = crate::profile::time("classifier", None, 1, s1, || {
            s1.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.classifier)
        });
        (logits, aux)
    }
}

impl Network {
    /// Folds every BatchNorm that follows a convolution into it (stem, preprocessing, the cells' ops; the
    /// auxiliary head, unused in evaluation, stays): evaluation-mode outputs equal to float rounding, fewer
    /// kernels. For inference only: the weights change and the network no longer trains as before, nor exports.
    pub fn fold_batch_norm(&mut self) {
        match &mut self.stem {
            NetStem::Cifar(stem) => stem.fold_batch_norm(),
            NetStem::ImageNet(stem) => {
                let s = &mut **stem;
                fold_batch_norm(&mut [&mut s.conv0a], &mut s.bn0a);
                fold_batch_norm(&mut [&mut s.conv0b], &mut s.bn0b);
                fold_batch_norm(&mut [&mut s.conv1], &mut s.bn1);
            }
        }
        for cell in &mut self.cells {
            cell.preprocess0.fold_batch_norm();
            cell.preprocess1.fold_batch_norm();
            for op in &mut cell.ops {
                op.fold_batch_norm();
            }
        }
    }
}

/// Switches the network's kernels (in `vs`) and activations to channels-last (`on`) or contiguous NCHW.
pub fn set_channels_last(net: &mut Network, vs: &nn::VarStore, on: bool) {
    net.channels_last = on;
    crate::set_vars_channels_last(vs, on);
}

/// Parameters of a VarStore excluding the auxiliary head (as the original `count_parameters_in_MB`).
pub fn count_parameters_without_auxiliary(vs: &nn::VarStore) -> i64 {
    vs.variables()
        .iter()
        .filter(|(name, t)| t.requires_grad() && !name.contains("auxiliary"))
        .map(|(_, t)| t.numel() as i64)
        .sum()
}

/// Size and cost of a final network.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NetworkCost {
    /// Trainable parameters, auxiliary head excluded (the number papers quote).
    pub parameters: i64,
    /// Trainable parameters with the auxiliary head.
    pub parameters_with_auxiliary: i64,
    /// Multiply-accumulates per image: convolutions plus the classifier.
    pub macs: u64,
    /// Input channels, height, width.
    pub input: [usize; 3],
    /// Classes.
    pub classes: usize,
}

/// Counts `net`'s parameters and its multiply-accumulates on one `shape` image (an inference pass).
pub fn network_cost(net: &Network, vs: &nn::VarStore, shape: &DataShape) -> NetworkCost {
    let total: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    let x =
        Tensor::zeros([1, shape.channels as i64, shape.height as i64, shape.width as i64], (Kind::Float, vs.device()));
    let conv = crate::ops::count_conv_macs(|| {
        let _ = tch::no_grad(|| net.forward_t(&x, false));
    });
    NetworkCost {
        parameters: count_parameters_without_auxiliary(vs),
        parameters_with_auxiliary: total,
        macs: conv + net.classifier_in() as u64 * shape.classes as u64,
        input: [shape.channels, shape.height, shape.width],
        classes: shape.classes,
    }
}

/// Mean cross-entropy (with `label_smoothing`) plus `aux_weight` times the auxiliary head's.
pub fn loss_with_auxiliary(
    logits: &Tensor,
    aux: Option<&Tensor>,
    y: &Tensor,
    aux_weight: f64,
    label_smoothing: f64,
) -> Tensor {
    let ce = |l: &Tensor| l.cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, label_smoothing);
    let main = ce(logits);
    match aux {
        Some(a) => main + ce(a) * aux_weight,
        None => main,
    }
}

/// Fraction of examples whose logits rank the label first.
pub fn accuracy(logits: &Tensor, y: &Tensor) -> f64 {
    logits.argmax(-1, false).eq_tensor(y).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

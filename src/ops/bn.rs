//! BatchNorm as PyTorch's `nn.BatchNorm2d`: darts' own training-mode kernel (with the ReLU that follows it where
//! one does), libtorch's elsewhere, and its folding into the convolution before it for inference.

use super::Conv;
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// Batch normalisation as PyTorch's `nn.BatchNorm2d(c, affine=affine)`.
pub fn batch_norm(p: &nn::Path, c: i64, affine: bool) -> Bn {
    let bn = nn::batch_norm2d(
        p,
        c,
        nn::BatchNormConfig {
            affine,
            ws_init: nn::Init::Const(1.0),
            bs_init: nn::Init::Const(0.0),
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
            ..Default::default()
        },
    );
    Bn { bn, folded: false }
}

/// BatchNorm's epsilon in every darts network (PyTorch's default).
pub const BN_EPS: f64 = 1e-5;

/// BatchNorm's running-statistics momentum in every darts network (PyTorch's default).
pub const BN_MOMENTUM: f64 = 0.1;

/// The signature of the shim's training-mode BNs ([`crate::native::batch_norm`], [`crate::native::batch_norm_relu`]).
type BnKernel = fn(&Tensor, Option<&Tensor>, Option<&Tensor>, &Tensor, &Tensor, f64, f64) -> Tensor;

/// A BatchNorm (tch's, whose fields it derefs to) that inference may fold into the convolution before it: then it
/// is the identity, and the convolution carries its scale and shift.
#[derive(Debug)]
pub struct Bn {
    bn: nn::BatchNorm,
    folded: bool,
}

impl std::ops::Deref for Bn {
    type Target = nn::BatchNorm;
    fn deref(&self) -> &nn::BatchNorm {
        &self.bn
    }
}

impl Bn {
    /// Applies it (the identity once folded). Training mode on 4-d inputs goes through the shim's fused
    /// kernel ([`crate::native::batch_norm`]: same maths, ATen's where it does not apply).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        if self.folded {
            x.shallow_clone()
        } else if train && x.dim() == 4 {
            self.fused(x, crate::native::batch_norm)
        } else {
            self.bn.forward_t(x, train)
        }
    }

    /// `relu(self.forward_t(x, train))`, the ReLU fused into the BN's kernel in training mode on 4-d inputs
    /// ([`crate::native::batch_norm_relu`]).
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Tensor {
        if !self.folded && train && x.dim() == 4 {
            self.fused(x, crate::native::batch_norm_relu)
        } else {
            self.forward_t(x, train).relu()
        }
    }

    /// `kernel` (one of the shim's training-mode BNs) with this BN's parameters and running statistics.
    fn fused(&self, x: &Tensor, kernel: BnKernel) -> Tensor {
        let bn = &self.bn;
        kernel(x, bn.ws.as_ref(), bn.bs.as_ref(), &bn.running_mean, &bn.running_var, BN_MOMENTUM, BN_EPS)
    }

    /// Whether it was folded into a convolution.
    pub fn is_folded(&self) -> bool {
        self.folded
    }

    /// The evaluation-mode BN as `y = scale * x + shift` per channel, computed in double precision (so that
    /// folded weights round once); float64 tensors on the BN's device.
    pub fn scale_shift(&self) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let f64 = |t: &Tensor| t.to_kind(tch::Kind::Double);
            let scale = (f64(&self.bn.running_var) + BN_EPS).rsqrt();
            let scale = match &self.bn.ws {
                Some(w) => f64(w) * scale,
                None => scale,
            };
            let shift = -f64(&self.bn.running_mean) * &scale;
            let shift = match &self.bn.bs {
                Some(b) => shift + f64(b),
                None => shift,
            };
            (scale, shift)
        })
    }
}

/// Folds `bn` (evaluation mode: its running statistics) into the convolutions whose concatenated outputs it
/// normalises: each kernel scaled per output channel, the shift as a bias; `bn` becomes the identity. For
/// inference only: the network no longer trains as before.
pub fn fold_batch_norm(convs: &mut [&mut Conv], bn: &mut Bn) {
    if bn.folded {
        return;
    }
    let (scale, shift) = bn.scale_shift();
    let mut offset = 0;
    tch::no_grad(|| {
        for conv in convs.iter_mut() {
            let c = conv.weight.size()[0];
            let s = scale.narrow(0, offset, c).to_kind(conv.weight.kind());
            let scaled = &conv.weight * s.view([-1, 1, 1, 1]);
            conv.weight.copy_(&scaled);
            let b = shift.narrow(0, offset, c).to_kind(conv.weight.kind());
            conv.bias = Some(match conv.bias.take() {
                Some(old) => old * &s + b,
                None => b,
            });
            offset += c;
        }
    });
    bn.folded = true;
}

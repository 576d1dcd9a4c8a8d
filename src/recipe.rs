//! The published final-training recipes as data: every hyper-parameter with which the papers trained their
//! cells from scratch, checked against their authors' scripts (named on each recipe).

use crate::network::NetworkConfig;
use crate::optim::LrSchedule;
use serde::{Deserialize, Serialize};

/// Every hyper-parameter of a recipe (`TrainConfig::from_recipe` adds the genotype, data and seed).
#[derive(Clone, Debug, PartialEq)]
pub struct Hyper {
    /// The final network's shape.
    pub network: NetworkConfig,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// The cosine schedule's final rate.
    pub lr_min: f64,
    /// The schedule.
    pub lr_schedule: LrSchedule,
    /// Epochs of linear warm-up.
    pub warmup_epochs: usize,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Gradient norm clip.
    pub grad_clip: f64,
    /// Weight of the auxiliary head's loss.
    pub aux_weight: f64,
    /// Drop-path probability reached at the last epoch.
    pub drop_path: f64,
    /// Cutout side in pixels (0: none).
    pub cutout: i64,
    /// Label smoothing.
    pub label_smoothing: f64,
}

/// A published final-training recipe; `darts train --recipe NAME`, recorded in `train-config.json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    /// DARTS on CIFAR-10 (quark0/darts `cnn/train.py` with `--auxiliary --cutout`): C=36, 20 cells, 600
    /// epochs, batch 96, SGD lr 0.025 cosine to 0, momentum 0.9, weight decay 3e-4, clip 5, auxiliary 0.4,
    /// drop path 0.2, cutout 16.
    #[default]
    DartsCifar,
    /// DARTS on ImageNet (quark0/darts `cnn/train_imagenet.py` with `--auxiliary`, the paper's 250 epochs and
    /// C=48): 14 cells, batch 128, SGD lr 0.1 times 0.97 every epoch (StepLR), momentum 0.9, weight decay 3e-5,
    /// clip 5, label smoothing 0.1, auxiliary 0.4, no drop path, no cutout.
    DartsImagenet,
    /// PC-DARTS on ImageNet as its paper trains (yuhuixu1993/PC-DARTS `train_imagenet.py` with `--auxiliary
    /// --batch_size 1024 --learning_rate 0.5`): C=48, 14 cells, 250 epochs, linear decay (`adjust_lr`) after a
    /// 5-epoch linear warm-up (the script warms up above batch 256), weight decay 3e-5, clip 5, label smoothing
    /// 0.1, auxiliary 0.4, no drop path, no cutout.
    PcDartsImagenet,
}

impl Recipe {
    /// The recipe's name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Recipe::DartsCifar => "darts-cifar",
            Recipe::DartsImagenet => "darts-imagenet",
            Recipe::PcDartsImagenet => "pc-darts-imagenet",
        }
    }

    /// Whether the recipe trains the ImageNet network (two-stage stride-2 stem, ImageNet auxiliary head).
    pub fn imagenet(self) -> bool {
        self != Recipe::DartsCifar
    }

    /// The recipe's hyper-parameters.
    pub fn hyper(self) -> Hyper {
        let cifar = Hyper {
            network: NetworkConfig::default(),
            epochs: 600,
            batch_size: 96,
            lr: 0.025,
            lr_min: 0.0,
            lr_schedule: LrSchedule::Cosine,
            warmup_epochs: 0,
            momentum: 0.9,
            weight_decay: 3e-4,
            grad_clip: 5.0,
            aux_weight: 0.4,
            drop_path: 0.2,
            cutout: 16,
            label_smoothing: 0.0,
        };
        let imagenet = Hyper {
            network: NetworkConfig::imagenet(),
            epochs: 250,
            batch_size: 128,
            lr: 0.1,
            lr_schedule: LrSchedule::Step { gamma: 0.97, period: 1 },
            weight_decay: 3e-5,
            drop_path: 0.0,
            cutout: 0,
            label_smoothing: 0.1,
            ..cifar.clone()
        };
        match self {
            Recipe::DartsCifar => cifar,
            Recipe::DartsImagenet => imagenet,
            Recipe::PcDartsImagenet => Hyper {
                batch_size: 1024,
                lr: 0.5,
                lr_schedule: LrSchedule::PcDartsLinear,
                warmup_epochs: 5,
                ..imagenet
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each value against the authors' scripts, read off them (not off our constructors).
    #[test]
    fn recipes_hold_the_published_hyper_parameters() {
        let c = Recipe::DartsCifar.hyper();
        assert_eq!((c.epochs, c.batch_size, c.lr, c.lr_min, c.weight_decay), (600, 96, 0.025, 0.0, 3e-4));
        assert_eq!((c.drop_path, c.cutout, c.aux_weight, c.grad_clip, c.label_smoothing), (0.2, 16, 0.4, 5.0, 0.0));
        assert_eq!((c.network.channels, c.network.layers, c.network.imagenet), (36, 20, false));
        assert_eq!((c.lr_schedule, c.momentum, c.warmup_epochs), (LrSchedule::Cosine, 0.9, 0));
        let i = Recipe::DartsImagenet.hyper();
        assert_eq!((i.epochs, i.batch_size, i.lr, i.momentum, i.weight_decay), (250, 128, 0.1, 0.9, 3e-5));
        assert_eq!(i.lr_schedule, LrSchedule::Step { gamma: 0.97, period: 1 });
        assert_eq!((i.drop_path, i.cutout, i.aux_weight, i.grad_clip, i.label_smoothing), (0.0, 0, 0.4, 5.0, 0.1));
        assert_eq!(
            (i.network.channels, i.network.layers, i.network.imagenet, i.network.auxiliary),
            (48, 14, true, true)
        );
        assert_eq!(i.warmup_epochs, 0);
        let p = Recipe::PcDartsImagenet.hyper();
        assert_eq!((p.epochs, p.batch_size, p.lr, p.weight_decay, p.warmup_epochs), (250, 1024, 0.5, 3e-5, 5));
        assert_eq!((p.lr_schedule, p.label_smoothing, p.drop_path), (LrSchedule::PcDartsLinear, 0.1, 0.0));
        assert!(p.network.imagenet && Recipe::PcDartsImagenet.imagenet() && !Recipe::DartsCifar.imagenet());
        for r in [Recipe::DartsCifar, Recipe::DartsImagenet, Recipe::PcDartsImagenet] {
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{}\"", r.name()));
        }
    }
}

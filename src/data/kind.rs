//! The datasets darts reads: their names, where their files come from, shapes, normalisation and class names.

use super::Augment;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The datasets darts reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// A 6,000-image Fashion-MNIST subset shipped inside darts (no download).
    Builtin,
    /// Fashion-MNIST (IDX files; Debian's dataset-fashion-mnist is found without being told).
    FashionMnist,
    /// MNIST (IDX files).
    Mnist,
    /// Kuzushiji-MNIST (IDX files, same layout as MNIST).
    Kmnist,
    /// CIFAR-10 (binary version).
    Cifar10,
    /// CIFAR-100 (binary version, fine labels).
    Cifar100,
    /// SVHN, cropped digits (`train_32x32.mat`, `test_32x32.mat`; the digit 0 is label 0).
    Svhn,
    /// An image folder (`--data-dir`): one sub-folder of PNG/JPEG images per class, resized to a square size.
    Folder,
}

impl DatasetKind {
    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Builtin => "builtin",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Mnist => "mnist",
            DatasetKind::Kmnist => "kmnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Svhn => "svhn",
            DatasetKind::Folder => "folder",
        }
    }

    pub(super) fn classes(self) -> usize {
        if self == DatasetKind::Cifar100 {
            100
        } else {
            10
        }
    }

    /// The class names by label, where the dataset defines them (image folders name theirs by folder).
    pub fn class_names(self) -> Option<&'static [&'static str]> {
        const FASHION: [&str; 10] =
            ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
        const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
        // Kuzushiji-MNIST's ten hiragana (its classmap.csv).
        const KMNIST: [&str; 10] = ["お", "き", "す", "つ", "な", "は", "ま", "や", "れ", "を"];
        const CIFAR10: [&str; 10] =
            ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
        match self {
            DatasetKind::Builtin | DatasetKind::FashionMnist => Some(&FASHION),
            DatasetKind::Mnist | DatasetKind::Svhn => Some(&DIGITS),
            DatasetKind::Kmnist => Some(&KMNIST),
            DatasetKind::Cifar10 => Some(&CIFAR10),
            DatasetKind::Cifar100 => Some(&CIFAR100_FINE),
            DatasetKind::Folder => None,
        }
    }

    /// Per-channel mean and std used for normalisation (the usual published values).
    pub fn mean_std(self) -> (Vec<f64>, Vec<f64>) {
        match self {
            DatasetKind::Builtin | DatasetKind::FashionMnist => (vec![0.2860], vec![0.3530]),
            DatasetKind::Mnist => (vec![0.1307], vec![0.3081]),
            DatasetKind::Kmnist => (vec![0.1918], vec![0.3483]),
            // Computed from the training images when the folder is loaded.
            DatasetKind::Folder => (vec![0.5], vec![0.25]),
            DatasetKind::Cifar10 => (vec![0.4914, 0.4822, 0.4465], vec![0.2470, 0.2435, 0.2616]),
            DatasetKind::Cifar100 => (vec![0.5071, 0.4865, 0.4409], vec![0.2673, 0.2564, 0.2762]),
            DatasetKind::Svhn => (vec![0.4377, 0.4438, 0.4728], vec![0.1980, 0.2010, 0.1970]),
        }
    }

    /// The training-time augmentation the original code uses for this kind of data.
    pub fn default_augment(self) -> Augment {
        match self {
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => Augment { crop_padding: 4, flip: true, cutout: 0 },
            DatasetKind::Builtin | DatasetKind::FashionMnist => Augment { crop_padding: 2, flip: true, cutout: 0 },
            DatasetKind::Mnist | DatasetKind::Kmnist => Augment { crop_padding: 2, flip: false, cutout: 0 },
            // Digits: a mirrored 2 or 5 is not the same digit.
            DatasetKind::Svhn => Augment { crop_padding: 4, flip: false, cutout: 0 },
            DatasetKind::Folder => Augment { crop_padding: 4, flip: true, cutout: 0 },
        }
    }

    /// The folder name the dataset's files live in under a data directory (for CIFAR, its archive's folder).
    pub fn folder_name(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => "cifar-10-batches-bin",
            DatasetKind::Cifar100 => "cifar-100-binary",
            other => other.name(),
        }
    }

    pub(super) fn default_dirs(self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if matches!(self, DatasetKind::Builtin | DatasetKind::Folder) {
            return dirs;
        }
        let sub = self.folder_name();
        if let Some(d) = std::env::var_os("DARTS_DATA") {
            dirs.push(PathBuf::from(d).join(sub));
        }
        if let Some(h) = std::env::var_os("HOME") {
            dirs.push(PathBuf::from(h).join(".cache/darts/data").join(sub));
        }
        dirs.push(PathBuf::from("/usr/share/datasets").join(sub));
        dirs
    }
}

/// CIFAR-100's fine labels in label order (its `fine_label_names.txt`: alphabetical).
const CIFAR100_FINE: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

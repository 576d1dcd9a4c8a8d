//! Datasets: loading (IDX, CIFAR binary, the built-in Fashion-MNIST subset), the disjoint search split,
//! seeded augmentation and batching.

pub mod download;
mod error;
pub mod folder;
pub mod formats;
mod kind;
pub mod prefetch;

use crate::space::DataShape;
pub use error::DataError;
use formats::Raw;
pub use kind::DatasetKind;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Random crop with zero padding, horizontal flip and cutout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augment {
    /// Pixels of zero padding before a random crop back to the original size (0 = no crop).
    pub crop_padding: i64,
    /// Random horizontal flip with probability 1/2.
    pub flip: bool,
    /// Side of the square cutout (zeroed after normalisation, centre anywhere in the image); 0 = none.
    #[serde(default)]
    pub cutout: i64,
}

/// Images (uint8, `[n, c, h, w]`, on the CPU) with labels and normalisation constants.
#[derive(Debug)]
pub struct Dataset {
    /// Which dataset.
    pub kind: DatasetKind,
    /// Pixels.
    pub images: Tensor,
    /// Labels, int64 `[n]`.
    pub labels: Tensor,
    /// Channels, size and classes.
    pub shape: DataShape,
    /// Per-channel mean.
    pub mean: Vec<f64>,
    /// Per-channel std.
    pub std: Vec<f64>,
}

impl Dataset {
    fn from_raw(kind: DatasetKind, raw: Raw) -> Result<Dataset, DataError> {
        let n = raw.len() as i64;
        if n == 0 {
            return Err(DataError::NotFound(format!("the {} data holds no images", kind.name())));
        }
        let (c, h, w) = (raw.channels as i64, raw.height as i64, raw.width as i64);
        let images = Tensor::from_slice(&raw.images).reshape([n, c, h, w]);
        let labels = Tensor::from_slice(&raw.labels).to_kind(Kind::Int64);
        let (mean, std) = kind.mean_std();
        let shape = DataShape { channels: raw.channels, height: raw.height, width: raw.width, classes: kind.classes() };
        Ok(Dataset { kind, images, labels, shape, mean, std })
    }

    /// Another handle on the same images and labels (no copy), e.g. for a loader thread.
    pub fn shallow_clone(&self) -> Dataset {
        Dataset {
            kind: self.kind,
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            shape: self.shape,
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }

    /// Keeps only the first `n` examples (all when `n` is None or larger than the set).
    pub fn truncated(mut self, n: Option<usize>) -> Dataset {
        if let Some(n) = n {
            let n = n.min(self.len()) as i64;
            self.images = self.images.narrow(0, 0, n);
            self.labels = self.labels.narrow(0, 0, n);
        }
        self
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `idx` as a normalised float batch on `device`, augmented when `augment` is given.
    pub fn batch(
        &self,
        idx: &[usize],
        augment: Option<(&Augment, &mut ChaCha8Rng)>,
        device: Device,
    ) -> (Tensor, Tensor) {
        let ix: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
        let ix = Tensor::from_slice(&ix);
        let mut x = self.images.index_select(0, &ix);
        let mut mask = None;
        if let Some((aug, rng)) = augment {
            x = augment_batch(&x, aug, rng);
            if aug.cutout > 0 {
                mask = Some(
                    cutout_mask(idx.len(), self.shape.height, self.shape.width, aug.cutout, rng).to_device(device),
                );
            }
        }
        let y = self.labels.index_select(0, &ix).to_device(device);
        let c = self.shape.channels as i64;
        let mean = Tensor::from_slice(&self.mean).to_kind(Kind::Float).reshape([1, c, 1, 1]).to_device(device);
        let std = Tensor::from_slice(&self.std).to_kind(Kind::Float).reshape([1, c, 1, 1]).to_device(device);
        let x = (x.to_device(device).to_kind(Kind::Float) / 255.0 - mean) / std;
        match mask {
            Some(m) => (x * m, y),
            None => (x, y),
        }
    }
}

/// Cutout masks `[n, 1, h, w]` (the original `Cutout`): 1 everywhere except a `len` x `len` square of zeros,
/// clipped at the border, centred on a uniformly drawn pixel.
pub fn cutout_mask(n: usize, h: usize, w: usize, len: i64, rng: &mut ChaCha8Rng) -> Tensor {
    let mut m = vec![1f32; n * h * w];
    let (hh, ww) = (h as i64, w as i64);
    for i in 0..n {
        let (cy, cx) = (rng.random_range(0..hh), rng.random_range(0..ww));
        let (y1, y2) = ((cy - len / 2).clamp(0, hh), (cy + len / 2).clamp(0, hh));
        let (x1, x2) = ((cx - len / 2).clamp(0, ww), (cx + len / 2).clamp(0, ww));
        for y in y1..y2 {
            for x in x1..x2 {
                m[i * h * w + y as usize * w + x as usize] = 0.0;
            }
        }
    }
    Tensor::from_slice(&m).reshape([n as i64, 1, hh, ww])
}

/// Random crop (zero padding) and flip of a uint8 batch, one draw per image from `rng`.
pub fn augment_batch(x: &Tensor, aug: &Augment, rng: &mut ChaCha8Rng) -> Tensor {
    let (n, h, w) = (x.size()[0], x.size()[2], x.size()[3]);
    let p = aug.crop_padding;
    let padded = if p > 0 { x.constant_pad_nd([p, p, p, p]) } else { x.shallow_clone() };
    let images: Vec<Tensor> = (0..n)
        .map(|i| {
            let (dy, dx) = if p > 0 { (rng.random_range(0..=2 * p), rng.random_range(0..=2 * p)) } else { (0, 0) };
            let img = padded.get(i).narrow(1, dy, h).narrow(2, dx, w);
            if aug.flip && rng.random_bool(0.5) {
                img.flip([2])
            } else {
                img
            }
        })
        .collect();
    Tensor::stack(&images, 0)
}

fn find_dir(kind: DatasetKind, dir: Option<&Path>, probe: &str) -> Result<PathBuf, DataError> {
    if let Some(d) = dir {
        if !d.is_dir() {
            return Err(DataError::NotFound(format!("data directory {} does not exist", d.display())));
        }
        return Ok(d.to_path_buf());
    }
    let candidates = kind.default_dirs();
    for d in &candidates {
        if d.join(probe).is_file() || d.join(format!("{probe}.gz")).is_file() {
            return Ok(d.clone());
        }
    }
    let hint = match kind {
        DatasetKind::FashionMnist => " (on Debian: apt-get install dataset-fashion-mnist)",
        _ => "",
    };
    Err(DataError::NotFound(format!(
        "no {} data found; looked in {}. Pass --data-dir DIR holding {probe}[.gz]{hint}, or use --dataset builtin",
        kind.name(),
        candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )))
}

/// [`find_dir`]; when the data is not on the machine and no folder was given, downloads it (checksummed) into the
/// cache the loader looks in.
fn find_or_fetch(kind: DatasetKind, dir: Option<&Path>, probe: &str) -> Result<PathBuf, DataError> {
    match (find_dir(kind, dir, probe), download::source(kind)) {
        (Ok(d), _) => Ok(d),
        (Err(_), Some(src)) if dir.is_none() => {
            let to = download::default_dir(kind);
            eprintln!("{} is not on this machine: downloading it into {}", kind.name(), to.display());
            download::fetch(kind.name(), &src, &to, true).map_err(|e| DataError::NotFound(format!("{e:#}")))
        }
        (Err(e), _) => Err(e),
    }
}

fn load_idx(kind: DatasetKind, dir: &Path, prefix: &str) -> Result<Raw, DataError> {
    let (images, iname) = formats::read_maybe_gz(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let (labels, lname) = formats::read_maybe_gz(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    formats::idx_pair(images, labels, (&iname, &lname), kind.classes())
}

fn load_cifar(kind: DatasetKind, dir: &Path, train: bool) -> Result<Raw, DataError> {
    let files: Vec<String> = match (kind, train) {
        (DatasetKind::Cifar10, true) => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        (DatasetKind::Cifar10, false) => vec!["test_batch.bin".into()],
        (_, true) => vec!["train.bin".into()],
        (_, false) => vec!["test.bin".into()],
    };
    let label_bytes = if kind == DatasetKind::Cifar100 { 2 } else { 1 };
    let mut all: Option<Raw> = None;
    for f in files {
        let path = dir.join(&f);
        if !path.is_file() {
            return Err(DataError::Missing { file: path.display().to_string() });
        }
        let bytes = std::fs::read(&path)
            .map_err(|e| DataError::Io { file: path.display().to_string(), error: e.to_string() })?;
        let raw = formats::parse_cifar(&bytes, label_bytes, kind.classes(), &path.display().to_string())?;
        all = Some(match all {
            None => raw,
            Some(mut a) => {
                a.images.extend(raw.images);
                a.labels.extend(raw.labels);
                a
            }
        });
    }
    Ok(all.expect("at least one file"))
}

/// Loads the training (`train = true`) or test split of `kind`, from `dir` or the default places.
pub fn load(kind: DatasetKind, dir: Option<&Path>, train: bool) -> Result<Dataset, DataError> {
    load_with(kind, dir, train, None)
}

/// [`load`], with the square size image folders are resized to (default [`folder::DEFAULT_SIZE`]; other
/// datasets keep their own size).
pub fn load_with(
    kind: DatasetKind,
    dir: Option<&Path>,
    train: bool,
    image_size: Option<usize>,
) -> Result<Dataset, DataError> {
    let prefix = if train { "train" } else { "t10k" };
    let raw = match kind {
        DatasetKind::Builtin => {
            let (i, l): (&[u8], &[u8]) = if train {
                (
                    include_bytes!("../../data/fashion-mnist-subset/train-images-idx3-ubyte.gz"),
                    include_bytes!("../../data/fashion-mnist-subset/train-labels-idx1-ubyte.gz"),
                )
            } else {
                (
                    include_bytes!("../../data/fashion-mnist-subset/t10k-images-idx3-ubyte.gz"),
                    include_bytes!("../../data/fashion-mnist-subset/t10k-labels-idx1-ubyte.gz"),
                )
            };
            formats::idx_pair(i.to_vec(), l.to_vec(), ("builtin images", "builtin labels"), 10)?
        }
        DatasetKind::FashionMnist | DatasetKind::Mnist | DatasetKind::Kmnist => {
            let d = find_or_fetch(kind, dir, "train-images-idx3-ubyte")?;
            load_idx(kind, &d, prefix)?
        }
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            let probe = if kind == DatasetKind::Cifar10 { "data_batch_1.bin" } else { "train.bin" };
            let d = find_or_fetch(kind, dir, probe)?;
            load_cifar(kind, &d, train)?
        }
        DatasetKind::Svhn => {
            let d = find_or_fetch(kind, dir, "train_32x32.mat")?;
            let path = d.join(if train { "train_32x32.mat" } else { "test_32x32.mat" });
            if !path.is_file() {
                return Err(DataError::Missing { file: path.display().to_string() });
            }
            let bytes = std::fs::read(&path)
                .map_err(|e| DataError::Io { file: path.display().to_string(), error: e.to_string() })?;
            formats::parse_svhn(&bytes, &path.display().to_string())?
        }
        DatasetKind::Folder => {
            let d = dir.ok_or_else(|| {
                DataError::NotFound(
                    "the folder dataset needs --data-dir DIR: one sub-folder of PNG/JPEG images per class (and \
                     optionally train/ and test/ above them)"
                        .into(),
                )
            })?;
            return folder::load(d, train, image_size.unwrap_or(folder::DEFAULT_SIZE));
        }
    };
    Dataset::from_raw(kind, raw)
}

/// The search split: two disjoint index sets, weights learn on `train`, alpha on `val`.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Indices for the weight step.
    pub train: Vec<usize>,
    /// Indices for the alpha step.
    pub val: Vec<usize>,
}

impl Split {
    /// Shuffles `0..n` with `seed` and cuts it at `portion * n`.
    pub fn new(n: usize, portion: f64, seed: u64) -> Result<Split, String> {
        if !(portion > 0.0 && portion < 1.0) {
            return Err(format!("train_portion = {portion}: it must lie strictly between 0 and 1"));
        }
        let cut = (portion * n as f64).floor() as usize;
        if cut == 0 || cut == n {
            return Err(format!("a train_portion of {portion} leaves one side of the split of {n} examples empty"));
        }
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed ^ 0x5eed_5b1d));
        let val = idx.split_off(cut);
        let split = Split { train: idx, val };
        split.check_disjoint(n)?;
        Ok(split)
    }

    /// A class-balanced split: each class's examples (by `labels`) are shuffled with `seed` and cut at
    /// `portion` of that class, so both halves keep the class proportions (to within one example per class).
    pub fn balanced(labels: &[i64], portion: f64, seed: u64) -> Result<Split, String> {
        if !(portion > 0.0 && portion < 1.0) {
            return Err(format!("train_portion = {portion}: it must lie strictly between 0 and 1"));
        }
        let mut by_class: std::collections::BTreeMap<i64, Vec<usize>> = std::collections::BTreeMap::new();
        for (i, &l) in labels.iter().enumerate() {
            by_class.entry(l).or_default().push(i);
        }
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed ^ 0xba1a_2ced);
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for idx in by_class.values_mut() {
            idx.shuffle(&mut rng);
            let cut = (portion * idx.len() as f64).round() as usize;
            val.extend_from_slice(&idx[cut..]);
            train.extend_from_slice(&idx[..cut]);
        }
        if train.is_empty() || val.is_empty() {
            return Err(format!(
                "a train_portion of {portion} leaves one side of the split of {} examples empty",
                labels.len()
            ));
        }
        train.shuffle(&mut rng);
        val.shuffle(&mut rng);
        let split = Split { train, val };
        split.check_disjoint(labels.len())?;
        Ok(split)
    }

    /// Verifies that no example is in both halves and every index is below `n`.
    pub fn check_disjoint(&self, n: usize) -> Result<(), String> {
        let mut seen = vec![0u8; n];
        for (side, set) in [(1u8, &self.train), (2u8, &self.val)] {
            for &i in set {
                if i >= n {
                    return Err(format!("index {i} is outside the dataset of {n} examples"));
                }
                if seen[i] != 0 {
                    return Err(format!("example {i} is in both the weight split and the alpha split"));
                }
                seen[i] = side;
            }
        }
        Ok(())
    }
}

/// Batches of `size` from `indices` in an order shuffled by `rng` (the last batch may be smaller).
pub fn shuffled_batches(indices: &[usize], size: usize, rng: &mut impl Rng) -> Vec<Vec<usize>> {
    let mut idx = indices.to_vec();
    idx.shuffle(rng);
    idx.chunks(size.max(1)).map(|c| c.to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn class_names_cover_every_label() {
        for kind in [DatasetKind::Builtin, DatasetKind::Mnist, DatasetKind::Kmnist, DatasetKind::Cifar10] {
            assert_eq!(kind.class_names().unwrap().len(), kind.classes(), "{}", kind.name());
        }
        // CIFAR-100's fine_label_names.txt is in alphabetical order, 100 distinct names.
        let fine = DatasetKind::Cifar100.class_names().unwrap();
        assert_eq!(fine.len(), 100);
        assert!(fine.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        assert_eq!((fine[0], fine[19], fine[99]), ("apple", "cattle", "worm"));
        assert!(DatasetKind::Folder.class_names().is_none());
    }

    #[test]
    fn builtin_subset_loads_with_balanced_classes() {
        let d = load(DatasetKind::Builtin, None, true).unwrap();
        assert_eq!(d.len(), 6000);
        assert_eq!(d.shape, DataShape { channels: 1, height: 28, width: 28, classes: 10 });
        let counts = d.labels.bincount::<Tensor>(None, 10);
        for c in 0..10 {
            assert_eq!(counts.int64_value(&[c]), 600);
        }
        let t = load(DatasetKind::Builtin, None, false).unwrap();
        assert_eq!(t.len(), 1000);
    }

    #[test]
    fn split_is_disjoint_complete_and_seeded() {
        let s = Split::new(1001, 0.5, 3).unwrap();
        assert_eq!(s.train.len(), 500);
        assert_eq!(s.val.len(), 501);
        let mut all: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
        all.sort();
        assert_eq!(all, (0..1001).collect::<Vec<_>>());
        assert_eq!(Split::new(1001, 0.5, 3).unwrap(), s);
        assert_ne!(Split::new(1001, 0.5, 4).unwrap(), s);
        let overlapping = Split { train: vec![0, 1, 2], val: vec![2, 3] };
        assert!(overlapping.check_disjoint(4).unwrap_err().contains("example 2"));
        assert!(Split::new(10, 1.0, 0).is_err());
        assert!(Split::new(10, 0.01, 0).is_err());
    }

    #[test]
    fn batches_are_normalised_and_augmentation_keeps_pixels() {
        let d = load(DatasetKind::Builtin, None, true).unwrap();
        let idx: Vec<usize> = (0..64).collect();
        let (x, y) = d.batch(&idx, None, Device::Cpu);
        assert_eq!(x.size(), vec![64, 1, 28, 28]);
        assert_eq!(y.size(), vec![64]);
        let raw = d.images.narrow(0, 0, 64).to_kind(Kind::Float) / 255.0;
        let back = &x * d.std[0] + d.mean[0];
        assert!((back - raw).abs().max().double_value(&[]) < 1e-5);
        // Flip only (no crop): every augmented image is the image or its mirror.
        let aug = Augment { crop_padding: 0, flip: true, cutout: 0 };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let src = d.images.narrow(0, 0, 16);
        let out = augment_batch(&src, &aug, &mut rng);
        let mut flipped = 0;
        for i in 0..16 {
            let (a, b) = (out.get(i), src.get(i));
            if a.equal(&b.flip([2])) && !a.equal(&b) {
                flipped += 1;
            } else {
                assert!(a.equal(&b));
            }
        }
        assert!(flipped > 0 && flipped < 16);
        // Crop with padding 2 keeps the size and draws different offsets.
        let aug = Augment { crop_padding: 2, flip: false, cutout: 0 };
        let out = augment_batch(&src, &aug, &mut rng);
        assert_eq!(out.size(), src.size());
        assert!(!out.equal(&src));
    }

    #[test]
    fn cutout_zeroes_a_clipped_square() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let m = cutout_mask(4000, 32, 32, 16, &mut rng);
        let zeros = (m.ones_like() - &m).sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float);
        // A full 16x16 square when the centre is at least 8 pixels from every border, less otherwise.
        assert_eq!(zeros.max().double_value(&[]), 256.0);
        assert!(zeros.min().double_value(&[]) >= 64.0);
        // Mean zeroed area: E[clipped side]^2 = (16 - 64/32)^2 = 196 for a 32-pixel image.
        let mean = zeros.mean(Kind::Double).double_value(&[]);
        assert!((mean - 196.0).abs() < 4.0, "{mean}");
    }

    #[test]
    fn missing_data_dir_says_how_to_fix() {
        let e = load(DatasetKind::Mnist, Some(Path::new("/nonexistent/dir")), true).unwrap_err().to_string();
        let k = load(DatasetKind::Kmnist, Some(Path::new("/nonexistent/dir")), true).unwrap_err().to_string();
        assert!(k.contains("kmnist") || k.contains("/nonexistent/dir"), "{k}");
        assert!(e.contains("/nonexistent/dir"), "{e}");
        let tmp = std::env::temp_dir().join("darts-empty-data-dir");
        std::fs::create_dir_all(&tmp).unwrap();
        let e = load(DatasetKind::Cifar10, Some(&tmp), true).unwrap_err().to_string();
        assert!(e.contains("data_batch_1.bin"), "{e}");
    }

    #[test]
    fn a_balanced_split_keeps_each_class_proportion_and_is_disjoint() {
        // 3 classes of 100, 30 and 7 examples, interleaved.
        let mut labels = Vec::new();
        for (class, n) in [(0i64, 100usize), (1, 30), (2, 7)] {
            labels.extend(std::iter::repeat_n(class, n));
        }
        labels.shuffle(&mut <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1));
        let s = Split::balanced(&labels, 0.5, 9).unwrap();
        s.check_disjoint(labels.len()).unwrap();
        assert_eq!(s.train.len() + s.val.len(), labels.len());
        for (class, n) in [(0i64, 100usize), (1, 30), (2, 7)] {
            let t = s.train.iter().filter(|&&i| labels[i] == class).count();
            assert!((t as f64 - n as f64 / 2.0).abs() <= 1.0, "class {class}: {t} of {n} in the weight split");
        }
        assert_eq!(Split::balanced(&labels, 0.5, 9).unwrap().train, s.train, "seeded");
        assert!(Split::balanced(&labels, 1.0, 9).is_err());
    }
}

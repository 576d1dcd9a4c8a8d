//! Image folders: one sub-folder per class holding PNG or JPEG files of any size, grayscale or colour,
//! resized to a square size. With `train/` and `test/` sub-folders those are the two sets; otherwise every
//! fifth file of each class (in name order) is held out as the test set. Decoded sets are cached.
use super::{DataError, Dataset, DatasetKind};
use crate::space::DataShape;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Default square size images are resized to.
pub const DEFAULT_SIZE: usize = 32;

fn io(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Io { file: path.display().to_string(), error: e.to_string() }
}

fn is_image(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
}

/// The class folders of `root` (sorted) and, per class, its image files (sorted).
fn scan(root: &Path) -> Result<Vec<(String, Vec<PathBuf>)>, DataError> {
    let mut classes = Vec::new();
    let entries = std::fs::read_dir(root).map_err(|e| io(root, e))?;
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for d in dirs {
        let name = d.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
            .map_err(|e| io(&d, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(DataError::Corrupt {
                file: d.display().to_string(),
                problem: "this class folder holds no PNG or JPEG images: add some or remove the folder".into(),
            });
        }
        classes.push((name, files));
    }
    if classes.len() < 2 {
        return Err(DataError::NotFound(format!(
            "{} needs at least two class folders (one sub-folder of PNG/JPEG images per class), found {}",
            root.display(),
            classes.len()
        )));
    }
    Ok(classes)
}

/// Class names and the (file, label) pairs of one set.
type Listing = (Vec<String>, Vec<(PathBuf, i64)>);

/// The class names and (file, label) pairs of the train or test set.
fn listing(root: &Path, train: bool) -> Result<Listing, DataError> {
    let split = root.join("train").is_dir() && root.join("test").is_dir();
    let classes = scan(&if split { root.join(if train { "train" } else { "test" }) } else { root.to_path_buf() })?;
    if split {
        let other = scan(&root.join(if train { "test" } else { "train" }))?;
        let (a, b): (Vec<&String>, Vec<&String>) =
            (classes.iter().map(|c| &c.0).collect(), other.iter().map(|c| &c.0).collect());
        if a != b {
            return Err(DataError::Corrupt {
                file: root.display().to_string(),
                problem: format!("train/ and test/ have different class folders ({a:?} and {b:?})"),
            });
        }
    }
    let names = classes.iter().map(|c| c.0.clone()).collect();
    let mut items = Vec::new();
    for (label, (_, files)) in classes.into_iter().enumerate() {
        for (i, f) in files.into_iter().enumerate() {
            if split || (i % 5 == 4) != train {
                items.push((f, label as i64));
            }
        }
    }
    Ok((names, items))
}

fn cache_key(root: &Path, items: &[(PathBuf, i64)], size: usize, train: bool) -> u64 {
    // FNV-1a over the folder, the size, and every file's name, length and modification time.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(root.display().to_string().as_bytes());
    eat(&[size as u8, (size >> 8) as u8, train as u8]);
    for (f, l) in items {
        eat(f.display().to_string().as_bytes());
        eat(&l.to_le_bytes());
        if let Ok(m) = std::fs::metadata(f) {
            eat(&m.len().to_le_bytes());
            let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            eat(&t.map_or(0, |d| d.as_nanos() as u64).to_le_bytes());
        }
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("DARTS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/darts")))?;
    Some(base.join("folders"))
}

/// The class names of the image folder `root` (its class folders, sorted; those of `train/` when it has one).
pub fn class_names(root: &Path) -> Result<Vec<String>, DataError> {
    Ok(listing(root, true)?.0)
}

/// An image as `size` x `size` pixels, `channels` (1: gray, 3: RGB) planes one after the other (CHW): exactly
/// how image folders are prepared for training (a triangle-filter resize to the square, then the conversion).
pub fn pixels(img: &image::DynamicImage, channels: usize, height: usize, width: usize) -> Vec<u8> {
    // (At the same size the image crate copies instead of resampling.)
    let img = img.resize_exact(width as u32, height as u32, image::imageops::FilterType::Triangle);
    let raw: Vec<u8> = if channels == 3 { img.to_rgb8().into_raw() } else { img.to_luma8().into_raw() };
    // HWC -> CHW.
    let mut out = Vec::with_capacity(raw.len());
    for ch in 0..channels {
        out.extend(raw.iter().skip(ch).step_by(channels));
    }
    out
}

/// Loads the train or test set of the image folder `root`, resized to `size` x `size`. Images are grayscale
/// (1 channel) when every image of the folder's set is, else colour (3). The normalisation mean and std are
/// the training set's, per channel. The decoded set is cached under `~/.cache/darts/folders`, keyed by the
/// files' names, sizes and modification times.
pub fn load(root: &Path, train: bool, size: usize) -> Result<Dataset, DataError> {
    if !root.is_dir() {
        return Err(DataError::NotFound(format!("image folder {} does not exist", root.display())));
    }
    if !(8..=1024).contains(&size) {
        return Err(DataError::NotFound(format!("image size {size}: use 8 to 1024 pixels")));
    }
    let (names, items) = listing(root, train)?;
    if items.is_empty() {
        return Err(DataError::NotFound(format!(
            "{}: no {} images",
            root.display(),
            if train { "training" } else { "test" }
        )));
    }
    let key = cache_key(root, &items, size, train);
    let cached = cache_dir().map(|d| d.join(format!("{key:016x}.safetensors")));
    if let Some(path) = cached.as_ref().filter(|p| p.is_file()) {
        if let Ok(t) = Tensor::read_safetensors(path) {
            let get = |n: &str| t.iter().find(|(k, _)| k == n).map(|(_, v)| v.shallow_clone());
            if let (Some(images), Some(labels), Some(stats)) = (get("images"), get("labels"), get("stats")) {
                let stats = Vec::<f64>::try_from(&stats).unwrap_or_default();
                let c = images.size()[1] as usize;
                if stats.len() == 2 * c {
                    return Ok(dataset(images, labels, names.len(), stats[..c].to_vec(), stats[c..].to_vec()));
                }
            }
        }
    }
    // Decode everything first, to learn whether any image has colour.
    let mut decoded = Vec::with_capacity(items.len());
    let mut colour = false;
    for (f, _) in &items {
        let img = image::ImageReader::open(f)
            .map_err(|e| io(f, e))?
            .with_guessed_format()
            .map_err(|e| io(f, e))?
            .decode()
            .map_err(|e| DataError::Corrupt {
                file: f.display().to_string(),
                problem: format!("unreadable image: {e}"),
            })?;
        colour |= img.color().has_color();
        decoded.push(img);
    }
    let c = if colour { 3 } else { 1 };
    let mut pixels: Vec<u8> = Vec::with_capacity(items.len() * c * size * size);
    for img in decoded {
        pixels.extend(self::pixels(&img, c, size, size));
    }
    let n = items.len() as i64;
    let images = Tensor::from_slice(&pixels).reshape([n, c as i64, size as i64, size as i64]);
    let labels = Tensor::from_slice(&items.iter().map(|(_, l)| *l).collect::<Vec<i64>>());
    // A fixed interleaving, so that `--limit` takes every class.
    let order = Tensor::from_slice(&interleave(items.len()));
    let (images, labels) = (images.index_select(0, &order), labels.index_select(0, &order));
    let (mean, std) = if train {
        let x = images.to_kind(Kind::Double) / 255.0;
        let mean: Vec<f64> = (0..c as i64).map(|ch| x.select(1, ch).mean(Kind::Double).double_value(&[])).collect();
        let std: Vec<f64> = (0..c as i64).map(|ch| x.select(1, ch).std(true).double_value(&[]).max(1e-3)).collect();
        (mean, std)
    } else {
        let t = load(root, true, size)?;
        (t.mean, t.std)
    };
    if let Some(path) = cached {
        let stats = Tensor::from_slice(&[mean.clone(), std.clone()].concat());
        let named = [
            ("images".to_string(), images.shallow_clone()),
            ("labels".into(), labels.shallow_clone()),
            ("stats".into(), stats),
        ];
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")));
        let _ = crate::params::write_tensors_atomically(&named, &path);
    }
    Ok(dataset(images, labels, names.len(), mean, std))
}

/// A permutation of `0..n` that mixes the (class-sorted) examples: a fixed-seed shuffle.
fn interleave(n: usize) -> Vec<i64> {
    use rand::seq::SliceRandom;
    let mut idx: Vec<i64> = (0..n as i64).collect();
    idx.shuffle(&mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0xf01d));
    idx
}

fn dataset(images: Tensor, labels: Tensor, classes: usize, mean: Vec<f64>, std: Vec<f64>) -> Dataset {
    let s = images.size();
    let shape = DataShape { channels: s[1] as usize, height: s[2] as usize, width: s[3] as usize, classes };
    Dataset { kind: DatasetKind::Folder, images, labels, shape, mean, std }
}

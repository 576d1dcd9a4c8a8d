//! Dataset folders as users have them: IDX (plain and gzipped), CIFAR-10/100 binary files, SVHN MAT-files.
use darts::data::{load, DatasetKind};
use flate2::{write::GzEncoder, Compression};
use std::io::Write;
use std::path::Path;

fn idx(dir: &Path, prefix: &str, n: u32, gz: bool, label_of: impl Fn(u32) -> u8) {
    let mut images = Vec::new();
    for v in [0x803u32, n, 28, 28] {
        images.extend_from_slice(&v.to_be_bytes());
    }
    images.extend((0..n * 784).map(|i| (i % 251) as u8));
    let mut labels = Vec::new();
    for v in [0x801u32, n] {
        labels.extend_from_slice(&v.to_be_bytes());
    }
    labels.extend((0..n).map(&label_of));
    for (stem, bytes) in
        [(format!("{prefix}-images-idx3-ubyte"), images), (format!("{prefix}-labels-idx1-ubyte"), labels)]
    {
        if gz {
            let mut e = GzEncoder::new(Vec::new(), Compression::fast());
            e.write_all(&bytes).unwrap();
            std::fs::write(dir.join(format!("{stem}.gz")), e.finish().unwrap()).unwrap();
        } else {
            std::fs::write(dir.join(stem), bytes).unwrap();
        }
    }
}

#[test]
fn idx_folders_load_gzipped_or_plain_and_bad_labels_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    idx(dir.path(), "train", 30, true, |i| (i % 10) as u8);
    idx(dir.path(), "t10k", 10, false, |i| (i % 10) as u8);
    let train = load(DatasetKind::FashionMnist, Some(dir.path()), true).unwrap();
    let test = load(DatasetKind::Mnist, Some(dir.path()), false).unwrap();
    assert_eq!((train.len(), test.len()), (30, 10));
    assert_eq!(train.images.size(), vec![30, 1, 28, 28]);
    assert_eq!(train.labels.int64_value(&[13]), 3);
    assert_eq!(train.images.int64_value(&[0, 0, 0, 5]), 5);
    idx(dir.path(), "t10k", 10, false, |i| if i == 7 { 10 } else { 0 });
    let e = load(DatasetKind::Mnist, Some(dir.path()), false).unwrap_err().to_string();
    assert!(e.contains("t10k-labels-idx1-ubyte") && e.contains("label 10 at index 7"), "{e}");
}

#[test]
fn cifar_folders_load_all_batches_and_truncation_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let record = |label: u8, fill: u8, label_bytes: usize| {
        let mut r = vec![0u8; label_bytes - 1];
        r.push(label);
        r.extend(std::iter::repeat_n(fill, 3072));
        r
    };
    for b in 1..=5u8 {
        let bytes: Vec<u8> = (0..3).flat_map(|i| record(b + i, b, 1)).collect();
        std::fs::write(dir.path().join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    std::fs::write(dir.path().join("test_batch.bin"), record(9, 7, 1)).unwrap();
    let train = load(DatasetKind::Cifar10, Some(dir.path()), true).unwrap();
    assert_eq!(train.images.size(), vec![15, 3, 32, 32]);
    assert_eq!(train.shape.classes, 10);
    assert_eq!(train.labels.int64_value(&[14]), 7);
    assert_eq!(train.images.int64_value(&[14, 2, 31, 31]), 5);
    let test = load(DatasetKind::Cifar10, Some(dir.path()), false).unwrap();
    assert_eq!(test.len(), 1);
    // CIFAR-100: two label bytes (coarse, fine), the fine one is used; 100 classes.
    std::fs::write(dir.path().join("train.bin"), [record(57, 1, 2), record(99, 2, 2)].concat()).unwrap();
    let c100 = load(DatasetKind::Cifar100, Some(dir.path()), true).unwrap();
    assert_eq!(c100.shape.classes, 100);
    assert_eq!(c100.labels.int64_value(&[1]), 99);
    // A truncated batch file.
    let mut cut = std::fs::read(dir.path().join("data_batch_3.bin")).unwrap();
    cut.truncate(cut.len() - 100);
    std::fs::write(dir.path().join("data_batch_3.bin"), cut).unwrap();
    let e = load(DatasetKind::Cifar10, Some(dir.path()), true).unwrap_err().to_string();
    assert!(e.contains("data_batch_3.bin") && e.contains("records"), "{e}");
}

/// Writes `n` images per class into `root/<class>/`: PNGs of varying sizes, grayscale for "a", colour
/// (JPEG) for "b" and "c", each class with its own brightness.
fn image_folder(root: &Path, n: u32) {
    for (k, class) in ["a", "b", "c"].iter().enumerate() {
        let d = root.join(class);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..n {
            let (w, h) = (20 + 3 * i, 16 + 5 * i);
            let v = (40 + 80 * k as u32 + i) as u8;
            if k == 0 {
                image::GrayImage::from_pixel(w, h, image::Luma([v])).save(d.join(format!("{i}.png"))).unwrap();
            } else {
                let img = image::RgbImage::from_fn(w, h, |x, _| image::Rgb([v, (x * 7) as u8, 255 - v]));
                img.save(d.join(format!("{i}.jpg"))).unwrap();
            }
        }
    }
}

#[test]
fn an_image_folder_loads_resized_with_a_held_out_test_set_and_its_own_statistics() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(dir.path(), 10);
    std::fs::write(dir.path().join("a/notes.txt"), "not an image").unwrap();
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("DARTS_CACHE", cache.path());
    let train = darts::data::load_with(DatasetKind::Folder, Some(dir.path()), true, Some(16)).unwrap();
    let test = darts::data::load_with(DatasetKind::Folder, Some(dir.path()), false, Some(16)).unwrap();
    // Every fifth file of each class is held out: 8 + 2 per class; colour because b and c are.
    assert_eq!(train.images.size(), vec![24, 3, 16, 16]);
    assert_eq!(test.images.size(), vec![6, 3, 16, 16]);
    assert_eq!(train.shape.classes, 3);
    let labels = Vec::<i64>::try_from(&train.labels).unwrap();
    for c in 0..3 {
        assert_eq!(labels.iter().filter(|&&l| l == c).count(), 8);
    }
    assert_ne!(&labels[..3], &[0, 0, 0], "interleaved, so that a limit takes every class");
    // Class "a" is gray v,v,v: its red channel equals its green channel.
    let a = (0..24).find(|&i| labels[i] == 0).unwrap() as i64;
    let img = train.images.get(a);
    assert!(img.get(0).equal(&img.get(1)));
    assert_eq!(train.mean.len(), 3);
    assert!(train.mean.iter().all(|m| *m > 0.0 && *m < 1.0) && train.std.iter().all(|s| *s > 0.0));
    assert_eq!(test.mean, train.mean, "the test set is normalised with the training statistics");
    // The decoded set is cached, and the cache gives the same data.
    assert!(std::fs::read_dir(cache.path().join("folders")).unwrap().count() >= 2);
    let again = darts::data::load_with(DatasetKind::Folder, Some(dir.path()), true, Some(16)).unwrap();
    assert!(again.images.equal(&train.images) && again.labels.equal(&train.labels));
    assert_eq!(again.mean, train.mean);
}

#[test]
fn image_folder_problems_name_the_folder_or_file() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(dir.path(), 3);
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    let e = darts::data::load_with(DatasetKind::Folder, Some(dir.path()), true, Some(16)).unwrap_err().to_string();
    assert!(e.contains("empty") && e.contains("no PNG or JPEG"), "{e}");
    std::fs::remove_dir(dir.path().join("empty")).unwrap();
    std::fs::write(dir.path().join("b/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let e = darts::data::load_with(DatasetKind::Folder, Some(dir.path()), true, Some(16)).unwrap_err().to_string();
    assert!(e.contains("broken.png") && e.contains("unreadable image"), "{e}");
    let e = load(DatasetKind::Folder, None, true).unwrap_err().to_string();
    assert!(e.contains("--data-dir"), "{e}");
}

/// SVHN MAT-files written by scipy.io.savemat (tests/data/svhn/make.py: compressed training file, uncompressed
/// test file), read by darts' own parser: every pixel lands where the formula puts it, label 10 becomes 0.
#[test]
fn svhn_mat_files_written_by_scipy_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/svhn");
    let train = darts::data::load(DatasetKind::Svhn, Some(&dir), true).unwrap();
    assert_eq!(Vec::<i64>::try_from(&train.labels).unwrap(), vec![0, 1, 2, 3, 9, 0]);
    assert_eq!(train.images.size(), vec![6, 3, 32, 32]);
    let px = Vec::<u8>::try_from(train.images.flatten(0, -1)).unwrap();
    for n in 0..6 {
        for ch in 0..3 {
            for r in 0..32 {
                for c in 0..32 {
                    let want = ((7 * n + 3 * ch + 5 * r + c) % 256) as u8;
                    assert_eq!(px[((n * 3 + ch) * 32 + r) * 32 + c], want, "image {n} channel {ch} ({r}, {c})");
                }
            }
        }
    }
    let test = darts::data::load(DatasetKind::Svhn, Some(&dir), false).unwrap();
    assert_eq!(Vec::<i64>::try_from(&test.labels).unwrap(), vec![5, 6, 7]);
    assert_eq!((test.shape.channels, test.shape.height, test.shape.classes), (3, 32, 10));
}

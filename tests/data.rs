//! Dataset folders as users have them: IDX (plain and gzipped) and CIFAR-10/100 binary files.
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

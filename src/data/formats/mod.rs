//! Parsers for the IDX (MNIST family), CIFAR binary and MATLAB level-5 MAT-file (SVHN) formats, with errors that
//! name the file and problem. The MAT-file parser (SVHN's files) is [`mat`].

mod mat;

pub use mat::{parse_mat, parse_svhn, MatArray, MatData};

use super::DataError;
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::Path;

/// Raw images and labels: `images` holds `n * channels * height * width` bytes, channel-major per image.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw {
    /// Pixel bytes.
    pub images: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// Channels per image.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
}

impl Raw {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Un-gzips `bytes` when they start with the gzip magic; otherwise returns them as they are.
pub fn maybe_gunzip(bytes: Vec<u8>, file: &str) -> Result<Vec<u8>, DataError> {
    if bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b {
        let mut out = Vec::new();
        GzDecoder::new(&bytes[..]).read_to_end(&mut out).map_err(|e| DataError::Corrupt {
            file: file.to_string(),
            problem: format!("gzip stream is damaged or truncated ({e}); download the file again"),
        })?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

fn be_u32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

fn corrupt(file: &str, problem: String) -> DataError {
    DataError::Corrupt { file: file.to_string(), problem }
}

/// Parses an IDX image file (magic 0x00000803): returns (count, height, width, pixels).
pub fn parse_idx_images(bytes: &[u8], file: &str) -> Result<(usize, usize, usize, Vec<u8>), DataError> {
    if bytes.len() < 16 {
        return Err(corrupt(file, format!("{} bytes is too short for an IDX image header (16 bytes)", bytes.len())));
    }
    let magic = be_u32(bytes, 0);
    if magic != 0x803 {
        return Err(corrupt(
            file,
            format!("magic number 0x{magic:08x} is not an IDX image file's 0x00000803 (is it a label file?)"),
        ));
    }
    let (n, h, w) = (be_u32(bytes, 4), be_u32(bytes, 8), be_u32(bytes, 12));
    if h == 0 || w == 0 || h > 4096 || w > 4096 {
        return Err(corrupt(file, format!("image size {h}x{w} is not plausible")));
    }
    let want = n.checked_mul(h * w).and_then(|x| x.checked_add(16));
    match want {
        Some(want) if want == bytes.len() => Ok((n, h, w, bytes[16..].to_vec())),
        Some(want) if want > bytes.len() => Err(corrupt(
            file,
            format!("truncated: header promises {n} images of {h}x{w} ({want} bytes) but the file has {}", bytes.len()),
        )),
        _ => Err(corrupt(
            file,
            format!("header promises {n} images of {h}x{w} but the file size {} differs", bytes.len()),
        )),
    }
}

/// Parses an IDX label file (magic 0x00000801).
pub fn parse_idx_labels(bytes: &[u8], file: &str) -> Result<Vec<u8>, DataError> {
    if bytes.len() < 8 {
        return Err(corrupt(file, format!("{} bytes is too short for an IDX label header (8 bytes)", bytes.len())));
    }
    let magic = be_u32(bytes, 0);
    if magic != 0x801 {
        return Err(corrupt(
            file,
            format!("magic number 0x{magic:08x} is not an IDX label file's 0x00000801 (is it an image file?)"),
        ));
    }
    let n = be_u32(bytes, 4);
    if bytes.len() - 8 != n {
        return Err(corrupt(file, format!("header promises {n} labels but the file holds {}", bytes.len() - 8)));
    }
    Ok(bytes[8..].to_vec())
}

/// Checks that every label is below `classes`.
pub fn check_labels(labels: &[u8], classes: usize, file: &str) -> Result<(), DataError> {
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
        return Err(corrupt(file, format!("label {l} at index {i} is out of range for {classes} classes")));
    }
    Ok(())
}

/// Parses an IDX image/label pair held in memory (gzipped or not).
pub fn idx_pair(images: Vec<u8>, labels: Vec<u8>, names: (&str, &str), classes: usize) -> Result<Raw, DataError> {
    let images = maybe_gunzip(images, names.0)?;
    let labels = maybe_gunzip(labels, names.1)?;
    let (n, h, w, pixels) = parse_idx_images(&images, names.0)?;
    let labels = parse_idx_labels(&labels, names.1)?;
    if labels.len() != n {
        return Err(DataError::Corrupt {
            file: names.1.to_string(),
            problem: format!("{} labels for {n} images in {}", labels.len(), names.0),
        });
    }
    check_labels(&labels, classes, names.1)?;
    Ok(Raw { images: pixels, labels, channels: 1, height: h, width: w })
}

/// Reads `dir/stem` or `dir/stem.gz`, whichever exists.
pub fn read_maybe_gz(dir: &Path, stem: &str) -> Result<(Vec<u8>, String), DataError> {
    for name in [stem.to_string(), format!("{stem}.gz")] {
        let path = dir.join(&name);
        if path.is_file() {
            let bytes = std::fs::read(&path)
                .map_err(|e| DataError::Io { file: path.display().to_string(), error: e.to_string() })?;
            return Ok((bytes, path.display().to_string()));
        }
    }
    Err(DataError::Missing { file: dir.join(format!("{stem}[.gz]")).display().to_string() })
}

/// Parses CIFAR binary records: `label_bytes` leading label bytes (1 for CIFAR-10, 2 for CIFAR-100 where
/// the second, the fine label, is used), then 3x32x32 pixels.
pub fn parse_cifar(bytes: &[u8], label_bytes: usize, classes: usize, file: &str) -> Result<Raw, DataError> {
    let rec = label_bytes + 3072;
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        return Err(corrupt(
            file,
            format!(
                "{} bytes is not a whole number of {rec}-byte CIFAR records (truncated or not a CIFAR binary file)",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / rec;
    let mut images = Vec::with_capacity(n * 3072);
    let mut labels = Vec::with_capacity(n);
    for r in bytes.chunks_exact(rec) {
        labels.push(r[label_bytes - 1]);
        images.extend_from_slice(&r[label_bytes..]);
    }
    check_labels(&labels, classes, file)?;
    Ok(Raw { images, labels, channels: 3, height: 32, width: 32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_images(n: u32, h: u32, w: u32, extra: i64) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [0x803u32, n, h, w] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        let len = (n * h * w) as i64 + extra;
        v.extend((0..len).map(|i| i as u8));
        v
    }

    #[test]
    fn idx_parses_and_rejects_truncation_and_wrong_magic() {
        let (n, h, w, px) = parse_idx_images(&idx_images(3, 2, 2, 0), "a").unwrap();
        assert_eq!((n, h, w, px.len()), (3, 2, 2, 12));
        let e = parse_idx_images(&idx_images(3, 2, 2, -1), "a").unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("a"), "{e}");
        let mut bad = idx_images(1, 2, 2, 0);
        bad[3] = 0x01;
        assert!(parse_idx_images(&bad, "a").unwrap_err().to_string().contains("magic"));
        let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 2];
        labels.extend([1, 12]);
        assert!(parse_idx_labels(&labels, "l").is_ok());
        let e = idx_pair(idx_images(2, 2, 2, 0), labels, ("i", "l"), 10).unwrap_err().to_string();
        assert!(e.contains("label 12"), "{e}");
    }

    #[test]
    fn gzip_is_detected_and_damage_reported() {
        use flate2::{write::GzEncoder, Compression};
        use std::io::Write;
        let raw = idx_images(2, 3, 3, 0);
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(&raw).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(maybe_gunzip(gz.clone(), "f").unwrap(), raw);
        let cut = gz[..gz.len() / 2].to_vec();
        assert!(maybe_gunzip(cut, "f.gz").unwrap_err().to_string().contains("f.gz"));
    }

    #[test]
    fn cifar_records_parse_and_bad_sizes_fail() {
        let mut b = vec![7u8];
        b.extend(vec![1u8; 3072]);
        b.push(3);
        b.extend(vec![2u8; 3072]);
        let raw = parse_cifar(&b, 1, 10, "x").unwrap();
        assert_eq!(raw.labels, vec![7, 3]);
        assert_eq!(raw.images[3072], 2);
        assert!(parse_cifar(&b[..100], 1, 10, "x").unwrap_err().to_string().contains("records"));
        assert!(parse_cifar(&b, 1, 5, "x").unwrap_err().to_string().contains("label 7"));
    }
}

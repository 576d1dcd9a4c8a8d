//! The MATLAB level-5 MAT-file format (SVHN's cropped digits): numeric arrays, compressed or not, and SVHN's
//! `X` and `y` as images and labels.

use super::{corrupt, DataError, Raw};
use std::io::Read;

/// A numeric array read from a MAT-file: its name, MATLAB class, dimensions (column-major) and values.
#[derive(Debug, Clone, PartialEq)]
pub struct MatArray {
    /// Variable name.
    pub name: String,
    /// MATLAB class code (6 double, 7 single, 8 int8, 9 uint8, ... 15 uint64).
    pub class: u8,
    /// Dimensions, first varying fastest.
    pub dims: Vec<usize>,
    /// The values (real part), in storage order.
    pub data: MatData,
}

/// A MAT-file array's values: bytes when stored as uint8 (as image data is), else converted to f64.
#[derive(Debug, Clone, PartialEq)]
pub enum MatData {
    /// Stored as miUINT8.
    U8(Vec<u8>),
    /// Stored as any other numeric type.
    F64(Vec<f64>),
}

impl MatData {
    fn len(&self) -> usize {
        match self {
            MatData::U8(v) => v.len(),
            MatData::F64(v) => v.len(),
        }
    }
}

/// The most bytes one compressed MAT-file element may inflate to (SVHN's largest, `extra_32x32.mat`, is 1.6 GB).
const MAT_INFLATE_LIMIT: u64 = 8 << 30;

struct MatReader<'a> {
    file: &'a str,
    little: bool,
}

impl MatReader<'_> {
    fn u32(&self, b: &[u8], at: usize) -> u32 {
        let x = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if self.little {
            u32::from_le_bytes(x)
        } else {
            u32::from_be_bytes(x)
        }
    }

    /// The data element at `pos` of `b`: (type, data, position of the next element).
    fn element<'b>(&self, b: &'b [u8], pos: usize) -> Result<(u32, &'b [u8], usize), DataError> {
        if pos + 8 > b.len() {
            return Err(corrupt(self.file, format!("truncated: a data element's tag at byte {pos} is cut off")));
        }
        let first = self.u32(b, pos);
        if first >> 16 != 0 {
            // Small data element: type and size share the first word, at most 4 bytes of data follow.
            let n = (first >> 16) as usize;
            if n > 4 {
                return Err(corrupt(
                    self.file,
                    format!("small data element at byte {pos} claims {n} bytes (at most 4)"),
                ));
            }
            return Ok((first & 0xffff, &b[pos + 4..pos + 4 + n], pos + 8));
        }
        let n = self.u32(b, pos + 4) as usize;
        let start = pos + 8;
        let end = start.checked_add(n).filter(|e| *e <= b.len()).ok_or_else(|| {
            corrupt(
                self.file,
                format!("truncated: a data element at byte {pos} claims {n} bytes, {} remain", b.len() - start),
            )
        })?;
        // Compressed elements are not padded; the others are padded to 8 bytes.
        let next = if first == 15 { end } else { end.div_ceil(8) * 8 };
        Ok((first, &b[start..end], next))
    }

    /// The numeric values of a data element of type `t`.
    fn numbers(&self, t: u32, d: &[u8]) -> Result<MatData, DataError> {
        let size = match t {
            1 | 2 => 1,
            3 | 4 => 2,
            5..=7 => 4,
            9 | 12 | 13 => 8,
            _ => return Err(corrupt(self.file, format!("data type {t} is not a numeric MAT-file type"))),
        };
        if t == 2 {
            return Ok(MatData::U8(d.to_vec()));
        }
        if !d.len().is_multiple_of(size) {
            return Err(corrupt(self.file, format!("{} bytes of data are not whole {size}-byte numbers", d.len())));
        }
        let word = |c: &[u8]| -> [u8; 8] {
            let mut w = [0u8; 8];
            if self.little {
                w[..c.len()].copy_from_slice(c);
            } else {
                for (i, x) in c.iter().rev().enumerate() {
                    w[i] = *x;
                }
            }
            w
        };
        let values = d
            .chunks_exact(size)
            .map(|c| {
                let w = word(c);
                match t {
                    1 => w[0] as i8 as f64,
                    3 => i16::from_le_bytes([w[0], w[1]]) as f64,
                    4 => u16::from_le_bytes([w[0], w[1]]) as f64,
                    5 => i32::from_le_bytes([w[0], w[1], w[2], w[3]]) as f64,
                    6 => u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as f64,
                    7 => f32::from_le_bytes([w[0], w[1], w[2], w[3]]) as f64,
                    9 => f64::from_le_bytes(w),
                    12 => i64::from_le_bytes(w) as f64,
                    _ => u64::from_le_bytes(w) as f64,
                }
            })
            .collect();
        Ok(MatData::F64(values))
    }

    /// An miMATRIX element's array; `None` for classes that are not numeric (cells, structs, text, sparse).
    fn matrix(&self, d: &[u8]) -> Result<Option<MatArray>, DataError> {
        let (t, flags, pos) = self.element(d, 0)?;
        if t != 6 || flags.len() < 4 {
            return Err(corrupt(self.file, "an array's flags are missing".into()));
        }
        let class = (self.u32(flags, 0) & 0xff) as u8;
        if !(6..=15).contains(&class) {
            return Ok(None);
        }
        let (t, dims_b, pos) = self.element(d, pos)?;
        if t != 5 || dims_b.len() < 8 || !dims_b.len().is_multiple_of(4) {
            return Err(corrupt(self.file, "an array's dimensions are missing".into()));
        }
        let dims: Vec<usize> =
            (0..dims_b.len() / 4).map(|i| self.u32(dims_b, 4 * i) as i32).map(|x| x.max(0) as usize).collect();
        let (t, name_b, pos) = self.element(d, pos)?;
        if t != 1 {
            return Err(corrupt(self.file, "an array's name is missing".into()));
        }
        let name = String::from_utf8_lossy(name_b).into_owned();
        let (t, real, _) = self.element(d, pos)?;
        let data = self.numbers(t, real)?;
        let count = dims.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
        if count != Some(data.len()) {
            return Err(corrupt(
                self.file,
                format!("array {name}: dimensions {dims:?} do not match its {} values", data.len()),
            ));
        }
        Ok(Some(MatArray { name, class, dims, data }))
    }
}

/// Parses a MATLAB level-5 MAT-file (as `scipy.io.savemat` and MATLAB's default `-v7` write it, compressed or
/// not): its numeric arrays. Version 7.3 files (HDF5) are refused with a message saying so.
pub fn parse_mat(bytes: &[u8], file: &str) -> Result<Vec<MatArray>, DataError> {
    if bytes.len() < 128 {
        return Err(corrupt(file, format!("{} bytes is too short for a MAT-file header (128 bytes)", bytes.len())));
    }
    if bytes.starts_with(b"MATLAB 7.3") {
        return Err(corrupt(file, "a MATLAB 7.3 (HDF5) file; darts reads level-5 MAT-files (save with -v7)".into()));
    }
    let little = match &bytes[126..128] {
        b"IM" => true,
        b"MI" => false,
        _ => return Err(corrupt(file, "not a MATLAB level-5 MAT-file (no endian indicator at byte 126)".into())),
    };
    let r = MatReader { file, little };
    let mut arrays = Vec::new();
    let mut pos = 128;
    while pos < bytes.len() {
        let (t, d, next) = r.element(bytes, pos)?;
        match t {
            14 => arrays.extend(r.matrix(d)?),
            15 => {
                let mut inner = Vec::new();
                flate2::read::ZlibDecoder::new(d).take(MAT_INFLATE_LIMIT).read_to_end(&mut inner).map_err(|e| {
                    corrupt(
                        file,
                        format!(
                            "compressed element at byte {pos} is damaged or truncated ({e}); download the file again"
                        ),
                    )
                })?;
                let (t, d, _) = r.element(&inner, 0)?;
                if t == 14 {
                    arrays.extend(r.matrix(d)?);
                }
            }
            _ => {}
        }
        pos = next;
    }
    Ok(arrays)
}

/// SVHN (cropped digits, `train_32x32.mat` / `test_32x32.mat`): `X` is uint8 HxWx3xN (column-major), `y` holds
/// N labels 1..10 where 10 is the digit 0. Returns channel-major images and labels 0..9.
pub fn parse_svhn(bytes: &[u8], file: &str) -> Result<Raw, DataError> {
    let arrays = parse_mat(bytes, file)?;
    let find = |n: &str| {
        arrays
            .iter()
            .find(|a| a.name == n)
            .ok_or_else(|| corrupt(file, format!("no variable {n} (is it an SVHN file?)")))
    };
    let (x, y) = (find("X")?, find("y")?);
    let MatData::U8(px) = &x.data else {
        return Err(corrupt(file, "X is not stored as uint8".into()));
    };
    let &[h, w, c, n] = x.dims.as_slice() else {
        return Err(corrupt(file, format!("X has dimensions {:?}, not height x width x 3 x images", x.dims)));
    };
    if c != 3 || h == 0 || w == 0 {
        return Err(corrupt(file, format!("X has dimensions {:?}, not height x width x 3 x images", x.dims)));
    }
    let values: Vec<f64> = match &y.data {
        MatData::U8(v) => v.iter().map(|&b| b as f64).collect(),
        MatData::F64(v) => v.clone(),
    };
    if values.len() != n {
        return Err(corrupt(file, format!("{} labels for {n} images", values.len())));
    }
    let mut labels = Vec::with_capacity(n);
    for (i, &v) in values.iter().enumerate() {
        if !(v.fract() == 0.0 && (1.0..=10.0).contains(&v)) {
            return Err(corrupt(file, format!("label {v} at index {i} is not one of SVHN's 1..10")));
        }
        labels.push((v as u8) % 10);
    }
    // Column-major (row, col, channel, image) to channel-major rows per image.
    let mut images = vec![0u8; px.len()];
    for img in 0..n {
        for ch in 0..3 {
            let src = &px[(img * 3 + ch) * h * w..][..h * w];
            let dst = &mut images[(img * 3 + ch) * h * w..][..h * w];
            for col in 0..w {
                for row in 0..h {
                    dst[row * w + col] = src[col * h + row];
                }
            }
        }
    }
    Ok(Raw { images, labels, channels: 3, height: h, width: w })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MAT-file writing, from the format's documentation (MATLAB's "MAT-File Format", level 5), little-endian.
    fn tag(t: u32, data: &[u8]) -> Vec<u8> {
        let mut v = t.to_le_bytes().to_vec();
        v.extend((data.len() as u32).to_le_bytes());
        v.extend(data);
        while !v.len().is_multiple_of(8) {
            v.push(0);
        }
        v
    }

    /// An array: flags (class), dimensions, name (small element when it fits in 4 bytes), real part of type `t`.
    fn matrix(name: &str, class: u8, dims: &[i32], t: u32, data: &[u8]) -> Vec<u8> {
        let mut body = tag(6, &[class, 0, 0, 0, 0, 0, 0, 0]);
        body.extend(tag(5, &dims.iter().flat_map(|d| d.to_le_bytes()).collect::<Vec<u8>>()));
        if name.len() <= 4 {
            let mut small = (((name.len() as u32) << 16) | 1).to_le_bytes().to_vec();
            small.extend(name.as_bytes());
            small.resize(8, 0);
            body.extend(small);
        } else {
            body.extend(tag(1, name.as_bytes()));
        }
        body.extend(tag(t, data));
        tag(14, &body)
    }

    fn compressed(element: &[u8]) -> Vec<u8> {
        use flate2::{write::ZlibEncoder, Compression};
        use std::io::Write;
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(element).unwrap();
        let data = z.finish().unwrap();
        let mut v = 15u32.to_le_bytes().to_vec();
        v.extend((data.len() as u32).to_le_bytes());
        v.extend(data); // not padded
        v
    }

    fn mat_file(elements: &[Vec<u8>]) -> Vec<u8> {
        let mut v = b"MATLAB 5.0 MAT-file, written by a darts test".to_vec();
        v.resize(116, b' ');
        v.extend([0u8; 8]);
        v.extend([0x00, 0x01]);
        v.extend(b"IM");
        for e in elements {
            v.extend(e);
        }
        v
    }

    /// Two 2x3 colour images: pixel (row r, col c, channel ch, image n) = 100n + 10ch + 3r + c, stored column-major.
    fn svhn_x() -> Vec<u8> {
        let mut px = Vec::new();
        for n in 0..2u8 {
            for ch in 0..3u8 {
                for c in 0..3u8 {
                    for r in 0..2u8 {
                        px.push(100 * n + 10 * ch + 3 * r + c);
                    }
                }
            }
        }
        px
    }

    #[test]
    fn svhn_mat_files_parse_compressed_or_not() {
        // As MATLAB writes SVHN: compressed; the double-class labels stored compactly as uint8.
        let x = matrix("X", 9, &[2, 3, 3, 2], 2, &svhn_x());
        let y = matrix("y", 6, &[2, 1], 2, &[10, 3]);
        let file = mat_file(&[compressed(&x), compressed(&y)]);
        let raw = parse_svhn(&file, "train_32x32.mat").unwrap();
        assert_eq!(raw.labels, vec![0, 3], "label 10 is the digit 0");
        assert_eq!((raw.channels, raw.height, raw.width, raw.images.len()), (3, 2, 3, 36));
        // Channel-major rows: image 1, channel 2, row 1, col 2 sits at ((1*3+2)*2+1)*3+2.
        assert_eq!(raw.images[((3 + 2) * 2 + 1) * 3 + 2], 100 + 20 + 3 + 2);
        assert_eq!(raw.images[0..3], [0, 1, 2]);
        // Uncompressed, labels as doubles, a longer variable name and a text array to skip: the same result.
        let y64: Vec<u8> = [10.0f64, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let text = matrix("comment", 4, &[1, 2], 4, &[104, 0, 105, 0]);
        let file2 = mat_file(&[text, x.clone(), matrix("y", 6, &[2, 1], 9, &y64)]);
        assert_eq!(parse_svhn(&file2, "f").unwrap(), raw);
        let arrays = parse_mat(&file2, "f").unwrap();
        assert_eq!(arrays.len(), 2, "the text array is skipped");
    }

    #[test]
    fn bad_mat_files_say_what_is_wrong() {
        let x = matrix("X", 9, &[2, 3, 3, 2], 2, &svhn_x());
        let err = |b: &[u8]| parse_svhn(b, "s.mat").unwrap_err().to_string();
        let good = mat_file(&[compressed(&x), compressed(&matrix("y", 6, &[2, 1], 2, &[10, 3]))]);
        let e = err(&good[..good.len() - 5]);
        assert!(e.contains("s.mat") && (e.contains("truncated") || e.contains("damaged")), "{e}");
        let e = err(&mat_file(&[x.clone(), matrix("y", 6, &[2, 1], 2, &[11, 3])]));
        assert!(e.contains("label 11"), "{e}");
        let e = err(&mat_file(std::slice::from_ref(&x)));
        assert!(e.contains("no variable y"), "{e}");
        let e = err(&mat_file(&[matrix("X", 9, &[2, 3, 2], 2, &svhn_x()[..12]), matrix("y", 6, &[2, 1], 2, &[1, 2])]));
        assert!(e.contains("dimensions"), "{e}");
        let e = err(&mat_file(&[matrix("X", 9, &[2, 3, 3, 3], 2, &svhn_x()), matrix("y", 6, &[3, 1], 2, &[1, 2, 3])]));
        assert!(e.contains("do not match"), "{e}");
        let mut v73 = b"MATLAB 7.3 MAT-file".to_vec();
        v73.resize(512, 0);
        assert!(err(&v73).contains("HDF5"));
        assert!(err(&[0u8; 200]).contains("not a MATLAB level-5"));
        assert!(err(b"short").contains("too short"));
    }
}

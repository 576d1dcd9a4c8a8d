//! IDX images and labels, gzipped or not: any bytes give a value or a DataError, never a panic.
#![no_main]
use darts_fuzz::formats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = formats::maybe_gunzip(data.to_vec(), "fuzz.gz") {
        let _ = formats::parse_idx_images(&b, "fuzz-images");
        let _ = formats::parse_idx_labels(&b, "fuzz-labels");
    }
    // The two halves as an image file and a label file.
    let (a, b) = data.split_at(data.len() / 2);
    let _ = formats::idx_pair(a.to_vec(), b.to_vec(), ("images", "labels"), 10);
});

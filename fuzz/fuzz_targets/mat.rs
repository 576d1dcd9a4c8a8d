//! MATLAB level-5 MAT-files (SVHN): any bytes give a value or a DataError, never a panic.
#![no_main]
use darts_fuzz::formats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = formats::parse_mat(data, "f.mat");
    let _ = formats::parse_svhn(data, "train_32x32.mat");
});

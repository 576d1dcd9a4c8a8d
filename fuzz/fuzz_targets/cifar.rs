//! CIFAR-10/100 binary records: any bytes give a value or a DataError, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/data/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../../src/data/formats.rs"]
mod formats;
use error::DataError;

fuzz_target!(|data: &[u8]| {
    let _ = formats::parse_cifar(data, 1, 10, "data_batch_1.bin");
    let _ = formats::parse_cifar(data, 2, 100, "train.bin");
    let _: Option<DataError> = None;
});

//! CIFAR-10/100 binary records: any bytes give a value or a DataError, never a panic.
#![no_main]
use darts_fuzz::formats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = formats::parse_cifar(data, 1, 10, "data_batch_1.bin");
    let _ = formats::parse_cifar(data, 2, 100, "train.bin");
});

//! Dropout masks from a private generator leave libtorch's global generator alone. Alone in its own test binary:
//! tests running beside it in one process would draw from the global generator and move it themselves.
use tch::{Device, Kind, Tensor};

#[test]
fn bernoulli_masks_follow_their_seed_and_leave_the_global_generator_alone() {
    let like = darts::channels_last(&Tensor::zeros([4, 8, 16, 16], (Kind::Float, Device::Cpu)));
    let (a, b, c) = {
        let _rng = darts::torch_rng_lock();
        tch::manual_seed(9);
        let want = Tensor::randn([5], (Kind::Float, Device::Cpu));
        tch::manual_seed(9);
        let a = darts::native::bernoulli_mask(&like, 0.7, 42).unwrap();
        let b = darts::native::bernoulli_mask(&like, 0.7, 42).unwrap();
        let c = darts::native::bernoulli_mask(&like, 0.7, 43).unwrap();
        assert!(Tensor::randn([5], (Kind::Float, Device::Cpu)).equal(&want), "the global generator moved");
        (a, b, c)
    };
    assert!(a.equal(&b) && !a.equal(&c));
    assert_eq!((a.size(), a.stride()), (like.size(), like.stride()));
    assert!(!a.requires_grad());
    let ones = a.eq(1.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    let zeros = a.eq(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert!((ones - 0.7).abs() < 0.02 && (ones + zeros - 1.0).abs() < 1e-9, "{ones} ones, {zeros} zeros");
    assert!(darts::native::bernoulli_mask(&like, 1.5, 1).unwrap_err().to_string().contains("outside [0, 1]"));
}

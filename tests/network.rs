//! The final network from a genotype against the original model.py's published sizes.
use darts::network::{count_parameters_without_auxiliary, drop_path, drop_path_masks, Network, NetworkConfig};
use darts::space::DataShape;
use darts::zoo;
use rand::SeedableRng;
use tch::{nn, Device, Kind, Tensor};

fn params(name: &str, cfg: &NetworkConfig, shape: &DataShape) -> i64 {
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = Network::new(&vs.root(), &zoo::get(name).unwrap(), cfg, shape);
    count_parameters_without_auxiliary(&vs)
}

#[test]
fn published_cells_have_the_original_parameter_counts() {
    let cifar = DataShape { channels: 3, height: 32, width: 32, classes: 10 };
    let cfg = NetworkConfig::default();
    assert_eq!(params("DARTS_V2", &cfg, &cifar), 3_349_342);
    assert_eq!(params("DARTS_V1", &cfg, &cifar), 3_169_414);
    // NetworkImageNet(48, 1000, 14, DARTS_V2): 4.7M as published; 4,718,752 from the original model.py.
    let imagenet = DataShape { channels: 3, height: 224, width: 224, classes: 1000 };
    assert_eq!(params("DARTS_V2", &NetworkConfig::imagenet(), &imagenet), 4_718_752);
}

#[test]
fn imagenet_variant_runs_on_small_images_with_its_auxiliary_head() {
    let shape = DataShape { channels: 3, height: 56, width: 56, classes: 7 };
    let cfg = NetworkConfig { channels: 8, layers: 5, ..NetworkConfig::imagenet() };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Network::new(&vs.root(), &zoo::get("DARTS_V2").unwrap(), &cfg, &shape);
    let (logits, aux) = net.forward_t(&Tensor::randn([2, 3, 56, 56], (Kind::Float, Device::Cpu)), true);
    assert_eq!(logits.size(), vec![2, 7]);
    assert_eq!(aux.unwrap().size(), vec![2, 7]);
    // The ImageNet auxiliary head has no BN after its second convolution.
    assert!(!vs.variables().keys().any(|k| k.starts_with("auxiliary_head.features.6")));
    assert!(vs.variables().contains_key("stem0.4.weight") && vs.variables().contains_key("stem1.1.weight"));
}

#[test]
fn forward_with_auxiliary_head_on_fashion_mnist_shapes() {
    let shape = DataShape { channels: 1, height: 28, width: 28, classes: 10 };
    let cfg = NetworkConfig { channels: 8, layers: 5, ..Default::default() };
    let vs = nn::VarStore::new(Device::Cpu);
    let mut net = Network::new(&vs.root(), &zoo::get("DARTS_V2").unwrap(), &cfg, &shape);
    net.drop_path_prob = 0.2;
    let x = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cpu));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    // DARTS_V2's normal cell has 6 non-identity ops of 8 (two skips from inputs 0), its reduction cell 5
    // (three skips from node 2 stay identities); 5 cells = 3 normal + 2 reduction.
    assert_eq!(net.drop_sites(), 3 * 6 + 2 * 5);
    let masks = drop_path_masks(net.drop_sites(), 4, 0.2, &mut rng);
    let (logits, aux) = net.forward_masked(&x, true, Some(&masks));
    assert_eq!(logits.size(), vec![4, 10]);
    assert_eq!(aux.unwrap().size(), vec![4, 10]);
    let (_, aux) = net.forward_t(&x, false);
    assert!(aux.is_none());
}

#[test]
fn drop_path_zeroes_whole_examples_at_the_right_rate_and_keeps_the_mean() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let x = Tensor::ones([20000, 2, 2, 2], (Kind::Float, Device::Cpu));
    let y = drop_path(&x, &drop_path_masks(1, 20000, 0.2, &mut rng).get(0), 0.2);
    let per_example = y.sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float);
    let dropped = per_example.eq(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    assert!((dropped - 0.2).abs() < 0.015, "{dropped}");
    // Kept examples are scaled by 1/0.8 everywhere, dropped ones are 0 everywhere.
    let kept_value = y.max().double_value(&[]);
    assert!((kept_value - 1.25).abs() < 1e-6);
    assert!((y.mean(Kind::Double).double_value(&[]) - 1.0).abs() < 0.02);
}

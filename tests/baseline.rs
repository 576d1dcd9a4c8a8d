//! Random and RL baselines on DARTS's space: runs, exact resume, time budget, the best sample as the result.
use darts::baseline::{self, BaselineConfig, Strategy};
use darts::data::DatasetKind;
use darts::network::NetworkConfig;
use darts::run::RunOptions;
use darts::space::SearchSpace;
use tch::Device;

fn tiny(strategy: Strategy, samples: usize) -> BaselineConfig {
    BaselineConfig {
        dataset: DatasetKind::Builtin,
        limit: Some(96),
        space: SearchSpace { nodes: 2, ..Default::default() },
        samples,
        network: NetworkConfig { channels: 4, layers: 3, auxiliary: false, ..Default::default() },
        epochs: 1,
        batch_size: 16,
        controller_lr: 0.2,
        ..BaselineConfig::quick(strategy)
    }
}

fn opts(dir: &std::path::Path, stop_after: Option<usize>) -> RunOptions {
    RunOptions { progress: false, stop_after, ..RunOptions::new(dir.to_path_buf(), Device::Cpu) }
}

#[test]
fn an_rl_run_resumed_midway_ends_as_an_uninterrupted_one() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = baseline::start(tiny(Strategy::Rl, 3), &opts(a.path(), None)).unwrap();
    assert!(full.finished && full.samples.len() == 3);
    let part = baseline::start(tiny(Strategy::Rl, 3), &opts(b.path(), Some(1))).unwrap();
    assert!(!part.finished && part.samples.len() == 1);
    assert!(!b.path().join("genotype.json").exists());
    let rest = baseline::resume(&opts(b.path(), None)).unwrap();
    assert!(rest.finished);
    let key = |o: &baseline::BaselineOutcome| -> Vec<(String, f64)> {
        o.samples.iter().map(|s| (s.genotype.to_string(), s.val_acc)).collect()
    };
    assert_eq!(key(&full), key(&rest));
    assert_eq!(full.policy, rest.policy, "the policy after resuming is the uninterrupted one");
    assert_ne!(full.policy, baseline::Policy::uniform(&tiny(Strategy::Rl, 3).space), "REINFORCE moved the policy");
    // The result is the best sample, written as the run's genotype.
    let best = full.samples.iter().map(|s| s.val_acc).fold(0.0, f64::max);
    assert_eq!(full.best_acc, best);
    let written = std::fs::read_to_string(a.path().join("genotype.txt")).unwrap();
    assert_eq!(written.trim(), full.best.to_string());
    // The report is the commands' to write (drivers never call it): as `darts baseline` does.
    darts::report::write_report(a.path()).unwrap();
    assert!(a.path().join("figures/samples.svg").exists() && a.path().join("figures/samples.png").exists());
    let html = std::fs::read_to_string(a.path().join("report.html")).unwrap();
    assert!(html.contains("rl search") && html.contains("best score") && html.contains("<h2>Samples</h2>"));
    assert_eq!(html.matches("<img ").count(), 3, "both cells and the samples chart");
    let lines = std::fs::read_to_string(a.path().join("samples.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    assert!(full.samples.iter().all(|s| s.baseline.is_some() && s.entropy.is_some() && s.seconds > 0.0));
}

#[test]
fn random_search_samples_differ_and_a_time_budget_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = baseline::start(tiny(Strategy::Random, 3), &opts(dir.path(), None)).unwrap();
    let genotypes: std::collections::HashSet<String> = out.samples.iter().map(|s| s.genotype.to_string()).collect();
    assert_eq!(genotypes.len(), 3, "three different cells");
    assert!(out.samples.iter().all(|s| s.baseline.is_none() && (0.0..=1.0).contains(&s.val_acc)));
    let again = tempfile::tempdir().unwrap();
    let budget = BaselineConfig { budget_seconds: Some(1e-3), ..tiny(Strategy::Random, 3) };
    let cut = baseline::start(budget, &opts(again.path(), None)).unwrap();
    assert!(cut.finished && cut.samples.len() == 1, "the first sample spends the budget");
    assert_eq!(cut.samples[0].genotype, out.samples[0].genotype, "same seed, same first sample");
    let e = baseline::start(tiny(Strategy::Random, 3), &opts(dir.path(), None)).unwrap_err().to_string();
    assert!(e.contains("already holds"), "{e}");
}

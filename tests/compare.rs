//! DARTS against random search and RL: every stage runs, budgets are honoured, and a second call continues
//! (here: finds everything done) instead of starting over.
use darts::baseline::Strategy;
use darts::compare::{compare, table, CompareConfig};
use darts::network::NetworkConfig;
use darts::run::RunOptions;
use darts::space::SearchSpace;
use tch::Device;

#[test]
fn darts_random_and_rl_are_compared_on_equal_budgets_and_a_rerun_continues() {
    let mut c = CompareConfig::quick();
    c.search.limit = Some(96);
    c.search.space = SearchSpace { channels: 4, layers: 3, nodes: 2, ..Default::default() };
    c.search.epochs = 1;
    c.search.batch_size = 16;
    c.baseline.limit = Some(96);
    c.baseline.space = c.search.space.clone();
    c.baseline.network = NetworkConfig { channels: 4, layers: 3, auxiliary: false, ..Default::default() };
    c.baseline.epochs = 1;
    c.baseline.batch_size = 16;
    c.baseline.samples = 50;
    c.train.limit = Some(64);
    c.train.network.channels = 4;
    c.train.network.layers = 3;
    c.train.epochs = 1;
    c.train.batch_size = 32;
    let dir = tempfile::tempdir().unwrap();
    let base = RunOptions { progress: false, ..RunOptions::new(dir.path().to_path_buf(), Device::Cpu) };
    let out = compare(&c, dir.path(), &base).unwrap();
    let names: Vec<&str> = out.methods.iter().map(|m| m.method.name()).collect();
    assert_eq!(names, vec!["darts", Strategy::Random.name(), Strategy::Rl.name()]);
    let darts_seconds = out.methods[0].search_seconds;
    assert!(darts_seconds > 0.0);
    for m in &out.methods {
        m.genotype.validate().unwrap();
        assert!(m.parameters > 0 && (0.0..=1.0).contains(&m.test_top1) && m.train_seconds > 0.0, "{m:?}");
        if m.method != darts::rundir::Method::Darts {
            // Sampling stops at the first sample that reaches DARTS's search time (or at the sample cap).
            assert!(m.search_seconds >= darts_seconds || m.architectures_trained == 50, "{m:?}");
            assert!(m.architectures_trained >= 1);
        }
    }
    let md = std::fs::read_to_string(dir.path().join("compare.md")).unwrap();
    assert_eq!(md, table(&out));
    assert_eq!(md.lines().filter(|l| l.starts_with('|')).count(), 5, "header, rule, three methods");
    assert!(md.contains("Which split chose what") && md.contains("chose nothing"), "{md}");
    // The report is the commands' to write (drivers never call it): as `darts compare` does.
    darts::report::write_report(dir.path()).unwrap();
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.contains("DARTS against random search and RL") && !html.contains("<h2>Summary</h2>"));
    assert_eq!(html.matches("<img ").count(), 6, "two cells per method");
    // A second call finds every stage finished and gives the same table.
    let again = compare(&c, dir.path(), &base).unwrap();
    assert_eq!(table(&again), md);
}

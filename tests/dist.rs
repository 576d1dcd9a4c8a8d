//! Data parallelism over libtorch's c10d (TCPStore + ProcessGroupGloo) between processes on 127.0.0.1: the
//! collectives against hand-computed values, and `darts train` launched as torchrun launches it.
use darts::dist::{Dist, Launch};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use tch::{Kind, Tensor};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// torchrun's variables for `rank` of `world` with the store at 127.0.0.1:`port`.
fn torchrun_env(cmd: &mut Command, rank: usize, world: usize, port: u16) {
    cmd.env("WORLD_SIZE", world.to_string())
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("DARTS_DIST_TIMEOUT", "120")
        .env("OMP_WAIT_POLICY", "PASSIVE");
}

/// Starts `world` processes made by `make(rank)` together and waits for all of them.
fn run_ranks(world: usize, make: impl Fn(usize) -> Command) -> Vec<Output> {
    let children: Vec<_> = (0..world)
        .map(|r| make(r).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start a rank"))
        .collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

/// One rank of `collectives_agree_with_hand_computed_values`: runs the collectives, writes what it got.
fn collectives_worker(out: &Path) {
    let launch = Launch::from_env().unwrap().expect("torchrun's variables");
    let d = Dist::join(launch, 60).unwrap();
    let r = d.rank() as f64;
    // Rank r holds gradients (r + 1) * [1, 2, 3] and [[r]], from 10 (r + 1) examples: the average weighted by
    // examples is (10 [1, 2, 3] + 20 [2, 4, 6]) / 30 = [5/3, 10/3, 5] and (10 * 0 + 20 * 1) / 30 = 2/3.
    let mut grads =
        vec![Tensor::from_slice(&[1.0f32, 2.0, 3.0]) * (r + 1.0), Tensor::from_slice(&[r as f32]).reshape([1, 1])];
    d.average_gradients(&mut grads, 10.0 * (r + 1.0)).unwrap();
    let averaged: Vec<f64> =
        grads.iter().flat_map(|g| Vec::<f64>::try_from(g.to_kind(Kind::Double).flatten(0, -1)).unwrap()).collect();
    // Broadcast of tensors of two element types from rank 1.
    let (f, i) = (Tensor::from_slice(&[r as f32, 2.0 * r as f32]), Tensor::from_slice(&[7 * d.rank() as i64]));
    d.broadcast(&[&f, &i], 1).unwrap();
    let broadcast = (Vec::<f64>::try_from(f.to_kind(Kind::Double)).unwrap(), i.int64_value(&[0]));
    let sums = d.sum_f64(&[r + 1.0, 0.5]).unwrap();
    let same = d.check_identical("same", &[Tensor::from_slice(&[1.5f32, -2.0])]).is_ok();
    let differ = d.check_identical("the test tensors", &[Tensor::from_slice(&[1.5f32 + r as f32 * 1e-6])]);
    let message = differ.err().map(|e| e.to_string()).unwrap_or_default();
    d.barrier().unwrap();
    let result = serde_json::json!({
        "averaged": averaged, "broadcast_f": broadcast.0, "broadcast_i": broadcast.1, "sums": sums,
        "same": same, "differ": message,
    });
    std::fs::write(out.join(format!("rank{}.json", d.rank())), result.to_string()).unwrap();
}

#[test]
fn collectives_agree_with_hand_computed_values() {
    if let Ok(out) = std::env::var("DARTS_DIST_WORKER") {
        collectives_worker(Path::new(&out));
        return;
    }
    assert!(Dist::available(), "darts was built without c10d: scripts/setup.sh installs libgloo-dev (as root)");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let outs = run_ranks(2, |rank| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "collectives_agree_with_hand_computed_values", "--nocapture", "--test-threads", "1"]);
        torchrun_env(&mut cmd, rank, 2, port);
        cmd.env("DARTS_DIST_WORKER", dir.path());
        cmd
    });
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    for r in 0..2 {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(format!("rank{r}.json"))).unwrap()).unwrap();
        let got: Vec<f64> = v["averaged"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        for (g, want) in got.iter().zip([5.0 / 3.0, 10.0 / 3.0, 5.0, 2.0 / 3.0]) {
            assert!((g - want).abs() < 1e-6, "rank {r}: averaged {got:?}");
        }
        assert_eq!(v["broadcast_f"], serde_json::json!([1.0, 2.0]), "rank {r}");
        assert_eq!(v["broadcast_i"], 7, "rank {r}");
        assert_eq!(v["sums"], serde_json::json!([3.0, 1.0]), "rank {r}");
        assert_eq!(v["same"], true, "rank {r}");
        let m = v["differ"].as_str().unwrap();
        assert!(m.contains("the test tensors differ between ranks") && m.contains("1 of 2"), "rank {r}: {m}");
    }
}

/// `darts train` as two processes with torchrun's variables: rank 0 writes the run directory and prints, rank 1
/// computes and writes nothing, every epoch's check that the ranks hold identical weights passes, and the
/// metrics cover the global batch; a resumed run continues; unsupported commands and a missing --out are refused.
#[test]
fn darts_train_runs_data_parallel_and_the_ranks_agree() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dp");
    let train = |extra: &[&str], port: u16| {
        run_ranks(2, |rank| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_darts"));
            cmd.args(["train", "--threads", "1", "--quiet", "--device", "cpu"]).args(extra);
            torchrun_env(&mut cmd, rank, 2, port);
            cmd
        })
    };
    let settings =
        ["--genotype", "DARTS_V2", "--limit", "100", "--channels", "4", "--layers", "3", "--batch-size", "32"];
    let outs = train(
        &[&settings[..], &["--epochs", "2", "--seed", "4", "--out", out.to_str().unwrap()]].concat(),
        free_port(),
    );
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let (err0, err1) = (String::from_utf8_lossy(&outs[0].stderr), String::from_utf8_lossy(&outs[1].stderr));
    assert!(err0.contains("epoch 2/2") && !err1.contains("epoch"), "rank 0 speaks, rank 1 is quiet:\n{err0}\n{err1}");
    assert!(!outs[0].stdout.is_empty() && outs[1].stdout.is_empty());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one record per epoch, written once");
    assert!(lines.iter().all(|l| l["train_loss"].as_f64().unwrap().is_finite()));
    // 100 examples in batches of 32: the last global batch has 4, two per rank; the test set is shared out too.
    let eval: serde_json::Value = serde_json::from_slice(&outs[0].stdout).unwrap();
    assert_eq!(eval["examples"], 100);
    assert!(out.join("model-last.safetensors").is_file() && out.join("checkpoint.safetensors").is_file());
    // Resume: both ranks read the checkpoint and continue; --epochs cannot change (the run's settings are fixed),
    // so a finished run returns at once with the same test result.
    let again = train(&["--resume", out.to_str().unwrap()], free_port());
    for (r, o) in again.iter().enumerate() {
        assert!(o.status.success(), "resume, rank {r}: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&again[0].stdout).unwrap(), eval);
    // Without --out the ranks could pick different time-stamped directories: refused.
    let no_out = train(&[&settings[..], &["--epochs", "1"]].concat(), free_port());
    for o in &no_out {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("needs --out"), "{e}");
    }
    // Commands that are not data-parallel yet say so instead of running N copies.
    let mut compare = Command::new(env!("CARGO_BIN_EXE_darts"));
    compare.args(["compare", "--search-epochs", "1"]);
    torchrun_env(&mut compare, 0, 2, free_port());
    let o = compare.output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("does not run data-parallel yet"), "{e}");
}

/// `darts run` as two processes: a second-order search with skip dropout (every gradient of the unrolled step
/// averaged, every epoch's check that weights, alphas and both optimisers agree), then the training of the
/// derived cell; rank 0 writes both stages and the summary.
#[test]
fn darts_run_searches_second_order_and_trains_data_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let port = free_port();
    let outs = run_ranks(2, |rank| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_darts"));
        cmd.args(["run", "--preset", "quick", "--limit", "96", "--search-channels", "4", "--search-layers", "3"]);
        cmd.args(["--nodes", "2", "--search-epochs", "2", "--search-batch-size", "16", "--order", "second"]);
        cmd.args(["--skip-dropout", "0.3", "--train-epochs", "1", "--train-channels", "4", "--train-layers", "3"]);
        cmd.args(["--train-batch-size", "16", "--threads", "1", "--quiet", "--device", "cpu", "--out"]).arg(&out);
        torchrun_env(&mut cmd, rank, 2, port);
        cmd
    });
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("search/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 2);
    assert_eq!(metrics[1]["unrolled_lr"], metrics[1]["lr"], "the unrolled step ran with the epoch's rate");
    let summary: serde_json::Value = serde_json::from_slice(&outs[0].stdout).unwrap();
    assert_eq!(summary["finished"], true);
    assert!(outs[1].stdout.is_empty());
    let searched = std::fs::read_to_string(out.join("search/genotype.txt")).unwrap();
    assert_eq!(searched, std::fs::read_to_string(out.join("train/genotype.txt")).unwrap());
}

/// Under torchrun itself (from darts' own venv), when it is there: the agent serves the store.
#[test]
fn darts_train_runs_under_torchrun() {
    let cache =
        std::env::var("DARTS_CACHE").unwrap_or_else(|_| format!("{}/.cache/darts", std::env::var("HOME").unwrap()));
    let torchrun = format!("{cache}/venv/bin/torchrun");
    assert!(Path::new(&torchrun).is_file(), "{torchrun} missing: run scripts/setup.sh first");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tr");
    let port = free_port().to_string();
    let o = Command::new(&torchrun)
        .args(["--no-python", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", &port])
        .arg(env!("CARGO_BIN_EXE_darts"))
        .args(["train", "--genotype", "DARTS_V2", "--limit", "64", "--channels", "4", "--layers", "3"])
        .args(["--epochs", "1", "--batch-size", "16", "--threads", "1", "--quiet", "--device", "cpu", "--out"])
        .arg(&out)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 1);
}

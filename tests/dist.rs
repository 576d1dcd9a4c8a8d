//! Data parallelism over libtorch's c10d (TCPStore + ProcessGroupGloo) between processes on 127.0.0.1: the
//! collectives against hand-computed values, and `darts train` launched as torchrun launches it.
#[allow(dead_code)]
mod common;
use darts::architect::{global_norm, Architect, Order};
use darts::dist::{Dist, Launch};
use darts::optim::Sgd;
use darts::params::Params;
use darts::space::{Activation, DataShape, OpKind, SearchSpace};
use darts::supernet::{Alphas, SearchNetwork};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use tch::{nn, Device, Kind, Tensor};

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
    let d = Dist::join(launch, 60, tch::Device::Cpu).unwrap();
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
    // Stopped after one epoch and resumed, the data-parallel run ends with the uninterrupted one's bytes.
    let part = dir.path().join("part");
    let first = train(
        &[&settings[..], &["--epochs", "2", "--seed", "4", "--stop-after", "1"], &["--out", part.to_str().unwrap()]]
            .concat(),
        free_port(),
    );
    assert!(first.iter().all(|o| o.status.success()), "{}", String::from_utf8_lossy(&first[0].stderr));
    let rest = train(&["--resume", part.to_str().unwrap()], free_port());
    assert!(rest.iter().all(|o| o.status.success()), "{}", String::from_utf8_lossy(&rest[0].stderr));
    for file in ["checkpoint.safetensors", "model-last.safetensors"] {
        let (a, b) = (std::fs::read(out.join(file)).unwrap(), std::fs::read(part.join(file)).unwrap());
        assert!(a == b, "{file} differs after a data-parallel resume");
    }
    // darts eval shares the test set out over the ranks and adds up: the single process's numbers.
    let eval_port = free_port();
    let eval2 = run_ranks(2, |rank| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_darts"));
        cmd.args(["eval", "--model"]).arg(&out).args(["--threads", "1", "--device", "cpu"]);
        torchrun_env(&mut cmd, rank, 2, eval_port);
        cmd
    });
    assert!(eval2.iter().all(|o| o.status.success()), "{}", String::from_utf8_lossy(&eval2[1].stderr));
    let one = Command::new(env!("CARGO_BIN_EXE_darts"))
        .args(["eval", "--model"])
        .arg(&out)
        .args(["--threads", "1", "--device", "cpu"])
        .output()
        .unwrap();
    let (a, b): (serde_json::Value, serde_json::Value) =
        (serde_json::from_slice(&eval2[0].stdout).unwrap(), serde_json::from_slice(&one.stdout).unwrap());
    assert_eq!((&a["top1"], &a["examples"]), (&b["top1"], &b["examples"]));
    // float32 forward passes over other batch compositions: equal to float32 rounding.
    assert!((a["loss"].as_f64().unwrap() - b["loss"].as_f64().unwrap()).abs() < 1e-5, "{a} vs {b}");
    assert!(eval2[1].stdout.is_empty());
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
    let torchrun = format!("{}/venv/bin/torchrun", common::darts_cache());
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

/// A small smooth supernet in float64 with a momentum buffer as after some steps, and a training and a validation
/// batch of 8, the same in every process (built from one seed on the CPU).
struct Fixture {
    _vs: nn::VarStore,
    net: SearchNetwork,
    params: Params,
    sgd: Sgd,
    xt: Tensor,
    yt: Tensor,
    xv: Tensor,
    yv: Tensor,
}

fn fixture() -> Fixture {
    tch::manual_seed(31);
    let ops = vec![OpKind::None, OpKind::AvgPool3x3, OpKind::SkipConnect, OpKind::SepConv3x3];
    let space =
        SearchSpace { ops, channels: 4, layers: 3, nodes: 2, activation: Activation::Gelu, ..Default::default() };
    let shape = DataShape { channels: 2, height: 8, width: 8, classes: 4 };
    let mut vs = nn::VarStore::new(Device::Cpu);
    let opts = (Kind::Double, Device::Cpu);
    let a = || (Tensor::randn([5, 4], opts) * 0.5).set_requires_grad(true);
    let net =
        SearchNetwork::new(&vs.root(), &space, &shape, Alphas { normal: a(), reduce: a(), betas: None, nodes: 2 });
    vs.double();
    let params = Params::of(&vs);
    let mut sgd = Sgd::new(&params.weights, 0.1, 0.9, 3e-4);
    sgd.buffers = params.weights.iter().map(|w| w.randn_like() * 0.05).collect();
    let labels = |v: [i64; 8]| Tensor::from_slice(&v);
    Fixture {
        xt: Tensor::randn([8, 2, 8, 8], opts),
        yt: labels([0, 1, 2, 3, 3, 2, 1, 0]),
        xv: Tensor::randn([8, 2, 8, 8], opts),
        yv: labels([1, 1, 0, 0, 2, 3, 2, 3]),
        _vs: vs,
        net,
        params,
        sgd,
    }
}

/// Rows 0..3 of a batch for rank 0, 3..8 for rank 1: unequal shards, so the average must weight by examples.
const CUT: i64 = 3;

fn shard_of(x: &Tensor, rank: usize) -> Tensor {
    if rank == 0 {
        x.narrow(0, 0, CUT)
    } else {
        x.narrow(0, CUT, 8 - CUT)
    }
}

/// A rank of `the_data_parallel_hypergradient_is_the_shard_average_at_every_step`: its shards' second-order
/// hypergradient, averaged over the two processes.
fn hypergradient_worker(out: &Path) {
    let d = std::sync::Arc::new(Dist::join(Launch::from_env().unwrap().unwrap(), 60, tch::Device::Cpu).unwrap());
    let f = fixture();
    let r = d.rank();
    let mut arch = Architect::new(&f.net, Order::Second, 3e-4, (0.5, 0.999), 1e-3);
    arch.dist = Some(d.clone());
    let (xt, yt, xv, yv) = (shard_of(&f.xt, r), shard_of(&f.yt, r), shard_of(&f.xv, r), shard_of(&f.yv, r));
    let h = arch
        .averaged_hypergradient(&f.net, &f.params.weights, &f.params.buffers, &f.sgd, (&xt, &yt), (&xv, &yv), 0.1)
        .unwrap();
    let named: Vec<(String, Tensor)> = h.into_iter().enumerate().map(|(i, t)| (format!("h{i}"), t)).collect();
    Tensor::write_safetensors(&named, out.join(format!("rank{r}.safetensors"))).unwrap();
}

/// The gradients of `loss` on each shard separately (each its own batch-normalisation statistics, as each
/// process computes them), averaged by the shards' examples: what a data-parallel step averages.
fn shard_average(f: &Fixture, x: &Tensor, y: &Tensor, wrt: &[&Tensor]) -> Vec<Tensor> {
    let mut sum: Option<Vec<Tensor>> = None;
    for r in 0..2 {
        let (xs, ys) = (shard_of(x, r), shard_of(y, r));
        let n = xs.size()[0] as f64;
        let g = Tensor::run_backward(&[f.net.loss(&xs, &ys)], wrt, false, false);
        let g: Vec<Tensor> = g.iter().map(|t| t * n).collect();
        sum = Some(match sum {
            None => g,
            Some(s) => s.iter().zip(&g).map(|(a, b)| a + b).collect(),
        });
    }
    sum.unwrap().iter().map(|t| t / 8.0).collect()
}

/// Second order across two processes with unequal shards equals the original's unrolled step computed in one
/// process from the shard-averaged gradients: the training gradient of the unrolled step, the validation
/// gradients at the unrolled weights (alpha's, and the weights' that set the Hessian direction) and both
/// finite-difference gradients, each averaged by examples. Leaving any one reduction out changes the result.
#[test]
fn the_data_parallel_hypergradient_is_the_shard_average_at_every_step() {
    if let Ok(out) = std::env::var("DARTS_DIST_HYPER_WORKER") {
        hypergradient_worker(Path::new(&out));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let name = "the_data_parallel_hypergradient_is_the_shard_average_at_every_step";
    let outs = run_ranks(2, |rank| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", name, "--nocapture", "--test-threads", "1"]);
        torchrun_env(&mut cmd, rank, 2, port);
        cmd.env("DARTS_DIST_HYPER_WORKER", dir.path());
        cmd
    });
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", String::from_utf8_lossy(&o.stderr));
    }
    // The reference, by hand in one process.
    let f = fixture();
    let eta = 0.1;
    let w = &f.params.weights;
    let theta: Vec<Tensor> = w.iter().map(|t| t.detach().copy()).collect();
    let w_refs: Vec<&Tensor> = w.iter().collect();
    let g = shard_average(&f, &f.xt, &f.yt, &w_refs);
    let set = |values: &[Tensor]| {
        tch::no_grad(|| {
            for (t, v) in w.iter().zip(values) {
                t.shallow_clone().copy_(v);
            }
        })
    };
    let unrolled: Vec<Tensor> =
        theta.iter().zip(&g).zip(&f.sgd.buffers).map(|((t, gi), b)| t - (b * 0.9 + gi + t * 3e-4) * eta).collect();
    set(&unrolled);
    let alphas = f.net.alphas.tensors();
    let mut inputs: Vec<&Tensor> = alphas.clone();
    inputs.extend(w.iter());
    let grads = shard_average(&f, &f.xv, &f.yv, &inputs);
    let (dalpha, v) = grads.split_at(2);
    let big_r = 0.01 / global_norm(v).double_value(&[]);
    let shifted = |sign: f64| -> Vec<Tensor> {
        set(&theta.iter().zip(v).map(|(t, vi)| t + vi * (big_r * sign)).collect::<Vec<_>>());
        shard_average(&f, &f.xt, &f.yt, &alphas)
    };
    let (gp, gn) = (shifted(1.0), shifted(-1.0));
    set(&theta);
    let want: Vec<Tensor> =
        dalpha.iter().zip(gp.iter().zip(&gn)).map(|(d, (p, n))| d - (p - n) / (2.0 * big_r) * eta).collect();
    for r in 0..2 {
        let got = Tensor::read_safetensors(dir.path().join(format!("rank{r}.safetensors"))).unwrap();
        for (i, want) in want.iter().enumerate() {
            let (_, h) = got.iter().find(|(n, _)| *n == format!("h{i}")).unwrap();
            let err = (h - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
            assert!(err < 1e-9, "rank {r}, alpha tensor {i}: relative difference {err}");
        }
    }
    // The same computation without the data-parallel averages (rank 0's shard alone) is another answer: the
    // comparison can tell.
    let alone = Architect::new(&f.net, Order::Second, 3e-4, (0.5, 0.999), 1e-3);
    let (xt, yt, xv, yv) = (shard_of(&f.xt, 0), shard_of(&f.yt, 0), shard_of(&f.xv, 0), shard_of(&f.yv, 0));
    let h0 = alone.hypergradient(&f.net, w, &f.params.buffers, &f.sgd, (&xt, &yt), (&xv, &yv), eta);
    let off = (&h0[0] - &want[0]).abs().max().double_value(&[]) / want[0].abs().max().double_value(&[]);
    assert!(off > 1e-3, "one shard's hypergradient is the average's: {off}");
}

/// Ranks started with different settings are refused at start, every one of them, with a clear error.
#[test]
fn ranks_with_different_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let outs = run_ranks(2, |rank| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_darts"));
        cmd.args(["train", "--genotype", "DARTS_V2", "--limit", "64", "--channels", "4", "--layers", "3"]);
        cmd.args(["--epochs", "1", "--batch-size", "16", "--threads", "1", "--quiet", "--device", "cpu"]);
        cmd.args(["--seed", &rank.to_string(), "--out"]).arg(dir.path().join("run"));
        torchrun_env(&mut cmd, rank, 2, port);
        cmd
    });
    for (r, o) in outs.iter().enumerate() {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("started with other settings than rank 0"), "rank {r}: {e}");
    }
    assert!(!dir.path().join("run/checkpoint.safetensors").exists());
}

/// A rank killed in the middle of a run: the other exits non-zero within the c10d timeout, saying what happened
/// and that the checkpoint is intact; the same command on both ranks resumes and ends with the bytes of an
/// uninterrupted two-process run. The metrics report the time spent in collectives.
#[test]
fn a_dead_rank_stops_the_others_and_the_same_command_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let command = |out: &Path, rank: usize, port: u16| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_darts"));
        cmd.args(["train", "--genotype", "DARTS_V2", "--limit", "600", "--channels", "4", "--layers", "3"]);
        cmd.args(["--epochs", "4", "--batch-size", "32", "--seed", "6", "--threads", "1", "--quiet"]);
        cmd.args(["--device", "cpu", "--out"]).arg(out);
        torchrun_env(&mut cmd, rank, 2, port);
        cmd.env("DARTS_DIST_TIMEOUT", "30");
        cmd
    };
    let (whole, broken) = (dir.path().join("whole"), dir.path().join("broken"));
    let port = free_port();
    let outs = run_ranks(2, |r| command(&whole, r, port));
    assert!(outs.iter().all(|o| o.status.success()), "{}", String::from_utf8_lossy(&outs[0].stderr));
    let comm: Vec<f64> = std::fs::read_to_string(whole.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["comm_seconds"].as_f64().unwrap())
        .collect();
    assert!(comm.iter().all(|&c| c > 0.0), "time in collectives: {comm:?}");
    let port = free_port();
    let mut ranks: Vec<_> = (0..2)
        .map(|r| command(&broken, r, port).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    // Kill rank 1 once the first epoch is written.
    let started = std::time::Instant::now();
    while !broken.join("metrics.jsonl").is_file() {
        assert!(started.elapsed().as_secs() < 120, "the first epoch never ended");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ranks[1].kill().unwrap();
    let _ = ranks[1].wait();
    let waited = std::time::Instant::now();
    let rank0 = ranks.remove(0).wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&rank0.stderr);
    assert!(!rank0.status.success(), "rank 0 went on alone: {e}");
    assert!(waited.elapsed().as_secs() < 60, "rank 0 took {:?} to notice", waited.elapsed());
    assert!(e.contains("rank 0:") && e.contains("another rank stopped") && e.contains("intact"), "{e}");
    let port = free_port();
    let again = run_ranks(2, |r| command(&broken, r, port));
    assert!(again.iter().all(|o| o.status.success()), "{}", String::from_utf8_lossy(&again[0].stderr));
    for file in ["checkpoint.safetensors", "model-last.safetensors"] {
        assert!(std::fs::read(whole.join(file)).unwrap() == std::fs::read(broken.join(file)).unwrap(), "{file}");
    }
}

/// GDAS on two processes: every rank samples the same ops (one shared stream), averages the gradients of the
/// sampled ones and leaves the others' undefined alike; every epoch's check that weights, alphas and both
/// optimisers agree passes, and rank 0 writes one genotype.
#[test]
fn a_gdas_search_runs_data_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gdas");
    let port = free_port();
    let outs = run_ranks(2, |rank| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_darts"));
        cmd.args(["search", "--preset", "quick", "--gdas", "--limit", "128", "--channels", "4", "--layers", "3"]);
        cmd.args(["--nodes", "2", "--epochs", "2", "--batch-size", "16", "--threads", "1", "--quiet"]);
        cmd.args(["--device", "cpu", "--out"]).arg(&out);
        torchrun_env(&mut cmd, rank, 2, port);
        cmd
    });
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);
    let g = darts::genotype::Genotype::from_json(&std::fs::read_to_string(out.join("genotype.json")).unwrap());
    g.unwrap().validate().unwrap();
    assert!(outs[1].stdout.is_empty() && !outs[0].stdout.is_empty());
}

/// Inside an epoch on two processes, for a training and a search: SIGTERM to one rank stops both at the same step
/// after a checkpoint that holds every rank's place in the data and its BatchNorm statistics (exit code 75); the
/// same command continues, and the run ends with the bytes of an uninterrupted two-process run.
#[test]
fn data_parallel_runs_stopped_inside_an_epoch_continue_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let train = |out: &Path, rank: usize, port: u16| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_darts"));
        cmd.args(["train", "--genotype", "DARTS_V2", "--limit", "600", "--channels", "4", "--layers", "3"]);
        cmd.args(["--epochs", "2", "--batch-size", "32", "--seed", "9", "--threads", "1", "--quiet"]);
        cmd.args(["--checkpoint-every", "3", "--drop-path", "0.2", "--device", "cpu", "--out"]).arg(out);
        torchrun_env(&mut cmd, rank, 2, port);
        cmd
    };
    let search = |out: &Path, rank: usize, port: u16| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_darts"));
        cmd.args(["search", "--preset", "quick", "--limit", "400", "--channels", "4", "--layers", "3"]);
        cmd.args(["--nodes", "2", "--epochs", "2", "--batch-size", "16", "--skip-dropout", "0.3", "--seed", "9"]);
        cmd.args(["--threads", "1", "--quiet", "--checkpoint-every", "3", "--device", "cpu", "--out"]).arg(out);
        torchrun_env(&mut cmd, rank, 2, port);
        cmd
    };
    type Make<'a> = &'a dyn Fn(&Path, usize, u16) -> Command;
    for (kind, command, files) in [
        ("train", &train as Make, &["checkpoint.safetensors", "model-last.safetensors"][..]),
        ("search", &search as Make, &["checkpoint.safetensors", "genotype.json"][..]),
    ] {
        let (whole, broken) = (dir.path().join(format!("{kind}-whole")), dir.path().join(format!("{kind}-broken")));
        let port = free_port();
        let outs = run_ranks(2, |r| command(&whole, r, port));
        assert!(outs.iter().all(|o| o.status.success()), "{kind}: {}", String::from_utf8_lossy(&outs[0].stderr));
        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|r| command(&broken, r, port).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap())
            .collect();
        // The first checkpoint comes after step 3 of the first epoch: stop there, by signalling rank 1 only.
        let started = std::time::Instant::now();
        while !broken.join("checkpoint.safetensors").is_file() {
            assert!(started.elapsed().as_secs() < 120, "{kind}: no checkpoint was written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let pid = ranks[1].id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let outs: Vec<Output> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        for (r, o) in outs.iter().enumerate() {
            let e = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(75), "{kind} rank {r} did not stop at the agreed step: {e}");
            assert!(e.contains("stopped by a signal in epoch 1"), "{kind} rank {r}: {e}");
        }
        // A single process cannot take over a two-process position.
        let mut alone = command(&broken, 0, free_port());
        alone.env_remove("WORLD_SIZE").env_remove("RANK").env_remove("LOCAL_RANK");
        let o = alone.output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("2 processes"), "{kind}: {e}");
        let port = free_port();
        let again = run_ranks(2, |r| command(&broken, r, port));
        assert!(again.iter().all(|o| o.status.success()), "{kind}: {}", String::from_utf8_lossy(&again[0].stderr));
        for file in files {
            let same = std::fs::read(whole.join(file)).unwrap() == std::fs::read(broken.join(file)).unwrap();
            assert!(same, "{kind}: {file} differs from the uninterrupted run's");
        }
        // The epochs' training loss and accuracy sum every rank's running sums, rank 1's from the checkpoint.
        let sums = |d: &Path| -> Vec<(f64, f64)> {
            std::fs::read_to_string(d.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    (v["train_loss"].as_f64().unwrap(), v["train_acc"].as_f64().unwrap())
                })
                .collect()
        };
        assert_eq!(sums(&whole), sums(&broken), "{kind}: the epochs' training metrics");
    }
}

/// `darts bench --data-parallel` runs a training and a search epoch alone and on two processes and prints both
/// rows with their all-reduce share.
#[test]
fn bench_data_parallel_prints_both_epochs() {
    let out = Command::new(env!("CARGO_BIN_EXE_darts"))
        .args(["bench", "--data-parallel", "--rounds", "1", "--dp-limit", "96", "--batch", "16", "--channels", "4"])
        .args(["--layers", "3", "--final-channels", "4", "--final-layers", "3", "--final-batch", "16"])
        .args(["--threads", "2"])
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for row in ["| training epoch |", "| search epoch (first order) |"] {
        let line = text.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no {row} in {text}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        let share: f64 = cells[4].trim_end_matches('%').parse().unwrap();
        assert!(share > 0.0 && share < 100.0, "{line}");
        assert!(cells[3].ends_with('x'), "{line}");
    }
}

/// Two "nodes" on this machine, one torchrun each (`--nnodes 2 --node-rank 0/1`, one process per node, the
/// store at node 0's address): every process has LOCAL_RANK 0 and its own global RANK, as on a cluster; the
/// training runs, rank 0 alone writes, and the result equals a one-node two-process run of the same command.
#[test]
fn darts_train_runs_on_two_torchrun_nodes() {
    let torchrun = format!("{}/venv/bin/torchrun", common::darts_cache());
    assert!(Path::new(&torchrun).is_file(), "{torchrun} missing: run scripts/setup.sh first");
    let dir = tempfile::tempdir().unwrap();
    let darts_args = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = ["train", "--genotype", "DARTS_V2", "--limit", "64", "--channels", "4", "--layers"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(
            ["3", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--quiet", "--device", "cpu", "--out"]
                .map(String::from),
        );
        v.push(out.display().to_string());
        v
    };
    let (nodes, one) = (dir.path().join("nodes"), dir.path().join("one"));
    let port = free_port().to_string();
    let children: Vec<_> = (0..2)
        .map(|node| {
            Command::new(&torchrun)
                .args(["--no-python", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", &node.to_string()])
                .args(["--master-addr", "127.0.0.1", "--master-port", &port])
                .arg(env!("CARGO_BIN_EXE_darts"))
                .args(darts_args(&nodes))
                .env("OMP_WAIT_POLICY", "PASSIVE")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (node, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "node {node}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let port = free_port();
    let outs = run_ranks(2, |r| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_darts"));
        cmd.args(darts_args(&one));
        torchrun_env(&mut cmd, r, 2, port);
        cmd
    });
    assert!(outs.iter().all(|o| o.status.success()), "{}", String::from_utf8_lossy(&outs[0].stderr));
    for file in ["checkpoint.safetensors", "model-last.safetensors"] {
        let same = std::fs::read(nodes.join(file)).unwrap() == std::fs::read(one.join(file)).unwrap();
        assert!(same, "{file}: two nodes and one node of two processes differ");
    }
}

/// A world of one process that still joins a group (`DARTS_DIST_BACKEND`: how gpu-check runs NCCL on a single
/// GPU) runs every collective and ends with the plain run's checkpoint, up to the rounding of the averages
/// (sums and divisions by one); NCCL on the CPU is refused with what to do instead.
#[test]
fn a_world_of_one_joins_a_group_when_a_backend_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let train = |out: &Path, backend: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_darts"));
        c.args(["train", "--genotype", "DARTS_V2", "--limit", "64", "--channels", "4", "--layers", "3"])
            .args(["--epochs", "1", "--batch-size", "16", "--threads", "1", "--quiet", "--device", "cpu", "--out"])
            .arg(out);
        if let Some(b) = backend {
            torchrun_env(&mut c, 0, 1, free_port());
            c.env("DARTS_DIST_BACKEND", b);
        }
        c.output().unwrap()
    };
    let (plain, grouped) = (dir.path().join("plain"), dir.path().join("grouped"));
    let o = train(&plain, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train(&grouped, Some("gloo"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = |d: &Path| -> serde_json::Value {
        serde_json::from_str(std::fs::read_to_string(d.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap()
    };
    let (a, b) = (metrics(&plain), metrics(&grouped));
    assert!(a.get("comm_seconds").is_none_or(|v| v.is_null()), "the plain run joined no group: {a}");
    assert!(b["comm_seconds"].as_f64().is_some(), "the world of one ran collectives: {b}");
    let (la, lb) = (a["train_loss"].as_f64().unwrap(), b["train_loss"].as_f64().unwrap());
    assert!((la - lb).abs() <= 1e-5 * la.abs(), "train loss {la} alone, {lb} in a group of one");
    let read = |d: &Path| {
        let mut v = Tensor::read_safetensors(d.join("checkpoint.safetensors")).unwrap();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    for ((n, x), (_, y)) in read(&plain).iter().zip(&read(&grouped)) {
        if x.is_floating_point() {
            let diff = (x - y).abs().max().double_value(&[]);
            assert!(diff <= 1e-4, "{n}: {diff}");
        }
    }
    let o = train(&dir.path().join("nccl"), Some("nccl"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--device cuda"), "{err}");
}

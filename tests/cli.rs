//! The `darts` binary: errors that say what and how to fix, and a complete small search.
#[allow(dead_code)]
mod common;
use darts::genotype::Genotype;
use std::process::Command;

fn darts(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_darts")).args(args).output().expect("run darts");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn every_published_genotype_loads_and_round_trips() {
    let text = include_str!("data/published_genotypes.txt");
    let mut n = 0;
    for line in text.lines().filter(|l| l.starts_with("Genotype(")) {
        let g = Genotype::from_python(line).unwrap_or_else(|e| panic!("{e}\n{line}"));
        assert_eq!(Genotype::from_python(&g.to_string()).unwrap(), g);
        assert_eq!(Genotype::from_json(&g.to_json()).unwrap(), g);
        n += 1;
    }
    assert_eq!(n, 7);
    // Through the binary: text in, JSON out, and back.
    let v2 = text.lines().skip_while(|l| *l != "DARTS_V2").nth(1).unwrap();
    let (ok, json, err) = darts(&["genotype", v2, "--json"]);
    assert!(ok, "{err}");
    assert_eq!(Genotype::from_json(&json).unwrap(), Genotype::from_python(v2).unwrap());
}

#[test]
fn malformed_genotype_is_an_error_with_a_position() {
    let (ok, _, err) = darts(&["genotype", "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3' 1)])"]);
    assert!(!ok);
    assert!(err.contains("line 1 column") && err.contains("expected ','"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn impossible_settings_are_refused_with_a_reason() {
    for (args, want) in [
        (vec!["--channels", "15"], "even"),
        (vec!["--batch-size", "1"], "at least 2"),
        (vec!["--lr=-1"], "positive"),
        (vec!["--ops", "none,conv_9x9"], "conv_9x9"),
        (vec!["--train-portion", "1.5"], "train_portion"),
        (vec!["--dataset", "cifar10", "--data-dir", "/nonexistent"], "/nonexistent"),
        (vec!["--device", "tpu"], "unknown device"),
        (vec!["--skip-dropout", "1"], "skip_dropout"),
        (vec!["--gdas", "--tau-min", "0"], "tau_min"),
        (vec!["--gdas", "--order", "second"], "GDAS is first order"),
        (vec!["--tau-max", "5"], "--gdas"),
        (vec!["--grad-clip", "0"], "grad_clip"),
        (vec!["--weight-decay=-1"], "weight decay"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut a = vec!["search", "--quiet", "--out", dir.path().to_str().unwrap()];
        a.extend(args.iter());
        let (ok, _, err) = darts(&a);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn cuda_graphs_off_a_gpu_are_refused_before_a_run_directory_is_made() {
    for cmd in [
        vec!["search", "--preset", "quick"],
        vec!["train", "--genotype", "DARTS_V2"],
        vec!["run", "--preset", "quick"],
        vec!["bench", "--variants", "cuda-graphs", "--no-pytorch"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut a = cmd.clone();
        a.extend(["--device", "cpu", "--cuda-graphs", "--quiet", "--out", out.to_str().unwrap()]);
        if cmd[0] == "bench" {
            a.truncate(a.len() - 2);
            a.retain(|x| *x != "--cuda-graphs");
        }
        let (ok, _, err) = darts(&a);
        assert!(!ok, "{cmd:?} was accepted");
        assert!(
            err.contains("cuda-graphs") && err.contains("CUDA device") && err.contains("the CPU"),
            "{cmd:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{cmd:?}: {err}");
        assert!(!out.exists(), "{cmd:?} made {}", out.display());
    }
}

#[test]
fn a_small_search_writes_its_artefacts_and_resume_of_a_finished_run_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = [
        "search",
        "--preset",
        "quick",
        "--limit",
        "64",
        "--channels",
        "4",
        "--layers",
        "3",
        "--nodes",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--skip-dropout",
        "0.2",
        "--max-skip-connects",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out,
    ];
    let (ok, stdout, err) = darts(&args);
    assert!(ok, "{err}");
    assert!(err.contains("disjoint"), "{err}");
    let printed = Genotype::from_python(stdout.trim()).unwrap();
    let saved = Genotype::from_json(&std::fs::read_to_string(dir.path().join("genotype.json")).unwrap()).unwrap();
    assert_eq!(printed, saved);
    assert_eq!(saved.normal.len(), 4);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["space"]["channels"], 4);
    assert_eq!((config["skip_dropout"].as_f64(), config["max_skip_connects"].as_u64()), (Some(0.2), Some(1)));
    assert!(saved.normal.iter().filter(|(op, _)| op.name() == "skip_connect").count() <= 1);
    let (ok, stdout2, err) = darts(&["search", "--quiet", "--resume", out]);
    assert!(ok, "{err}");
    assert_eq!(stdout2, stdout);
    // Derived again from the metrics' architecture weights: the same cell under the run's own limit; none
    // with a limit of 0; an epoch the run does not have is refused.
    let (ok, again, err) = darts(&["genotype", out]);
    assert!(ok, "{err}");
    assert_eq!(again, stdout);
    let (ok, strict, err) = darts(&["genotype", out, "--max-skip-connects", "0", "--epoch", "1"]);
    assert!(ok && err.contains("after epoch 1 of 1"), "{err}");
    assert_eq!(
        Genotype::from_python(strict.trim())
            .unwrap()
            .normal
            .iter()
            .filter(|(op, _)| op.name() == "skip_connect")
            .count(),
        0
    );
    let (ok, _, err) = darts(&["genotype", out, "--epoch", "2"]);
    assert!(!ok && err.contains("epochs 1 to 1"), "{err}");
}

#[test]
fn the_whole_pipeline_runs_and_a_second_invocation_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = [
        "run",
        "--preset",
        "quick",
        "--limit",
        "64",
        "--search-channels",
        "4",
        "--search-layers",
        "3",
        "--nodes",
        "2",
        "--search-epochs",
        "1",
        "--search-batch-size",
        "16",
        "--order",
        "second",
        "--train-epochs",
        "1",
        "--train-channels",
        "4",
        "--train-layers",
        "3",
        "--train-batch-size",
        "16",
        "--valid-portion",
        "0.25",
        "--auxiliary-skip",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out,
    ];
    let (ok, stdout, err) = darts(&args);
    assert!(ok, "{err}");
    let search_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("search/config.json")).unwrap()).unwrap();
    assert_eq!(search_config["space"]["auxiliary_skip"], true);
    assert_eq!((search_config["order"].as_str(), search_config["batch_size"].as_u64()), (Some("second"), Some(16)));
    assert!(err.contains("how decided the cell is") && err.contains("kept ops"), "{err}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["finished"], true);
    let top1 = summary["test"]["top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1));
    let searched = std::fs::read_to_string(dir.path().join("search/genotype.txt")).unwrap();
    let trained = std::fs::read_to_string(dir.path().join("train/genotype.txt")).unwrap();
    assert_eq!(searched, trained, "the trained network is the searched genotype");
    assert!(dir.path().join("train/model-best.safetensors").is_file());
    assert_eq!(summary["best_on_validation"]["epoch"], 0, "{summary}");
    let train_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("train/train-config.json")).unwrap()).unwrap();
    assert_eq!((train_config["valid_portion"].as_f64(), train_config["batch_size"].as_u64()), (Some(0.25), Some(16)));
    for report in ["report.html", "search/report.html", "train/report.html"] {
        assert!(dir.path().join(report).is_file(), "{report} missing: {err}");
    }
    for fig in [
        "cell-normal",
        "cell-reduce",
        "alpha-normal",
        "alpha-evolution-reduce",
        "search-curves",
        "skip-connections",
        "train-curves",
    ] {
        let png = std::fs::read(dir.path().join(format!("figures/{fig}.png"))).unwrap();
        assert_eq!(&png[1..4], b"PNG", "{fig}.png");
    }
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.contains(&format!("{:.2}%", 100.0 * top1)), "the report shows the final test accuracy");
    assert!(html.contains("multiply-accumulates") && html.contains(searched.trim()), "counts and genotype");
    opens_in_a_browser(&dir.path().join("report.html"), 9);
    // The run directory stands for its trained model: eval, export and predict find train/ in it.
    let (ok, stdout3, err) = darts(&["eval", "--model", out, "--device", "cpu"]);
    assert!(ok, "{err}");
    let evaluated: serde_json::Value = serde_json::from_str(stdout3.trim()).unwrap();
    assert_eq!(evaluated["top1"], summary["test"]["top1"], "eval of the run directory tests its training");
    let (ok, _, err) = darts(&["export", "--model", out, "--which", "best"]);
    assert!(ok && dir.path().join("train/model-best.onnx").is_file(), "{err}");
    let (ok, stdout2, err) = darts(&args);
    assert!(ok, "{err}");
    assert!(err.contains("search already finished"), "{err}");
    let again: serde_json::Value = serde_json::from_str(stdout2.trim()).unwrap();
    assert_eq!(again["test"]["top1"], summary["test"]["top1"]);
    // The same directory with other settings is refused, naming what differs.
    let mut other = args.to_vec();
    let i = other.iter().position(|a| *a == "--search-epochs").unwrap();
    other[i + 1] = "2";
    let (ok, _, err) = darts(&other);
    assert!(!ok && err.contains("epochs: 1 in the run, 2 now"), "{err}");
    // A bad training setting fails before the search starts.
    let fresh = tempfile::tempdir().unwrap();
    let mut bad = args.to_vec();
    let i = bad.iter().position(|a| *a == "--out").unwrap();
    bad[i + 1] = fresh.path().to_str().unwrap();
    bad.extend(["--train-lr=-1"]);
    let (ok, _, err) = darts(&bad);
    assert!(!ok && err.contains("training settings") && err.contains("lr = -1"), "{err}");
    assert!(!fresh.path().join("search").exists(), "the search started before the training settings were checked");
    let (ok, stdout3, err) = darts(&["eval", "--model", &format!("{out}/train"), "--which", "last", "--device", "cpu"]);
    assert!(ok, "{err}");
    let eval: serde_json::Value = serde_json::from_str(stdout3.trim()).unwrap();
    assert_eq!(eval["top1"], summary["test"]["top1"]);
}

/// Loads `page` in Debian's headless chromium and checks what the page's own check records on <body>: every
/// image decoded (`data-images="n/n"`, n = `images`) and no script or resource error.
fn opens_in_a_browser(page: &std::path::Path, images: usize) {
    let chromium = std::env::var("DARTS_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot start {chromium} ({e}): install Debian's chromium (scripts/setup.sh does, as root)")
        });
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    let dom = String::from_utf8_lossy(&out.stdout);
    let body = dom.split("<body").nth(1).and_then(|b| b.split('>').next()).expect("no <body> in the DOM");
    assert!(body.contains(&format!("data-images=\"{images}/{images}\"")), "images: <body{body}>");
    assert!(body.contains("data-errors=\"0\""), "errors: <body{body}>");
    assert!(dom.contains("<div id=\"load-problems\"></div>"), "the page shows a load problem");
}

#[test]
fn show_draws_a_zoo_cell_in_the_terminal_and_as_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cells");
    let (ok, stdout, err) = darts(&["show", "DARTS_V2", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(stdout.contains("normal cell") && stdout.contains("reduce cell"), "{stdout}");
    assert!(stdout.contains("output c_{k} = concat(0, 1, 2, 3)"), "{stdout}");
    for kind in ["normal", "reduce"] {
        let dot = std::fs::read_to_string(out.join(format!("{kind}.dot"))).unwrap();
        assert_eq!(dot.matches("->").count(), 20, "8 ops in and out, 4 into the output");
        let svg = std::fs::read_to_string(out.join(format!("{kind}.svg"))).unwrap();
        assert!(svg.contains("c_{k-2}") && svg.contains("c_{k}"));
        let png = std::fs::read(out.join(format!("{kind}.png"))).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
    let (ok, _, err) = darts(&["show", "Genotype(normal=[('sep_conv_3x3', 0)]", "--no-files"]);
    assert!(!ok && err.contains("line 1"), "a malformed genotype is an error with its position: {err}");
}

#[test]
fn info_prints_the_published_darts_v2_size() {
    let (ok, stdout, err) = darts(&["info", "DARTS_V2"]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(stdout.lines().nth(1).unwrap()).unwrap();
    assert_eq!(json["parameters"], 3_349_342);
    let (ok, _, err) = darts(&["info", "NO_SUCH_CELL"]);
    assert!(!ok && err.contains("zoo name"), "{err}");
}

#[test]
fn every_subcommand_parses_its_arguments_and_bench_runs() {
    for cmd in [
        "search", "train", "eval", "run", "info", "bench", "genotype", "show", "report", "baseline", "compare", "data",
        "export", "predict",
    ] {
        let (ok, stdout, err) = darts(&[cmd, "--help"]);
        assert!(ok, "{cmd} --help: {err}");
        assert!(stdout.contains("--device") && stdout.contains("--threads"), "{cmd}: {stdout}");
    }
    let (ok, stdout, err) = darts(&[
        "bench",
        "--only",
        "forward,final_train_step",
        "--batch",
        "2",
        "--size",
        "8",
        "--channels",
        "2",
        "--layers",
        "3",
        "--final-channels",
        "2",
        "--final-layers",
        "3",
        "--final-batch",
        "2",
        "--repeats",
        "1",
        "--no-pytorch",
        "--variants",
        "channels-last,checkpoint",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("| forward |") && stdout.contains("| final_train_step |"), "{stdout}");
    assert!(stdout.contains("darts-rs (channels-last)") && stdout.contains("darts-rs (checkpoint)"), "{stdout}");
    let forward = stdout.lines().find(|l| l.starts_with("| forward |")).unwrap();
    assert_eq!(forward.matches('(').count(), 2, "two measured cells, one per variant: {forward}");
    let (ok, stdout, err) = darts(&[
        "bench",
        "--profile",
        "--batch",
        "2",
        "--size",
        "8",
        "--channels",
        "2",
        "--layers",
        "3",
        "--repeats",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]);
    assert!(ok, "{err}");
    // Every candidate op but none runs on each of the 14 edges of each of the 3 cells.
    for op in
        ["max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    {
        let row =
            stdout.lines().find(|l| l.starts_with(&format!("| {op} |"))).unwrap_or_else(|| panic!("{op}: {stdout}"));
        assert_eq!(row.split('|').nth(2).unwrap().trim(), "42", "{row}");
    }
    assert!(!stdout.contains("| none |"), "the zero op is skipped: {stdout}");
}

#[test]
fn running_out_of_memory_is_an_error_with_advice_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    // Cap the address space so that the first forward pass of a large supernet cannot allocate.
    let cmd = format!(
        "ulimit -v 8000000; exec {} search --preset quick --batch-size 400 --limit 800 --channels 64 --epochs 1 \
         --device cpu --quiet --out {}",
        env!("CARGO_BIN_EXE_darts"),
        dir.path().display()
    );
    let out = Command::new("bash").args(["-c", &cmd]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("out of memory") && err.contains("--batch-size") && err.contains("--resume"), "{err}");
    assert!(!err.contains("frame #") && !err.contains("panicked"), "{err}");
}

#[test]
fn trained_weights_load_into_the_original_pytorch_model_and_give_the_same_test_result() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let o = out.to_str().unwrap();
    let (ok, _, err) = darts(&[
        "train",
        "--genotype",
        "DARTS_V2",
        "--channels",
        "4",
        "--layers",
        "5",
        "--epochs",
        "1",
        "--limit",
        "96",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        o,
    ]);
    assert!(ok, "{err}");
    let (ok, stdout, err) = darts(&["eval", "--model", o, "--which", "last", "--device", "cpu"]);
    assert!(ok, "{err}");
    let ours: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let genotype = std::fs::read_to_string(out.join("genotype.txt")).unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist-subset");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/pytorch_darts.py");
    let py = Command::new(common::darts_python())
        .args([script, "check-weights", "--channels", "4", "--layers", "5", "--classes", "10", "--in-channels", "1"])
        .args(["--auxiliary", "--limit", "96", "--genotype", genotype.trim()])
        .arg("--weights")
        .arg(out.join("model-last.safetensors"))
        .arg(format!("--images={data}/t10k-images-idx3-ubyte.gz"))
        .arg(format!("--labels={data}/t10k-labels-idx1-ubyte.gz"))
        .output()
        .unwrap();
    assert!(py.status.success(), "the original model refused the weights: {}", String::from_utf8_lossy(&py.stderr));
    let theirs: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    assert_eq!(theirs["examples"], 96);
    let (a, b) = (ours["loss"].as_f64().unwrap(), theirs["loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "test loss: ours {a}, original code {b}");
    assert_eq!(ours["top1"], theirs["top1"]);
}

#[test]
fn a_search_and_a_training_run_on_an_image_folder() {
    let data = tempfile::tempdir().unwrap();
    for (k, class) in ["cats", "dogs"].iter().enumerate() {
        for split in ["train", "test"] {
            let d = data.path().join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..12u32 {
                let img = image::RgbImage::from_fn(24 + i, 20, |x, y| {
                    image::Rgb([(x * 9) as u8, (y * 11) as u8, (k * 200) as u8])
                });
                img.save(d.join(format!("{i}.png"))).unwrap();
            }
        }
    }
    let out = tempfile::tempdir().unwrap();
    let d = data.path().to_str().unwrap();
    let s = out.path().join("s");
    let (ok, stdout, err) = darts(&[
        "search",
        "--dataset",
        "folder",
        "--data-dir",
        d,
        "--image-size",
        "16",
        "--channels",
        "4",
        "--layers",
        "3",
        "--nodes",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        s.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("Genotype("), "{stdout}");
    let t = out.path().join("t");
    let (ok, _, err) = darts(&[
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        d,
        "--image-size",
        "16",
        "--genotype",
        s.join("genotype.json").to_str().unwrap(),
        "--channels",
        "4",
        "--layers",
        "3",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        t.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let net: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("network.json")).unwrap()).unwrap();
    assert_eq!(net["input"], serde_json::json!([3, 16, 16]));
    assert_eq!(net["classes"], 2);
    // The model card names the classes by folder; predict resizes any image (a JPEG of another size and a
    // grayscale PNG, converted to RGB) and names its classes, the same through libtorch and the ONNX file.
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("model-card.json")).unwrap()).unwrap();
    assert_eq!(card["class_names"], serde_json::json!(["cats", "dogs"]));
    let photos = out.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    image::RgbImage::from_fn(40, 33, |x, y| image::Rgb([(x * 5) as u8, (y * 7) as u8, 200]))
        .save(photos.join("big.jpg"))
        .unwrap();
    image::GrayImage::from_fn(9, 9, |x, _| image::Luma([(x * 20) as u8])).save(photos.join("small.png")).unwrap();
    let p = photos.to_str().unwrap();
    let tr = t.to_str().unwrap();
    let (ok, torch, err) = darts(&["predict", "--model", tr, "--json", "--top-k", "2", p]);
    assert!(ok, "{err}");
    let onnx = out.path().join("m.onnx");
    let (ok, _, err) = darts(&["export", "--model", tr, "--out", onnx.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, tract, err) = darts(&["predict", "--model", onnx.to_str().unwrap(), "--json", "--top-k", "2", p]);
    assert!(ok, "{err}");
    let parse =
        |text: &str| -> Vec<serde_json::Value> { text.lines().map(|l| serde_json::from_str(l).unwrap()).collect() };
    let (a, b) = (parse(&torch), parse(&tract));
    assert_eq!(a.len(), 2, "{torch}");
    for (x, y) in a.iter().zip(&b) {
        let names: Vec<&str> = x["top"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"cats") && names.contains(&"dogs"), "{x}");
        assert_eq!(x["top"][0]["class"], y["top"][0]["class"], "libtorch {x}, tract {y}");
        let (px, py) = (x["top"][0]["probability"].as_f64().unwrap(), y["top"][0]["probability"].as_f64().unwrap());
        assert!((px - py).abs() < 1e-4, "libtorch {x}, tract {y}");
    }
}

/// A run's settings are fixed: `--resume` with a flag that would change them is refused, naming the flag.
#[test]
fn resume_refuses_settings_that_would_change_the_run() {
    for (cmd, flag, value) in [
        ("search", "--lr", "0.1"),
        ("search", "--arch-lr", "0.1"),
        ("search", "--order", "second"),
        ("search", "--epochs", "9"),
        ("search", "--skip-dropout", "0.3"),
        ("search", "--limit", "9"),
        ("train", "--lr", "0.1"),
        ("train", "--valid-portion", "0.1"),
        ("train", "--recipe", "darts-imagenet"),
        ("train", "--epochs", "9"),
        ("baseline", "--samples", "9"),
    ] {
        let (ok, _, err) = darts(&[cmd, "--resume", "some/run", flag, value]);
        assert!(!ok && err.contains("cannot be used with") && err.contains(flag), "{cmd} {flag}: {err}");
    }
    // Gradient checkpointing changes memory, not results: allowed (here the run is missing, which is said).
    let (ok, _, err) = darts(&["search", "--resume", "no/such/run", "--checkpoint-cells"]);
    assert!(!ok && !err.contains("cannot be used with") && err.contains("no/such/run"), "{err}");
}

/// `darts train` with a schedule from the command line: StepLR (gamma 0.5 every epoch) gives 0.025, 0.0125 in
/// the metrics, and train-config.json records the recipe and the schedule.
#[test]
fn train_takes_recipes_and_schedules_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let (ok, _, err) = darts(&[
        "train",
        "--genotype",
        "DARTS_V2",
        "--limit",
        "64",
        "--channels",
        "4",
        "--layers",
        "3",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr-schedule",
        "step",
        "--lr-gamma",
        "0.5",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out,
    ]);
    assert!(ok, "{err}");
    let lrs: Vec<f64> = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"].as_f64().unwrap())
        .collect();
    assert_eq!(lrs, vec![0.025, 0.0125]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("train-config.json")).unwrap()).unwrap();
    assert_eq!(cfg["recipe"], "darts-cifar");
    assert_eq!(cfg["lr_schedule"], serde_json::json!({"kind": "step", "gamma": 0.5, "period": 1}));
    assert!(!dir.path().join("model-best.safetensors").exists(), "no validation split, no best model");
    let (ok, _, err) = darts(&["eval", "--model", out, "--which", "best", "--device", "cpu"]);
    assert!(!ok && err.contains("no validation split"), "{err}");
    for (args, want) in [
        (vec!["--lr-gamma", "0.5"], "--lr-schedule step"),
        (vec!["--imagenet", "--recipe", "darts-cifar"], "cannot be used with"),
        (vec!["--valid-portion", "1"], "valid_portion"),
        (vec!["--lr-schedule", "step", "--lr-gamma", "2"], "gamma"),
    ] {
        let mut a = vec!["train", "--genotype", "DARTS_V2", "--quiet", "--out", out];
        a.extend(args.iter());
        let (ok, _, err) = darts(&a);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
}

/// Killed with SIGKILL at seeded random moments (before the first checkpoint, inside epochs, while writing), a
/// search checkpointing every 2 steps and continued by running the same command again ends with the checkpoint
/// bytes of an uninterrupted run; the metrics have one line per epoch.
#[test]
fn a_search_killed_again_and_again_ends_as_an_uninterrupted_one() {
    // Checkpoints after every 2 steps too: kills also land between checkpoints inside epochs.
    killed_again_and_again(
        "search --preset quick --limit 96 --channels 4 --layers 3 --nodes 2 --epochs 4 --batch-size 16 --seed 9 \
         --checkpoint-every 2",
        17,
    );
}

/// The same for a training from scratch (drop path and cutout draw from their streams, so a resume that lost
/// their positions would differ).
#[test]
fn a_training_killed_again_and_again_ends_as_an_uninterrupted_one() {
    killed_again_and_again(
        "train --genotype DARTS_V2 --limit 128 --channels 4 --layers 3 --epochs 4 --batch-size 16 --seed 9 \
         --drop-path 0.2 --cutout 8 --checkpoint-every 2",
        23,
    );
}

/// Runs `command` (4 epochs) once whole, then again and again, killed with SIGKILL at moments drawn from `seed`
/// until it has been killed at least 10 times and finishes; compares the two runs' final checkpoints, metrics
/// lines and leftover temporary files.
fn killed_again_and_again(command: &str, seed: u64) {
    use rand::{Rng, SeedableRng};
    let args = |out: &str| -> Vec<String> {
        let mut v: Vec<String> = command.split_whitespace().map(String::from).collect();
        v.extend(["--threads", "1", "--device", "cpu", "--quiet", "--out", out].map(String::from));
        v
    };
    let (whole, killed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let started = std::time::Instant::now();
    let (ok, _, err) = darts(&args(whole.path().to_str().unwrap()).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let one_run = started.elapsed().as_secs_f64();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut kills, mut runs) = (0, 0);
    loop {
        runs += 1;
        assert!(runs < 60, "the run never finished");
        let mut child = Command::new(env!("CARGO_BIN_EXE_darts"))
            .args(args(killed.path().to_str().unwrap()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A moment anywhere in a whole run's time, so that kills land before, inside and between epochs.
        let wait = std::time::Duration::from_secs_f64(rng.random_range(0.0..one_run));
        let deadline = std::time::Instant::now() + wait;
        let mut status = None;
        while std::time::Instant::now() < deadline {
            if let Some(s) = child.try_wait().unwrap() {
                status = Some(s);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        match status {
            Some(s) => {
                assert!(s.success(), "a continued run failed");
                if kills >= 10 {
                    break;
                }
                // Finished before the kill: start over to collect more kills.
                std::fs::remove_dir_all(killed.path()).unwrap();
                std::fs::create_dir_all(killed.path()).unwrap();
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
    let read = |d: &std::path::Path| {
        let mut v = tch::Tensor::read_safetensors(d.join("checkpoint.safetensors")).unwrap();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (a, b) = (read(whole.path()), read(killed.path()));
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{n} differs after {kills} kills");
    }
    let lines = std::fs::read_to_string(killed.path().join("metrics.jsonl")).unwrap();
    let epochs: Vec<u64> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, vec![0, 1, 2, 3], "{kills} kills");
    assert!(!std::fs::read_dir(killed.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
}

/// SIGTERM inside an epoch: the training writes a checkpoint where it is, says so and exits with code 75; the
/// same command continues it, to the bytes of an uninterrupted run.
#[test]
fn sigterm_checkpoints_inside_the_epoch_and_the_same_command_continues() {
    use std::io::BufRead;
    let args = |out: &std::path::Path| -> Vec<String> {
        let a = "train --genotype DARTS_V2 --limit 1500 --channels 8 --layers 5 --epochs 2 --batch-size 32 \
                 --threads 1 --device cpu --quiet --out";
        let mut v: Vec<String> = a.split_whitespace().map(String::from).collect();
        v.push(out.display().to_string());
        v
    };
    let (whole, stopped) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = |out: &std::path::Path| Command::new(env!("CARGO_BIN_EXE_darts")).args(args(out)).output().unwrap();
    assert!(run(whole.path()).status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_darts"))
        .args(args(stopped.path()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The header comes after the signal handlers are in place; a moment later the first epoch is under way.
    let mut seen = Vec::new();
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(60)) {
        let header = line.starts_with("train:");
        seen.push(line);
        if header {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(400));
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    reader.join().unwrap();
    seen.extend(rx.try_iter());
    let err = seen.join("\n");
    assert_eq!(status.code(), Some(75), "{err}");
    assert!(err.contains("stopped by a signal in epoch 1 after step") && err.contains("same command"), "{err}");
    assert!(stopped.path().join("checkpoint.safetensors").is_file() && !stopped.path().join("metrics.jsonl").exists());
    let again = run(stopped.path());
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    for file in ["checkpoint.safetensors", "model-last.safetensors"] {
        let (a, b) =
            (std::fs::read(whole.path().join(file)).unwrap(), std::fs::read(stopped.path().join(file)).unwrap());
        assert!(a == b, "{file} differs after SIGTERM and the same command");
    }
}

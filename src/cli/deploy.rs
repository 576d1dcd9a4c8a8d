//! `darts export` (a trained network as an ONNX file) and `darts predict` (classify image files).
use anyhow::{bail, Result};
use darts::deploy::onnx::{self, ExportOptions};
use darts::deploy::runtime::{Engine, EngineKind};
use darts::deploy::{predict_files, TrainedModel, Which};
use std::path::PathBuf;

/// File formats `darts export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// ONNX (opset 17), for ONNX Runtime, TensorRT, OpenVINO, tract, and converters to TFLite and Core ML.
    Onnx,
}

/// Arguments of `darts export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A training run directory (from `darts train`), or a `darts run` directory (its training stage).
    #[arg(long)]
    model: PathBuf,
    /// Which weights: last (after the last epoch) or best (chosen on the held-out validation split; runs trained
    /// with --valid-portion only).
    #[arg(long, value_enum, default_value = "last")]
    which: Which,
    /// The file format.
    #[arg(long, value_enum, default_value = "onnx")]
    format: Format,
    /// Where to write (default: model-<which>.onnx in the run directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep BatchNorm as BatchNormalization nodes instead of folding it into the convolutions (folded runs
    /// faster in tract and ONNX Runtime; see README's Deploy section).
    #[arg(long)]
    keep_batch_norm: bool,
    /// The model takes pixels / 255 and normalises inside (two nodes: minus mean, divided by std); by default
    /// it takes input normalised as in training, and the mean and std are in its metadata.
    #[arg(long)]
    normalize_inside: bool,
}

pub fn export(a: ExportArgs, rt: &super::Runtime) -> Result<()> {
    rt.single_process("export")?;
    let Format::Onnx = a.format;
    let model = TrainedModel::load(&a.model, a.which, tch::Device::Cpu)?;
    let opts = ExportOptions { fold_batch_norm: !a.keep_batch_norm, normalize_inside: a.normalize_inside };
    let proto = model.to_onnx(opts)?;
    let bytes = onnx::to_bytes(&proto);
    let which = match a.which {
        Which::Last => "last",
        Which::Best => "best",
    };
    let out = a.out.unwrap_or_else(|| darts::rundir::training_dir(&a.model).join(format!("model-{which}.onnx")));
    // Check the file before writing it: tract runs it and must give the network's own logits.
    let diff = darts::deploy::runtime::check_against_torch(&model, &bytes, opts)?;
    darts::rundir::write_atomically(&out, &bytes)?;
    let s = model.card.shape;
    println!(
        "{}",
        serde_json::json!({"file": out, "bytes": bytes.len(), "opset": onnx::OPSET,
            "input": [null, s.channels, s.height, s.width], "classes": s.classes,
            "batch_norm": if opts.fold_batch_norm { "folded" } else { "nodes" },
            "normalize_inside": opts.normalize_inside, "max_logit_difference_tract_vs_libtorch": diff})
    );
    eprintln!(
        "wrote {} ({:.1} MB, opset {}): input \"{}\" {}; outputs \"{}\" and \"{}\" [batch, {}]; {} classes ({}); \
         tract's logits equal libtorch's within {diff:.1e}",
        out.display(),
        bytes.len() as f64 / 1e6,
        onnx::OPSET,
        onnx::INPUT,
        model.card.input_description(opts),
        onnx::LOGITS,
        onnx::PROBABILITIES,
        s.classes,
        s.classes,
        model.card.class_names.iter().take(4).cloned().collect::<Vec<_>>().join(", ")
            + if s.classes > 4 { ", ..." } else { "" },
    );
    Ok(())
}

/// Arguments of `darts predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// A training run directory, or an ONNX file written by `darts export`.
    #[arg(long)]
    model: PathBuf,
    /// Image files (PNG, JPEG; any size) and folders (searched recursively).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// One JSON object per line (file, top classes with probabilities) instead of text.
    #[arg(long)]
    json: bool,
    /// torch (libtorch, the model as trained; run directories) or tract (the ONNX graph). Default: torch for a
    /// run directory, tract for an .onnx file. Both give the same answers.
    #[arg(long, value_enum)]
    engine: Option<EngineKind>,
    /// Which weights of a run directory.
    #[arg(long, value_enum, default_value = "last")]
    which: Which,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
}

pub fn predict(a: PredictArgs, rt: &super::Runtime) -> Result<()> {
    rt.single_process("predict")?;
    if a.top_k == 0 {
        bail!("--top-k 0: show at least one class");
    }
    if a.batch_size == 0 {
        bail!("--batch-size 0: use at least 1");
    }
    let is_onnx = a.model.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"));
    let kind = a.engine.unwrap_or(if is_onnx { EngineKind::Tract } else { EngineKind::Torch });
    let device = if kind == EngineKind::Torch { rt.device()? } else { tch::Device::Cpu };
    let engine = Engine::load(&a.model, a.which, kind, device)?;
    if kind == EngineKind::Tract {
        rt.set_tract_threads();
    }
    let files = darts::deploy::image::collect(&a.images)?;
    if files.is_empty() {
        bail!("no PNG or JPEG files in {:?}", a.images);
    }
    let bar = (files.len() > 200 && !rt.quiet()).then(|| {
        let b = indicatif::ProgressBar::new(files.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images {per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let k = a.top_k.min(engine.card().shape.classes);
    let start = std::time::Instant::now();
    let (preds, failures) = predict_files(&engine, &files, k, a.batch_size, |n| {
        if let Some(b) = &bar {
            b.set_position(n as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for p in &preds {
        if a.json {
            println!("{}", serde_json::to_string(p)?);
        } else {
            let top: Vec<String> = p.top.iter().map(|c| format!("{} {:.1}%", c.name, 100.0 * c.probability)).collect();
            println!("{}: {}", p.file.display(), top.join(", "));
        }
    }
    for f in &failures {
        eprintln!("{}: skipped: {}", f.file.display(), f.error);
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} image(s) classified with {} in {secs:.2} s ({:.0} images/s)",
        preds.len(),
        match kind {
            EngineKind::Torch => "libtorch",
            EngineKind::Tract => "tract",
        },
        preds.len() as f64 / secs.max(1e-9)
    );
    if !failures.is_empty() {
        bail!("{} of {} file(s) could not be read (listed above)", failures.len(), files.len());
    }
    Ok(())
}

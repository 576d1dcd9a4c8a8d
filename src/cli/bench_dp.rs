//! `darts bench --data-parallel`: an epoch of training and of search on W processes x (T / W) threads against one
//! process x T threads, on this machine, interleaved round by round; and the share of the epoch spent in
//! all-reduces. Each run is a real `darts train` / `darts search` in its own process(es), as torchrun would start
//! them (the variables set here, the store on 127.0.0.1).
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};

/// What to run.
pub struct DpPlan {
    /// Processes of the data-parallel runs.
    pub world: usize,
    /// Threads in all: the single process gets all of them, each rank `threads / world`.
    pub threads: usize,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Training examples of the epoch (the search splits them in halves).
    pub limit: usize,
    /// Search: batch, channels, cells.
    pub search: (i64, usize, usize),
    /// Training: batch, channels, cells, genotype.
    pub train: (i64, usize, usize, String),
}

/// One epoch's seconds and the seconds rank 0 spent in collectives, from a run directory's metrics.
fn epoch_seconds(dir: &Path) -> Result<(f64, Option<f64>)> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .with_context(|| format!("{} has no metrics: the run failed", dir.display()))?;
    let line = text.lines().last().context("no epoch recorded")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    Ok((v["seconds"].as_f64().context("no seconds")?, v["comm_seconds"].as_f64()))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs `args` (a darts command line ending in `--out`) as `world` processes (1: alone) into `dir`.
fn run(exe: &str, args: &[String], dir: &Path, world: usize, threads: usize) -> Result<(f64, Option<f64>)> {
    let _ = std::fs::remove_dir_all(dir);
    let port = free_port()?;
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let mut cmd = Command::new(exe);
            cmd.args(args).arg(dir).args(["--threads", &threads.to_string(), "--quiet"]);
            cmd.env("OMP_WAIT_POLICY", std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "PASSIVE".into()));
            if world > 1 {
                cmd.env("WORLD_SIZE", world.to_string())
                    .env("RANK", rank.to_string())
                    .env("LOCAL_RANK", rank.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string());
            }
            cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().context("starting darts")
        })
        .collect::<Result<_>>()?;
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!("rank {rank} of {world} failed: {}", err.lines().last().unwrap_or("no message"));
        }
    }
    epoch_seconds(dir)
}

/// One kind of epoch's measurements over the rounds: alone, data-parallel, and the all-reduce share.
struct Measured {
    name: String,
    alone: Vec<f64>,
    dp: Vec<f64>,
    comm_share: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures and prints the table.
pub fn bench_data_parallel(p: &DpPlan) -> Result<()> {
    if p.world < 2 || !p.threads.is_multiple_of(p.world) {
        bail!(
            "--world {} with {} threads: use at least 2 processes and a thread count they divide",
            p.world,
            p.threads
        );
    }
    if !darts::dist::Dist::available() {
        bail!("this darts was built without c10d's Gloo process group (libgloo-dev missing): run scripts/setup.sh");
    }
    let exe = std::env::current_exe()?.display().to_string();
    let tmp = std::env::temp_dir().join(format!("darts-bench-dp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let limit = p.limit.to_string();
    let (sb, sc, sl) = p.search;
    let (tb, tc, tl, g) = &p.train;
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let kinds: Vec<(&str, Vec<String>)> = vec![
        (
            "training epoch",
            strs(&[
                "train",
                "--genotype",
                g,
                "--limit",
                &limit,
                "--epochs",
                "1",
                "--batch-size",
                &tb.to_string(),
                "--channels",
                &tc.to_string(),
                "--layers",
                &tl.to_string(),
                "--device",
                "cpu",
                "--out",
            ]),
        ),
        (
            "search epoch (first order)",
            strs(&[
                "search",
                "--preset",
                "quick",
                "--limit",
                &limit,
                "--epochs",
                "1",
                "--batch-size",
                &sb.to_string(),
                "--channels",
                &sc.to_string(),
                "--layers",
                &sl.to_string(),
                "--device",
                "cpu",
                "--out",
            ]),
        ),
    ];
    let per_rank = p.threads / p.world;
    let mut results: Vec<Measured> = Vec::new();
    for (name, args) in &kinds {
        let (mut alone, mut dp, mut comm) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..p.rounds {
            eprintln!("{name}: round {}/{}", round + 1, p.rounds);
            // Every other round the other configuration first.
            let order = if round % 2 == 0 { [1, p.world] } else { [p.world, 1] };
            for world in order {
                let dir = tmp.join(format!("w{world}"));
                let threads = if world == 1 { p.threads } else { per_rank };
                let (s, c) = run(&exe, args, &dir, world, threads)?;
                eprintln!("  {world} process(es) x {threads} thread(s): {s:.1} s");
                if world == 1 {
                    alone.push(s);
                } else {
                    dp.push(s);
                    comm.push(c.unwrap_or(f64::NAN) / s);
                }
            }
        }
        results.push(Measured { name: name.to_string(), alone, dp, comm_share: comm });
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "| {} examples, epoch incl. evaluation | 1 process x {} threads | {} processes x {per_rank} thread(s) | \
         speed-up | all-reduce share |",
        p.limit, p.threads, p.world
    );
    println!("|---|---:|---:|---:|---:|");
    for m in results {
        let ratios: Vec<f64> = m.alone.iter().zip(&m.dp).map(|(a, d)| a / d).collect();
        println!(
            "| {} | {:.1} s | {:.1} s | {:.2}x | {:.1}% |",
            m.name,
            median(m.alone),
            median(m.dp),
            median(ratios),
            100.0 * median(m.comm_share)
        );
    }
    Ok(())
}

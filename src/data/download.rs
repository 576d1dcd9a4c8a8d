//! Downloads of the standard datasets from their canonical locations: SHA-256 checked, retried, resumed
//! from partial files (HTTP Range), with a progress bar; offline, an error that lists which files to put where.
use super::DatasetKind;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// One file of a dataset.
#[derive(Clone, Debug)]
pub struct RemoteFile {
    /// File name (also its name under the base URL).
    pub name: String,
    /// Expected SHA-256, hex.
    pub sha256: String,
    /// Expected size in bytes.
    pub size: u64,
}

/// Where a dataset's files come from.
#[derive(Clone, Debug)]
pub struct Source {
    /// Base URLs tried in order (mirrors); a file's URL is base + "/" + name.
    pub urls: Vec<String>,
    /// The files.
    pub files: Vec<RemoteFile>,
}

fn file(name: &str, sha256: &str, size: u64) -> RemoteFile {
    RemoteFile { name: name.into(), sha256: sha256.into(), size }
}

/// The canonical source of `kind`, if darts can download it (MNIST and Fashion-MNIST so far).
pub fn source(kind: DatasetKind) -> Option<Source> {
    match kind {
        DatasetKind::Mnist => Some(Source {
            urls: vec![
                "https://ossci-datasets.s3.amazonaws.com/mnist".into(),
                "https://storage.googleapis.com/cvdf-datasets/mnist".into(),
            ],
            files: vec![
                file(
                    "train-images-idx3-ubyte.gz",
                    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                    9_912_422,
                ),
                file(
                    "train-labels-idx1-ubyte.gz",
                    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                    28_881,
                ),
                file(
                    "t10k-images-idx3-ubyte.gz",
                    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                    1_648_877,
                ),
                file(
                    "t10k-labels-idx1-ubyte.gz",
                    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                    4_542,
                ),
            ],
        }),
        DatasetKind::FashionMnist => Some(Source {
            urls: vec!["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com".into()],
            files: vec![
                file(
                    "train-images-idx3-ubyte.gz",
                    "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                    26_421_880,
                ),
                file(
                    "train-labels-idx1-ubyte.gz",
                    "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                    29_515,
                ),
                file(
                    "t10k-images-idx3-ubyte.gz",
                    "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                    4_422_102,
                ),
                file(
                    "t10k-labels-idx1-ubyte.gz",
                    "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                    5_148,
                ),
            ],
        }),
        _ => None,
    }
}

/// Where `darts data get` puts a dataset by default: `$DARTS_DATA/<name>`, else `~/.cache/darts/data/<name>`
/// (the folders the loader looks in).
pub fn default_dir(kind: DatasetKind) -> PathBuf {
    let sub = match kind {
        DatasetKind::FashionMnist => "fashion-mnist",
        other => other.name(),
    };
    if let Some(d) = std::env::var_os("DARTS_DATA") {
        return PathBuf::from(d).join(sub);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/darts/data").join(sub)
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Downloads every file of `src` into `dir` (skipping files already there with the right checksum) and
/// returns `dir`. `progress` shows a bar per file.
pub fn fetch(name: &str, src: &Source, dir: &Path, progress: bool) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for f in &src.files {
        let dest = dir.join(&f.name);
        if dest.is_file() && sha256_file(&dest)? == f.sha256 {
            continue;
        }
        let mut errors = Vec::new();
        let mut done = false;
        for base in &src.urls {
            let url = format!("{}/{}", base.trim_end_matches('/'), f.name);
            match fetch_file(&url, f, &dest, progress) {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(e) => errors.push(format!("{url}: {e:#}")),
            }
        }
        if !done {
            let list: Vec<String> = src.files.iter().map(|f| format!("  {}  (sha256 {})", f.name, f.sha256)).collect();
            bail!(
                "could not download {name}:\n  {}\nOffline? Put these files into {} (or any folder given with \
                 --data-dir):\n{}",
                errors.join("\n  "),
                dir.display(),
                list.join("\n")
            );
        }
    }
    Ok(dir.to_path_buf())
}

/// One file: resumes `dest.part` with a Range request, retries transfer errors (4 tries), checks the size and
/// the SHA-256 (a mismatch discards the partial file and starts over once), then renames it into place.
fn fetch_file(url: &str, f: &RemoteFile, dest: &Path, progress: bool) -> Result<()> {
    let part = PathBuf::from(format!("{}.part", dest.display()));
    let mut fresh_starts = 0;
    let mut last_error = String::new();
    for _attempt in 0..6 {
        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if have < f.size {
            let mut req = ureq::get(url).timeout(std::time::Duration::from_secs(60));
            if have > 0 {
                req = req.set("Range", &format!("bytes={have}-"));
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(416, _)) => {
                    // The partial file is not a prefix the server knows: start over.
                    let _ = std::fs::remove_file(&part);
                    continue;
                }
                Err(ureq::Error::Status(code, _)) => bail!("HTTP status {code}"),
                Err(e) => {
                    last_error = e.to_string();
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    continue;
                }
            };
            let append = resp.status() == 206 && have > 0;
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(&part)
                .with_context(|| format!("writing {}", part.display()))?;
            let start = if append { have } else { 0 };
            let bar = progress.then(|| {
                let b = indicatif::ProgressBar::new(f.size);
                b.set_style(
                    indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b.set_message(f.name.clone());
                b.set_position(start);
                b
            });
            let mut reader = resp.into_reader();
            let mut buf = vec![0u8; 1 << 16];
            let mut got = start;
            let outcome: std::io::Result<()> = (|| loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                out.write_all(&buf[..n])?;
                got += n as u64;
                if let Some(b) = &bar {
                    b.set_position(got);
                }
            })();
            out.flush()?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if let Err(e) = outcome {
                last_error = format!("transfer interrupted after {got} of {} bytes: {e}", f.size);
                continue; // the next try resumes from what arrived
            }
        }
        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if have < f.size {
            last_error = format!("transfer ended after {have} of {} bytes", f.size);
            continue;
        }
        let sum = sha256_file(&part)?;
        if have != f.size || sum != f.sha256 {
            let _ = std::fs::remove_file(&part);
            fresh_starts += 1;
            last_error = format!(
                "{} is corrupt: {have} bytes with SHA-256 {sum}, expected {} bytes with {}",
                f.name, f.size, f.sha256
            );
            if fresh_starts > 1 {
                bail!("{last_error} (twice; the file was deleted)");
            }
            continue;
        }
        std::fs::rename(&part, dest).with_context(|| format!("moving {} into place", dest.display()))?;
        return Ok(());
    }
    bail!("{last_error}")
}

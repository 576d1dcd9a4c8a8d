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
    /// Set when the one file is a `.tar.gz` archive: it is checked, unpacked into the dataset folder and deleted.
    pub unpack: Option<Unpack>,
}

/// How a downloaded archive becomes the dataset folder.
#[derive(Clone, Debug)]
pub struct Unpack {
    /// The archive's top-level folder, whose files land directly in the dataset folder.
    pub top: String,
    /// The files the dataset needs: present means the dataset is there; missing after unpacking is an error.
    pub expect: Vec<String>,
}

fn file(name: &str, sha256: &str, size: u64) -> RemoteFile {
    RemoteFile { name: name.into(), sha256: sha256.into(), size }
}

fn idx_source(urls: &[&str], files: Vec<RemoteFile>) -> Source {
    Source { urls: urls.iter().map(|u| u.to_string()).collect(), files, unpack: None }
}

fn archive_source(url: &str, archive: RemoteFile, top: &str, expect: &[&str]) -> Source {
    Source {
        urls: vec![url.into()],
        files: vec![archive],
        unpack: Some(Unpack { top: top.into(), expect: expect.iter().map(|e| e.to_string()).collect() }),
    }
}

/// The canonical source of `kind`, if darts can download it: MNIST, Fashion-MNIST, KMNIST (IDX files), CIFAR-10
/// and CIFAR-100 (binary archives), SVHN (MAT-files). Checksums and sizes are the ones TensorFlow Datasets records and several
/// other independent projects agree on.
pub fn source(kind: DatasetKind) -> Option<Source> {
    match kind {
        DatasetKind::Mnist => Some(Source {
            unpack: None,
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
            unpack: None,
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
        DatasetKind::Kmnist => Some(idx_source(
            &["https://codh.rois.ac.jp/kmnist/dataset/kmnist", "http://codh.rois.ac.jp/kmnist/dataset/kmnist"],
            vec![
                file(
                    "train-images-idx3-ubyte.gz",
                    "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
                    18_165_135,
                ),
                file(
                    "train-labels-idx1-ubyte.gz",
                    "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
                    29_497,
                ),
                file(
                    "t10k-images-idx3-ubyte.gz",
                    "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
                    3_041_136,
                ),
                file(
                    "t10k-labels-idx1-ubyte.gz",
                    "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
                    5_120,
                ),
            ],
        )),
        DatasetKind::Cifar10 => Some(archive_source(
            "https://www.cs.toronto.edu/~kriz",
            file(
                "cifar-10-binary.tar.gz",
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                170_052_171,
            ),
            "cifar-10-batches-bin",
            &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
                "test_batch.bin",
                "batches.meta.txt",
            ],
        )),
        DatasetKind::Cifar100 => Some(archive_source(
            "https://www.cs.toronto.edu/~kriz",
            file(
                "cifar-100-binary.tar.gz",
                "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
                168_513_733,
            ),
            "cifar-100-binary",
            &["train.bin", "test.bin", "fine_label_names.txt", "coarse_label_names.txt"],
        )),
        // The cropped digits' training and test sets (the 1.3 GB `extra_32x32.mat` is left out).
        DatasetKind::Svhn => Some(idx_source(
            &["http://ufldl.stanford.edu/housenumbers"],
            vec![
                file(
                    "train_32x32.mat",
                    "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8",
                    182_040_794,
                ),
                file("test_32x32.mat", "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b", 64_275_384),
            ],
        )),
        _ => None,
    }
}

/// Every dataset darts can download.
pub fn downloadable() -> Vec<DatasetKind> {
    use DatasetKind::*;
    [Mnist, FashionMnist, Kmnist, Cifar10, Cifar100, Svhn].into_iter().filter(|k| source(*k).is_some()).collect()
}

/// Where `darts data get` puts a dataset by default: `$DARTS_DATA/<folder>`, else `~/.cache/darts/data/<folder>`
/// (the folders the loader looks in; CIFAR keeps its archive's folder name, e.g. `cifar-10-batches-bin`).
pub fn default_dir(kind: DatasetKind) -> PathBuf {
    let sub = kind.folder_name();
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

/// Downloads every file of `src` into `dir` (skipping files already there with the right checksum; for an
/// archive, skipping it when every file it should give is there), unpacks an archive, and returns `dir`.
/// `progress` shows a bar per file.
pub fn fetch(name: &str, src: &Source, dir: &Path, progress: bool) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(u) = &src.unpack {
        if u.expect.iter().all(|e| dir.join(e).is_file()) {
            return Ok(dir.to_path_buf());
        }
    }
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
                Err(e) => {
                    // ureq's transport errors already begin with the URL.
                    let msg = format!("{e:#}");
                    errors.push(if msg.starts_with(&url) { msg } else { format!("{url}: {msg}") });
                }
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
    if let Some(u) = &src.unpack {
        for f in &src.files {
            let archive = dir.join(&f.name);
            if let Err(e) = unpack(&archive, u, dir) {
                // A checked archive that does not unpack is not worth keeping: the next try fetches it again.
                let _ = std::fs::remove_file(&archive);
                return Err(e.context(format!(
                    "unpacking {name}: the archive was deleted, run the command again to fetch it anew"
                )));
            }
            std::fs::remove_file(&archive).with_context(|| format!("removing {}", archive.display()))?;
        }
    }
    Ok(dir.to_path_buf())
}

/// Unpacks the regular files under `u.top/` of the `.tar.gz` `archive` into `dir` (each written to a temporary
/// name, then renamed into place); paths that would leave `dir`, links and other entries are skipped. Errors name
/// the archive; missing expected files are an error.
pub fn unpack(archive: &Path, u: &Unpack, dir: &Path) -> Result<()> {
    let corrupt =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("{} is not a readable .tar.gz archive ({e})", archive.display());
    let f = std::fs::File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
    let entries = tar.entries().map_err(|e| corrupt(&e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(&e))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().map_err(|e| corrupt(&e))?.into_owned();
        let Ok(rel) = path.strip_prefix(&u.top) else { continue };
        let safe = rel.components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if !safe || rel.as_os_str().is_empty() {
            continue;
        }
        let dest = dir.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let tmp = PathBuf::from(format!("{}.unpacking", dest.display()));
        let mut out = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            corrupt(&format!("{}: {e}", rel.display()))
        })?;
        out.sync_all().with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
    }
    let missing: Vec<&str> = u.expect.iter().filter(|e| !dir.join(e).is_file()).map(|e| e.as_str()).collect();
    if !missing.is_empty() {
        bail!("{} unpacked, but {}/ in it lacks {}", archive.display(), u.top, missing.join(", "));
    }
    Ok(())
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

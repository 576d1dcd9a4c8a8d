//! Downloads against a real HTTP server on 127.0.0.1 that the test starts: a clean transfer, one cut off
//! half-way (resumed with a Range request), a corrupted one (checksum), and no server at all (offline).
use darts::data::download::{fetch, sha256_file, RemoteFile, Source, Unpack};
use darts::data::{load, DatasetKind};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// Every request the server saw: (path, Range start).
type RequestLog = Arc<Mutex<Vec<(String, Option<String>)>>>;

struct Server {
    base: String,
    log: RequestLog,
}

/// Serves `files`; "cut" paths send only half their bytes on the first request; "bad" paths flip a byte.
fn serve(files: HashMap<String, Vec<u8>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log: RequestLog = Arc::default();
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().trim_end_matches('-').to_string());
                }
            }
            let first = !seen.lock().unwrap().iter().any(|(p, _)| *p == path);
            seen.lock().unwrap().push((path.clone(), range.clone()));
            let Some(body) = files.get(&path) else {
                let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                continue;
            };
            let mut body = body.clone();
            if path.starts_with("bad") {
                body[1000] ^= 0xff;
            }
            let from: usize = range.as_deref().and_then(|r| r.parse().ok()).unwrap_or(0);
            let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
            let rest = &body[from..];
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
                rest.len(),
                body.len() - 1,
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let cut = path.starts_with("cut") && first;
            let _ = stream.write_all(if cut { &rest[..rest.len() / 2] } else { rest });
            let _ = stream.flush();
        }
    });
    Server { base, log }
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_shr(13) as u8 ^ seed).collect()
}

fn remote(name: &str, bytes: &[u8], dir: &std::path::Path) -> RemoteFile {
    let tmp = dir.join(format!("{name}.expected"));
    std::fs::write(&tmp, bytes).unwrap();
    let sha256 = sha256_file(&tmp).unwrap();
    std::fs::remove_file(&tmp).unwrap();
    RemoteFile { name: name.into(), sha256, size: bytes.len() as u64 }
}

#[test]
fn downloads_verify_resume_and_explain() {
    let scratch = tempfile::tempdir().unwrap();
    let (good, cut, bad) = (payload(300_000, 1), payload(500_000, 2), payload(200_000, 3));
    let files: HashMap<String, Vec<u8>> =
        [("good.gz".to_string(), good.clone()), ("cut.gz".into(), cut.clone()), ("bad.gz".into(), bad.clone())].into();
    let server = serve(files);

    // A clean file and one cut off half-way: both arrive whole, the second by resuming.
    let dest = scratch.path().join("data");
    let src = Source {
        urls: vec![server.base.clone()],
        files: vec![remote("good.gz", &good, scratch.path()), remote("cut.gz", &cut, scratch.path())],
        unpack: None,
    };
    fetch("test set", &src, &dest, false).unwrap();
    assert_eq!(std::fs::read(dest.join("good.gz")).unwrap(), good);
    assert_eq!(std::fs::read(dest.join("cut.gz")).unwrap(), cut);
    assert!(!dest.join("cut.gz.part").exists());
    let log = server.log.lock().unwrap().clone();
    let resumed: Vec<&Option<String>> = log.iter().filter(|(p, _)| p == "cut.gz").map(|(_, r)| r).collect();
    assert_eq!(resumed.len(), 2, "{log:?}");
    assert_eq!(resumed[1].as_deref(), Some("250000"), "the second request resumes after the half that arrived");

    // Already there with the right checksum: nothing is fetched again.
    fetch("test set", &src, &dest, false).unwrap();
    assert_eq!(server.log.lock().unwrap().len(), log.len());

    // A corrupted transfer is caught by the checksum, retried once from scratch, then reported; nothing is kept.
    let src_bad =
        Source { urls: vec![server.base.clone()], files: vec![remote("bad.gz", &bad, scratch.path())], unpack: None };
    let e = format!("{:#}", fetch("test set", &src_bad, &dest, false).unwrap_err());
    assert!(e.contains("bad.gz is corrupt") && e.contains("SHA-256"), "{e}");
    assert!(!dest.join("bad.gz").exists() && !dest.join("bad.gz.part").exists());

    // No server: the error says which files to put where.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let src_off = Source { urls: vec![format!("http://{dead}")], files: src.files.clone(), unpack: None };
    let offline = scratch.path().join("offline");
    let e = format!("{:#}", fetch("test set", &src_off, &offline, false).unwrap_err());
    assert!(
        e.contains("Offline? Put these files into") && e.contains("good.gz") && e.contains(&src.files[0].sha256),
        "{e}"
    );
}

#[test]
fn the_canonical_sources_are_complete() {
    for kind in darts::data::download::downloadable() {
        let src = darts::data::download::source(kind).unwrap();
        let n = match kind {
            _ if src.unpack.is_some() => 1,
            DatasetKind::Svhn => 2,
            _ => 4,
        };
        assert_eq!(src.files.len(), n, "{kind:?}");
        assert!(src.files.iter().all(|f| f.sha256.len() == 64 && f.size > 1000), "{kind:?}");
        assert!(src.files.iter().all(|f| f.sha256.chars().all(|c| c.is_ascii_hexdigit())), "{kind:?}");
    }
    let all = darts::data::download::downloadable();
    for kind in
        [DatasetKind::Mnist, DatasetKind::FashionMnist, DatasetKind::Kmnist, DatasetKind::Cifar10, DatasetKind::Svhn]
    {
        assert!(all.contains(&kind), "{kind:?}");
    }
}

/// CIFAR-10 binary records: label byte, then 3x32x32 pixels; record `i` of file `f` has label `(f + i) % 10` and
/// every pixel equal to `10 * f + i`.
fn cifar_file(f: u8, records: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..records {
        out.push((f + i) % 10);
        out.extend(std::iter::repeat_n(10 * f + i, 3072));
    }
    out
}

/// A `.tar.gz` holding `files` (name, bytes), plus a link and a file outside the top folder that must be ignored.
fn tar_gz(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "cifar-10-batches-bin/link", "/etc/passwd").unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

#[test]
fn a_cifar_archive_is_fetched_checked_unpacked_and_loads() {
    let scratch = tempfile::tempdir().unwrap();
    let mut files: Vec<(String, Vec<u8>)> =
        (1..=5u8).map(|f| (format!("cifar-10-batches-bin/data_batch_{f}.bin"), cifar_file(f, 2))).collect();
    files.push(("cifar-10-batches-bin/test_batch.bin".into(), cifar_file(7, 3)));
    files.push(("cifar-10-batches-bin/batches.meta.txt".into(), b"airplane\nautomobile\n".to_vec()));
    files.push(("readme-outside.txt".into(), b"not part of the dataset".to_vec()));
    let good = tar_gz(&files);
    // The same archive without its test batch: checked fine, but not a whole dataset.
    let partial = tar_gz(&files[..5]);
    let server = serve(
        [("cifar-10-binary.tar.gz".to_string(), good.clone()), ("partial.tar.gz".into(), partial.clone())].into(),
    );
    let expect: Vec<String> =
        files[..7].iter().map(|(n, _)| n.trim_start_matches("cifar-10-batches-bin/").into()).collect();
    let unpack = Some(Unpack { top: "cifar-10-batches-bin".into(), expect });

    let dir = scratch.path().join("cifar-10-batches-bin");
    let src = Source {
        urls: vec![server.base.clone()],
        files: vec![remote("cifar-10-binary.tar.gz", &good, scratch.path())],
        unpack: unpack.clone(),
    };
    fetch("cifar10", &src, &dir, false).unwrap();
    assert!(!dir.join("cifar-10-binary.tar.gz").exists(), "the archive is removed once unpacked");
    assert!(
        !dir.join("link").exists()
            && !dir.join("readme-outside.txt").exists()
            && !scratch.path().join("readme-outside.txt").exists()
    );
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names.len(), 7, "{names:?}");

    let train = load(DatasetKind::Cifar10, Some(&dir), true).unwrap();
    assert_eq!(train.len(), 10);
    let labels: Vec<i64> = Vec::try_from(&train.labels).unwrap();
    assert_eq!(labels, vec![1, 2, 2, 3, 3, 4, 4, 5, 5, 6]);
    let pixels = Vec::<u8>::try_from(train.images.flatten(0, -1)).unwrap();
    assert_eq!(pixels[3072 * 3], 21, "third image = file 2, record 1");
    let test = load(DatasetKind::Cifar10, Some(&dir), false).unwrap();
    assert_eq!(test.len(), 3);

    // Once there, nothing is fetched again.
    let before = server.log.lock().unwrap().len();
    fetch("cifar10", &src, &dir, false).unwrap();
    assert_eq!(server.log.lock().unwrap().len(), before);

    // An archive that lacks a file the dataset needs: a clear error, and the archive is not kept.
    let dir2 = scratch.path().join("partial");
    let src2 = Source {
        urls: vec![server.base.clone()],
        files: vec![remote("partial.tar.gz", &partial, scratch.path())],
        unpack,
    };
    let e = format!("{:#}", fetch("cifar10", &src2, &dir2, false).unwrap_err());
    assert!(e.contains("lacks") && e.contains("test_batch.bin") && e.contains("batches.meta.txt"), "{e}");
    assert!(!dir2.join("partial.tar.gz").exists());
}

#[test]
fn a_corrupt_archive_is_reported_by_name() {
    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("x.tar.gz");
    let mut bytes = tar_gz(&[("top/a.bin".into(), payload(100_000, 4))]);
    let n = bytes.len();
    bytes.truncate(n / 2);
    std::fs::write(&archive, &bytes).unwrap();
    let u = Unpack { top: "top".into(), expect: vec!["a.bin".into()] };
    let e = format!("{:#}", darts::data::download::unpack(&archive, &u, scratch.path()).unwrap_err());
    assert!(e.contains("x.tar.gz") && e.contains("not a readable .tar.gz"), "{e}");
    assert!(!scratch.path().join("a.bin").exists());
}

//! Downloads against a real HTTP server on 127.0.0.1 that the test starts: a clean transfer, one cut off
//! half-way (resumed with a Range request), a corrupted one (checksum), and no server at all (offline).
use darts::data::download::{fetch, sha256_file, RemoteFile, Source};
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
    let src_bad = Source { urls: vec![server.base.clone()], files: vec![remote("bad.gz", &bad, scratch.path())] };
    let e = format!("{:#}", fetch("test set", &src_bad, &dest, false).unwrap_err());
    assert!(e.contains("bad.gz is corrupt") && e.contains("SHA-256"), "{e}");
    assert!(!dest.join("bad.gz").exists() && !dest.join("bad.gz.part").exists());

    // No server: the error says which files to put where.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let src_off = Source { urls: vec![format!("http://{dead}")], files: src.files.clone() };
    let offline = scratch.path().join("offline");
    let e = format!("{:#}", fetch("test set", &src_off, &offline, false).unwrap_err());
    assert!(
        e.contains("Offline? Put these files into") && e.contains("good.gz") && e.contains(&src.files[0].sha256),
        "{e}"
    );
}

#[test]
fn the_canonical_sources_are_complete() {
    for kind in [darts::data::DatasetKind::Mnist, darts::data::DatasetKind::FashionMnist] {
        let src = darts::data::download::source(kind).unwrap();
        assert_eq!(src.files.len(), 4);
        assert!(src.files.iter().all(|f| f.sha256.len() == 64 && f.size > 1000));
    }
}

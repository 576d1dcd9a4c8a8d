//! Helpers the integration tests share.

/// darts' own cache folder (scripts/setup.sh's `$DARTS_CACHE`, by default ~/.cache/darts).
pub fn darts_cache() -> String {
    std::env::var("DARTS_CACHE").unwrap_or_else(|_| format!("{}/.cache/darts", std::env::var("HOME").expect("HOME")))
}

/// The Python with torch for the PyTorch reference: `$DARTS_PYTHON`, else that of darts' own set-up.
pub fn darts_python() -> String {
    if let Ok(p) = std::env::var("DARTS_PYTHON") {
        return p;
    }
    let py = format!("{}/venv/bin/python", darts_cache());
    assert!(std::path::Path::new(&py).is_file(), "{py} missing: run scripts/setup.sh first");
    py
}

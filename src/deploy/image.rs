//! Image files into the network's input: decoded (PNG, JPEG), resized and converted exactly as image folders are
//! for training, normalised as the model card says.

use super::ModelCard;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

fn is_image(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
}

/// The image files named by `args`: files as given, folders searched recursively for PNG and JPEG files (in
/// name order). A path that does not exist is an error naming it.
pub fn collect(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        if a.is_dir() {
            let mut found = Vec::new();
            let mut stack = vec![a.clone()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).map_err(|e| anyhow::anyhow!("{}: {e}", d.display()))? {
                    let p = e?.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if is_image(&p) {
                        found.push(p);
                    }
                }
            }
            found.sort();
            out.extend(found);
        } else if a.exists() {
            out.push(a.clone());
        } else {
            bail!("{} does not exist: give image files (PNG, JPEG) or folders holding them", a.display());
        }
    }
    Ok(out)
}

/// One image's input values (`channels * height * width`, CHW): decoded, resized to the card's size and channels
/// as training prepared image folders, then `(p / 255 - mean) / std` per channel, or only `p / 255` when the
/// model normalises inside (`normalized` false).
pub fn input_of(path: &Path, card: &ModelCard, normalized: bool) -> Result<Vec<f32>> {
    let img = image::ImageReader::open(path)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_guessed_format()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .decode()
        .map_err(|e| anyhow::anyhow!("not a readable PNG or JPEG image ({e})"))?;
    let s = card.shape;
    let px = crate::data::folder::pixels(&img, s.channels, s.height, s.width);
    let plane = s.height * s.width;
    Ok(px
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let v = p as f64 / 255.0;
            let ch = i / plane;
            (if normalized { (v - card.mean[ch]) / card.std[ch] } else { v }) as f32
        })
        .collect())
}
